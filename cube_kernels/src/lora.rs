//! Fused low-rank + LoRA layer: `h = [x W_v | x_l A]`, `y = h [W_u ; s·B] + b`.
//!
//! Shapes (Burn orientation): `x`, `x_l` `[n, d_in]`, `W_v` `[d_in, k]`, `A` `[d_in, r]`,
//! `W_u` `[k, d_out]`, `B` `[r, d_out]`, `b` `[d_out]`, `h_v` `[n, k]`, `h_l` `[n, r]`,
//! `y` `[n, d_out]`. `x_l` is the LoRA branch's input (`dropout(x)`), `x` itself when there is
//! no dropout. The concatenated operands are never built: the kernels read `[h_v | h_l]`,
//! `[W_u ; s·B]` and their transposes in place, so `h_l` (all the backward keeps) lives in a
//! buffer of its own and `h_v` is freed as soon as `y` is computed.

use cubecl::client::Client;
use cubecl::std::tensor::TensorHandle;

use crate::gemm::{MatRef, Operand, empty_matrix, gemm};

/// Inputs of the fused layer. Every tensor is 2-D except `bias`, all of one float dtype.
#[derive(Clone, Debug)]
pub struct LowRankLora {
    /// `W_v`, `[d_in, k]` (frozen).
    pub w_v: TensorHandle,
    /// `W_u`, `[k, d_out]` (frozen).
    pub w_u: TensorHandle,
    /// `A`, `[d_in, r]`.
    pub a: TensorHandle,
    /// `B`, `[r, d_out]`.
    pub b: TensorHandle,
    /// The LoRA scale `s`.
    pub scale: f32,
}

/// Gradients of the fused layer with respect to its inputs and adapter.
#[derive(Clone, Debug)]
pub struct LowRankLoraGrads {
    /// `∂L/∂x`, `[n, d_in]`; with a separate `x_l`, only the low-rank branch's part.
    pub x: Option<TensorHandle>,
    /// `∂L/∂x_l` when the LoRA input was given separately.
    pub x_lora: Option<TensorHandle>,
    /// `∂L/∂A`, `[d_in, r]`.
    pub a: TensorHandle,
    /// `∂L/∂B`, `[r, d_out]`.
    pub b: TensorHandle,
}

impl LowRankLora {
    fn dims(&self) -> (usize, usize, usize, usize) {
        let (d_in, k) = (self.w_v.shape()[0], self.w_v.shape()[1]);
        let d_out = self.w_u.shape()[1];
        let r = self.a.shape()[1];
        assert_eq!(self.w_u.shape()[0], k, "LowRankLora: W_v and W_u ranks differ");
        assert_eq!(self.a.shape()[0], d_in, "LowRankLora: A has the wrong d_in");
        assert_eq!(self.b.shape()[0], r, "LowRankLora: A and B ranks differ");
        assert_eq!(self.b.shape()[1], d_out, "LowRankLora: B has the wrong d_out");
        (d_in, k, r, d_out)
    }

    /// `(y, h_l)`: the layer output and the `[n, r]` LoRA bottleneck `x_l A` the backward pass
    /// needs. Three launches: `h_v = x W_v`, `h_l = x_l A`, then one GEMM of depth `k + r` over
    /// the joined `[h_v | h_l]` with the bias in its epilogue.
    pub fn forward(
        &self,
        client: &Client,
        x: TensorHandle,
        x_lora: Option<TensorHandle>,
        bias: Option<&TensorHandle>,
    ) -> (TensorHandle, TensorHandle) {
        let (d_in, k, r, d_out) = self.dims();
        let x = MatRef::new(x);
        assert_eq!(
            x.cols, d_in,
            "LowRankLora::forward: x has {} features, expected {d_in}",
            x.cols
        );
        let n = x.rows;
        let dtype = x.dtype();
        let x_l = match x_lora {
            Some(x_lora) => {
                let x_lora = MatRef::new(x_lora);
                assert_eq!((x_lora.rows, x_lora.cols), (n, d_in), "x_lora must match x");
                x_lora
            }
            None => x.clone(),
        };
        let h_v = MatRef::new(empty_matrix(client, n, k, dtype));
        let h_l = empty_matrix(client, n, r, dtype);
        let h_l_ref = MatRef::new(h_l.clone());
        let w_v = Operand::Single(MatRef::new(self.w_v.clone()));
        gemm(client, &Operand::Single(x), &w_v, &h_v, None, 1.0);
        let a = Operand::Single(MatRef::new(self.a.clone()));
        gemm(client, &Operand::Single(x_l), &a, &h_l_ref, None, 1.0);
        let y = empty_matrix(client, n, d_out, dtype);
        let lhs = Operand::Cols { first: h_v, second: h_l_ref, scale: 1.0 };
        let rhs = Operand::Rows {
            first: MatRef::new(self.w_u.clone()),
            second: MatRef::new(self.b.clone()),
            scale: self.scale,
        };
        gemm(client, &lhs, &rhs, &MatRef::new(y.clone()), bias, 1.0);
        (y, h_l)
    }

