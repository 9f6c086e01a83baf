//! Offsite-Tuning's layer-drop emulator (Xiao et al., 2023), the baseline EMLoC compares with:
//! keep a stack's first and last blocks and a uniform selection in between, drop the rest.
//! LoRA trained on the kept blocks moves back onto the full model's matching blocks with
//! [`emloc::peft::PeftAdapter::renumber_blocks`]; the dropped blocks get no adapter.
//!
//! Offsite-Tuning proper trains only the kept *ends* (its adapter) and distils the middle;
//! here LoRA trains every kept block, the same trainable set EMLoC's emulator gets, so the two
//! emulators compare at equal size and equal adapter placement.

use crate::error::{ModelError, Result};

/// The indices of `keep` blocks out of `total`: the first and the last, the others spread
/// evenly between (rounded), strictly increasing.
///
/// # Errors
/// [`ModelError::InvalidInput`] unless `2 ≤ keep ≤ total` (one block only when `total` is 1).
pub fn evenly_kept_blocks(total: usize, keep: usize) -> Result<Vec<usize>> {
    if total == 1 && keep == 1 {
        return Ok(vec![0]);
    }
    if keep < 2 || keep > total {
        return Err(ModelError::InvalidInput(format!(
            "layer drop keeps the first and last of {total} blocks: keep {keep} must be in 2..={total}"
        )));
    }
    // j (total − 1) / (keep − 1), rounded: consecutive values differ by ≥ 1 since keep ≤ total.
    Ok((0..keep).map(|j| (2 * j * (total - 1) + (keep - 1)) / (2 * (keep - 1))).collect())
}

/// `blocks[kept[0]]`, `blocks[kept[1]]`, ...: the blocks a layer-dropped model keeps.
///
/// # Errors
/// [`ModelError::InvalidInput`] unless `kept` is non-empty, strictly increasing and below
/// `blocks.len()`.
pub fn take_blocks<T>(blocks: Vec<T>, kept: &[usize]) -> Result<Vec<T>> {
    let total = blocks.len();
    if kept.is_empty()
        || kept.windows(2).any(|w| w[0] >= w[1])
        || kept.last().is_some_and(|&last| last >= total)
    {
        return Err(ModelError::InvalidInput(format!(
            "layers to keep {kept:?}: must be non-empty, strictly increasing and below {total}"
        )));
    }
    let mut slots: Vec<Option<T>> = blocks.into_iter().map(Some).collect();
    Ok(kept.iter().map(|&i| slots[i].take().expect("strictly increasing")).collect())
}

/// How many blocks of `block_params` parameters each a layer-dropped model keeps to come
/// closest to `params` parameters in its blocks (at least the first and the last).
pub fn blocks_for_params(params: usize, block_params: usize, total: usize) -> usize {
    let nearest = (params as f64 / block_params.max(1) as f64).round() as usize;
    nearest.clamp(2.min(total), total)
}

/// The blocks a layer-dropped model of `total` equal blocks keeps to come closest in size to
/// `emulator` (whose factored layers all sit in those blocks): [`blocks_for_params`] over the
/// emulator's kept parameters, spread by [`evenly_kept_blocks`].
///
/// # Errors
/// As [`evenly_kept_blocks`].
pub fn blocks_at_emulator_size(
    emulator: &emloc::EmulatorReport,
    total: usize,
) -> Result<Vec<usize>> {
    let block_params = emulator.params_original() / total.max(1);
    evenly_kept_blocks(total, blocks_for_params(emulator.params_kept(), block_params, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ends_are_kept_and_the_middle_spread_evenly() {
        assert_eq!(evenly_kept_blocks(6, 2).unwrap(), [0, 5]);
        assert_eq!(evenly_kept_blocks(6, 3).unwrap(), [0, 3, 5]);
        assert_eq!(evenly_kept_blocks(6, 6).unwrap(), [0, 1, 2, 3, 4, 5]);
        assert_eq!(evenly_kept_blocks(30, 4).unwrap(), [0, 10, 19, 29]);
        assert_eq!(evenly_kept_blocks(1, 1).unwrap(), [0]);
        for total in 2..40 {
            for keep in 2..=total {
                let kept = evenly_kept_blocks(total, keep).unwrap();
                assert_eq!((kept.len(), kept[0], kept[keep - 1]), (keep, 0, total - 1));
                assert!(kept.windows(2).all(|w| w[0] < w[1]), "{total} {keep}: {kept:?}");
            }
        }
        for (total, keep) in [(6, 1), (6, 7), (6, 0)] {
            assert!(evenly_kept_blocks(total, keep).is_err());
        }
    }

    #[test]
    fn block_count_comes_closest_to_the_budget() {
        assert_eq!(blocks_for_params(4_211_712, 1_769_472, 6), 2);
        assert_eq!(blocks_for_params(5_400_000, 1_769_472, 6), 3);
        assert_eq!(blocks_for_params(0, 10, 6), 2);
        assert_eq!(blocks_for_params(1000, 10, 6), 6);
    }
}
