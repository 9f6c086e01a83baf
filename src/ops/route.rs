//! Which engine runs emloc's heavy products on the Cube backend, chosen per thread.

use crate::error::{EmlocError, Result};

/// Which engine runs the heavy products (the Gram `XᵀX` and the fused layer's four products)
/// on the Cube backend. Flex always uses its own matmul; Cholesky and the triangular solves
/// always run on emloc's `f32` tiled core (their accuracy needs true `f32` products).
///
/// - [`Tiled`](Self::Tiled): emloc's tiled core (`emloc-cube-kernels`): `f32` FMAs, operands
///   joined and scaled in place (`[W_v | A]`, `[W_u ; s·B]` are never built), the Gram's lower
///   tiles only. Exact `f32` products on every runtime.
/// - [`Matmul`](Self::Matmul): Burn's own matmul (CubeCL's `cubek`): tensor cores where the
///   device has them (CUDA: `f16`/`bf16` with `f32` accumulation, and `f32` inputs as **TF32**,
///   as for any Burn matmul there), vectorised unit kernels elsewhere. The joined weights are
///   built for each call (`d_in·(k + r)` and `(k + r)·d_out` elements, small next to the
///   products), and the Gram is the full `XᵀX` with an `f32` output.
/// - [`Auto`](Self::Auto) (the default): `Matmul` for `f16`/`bf16` inputs on a device with
///   tensor cores for them (products exact in the `f32` accumulator, as on the tiled core),
///   `Tiled` for `f32` (TF32 would cost 13 mantissa bits: choose `Matmul` to trade them for
///   speed) and on devices without tensor cores (most wgpu drivers, lavapipe, the CubeCL CPU
///   runtime).
///
/// The route is chosen per thread: [`with_product_route`] for a scope, or the environment
/// variable `EMLOC_PRODUCT_ROUTE` (`auto`, `tiled` or `matmul`) for the whole process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ProductRoute {
    /// Tensor cores for `f16`/`bf16` where the device has them, else the tiled core.
    #[default]
    Auto,
    /// Always emloc's tiled core (`f32` FMAs).
    Tiled,
    /// Always Burn's matmul (TF32 for `f32` inputs on CUDA tensor cores).
    Matmul,
}

impl ProductRoute {
    /// Parses `auto`, `tiled` or `matmul` (case-insensitive).
    ///
    /// # Errors
    /// [`EmlocError::InvalidConfig`] for any other value.
    pub fn parse(value: &str) -> Result<Self> {
        match value.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "tiled" => Ok(Self::Tiled),
            "matmul" => Ok(Self::Matmul),
            other => Err(EmlocError::InvalidConfig(format!(
                "product route must be auto, tiled or matmul, got `{other}`"
            ))),
        }
    }

    /// The route in force on this thread: the innermost [`with_product_route`], else
    /// `EMLOC_PRODUCT_ROUTE` (read once; an invalid value panics with the accepted ones), else
    /// [`Auto`](Self::Auto).
    pub fn current() -> Self {
        static FROM_ENV: std::sync::OnceLock<ProductRoute> = std::sync::OnceLock::new();
        ROUTE.with(|r| r.get()).unwrap_or_else(|| {
            *FROM_ENV.get_or_init(|| match std::env::var("EMLOC_PRODUCT_ROUTE") {
                Ok(v) => Self::parse(&v).unwrap_or_else(|e| panic!("EMLOC_PRODUCT_ROUTE: {e}")),
                Err(_) => Self::Auto,
            })
        })
    }
}

thread_local! {
    static ROUTE: std::cell::Cell<Option<ProductRoute>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with `route` for emloc's products on this thread (benchmarks, tests), restoring the
/// previous choice afterwards, also when `f` panics. Autodiff's backward pass runs on the
/// thread that calls `backward()`, so a backward inside `f` follows the route too.
pub fn with_product_route<T>(route: ProductRoute, f: impl FnOnce() -> T) -> T {
    struct Restore(Option<ProductRoute>);
    impl Drop for Restore {
        fn drop(&mut self) {
            ROUTE.with(|r| r.set(self.0));
        }
    }
    let _restore = Restore(ROUTE.with(|r| r.replace(Some(route))));
    f()
}
