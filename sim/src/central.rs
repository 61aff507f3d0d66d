//! Central baselines: one scheduler sees every node and decides. Requests that fit nowhere
//! wait in a FIFO and are retried (with backfill) whenever capacity frees, until their
//! deadline; so acceptance is compared on equal terms with updraft's queues.
//!
//! The scheduler is one server: it decides one request after another, each decision costing
//! [`DecisionCost::per_node_us`] for every node it examines, and a placement reaches its node
//! through one write ([`DecisionCost::commit`], the same compare-and-swap latency the updraft
//! model's claims pay). A request's wait is its time in the scheduler's queue, the decision
//! and the commit; a request whose decision would start past its deadline fails. (The
//! scheduler keeps its own clock in microseconds; a decision takes effect in the ledgers at
//! the event that made it, ahead of its place in the scheduler's queue by that queue's
//! length: exact for the waits, close for the fleet while the queue is short.)

use std::collections::{BTreeSet, VecDeque};

use placement::ledger::NodeLedger;
use placement::{RequestId, Resources};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::cluster::NodeSpec;
use crate::events::EventQueue;
use crate::stats::{FleetTally, Recorder, Report, Sample};
use crate::updraft::Latency;
use crate::workload::{Arrival, Workload, WorkloadError};
use crate::{Millis, PolicyKind};

/// What one central decision costs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecisionCost {
    /// Time per node examined, µs.
    pub per_node_us: f64,
    /// The write that hands a placement to its node.
    pub commit: Latency,
}

/// Nova's FilterScheduler per host examined: 133 ms per decision at 1,000 hosts, measured on
/// the project's build machine (13 ms at 100 hosts, about 2 s at 10,000).
pub const NOVA_US_PER_HOST: f64 = 133.0;
/// This simulator's own scans per node examined (24–34 ns, BENCHMARKS.md), for the central
/// policies written as tight loops over in-memory ledgers.
pub const SCAN_US_PER_NODE: f64 = 0.03;

impl DecisionCost {
    /// The cost of `kind`'s decisions: Nova's measured per-host time for the Nova-like
    /// policy, an in-memory scan's for the others; the commit is a compare-and-swap on one
    /// nats-server, as in the updraft model.
    pub fn of(kind: PolicyKind) -> DecisionCost {
        DecisionCost {
            per_node_us: if kind == PolicyKind::Nova {
                NOVA_US_PER_HOST
            } else {
                SCAN_US_PER_NODE
            },
            commit: crate::updraft::CAS_LATENCY,
        }
    }
}

/// Settings shared by the central runs.
#[derive(Debug, Clone)]
pub struct CentralConfig {
    /// How long a request may wait for room.
    pub deadline: Millis,
    /// Time between samples of the time series.
    pub sample_every: Millis,
    /// Most waiting requests retried per freed capacity.
    pub retry_batch: usize,
    /// Seed (power of two choices).
    pub seed: u64,
    /// The shard map whose size classes group the per-class waits.
    pub map: placement::ShardMap,
    /// What a decision costs.
    pub cost: DecisionCost,
}

#[derive(Debug)]
enum Ev {
    Arrive,
    Depart { node: u32, seq: u64 },
    Sample,
}

/// The fleet with its ledgers and, for the indexed best-fit, an ordered index of free space.
struct Fleet {
    nodes: Vec<NodeSpec>,
    ledgers: Vec<NodeLedger>,
    vms: Vec<u32>,
    in_use: usize,
    /// (free memory, free vCPUs, node), for best-fit-indexed.
    index: Option<BTreeSet<(u64, u32, u32)>>,
    /// Utilization sums, for samples that cost the same at any fleet size.
    tally: FleetTally,
}

impl Fleet {
    fn key(i: usize, free: &Resources) -> (u64, u32, u32) {
        (
            free.memory_mib,
            free.vcpus,
            u32::try_from(i).unwrap_or(u32::MAX),
        )
    }

    /// Node `i`'s unallocated share changed from `before`: moves it in the tally and, for
    /// best-fit-indexed, in the index.
    fn changed(&mut self, i: usize, before: &Resources) {
        let after = self.ledgers[i].unallocated();
        let cap = self.ledgers[i].capacity();
        self.tally.remove(cap, before);
        self.tally.add(cap, &after);
        if let Some(ix) = self.index.as_mut() {
            ix.remove(&Self::key(i, before));
            ix.insert(Self::key(i, &after));
        }
    }

    fn reserve(&mut self, i: usize, rid: &RequestId, res: &Resources) -> bool {
        let before = self.ledgers[i].unallocated();
        if self.ledgers[i].reserve(rid, res, None).is_err() {
            return false;
        }
        self.changed(i, &before);
        if self.vms[i] == 0 {
            self.in_use += 1;
        }
        self.vms[i] += 1;
        true
    }

