//! Implementations of [`EmlocOps`](crate::ops::EmlocOps), one file per backend (the layout of
//! burn-signal), and the plain tensor-op forms they share.

mod autodiff;
#[cfg(feature = "cube")]
mod cubecl;
mod flex;
mod generic;
