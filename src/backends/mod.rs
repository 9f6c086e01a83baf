//! Implementations of [`EmlocOps`](crate::ops::EmlocOps), one file per backend (the layout of
//! burn-signal).

mod autodiff;
#[cfg(feature = "cube")]
mod cubecl;
mod flex;
