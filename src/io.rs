//! Files: writing them so a crash never leaves a half-written artifact, and naming the inputs an
//! artifact was made from.

pub use crate::atomic::{write_atomic, write_atomic_with};
pub use crate::identity::FileIdentity;
