//! Time has an owner (DESIGN.md): durable timers fire spill-over and the final deadline; a
//! periodic sweep catches whatever a crash left undone (a missing hint, a missed timer, a claim
//! of a dead or restarted node, a delete command never sent) and keeps one backlog flag per
//! class.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bus::Versioned;
use futures::StreamExt;
use placement::explain::explain;
use placement::flag_writes::{FlagWrites, flag_writes, guard_reach, whole_flag};
use placement::lifecycle::{Claim, RequestRecord, State, TransitionError};
use placement::shard::ClassKey;
use placement::takers::{draws_in, eligible_draws, flag_since, settle_takers};
use placement::wire::{
    BacklogFlag, ClassDemand, CommandKind, DemandEntry, NodeCommand, TimerKind, WIRE_VERSION,
};
use placement::{Epoch, Lane, RequestId, Timestamp};

use crate::metrics as m;
use crate::service::Dispatcher;
use crate::standing::{StandingInput, standing_flags};
use crate::view::ClassQueue;

/// Demand is re-written at least this often (and sooner when it changes).
const DEMAND_REFRESH: Duration = Duration::from_secs(30);

/// Two demand snapshots are alike when they name the same classes at rates within 20%.
fn similar(a: &[DemandEntry], b: &[DemandEntry]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.tclass == y.tclass
                && x.size == y.size
                && (x.per_min - y.per_min).abs() <= 0.2 * x.per_min.max(y.per_min)
        })
}

/// A delete command is re-sent when the record has been `deleting` this long.
const COMMAND_RESEND: Duration = Duration::from_secs(30);

/// Notes what one of `class`'s flag keys now holds (written).
pub(crate) fn remember_flag_key(
    flags: &mut std::collections::BTreeMap<ClassKey, placement::flag_writes::StoredFlag>,
    class: &ClassKey,
    slot: placement::flag_writes::FlagSlot,
    flag: BacklogFlag,
) {
    flags.entry(class.clone()).or_default().insert(slot, flag);
}

/// Forgets one of `class`'s flag keys (deleted), and the class once it has none left.
pub(crate) fn forget_flag_key(
    flags: &mut std::collections::BTreeMap<ClassKey, placement::flag_writes::StoredFlag>,
    class: &ClassKey,
    slot: placement::flag_writes::FlagSlot,
) {
    if let Some(stored) = flags.get_mut(class) {
        stored.remove(&slot);
        if stored.is_empty() {
            flags.remove(class);
        }
    }
}

impl Dispatcher {
    /// Consumes timer fires from the shared consumer (each fire goes to one dispatcher).
    pub async fn timer_loop(self: Arc<Self>) {
        loop {
            let messages = match self.bus.timers.consumer().await {
                Ok(c) => c.messages().await,
                Err(e) => Err(async_nats::jetstream::consumer::StreamError::with_source(
                    async_nats::jetstream::consumer::StreamErrorKind::Other,
                    e,
                )),
            };
            let mut messages = match messages {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot consume timers; retrying");
                    tokio::select! {
                        _ = self.cancel.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            loop {
                let msg = tokio::select! {
                    _ = self.cancel.cancelled() => return,
                    m = messages.next() => m,
                };
                let Some(msg) = msg else { break };
                let Ok(msg) = msg else { continue };
                let timer = match bus::timers::decode_fire(&msg.payload) {
                    Ok(t) => t,
                    Err(e) => {
                        metrics::counter!(m::HOSTILE, "kind" => "timer").increment(1);
                        tracing::warn!(error = %e, "dropping an undecodable timer");
                        let _ = msg.ack_with(async_nats::jetstream::AckKind::Term).await;
                        continue;
                    }
                };
                let outcome = self.on_timer(&timer.id, timer.attempt, timer.kind).await;
                metrics::counter!(m::TIMERS, "kind" => timer.kind.as_str(), "outcome" => outcome)
                    .increment(1);
                if outcome == "retry" {
                    let _ = msg
                        .ack_with(async_nats::jetstream::AckKind::Nak(Some(
                            Duration::from_secs(1),
                        )))
                        .await;
                } else {
                    let _ = msg.ack().await;
                }
            }
        }
    }

    async fn on_timer(&self, id: &RequestId, attempt: u32, kind: TimerKind) -> &'static str {
        let current = match self.bus.records.get(id).await {
            Ok(Some(v)) => v,
            Ok(None) => return "stale",
            Err(_) => return "retry",
        };
        if current.value.state != State::Queued || current.value.attempt != attempt {
            return "stale";
        }
        match kind {
            TimerKind::Deadline => self.fail_deadline(current).await,
        }
    }

    /// Publishes the spill-lane hint, marks the record, raises the class's backlog flag.
    async fn spill(&self, current: Versioned<RequestRecord>) -> &'static str {
        let now = common::clock::now();
        let r = &current.value;
        // no copy: the record is marked spilled right after, so its revision moves on
        if self.publish_hint(r, None, Lane::Spill, now).await.is_err() {
            return "retry";
        }
        let attempt = r.attempt;
        let after = self.spill_after(r.shard.class().size);
        self.raise_flag(r.shard.class(), None, r.queued_at.plus(after), now)
            .await;
        self.schedule_deadline(r).await;
        match self
            .bus
            .records
            .update_from(&r.spec.id.clone(), Some(current), |r| {
                r.mark_spilled(attempt, now)
            })
            .await
        {
            Ok(_) => "spilled",
            Err(bus::records::UpdateError::Transition(_)) => "stale",
            Err(_) => "retry",
        }
    }

