//! What every updraft binary shares.
//!
//! # Layout
//! * `config`: one figment loader: defaults < TOML file < `UPDRAFT_*` env < `--set` flags,
//!   with errors that name the key and the source it came from.
//! * `telemetry`: tracing subscriber (`UPDRAFT_LOG`) and the Prometheus recorder.
//! * `clock`: wall-clock timestamps for records.
//! * `signal`: the shutdown signal (SIGTERM or Ctrl-C).

pub mod clock;
pub mod config;
pub mod signal;
pub mod telemetry;
