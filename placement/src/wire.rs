//! Messages between updraft components (serde JSON, versioned with `v`).
//!
//! Unlike the API types, these *tolerate* unknown fields: a newer producer may add one and an
//! older consumer keeps working, so a cluster can be upgraded one component at a time. A
//! message whose `v` is not one we speak is refused, never reinterpreted; a breaking change
//! gets a new subject version instead.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::flavor::FlavorCatalog;
use crate::ids::{NodeId, RequestId, TraitName, Zone};
use crate::lifecycle::{DEFAULT_MAX_ATTEMPTS, RequestRecord, State};
use crate::request::DEFAULT_DEADLINE_S;
use crate::resources::{AllocationRatios, Resources};
use crate::shard::{ClassKey, Lane, ShardMap};
use crate::time::Timestamp;

/// The wire version this build speaks.
pub const WIRE_VERSION: u32 = 1;
/// Largest message decoded (a record with full metadata and history fits easily).
pub const MAX_WIRE_BYTES: usize = 256 * 1024;

/// A message with a version field.
pub trait Versioned {
    /// The message's `v`.
    fn version(&self) -> u32;
}

macro_rules! versioned {
    ($($t:ty),*) => {$(
        impl Versioned for $t {
            fn version(&self) -> u32 { self.v }
        }
    )*};
}

/// A message that could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Larger than [`MAX_WIRE_BYTES`].
    #[error("message of {0} bytes exceeds the {MAX_WIRE_BYTES} byte limit")]
    TooLarge(usize),
    /// Not JSON of the right shape.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A version we do not speak.
    #[error("unsupported message version {0} (this build speaks {WIRE_VERSION})")]
    Version(u32),
}

impl WireError {
    /// Stable label for metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            WireError::TooLarge(_) => "too_large",
            WireError::Malformed(_) => "malformed",
            WireError::Version(_) => "version",
        }
    }
}

/// Decodes a versioned message, checking size and version.
pub fn decode<T: DeserializeOwned + Versioned>(bytes: &[u8]) -> Result<T, WireError> {
    if bytes.len() > MAX_WIRE_BYTES {
        return Err(WireError::TooLarge(bytes.len()));
    }
    let msg: T = serde_json::from_slice(bytes).map_err(|e| WireError::Malformed(e.to_string()))?;
    if msg.version() != WIRE_VERSION {
        return Err(WireError::Version(msg.version()));
    }
    Ok(msg)
}

/// Encodes a message (infallible for our types: maps have string keys, no non-finite floats
/// reach here because ratios are validated).
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    serde_json::to_vec(msg).expect("wire types always serialize")
}

versioned!(
    Hint,
    NodeAdvert,
    NodeCommand,
    AdminState,
    BacklogFlag,
    ClusterConfig,
    Timer,
    RequestEvent,
    GroupPin,
    ClassDemand
);

impl Versioned for RequestRecord {
    fn version(&self) -> u32 {
        self.v
    }
}

/// A queue message: "request `id`, attempt `attempt`, may be waiting". Only a hint: the node
/// acts on the record, never on the hint. A hint whose attempt is not the record's is stale.
/// It may carry the record as the dispatcher wrote it ([`RecordCopy`]), so the node can claim
/// with a compare-and-swap on that revision without reading it first; if the record moved on
/// since, the swap fails and the node reads it as without a copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hint {
    /// Version.
    pub v: u32,
    /// The request.
    pub id: RequestId,
    /// The attempt this hint is for.
    pub attempt: u32,
    /// Which lane it was published to.
    pub lane: Lane,
    /// When it was published (queue wait metrics).
    pub published_at: Timestamp,
    /// The record at the revision the dispatcher wrote, when it publishes right after writing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<RecordCopy>,
}

/// A request record as stored at `revision` of its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordCopy {
    /// The key's revision holding `record`.
    pub revision: u64,
    /// The record.
    pub record: RequestRecord,
}

