//! The dispatcher's in-memory view of the cluster, built from KV watches: open requests (and
//! an index of open claims per node, so reaping never scans every record), recent finished
//! ones, node adverts, and rolling placement statistics. Pure: the watch loops feed it.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::time::Duration;

use bus::Versioned;
use placement::demand::DecayedCount;
use placement::lifecycle::{RequestRecord, State};
use placement::shard::ClassKey;
use placement::wire::NodeAdvert;
use placement::{NodeId, RequestId, Timestamp};
use serde::{Deserialize, Serialize};

/// Samples kept for latency percentiles.
const LATENCY_SAMPLES: usize = 4096;
/// Failures kept for the status page.
const RECENT_FAILURES: usize = 50;
/// Window of the placement rate.
const RATE_WINDOW: Duration = Duration::from_secs(60);

/// What changed when a record was applied (the reactions key off this).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// State before (None: first sight).
    pub before: Option<State>,
    /// Attempt before.
    pub before_attempt: Option<u32>,
    /// Its hint had spilled before.
    pub before_spilled: bool,
}

/// A failure shown on the status page.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FailureNote {
    /// Request.
    pub id: RequestId,
    /// When.
    pub at: Timestamp,
    /// Why.
    pub reason: String,
}

/// The view.
#[derive(Debug, Default)]
pub struct View {
    /// Boxed, so that growing the map moves 32-byte entries, not 550-byte records: at 14,336
    /// records a rehash of unboxed ones held the record watch for tens of milliseconds.
    open: HashMap<RequestId, Box<Versioned<RequestRecord>>>,
    finished: VecDeque<RequestRecord>,
    finished_cap: usize,
    by_node: HashMap<NodeId, BTreeSet<RequestId>>,
    /// Open requests by state, so the sweep and the counts look only at the requests they
    /// concern (the queued ones, not every running VM).
    by_state: HashMap<State, HashSet<RequestId>>,
    adverts: BTreeMap<NodeId, NodeAdvert>,
    /// Distinct node shapes (zone, traits, capacity) and how many nodes have each: admission
    /// looks at these, not at every node.
    shapes: HashMap<ShapeKey, usize>,
    /// Shapes whose last node's lease ended, and when: admission still counts them for
    /// [`ADMISSION_MEMORY`], so a NATS failover that lets every lease lapse at once does not
    /// refuse requests the nodes, back a moment later, would take.
    departed: HashMap<ShapeKey, Timestamp>,
    /// Every record present at start has been seen.
    pub caught_up: bool,
    /// Every advert present at start has been seen (admission waits for it: until then a
    /// request is queued, never refused for want of nodes the view has not read yet).
    pub nodes_caught_up: bool,
    active_times: VecDeque<Timestamp>,
    to_active_ms: VecDeque<u64>,
    to_claim_ms: VecDeque<u64>,
    failures: VecDeque<FailureNote>,
    demand: BTreeMap<ClassKey, DecayedCount>,
}

fn push_capped<T>(q: &mut VecDeque<T>, v: T, cap: usize) {
    if q.len() == cap {
        q.pop_front();
    }
    q.push_back(v);
}

/// A node shape: zone, traits, capacity.
type ShapeKey = (
    placement::Zone,
    Vec<placement::TraitName>,
    placement::Resources,
);

/// How long admission remembers the shape of nodes whose leases ended.
pub const ADMISSION_MEMORY: std::time::Duration = std::time::Duration::from_secs(600);

fn shape_of(a: &NodeAdvert) -> ShapeKey {
    let mut traits = a.traits.clone();
    traits.sort();
    (a.zone.clone(), traits, a.capacity.clone())
}

fn percentile(samples: &VecDeque<u64>, p: f64) -> Option<u64> {
    if samples.is_empty() {
        return None;
    }
    let mut v: Vec<u64> = samples.iter().copied().collect();
    v.sort_unstable();
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )] // an index
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    v.get(i).copied()
}

/// The queued requests of one class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassQueue {
    /// How many.
    pub count: u64,
    /// When the oldest entered its queue.
    pub oldest: Timestamp,
    /// Component-wise minimum of their sizes.
    pub smallest: placement::Resources,
    /// How many wait in each partition of the class.
    pub by_part: placement::takers::WaitingByPartition,
}

