//! updraft in the simulator: nodes plan their pulls with the production planner
//! (`placement::pull::plan_pulls` and `diff_pulls`), hold pull credit in their own
//! `NodeLedger`, and take hints from per-shard queues that behave like JetStream's:
//!
//! * waiting pulls are served by priority (0 first), then by arrival;
//! * a lane holds at most `max_waiting` pulls (more are refused, their credit returns);
//! * a pull lives `expiry`; the agent re-issues it at once, which moves it to the back of
//!   its priority (modelled lazily when the lane is served);
//! * a hint a node cannot take is nak'd and comes back after `nak_delay`;
//! * publish, fetch and compare-and-swap take a latency drawn per operation;
//! * a request hinted on both lanes (after the spill deadline) can be delivered to two nodes:
//!   both reserve, the first compare-and-swap wins, the loser releases (a claim race).
//!
//! The dispatcher's part (deadlines, spill, backlog flags, class demand) runs on a sweep
//! every second, as in `dispatcher/src/timekeeper.rs`. Differences from production, for
//! speed: a node re-plans on its own events, not on a one-second tick; when the set of
//! backlogged classes changes, a backlog ages past a tier's opening or the guard's longest
//! hold, only the nodes whose plan that can change re-plan (those with room for the class's
//! smallest request, or the newly opened tier's empty nodes); a flag's `smallest` looks at
//! the 64 oldest waiting requests.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use placement::demand::DecayedCount;
use placement::ledger::{NodeLedger, PullId};
use placement::policy::Policy;
use placement::pull::{
    HeldCover, NodeProfile, PlanInput, PullConfig, PullDiff, diff_pulls, plan_pulls,
};
use placement::request::DEFAULT_DEADLINE_S;
use placement::shard::{ClassKey, Routable, STD_CLASS};
use placement::standing::node_room;
use placement::step_aside::StepAside;
use placement::takers::{DEFAULT_FLAG_AFTER, DEFAULT_SWEEP_INTERVAL};
use placement::time::duration_ms;
use placement::wire::{BacklogFlag, DemandEntry};
use placement::{Lane, RequestId, Resources, ShardId, ShardMap, Timestamp, Zone};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::Millis;
use crate::cluster::NodeSpec;
use crate::events::EventQueue;
use crate::stats::{FleetTally, Recorder, Report, Sample};
use crate::workload::{Arrival, Workload, WorkloadError};

mod backlog;
mod lanes;

/// A latency: a fixed part plus an exponential tail with the given mean (ms).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Latency {
    /// Fixed part, ms.
    pub base_ms: f64,
    /// Mean of the exponential tail, ms.
    pub tail_ms: f64,
}

/// One compare-and-swap on a record on one nats-server (BENCHMARKS.md).
pub const CAS_LATENCY: Latency = Latency {
    base_ms: 0.4,
    tail_ms: 0.6,
};

impl Latency {
    /// One draw, ms.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    pub fn draw(&self, rng: &mut ChaCha8Rng) -> Millis {
        let u: f64 = rng.random_range(f64::EPSILON..1.0);
        (self.base_ms - self.tail_ms * u.ln()).round().max(0.0) as Millis
    }
}

/// Settings of the updraft model.
#[derive(Debug, Clone)]
pub struct UpdraftConfig {
    /// The shard map.
    pub map: ShardMap,
    /// The nodes' pull settings (policy, order, credit, guard...).
    pub pull: PullConfig,
    /// Dispatcher → stream.
    pub publish: Latency,
    /// Stream → node.
    pub fetch: Latency,
    /// One compare-and-swap on a record.
    pub cas: Latency,
    /// Redelivery delay of a nak'd hint.
    pub nak_delay: Millis,
    /// Redelivery of a hint whose node died before answering.
    pub ack_wait: Millis,
    /// Pulls one lane holds at most.
    pub max_waiting: usize,
    /// Time from claim to running.
    pub build_time: Millis,
    /// A request unplaced after this fails.
    pub deadline: Millis,
    /// Build attempts before a request fails.
    pub max_attempts: u32,
    /// Probability that a build fails.
    pub build_failure_rate: f64,
    /// Node deaths per node per hour.
    pub node_death_rate: f64,
    /// How long a dead node stays away.
    pub repair_time: Millis,
    /// A dead node's claims are reaped after this.
    pub lease_ttl: Millis,
    /// Time between the dispatcher's sweeps (backlog flags, deadlines), ms.
    pub sweep_every: Millis,
    /// The dispatcher's `flag_after`: a class waiting this long is flagged, ms.
    pub flag_after: Millis,
    /// The dispatcher's `standing_below`: a class asked for whose largest request the nodes
    /// in use have room for fewer times than this gets a standing flag (0: never;
    /// `placement::standing`).
    pub standing_below: u64,
    /// Time between samples.
    pub sample_every: Millis,
    /// Seed.
    pub seed: u64,
}

