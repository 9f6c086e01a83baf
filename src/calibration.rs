//! Calibration statistics: each selected layer's input Gram matrix `XᵀX` and token count,
//! accumulated on the layer's device in `f32` while the original model runs on calibration data.
//!
//! A [`CalibrationSession`] owns its accumulators. It is registered on the thread that opened
//! it (the thread that runs the calibration forward passes), where `Linear::forward` finds it:
//! two calibrations on two threads, even of clones of one model (the same parameter ids), never
//! see each other's inputs. Forward passes that fan out to other threads are not recorded.

use std::cell::RefCell;
use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};

use burn::module::ParamId;
use burn::tensor::{FloatDType, Tensor};

/// The running sum `Σ x xᵀ` over every token a layer has seen.
#[derive(Debug, Default)]
pub(crate) struct GramAccumulator {
    /// `[d_in, d_in]` in f32, on the layer's device; `None` until the first token.
    pub gram: Option<Tensor<2>>,
    /// Number of tokens (rows of X) accumulated.
    pub tokens: u64,
    /// In a capturing session ([`CalibrationSession::capture`]): every input seen, as
    /// `[tokens, d_in]` f32 in call order, instead of the Gram.
    pub captured: Option<Vec<Tensor<2>>>,
}

/// One open session's accumulators, keyed by the id of the layer's weight parameter.
struct OpenSession {
    token: u64,
    accumulators: HashMap<ParamId, GramAccumulator>,
}

thread_local! {
    /// The sessions open on this thread, innermost last. Empty (one length check per linear
    /// forward) when nothing is being calibrated.
    static SESSIONS: RefCell<Vec<OpenSession>> = const { RefCell::new(Vec::new()) };
}

/// Whether a calibration session on this thread accumulates the Gram of the layer whose weight
/// is `id`, so that a layer whose statistics input costs work to build (a convolution's
/// unfolded patches) builds it only then.
pub(crate) fn is_recording(id: &ParamId) -> bool {
    SESSIONS.with_borrow(|open| open.iter().any(|s| s.accumulators.contains_key(id)))
}

/// Called by `Linear::forward` with its input `[..., d_in]` (and by `Conv2d::forward` with its
/// unfolded patches): adds its Gram to the innermost session on this thread that records `id`.
pub(crate) fn record<const D: usize>(id: &ParamId, input: &Tensor<D>) {
    SESSIONS.with_borrow_mut(|open| {
        let Some(acc) = open.iter_mut().rev().find_map(|s| s.accumulators.get_mut(id)) else {
            return;
        };
        let d_in = input.dims()[D - 1];
        // Statistics only: no autodiff graph, and f32 even when the model runs in f16/bf16.
        let x: Tensor<2> =
            input.clone().without_autodiff().cast(FloatDType::F32).reshape([-1, d_in as i64]);
        let tokens = x.dims()[0] as u64;
        acc.tokens += tokens;
        if let Some(captured) = &mut acc.captured {
            captured.push(x);
            return;
        }
        // emloc's Gram op: one kernel per call on CubeCL devices, updating the sum in place.
        acc.gram = Some(crate::ops::gram_accumulate(acc.gram.take(), x));
    });
}

/// Records the Grams of the registered layers' inputs on this thread until
/// [`finish`](Self::finish) or drop. Bound to the thread that started it (not `Send`).
pub(crate) struct CalibrationSession {
    ids: Vec<ParamId>,
    token: Option<u64>,
    _thread_bound: PhantomData<*const ()>,
}

impl CalibrationSession {
    pub(crate) fn start(ids: Vec<ParamId>) -> Self {
        Self::open(ids, false)
    }

    /// A session that keeps every input of the registered layers (in
    /// [`GramAccumulator::captured`]) instead of accumulating Grams.
    pub(crate) fn capture(ids: Vec<ParamId>) -> Self {
        Self::open(ids, true)
    }

    fn open(ids: Vec<ParamId>, capture: bool) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let token = NEXT.fetch_add(1, Ordering::Relaxed);
        let accumulators = ids
            .iter()
            .map(|id| {
                (*id, GramAccumulator { captured: capture.then(Vec::new), ..Default::default() })
            })
            .collect();
        SESSIONS.with_borrow_mut(|open| open.push(OpenSession { token, accumulators }));
        Self { ids, token: Some(token), _thread_bound: PhantomData }
    }

    /// Stops recording and returns each layer's accumulator, in registration order.
    pub(crate) fn finish(mut self) -> Vec<GramAccumulator> {
        self.close()
    }

    fn close(&mut self) -> Vec<GramAccumulator> {
        let Some(token) = self.token.take() else { return Vec::new() };
        let session = SESSIONS.with_borrow_mut(|open| {
            let at = open.iter().position(|s| s.token == token)?;
            Some(open.remove(at))
        });
        let mut accumulators = session.map(|s| s.accumulators).unwrap_or_default();
        self.ids.iter().map(|id| accumulators.remove(id).unwrap_or_default()).collect()
    }
}

impl Drop for CalibrationSession {
    fn drop(&mut self) {
        self.close();
    }
}