fn min_each(a: &placement::Resources, b: &placement::Resources) -> placement::Resources {
    let mut extended = placement::resources::Extended::new();
    for (n, v) in &a.extended {
        let w = b.extended_amount(n);
        if w > 0 {
            extended.insert(n.clone(), (*v).min(w));
        }
    }
    placement::Resources {
        vcpus: a.vcpus.min(b.vcpus),
        memory_mib: a.memory_mib.min(b.memory_mib),
        disk_gib: a.disk_gib.min(b.disk_gib),
        extended,
    }
}

/// Latency percentiles in ms.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Latency {
    /// Median.
    pub p50_ms: Option<u64>,
    /// 95th.
    pub p95_ms: Option<u64>,
    /// 99th.
    pub p99_ms: Option<u64>,
}

impl View {
    /// An empty view keeping `finished_cap` finished records.
    pub fn new(finished_cap: usize) -> Self {
        View {
            finished_cap: finished_cap.max(1),
            ..Default::default()
        }
    }

    /// Applies a record as written in KV. `now` dates statistics.
    pub fn apply(&mut self, v: Versioned<RequestRecord>, now: Timestamp) -> Applied {
        let id = v.value.spec.id.clone();
        let prev = self.open.get(&id).map(|p| {
            (
                p.value.state,
                p.value.attempt,
                p.value.node().cloned(),
                p.value.spilled,
            )
        });
        if let Some((state, _, node, _)) = &prev {
            if let Some(node) = node {
                self.unindex(node, &id);
            }
            self.unindex_state(*state, &id);
        }
        let applied = Applied {
            before: prev.as_ref().map(|p| p.0),
            before_attempt: prev.as_ref().map(|p| p.1),
            before_spilled: prev.as_ref().is_some_and(|p| p.3),
        };
        let r = &v.value;
        if applied.before.is_none() && r.history.is_empty() {
            self.note_arrival(r.shard.class(), r.created_at);
        }
        if self.caught_up && applied.before != Some(r.state) {
            self.note(r, now);
        }
        if r.state.is_terminal() {
            self.open.remove(&id);
            self.remember_finished(v.value);
        } else {
            if let Some(node) = r.node() {
                self.by_node
                    .entry(node.clone())
                    .or_default()
                    .insert(id.clone());
            }
            self.by_state.entry(r.state).or_default().insert(id.clone());
            match self.open.entry(id) {
                Entry::Occupied(mut e) => **e.get_mut() = v,
                Entry::Vacant(e) => {
                    e.insert(Box::new(v));
                }
            }
        }
        applied
    }

    fn note(&mut self, r: &RequestRecord, now: Timestamp) {
        match r.state {
            State::Active => {
                push_capped(&mut self.active_times, now, LATENCY_SAMPLES);
                if let Some(at) = r.active_at {
                    push_capped(
                        &mut self.to_active_ms,
                        at.since(r.queued_at)
                            .as_millis()
                            .try_into()
                            .unwrap_or(u64::MAX),
                        LATENCY_SAMPLES,
                    );
                }
            }
            State::Claimed => {
                if let Some(c) = &r.claim {
                    push_capped(
                        &mut self.to_claim_ms,
                        c.at.since(r.queued_at)
                            .as_millis()
                            .try_into()
                            .unwrap_or(u64::MAX),
                        LATENCY_SAMPLES,
                    );
                }
            }
            State::Failed => push_capped(
                &mut self.failures,
                FailureNote {
                    id: r.spec.id.clone(),
                    at: r.updated_at,
                    reason: r.reason.clone().unwrap_or_default(),
                },
                RECENT_FAILURES,
            ),
            _ => {}
        }
    }

    fn remember_finished(&mut self, r: RequestRecord) {
        push_capped(&mut self.finished, r, self.finished_cap);
    }

    fn unindex(&mut self, node: &NodeId, id: &RequestId) {
        if let Some(set) = self.by_node.get_mut(node) {
            set.remove(id);
            if set.is_empty() {
                self.by_node.remove(node);
            }
        }
    }

