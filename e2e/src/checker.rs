//! The invariant checker of DESIGN.md. It trusts the drivers' own logs of what was built and
//! destroyed (not KV), plus the records, and reports every violation it finds:
//!
//! 1. At most one placement: for each request, domains on two nodes may overlap only for a
//!    bounded time (a fenced zombie's duplicate lives at most lease TTL + one renewal), and at
//!    the end exactly the node the record names holds a live domain of an active request.
//! 2. Nothing lost: every request is active, failed with a reason, deleted, host_down, or
//!    visibly pending with a reason.
//! 3. No overcommit: replaying each node's log, live domains never exceed its capacity.

use std::collections::BTreeMap;
use std::path::PathBuf;

use node_agent::driver::{BuildLog, LogEvent};
use placement::Resources;
use placement::lifecycle::{RequestRecord, State};

/// One node's log and capacity.
#[derive(Debug, Clone)]
pub struct NodeLog {
    /// Node id.
    pub node: String,
    /// Its driver log.
    pub log: PathBuf,
    /// Its schedulable capacity.
    pub capacity: Resources,
}

/// What the checker found.
#[derive(Debug, Default, Clone)]
pub struct Report {
    /// Requests seen.
    pub requests: usize,
    /// By final state.
    pub states: BTreeMap<String, usize>,
    /// Domains built (from logs).
    pub builds: usize,
    /// Requests that had domains on two nodes at once.
    pub duplicates: usize,
    /// Longest overlap of two domains of one request, ms.
    pub longest_overlap_ms: u64,
    /// Instants a node held more than its capacity.
    pub overcommits: usize,
    /// Every violation, in words.
    pub violations: Vec<String>,
}

impl Report {
    /// True when no invariant was broken.
    pub fn clean(&self) -> bool {
        self.violations.is_empty()
    }
}

#[derive(Debug, Clone)]
struct Life {
    node: String,
    from: u64,
    to: Option<u64>,
}

/// Checks the invariants; `deaths` are (node, ms) at which a node's process died (its
/// in-memory domains went with it); `dup_bound_ms` is how long two domains of one request may
/// overlap.
pub fn check(
    nodes: &[NodeLog],
    records: &[RequestRecord],
    deaths: &[(String, u64)],
    dup_bound_ms: u64,
) -> Report {
    let mut r = Report {
        requests: records.len(),
        ..Default::default()
    };
    let mut lives: BTreeMap<String, Vec<Life>> = BTreeMap::new();
    for n in nodes {
        let entries = BuildLog::read(&n.log).unwrap_or_default();
        let mut death_times: Vec<u64> = deaths
            .iter()
            .filter(|(d, _)| d == &n.node)
            .map(|(_, t)| *t)
            .collect();
        death_times.sort_unstable();
        let mut open: BTreeMap<String, (u64, Resources)> = BTreeMap::new();
        let mut load = Resources::default();
        let mut events: Vec<(u64, bool, String, Resources)> = Vec::new();
        for e in &entries {
            // a death closes everything opened before it
            while let Some(&d) = death_times.first() {
                if d > e.at_ms {
                    break;
                }
                for (req, (from, res)) in std::mem::take(&mut open) {
                    lives.entry(req.clone()).or_default().push(Life {
                        node: n.node.clone(),
                        from,
                        to: Some(d),
                    });
                    events.push((d, false, req, res));
                }
                load = Resources::default();
                death_times.remove(0);
            }
            match e.event {
                LogEvent::Created => {
                    r.builds += 1;
                    let res = e.resources.clone().unwrap_or_default();
                    load = load.checked_add(&res).unwrap_or(load);
                    if !res.fits(&n.capacity) || !load.fits(&n.capacity) {
                        r.overcommits += 1;
                        r.violations.push(format!(
                            "node {} over capacity at {} ms building {}: {} > {}",
                            n.node, e.at_ms, e.request, load, n.capacity
                        ));
                    }
                    open.insert(e.request.clone(), (e.at_ms, res));
                }
                LogEvent::Destroyed => {
                    if let Some((from, res)) = open.remove(&e.request) {
                        load = load.saturating_sub(&res);
                        lives.entry(e.request.clone()).or_default().push(Life {
                            node: n.node.clone(),
                            from,
                            to: Some(e.at_ms),
                        });
                    }
                }
            }
            events.push((
                e.at_ms,
                matches!(e.event, LogEvent::Created),
                e.request.clone(),
                Resources::default(),
            ));
        }
        let end_death = death_times.first().copied();
        for (req, (from, _)) in open {
            lives.entry(req).or_default().push(Life {
                node: n.node.clone(),
                from,
                to: end_death,
            });
        }
    }
    for rec in records {
        let id = rec.spec.id.as_str();
        *r.states.entry(rec.state.as_str().to_string()).or_insert(0) += 1;
        let ls = lives.get(id).cloned().unwrap_or_default();
        // overlaps between nodes
        for (i, a) in ls.iter().enumerate() {
            for b in &ls[i + 1..] {
                if a.node == b.node {
                    continue;
                }
                let end_a = a.to.unwrap_or(u64::MAX);
                let end_b = b.to.unwrap_or(u64::MAX);
                let start = a.from.max(b.from);
                let end = end_a.min(end_b);
                if start < end {
                    let overlap = end.saturating_sub(start);
                    r.duplicates += 1;
                    r.longest_overlap_ms = r.longest_overlap_ms.max(overlap.min(u64::MAX / 2));
                    if overlap > dup_bound_ms {
                        let how = if end == u64::MAX {
                            "still both alive".to_string()
                        } else {
                            format!("{overlap} ms")
                        };
                        r.violations.push(format!(
                            "request {id}: domains on {} and {} at once ({how})",
                            a.node, b.node
                        ));
                    }
                }
            }
        }
        let alive: Vec<&Life> = ls.iter().filter(|l| l.to.is_none()).collect();
        match rec.state {
            State::Active => {
                let holder = rec.node().map(|n| n.to_string()).unwrap_or_default();
                if !alive.iter().any(|l| l.node == holder) {
                    r.violations.push(format!(
                        "request {id} is active on {holder} but no live domain there"
                    ));
                }
                if alive.iter().any(|l| l.node != holder) {
                    r.violations.push(format!(
                        "request {id} is active on {holder} but another node still runs it"
                    ));
                }
            }
            State::Failed | State::Deleted => {
                if !alive.is_empty() {
                    r.violations.push(format!(
                        "request {id} is {} but a domain still runs on {}",
                        rec.state, alive[0].node
                    ));
                }
                if rec.state == State::Failed && rec.reason.as_deref().unwrap_or("").is_empty() {
                    r.violations
                        .push(format!("request {id} failed without a reason"));
                }
            }
            State::Queued if rec.reason.is_none() && !rec.history.is_empty() => {
                // re-queued requests carry the reason of their last release
                r.violations
                    .push(format!("request {id} is pending without a reason"));
            }
            _ => {}
        }
    }
    r
}
