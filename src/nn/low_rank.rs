use burn::module::{Module, Param};
use burn::tensor::Tensor;

/// Frozen emulator factors of one linear layer: `W^E = W_u W_v` in PyTorch layout, stored in
/// Burn's `[d_in, d_out]` orientation so that `y = (x @ w_v) @ w_u`.
///
/// `w_v` is `W_vᵀ` with shape `[d_in, k]` and `w_u` is `W_uᵀ` with shape `[k, d_out]`, where
/// `W_v = Σ_k^{1/2} V_kᵀ S⁻¹` and `W_u = U_k Σ_k^{1/2}` come from the whitened truncated SVD.
#[derive(Module, Debug)]
pub struct LowRankFactors {
    /// Input-side factor `W_vᵀ`, shape `[d_in, k]`.
    pub w_v: Param<Tensor<2>>,
    /// Output-side factor `W_uᵀ`, shape `[k, d_out]`.
    pub w_u: Param<Tensor<2>>,
}

impl LowRankFactors {
    /// Wraps two factors as frozen parameters.
    ///
    /// # Panics
    /// If the inner dimensions disagree.
    pub fn new(w_v: Tensor<2>, w_u: Tensor<2>) -> Self {
        assert_eq!(w_v.dims()[1], w_u.dims()[0], "LowRankFactors: inner ranks disagree");
        Self {
            w_v: Param::from_tensor(w_v).set_require_grad(false),
            w_u: Param::from_tensor(w_u).set_require_grad(false),
        }
    }

    /// The kept rank `k`.
    pub fn rank(&self) -> usize {
        self.w_v.shape().dims::<2>()[1]
    }

    /// Input features `d_in`.
    pub fn d_input(&self) -> usize {
        self.w_v.shape().dims::<2>()[0]
    }

    /// Output features `d_out`.
    pub fn d_output(&self) -> usize {
        self.w_u.shape().dims::<2>()[1]
    }

    /// The dense emulator weight `W^Eᵀ = w_v @ w_u`, shape `[d_in, d_out]`.
    ///
    /// Only for merging, correction and tests; the forward pass never builds it.
    pub fn dense(&self) -> Tensor<2> {
        self.w_v.val().matmul(self.w_u.val())
    }
}
