//! updraft-sim: a deterministic discrete-event capacity simulator.
//!
//! It replays a workload (a trace or a synthetic generator, streamed) against a cluster of
//! heterogeneous nodes under updraft's pull-based placement, calling the production policy
//! code in `placement` (routing, ledger, pull planning, fitness buckets, the starvation
//! guard), and against central baselines (first-fit, best-fit linear and indexed,
//! worst-fit, a Nova-like filter-and-weigh, power-of-two choices) plus the bin-packing lower
//! bound. Same seed, same output, byte for byte.

pub mod central;
pub mod cluster;
pub mod events;
pub mod plan;
pub mod report;
pub mod stats;
pub mod updraft;
pub mod workload;

/// Simulated time, milliseconds from the workload's start.
pub type Millis = u64;

/// Which placement runs.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum, serde::Serialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyKind {
    /// updraft: nodes pull from sharded queues (the production pull planner, pack policy).
    Updraft,
    /// updraft with the spread policy.
    UpdraftSpread,
    /// Central first-fit, linear scan.
    FirstFit,
    /// Central best-fit (least leftover), linear scan.
    BestFit,
    /// Central best-fit over an ordered index of free memory (O(log N) per decision).
    BestFitIndexed,
    /// Central worst-fit (most leftover), linear scan.
    WorstFit,
    /// Nova-like: filter every host, weigh by free RAM (spreading), pick the best.
    Nova,
    /// Sparrow-like power of two choices: sample two nodes, take the better fitting one.
    PowerOfTwo,
}

impl PolicyKind {
    /// Every policy, in report order.
    pub const ALL: [PolicyKind; 8] = [
        PolicyKind::Updraft,
        PolicyKind::UpdraftSpread,
        PolicyKind::BestFit,
        PolicyKind::BestFitIndexed,
        PolicyKind::FirstFit,
        PolicyKind::WorstFit,
        PolicyKind::Nova,
        PolicyKind::PowerOfTwo,
    ];

    /// Its name in tables and files.
    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::Updraft => "updraft",
            PolicyKind::UpdraftSpread => "updraft-spread",
            PolicyKind::FirstFit => "first-fit",
            PolicyKind::BestFit => "best-fit",
            PolicyKind::BestFitIndexed => "best-fit-indexed",
            PolicyKind::WorstFit => "worst-fit",
            PolicyKind::Nova => "nova",
            PolicyKind::PowerOfTwo => "power-of-two",
        }
    }
}
