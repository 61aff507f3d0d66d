//! Metric names (Prometheus, `updraft_agent_*`) and their help text. docs/metrics.md lists
//! them; a test checks every one is used.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

/// Pulls issued, by lane.
pub const PULLS_ISSUED: &str = "updraft_agent_pulls_issued_total";
/// Pulls that ended without a message, by why (expired, refused, lost).
pub const PULLS_ENDED: &str = "updraft_agent_pulls_ended_total";
/// Pulls outstanding now.
pub const PULLS_OUTSTANDING: &str = "updraft_agent_pulls_outstanding";
/// Deliveries handled, by outcome (claimed, handed_back, passed_on, stale, lost_race, error).
pub const DELIVERIES: &str = "updraft_agent_deliveries_total";
/// Requests this node would not take, by reason.
pub const REJECTIONS: &str = "updraft_agent_rejections_total";
/// Claims lost to another node's compare-and-swap.
pub const CLAIM_CONFLICTS: &str = "updraft_agent_claim_conflicts_total";
/// Claims tried on the record copy a hint carries, by outcome (used: the swap on its
/// revision decided; moved_on: the record had changed, the claim read it and started over;
/// declined: the copy led to no claim, and the delivery was decided on a read record).
pub const CLAIM_COPIES: &str = "updraft_agent_claim_copies_total";
/// Credited pulls cancelled to make room for a request a cover pull brought.
pub const COVER_CANCELS: &str = "updraft_agent_cover_cancels_total";
/// Time from a hint's delivery to a won claim.
pub const CLAIM_DURATION: &str = "updraft_agent_claim_duration_seconds";
/// Builds, by outcome (active, failed, superseded).
pub const BUILDS: &str = "updraft_agent_builds_total";
/// Time a build took in the driver.
pub const BUILD_DURATION: &str = "updraft_agent_build_duration_seconds";
/// Lease renewals, by outcome (ok, conflict, error).
pub const LEASE_RENEWALS: &str = "updraft_agent_lease_renewals_total";
/// Self-fences.
pub const FENCES: &str = "updraft_agent_fences_total";
/// Domains destroyed while re-confirming claims after a fence.
pub const FENCE_DESTROYS: &str = "updraft_agent_fence_destroys_total";
/// Messages refused as malformed or hostile, by kind.
pub const HOSTILE: &str = "updraft_agent_hostile_messages_total";
/// Reconcile actions, by action (adopted, vanished, destroyed_orphan, foreign).
pub const RECONCILE: &str = "updraft_agent_reconcile_actions_total";
/// Deletes carried out.
pub const DELETES: &str = "updraft_agent_deletes_total";
/// Spare (unallocated) capacity, by resource.
pub const SPARE: &str = "updraft_agent_spare";
/// Schedulable capacity, by resource.
pub const CAPACITY: &str = "updraft_agent_capacity";
/// VMs held.
pub const VMS: &str = "updraft_agent_vms";
/// Builds in flight.
pub const IN_FLIGHT: &str = "updraft_agent_builds_in_flight";

/// Every metric name, for the usage test.
pub const ALL: &[&str] = &[
    PULLS_ISSUED,
    PULLS_ENDED,
    PULLS_OUTSTANDING,
    DELIVERIES,
    REJECTIONS,
    CLAIM_CONFLICTS,
    CLAIM_COPIES,
    COVER_CANCELS,
    CLAIM_DURATION,
    BUILDS,
    BUILD_DURATION,
    LEASE_RENEWALS,
    FENCES,
    FENCE_DESTROYS,
    HOSTILE,
    RECONCILE,
    DELETES,
    SPARE,
    CAPACITY,
    VMS,
    IN_FLIGHT,
];

/// Registers help text (call once after installing a recorder).
pub fn describe() {
    describe_counter!(PULLS_ISSUED, "Pulls issued, by lane");
    describe_counter!(PULLS_ENDED, "Pulls that ended without a message, by why");
    describe_gauge!(PULLS_OUTSTANDING, "Pulls outstanding now");
    describe_counter!(DELIVERIES, "Hints delivered, by outcome");
    describe_counter!(REJECTIONS, "Requests this node would not take, by reason");
    describe_counter!(
        CLAIM_CONFLICTS,
        "Claims lost to another node's compare-and-swap"
    );
    describe_counter!(
        CLAIM_COPIES,
        "Claims tried on a hint's record copy, by outcome (used, moved_on, declined)"
    );
    describe_counter!(
        COVER_CANCELS,
        "Credited pulls cancelled to make room for what a cover pull brought"
    );
    describe_histogram!(CLAIM_DURATION, Unit::Seconds, "Delivery to won claim");
    describe_counter!(BUILDS, "Builds, by outcome");
    describe_histogram!(BUILD_DURATION, Unit::Seconds, "Driver build time");
    describe_counter!(LEASE_RENEWALS, "Lease renewals, by outcome");
    describe_counter!(FENCES, "Self-fences after a lost lease");
    describe_counter!(
        FENCE_DESTROYS,
        "Domains destroyed because their claim could not be re-confirmed"
    );
    describe_counter!(HOSTILE, "Malformed or hostile messages refused, by kind");
    describe_counter!(RECONCILE, "Reconcile actions, by action");
    describe_counter!(DELETES, "Deletes carried out");
    describe_gauge!(SPARE, "Unallocated capacity, by resource");
    describe_gauge!(CAPACITY, "Schedulable capacity, by resource");
    describe_gauge!(VMS, "VMs held by this node");
    describe_gauge!(IN_FLIGHT, "Builds in flight");
}

#[cfg(test)]
mod tests {
    /// Every declared metric is used somewhere in the crate (firecracker's unused-metric test).
    #[test]
    fn every_metric_is_used() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src");
        let mut text = String::new();
        for entry in walk(std::path::Path::new(dir)) {
            if !entry.ends_with("metrics.rs") {
                text.push_str(&std::fs::read_to_string(&entry).unwrap());
            }
        }
        let consts: Vec<&str> = include_str!("metrics.rs")
            .lines()
            .filter_map(|l| {
                l.strip_prefix("pub const ")
                    .and_then(|r| r.split(':').next())
            })
            .filter(|n| *n != "ALL")
            .collect();
        assert!(!consts.is_empty());
        for c in consts {
            assert!(
                text.contains(&format!("metrics::{c}")) || text.contains(&format!("m::{c}")),
                "metric {c} is declared but never used"
            );
        }
    }

    fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
        out
    }
}
