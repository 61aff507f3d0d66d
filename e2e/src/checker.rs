//! The invariant checker of DESIGN.md. It trusts the drivers' own logs of what was built and
//! destroyed (not KV), plus the records, and reports every violation it finds:
//!
//! 1. At most one placement: for each request, domains on two nodes may overlap only for a
//!    bounded time while both nodes can act (a fenced zombie's duplicate lives at most lease
//!    TTL + one renewal once it runs again), and at the end exactly the node the record names
//!    holds a live domain of an active request.
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

/// Facts about the run the logs cannot tell.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// (node, ms) at which a node's process died: its in-memory domains went with it.
    pub deaths: Vec<(String, u64)>,
    /// (node, from ms, to ms) during which a node was frozen (SIGSTOP): it could not act, so
    /// overlap during the freeze does not count against the duplicate bound.
    pub pauses: Vec<(String, u64, u64)>,
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
    /// Longest overlap of two domains of one request while both nodes could act, ms.
    pub longest_overlap_ms: u64,
    /// Instants a node held more than its capacity.
    pub overcommits: usize,
    /// Every violation, in words.
    pub violations: Vec<String>,
    /// Requests with live domains on two nodes that have overlapped for less than the bound
    /// so far: not a violation yet, the duplicate may still be on its way out (a fenced
    /// node's build destroys its copy when it next reads the record). Check again later.
    pub unsettled: Vec<String>,
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

fn paused_ms(pauses: &[(String, u64, u64)], nodes: [&str; 2], start: u64, end: u64) -> u64 {
    pauses
        .iter()
        .filter(|(n, _, _)| nodes.contains(&n.as_str()))
        .map(|(_, a, b)| (*b).min(end).saturating_sub((*a).max(start)))
        .sum()
}