/// Seconds from claim to running, unless told otherwise.
pub const DEFAULT_BUILD_S: u64 = 20;

impl UpdraftConfig {
    /// The model with the NATS latencies measured on one nats-server (BENCHMARKS.md), the
    /// agent's defaults (nak delay, ack wait, attempts, lease) and a 20 s build.
    pub fn new(map: ShardMap, pull: PullConfig, seed: u64) -> Self {
        UpdraftConfig {
            map,
            pull,
            publish: Latency {
                base_ms: 0.3,
                tail_ms: 0.3,
            },
            fetch: Latency {
                base_ms: 0.3,
                tail_ms: 0.5,
            },
            cas: CAS_LATENCY,
            nak_delay: 1000,
            ack_wait: 5000,
            max_waiting: 20_000,
            build_time: DEFAULT_BUILD_S * 1000,
            deadline: DEFAULT_DEADLINE_S * 1000,
            max_attempts: placement::lifecycle::DEFAULT_MAX_ATTEMPTS,
            build_failure_rate: 0.0,
            node_death_rate: 0.0,
            repair_time: 600_000,
            lease_ttl: 15_000,
            sweep_every: duration_ms(DEFAULT_SWEEP_INTERVAL),
            flag_after: duration_ms(DEFAULT_FLAG_AFTER),
            standing_below: placement::standing::DEFAULT_STANDING_BELOW,
            sample_every: 300_000,
            seed,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReqState {
    Waiting,
    Claiming(u32),
    Building(u32),
    Running(u32),
}

#[derive(Debug)]
struct Req {
    at: Millis,
    lifetime: Millis,
    res: Resources,
    /// Index of its shard (fit lane = 2·shard, spill lane = 2·shard + 1).
    shard: u32,
    class: u32,
    size: u8,
    state: ReqState,
    attempt: u32,
    excluded: Vec<u32>,
}

#[derive(Debug, Clone, Copy)]
struct Msg {
    req: u64,
    attempt: u32,
}

#[derive(Debug, Clone, Copy)]
struct WaitingPull {
    node: u32,
    pull: u64,
    issued: Millis,
}

#[derive(Debug, Default)]
struct LaneQ {
    msgs: VecDeque<Msg>,
    buckets: [VecDeque<WaitingPull>; 10],
    waiting: usize,
}

struct NodeSim {
    profile: NodeProfile,
    ledger: NodeLedger,
    /// Outstanding pulls: lane, priority, and messages each still waits for.
    pulls: BTreeMap<u64, (u32, u8, u32)>,
    /// Lanes it pulls last for a while, having handed a message of them back.
    aside: StepAside,
    next_pull: u64,
    /// The class (index into `Sim::classes`) its last plan held room back for.
    holds_for: Option<u32>,
    alive: bool,
    vms: u32,
    rng: ChaCha8Rng,
}

/// What the dispatcher's sweep reads of each node (the advertisement, in the model): kept
/// apart from [`NodeSim`] so electing a flag's takers among thousands of nodes reads a small
/// array, not each node's ledger.
#[derive(Debug, Clone)]
struct Standing {
    /// Its unallocated resources as last entered in `Sim::tally` (None while dead).
    free: Option<Resources>,
    /// Live with nothing allocated.
    is_empty: bool,
    /// Its opening tier while empty (`placement::pull::PullConfig::pack_tier`).
    tier: u8,
}

#[derive(Debug)]
enum Ev {
    Arrive,
    Publish {
        req: u64,
        lane: u32,
    },
    /// A message handed back (or left by a dead node) is due again: it goes ahead of the
    /// lane's new messages, as JetStream redelivers.
    Redeliver {
        lane: u32,
        msg: Msg,
    },
    Deliver {
        node: u32,
        pull: u64,
        msg: Msg,
        lane: u32,
    },
    ClaimDone {
        node: u32,
        req: u64,
    },
    BuildDone {
        node: u32,
        req: u64,
    },
    Depart {
        req: u64,
    },
    /// The spill deadline of one attempt of a request (a requeued request waits on the fit
    /// lane for a spill deadline of its own, as the dispatcher dates it from `queued_at`).
    Spill {
        req: u64,
        attempt: u32,
    },
    Deadline {
        req: u64,
    },
    Reap {
        node: u32,
        req: u64,
        attempt: u32,
    },
    Death,
    Back {
        node: u32,
    },
    /// A node's step-aside ends: it re-plans to take its place back.
    Replan {
        node: u32,
    },
    Sweep,
    Sample,
}

/// The model's state.
struct Sim<'a> {
    cfg: &'a UpdraftConfig,
    zone: Zone,
    shards: Vec<ShardId>,
    shard_ix: HashMap<ShardId, u32>,
    classes: Vec<ClassKey>,
    class_ix: HashMap<ClassKey, u32>,
    lanes: Vec<LaneQ>,
    nodes: Vec<NodeSim>,
    /// Each node's standing, by node index.
    standing: Vec<Standing>,
    reqs: HashMap<u64, Req>,
    /// Waiting requests per class: (arrival, seq).
    waiting: Vec<BTreeSet<(Millis, u64)>>,
    flags: Vec<BacklogFlag>,
    flag_set: BTreeSet<u32>,
    /// What each flagged class's keys hold, as the dispatcher wrote them
    /// (`placement::flag_writes`).
    written: BTreeMap<u32, placement::flag_writes::StoredFlag>,
    /// Class demand as last published (every 10 s).
    demand: Vec<DemandEntry>,
    /// Each class's arrivals, decayed as the dispatcher counts them (`placement::demand`).
    arrivals: Vec<DecayedCount>,
    q: EventQueue<Ev>,
    rng: ChaCha8Rng,
    rec: Recorder,
    in_use: usize,
    largest: Resources,
    /// When the dispatcher's sweep last ran.
    last_sweep: Millis,
    /// Utilization sums over live nodes, for samples.
    tally: FleetTally,
    /// Per class, its nodes by partition and election draw (`placement::takers`), computed
    /// when the class is first flagged.
    draws: Vec<Option<backlog::ClassDraws>>,
    /// The upper bound of each size of the `std` trait class (the only one the model's
    /// workloads ask for).
    bounds: Vec<Resources>,
    /// Per size, how many requests of its bound the live nodes in use have room for
    /// (`placement::standing::node_room`), kept as each node's room changes.
    room: Vec<u64>,
    /// Per size, how many requests of its bound the smallest node shape that holds one holds
    /// while empty (`placement::standing::standing_takers`).
    per_node: Vec<u64>,
}

fn rid(seq: u64) -> RequestId {
    RequestId::new(format!("r{seq}")).expect("generated request ids are valid")
}

impl Sim<'_> {
    fn lane_of(shard: u32, lane: Lane) -> u32 {
        shard * 2 + u32::from(lane == Lane::Spill)
    }

    /// Which lane of its shard lane index `lane` is (the inverse of `lane_of`).
    fn lane_kind(lane: u32) -> Lane {
        if lane % 2 == 1 {
            Lane::Spill
        } else {
            Lane::Fit
        }
    }

    fn shard_index(&mut self, s: &ShardId) -> u32 {
        if let Some(i) = self.shard_ix.get(s) {
            return *i;
        }
        let i = u32::try_from(self.shards.len()).expect("fewer than 2^32 shards");
        self.shards.push(s.clone());
        self.shard_ix.insert(s.clone(), i);
        self.lanes.push(LaneQ::default());
        self.lanes.push(LaneQ::default());
        i
    }

    fn class_index(&mut self, c: &ClassKey) -> u32 {
        if let Some(i) = self.class_ix.get(c) {
            return *i;
        }
        let i = u32::try_from(self.classes.len()).expect("fewer than 2^32 classes");
        self.classes.push(c.clone());
        self.class_ix.insert(c.clone(), i);
        self.waiting.push(BTreeSet::new());
        self.arrivals.push(DecayedCount::new(Timestamp(0)));
        i
    }

    /// Re-plans node `n`'s pulls and serves the lanes it joined.
    fn replan(&mut self, n: u32, now: Millis) {
        self.reindex(n);
        let node = &mut self.nodes[n as usize];
        if !node.alive {
            return;
        }
        let covers: Vec<HeldCover> = node
            .pulls
            .iter()
            .filter(|(id, (lane, _, _))| {
                Self::lane_kind(*lane) == Lane::Fit && node.ledger.is_cover(PullId(**id))
            })
            .map(|(_, (lane, priority, left))| HeldCover {
                shard: self.shards[(*lane / 2) as usize].clone(),
                priority: *priority,
                left: *left,
            })
            .collect();
        let input = PlanInput {
            node: &node.profile,
            map: &self.cfg.map,
            ledger: &node.ledger,
            ignore_credit: true,
            outstanding: &[],
            backlog: &self.flags,
            covers: &covers,
            demand: &self.demand,
            cfg: &self.cfg.pull,
            now: Timestamp(now),
        };
        let mut plan = plan_pulls(&input, &mut node.rng);
        node.aside.apply(&mut plan.pulls, input.now);
        node.holds_for = plan
            .hold
            .as_ref()
            .and_then(|h| self.class_ix.get(&h.class).copied());
        let held: Vec<(u64, &ShardId, Lane, u8, u32, bool)> = node
            .pulls
            .iter()
            .map(|(id, (lane, prio, left))| {
                let s = &self.shards[(*lane / 2) as usize];
                let cover = node.ledger.is_cover(PullId(*id));
                (*id, s, Self::lane_kind(*lane), *prio, *left, cover)
            })
            .collect();
        let PullDiff { cancel, issue } = diff_pulls(
            plan.pulls,
            &held,
            placement::pull::priority_tolerance(self.cfg.pull.policy),
        );
        if cancel.is_empty() && issue.is_empty() {
            self.rec.count("replans_unchanged", 1);
        }
        for id in cancel {
            let node = &mut self.nodes[n as usize];
            if let Some((lane, _, left)) = node.pulls.remove(&id) {
                // messages it brought keep their credit until dealt with
                node.ledger.return_units(PullId(id), left);
                self.lanes[lane as usize].waiting -= 1;
            }
        }
        let mut touched = Vec::new();
        for intent in issue {
            let shard = self.shard_index(&intent.shard);
            let lane = Self::lane_of(shard, intent.lane);
            let node = &mut self.nodes[n as usize];
            node.next_pull += 1;
            let id = node.next_pull;
            if node
                .ledger
                .take_credit(PullId(id), &intent.credit, intent.batch)
                .is_err()
            {
                continue;
            }
            self.rec.count("pulls_issued", 1);
            let lq = &mut self.lanes[lane as usize];
            if lq.waiting >= self.cfg.max_waiting {
                node.ledger.return_credit(PullId(id));
                self.rec.count("pulls_refused_max_waiting", 1);
                continue;
            }
            lq.waiting += 1;
            lq.buckets[usize::from(intent.priority.min(9))].push_back(WaitingPull {
                node: n,
                pull: id,
                issued: now,
            });
            node.pulls.insert(id, (lane, intent.priority, intent.batch));
            touched.push(lane);
        }
        touched.dedup();
        for lane in touched {
            self.serve(lane, now);
        }
    }

    /// Keeps node `n`'s standing and its part of the tally true to its ledger (every ledger
    /// change is followed by a re-plan, which calls this).
    fn reindex(&mut self, n: u32) {
        let node = &self.nodes[n as usize];
        let st = &mut self.standing[n as usize];
        let free = node.alive.then(|| node.ledger.unallocated());
        let cap = node.ledger.capacity();
        let was_empty = st.free.is_some().then_some(st.is_empty);
        let is_empty = free.as_ref() == Some(cap);
        let before = st.free.as_ref().filter(|_| was_empty == Some(false));
        let after = free.as_ref().filter(|_| !is_empty);
        if before != after {
            if let Some(f) = before {
                for (r, n) in self.room.iter_mut().zip(node_room(f, &self.bounds)) {
                    *r -= n;
                }
            }
            if let Some(f) = after {
                for (r, n) in self.room.iter_mut().zip(node_room(f, &self.bounds)) {
                    *r += n;
                }
            }
        }
        if st.free != free {
            if let Some(old) = &st.free {
                self.tally.remove(cap, old);
            }
            if let Some(f) = &free {
                self.tally.add(cap, f);
            }
            st.free.clone_from(&free);
        }
        if free.is_some() && was_empty.is_some_and(|was| was != is_empty) {
            // the node's backlog flag keys change with it: its agent watches them anew
            // (placement::flag_writes)
            self.rec.count("flag_rewatches", 1);
        }
        st.is_empty = is_empty;
    }

    fn publish(&mut self, req: u64, lane: u32, now: Millis) {
        let at = now + self.cfg.publish.draw(&mut self.rng);
        self.q.push(at, Ev::Publish { req, lane });
    }

    fn hosts_changed(&mut self, now: Millis) {
        self.rec.hosts(now, self.in_use);
    }

    fn unwait(&mut self, seq: u64) {
        if let Some(r) = self.reqs.get(&seq) {
            let key = (r.at, seq);
            self.waiting[r.class as usize].remove(&key);
        }
    }

    fn requeue(&mut self, seq: u64, failed_on: u32, now: Millis) {
        let Some(r) = self.reqs.get_mut(&seq) else {
            return;
        };
        r.attempt += 1;
        r.excluded.push(failed_on);
        if r.attempt > self.cfg.max_attempts {
            self.reqs.remove(&seq);
            self.rec.failed += 1;
            return;
        }
        r.state = ReqState::Waiting;
        let (class, at, shard, size, attempt) = (r.class, r.at, r.shard, r.size, r.attempt);
        self.waiting[class as usize].insert((at, seq));
        self.publish(seq, Self::lane_of(shard, Lane::Fit), now);
        let spill = self.spill_ms(size);
        self.q
            .push(now.saturating_add(spill), Ev::Spill { req: seq, attempt });
    }

    fn handle(
        &mut self,
        now: Millis,
        ev: Ev,
        workload: &mut Workload,
        next: &mut Option<Arrival>,
    ) -> Result<(), WorkloadError> {
        match ev {
            Ev::Arrive => {
                let Some(a) = next.take() else { return Ok(()) };
                self.rec.arrived += 1;
                self.arrive(a, now);
                *next = workload.next().transpose()?;
                if let Some(n) = next.as_ref() {
                    self.q.push(n.at.max(now), Ev::Arrive);
                }
            }
            Ev::Publish { req, lane } => {
                if let Some(r) = self.reqs.get(&req) {
                    let msg = Msg {
                        req,
                        attempt: r.attempt,
                    };
                    self.lanes[lane as usize].msgs.push_back(msg);
                    self.serve(lane, now);
                }
            }
            Ev::Redeliver { lane, msg } => {
                self.lanes[lane as usize].msgs.push_front(msg);
                self.serve(lane, now);
            }
            Ev::Deliver {
                node,
                pull,
                msg,
                lane,
            } => self.deliver(node, pull, msg, lane, now),
            Ev::ClaimDone { node, req } => {
                let won = self
                    .reqs
                    .get(&req)
                    .is_some_and(|r| r.state == ReqState::Claiming(node));
                if won {
                    self.unwait(req);
                    let r = self.reqs.get_mut(&req).expect("checked above");
                    r.state = ReqState::Building(node);
                    let (size, at) = (r.size, r.at);
                    self.rec.placed(size, now - at);
                    self.q
                        .push(now + self.cfg.build_time, Ev::BuildDone { node, req });
                } else {
                    self.rec.count("claim_races_lost", 1);
                    self.nodes[node as usize].ledger.release(&rid(req));
                    self.replan(node, now);
                }
            }
            Ev::BuildDone { node, req } => {
                if self.reqs.get(&req).map(|r| r.state) != Some(ReqState::Building(node))
                    || !self.nodes[node as usize].alive
                {
                    return Ok(());
                }
                if self.cfg.build_failure_rate > 0.0
                    && self.rng.random_bool(self.cfg.build_failure_rate.min(1.0))
                {
                    self.rec.count("builds_failed", 1);
                    self.rec.placed = self.rec.placed.saturating_sub(1);
                    self.nodes[node as usize].ledger.release(&rid(req));
                    self.requeue(req, node, now);
                    self.replan(node, now);
                    return Ok(());
                }
                let r = self.reqs.get_mut(&req).expect("checked above");
                r.state = ReqState::Running(node);
                let lifetime = r.lifetime;
                let n = &mut self.nodes[node as usize];
                if n.vms == 0 {
                    self.in_use += 1;
                }
                n.vms += 1;
                self.hosts_changed(now);
                self.q.push(now + lifetime, Ev::Depart { req });
            }
            Ev::Depart { req } => {
                let Some(r) = self.reqs.get(&req) else {
                    return Ok(());
                };
                let ReqState::Running(node) = r.state else {
                    return Ok(());
                };
                self.reqs.remove(&req);
                let n = &mut self.nodes[node as usize];
                n.ledger.release(&rid(req));
                n.vms -= 1;
                if n.vms == 0 {
                    self.in_use -= 1;
                }
                self.hosts_changed(now);
                self.replan(node, now);
            }
            Ev::Spill { req, attempt } => {
                if let Some(r) = self
                    .reqs
                    .get(&req)
                    .filter(|r| r.state == ReqState::Waiting && r.attempt == attempt)
                {
                    let lane = Self::lane_of(r.shard, Lane::Spill);
                    self.rec.count("spilled", 1);
                    self.publish(req, lane, now);
                }
            }
            Ev::Deadline { req } => {
                if self
                    .reqs
                    .get(&req)
                    .is_some_and(|r| r.state == ReqState::Waiting)
                {
                    self.unwait(req);
                    self.reqs.remove(&req);
                    self.rec.failed += 1;
                }
            }
            Ev::Reap { node, req, attempt } => {
                let held = self.reqs.get(&req).is_some_and(|r| r.attempt == attempt && matches!(r.state, ReqState::Claiming(x) | ReqState::Building(x) if x == node));
                if held {
                    self.rec.count("reaped", 1);
                    if matches!(
                        self.reqs.get(&req).map(|r| r.state),
                        Some(ReqState::Building(_))
                    ) {
                        self.rec.placed = self.rec.placed.saturating_sub(1);
                    }
                    self.requeue(req, node, now);
                }
            }
            Ev::Death => self.death(now),
            Ev::Replan { node } => self.replan(node, now),
            Ev::Back { node } => {
                let n = &mut self.nodes[node as usize];
                n.alive = true;
                n.ledger = NodeLedger::new(
                    n.ledger.totals().clone(),
                    n.ledger.reserved().clone(),
                    *n.ledger.ratios(),
                )
                .expect("same capacity as before");
                self.replan(node, now);
            }
            Ev::Sweep => self.sweep(now),
            Ev::Sample => {
                let waiting = self.waiting.iter().map(BTreeSet::len).sum();
                let s = self.tally.sample(now, waiting);
                debug_assert_eq!(
                    s,
                    Sample::measure(
                        now,
                        waiting,
                        self.nodes
                            .iter()
                            .filter(|n| n.alive)
                            .map(|n| (n.ledger.capacity(), n.ledger.unallocated())),
                    ),
                    "the running tally matches a full scan"
                );
                self.rec.samples.push(s);
            }
        }
        Ok(())
    }

    fn arrive(&mut self, a: Arrival, now: Millis) {
        let name = format!("r{}", a.seq);
        let routed = self.cfg.map.route(&Routable {
            id: &name,
            zone: &self.zone,
            required_traits: &[],
            resources: &a.resources,
        });
        let shard = match routed {
            Ok(s) if a.resources.fits(&self.largest) => s,
            _ => {
                // admission: no node could ever hold it
                self.rec.failed += 1;
                self.rec.count("inadmissible", 1);
                return;
            }
        };
        let class = self.class_index(&shard.class());
        let size = shard.size;
        let si = self.shard_index(&shard);
        self.waiting[class as usize].insert((a.at, a.seq));
        self.arrivals[class as usize].note(Timestamp(now));
        self.reqs.insert(
            a.seq,
            Req {
                at: a.at,
                lifetime: a.lifetime,
                res: a.resources,
                shard: si,
                class,
                size,
                state: ReqState::Waiting,
                attempt: 1,
                excluded: Vec::new(),
            },
        );
        self.publish(a.seq, Self::lane_of(si, Lane::Fit), now);
        let spill = self.spill_ms(size);
        self.q.push(
            now.saturating_add(spill),
            Ev::Spill {
                req: a.seq,
                attempt: 1,
            },
        );
        self.q.push(
            now.saturating_add(self.cfg.deadline),
            Ev::Deadline { req: a.seq },
        );
    }

    fn death(&mut self, now: Millis) {
        let alive: Vec<u32> = (0..self.nodes.len())
            .filter(|i| self.nodes[*i].alive)
            .filter_map(|i| u32::try_from(i).ok())
            .collect();
        if let Some(&victim) = alive.get(self.rng.random_range(0..alive.len().max(1))) {
            self.rec.count("node_deaths", 1);
            let n = &mut self.nodes[victim as usize];
            n.alive = false;
            self.reindex(victim);
            let n = &mut self.nodes[victim as usize];
            for (_, (lane, _, _)) in std::mem::take(&mut n.pulls) {
                self.lanes[lane as usize].waiting -= 1;
            }
            if n.vms > 0 {
                self.in_use -= 1;
            }
            n.vms = 0;
            self.hosts_changed(now);
            let held: Vec<(u64, ReqState, u32)> = self
                .reqs
                .iter()
                .filter(|(_, r)| matches!(r.state, ReqState::Claiming(x) | ReqState::Building(x) | ReqState::Running(x) if x == victim))
                .map(|(k, r)| (*k, r.state, r.attempt))
                .collect();
            for (seq, state, attempt) in held {
                if let ReqState::Running(_) = state {
                    self.reqs.remove(&seq);
                    self.rec.lost += 1;
                } else {
                    self.q.push(
                        now + self.cfg.lease_ttl,
                        Ev::Reap {
                            node: victim,
                            req: seq,
                            attempt,
                        },
                    );
                }
            }
            self.q
                .push(now + self.cfg.repair_time, Ev::Back { node: victim });
        }
        self.schedule_death(now);
    }

    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )]
    fn schedule_death(&mut self, now: Millis) {
        if self.cfg.node_death_rate <= 0.0 {
            return;
        }
        let per_ms = self.cfg.node_death_rate * self.nodes.len() as f64 / 3_600_000.0;
        let u: f64 = self.rng.random_range(f64::EPSILON..1.0);
        let dt = (-u.ln() / per_ms).round().min(1e15) as Millis;
        self.q.push(now + dt.max(1), Ev::Death);
    }
}