/// A node's administrative or health state, as advertised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Pulling work.
    Active,
    /// Set by an operator: takes no new work.
    Cordoned,
    /// Set by an operator: takes no new work, finishes builds, then stays cordoned.
    Draining,
    /// Its lease renewal failed; it stopped pulling and is re-confirming its claims.
    Fenced,
    /// Its hypervisor connection is down, or too many builds failed in a row.
    Unhealthy,
    /// Shutting down.
    Stopping,
}

impl NodeState {
    /// Stable snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Active => "active",
            NodeState::Cordoned => "cordoned",
            NodeState::Draining => "draining",
            NodeState::Fenced => "fenced",
            NodeState::Unhealthy => "unhealthy",
            NodeState::Stopping => "stopping",
        }
    }
}

/// A node's advertisement and lease: the value of its key in the nodes bucket, renewed by
/// compare-and-swap on every heartbeat; it expires with the bucket's TTL when the node dies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeAdvert {
    /// Version.
    pub v: u32,
    /// Node id.
    pub node: NodeId,
    /// Boot epoch; a claim from another epoch is reaped.
    pub epoch: crate::ids::Epoch,
    /// Zone.
    pub zone: Zone,
    /// Traits.
    pub traits: Vec<TraitName>,
    /// Host totals.
    pub totals: Resources,
    /// Host reserve.
    pub reserved: Resources,
    /// Allocation ratios.
    pub ratios: AllocationRatios,
    /// Schedulable capacity.
    pub capacity: Resources,
    /// Capacity not allocated (what a new request could use).
    pub unallocated: Resources,
    /// Number of VMs the ledger holds.
    pub vms: u32,
    /// Builds in flight (a draining node is drained when this reaches zero).
    #[serde(default)]
    pub building: u32,
    /// State.
    pub state: NodeState,
    /// Why it is unhealthy or fenced, when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_reason: Option<String>,
    /// The ledger holds more than capacity (adopted VMs).
    #[serde(default)]
    pub overcommitted: bool,
    /// Agent version.
    pub agent_version: String,
    /// Hypervisor driver in use (`libvirt`, `memory`).
    pub driver: String,
    /// When this epoch started.
    pub started_at: Timestamp,
    /// Last heartbeat.
    pub heartbeat_at: Timestamp,
    /// The node's public signing key (nkeys), when it signs its claims.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
    /// The tier in which it opens while empty under pack (`crate::pull::PullConfig::pack_tier`;
    /// 0 under other policies): the dispatcher sets a backlog's tier floor from it
    /// (`crate::takers`).
    #[serde(default)]
    pub pack_tier: u8,
    /// Its starvation guard (`crate::policy::GuardConfig`): the share of nodes that hold back
    /// and the smallest class guarded. The dispatcher stores a backlog flag up to the draws
    /// a guard may elect (`crate::flag_writes`); an older agent is taken to run the defaults.
    #[serde(default)]
    pub guard: GuardReach,
}

/// What of a node's starvation guard the dispatcher needs: how far up the election draws it
/// holds back, and from which class on.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GuardReach {
    /// Share of eligible nodes that hold back (`GuardConfig::share`).
    pub share: f64,
    /// Smallest class index guarded (`GuardConfig::min_class`).
    pub min_class: u8,
}

impl Default for GuardReach {
    fn default() -> Self {
        GuardReach::of(&crate::policy::GuardConfig::default())
    }
}

impl GuardReach {
    /// The reach of `guard`.
    pub fn of(guard: &crate::policy::GuardConfig) -> Self {
        GuardReach {
            share: guard.share,
            min_class: guard.min_class,
        }
    }

    /// The highest election draw it may hold back at for class index `size` (0: none).
    pub fn for_class(&self, size: u8) -> f64 {
        if size >= self.min_class {
            self.share
        } else {
            0.0
        }
    }
}

