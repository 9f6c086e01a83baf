//! Model zoo for emloc.

pub mod tiny;