    fn unindex_state(&mut self, state: State, id: &RequestId) {
        if let Some(set) = self.by_state.get_mut(&state) {
            set.remove(id);
            if set.is_empty() {
                self.by_state.remove(&state);
            }
        }
    }

    /// A key vanished from KV (a finished record expired).
    pub fn remove(&mut self, key: &str) {
        if let Ok(id) = RequestId::new(key)
            && let Some(v) = self.open.remove(&id)
        {
            self.unindex_state(v.value.state, &id);
            if let Some(n) = v.value.node() {
                let n = n.clone();
                self.unindex(&n, &id);
            }
        }
    }

    /// Node adverts by id.
    pub fn adverts(&self) -> &BTreeMap<NodeId, NodeAdvert> {
        &self.adverts
    }

    /// Adds or replaces a node's advert; returns the previous one.
    pub fn upsert_advert(&mut self, a: NodeAdvert) -> Option<NodeAdvert> {
        let prev = self.adverts.insert(a.node.clone(), a.clone());
        if let Some(p) = &prev {
            self.unshape(p, None);
        }
        let key = shape_of(&a);
        self.departed.remove(&key);
        *self.shapes.entry(key).or_insert(0) += 1;
        prev
    }

    /// Removes a node's advert (its lease ended at `now`).
    pub fn remove_advert(&mut self, node: &NodeId, now: Timestamp) -> Option<NodeAdvert> {
        let prev = self.adverts.remove(node);
        if let Some(p) = &prev {
            self.unshape(p, Some(now));
        }
        prev
    }

    fn unshape(&mut self, a: &NodeAdvert, departed: Option<Timestamp>) {
        let key = shape_of(a);
        if let Some(n) = self.shapes.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.shapes.remove(&key);
                if let Some(t) = departed {
                    self.departed.insert(key, t);
                }
            }
        }
    }

    /// Admission: could any node ever hold `spec`: an advertised one, or one whose lease
    /// ended less than [`ADMISSION_MEMORY`] ago? Cost: distinct node shapes.
    pub fn admissible(&self, spec: &placement::RequestSpec, now: Timestamp) -> bool {
        let admits = |(zone, traits, cap): &ShapeKey| {
            placement::explain::shape_admits(spec, zone, traits, cap)
        };
        self.shapes.keys().any(admits)
            || self
                .departed
                .iter()
                .any(|(k, t)| now.since(*t) < ADMISSION_MEMORY && admits(k))
    }

    /// One open record.
    pub fn get(&self, id: &RequestId) -> Option<&Versioned<RequestRecord>> {
        self.open.get(id).map(Box::as_ref)
    }

    /// Open requests.
    pub fn open(&self) -> impl Iterator<Item = &Versioned<RequestRecord>> {
        self.open.values().map(Box::as_ref)
    }

    /// Recently finished requests, newest last.
    pub fn finished(&self) -> impl Iterator<Item = &RequestRecord> {
        self.finished.iter()
    }

    /// Open requests in `state`.
    pub fn in_state(&self, state: State) -> impl Iterator<Item = &Versioned<RequestRecord>> {
        self.by_state
            .get(&state)
            .into_iter()
            .flatten()
            .filter_map(|id| self.open.get(id).map(Box::as_ref))
    }

    /// Nodes that hold open requests, with the requests each holds.
    pub fn holders(&self) -> impl Iterator<Item = (&NodeId, &BTreeSet<RequestId>)> {
        self.by_node.iter()
    }

    /// Open requests a node holds.
    pub fn claims_of(&self, node: &NodeId) -> Vec<RequestId> {
        self.by_node
            .get(node)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Counts of open requests by state.
    pub fn counts(&self) -> BTreeMap<State, usize> {
        self.by_state
            .iter()
            .map(|(s, ids)| (*s, ids.len()))
            .collect()
    }

    /// For each class with queued requests: how many, and when the oldest entered its queue.
    pub fn queued_by_class(&self) -> BTreeMap<ClassKey, ClassQueue> {
        let mut m: BTreeMap<ClassKey, ClassQueue> = BTreeMap::new();
        for v in self.in_state(State::Queued) {
            let r = &v.value;
            let e = m.entry(r.shard.class()).or_insert_with(|| ClassQueue {
                count: 0,
                oldest: r.queued_at,
                smallest: r.spec.resources.clone(),
                by_part: Default::default(),
            });
            e.count += 1;
            *e.by_part.entry(r.shard.part).or_default() += 1;
            e.oldest = e.oldest.min(r.queued_at);
            e.smallest = min_each(&e.smallest, &r.spec.resources);
        }
        m
    }

    /// Placements (transitions to active) in the last minute, per second.
    pub fn placement_rate(&self, now: Timestamp) -> f64 {
        let from = now.minus(RATE_WINDOW);
        let n = self.active_times.iter().filter(|t| **t >= from).count();
        #[allow(clippy::cast_precision_loss)] // a rate
        let rate = n as f64 / RATE_WINDOW.as_secs_f64();
        rate
    }

    /// Queue → active latency percentiles over recent placements.
    pub fn latency_to_active(&self) -> Latency {
        Latency {
            p50_ms: percentile(&self.to_active_ms, 0.5),
            p95_ms: percentile(&self.to_active_ms, 0.95),
            p99_ms: percentile(&self.to_active_ms, 0.99),
        }
    }

    /// Queue → claimed latency percentiles.
    pub fn latency_to_claim(&self) -> Latency {
        Latency {
            p50_ms: percentile(&self.to_claim_ms, 0.5),
            p95_ms: percentile(&self.to_claim_ms, 0.95),
            p99_ms: percentile(&self.to_claim_ms, 0.99),
        }
    }

    fn note_arrival(&mut self, class: ClassKey, at: Timestamp) {
        self.demand
            .entry(class)
            .or_insert_with(|| DecayedCount::new(at))
            .note(at);
    }

    /// Requests per minute per class, recently (`placement::demand`: exponentially decayed,
    /// 5-minute constant), of the classes that count as asked for.
    pub fn demand(&self, now: Timestamp) -> BTreeMap<ClassKey, f64> {
        self.demand
            .iter()
            .filter_map(|(k, c)| Some((k.clone(), c.asked_for(now)?)))
            .collect()
    }

    /// Recent failures, newest last.
    pub fn failures(&self) -> impl Iterator<Item = &FailureNote> {
        self.failures.iter()
    }
}