    fn release(&mut self, i: usize, rid: &RequestId) {
        let before = self.ledgers[i].unallocated();
        if self.ledgers[i].release(rid).is_none() {
            return;
        }
        self.changed(i, &before);
        self.vms[i] -= 1;
        if self.vms[i] == 0 {
            self.in_use -= 1;
        }
    }
}

/// Leftover after placing `res` on a node with `free` of `cap`, summed over vCPU and memory
/// as shares of capacity (smaller = tighter fit).
#[allow(clippy::cast_precision_loss)]
fn leftover(cap: &Resources, free: &Resources, res: &Resources) -> f64 {
    let c = f64::from(free.vcpus.saturating_sub(res.vcpus)) / f64::from(cap.vcpus.max(1));
    let m = free.memory_mib.saturating_sub(res.memory_mib) as f64 / cap.memory_mib.max(1) as f64;
    c + m
}

/// Picks a node for `res`; returns it and the number of nodes examined.
fn choose(
    kind: PolicyKind,
    fleet: &Fleet,
    res: &Resources,
    rng: &mut ChaCha8Rng,
) -> (Option<usize>, u64) {
    let n = fleet.nodes.len();
    let fits = |i: usize| res.fits(&fleet.ledgers[i].unallocated());
    match kind {
        PolicyKind::FirstFit => {
            for i in 0..n {
                if fits(i) {
                    return (Some(i), i as u64 + 1);
                }
            }
            (None, n as u64)
        }
        PolicyKind::BestFit | PolicyKind::WorstFit | PolicyKind::Nova => {
            let mut best: Option<(f64, usize)> = None;
            for i in 0..n {
                let free = fleet.ledgers[i].unallocated();
                if !res.fits(&free) {
                    continue;
                }
                let cap = fleet.ledgers[i].capacity();
                #[allow(clippy::cast_precision_loss)]
                let score = match kind {
                    PolicyKind::BestFit => leftover(cap, &free, res),
                    PolicyKind::WorstFit => -leftover(cap, &free, res),
                    // Nova's RAM weigher with the default multiplier: most free RAM first
                    _ => -((free.memory_mib - res.memory_mib) as f64),
                };
                if best.is_none_or(|(b, _)| score < b) {
                    best = Some((score, i));
                }
            }
            (best.map(|b| b.1), n as u64)
        }
        PolicyKind::BestFitIndexed => {
            let Some(ix) = fleet.index.as_ref() else {
                return (None, 0);
            };
            let mut examined = 0;
            for &(_, _, node) in ix.range((res.memory_mib, 0, 0)..) {
                examined += 1;
                let i = node as usize;
                if fits(i) {
                    return (Some(i), examined);
                }
            }
            (None, examined)
        }
        PolicyKind::PowerOfTwo => {
            // up to 4 rounds of two probes; the tighter fit of a round wins
            let mut probes = 0;
            for _ in 0..4 {
                let a = rng.random_range(0..n);
                let b = rng.random_range(0..n);
                probes += 2;
                let pick = [a, b].into_iter().filter(|i| fits(*i)).min_by(|x, y| {
                    let s = |i: usize| {
                        leftover(
                            fleet.ledgers[i].capacity(),
                            &fleet.ledgers[i].unallocated(),
                            res,
                        )
                    };
                    s(*x).total_cmp(&s(*y))
                });
                if pick.is_some() {
                    return (pick, probes);
                }
            }
            (None, probes)
        }
        PolicyKind::Updraft | PolicyKind::UpdraftSpread => (None, 0),
    }
}

fn rid(seq: u64) -> RequestId {
    RequestId::new(format!("r{seq}")).expect("generated request ids are valid")
}

/// What became of one request the scheduler took up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decided {
    /// Placed on a node.
    Placed,
    /// No node has room now: it waits for departures.
    NoRoom,
    /// Its deadline passed before the scheduler got to it.
    Expired,
}

/// The one scheduler: its clock (when it is next free, µs) and the draws of its commits.
struct Scheduler {
    free_at_us: u64,
    rng: ChaCha8Rng,
}

