//! Watches and reactions: the view follows KV; a queued record's hint is published by whoever
//! sees it first (the `Nats-Msg-Id` dedupes the rest), so a re-queue by a node or a reap by
//! another dispatcher gets its hint without anyone owning it; a node whose lease ends has its
//! claims reaped at once.

use std::sync::Arc;
use std::time::Duration;

use bus::Versioned;
use bus::cluster::ClusterEvent;
use bus::nodes::NodeEvent;
use bus::records::RecordEvent;
use futures::StreamExt;
use placement::lifecycle::{RequestRecord, State, TransitionError};
use placement::{ClaimToken, Epoch, Lane, NodeId, RequestId};
use tokio::sync::mpsc;

use crate::claims::{self, ClaimCheck, Pending, Prepared};
use crate::metrics as m;
use crate::service::Dispatcher;
use crate::view::Applied;

/// Signatures verified at once at most (batch verification gains little past this).
const VERIFY_BATCH: usize = 64;

/// Signed claims waiting for the verifier before the record watch waits for it.
pub const VERIFY_QUEUE: usize = 65_536;

impl Dispatcher {
    /// Follows the requests bucket.
    pub async fn record_loop(self: Arc<Self>) {
        loop {
            let mut stream = match self.bus.records.watch_all().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch requests; retrying");
                    tokio::select! {
                        _ = self.cancel.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            loop {
                let ev = tokio::select! {
                    _ = self.cancel.cancelled() => return,
                    ev = stream.next() => ev,
                };
                let Some(ev) = ev else { break };
                match ev {
                    RecordEvent::Put(v) => {
                        let v = *v;
                        let applied = self
                            .view
                            .write()
                            .expect("view lock")
                            .apply(v.clone(), common::clock::now());
                        let _ = self.changes.send(Arc::new(v.clone()));
                        self.react(&v, &applied).await;
                    }
                    RecordEvent::Removed(key) => self.view.write().expect("view lock").remove(&key),
                    RecordEvent::Undecodable { key, error } => {
                        metrics::counter!(m::HOSTILE, "kind" => "record").increment(1);
                        tracing::warn!(key, error, "ignoring an undecodable request record");
                    }
                    RecordEvent::Caught => {
                        let mut view = self.view.write().expect("view lock");
                        if !view.caught_up {
                            view.caught_up = true;
                            tracing::info!(open = view.open().count(), "request view caught up");
                        }
                    }
                }
            }
        }
    }

    /// Checks a record's claim once per claim: what needs no signature check is decided
    /// here, a signature goes to the verifier ([`Dispatcher::verify_loop`]) and the record's
    /// reactions go on meanwhile (a forged claim is undone when the verifier finds it).
    /// False when the claim is forged already by its form.
    async fn check_claim(&self, r: &RequestRecord) -> bool {
        let Some(claim) = &r.claim else { return true };
        let prepared = {
            let view = self.view();
            let mut verified = self.verified.lock().expect("verified lock");
            if verified.contains(&r.spec.id, claim.token) {
                return true;
            }
            let prepared = claims::prepare(r, view.adverts().get(&claim.node), &mut verified);
            if matches!(
                prepared,
                Prepared::Signed(_) | Prepared::Done(ClaimCheck::Valid | ClaimCheck::Unverifiable)
            ) {
                verified.insert(r.spec.id.clone(), claim.token);
            }
            prepared
        };
        match prepared {
            Prepared::Signed(p) => {
                if self.verify_tx.send(*p).await.is_err() {
                    tracing::debug!(request.id = %r.spec.id, "verifier stopped; shutting down");
                }
                true
            }
            // UnknownNode: not advertised (yet); the sweep reaps claims of nodes without a lease
            Prepared::Done(
                ClaimCheck::Valid
                | ClaimCheck::Unverifiable
                | ClaimCheck::UnknownNode
                | ClaimCheck::Nothing,
            ) => true,
            Prepared::Done(ClaimCheck::Forged(why)) => {
                self.undo_forged(&r.spec.id, &claim.node, claim.token, &why)
                    .await;
                false
            }
        }
    }

    /// Verifies the signatures the record watch hands over, as many at once as have queued
    /// up (batch verification), on the blocking pool; undoes the forged ones.
    pub async fn verify_loop(self: Arc<Self>, mut rx: mpsc::Receiver<Pending>) {
        loop {
            let first = tokio::select! {
                _ = self.cancel.cancelled() => return,
                p = rx.recv() => match p {
                    Some(p) => p,
                    None => return,
                },
            };
            let mut batch = vec![first];
            while batch.len() < VERIFY_BATCH {
                match rx.try_recv() {
                    Ok(p) => batch.push(p),
                    Err(_) => break,
                }
            }
            let checked = tokio::task::spawn_blocking(move || {
                let ok = claims::verify(&batch);
                (batch, ok)
            })
            .await;
            let (batch, ok) = match checked {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "claim verification panicked");
                    continue;
                }
            };
            for p in batch.iter().zip(ok).filter(|(_, ok)| !ok).map(|(p, _)| p) {
                self.verified
                    .lock()
                    .expect("verified lock")
                    .forget(&p.id, p.token);
                self.undo_forged(&p.id, &p.node, p.token, &p.forged_reason())
                    .await;
            }
        }
    }

    /// Counts a forged claim and undoes it: the request is queued again for its next
    /// attempt, if the record still carries that claim.
    async fn undo_forged(&self, id: &RequestId, node: &NodeId, token: ClaimToken, why: &str) {
        metrics::counter!(m::HOSTILE, "kind" => "forged_claim").increment(1);
        tracing::warn!(request.id = %id, node.id = %node, reason = %why, "forged claim; undoing it");
        let max = self.cluster().max_attempts;
        let now = common::clock::now();
        let reason = format!("{why}: refused");
        let res = self
            .bus
            .records
            .update(id, |cur| match &cur.claim {
                Some(c) if c.token == token => cur.refuse_forged(&reason, max, now),
                _ => Err(TransitionError::NotStale),
            })
            .await;
        if let Err(e) = res {
            tracing::debug!(request.id = %id, error = %e, "forged claim already undone");
        }
    }

    async fn react(&self, v: &Versioned<RequestRecord>, applied: &Applied) {
        let r = &v.value;
        if !self.check_claim(r).await {
            return;
        }
        if r.state == State::Queued {
            let hinted = self
                .hinted
                .lock()
                .expect("hinted lock")
                .contains(&(r.spec.id.clone(), r.attempt));
            if !hinted {
                let now = common::clock::now();
                if let Err(e) = self.publish_hint(r, Some(v.revision), Lane::Fit, now).await {
                    tracing::warn!(request.id = %r.spec.id, error = %e, "hint not published; the sweep retries");
                }
                if r.spilled {
                    let _ = self
                        .publish_hint(r, Some(v.revision), Lane::Spill, now)
                        .await;
                }
            }
            return;
        }
        if applied.before_spilled {
            // nobody takes a spilled hint of a request that left the queue: remove it
            if let Err(e) = self
                .bus
                .hints
                .purge(&r.shard, Lane::Spill, &r.spec.id)
                .await
            {
                tracing::debug!(request.id = %r.spec.id, error = %e, "spilled hint not purged; it expires with the stream's max age");
            }
        }
        {
            let mut hinted = self.hinted.lock().expect("hinted lock");
            hinted.remove(&(r.spec.id.clone(), r.attempt));
            if let Some(a) = applied.before_attempt {
                hinted.remove(&(r.spec.id.clone(), a));
            }
        }
        if !self.view().caught_up || applied.before == Some(r.state) {
            return;
        }
        match r.state {
            State::Claimed => {
                if let Some(c) = &r.claim {
                    metrics::histogram!(m::TO_CLAIM).record(c.at.since(r.queued_at).as_secs_f64());
                }
            }
            State::Active => {
                if let Some(at) = r.active_at {
                    metrics::histogram!(m::TO_ACTIVE).record(at.since(r.queued_at).as_secs_f64());
                }
                metrics::histogram!(m::ATTEMPTS).record(f64::from(r.attempt));
                metrics::counter!(m::OUTCOMES, "state" => "active").increment(1);
            }
            State::Failed | State::HostDown | State::Deleted => {
                metrics::counter!(m::OUTCOMES, "state" => r.state.as_str()).increment(1);
            }
            _ => {}
        }
    }

    /// Follows node adverts; a node whose lease ended has its claims reaped.
    pub async fn node_loop(self: Arc<Self>) {
        loop {
            let mut stream = match self.bus.nodes.watch_all().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch nodes; retrying");
                    tokio::select! {
                        _ = self.cancel.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            loop {
                let ev = tokio::select! {
                    _ = self.cancel.cancelled() => return,
                    ev = stream.next() => ev,
                };
                let Some(ev) = ev else { break };
                match ev {
                    NodeEvent::Put(a) => {
                        let a = a.value;
                        let prev = self
                            .view
                            .write()
                            .expect("view lock")
                            .upsert_advert(a.clone());
                        match prev {
                            None => {
                                tracing::info!(node.id = %a.node, epoch = %a.epoch, zone = %a.zone, "node joined")
                            }
                            Some(p) if p.epoch != a.epoch => {
                                tracing::info!(node.id = %a.node, old = %p.epoch, new = %a.epoch, "node started a new epoch")
                            }
                            _ => {}
                        }
                    }
                    NodeEvent::Gone(key) => {
                        let Ok(node) = NodeId::new(key.as_str()) else {
                            continue;
                        };
                        let ended = self
                            .view
                            .write()
                            .expect("view lock")
                            .remove_advert(&node, common::clock::now())
                            .map(|a| a.epoch);
                        tracing::warn!(node.id = %node, "node lease ended; reaping its claims");
                        let me = self.clone();
                        self.tasks
                            .spawn(async move { me.reap_node(&node, ended).await });
                    }
                    NodeEvent::Caught => {
                        let mut view = self.view.write().expect("view lock");
                        if !view.nodes_caught_up {
                            view.nodes_caught_up = true;
                            tracing::info!(nodes = view.adverts().len(), "node view caught up");
                        }
                    }
                    NodeEvent::Undecodable { key, error } => {
                        metrics::counter!(m::HOSTILE, "kind" => "advert").increment(1);
                        tracing::warn!(key, error, "ignoring an undecodable advert");
                    }
                }
            }
        }
    }

    /// Reaps every open claim `node` holds under the epoch of its lease that `ended` or an
    /// earlier one (`None`: that epoch is unknown, so every claim). A claim the node already
    /// re-confirmed under a newer epoch stays. Claimed and building requests are re-queued;
    /// active ones become `host_down`. Returns how many records changed.
    pub async fn reap_node(&self, node: &NodeId, ended: Option<Epoch>) -> usize {
        let ids = self.view().claims_of(node);
        let max = self.cluster().max_attempts;
        let mut n = 0;
        for id in ids {
            let now = common::clock::now();
            let res = self
                .bus
                .records
                .update(&id, |r| match &r.claim {
                    Some(c) if &c.node == node && r.state != State::Deleting => {
                        r.reap_expired(ended, max, now)
                    }
                    _ => Err(TransitionError::NotStale),
                })
                .await;
            if let Ok(v) = res {
                n += 1;
                let kind = match v.value.state {
                    State::Queued => "requeued",
                    State::HostDown => "host_down",
                    _ => "failed",
                };
                metrics::counter!(m::REAPED, "kind" => kind).increment(1);
                tracing::warn!(request.id = %id, node.id = %node, kind, "claim reaped");
            }
        }
        n
    }

    /// Follows the cluster config (the shard map can grow) and the backlog flags.
    pub async fn cluster_loop(self: Arc<Self>) {
        loop {
            let mut stream = match self.bus.cluster.watch().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch cluster config; retrying");
                    tokio::select! {
                        _ = self.cancel.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            loop {
                let ev = tokio::select! {
                    _ = self.cancel.cancelled() => return,
                    ev = stream.next() => ev,
                };
                let Some(ev) = ev else { break };
                match ev {
                    ClusterEvent::Config(c) => {
                        let changed = self.cluster.read().expect("cluster lock").shard_map.version
                            != c.shard_map.version;
                        if changed && c.shard_map.validate().is_ok() {
                            tracing::info!(
                                version = c.shard_map.version,
                                "shard map changed; creating its shards"
                            );
                            if let Err(e) = self
                                .bus
                                .ensure_shards(&c.shard_map, &self.cfg.topology)
                                .await
                            {
                                tracing::error!(error = %e, "cannot create the new shards");
                            }
                            *self.cluster.write().expect("cluster lock") = *c;
                        }
                    }
                    ClusterEvent::Flag { slot, flag } => {
                        let mut flags = self.flags.lock().expect("flags lock");
                        let class = flag.class.clone();
                        crate::timekeeper::remember_flag_key(&mut flags, &class, slot, flag);
                    }
                    ClusterEvent::FlagCleared { class, slot } => {
                        let mut flags = self.flags.lock().expect("flags lock");
                        crate::timekeeper::forget_flag_key(&mut flags, &class, slot);
                    }
                    ClusterEvent::Demand(_) => {}
                }
            }
        }
    }
}