    /// Gradients from the saved LoRA input `x_l` and bottleneck `h_l` `[n, r]` and the output
    /// gradient `dy` `[n, d_out]`. The frozen factors get none; `∂L/∂x` is skipped unless
    /// `need_x`, and split into the two branches' parts with `separate_lora_input`.
    ///
    /// `dh = dy [W_u ; s·B]ᵀ` (or only its LoRA columns `s·dy Bᵀ` without `need_x`),
    /// `dx = dh [W_v | A]ᵀ`, `dA = x_lᵀ dh_l`, `dB = s·h_lᵀ dy`; the last two reduce over the
    /// tokens and are split along them.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        client: &Client,
        x_l: TensorHandle,
        h_l: TensorHandle,
        dy: TensorHandle,
        need_x: bool,
        separate_lora_input: bool,
    ) -> LowRankLoraGrads {
        let (d_in, k, r, d_out) = self.dims();
        let x_l = MatRef::new(x_l);
        let h_l = MatRef::new(h_l);
        let dy = MatRef::new(dy);
        let n = x_l.rows;
        assert_eq!((dy.rows, dy.cols), (n, d_out), "LowRankLora::backward: dy has the wrong shape");
        assert_eq!((h_l.rows, h_l.cols), (n, r), "LowRankLora::backward: h_l has the wrong shape");
        assert_eq!(x_l.cols, d_in, "LowRankLora::backward: x_l has the wrong width");
        let dtype = x_l.dtype();
        let w_v = MatRef::new(self.w_v.clone());
        let a = MatRef::new(self.a.clone());
        let b = MatRef::new(self.b.clone());
        let dy_op = Operand::Single(dy.clone());

        // dh (all k + r columns when dx is wanted, else only the LoRA ones).
        let (dh, dh_lora) = if need_x {
            let dh = empty_matrix(client, n, k + r, dtype);
            let dh_ref = MatRef::new(dh);
            let rhs = Operand::Cols {
                first: MatRef::new(self.w_u.clone()).t(),
                second: b.clone().t(),
                scale: self.scale,
            };
            gemm(client, &dy_op, &rhs, &dh_ref, None, 1.0);
            (Some(dh_ref.clone()), dh_ref.cols(k, r))
        } else {
            let dh_lora = MatRef::new(empty_matrix(client, n, r, dtype));
            gemm(client, &dy_op, &Operand::Single(b.clone().t()), &dh_lora, None, self.scale);
            (None, dh_lora)
        };

        let (grad_x, grad_x_lora) = match (&dh, separate_lora_input) {
            (None, _) => (None, None),
            (Some(dh), false) => {
                let dx = empty_matrix(client, n, d_in, dtype);
                let rhs =
                    Operand::Rows { first: w_v.clone().t(), second: a.clone().t(), scale: 1.0 };
                gemm(
                    client,
                    &Operand::Single(dh.clone()),
                    &rhs,
                    &MatRef::new(dx.clone()),
                    None,
                    1.0,
                );
                (Some(dx), None)
            }
            (Some(dh), true) => {
                let dx = empty_matrix(client, n, d_in, dtype);
                let lhs = Operand::Single(dh.clone().cols(0, k));
                gemm(
                    client,
                    &lhs,
                    &Operand::Single(w_v.clone().t()),
                    &MatRef::new(dx.clone()),
                    None,
                    1.0,
                );
                let dxl = empty_matrix(client, n, d_in, dtype);
                let lhs = Operand::Single(dh.clone().cols(k, r));
                gemm(
                    client,
                    &lhs,
                    &Operand::Single(a.clone().t()),
                    &MatRef::new(dxl.clone()),
                    None,
                    1.0,
                );
                (Some(dx), Some(dxl))
            }
        };

        let grad_a = empty_matrix(client, d_in, r, dtype);
        gemm(
            client,
            &Operand::Single(x_l.t()),
            &Operand::Single(dh_lora),
            &MatRef::new(grad_a.clone()),
            None,
            1.0,
        );
        let grad_b = empty_matrix(client, r, d_out, dtype);
        gemm(
            client,
            &Operand::Single(h_l.t()),
            &dy_op,
            &MatRef::new(grad_b.clone()),
            None,
            self.scale,
        );
        LowRankLoraGrads { x: grad_x, x_lora: grad_x_lora, a: grad_a, b: grad_b }
    }
}
