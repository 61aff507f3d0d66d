//! Metric names (Prometheus, `updraft_dispatcher_*`) and help text. docs/metrics.md lists them.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

/// Create calls by outcome (accepted, duplicate, conflict, invalid, malformed, too_large,
/// body_too_large, inadmissible, full).
pub const REQUESTS: &str = "updraft_dispatcher_requests_total";
/// Hints published, by lane and outcome.
pub const HINTS: &str = "updraft_dispatcher_hints_total";
/// Queue to claimed, observed from records.
pub const TO_CLAIM: &str = "updraft_dispatcher_queue_to_claim_seconds";
/// Queue to active, observed from records.
pub const TO_ACTIVE: &str = "updraft_dispatcher_queue_to_active_seconds";
/// Attempts a request needed to become active.
pub const ATTEMPTS: &str = "updraft_dispatcher_attempts";
/// Requests that reached a terminal or visible end state, by state.
pub const OUTCOMES: &str = "updraft_dispatcher_outcomes_total";
/// Claims reaped, by what happened (requeued, host_down, failed).
pub const REAPED: &str = "updraft_dispatcher_reaped_total";
/// Timer fires handled, by kind and outcome.
pub const TIMERS: &str = "updraft_dispatcher_timers_total";
/// Sweep actions, by action.
pub const SWEEP: &str = "updraft_dispatcher_sweep_actions_total";
/// Backlog flag keys written or deleted (one per partition, kind of node and draw bucket).
pub const FLAG_WRITES: &str = "updraft_dispatcher_flag_writes_total";
/// Standing flags held after the last sweep (`placement::standing`).
pub const STANDING_FLAGS: &str = "updraft_dispatcher_standing_flags";
/// Deletes requested.
pub const DELETES: &str = "updraft_dispatcher_deletes_total";
/// Queued requests per class.
pub const QUEUE_DEPTH: &str = "updraft_dispatcher_queue_depth";
/// Age of the oldest queued request per class.
pub const QUEUE_OLDEST: &str = "updraft_dispatcher_queue_oldest_seconds";
/// Open requests by state.
pub const OPEN: &str = "updraft_dispatcher_open_requests";
/// Nodes by advertised state.
pub const NODES: &str = "updraft_dispatcher_nodes";
/// Unallocated capacity across all nodes, by resource.
pub const CLUSTER_UNALLOCATED: &str = "updraft_dispatcher_cluster_unallocated";
/// Values refused as malformed or hostile, by kind.
pub const HOSTILE: &str = "updraft_dispatcher_hostile_total";
/// API calls by front end, endpoint and status.
pub const API: &str = "updraft_dispatcher_api_requests_total";

/// Every metric name.
pub const ALL: &[&str] = &[
    REQUESTS,
    HINTS,
    TO_CLAIM,
    TO_ACTIVE,
    ATTEMPTS,
    OUTCOMES,
    REAPED,
    TIMERS,
    SWEEP,
    FLAG_WRITES,
    STANDING_FLAGS,
    DELETES,
    QUEUE_DEPTH,
    QUEUE_OLDEST,
    OPEN,
    NODES,
    CLUSTER_UNALLOCATED,
    HOSTILE,
    API,
];

/// Registers help text.
pub fn describe() {
    describe_counter!(REQUESTS, "Create calls by outcome");
    describe_counter!(HINTS, "Hints published, by lane and outcome");
    describe_histogram!(TO_CLAIM, Unit::Seconds, "Queue to claimed");
    describe_histogram!(TO_ACTIVE, Unit::Seconds, "Queue to active");
    describe_histogram!(ATTEMPTS, "Attempts a request needed to become active");
    describe_counter!(OUTCOMES, "Requests reaching an end state, by state");
    describe_counter!(REAPED, "Claims reaped from dead or restarted nodes");
    describe_counter!(TIMERS, "Timer fires handled, by kind and outcome");
    describe_counter!(SWEEP, "Sweep actions, by action");
    describe_counter!(
        FLAG_WRITES,
        "Backlog flag keys written or deleted (one per partition, kind of node and draw bucket)"
    );
    describe_gauge!(
        STANDING_FLAGS,
        "Standing flags held after the last sweep (classes the nodes in use have little room for)"
    );
    describe_counter!(DELETES, "Deletes requested");
    describe_gauge!(QUEUE_DEPTH, "Queued requests per class");
    describe_gauge!(
        QUEUE_OLDEST,
        Unit::Seconds,
        "Age of the oldest queued request per class"
    );
    describe_gauge!(OPEN, "Open requests by state");
    describe_gauge!(NODES, "Nodes by advertised state");
    describe_gauge!(
        CLUSTER_UNALLOCATED,
        "Unallocated capacity across nodes, by resource"
    );
    describe_counter!(HOSTILE, "Malformed or hostile values refused, by kind");
    describe_counter!(API, "API calls by front end, endpoint and status");
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_metric_is_used() {
        let dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/src"));
        let mut text = String::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "rs") && !p.ends_with("metrics.rs") {
                text.push_str(&std::fs::read_to_string(&p).unwrap());
            }
        }
        for line in include_str!("metrics.rs").lines() {
            if let Some(name) = line
                .strip_prefix("pub const ")
                .and_then(|r| r.split(':').next())
                && name != "ALL"
            {
                assert!(
                    text.contains(&format!("m::{name}")),
                    "metric {name} is declared but never used"
                );
            }
        }
    }
}
