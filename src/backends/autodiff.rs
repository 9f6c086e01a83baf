//! Autodiff implementation: the fused layer's custom backward.
//!
//! The forward runs the inner backend's fused op and keeps only what the gradients read: the
//! LoRA input `x_l` (`x_lora`, or `x` itself without dropout), the LoRA bottleneck
//! `h_l = x_l A` (`[n, r]`) and the weight handles (which the parameters hold anyway). The
//! low-rank bottleneck `x W_v` (`[n, k]`, with `k` in the hundreds or thousands) is not kept,
//! nor `x` beside a separate `x_lora`. The backward runs the inner backend's fused backward for
//! `x`, `x_lora`, `A` and `B`. Gradients for the factors or the bias are computed with plain
//! ops, and only when those inputs are tracked (never in EMLoC, where they are frozen); only
//! then is `x` kept, and `x W_v` recomputed.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, AutodiffBackend, Backend, TensorMetadata};

use crate::ops::{EmlocOps, MaybeTensor};

/// Parent order of the fused op's node.
const X: usize = 0;
const X_LORA: usize = 1;
const W_V: usize = 2;
const W_U: usize = 3;
const A: usize = 4;
const B_: usize = 5;
const BIAS: usize = 6;

#[derive(Debug)]
struct LowRankLoraBackward;

/// What the backward pass keeps between forward and backward.
#[derive(Clone, Debug)]
struct State<B: Backend> {
    /// The LoRA input: `x_lora`, or `x` when there is no separate one.
    x_l: FloatTensor<B>,
    /// `x`, only when a factor is trainable and `x_lora` is separate (else `x_l` is `x`).
    x: Option<FloatTensor<B>>,
    /// `x_l A`, `[n, r]`, in a buffer of its own.
    h_l: FloatTensor<B>,
    w_v: FloatTensor<B>,
    w_u: FloatTensor<B>,
    a: FloatTensor<B>,
    b: FloatTensor<B>,
    scale: f64,
    separate_lora_input: bool,
}

impl<B: Backend + EmlocOps> Backward<B, 7> for LowRankLoraBackward {
    type State = State<B>;

    fn backward(self, ops: Ops<Self::State, 7>, grads: &mut Gradients, _: &mut Checkpointer) {
        let State { x_l, x, h_l, w_v, w_u, a, b, scale, separate_lora_input } = ops.state;
        let dy = grads.consume::<B>(&ops.node);
        let tracked = |i: usize| ops.parents[i].is_some();
        let need_x = tracked(X) || tracked(X_LORA);

        // Rare paths first (trainable factors or bias), while dy is still at hand.
        if let Some(node) = &ops.parents[BIAS] {
            let d_out = dy.shape()[1];
            let db = B::float_sum_dim(dy.clone(), 0);
            grads.register::<B>(node.id, B::float_reshape(db, [d_out].into()));
        }
        if tracked(W_U) || tracked(W_V) {
            let x = x.unwrap_or_else(|| x_l.clone());
            if let Some(node) = &ops.parents[W_U] {
                let h_v = B::matmul(x.clone(), w_v.clone());
                grads.register::<B>(node.id, B::matmul(B::float_transpose(h_v), dy.clone()));
            }
            if let Some(node) = &ops.parents[W_V] {
                let dh_v = B::matmul(dy.clone(), B::float_transpose(w_u.clone()));
                grads.register::<B>(node.id, B::matmul(B::float_transpose(x), dh_v));
            }
        }

        let (dx, dx_lora, da, db) = B::lowrank_lora_backward(
            x_l,
            h_l,
            w_v,
            w_u,
            a,
            b,
            dy,
            scale,
            need_x,
            separate_lora_input,
        );
        if let (Some(node), Some(dx)) = (&ops.parents[X], dx) {
            grads.register::<B>(node.id, dx);
        }
        if let (Some(node), Some(dx_lora)) = (&ops.parents[X_LORA], dx_lora) {
            grads.register::<B>(node.id, dx_lora);
        }
        if let Some(node) = &ops.parents[A] {
            grads.register::<B>(node.id, da);
        }
        if let Some(node) = &ops.parents[B_] {
            grads.register::<B>(node.id, db);
        }
    }
}

#[derive(Debug)]
struct MatmulBackward;

impl<B: Backend + EmlocOps> Backward<B, 2> for MatmulBackward {
    /// `lhs` when `rhs` needs a gradient, `rhs` when `lhs` does.
    type State = (Option<FloatTensor<B>>, Option<FloatTensor<B>>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (lhs, rhs) = ops.state;
        let dy = grads.consume::<B>(&ops.node);
        if let (Some(node), Some(rhs)) = (&ops.parents[0], rhs) {
            grads.register::<B>(node.id, B::matmul(dy.clone(), B::float_transpose(rhs)));
        }
        if let (Some(node), Some(lhs)) = (&ops.parents[1], lhs) {
            grads.register::<B>(node.id, B::matmul(B::float_transpose(lhs), dy));
        }
    }
}

#[derive(Debug)]
struct GeluBackward;

impl<B: Backend + EmlocOps> Backward<B, 1> for GeluBackward {
    /// The input.
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<B>(&ops.node);
        if let Some(node) = &ops.parents[0] {
            grads.register::<B>(node.id, B::erf_gelu_backward(ops.state, dy));
        }
    }
}

