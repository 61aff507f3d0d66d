//! `bus`: everything updraft says to NATS, as narrow domain methods.
//!
//! The dispatcher, the node-agent, the CLI and the load runner all talk to NATS through this
//! crate; none of them formats a subject (those come from `placement::subjects`). It is tested
//! against a real `nats-server` (tests/), never a fake.
//!
//! # Layout
//! * `connect`: connection settings and a client that reconnects forever with backoff.
//! * `topology`: streams, consumers and buckets, created idempotently.
//! * `kv`: compare-and-swap, create and leader reads on KV subjects.
//! * `records`: request records (the truth).
//! * `nodes`: advertisements and leases.
//! * `commands`: per-node durable commands and admin state.
//! * `cluster`: cluster config, backlog flags, affinity pins.
//! * `hints`: publishing hints onto shard work queues.
//! * `keeper`: when a shard stream is due the message that keeps its last block from emptying.
//! * `puller`: a node's outstanding pulls on one subscription, and acks.
//! * `timers`: durable timers on message schedules.
//! * `permissions`: NATS users and subject permissions per role (`deploy/nats/accounts.conf`).
//! * `status`: shard depth, oldest age and consumers.
//! * `server`: starts and stops `nats-server` processes (local cluster and tests).

pub mod cluster;
pub mod commands;
pub mod connect;
pub mod error;
pub mod hints;
pub mod keeper;
pub mod kv;
pub mod nodes;
pub mod permissions;
pub mod puller;
pub mod records;
pub mod server;
pub mod status;
pub mod timers;
pub mod topology;

pub use connect::{ConnState, NatsConfig, connect, connect_lazy};
pub use error::BusError;
pub use topology::{Bus, TopologyConfig};

/// A value and the KV revision it was read at (the revision a compare-and-swap must name).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Versioned<T> {
    /// The decoded value.
    pub value: T,
    /// Its revision (stream sequence).
    pub revision: u64,
}
