//! `placement`: updraft's pure core. Everything here is a function of its arguments: no
//! clock, no network, no libvirt, no threads. Time and randomness are passed in, so the
//! node-agent, the dispatcher and the simulator all run *this* code and a run replays.
//!
//! Start with [`shard::ShardMap::route`] (where a request goes), [`pull::plan_pulls`] (which
//! queues a node pulls, under pull credit), [`ledger::NodeLedger`] (the node's authoritative
//! books) and [`lifecycle::RequestRecord`] (the request's life as compare-and-swap values).
//!
//! # Layout
//! * `ids`: validated identifiers and the stable hash used for partitions and elections.
//! * `resources`: resource vectors with checked arithmetic; capacity from totals and ratios.
//! * `flavor`: named shapes.
//! * `request`: the API create types (unknown fields refused) and their validation.
//! * `shard`: the shard map: size ladder, trait classes, zones, partitions, routing.
//! * `ledger`: a node's allocations, pull credit and foreign usage.
//! * `checks`: node-side checks the shards cannot route, as named rejections.
//! * `policy`: pack / spread / random as pull priorities; the starvation guard.
//! * `pull`: which pulls a node keeps outstanding.
//! * `step_aside`: a node that hands a message back pulls that lane last for a while.
//! * `lifecycle`: the request record and its state machine.
//! * `wire`: versioned messages between components (unknown fields tolerated).
//! * `explain`: admission and "why pending" explanations from advertisements.
//! * `takers`: which nodes act on a backlog flag; `flag_writes`: a flag stored per partition.
//! * `subjects`: every NATS name.
//! * `time`: timestamps as values.
//! * `trace`: workload trace lines (the Azure trace and a simple format of our own).

pub mod checks;
pub mod demand;
pub mod explain;
pub mod flag_writes;
pub mod flavor;
pub mod ids;
pub mod ledger;
pub mod lifecycle;
pub mod policy;
pub mod pull;
pub mod request;
pub mod resources;
pub mod shard;
pub mod standing;
pub mod step_aside;
pub mod subjects;
pub mod takers;
pub mod time;
pub mod trace;
pub mod wire;

pub use checks::Rejection;
pub use ids::{ClaimToken, Epoch, NodeId, RequestId, TraitName, Zone};
pub use ledger::{NodeLedger, PullId};
pub use lifecycle::{Claim, RequestRecord, State};
pub use request::{CreateServer, RequestSpec};
pub use resources::{AllocationRatios, Resources};
pub use shard::{Lane, ShardId, ShardMap};
pub use time::Timestamp;