impl NodeAdvert {
    /// True when the node takes new work.
    pub fn takes_work(&self) -> bool {
        self.state == NodeState::Active && !self.overcommitted
    }
}

/// A command to one node, stored durably under `<node>.cmd.<request>` until the node acts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCommand {
    /// Version.
    pub v: u32,
    /// What to do.
    pub kind: CommandKind,
    /// The request concerned.
    pub request: RequestId,
    /// When it was issued.
    pub issued_at: Timestamp,
}

/// Commands a node understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandKind {
    /// Destroy the VM and finish the delete.
    Delete,
}

/// Operator-set state of a node, stored under `<node>.admin` in the commands bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminState {
    /// Version.
    pub v: u32,
    /// Take no new work.
    pub cordoned: bool,
    /// Take no new work and finish in-flight builds.
    pub draining: bool,
    /// When it was set.
    pub updated_at: Timestamp,
    /// Who set it (free text, for the audit trail).
    #[serde(default)]
    pub by: String,
}

/// One flag per class saying its queue backs up, written by dispatchers, read by nodes (its
/// takers, the starvation guard, the pack tiers), so no node polls consumer info.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BacklogFlag {
    /// Version.
    pub v: u32,
    /// The class.
    pub class: ClassKey,
    /// Since when it has been backed up: its oldest waiting request's spill deadline. A class
    /// is flagged before that (the dispatcher's `flag_after`), so full-fit takers pull it at
    /// once; near-fit takers, the pack tiers and the starvation guard count from `since`.
    pub since: Timestamp,
    /// Age of the oldest waiting hint when last measured (ms).
    pub oldest_age_ms: u64,
    /// Hints waiting when last measured.
    pub depth: u64,
    /// Component-wise minimum of the waiting requests: a node that cannot hold this cannot
    /// hold any of them (near-fit takers check it before pulling the spill lane).
    #[serde(default)]
    pub smallest: Resources,
    /// Last measurement.
    pub updated_at: Timestamp,
    /// Per partition with requests waiting, the shares of its eligible nodes that act on
    /// the flag (see [`crate::takers`]); absent (an older dispatcher): every node acts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub takers: Option<Vec<crate::takers::PartitionTakers>>,
}

impl BacklogFlag {
    /// Its smallest waiting request, or `otherwise` when the flag does not say (an older
    /// dispatcher): the class's lower bound for who could take one, its upper bound for what
    /// the starvation guard makes room for.
    pub fn smallest_or(&self, otherwise: impl FnOnce() -> Resources) -> Resources {
        if self.smallest.is_zero() {
            otherwise()
        } else {
            self.smallest.clone()
        }
    }
}

/// How often each class of a zone is requested, written by dispatchers every few seconds so
/// nodes spend their pull credit on classes that are actually asked for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassDemand {
    /// Version.
    pub v: u32,
    /// Zone.
    pub zone: Zone,
    /// Requests per minute by class (classes with none are absent).
    pub rates: Vec<DemandEntry>,
    /// When measured.
    pub updated_at: Timestamp,
}

/// One class's request rate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DemandEntry {
    /// Trait class.
    pub tclass: crate::ids::TraitClassName,
    /// Size class.
    pub size: u8,
    /// Requests per minute (recent, decayed).
    pub per_min: f64,
}

/// Cluster-wide settings every dispatcher and node agree on, stored versioned in KV.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterConfig {
    /// Version.
    pub v: u32,
    /// Shard map.
    pub shard_map: ShardMap,
    /// Flavors.
    pub flavors: FlavorCatalog,
    /// Deadline for requests that give none.
    pub default_deadline_s: u64,
    /// Build attempts before a request fails.
    pub max_attempts: u32,
}

impl ClusterConfig {
    /// A config with the default flavors and limits around `shard_map`.
    pub fn new(shard_map: ShardMap) -> Self {
        ClusterConfig {
            v: WIRE_VERSION,
            shard_map,
            flavors: FlavorCatalog::default(),
            default_deadline_s: DEFAULT_DEADLINE_S,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
        }
    }
}