/// Runs central policy `kind` over `workload` on `nodes`.
pub fn run(
    kind: PolicyKind,
    nodes: Vec<NodeSpec>,
    mut workload: Workload,
    cfg: &CentralConfig,
) -> Result<Report, WorkloadError> {
    #[allow(clippy::disallowed_types)] // the simulator's own wall time, not simulated time
    let wall = std::time::Instant::now();
    let ledgers: Vec<NodeLedger> = nodes.iter().map(NodeSpec::ledger).collect();
    let count = nodes.len();
    let mut fleet = Fleet {
        vms: vec![0; count],
        ledgers,
        nodes,
        in_use: 0,
        index: None,
        tally: FleetTally::default(),
    };
    for l in &fleet.ledgers {
        fleet.tally.add(l.capacity(), &l.unallocated());
    }
    if kind == PolicyKind::BestFitIndexed {
        fleet.index = Some(
            (0..count)
                .map(|i| Fleet::key(i, &fleet.ledgers[i].unallocated()))
                .collect(),
        );
    }
    let largest = fleet
        .ledgers
        .iter()
        .map(|l| l.capacity().clone())
        .fold(Resources::default(), |a, c| a.max(&c));
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut rec = Recorder::default();
    let mut q: EventQueue<Ev> = EventQueue::default();
    let mut pending: VecDeque<Arrival> = VecDeque::new();
    let mut next: Option<Arrival> = workload.next().transpose()?;
    if let Some(a) = &next {
        q.push(a.at, Ev::Arrive);
    }
    q.push(0, Ev::Sample);
    let mut now = 0;
    let mut live = 0usize;
    let mut sched = Scheduler {
        free_at_us: 0,
        rng: ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x5c4e_d01e),
    };
    let deadline_us = cfg.deadline.saturating_mul(1000);
    let place = |fleet: &mut Fleet,
                 a: &Arrival,
                 now: Millis,
                 rec: &mut Recorder,
                 q: &mut EventQueue<Ev>,
                 rng: &mut ChaCha8Rng,
                 sched: &mut Scheduler|
     -> Decided {
        let arrived_us = a.at.saturating_mul(1000);
        let start = now.saturating_mul(1000).max(sched.free_at_us);
        if start.saturating_sub(arrived_us) > deadline_us {
            return Decided::Expired;
        }
        rec.decisions += 1;
        let (pick, examined) = choose(kind, fleet, &a.resources, rng);
        rec.work += examined;
        #[allow(
            clippy::cast_precision_loss,
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss
        )] // microseconds of a decision
        let took = (examined as f64 * cfg.cost.per_node_us).ceil().max(1.0) as u64;
        sched.free_at_us = start + took;
        let Some(i) = pick else {
            return Decided::NoRoom;
        };
        if !fleet.reserve(i, &rid(a.seq), &a.resources) {
            return Decided::NoRoom;
        }
        let decided_ms = (sched.free_at_us - arrived_us).div_ceil(1000);
        rec.placed(
            crate::updraft::size_class(&cfg.map, &a.resources),
            decided_ms + cfg.cost.commit.draw(&mut sched.rng),
        );
        rec.hosts(now, fleet.in_use);
        let node = u32::try_from(i).unwrap_or(u32::MAX);
        q.push(now + a.lifetime, Ev::Depart { node, seq: a.seq });
        Decided::Placed
    };
    while let Some((t, ev)) = q.pop() {
        now = t;
        match ev {
            Ev::Arrive => {
                let Some(a) = next.take() else { continue };
                rec.arrived += 1;
                if !a.resources.fits(&largest) {
                    rec.failed += 1;
                } else {
                    match place(&mut fleet, &a, now, &mut rec, &mut q, &mut rng, &mut sched) {
                        Decided::Placed => live += 1,
                        Decided::NoRoom => pending.push_back(a),
                        Decided::Expired => rec.failed += 1,
                    }
                }
                next = workload.next().transpose()?;
                if let Some(n) = &next {
                    q.push(n.at.max(now), Ev::Arrive);
                }
            }
            Ev::Depart { node, seq } => {
                fleet.release(node as usize, &rid(seq));
                rec.hosts(now, fleet.in_use);
                live -= 1;
                // expire, then retry waiting requests (backfill: a later one may fit)
                while pending
                    .front()
                    .is_some_and(|a| now.saturating_sub(a.at) > cfg.deadline)
                {
                    pending.pop_front();
                    rec.failed += 1;
                }
                let mut tried = 0;
                let mut i = 0;
                while i < pending.len() && tried < cfg.retry_batch {
                    tried += 1;
                    let a = pending[i].clone();
                    if now.saturating_sub(a.at) > cfg.deadline {
                        pending.remove(i);
                        rec.failed += 1;
                        continue;
                    }
                    match place(&mut fleet, &a, now, &mut rec, &mut q, &mut rng, &mut sched) {
                        Decided::Placed => {
                            live += 1;
                            pending.remove(i);
                        }
                        Decided::NoRoom => i += 1,
                        Decided::Expired => {
                            pending.remove(i);
                            rec.failed += 1;
                        }
                    }
                }
            }
            Ev::Sample => {
                let s = fleet.tally.sample(now, pending.len());
                debug_assert_eq!(
                    s,
                    Sample::measure(
                        now,
                        pending.len(),
                        fleet
                            .ledgers
                            .iter()
                            .map(|l| (l.capacity(), l.unallocated())),
                    ),
                    "the running tally matches a full scan"
                );
                rec.samples.push(s);
                if next.is_some() || live > 0 || !pending.is_empty() {
                    q.push(now + cfg.sample_every, Ev::Sample);
                }
            }
        }
    }
    rec.failed += pending.len() as u64;
    let events = q.processed();
    Ok(rec.finish(
        kind.name(),
        now,
        wall.elapsed().as_secs_f64(),
        events,
        count,
    ))
}
