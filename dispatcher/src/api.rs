//! API types shared by the HTTP and NATS front ends: errors with a status and a stable code,
//! and the shapes of answers.

use std::collections::BTreeMap;

use placement::ShardId;
use placement::explain::Explanation;
use placement::lifecycle::{RequestRecord, State};
use placement::request::ValidationError;
use placement::wire::NodeAdvert;
use serde::{Deserialize, Serialize};

use crate::view::{FailureNote, Latency};

/// An API failure: an HTTP status, a stable code, a message that says what to do, and the
/// record when there is one (a 422 admission failure shows what was stored).
#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// Stable code (`invalid`, `malformed`, `not_found`, `conflict`, `full`, ...).
    pub code: String,
    /// What went wrong and what to do.
    pub message: String,
    /// The record concerned, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<Box<RequestRecord>>,
}

impl ApiError {
    /// A new error.
    pub fn new(status: u16, code: &str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code: code.to_string(),
            message: message.into(),
            record: None,
        }
    }

    /// Attaches the record.
    pub fn with_record(mut self, r: RequestRecord) -> Self {
        self.record = Some(Box::new(r));
        self
    }

    /// 404.
    pub fn not_found(what: impl std::fmt::Display) -> Self {
        Self::new(404, "not_found", format!("{what} not found"))
    }

    /// 503: NATS trouble; the client may retry.
    pub fn unavailable(e: impl std::fmt::Display) -> Self {
        Self::new(503, "unavailable", format!("{e}; retry shortly"))
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        let status = match &e {
            ValidationError::BodyTooLarge { .. } => 413,
            _ => 400,
        };
        ApiError::new(status, e.code(), e.to_string())
    }
}

/// The answer to a create.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Created {
    /// True when this call created it; false when it existed (an idempotent retry).
    pub created: bool,
    /// The record.
    pub record: RequestRecord,
}

/// One item of a batch create.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatchItem {
    /// Request id.
    pub id: String,
    /// HTTP-like status of this item.
    pub status: u16,
    /// The record, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<RequestRecord>,
    /// The error, when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ApiError>,
}

/// Filters of a list.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListQuery {
    /// Only this state.
    pub state: Option<State>,
    /// Only requests held by this node.
    pub node: Option<String>,
    /// Only this zone.
    pub zone: Option<String>,
    /// Most items (default 100, at most 10,000).
    pub limit: Option<usize>,
}

/// A list answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListResult {
    /// Records, newest first.
    pub items: Vec<RequestRecord>,
    /// More matched than `limit`.
    pub truncated: bool,
}

/// Why a request is where it is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Explained {
    /// Request.
    pub id: String,
    /// State.
    pub state: State,
    /// Attempt.
    pub attempt: u32,
    /// One line for people.
    pub summary: String,
    /// For queued requests: where it could go now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Explanation>,
    /// Nodes excluded after failed attempts.
    pub excluded: Vec<String>,
}

/// A dry run of a create.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    /// The shard it would go to.
    pub shard: ShardId,
    /// Could any node ever hold it.
    pub admissible: bool,
    /// Could a node take it now.
    pub fits_now: bool,
    /// The explanation.
    pub explanation: Explanation,
}

/// A node as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeView {
    /// The advert.
    pub advert: NodeAdvert,
    /// Open requests the node holds.
    pub held: usize,
    /// Seconds since its last heartbeat.
    pub heartbeat_age_s: f64,
}

/// Per zone and class: how many nodes could take it now.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClassCapacity {
    /// Zone.
    pub zone: String,
    /// Trait class.
    pub tclass: String,
    /// Size class.
    pub size: u8,
    /// Upper bound of the class.
    pub bound: String,
    /// Nodes that take work and fully fit the class now.
    pub nodes_fitting: usize,
    /// How many requests of the class's bound fit in total, summed over nodes.
    pub slots: u64,
    /// Requests waiting in the class.
    pub queued: u64,
}

/// Capacity summary.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Capacity {
    /// Per zone: node count, capacity and unallocated totals.
    pub zones: BTreeMap<String, ZoneCapacity>,
    /// Per class.
    pub classes: Vec<ClassCapacity>,
}

/// One zone's totals.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ZoneCapacity {
    /// Nodes advertised.
    pub nodes: usize,
    /// Nodes taking work.
    pub active: usize,
    /// Sum of capacity.
    pub capacity: placement::Resources,
    /// Sum of unallocated capacity.
    pub unallocated: placement::Resources,
}

/// Health.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Health {
    /// Connected to NATS.
    pub nats_connected: bool,
    /// The view has caught up with KV.
    pub caught_up: bool,
    /// Nodes advertised.
    pub nodes: usize,
    /// Open requests by state.
    pub open: BTreeMap<String, usize>,
}

/// Live statistics for the status page.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stats {
    /// Placements per second over the last minute.
    pub placement_rate: f64,
    /// Queue → claimed.
    pub to_claim: Latency,
    /// Queue → active.
    pub to_active: Latency,
    /// Open requests by state.
    pub open: BTreeMap<String, usize>,
    /// Recent failures.
    pub failures: Vec<FailureNote>,
}