/// A durable timer: fires at `due_at` and makes a dispatcher look at the request again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timer {
    /// Version.
    pub v: u32,
    /// The request.
    pub id: RequestId,
    /// The attempt it was set for (a fire for another attempt is stale).
    pub attempt: u32,
    /// What is due.
    pub kind: TimerKind,
    /// When.
    pub due_at: Timestamp,
}

/// Kinds of durable timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimerKind {
    /// The final deadline: answer `failed` with an explanation. Set when a request waits past
    /// its class deadline (spill-over), so requests placed at once never cost a timer.
    Deadline,
}

impl TimerKind {
    /// Stable name used in subjects.
    pub fn as_str(self) -> &'static str {
        match self {
            TimerKind::Deadline => "deadline",
        }
    }
}

/// A state change, published on a core subject for observers (status page, CLI watch); the
/// record stays the truth.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestEvent {
    /// Version.
    pub v: u32,
    /// The request.
    pub id: RequestId,
    /// New state.
    pub state: State,
    /// Attempt.
    pub attempt: u32,
    /// Node, when one holds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeId>,
    /// Reason, for failures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When.
    pub at: Timestamp,
}

impl RequestEvent {
    /// The event describing a record's current state.
    pub fn of(r: &RequestRecord) -> Self {
        RequestEvent {
            v: WIRE_VERSION,
            id: r.spec.id.clone(),
            state: r.state,
            attempt: r.attempt,
            node: r.node().cloned(),
            reason: r.reason.clone(),
            at: r.updated_at,
        }
    }
}

/// Where an affinity group lives: written once by the node that places its first member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupPin {
    /// Version.
    pub v: u32,
    /// The node all members go to.
    pub node: NodeId,
    /// When it was pinned.
    pub at: Timestamp,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_round_trip_and_tolerate_unknown_fields() {
        let h = Hint {
            v: WIRE_VERSION,
            id: RequestId::new("a").unwrap(),
            attempt: 2,
            lane: Lane::Fit,
            published_at: Timestamp(5),
            record: None,
        };
        let bytes = encode(&h);
        assert_eq!(decode::<Hint>(&bytes).unwrap(), h);
        let extra =
            br#"{"v":1,"id":"a","attempt":2,"lane":"fit","published_at":5,"new_field":true}"#;
        assert_eq!(decode::<Hint>(extra).unwrap(), h);
    }

    #[test]
    fn wrong_version_size_and_shape_are_refused() {
        let v2 = br#"{"v":2,"id":"a","attempt":2,"lane":"fit","published_at":5}"#;
        assert_eq!(decode::<Hint>(v2), Err(WireError::Version(2)));
        assert!(matches!(
            decode::<Hint>(br#"{"id":"a"}"#),
            Err(WireError::Malformed(_))
        ));
        assert!(matches!(
            decode::<Hint>(br#"{"v":1,"id":"A B","attempt":1,"lane":"fit","published_at":1}"#),
            Err(WireError::Malformed(_))
        ));
        assert!(matches!(
            decode::<Hint>(br#"{"v":1,"id":"a","attempt":-1,"lane":"fit","published_at":1}"#),
            Err(WireError::Malformed(_))
        ));
        let big = vec![b' '; MAX_WIRE_BYTES + 1];
        assert_eq!(
            decode::<Hint>(&big),
            Err(WireError::TooLarge(MAX_WIRE_BYTES + 1))
        );
        assert!(matches!(
            decode::<Hint>(b"\xff"),
            Err(WireError::Malformed(_))
        ));
    }

    #[test]
    fn cluster_config_round_trips() {
        let c = ClusterConfig::new(crate::shard::default_shard_map(Zone::new("az1").unwrap()));
        assert_eq!(decode::<ClusterConfig>(&encode(&c)).unwrap(), c);
    }
}
