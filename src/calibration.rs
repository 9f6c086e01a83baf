//! Calibration statistics: each selected layer's input Gram matrix `XᵀX` and token count,
//! accumulated on the layer's device in `f32` while the original model runs on calibration data.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use burn::module::ParamId;
use burn::tensor::{FloatDType, Tensor};

/// Open calibration sessions in the process; `record` returns at once when zero, so a model that
/// is not being calibrated pays one atomic load per linear forward.
static OPEN_SESSIONS: AtomicUsize = AtomicUsize::new(0);

/// Accumulators keyed by the id of the layer's weight parameter (unique per layer).
static ACCUMULATORS: Mutex<Option<HashMap<ParamId, GramAccumulator>>> = Mutex::new(None);

fn accumulators() -> MutexGuard<'static, Option<HashMap<ParamId, GramAccumulator>>> {
    // A panic inside another session's forward must not poison every later calibration.
    ACCUMULATORS.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The running sum `Σ x xᵀ` over every token a layer has seen.
#[derive(Debug, Default)]
pub(crate) struct GramAccumulator {
    /// `[d_in, d_in]` in f32, on the layer's device; `None` until the first token.
    pub gram: Option<Tensor<2>>,
    /// Number of tokens (rows of X) accumulated.
    pub tokens: u64,
}

/// Whether a calibration session accumulates the Gram of the layer whose weight is `id`, so that
/// a layer whose statistics input costs work to build (a convolution's unfolded patches) builds
/// it only then. One atomic load when no session is open.
pub(crate) fn is_recording(id: &ParamId) -> bool {
    OPEN_SESSIONS.load(Ordering::Acquire) != 0
        && accumulators().as_ref().is_some_and(|map| map.contains_key(id))
}

/// Called by `Linear::forward` with its input `[..., d_in]` (and by `Conv2d::forward` with its
/// unfolded patches).
pub(crate) fn record<const D: usize>(id: &ParamId, input: &Tensor<D>) {
    if OPEN_SESSIONS.load(Ordering::Acquire) == 0 {
        return;
    }
    let mut guard = accumulators();
    let Some(acc) = guard.as_mut().and_then(|map| map.get_mut(id)) else {
        return;
    };
    let d_in = input.dims()[D - 1];
    // Statistics only: no autodiff graph, and f32 even when the model runs in f16/bf16.
    let x: Tensor<2> =
        input.clone().without_autodiff().cast(FloatDType::F32).reshape([-1, d_in as i64]);
    let tokens = x.dims()[0] as u64;
    // emloc's Gram op: one kernel per call on CubeCL devices, updating the sum in place.
    acc.gram = Some(crate::ops::gram_accumulate(acc.gram.take(), x));
    acc.tokens += tokens;
}

/// Registers layers for Gram accumulation until [`finish`](Self::finish) or drop.
pub(crate) struct CalibrationSession {
    ids: Vec<ParamId>,
    open: bool,
}

impl CalibrationSession {
    pub(crate) fn start(ids: Vec<ParamId>) -> Self {
        {
            let mut guard = accumulators();
            let map = guard.get_or_insert_with(HashMap::new);
            for id in &ids {
                map.insert(*id, GramAccumulator::default());
            }
        }
        OPEN_SESSIONS.fetch_add(1, Ordering::AcqRel);
        Self { ids, open: true }
    }

    /// Stops recording and returns each layer's accumulator, in registration order.
    pub(crate) fn finish(mut self) -> Vec<GramAccumulator> {
        self.take_all()
    }

    fn take_all(&mut self) -> Vec<GramAccumulator> {
        if !std::mem::replace(&mut self.open, false) {
            return Vec::new();
        }
        let ids = std::mem::take(&mut self.ids);
        OPEN_SESSIONS.fetch_sub(1, Ordering::AcqRel);
        let mut guard = accumulators();
        let map = guard.get_or_insert_with(HashMap::new);
        ids.iter().map(|id| map.remove(id).unwrap_or_default()).collect()
    }
}

impl Drop for CalibrationSession {
    fn drop(&mut self) {
        self.take_all();
    }
}
