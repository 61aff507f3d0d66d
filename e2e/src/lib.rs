//! End-to-end harness: a real nats-server (or a 3-server cluster), dispatchers and agents
//! (in-process, or as real `updraft-agent` processes that tests can kill -9 or SIGSTOP), an
//! HTTP client for the API, and the invariant checker of DESIGN.md.
//!
//! You probably want an integration test in a crate's own `tests/` instead: these start whole
//! clusters.

pub mod checker;
pub mod harness;
pub mod netns;
pub mod process;

pub use checker::{Report, check};
pub use harness::{Harness, HarnessOptions};
