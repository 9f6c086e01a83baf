//! Fine-tuning a decoder within the memory it takes to run it: the completion loss's gradients
//! by block-level recomputation ([`crate::checkpointing`]) and an LM head run in chunks.
//!
//! Beside the decoder blocks' activations, plain autodiff keeps the `[positions, vocab]` logits
//! and their log-softmax until `backward` (for SmolLM2's 49 k vocabulary, 200 KB per scored
//! position). Here the final norm's output is a leaf, and the head + cross-entropy run on
//! [`HEAD_CHUNK_POSITIONS`] positions at a time, each chunk's graph built and consumed at once.

use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::activation::log_softmax;
use burn::tensor::{FloatDType, Tensor};

use super::task::CausalBatch;
use crate::checkpointing::{backward_recomputed, forward_keeping_inputs};
use crate::llama::{AttentionInputs, LlamaDecoderLayer, LlamaForCausalLM, PaddingMask};

/// Scored positions whose logits one chunk holds: `[256, vocab]` is 50 MB in f32 for SmolLM2's
/// 49 k vocabulary (and 155 MB for Qwen2's 152 k), against `[positions, vocab]` at once.
pub const HEAD_CHUNK_POSITIONS: usize = 256;

/// The value and gradients of `scale ×` [`completion_loss`](super::completion_loss) of `batch`
/// under `model` (in training mode, on an autodiff device), computed block by block as the
/// [module docs](self) describe, with the LM head run on `head_chunk` scored positions at a
/// time, and the blocks recomputed ([`crate::checkpointing`]). Returns the scaled loss's value and
/// the gradients of every parameter that requires one (e.g. the LoRA adapters), ready for an
/// optimizer step: those of plain autodiff within f32 rounding (without dropout; with it, the
/// masks are drawn per block, see [`crate::checkpointing::block_seed`]).
///
/// # Panics
/// If `head_chunk` is 0, or `model` is not on an autodiff device; as
/// [`LlamaForCausalLM::forward`] otherwise.
pub fn completion_gradients_checkpointed(
    model: &LlamaForCausalLM,
    batch: &CausalBatch,
    scale: f64,
    head_chunk: usize,
) -> (f64, GradientsParams) {
    assert!(head_chunk > 0, "completion_gradients_checkpointed: head_chunk is 0");
    let device = model.device();
    assert!(device.is_autodiff(), "completion_gradients_checkpointed: model is not on autodiff");
    let [rows, seq] = batch.inputs.dims();
    let layers = &model.model.layers;
    let step_seed = emloc::nn::device_seed(&device);
    let mask = PaddingMask::all_real(rows, seq);
    let attention = layers
        .first()
        .map(|first| AttentionInputs::uncached(&first.self_attn.rope, &mask, &device));
    let block = |layer: &LlamaDecoderLayer, hidden: Tensor<3>| {
        layer.forward_with(hidden, attention.as_ref().expect("a layer"), None)
    };

    // The blocks without a graph, keeping each one's input.
    let embedded = model.model.embed_tokens.clone().no_grad().forward(batch.inputs.clone());
    let (hidden, block_inputs) = forward_keeping_inputs(layers, embedded, step_seed, block);

    // The final norm and the head, in chunks.
    let mut accumulator = GradientsAccumulator::new();
    let last = hidden.require_grad();
    let normed = model.model.norm.forward(last.clone());
    let normed_leaf = normed.clone().detach().require_grad();
    let (loss, normed_grad) = chunked_head(model, &normed_leaf, batch, scale, head_chunk, |g| {
        accumulator.accumulate(model, g)
    });
    let mut grads = (normed * normed_grad).sum().backward();
    let upstream = last.grad_remove(&mut grads).expect("the last hidden state's gradient");
    accumulator.accumulate(model, GradientsParams::from_module(&mut grads, &model.model.norm));

    // The blocks again, last to first, each with its graph.
    let upstream = backward_recomputed(
        layers,
        block_inputs,
        upstream,
        step_seed,
        block,
        model,
        &mut accumulator,
    );
    // Trainable embeddings (never with LoRA alone) get theirs from the first block's.
    let embedding = &model.model.embed_tokens;
    if embedding.weight.val().is_require_grad() {
        let embedded = embedding.forward(batch.inputs.clone());
        let mut grads = (embedded * upstream).sum().backward();
        accumulator.accumulate(model, GradientsParams::from_module(&mut grads, embedding));
    }
    (loss, accumulator.grads())
}

/// `scale ×` the mean NLL of `batch`'s scored positions from the normalised last hidden state
/// `normed` (a leaf that requires a gradient), the LM head run on `chunk` positions at a time.
/// Each chunk's head gradients go to `on_grads`; returns the loss value and `normed`'s gradient
/// (without autodiff).
fn chunked_head(
    model: &LlamaForCausalLM,
    normed: &Tensor<3>,
    batch: &CausalBatch,
    scale: f64,
    chunk: usize,
    mut on_grads: impl FnMut(GradientsParams),
) -> (f64, Tensor<3>) {
    let [rows, seq, d] = normed.dims();
    let scored = batch.rows.len();
    let vocab = model.vocab_size();
    let (mut loss, mut gradient) = (0.0f64, None::<Tensor<3>>);
    for start in (0..scored).step_by(chunk) {
        let end = (start + chunk).min(scored);
        let n = end - start;
        let positions = batch.completion_positions.clone().narrow(0, start, n);
        let targets = batch.completion_targets.clone().narrow(0, start, n);
        // Each chunk's graph starts at the leaf: a backward consumes every step it crosses.
        let flat = normed.clone().reshape([rows * seq, d]);
        let hidden = flat.select(0, positions).reshape([1, n, d]);
        let logits = model.logits(hidden).reshape([n, vocab]);
        // In f32 whatever the frozen weights' dtype, as `token_nll`.
        let log_probs = log_softmax(logits.cast(FloatDType::F32), 1);
        let nll = log_probs.gather(1, targets.reshape([n, 1])).neg().sum();
        let chunk_loss = nll.mul_scalar(scale / scored as f64);
        loss += f64::from(chunk_loss.clone().into_scalar::<f32>());
        let mut grads = chunk_loss.backward();
        let g = normed.grad_remove(&mut grads).expect("the normed state's gradient");
        gradient = Some(match gradient {
            Some(sum) => sum + g,
            None => g,
        });
        on_grads(GradientsParams::from_grads(grads, model));
    }
    let gradient = gradient.unwrap_or_else(|| normed.clone().detach().inner().zeros_like());
    (loss, gradient)
}