impl<B: Backend + EmlocOps, C: CheckpointStrategy> EmlocOps for Autodiff<B, C> {
    fn erf_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let guards = [x.node()];
        let x = x.into_primitive();
        match GeluBackward.prepare::<C>(guards).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let y = B::erf_gelu(x.clone());
                prep.finish(x, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::erf_gelu(x)),
        }
    }

    fn erf_gelu_backward(x: FloatTensor<Self>, dy: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::from_inner(B::erf_gelu_backward(x.into_primitive(), dy.into_primitive()))
    }

    fn matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        let guards = [lhs.node(), rhs.node()];
        // Each operand is kept only for the other's gradient: with a frozen weight, x is not.
        let (keep_lhs, keep_rhs) = (rhs.is_tracked(), lhs.is_tracked());
        let (lhs, rhs) = (lhs.into_primitive(), rhs.into_primitive());
        match MatmulBackward.prepare::<C>(guards).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let y = B::matmul(lhs.clone(), rhs.clone());
                prep.finish((keep_lhs.then_some(lhs), keep_rhs.then_some(rhs)), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::matmul(lhs, rhs)),
        }
    }

    // Gram matrices are statistics, never differentiated.
    fn gram(x: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::from_inner(B::gram(x.into_primitive()))
    }

    fn gram_accumulate(acc: FloatTensor<Self>, x: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::from_inner(B::gram_accumulate(acc.into_primitive(), x.into_primitive()))
    }

    // Factorizations and solves serve the (frozen) emulator's construction: not differentiable.
    fn cholesky(
        g: FloatTensor<Self>,
        relative_damping: f64,
        pivot_tolerance: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (l, status) = B::cholesky(g.into_primitive(), relative_damping, pivot_tolerance);
        (Self::from_inner(l), Self::from_inner(status))
    }

    fn solve_lower_right(
        x: FloatTensor<Self>,
        l: FloatTensor<Self>,
        transpose: bool,
    ) -> FloatTensor<Self> {
        Self::from_inner(B::solve_lower_right(x.into_primitive(), l.into_primitive(), transpose))
    }

    fn lowrank_lora(
        x: FloatTensor<Self>,
        x_lora: MaybeTensor<Self>,
        w_v: FloatTensor<Self>,
        w_u: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        bias: MaybeTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        let (x_lora, bias) = (x_lora.into_option(), bias.into_option());
        // Absent optional inputs take an untracked stand-in's place among the parents.
        let stand_in = || Self::from_inner(w_v.primitive().clone()).node();
        let guards = [
            x.node(),
            x_lora.as_ref().map(|t| t.node()).unwrap_or_else(stand_in),
            w_v.node(),
            w_u.node(),
            a.node(),
            b.node(),
            bias.as_ref().map(|t| t.node()).unwrap_or_else(stand_in),
        ];
        // x is read again only for the gradients of trainable factors.
        let keep_x = x_lora.is_some() && (w_v.is_tracked() || w_u.is_tracked());
        let x = x.into_primitive();
        let x_lora = x_lora.map(|t| t.into_primitive());
        let (w_v, w_u) = (w_v.into_primitive(), w_u.into_primitive());
        let (a, b) = (a.into_primitive(), b.into_primitive());
        let bias = bias.map(|t| t.into_primitive());

        match LowRankLoraBackward.prepare::<C>(guards).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let separate_lora_input = x_lora.is_some();
                let (y, h_l) = B::lowrank_lora_forward(
                    x.clone(),
                    MaybeTensor::from_option(x_lora.clone()),
                    w_v.clone(),
                    w_u.clone(),
                    a.clone(),
                    b.clone(),
                    MaybeTensor::from_option(bias),
                    scale,
                );
                let (x_l, x) = match x_lora {
                    Some(x_lora) => (x_lora, keep_x.then_some(x)),
                    None => (x, None),
                };
                let state = State { x_l, x, h_l, w_v, w_u, a, b, scale, separate_lora_input };
                prep.finish(state, y)
            }
            OpsKind::UnTracked(prep) => {
                let (x_lora, bias) =
                    (MaybeTensor::from_option(x_lora), MaybeTensor::from_option(bias));
                prep.finish(B::lowrank_lora(x, x_lora, w_v, w_u, a, b, bias, scale))
            }
        }
    }

    fn lowrank_lora_forward(
        x: FloatTensor<Self>,
        x_lora: MaybeTensor<Self>,
        w_v: FloatTensor<Self>,
        w_u: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        bias: MaybeTensor<Self>,
        scale: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (y, h) = B::lowrank_lora_forward(
            x.into_primitive(),
            inner(x_lora),
            w_v.into_primitive(),
            w_u.into_primitive(),
            a.into_primitive(),
            b.into_primitive(),
            inner(bias),
            scale,
        );
        (Self::from_inner(y), Self::from_inner(h))
    }

    fn lowrank_lora_backward(
        x_l: FloatTensor<Self>,
        h_l: FloatTensor<Self>,
        w_v: FloatTensor<Self>,
        w_u: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        scale: f64,
        need_x: bool,
        separate_lora_input: bool,
    ) -> (Option<FloatTensor<Self>>, Option<FloatTensor<Self>>, FloatTensor<Self>, FloatTensor<Self>)
    {
        let (dx, dx_lora, da, db) = B::lowrank_lora_backward(
            x_l.into_primitive(),
            h_l.into_primitive(),
            w_v.into_primitive(),
            w_u.into_primitive(),
            a.into_primitive(),
            b.into_primitive(),
            dy.into_primitive(),
            scale,
            need_x,
            separate_lora_input,
        );
        (
            dx.map(Self::from_inner),
            dx_lora.map(Self::from_inner),
            Self::from_inner(da),
            Self::from_inner(db),
        )
    }
}

/// The inner backend's view of an optional autodiff tensor (untracked use).
fn inner<B: Backend, C: CheckpointStrategy>(t: MaybeTensor<Autodiff<B, C>>) -> MaybeTensor<B> {
    MaybeTensor::from_option(t.into_option().map(|t| t.into_primitive()))
}