/// Fixtures for the dispatcher's unit tests.
#[cfg(test)]
#[allow(clippy::unwrap_used)] // fixtures: a panic is the failure report
pub(crate) mod tests_support {
    use super::*;
    use placement::request::RequestSpec;
    use placement::wire::NodeState;
    use placement::{AllocationRatios, Epoch, Resources, Zone};

    /// A queued 1 vCPU / 1 GiB request.
    pub fn record(id: &str) -> RequestRecord {
        let zone = Zone::new("az1").unwrap();
        let map = placement::shard::default_shard_map(zone.clone());
        let spec = RequestSpec::plain(
            RequestId::new(id).unwrap(),
            Resources::new(1, 1024, 0),
            zone,
            60,
        );
        let shard = map.route(&spec.routable()).unwrap();
        RequestRecord::new_queued(spec, shard, Timestamp(1000))
    }

    /// An active node's advert with `key` as its signing key.
    pub fn advert(node: &NodeId, key: Option<String>) -> NodeAdvert {
        NodeAdvert {
            v: 1,
            node: node.clone(),
            epoch: Epoch(1),
            zone: Zone::new("az1").unwrap(),
            traits: vec![],
            totals: Resources::new(64, 65536, 1000),
            reserved: Resources::default(),
            ratios: AllocationRatios::default(),
            capacity: Resources::new(256, 65536, 1000),
            unallocated: Resources::new(256, 65536, 1000),
            vms: 0,
            building: 0,
            state: NodeState::Active,
            state_reason: None,
            overcommitted: false,
            agent_version: "test".into(),
            driver: "memory".into(),
            started_at: Timestamp(0),
            heartbeat_at: Timestamp(0),
            public_key: key,
            pack_tier: 0,
            guard: Default::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use placement::lifecycle::Claim;
    use placement::{ClaimToken, Epoch, Resources};

    fn rec(id: &str) -> RequestRecord {
        tests_support::record(id)
    }

    /// Node n1's claim, epoch 1, made at 1100.
    fn claim_n1() -> Claim {
        Claim {
            node: NodeId::new("n1").unwrap(),
            epoch: Epoch(1),
            token: ClaimToken(1),
            at: Timestamp(1100),
            sig: None,
        }
    }

    fn v(r: RequestRecord, rev: u64) -> Versioned<RequestRecord> {
        Versioned {
            value: r,
            revision: rev,
        }
    }

    #[test]
    fn claims_are_indexed_per_node_and_unindexed_on_finish() {
        let mut view = View::new(10);
        view.caught_up = true;
        let r = rec("a");
        assert_eq!(view.apply(v(r.clone(), 1), Timestamp(1000)).before, None);
        let c = claim_n1();
        let claimed = r.claim(1, c.clone(), Timestamp(1100)).unwrap();
        assert_eq!(
            view.apply(v(claimed.clone(), 2), Timestamp(1100)).before,
            Some(State::Queued)
        );
        assert_eq!(view.claims_of(&c.node), vec![r.spec.id.clone()]);
        let active = claimed
            .start_build(&c, Timestamp(1200))
            .unwrap()
            .activate(&c, Timestamp(1500))
            .unwrap();
        view.apply(v(active.clone(), 3), Timestamp(1500));
        assert_eq!(view.latency_to_active().p50_ms, Some(500));
        assert_eq!(view.latency_to_claim().p50_ms, Some(100));
        let (del, _) = active.request_delete(Timestamp(1600));
        view.apply(v(del.clone(), 4), Timestamp(1600));
        assert_eq!(
            view.claims_of(&c.node).len(),
            1,
            "deleting still holds the node"
        );
        let gone = del.deleted(&c, Timestamp(1700)).unwrap();
        view.apply(v(gone, 5), Timestamp(1700));
        assert!(view.claims_of(&c.node).is_empty());
        assert!(view.get(&r.spec.id).is_none());
        assert_eq!(view.finished().count(), 1);
        assert!(view.placement_rate(Timestamp(2000)) > 0.0);
    }

    /// The state index agrees with the open records themselves.
    fn assert_state_index(view: &View) {
        let mut brute: BTreeMap<State, BTreeSet<RequestId>> = BTreeMap::new();
        for r in view.open().map(|v| &v.value) {
            brute.entry(r.state).or_default().insert(r.spec.id.clone());
        }
        let counts: BTreeMap<State, usize> = brute.iter().map(|(s, ids)| (*s, ids.len())).collect();
        assert_eq!(view.counts(), counts);
        for (state, ids) in &brute {
            let indexed: BTreeSet<RequestId> = view
                .in_state(*state)
                .map(|v| v.value.spec.id.clone())
                .collect();
            assert_eq!(&indexed, ids, "{state:?}");
        }
    }

    #[test]
    fn the_state_index_follows_every_change() {
        let mut view = View::new(10);
        view.caught_up = true;
        let c = claim_n1();
        let mut rev = 0;
        let mut step = |view: &mut View, r: &RequestRecord| {
            rev += 1;
            view.apply(v(r.clone(), rev), Timestamp(1000 + rev));
            assert_state_index(view);
        };
        let a = rec("a");
        let b = rec("b");
        step(&mut view, &a);
        step(&mut view, &b);
        let claimed = a.claim(1, c.clone(), Timestamp(1100)).unwrap();
        step(&mut view, &claimed);
        let building = claimed.start_build(&c, Timestamp(1200)).unwrap();
        step(&mut view, &building);
        let active = building.activate(&c, Timestamp(1300)).unwrap();
        step(&mut view, &active);
        assert_eq!(view.in_state(State::Queued).count(), 1, "b waits");
        let (deleting, _) = active.request_delete(Timestamp(1400));
        step(&mut view, &deleting);
        step(&mut view, &deleting.deleted(&c, Timestamp(1500)).unwrap());
        assert!(view.in_state(State::Deleting).next().is_none());
        // a key that vanished from KV leaves the index too
        view.remove("b");
        assert_state_index(&view);
        assert!(view.counts().is_empty());
    }

    #[test]
    fn demand_counts_arrivals_and_decays() {
        let mut view = View::new(10);
        for i in 0..10 {
            let mut r = rec(&format!("d{i}"));
            r.created_at = Timestamp(60_000 * i);
            view.apply(v(r, i + 1), Timestamp(0));
        }
        let now = Timestamp(600_000);
        let d = view.demand(now);
        let class = rec("x").shard.class();
        let rate = d[&class];
        assert!(
            rate > 0.5 && rate < 1.5,
            "one request a minute, averaged over 5 minutes: {rate}"
        );
        let later = view.demand(Timestamp(600_000 + 3_600_000));
        assert!(later.is_empty(), "an hour of silence decays it away");
    }

    #[test]
    fn admission_by_node_shapes() {
        let mut view = View::new(10);
        let spec = rec("x").spec;
        let t = Timestamp(1_000_000);
        assert!(!view.admissible(&spec, t), "no nodes, no admission");
        let advert = |id: &str, mem: u64| placement::wire::NodeAdvert {
            v: 1,
            node: NodeId::new(id).unwrap(),
            epoch: placement::Epoch(1),
            zone: placement::Zone::new("az1").unwrap(),
            traits: vec![],
            totals: Resources::new(8, mem, 100),
            reserved: Resources::default(),
            ratios: placement::AllocationRatios::default(),
            capacity: Resources::new(8, mem, 100),
            unallocated: Resources::new(8, mem, 100),
            vms: 0,
            building: 0,
            state: placement::wire::NodeState::Active,
            state_reason: None,
            overcommitted: false,
            agent_version: "t".into(),
            driver: "memory".into(),
            started_at: Timestamp(0),
            heartbeat_at: Timestamp(0),
            public_key: None,
            pack_tier: 0,
            guard: Default::default(),
        };
        view.upsert_advert(advert("a", 512));
        assert!(!view.admissible(&spec, t), "too small");
        view.upsert_advert(advert("b", 4096));
        view.upsert_advert(advert("b", 4096)); // a heartbeat
        assert!(view.admissible(&spec, t));
        view.remove_advert(&NodeId::new("b").unwrap(), t);
        assert_eq!(view.adverts().len(), 1);
        // a node whose lease just ended (a NATS failover) may come back: still admitted
        assert!(view.admissible(&spec, t.plus(std::time::Duration::from_secs(5))));
        // gone for longer than the admission memory: refused
        assert!(!view.admissible(&spec, t.plus(ADMISSION_MEMORY)));
        // back again: admitted, and remembered no more as departed
        view.upsert_advert(advert("b", 4096));
        assert!(view.admissible(&spec, t.plus(ADMISSION_MEMORY)));
    }

    #[test]
    fn queued_by_class_and_failures() {
        let mut view = View::new(2);
        view.caught_up = true;
        let a = rec("a");
        let mut b = rec("b");
        b.queued_at = Timestamp(500);
        view.apply(v(a.clone(), 1), Timestamp(1000));
        view.apply(v(b, 2), Timestamp(1000));
        let q = view.queued_by_class();
        let cq = q.get(&a.shard.class()).unwrap();
        assert_eq!((cq.count, cq.oldest), (2, Timestamp(500)));
        assert_eq!(cq.smallest, a.spec.resources);
        view.apply(
            v(a.fail(1, "no room", Timestamp(2000)).unwrap(), 3),
            Timestamp(2000),
        );
        assert_eq!(view.failures().next().unwrap().reason, "no room");
        assert_eq!(view.counts().get(&State::Queued), Some(&1));
        for i in 0..5 {
            let r = rec(&format!("x{i}"));
            view.apply(
                v(r.fail(1, "x", Timestamp(1)).unwrap(), 10 + i),
                Timestamp(1),
            );
        }
        assert_eq!(view.finished().count(), 2, "finished records are capped");
    }
}