/// Replays one node's log: the life of each domain, and overcommit instants.
fn replay(n: &NodeLog, faults: &Faults, lives: &mut BTreeMap<String, Vec<Life>>, r: &mut Report) {
    let entries = BuildLog::read(&n.log).unwrap_or_default();
    let mut deaths: Vec<u64> = faults
        .deaths
        .iter()
        .filter(|(d, _)| d == &n.node)
        .map(|(_, t)| *t)
        .collect();
    deaths.sort_unstable();
    let mut open: BTreeMap<String, (u64, Resources)> = BTreeMap::new();
    let mut load = Resources::default();
    for e in &entries {
        // a death closes everything opened before it
        while let Some(&d) = deaths.first().filter(|d| **d <= e.at_ms) {
            for (req, (from, _)) in std::mem::take(&mut open) {
                lives.entry(req).or_default().push(Life {
                    node: n.node.clone(),
                    from,
                    to: Some(d),
                });
            }
            load = Resources::default();
            deaths.remove(0);
        }
        match e.event {
            LogEvent::Created => {
                r.builds += 1;
                let res = e.resources.clone().unwrap_or_default();
                load = load.checked_add(&res).unwrap_or(load);
                if !load.fits(&n.capacity) {
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
    }
    let end = deaths.first().copied();
    for (req, (from, _)) in open {
        lives.entry(req).or_default().push(Life {
            node: n.node.clone(),
            from,
            to: end,
        });
    }
}

/// Checks the invariants; `dup_bound_ms` is how long two domains of one request may overlap
/// while both nodes can act.
pub fn check(
    nodes: &[NodeLog],
    records: &[RequestRecord],
    faults: &Faults,
    dup_bound_ms: u64,
) -> Report {
    let mut r = Report {
        requests: records.len(),
        ..Default::default()
    };
    let mut lives: BTreeMap<String, Vec<Life>> = BTreeMap::new();
    for n in nodes {
        replay(n, faults, &mut lives, &mut r);
    }
    let now = common::clock::now().as_millis();
    for rec in records {
        let id = rec.spec.id.as_str();
        *r.states.entry(rec.state.as_str().to_string()).or_insert(0) += 1;
        let ls = lives.get(id).cloned().unwrap_or_default();
        for (i, a) in ls.iter().enumerate() {
            for b in ls[i + 1..].iter().filter(|b| b.node != a.node) {
                let start = a.from.max(b.from);
                let still = a.to.is_none() && b.to.is_none();
                let end = a.to.unwrap_or(now).min(b.to.unwrap_or(now));
                if start >= end && !still {
                    continue;
                }
                r.duplicates += 1;
                let overlap = end.saturating_sub(start).saturating_sub(paused_ms(
                    &faults.pauses,
                    [&a.node, &b.node],
                    start,
                    end,
                ));
                r.longest_overlap_ms = r.longest_overlap_ms.max(overlap);
                if still && overlap <= dup_bound_ms {
                    r.unsettled.push(format!(
                        "request {id}: domains on {} and {} are both alive ({overlap} ms so far)",
                        a.node, b.node
                    ));
                } else if still {
                    r.violations.push(format!(
                        "request {id}: domains on {} and {} are both still alive after {overlap} ms (bound {dup_bound_ms})",
                        a.node, b.node
                    ));
                } else if overlap > dup_bound_ms {
                    r.violations.push(format!("request {id}: domains on {} and {} overlapped {overlap} ms (bound {dup_bound_ms})", a.node, b.node));
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
            }
            State::Failed | State::Deleted => {
                if let Some(l) = alive.first() {
                    r.violations.push(format!(
                        "request {id} is {} but a domain still runs on {}",
                        rec.state, l.node
                    ));
                }
                if rec.state == State::Failed && rec.reason.as_deref().unwrap_or("").is_empty() {
                    r.violations
                        .push(format!("request {id} failed without a reason"));
                }
            }
            State::Queued if rec.attempt > 1 && rec.reason.is_none() => {
                r.violations
                    .push(format!("request {id} was re-queued without a reason"));
            }
            _ => {}
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use node_agent::driver::LogEntry;

    fn entry(at: u64, node: &str, req: &str, ev: LogEvent, mem: u64) -> LogEntry {
        LogEntry {
            at_ms: at,
            node: node.into(),
            request: req.into(),
            event: ev,
            token: None,
            resources: Some(Resources::new(1, mem, 0)),
        }
    }

    fn write(dir: &std::path::Path, node: &str, es: &[LogEntry]) -> NodeLog {
        let log = BuildLog::new(dir.join(format!("{node}.jsonl")));
        for e in es {
            log.append(e);
        }
        NodeLog {
            node: node.into(),
            log: log.path().to_path_buf(),
            capacity: Resources::new(4, 1000, 0),
        }
    }

    /// A queued record of `id` (one resource unit of memory 10).
    fn queued(id: &str) -> RequestRecord {
        let zone = placement::Zone::new("az1").unwrap();
        let map = placement::shard::default_shard_map(zone.clone());
        let spec = placement::request::RequestSpec::plain(
            placement::RequestId::new(id).unwrap(),
            Resources::new(1, 10, 0),
            zone,
            60,
        );
        let shard = map.route(&spec.routable()).unwrap();
        RequestRecord::new_queued(spec, shard, placement::Timestamp(0))
    }

    #[test]
    fn finds_overcommit_and_lasting_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let a = write(
            dir.path(),
            "a",
            &[
                entry(10, "a", "r1", LogEvent::Created, 600),
                entry(20, "a", "r2", LogEvent::Created, 600),
            ],
        );
        let b = write(
            dir.path(),
            "b",
            &[entry(15, "b", "r1", LogEvent::Created, 100)],
        );
        let rep = check(&[a, b], &[], &Faults::default(), 1000);
        assert_eq!(rep.overcommits, 1);
        assert_eq!(rep.builds, 3);
        assert!(rep.violations.iter().any(|v| v.contains("over capacity")));
    }

    #[test]
    fn pauses_and_deaths_are_accounted() {
        let dir = tempfile::tempdir().unwrap();
        let a = write(
            dir.path(),
            "a",
            &[
                entry(0, "a", "r1", LogEvent::Created, 10),
                entry(10_000, "a", "r1", LogEvent::Destroyed, 0),
            ],
        );
        let b = write(
            dir.path(),
            "b",
            &[entry(1_000, "b", "r1", LogEvent::Created, 10)],
        );
        // 9 s of overlap, 8 of them while a was frozen: within a 2 s bound
        let faults = Faults {
            deaths: vec![],
            pauses: vec![("a".into(), 1_500, 9_500)],
        };
        let rep = check(&[a.clone(), b.clone()], &[], &faults, 2_000);
        assert_eq!(
            rep.duplicates, 0,
            "no record given: overlaps are only judged per record"
        );
        let rec = queued("r1");
        let rep = check(
            &[a.clone(), b.clone()],
            std::slice::from_ref(&rec),
            &faults,
            2_000,
        );
        assert_eq!(rep.duplicates, 1);
        assert!(rep.clean(), "{:?}", rep.violations);
        let rep = check(
            &[a.clone(), b.clone()],
            std::slice::from_ref(&rec),
            &Faults::default(),
            2_000,
        );
        assert!(!rep.clean(), "without the freeze the overlap is too long");
        // b died at 5 s: its domain ended there
        let faults = Faults {
            deaths: vec![("b".into(), 1_200)],
            pauses: vec![],
        };
        let rep = check(&[a, b], &[rec], &faults, 2_000);
        assert!(rep.clean(), "{:?}", rep.violations);
    }

    #[test]
    fn two_live_domains_are_unsettled_within_the_bound_and_a_violation_after() {
        let dir = tempfile::tempdir().unwrap();
        let now = common::clock::now().as_millis();
        let a = write(
            dir.path(),
            "a",
            &[entry(now - 1_000, "a", "r1", LogEvent::Created, 10)],
        );
        let b = write(
            dir.path(),
            "b",
            &[entry(now - 500, "b", "r1", LogEvent::Created, 10)],
        );
        let rec = queued("r1");
        let rep = check(
            &[a.clone(), b.clone()],
            std::slice::from_ref(&rec),
            &Faults::default(),
            60_000,
        );
        assert!(rep.clean(), "{:?}", rep.violations);
        assert_eq!(rep.unsettled.len(), 1, "{rep:?}");
        assert_eq!(rep.duplicates, 1);
        let rep = check(&[a, b], &[rec], &Faults::default(), 100);
        assert!(rep.unsettled.is_empty());
        assert!(
            rep.violations[0].contains("both still alive after"),
            "{:?}",
            rep.violations
        );
    }
}