    /// Answers a queued request past its deadline: failed, with a Nomad-style explanation.
    async fn fail_deadline(&self, current: Versioned<RequestRecord>) -> &'static str {
        let now = common::clock::now();
        if now < current.value.deadline_at {
            return "early";
        }
        let reason = {
            let adverts: Vec<_> = self.view().adverts().values().cloned().collect();
            let r = &current.value;
            let e = explain(&r.spec, &adverts, &r.excluded);
            format!(
                "no node took it within {}s: {}",
                r.spec.deadline_s, e.summary
            )
        };
        let id = current.value.spec.id.clone();
        match self
            .bus
            .records
            .update_from(&id, Some(current), |r| r.expire(&reason, now))
            .await
        {
            Ok(_) => {
                tracing::info!(request.id = %id, reason, "request failed at its deadline");
                "failed"
            }
            Err(bus::records::UpdateError::Transition(_)) => "stale",
            Err(_) => "retry",
        }
    }

    /// The class's spill deadline from the shard map.
    fn spill_after(&self, size: u8) -> std::time::Duration {
        self.cluster
            .read()
            .expect("cluster lock")
            .shard_map
            .spill_after(size)
    }

    /// Raises (or refreshes) `class`'s backlog flag. `since` is when the class became backed
    /// up (its oldest waiting request's spill deadline); a flag still backed up keeps its
    /// first `since` (`placement::takers::flag_since`), so the pack tiers and the starvation
    /// guard count from one instant. The flag's takers (per partition with requests waiting)
    /// are settled against the nodes' advertisements each sweep (`placement::takers`). A flag
    /// is stored per partition, kind of node and election bucket, in the buckets with a node
    /// that may act on it (`placement::flag_writes`): a key is written when the flag is first
    /// raised there, when what it holds of the takers or the flag's `since` move, and every
    /// `FLAG_REFRESH`. `queue` is the class's queue when the caller has measured it (the
    /// sweep); without it (a spill) only a new flag is raised.
    async fn raise_flag(
        &self,
        class: ClassKey,
        queue: Option<&ClassQueue>,
        since: Timestamp,
        now: Timestamp,
    ) {
        let stored = self.flags.lock().expect("flags lock").get(&class).cloned();
        let prev = stored.as_ref().and_then(whole_flag);
        if prev.is_some() && queue.is_none() {
            return; // raised already; the sweep keeps it current
        }
        let (flag, reach) = {
            let view = self.view();
            let measured = match queue {
                Some(q) => Some(q.clone()),
                None => view.queued_by_class().get(&class).cloned(),
            };
            let measured = measured.unwrap_or_else(|| ClassQueue {
                count: 1,
                oldest: since,
                smallest: placement::Resources::default(),
                by_part: Default::default(),
            });
            let mut flag = BacklogFlag {
                v: WIRE_VERSION,
                class: class.clone(),
                since: flag_since(prev.as_ref(), since, now),
                oldest_age_ms: now
                    .since(measured.oldest)
                    .as_millis()
                    .try_into()
                    .unwrap_or(u64::MAX),
                depth: measured.count,
                smallest: measured.smallest,
                updated_at: now,
                takers: None,
            };
            // no partition known (no queue in the view): every node acts, as without takers
            if !measured.by_part.is_empty() {
                let cluster = self.cluster.read().expect("cluster lock");
                let draws = eligible_draws(view.adverts().values(), &cluster.shard_map, &flag);
                flag.takers = Some(settle_takers(
                    |part, empty| draws_in(&draws, part, empty),
                    &measured.by_part,
                    prev.as_ref(),
                ));
            }
            (flag, guard_reach(view.adverts().values(), &class))
        };
        let writes = flag_writes(
            stored.as_ref(),
            Some(&flag),
            self.partitions(&class),
            reach,
            now,
        );
        self.write_flag(&class, &writes).await;
    }

    /// The partitions of `class` in the shard map in force.
    fn partitions(&self, class: &ClassKey) -> u16 {
        self.cluster
            .read()
            .expect("cluster lock")
            .shard_map
            .partitions(class.size)
    }

    /// Writes and deletes a flag's keys, and notes each one done in `flags`.
    async fn write_flag(&self, class: &ClassKey, writes: &FlagWrites) {
        for (slot, stored) in &writes.put {
            if self.bus.cluster.put_flag(*slot, stored).await.is_ok() {
                let mut flags = self.flags.lock().expect("flags lock");
                remember_flag_key(&mut flags, class, *slot, stored.clone());
            }
        }
        for slot in &writes.delete {
            if self.bus.cluster.clear_flag(class, *slot).await.is_ok() {
                forget_flag_key(&mut self.flags.lock().expect("flags lock"), class, *slot);
            }
        }
        metrics::counter!(m::FLAG_WRITES).increment(writes.len() as u64);
    }

    /// Sweeps every `sweep_interval`.
    pub async fn sweep_loop(self: Arc<Self>) {
        let mut checked: HashMap<RequestId, Timestamp> = HashMap::new();
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(self.cfg.sweep_interval) => {}
            }
            if !self.view().caught_up || !self.conn.is_connected() {
                continue;
            }
            self.sweep(&mut checked).await;
        }
    }

    /// One pass over the requests that wait (queued, deleting) and the nodes that hold
    /// claims, then the flags and gauges. Running VMs are not walked: reaping goes by node.
    pub async fn sweep(&self, checked: &mut HashMap<RequestId, Timestamp>) {
        let now = common::clock::now();
        let waiting: Vec<Versioned<RequestRecord>> = {
            let view = self.view();
            view.in_state(State::Queued)
                .chain(view.in_state(State::Deleting))
                .cloned()
                .collect()
        };
        let spill_after = |size: u8| {
            self.cluster
                .read()
                .expect("cluster lock")
                .shard_map
                .spill_after(size)
        };
        {
            let queued: HashSet<&RequestId> = waiting
                .iter()
                .filter(|v| v.value.state == State::Queued)
                .map(|v| &v.value.spec.id)
                .collect();
            checked.retain(|id, _| queued.contains(id));
        }
        for v in waiting {
            let r = &v.value;
            match r.state {
                State::Queued => {
                    if now >= r.deadline_at {
                        let fresh = self.bus.records.get(&r.spec.id).await.ok().flatten();
                        if let Some(f) = fresh.filter(|f| f.value.state == State::Queued) {
                            let out = self.fail_deadline(f).await;
                            metrics::counter!(m::SWEEP, "action" => "deadline")
                                .increment(u64::from(out == "failed"));
                        }
                    } else if !r.spilled && now >= r.queued_at.plus(spill_after(r.shard.size)) {
                        let out = self.spill(v.clone()).await;
                        metrics::counter!(m::SWEEP, "action" => "spill")
                            .increment(u64::from(out == "spilled"));
                    } else if now.since(r.queued_at) >= self.cfg.hint_check_after
                        && checked
                            .get(&r.spec.id)
                            .is_none_or(|t| now.since(*t) >= self.cfg.hint_check_after)
                    {
                        checked.insert(r.spec.id.clone(), now);
                        if let Ok(false) =
                            self.bus.hints.exists(&r.shard, Lane::Fit, &r.spec.id).await
                        {
                            tracing::warn!(request.id = %r.spec.id, "queued request had no hint; re-published");
                            metrics::counter!(m::SWEEP, "action" => "rehint").increment(1);
                            if let Err(e) = self
                                .bus
                                .hints
                                .republish(r, Lane::Fit, now, now.as_millis())
                                .await
                            {
                                tracing::warn!(request.id = %r.spec.id, error = %e, "hint repair failed; the next sweep retries");
                            }
                        }
                    }
                }
                State::Deleting => {
                    if now.since(r.updated_at) >= COMMAND_RESEND
                        && let Some(node) = r.node()
                    {
                        let cmd = NodeCommand {
                            v: WIRE_VERSION,
                            kind: CommandKind::Delete,
                            request: r.spec.id.clone(),
                            issued_at: now,
                        };
                        if self.bus.commands.send(node, &cmd).await.is_ok() {
                            metrics::counter!(m::SWEEP, "action" => "resend_delete").increment(1);
                        }
                    }
                }
                _ => {}
            }
        }
        for (id, claim, live) in self.stale_claims(now) {
            self.reap_claim(&id, &claim, live, now).await;
        }
        self.sweep_flags(now).await;
        self.publish_demand(now).await;
        self.gauges(now);
    }

    /// Claims (claimed, building, active) the sweep reaps: those of nodes without a lease,
    /// and those of an earlier epoch than the node's advert once the node has had
    /// `reap_grace` to re-confirm them. Each claim comes with the node's live epoch (None:
    /// no lease). The walk is per node; only the claims of such nodes are looked at.
    fn stale_claims(&self, now: Timestamp) -> Vec<(RequestId, Claim, Option<Epoch>)> {
        let view = self.view();
        let mut out = Vec::new();
        for (node, ids) in view.holders() {
            let live = match view.adverts().get(node) {
                None => None,
                Some(a) if now.since(a.started_at) >= self.cfg.reap_grace => Some(a.epoch),
                Some(_) => continue,
            };
            for id in ids {
                let Some(r) = view.get(id).map(|v| &v.value) else {
                    continue;
                };
                if !matches!(r.state, State::Claimed | State::Building | State::Active) {
                    continue;
                }
                if let Some(c) = r
                    .claim
                    .as_ref()
                    .filter(|c| live.is_none_or(|e| e > c.epoch))
                {
                    out.push((id.clone(), c.clone(), live));
                }
            }
        }
        out
    }

    async fn reap_claim(&self, id: &RequestId, claim: &Claim, live: Option<Epoch>, now: Timestamp) {
        let max = self.cluster().max_attempts;
        let res = self
            .bus
            .records
            .update(id, |cur| match &cur.claim {
                Some(cc) if cc.same(claim) => cur.reap(live, max, now),
                _ => Err(TransitionError::NotStale),
            })
            .await;
        if res.is_ok() {
            metrics::counter!(m::SWEEP, "action" => "reap").increment(1);
            tracing::warn!(request.id = %id, node.id = %claim.node, "stale claim reaped by the sweep");
        }
    }

    async fn sweep_flags(&self, now: Timestamp) {
        let queued = self.view().queued_by_class();
        let mut backed_up = Vec::new();
        for (class, q) in &queued {
            // flagged early, dated from the spill deadline (a flag's `since`, which the pack
            // tiers, near-fit takers and the starvation guard count from, may lie ahead)
            let after = self.spill_after(class.size);
            if now.since(q.oldest) >= after.min(self.cfg.flag_after) {
                backed_up.push((class.clone(), q.oldest.plus(after)));
            }
        }
        for (class, since) in &backed_up {
            self.raise_flag(class.clone(), queued.get(class), *since, now)
                .await;
        }
        let standing = self.standing_flags(&backed_up, now);
        for f in &standing {
            let stored = self
                .flags
                .lock()
                .expect("flags lock")
                .get(&f.class)
                .cloned();
            let parts = self.partitions(&f.class);
            let writes = flag_writes(stored.as_ref(), Some(f), parts, 0.0, now);
            self.write_flag(&f.class, &writes).await;
        }
        metrics::gauge!(m::STANDING_FLAGS).set(standing.len() as f64);
        let stale: Vec<ClassKey> = self
            .flags
            .lock()
            .expect("flags lock")
            .keys()
            .filter(|k| !backed_up.iter().any(|(c, _)| c == *k))
            .filter(|k| !standing.iter().any(|f| f.class == **k))
            .cloned()
            .collect();
        for class in stale {
            let stored = self.flags.lock().expect("flags lock").get(&class).cloned();
            let writes = flag_writes(stored.as_ref(), None, 0, 0.0, now);
            self.write_flag(&class, &writes).await;
        }
    }

    /// This sweep's standing flags (`crate::standing`), for the classes not `backed_up`.
    fn standing_flags(
        &self,
        backed_up: &[(ClassKey, Timestamp)],
        now: Timestamp,
    ) -> Vec<BacklogFlag> {
        if self.cfg.standing_below == 0 {
            return Vec::new();
        }
        // the flags as last written, read first: the flags lock is never held with the view's
        let prev: HashMap<ClassKey, BacklogFlag> = self
            .flags
            .lock()
            .expect("flags lock")
            .iter()
            .filter_map(|(c, stored)| Some((c.clone(), whole_flag(stored)?)))
            .collect();
        let view = self.view();
        let cluster = self.cluster.read().expect("cluster lock");
        let demand = view.demand(now);
        let input = StandingInput {
            demand: &demand,
            adverts: view.adverts(),
            map: &cluster.shard_map,
            below: self.cfg.standing_below,
            now,
        };
        standing_flags(
            &input,
            |c| backed_up.iter().any(|(b, _)| b == c),
            |c| prev.get(c).cloned(),
        )
    }

    /// Writes each zone's class demand, so nodes spend credit on classes that are asked for.
    async fn publish_demand(&self, now: Timestamp) {
        let demand = self.view().demand(now);
        let zones = self.cluster().shard_map.zones;
        for zone in zones {
            let rates: Vec<DemandEntry> = demand
                .iter()
                .filter(|(k, _)| k.zone == zone)
                .map(|(k, r)| DemandEntry {
                    tclass: k.tclass.clone(),
                    size: k.size,
                    per_min: placement::demand::published(*r),
                })
                .collect();
            let due = {
                let last = self.demand_sent.lock().expect("demand lock");
                match last.get(&zone) {
                    Some((at, prev)) => now.since(*at) >= DEMAND_REFRESH || !similar(prev, &rates),
                    None => !rates.is_empty(),
                }
            };
            if !due {
                continue;
            }
            let d = ClassDemand {
                v: WIRE_VERSION,
                zone: zone.clone(),
                rates: rates.clone(),
                updated_at: now,
            };
            if self.bus.cluster.put_demand(&d).await.is_ok() {
                self.demand_sent
                    .lock()
                    .expect("demand lock")
                    .insert(zone, (now, rates));
            }
        }
    }

    fn gauges(&self, now: Timestamp) {
        let view = self.view();
        for (class, q) in view.queued_by_class() {
            let label = class.to_string();
            metrics::gauge!(m::QUEUE_DEPTH, "class" => label.clone()).set(q.count as f64);
            metrics::gauge!(m::QUEUE_OLDEST, "class" => label)
                .set(now.since(q.oldest).as_secs_f64());
        }
        for (state, n) in view.counts() {
            metrics::gauge!(m::OPEN, "state" => state.as_str()).set(n as f64);
        }
        let mut by_state: HashMap<&'static str, usize> = HashMap::new();
        let mut unalloc = placement::Resources::default();
        for a in view.adverts().values() {
            *by_state.entry(a.state.as_str()).or_insert(0) += 1;
            unalloc = unalloc.checked_add(&a.unallocated).unwrap_or(unalloc);
        }
        for (state, n) in by_state {
            metrics::gauge!(m::NODES, "state" => state).set(n as f64);
        }
        for (dim, v) in unalloc.dims() {
            metrics::gauge!(m::CLUSTER_UNALLOCATED, "resource" => dim.as_str().to_string())
                .set(v as f64);
        }
    }
}
