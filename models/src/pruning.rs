//! Structured pruning of feed-forward neurons (LLM-Pruner, Ma et al., 2023; LORAM, Zhang et al.,
//! 2025), the baseline EMLoC compares with: each layer keeps the FFN neurons with the largest
//! activation norm on the calibration data, the same number in every layer.
//! [`BertModel::prune_ffn`](crate::bert::BertModel::prune_ffn) cuts them;
//! [`emloc::peft::PeftAdapter::unprune_layer`] moves LoRA trained on the pruned model back.
//!
//! The norms come from the calibration statistics emloc already gathers: the diagonal of the
//! input Gram matrix `XᵀX` of the layer that reads the neurons (a BERT's `output.dense`) is each
//! neuron's squared activation norm over the calibration tokens.

use emloc::Matrix;
use emloc::peft::{KeptFeatures, PeftAdapter};

/// The `keep` neurons with the largest squared activation norms `diag(gram)`, in increasing
/// index order (ties: the lower index first).
///
/// # Panics
/// If `gram` is not square or `keep` exceeds its size.
pub fn strongest_neurons(gram: &Matrix, keep: usize) -> Vec<usize> {
    assert_eq!(gram.rows, gram.cols, "strongest_neurons: a Gram matrix is square");
    assert!(keep <= gram.rows, "strongest_neurons: keep {keep} of {} neurons", gram.rows);
    let mut order: Vec<usize> = (0..gram.rows).collect();
    order.sort_by(|&a, &b| gram.get(b, b).total_cmp(&gram.get(a, a)).then(a.cmp(&b)));
    let mut kept = order[..keep].to_vec();
    kept.sort_unstable();
    kept
}

/// Neurons per layer (at least 1, at most `width`) that bring `layers` FFNs of `width` neurons,
/// each neuron costing `params_per_neuron` weights (`2 · d_model` for a BERT FFN `d_model →
/// width → d_model`, `3 · d_model` for a gated SwiGLU MLP), closest to `ffn_params` parameters
/// in all.
pub fn neurons_for_params(
    ffn_params: usize,
    layers: usize,
    params_per_neuron: usize,
    width: usize,
) -> usize {
    let per_neuron = (params_per_neuron * layers).max(1) as f64;
    ((ffn_params as f64 / per_neuron).round() as usize).clamp(1, width)
}

/// LoRA trained on a model whose FFN in layer `l` kept the neurons `kept[l]` of `width`, moved
/// back onto the unpruned model: the layers `writers(l)` (whose outputs are the neurons: a
/// BERT's `intermediate.dense`, a Llama's `gate_proj` and `up_proj`) and `reader(l)` (whose
/// inputs are: `output.dense`, `down_proj`) get zeros at the pruned features
/// ([`PeftAdapter::unprune_layer`]); layers the adapter does not cover are left alone.
///
/// # Errors
/// As [`PeftAdapter::unprune_layer`] (indices that do not fit the adapter's shapes).
pub fn unprune_adapter(
    mut adapter: PeftAdapter,
    kept: &[Vec<usize>],
    width: usize,
    writers: impl Fn(usize) -> Vec<String>,
    reader: impl Fn(usize) -> String,
) -> emloc::Result<PeftAdapter> {
    for (l, neurons) in kept.iter().enumerate() {
        let neurons = KeptFeatures { indices: neurons, full: width };
        for path in writers(l) {
            if adapter.layers.contains_key(&path) {
                adapter.unprune_layer(&path, None, Some(neurons))?;
            }
        }
        let path = reader(l);
        if adapter.layers.contains_key(&path) {
            adapter.unprune_layer(&path, Some(neurons), None)?;
        }
    }
    Ok(adapter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_norms_are_kept_in_index_order() {
        let mut gram = Matrix::new(5, 5, vec![0.0; 25]);
        for (i, v) in [3.0, 9.0, 1.0, 9.0, 4.0].into_iter().enumerate() {
            gram.data[i * 5 + i] = v;
            // Off-diagonal entries do not count.
            gram.data[i * 5 + (i + 1) % 5] = 100.0;
        }
        assert_eq!(strongest_neurons(&gram, 3), [1, 3, 4]);
        assert_eq!(strongest_neurons(&gram, 1), [1]);
        assert_eq!(strongest_neurons(&gram, 5), [0, 1, 2, 3, 4]);
    }

    #[test]
    fn neuron_count_comes_closest_to_the_budget() {
        // MiniLM: 6 layers of 384 → 1536 → 384; 672,768 parameters left for the FFNs.
        assert_eq!(neurons_for_params(672_768, 6, 2 * 384, 1536), 146);
        assert_eq!(neurons_for_params(0, 6, 2 * 384, 1536), 1);
        assert_eq!(neurons_for_params(usize::MAX / 8, 6, 2 * 384, 1536), 1536);
        // 30 SwiGLU MLPs of 576 → 1536 (SmolLM2-135M), three weights per neuron: 308 · 51,840.
        assert_eq!(neurons_for_params(15_966_720, 30, 3 * 576, 1536), 308);
    }
}
