use super::{Dropout, DropoutConfig};
use crate::ops::linear;
use burn::config::Config;
use burn::module::{Module, Param};
use burn::tensor::{Device, Distribution, Tensor};

use crate::error::{EmlocError, Result};
use crate::peft::{full_match_regex, module_name_matches};

/// How to build LoRA adapters, with HF PEFT's defaults and target semantics.
#[derive(Config, Debug, PartialEq)]
pub struct LoraConfig {
    /// Rank `r` of the adapter.
    pub rank: usize,
    /// Scaling numerator `α`; the update is `s · B A` with `s = α / r` (or `α / √r` for rsLoRA).
    #[config(default = 8.0)]
    pub alpha: f64,
    /// Dropout probability on the adapter's input (training only).
    #[config(default = 0.0)]
    pub dropout: f64,
    /// Use rank-stabilised scaling `α / √r`.
    #[config(default = false)]
    pub use_rslora: bool,
    /// Which layers get an adapter, PEFT style: an entry matches a module path when it equals
    /// the path or is its last dot-separated components (`"query"` matches `layers.0.attn.query`).
    /// Empty means every `emloc::nn::Linear`.
    #[config(default = "Vec::new()")]
    pub target_modules: Vec<String>,
    /// Alternatively, a regex that must match the whole module path (takes precedence).
    #[config(default = "None")]
    pub target_regex: Option<String>,
}

impl LoraConfig {
    /// Checks rank, alpha, dropout and the target regex.
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(EmlocError::InvalidConfig("LoRA rank must be at least 1".into()));
        }
        if !self.alpha.is_finite() || self.alpha <= 0.0 {
            return Err(EmlocError::InvalidConfig(format!(
                "LoRA alpha must be finite and positive, got {}",
                self.alpha
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(EmlocError::InvalidConfig(format!(
                "LoRA dropout must be in [0, 1), got {}",
                self.dropout
            )));
        }
        self.compiled_regex()?;
        Ok(())
    }

    fn compiled_regex(&self) -> Result<Option<regex::Regex>> {
        self.target_regex
            .as_ref()
            .map(|pattern| full_match_regex(pattern, "LoRA target regex"))
            .transpose()
    }

    /// Whether the layer at `path` is a LoRA target.
    pub fn targets(&self, path: &str) -> Result<bool> {
        if let Some(re) = self.compiled_regex()? {
            return Ok(re.is_match(path));
        }
        Ok(self.target_modules.is_empty()
            || self.target_modules.iter().any(|t| module_name_matches(path, t)))
    }

    /// The scale `s` applied to `B A`.
    pub fn scale(&self) -> f64 {
        lora_scale(self.alpha, self.rank, self.use_rslora)
    }

    /// A fresh adapter for a `[d_in, d_out]` layer with PEFT's default init: `A` Kaiming-uniform
    /// (bound `1/√d_in`, PyTorch's `kaiming_uniform_(a=√5)`), `B = 0`, so the layer's output is
    /// unchanged at attachment.
    pub fn init(&self, d_input: usize, d_output: usize, device: &Device) -> LoraAdapter {
        let bound = 1.0 / (d_input as f64).sqrt();
        let a = Tensor::random([d_input, self.rank], Distribution::Uniform(-bound, bound), device);
        let b = Tensor::zeros([self.rank, d_output], device);
        LoraAdapter::new(a, b, self.alpha, self.use_rslora, self.dropout)
    }
}

/// Checks that a rank-`rank` adapter fits the layer at `path`: `rank ≤ min(d_in, d_out)`. A larger
/// rank adds no expressive power, and the correction's thin SVD of `Aᵀ` has only `min(d_in, r)`
/// singular values, so it is refused wherever an adapter meets a layer (attach, load, correct).
pub(crate) fn check_lora_rank(path: &str, rank: usize, d_in: usize, d_out: usize) -> Result<()> {
    if rank > d_in.min(d_out) {
        return Err(EmlocError::InvalidConfig(format!(
            "LoRA rank {rank} at layer `{path}` exceeds min(d_in = {d_in}, d_out = {d_out}) = {}; use a rank of at most that",
            d_in.min(d_out)
        )));
    }
    Ok(())
}

/// The LoRA scale `s`: `α / r`, or `α / √r` with rsLoRA.
pub fn lora_scale(alpha: f64, rank: usize, use_rslora: bool) -> f64 {
    if use_rslora { alpha / (rank as f64).sqrt() } else { alpha / rank as f64 }
}

/// A trainable LoRA adapter `Λ = s · B A` beside a (frozen) linear layer.
///
/// Stored in Burn's orientation: `a` is `Aᵀ` with shape `[d_in, r]`, `b` is `Bᵀ` with shape
/// `[r, d_out]`, so the update is `y += s · (dropout(x) @ a) @ b`. The dense `B A` is never built
/// by [`forward`](Self::forward).
#[derive(Module, Debug)]
pub struct LoraAdapter {
    /// `Aᵀ`, shape `[d_in, r]` (trainable).
    pub a: Param<Tensor<2>>,
    /// `Bᵀ`, shape `[r, d_out]` (trainable).
    pub b: Param<Tensor<2>>,
    /// Scaling numerator `α`.
    pub alpha: f64,
    /// Whether the scale is `α / √r` instead of `α / r`.
    pub use_rslora: bool,
    /// Dropout on the adapter input.
    pub dropout: Dropout,
}

impl LoraAdapter {
    /// Builds an adapter from `a` (`[d_in, r]`) and `b` (`[r, d_out]`); both are trainable.
    ///
    /// # Panics
    /// If the ranks of `a` and `b` disagree, or `dropout` is outside `[0, 1)`.
    pub fn new(a: Tensor<2>, b: Tensor<2>, alpha: f64, use_rslora: bool, dropout: f64) -> Self {
        assert_eq!(a.dims()[1], b.dims()[0], "LoraAdapter: ranks of a and b disagree");
        Self {
            a: Param::from_tensor(a),
            b: Param::from_tensor(b),
            alpha,
            use_rslora,
            dropout: DropoutConfig::new(dropout).init(),
        }
    }

    /// The rank `r`.
    pub fn rank(&self) -> usize {
        self.a.shape().dims::<2>()[1]
    }

    /// The scale `s` (`α / r`, or `α / √r` with rsLoRA).
    pub fn scale(&self) -> f64 {
        lora_scale(self.alpha, self.rank(), self.use_rslora)
    }

    /// The adapter's contribution `s · (dropout(x) @ a) @ b`.
    ///
    /// # Shapes
    /// - input: `[..., d_in]`
    /// - output: `[..., d_out]`
    pub fn forward<const D: usize>(&self, input: Tensor<D>) -> Tensor<D> {
        let h = linear(self.dropout.forward(input), self.a.val(), None);
        linear(h, self.b.val(), None).mul_scalar(self.scale())
    }

    /// The dense update `s · a @ b`, shape `[d_in, d_out]` (for merging and tests only).
    pub fn delta(&self) -> Tensor<2> {
        self.a.val().matmul(self.b.val()).mul_scalar(self.scale())
    }
}
