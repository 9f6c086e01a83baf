//! Integration tests of the emloc library (one test binary; see MACHINES notes on link cost).

mod allocation;
mod cholesky;
mod common;
mod conv;
mod dropins;
mod emulate;
mod errors;
mod kernels;
mod lora;
mod sequential;
mod store;
