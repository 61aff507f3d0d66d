//! The `updraft` CLI as a library, so tests can drive its pieces.

pub mod client;
pub mod cluster;
pub mod output;
pub mod servers;
pub mod up;