/// Runs updraft over `workload` on `nodes`.
pub fn run(
    nodes: Vec<NodeSpec>,
    mut workload: Workload,
    cfg: &UpdraftConfig,
) -> Result<Report, WorkloadError> {
    #[allow(clippy::disallowed_types)] // the simulator's own wall time, not simulated time
    let wall = std::time::Instant::now();
    let zone = cfg.map.default_zone.clone();
    let count = nodes.len();
    let largest = nodes
        .iter()
        .map(|n| n.capacity.clone())
        .fold(Resources::default(), |a, c| a.max(&c));
    let std_class = placement::ids::TraitClassName::new(STD_CLASS).expect("static name");
    let bounds: Vec<Resources> = cfg.map.upper_bounds(&std_class).collect();
    let mut shapes: Vec<&Resources> = Vec::new();
    for n in &nodes {
        if !shapes.contains(&&n.capacity) {
            shapes.push(&n.capacity);
        }
    }
    let per_node = bounds
        .iter()
        .map(|b| {
            shapes
                .iter()
                .filter(|c| b.fits(c))
                .map(|c| u64::from(placement::pull::how_many(c, b)))
                .min()
                .unwrap_or(1)
        })
        .collect();
    let mut seeder = ChaCha8Rng::seed_from_u64(cfg.seed);
    let sims: Vec<NodeSim> = nodes
        .iter()
        .map(|n| NodeSim {
            profile: NodeProfile {
                id: n.id.clone(),
                zone: zone.clone(),
                traits: Vec::new(),
            },
            ledger: n.ledger(),
            pulls: BTreeMap::new(),
            aside: StepAside::default(),
            next_pull: 0,
            holds_for: None,
            alive: true,
            vms: 0,
            rng: ChaCha8Rng::seed_from_u64(seeder.random()),
        })
        .collect();
    let standing = nodes
        .iter()
        .map(|n| Standing {
            free: None,
            is_empty: false,
            tier: cfg.pull.pack_tier(&n.id),
        })
        .collect();
    let mut sim = Sim {
        cfg,
        zone,
        shards: Vec::new(),
        shard_ix: HashMap::new(),
        classes: Vec::new(),
        class_ix: HashMap::new(),
        lanes: Vec::new(),
        nodes: sims,
        standing,
        reqs: HashMap::new(),
        waiting: Vec::new(),
        flags: Vec::new(),
        flag_set: BTreeSet::new(),
        written: BTreeMap::new(),
        demand: Vec::new(),
        arrivals: Vec::new(),
        q: EventQueue::default(),
        rng: ChaCha8Rng::seed_from_u64(seeder.random()),
        rec: Recorder::default(),
        in_use: 0,
        largest,
        last_sweep: 0,
        tally: FleetTally::default(),
        draws: Vec::new(),
        room: vec![0; bounds.len()],
        bounds,
        per_node,
    };
    // every node joins at time 0
    for n in 0..count {
        sim.replan(u32::try_from(n).unwrap_or(u32::MAX), 0);
    }
    let mut next = workload.next().transpose()?;
    if let Some(a) = &next {
        sim.q.push(a.at, Ev::Arrive);
    }
    sim.schedule_death(0);
    let mut now = 0;
    let mut next_sweep = 1000;
    let mut next_sample = 0;
    loop {
        let busy = next.is_some() || !sim.reqs.is_empty();
        if !busy {
            break;
        }
        // periodic work interleaved with events, without flooding the queue
        let t_ev = sim.q.peek_time().unwrap_or(Millis::MAX);
        if next_sample <= t_ev && next_sample <= next_sweep {
            now = next_sample;
            sim.handle(now, Ev::Sample, &mut workload, &mut next)?;
            next_sample += cfg.sample_every;
            continue;
        }
        if next_sweep <= t_ev {
            now = next_sweep;
            if sim.waiting.iter().any(|w| !w.is_empty())
                || !sim.flags.is_empty()
                || sim.standing_due()
                || now % 10_000 == 0
            {
                sim.handle(now, Ev::Sweep, &mut workload, &mut next)?;
            }
            next_sweep += cfg.sweep_every.max(1);
            if t_ev == Millis::MAX {
                // nothing scheduled: only running VMs would be left, but those have departures
                break;
            }
            continue;
        }
        let Some((t, ev)) = sim.q.pop() else { break };
        now = t;
        sim.handle(now, ev, &mut workload, &mut next)?;
    }
    let events = sim.q.processed();
    let mut rec = sim.rec;
    rec.decisions = rec.counters.get("deliveries").copied().unwrap_or(0);
    rec.work = rec.counters.get("pulls_issued").copied().unwrap_or(0) + rec.decisions;
    let name = if cfg.pull.policy == Policy::Spread {
        "updraft-spread"
    } else {
        "updraft"
    };
    Ok(rec.finish(name, now, wall.elapsed().as_secs_f64(), events, count))
}

/// Class index of `res` on `map` (for per-class waits of the central runs).
pub fn size_class(map: &ShardMap, res: &Resources) -> u8 {
    map.size_class_of(res).unwrap_or(u8::MAX)
}
