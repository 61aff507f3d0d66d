//! The claim path: a delivered hint becomes a claim, or goes back, or goes away.
//!
//! The node reserves in its ledger under the lock with no await between fit check and reserve,
//! compare-and-swaps the record to `claimed`, then acks. After an error whose outcome is
//! unknown it re-reads the record from the stream leader and looks for its own token before
//! deciding it lost (DESIGN.md "Claim").

use std::sync::Arc;
use std::time::Duration;

use bus::Versioned;
use bus::puller::Delivery;
use bus::records::UpdateError;
use placement::checks::Rejection;
use placement::ledger::{PullId, Reserved};
use placement::lifecycle::{Claim, RequestRecord};
use placement::request::GroupPolicy;
use placement::step_aside::step_aside_for;
use placement::wire::{GroupPin, Hint, WIRE_VERSION, decode};
use placement::{ClaimToken, Lane, RequestId, ShardId};
use tracing::Instrument;

use crate::agent::{Agent, Owned, Phase};
use crate::decide::{Verdict, judge};
use crate::metrics as m;

/// Where a delivery came from: the pull that brought it (none when that pull had been
/// cancelled), whether one message's credit of it is still held for this delivery (a
/// reserve attempt spends it), and whether that pull is a cover pull (it held no credit: the
/// node makes room for what it brings, or passes it on at once; `placement::pull::cover`).
#[derive(Debug, Clone, Copy)]
struct Origin {
    pull: Option<PullId>,
    credit: bool,
    cover: bool,
}

impl Origin {
    /// The pull whose credit this delivery still holds.
    fn credit(self) -> Option<PullId> {
        self.pull.filter(|_| self.credit)
    }

    /// The same origin after a reserve attempt spent the credit.
    fn spent(self) -> Origin {
        Origin {
            credit: false,
            ..self
        }
    }
}

impl Agent {
    /// The credit of this delivery's message, if still held, goes back.
    fn give_back_credit(&self, from: Origin) {
        if let Some(p) = from.credit() {
            self.lock().ledger.return_unit(p);
        }
        self.replan.notify_one();
    }

    /// The rest of `pull` stops competing, and the node pulls the lane the message came on
    /// last for a while (`placement::step_aside`). Its pull, or its new one at its usual
    /// priority, may be the only one of the best priority on the lane: the message it handed
    /// back would come straight back to it.
    /// The pull is cancelled (the credit of what it still waited for goes back) and the node
    /// re-plans with that lane at the worst priority, so the redelivery goes to a peer.
    fn step_back(&self, pull: Option<PullId>, lane: Option<(&ShardId, Lane)>) {
        let mut inner = self.lock();
        if let Some((shard, lane)) = lane {
            let until = common::clock::now().plus(step_aside_for(self.cfg.nak_delay));
            inner.aside.note(shard, lane, until);
        }
        if let Some(p) = pull
            && let Some((_, _, _, left)) = inner.pulls.remove(&p)
        {
            inner.ledger.return_units(p, left);
            self.puller.cancel(p);
        }
    }

    /// Hands a delivered message back (a delayed nak), its pull stepping back first, and
    /// gives back its credit. A message this node cannot take (`on`: the shard and lane of
    /// its record and hint) also makes it step aside on that lane; one it cannot deal with
    /// now (not taking work, the record unreadable) is handed back at once.
    async fn hand_back(
        &self,
        d: &Delivery,
        from: Origin,
        why: Rejection,
        on: Option<(&ShardId, Lane)>,
    ) {
        metrics::counter!(m::REJECTIONS, "reason" => why.as_str()).increment(1);
        metrics::counter!(m::DELIVERIES, "outcome" => "handed_back").increment(1);
        self.step_back(from.pull, on);
        let delay = if why == Rejection::NotTakingWork {
            Duration::ZERO
        } else {
            self.cfg.nak_delay
        };
        if let Err(e) = d.nak(delay).await {
            tracing::debug!(error = %e, "nak failed; the message is redelivered after ack_wait");
        }
        self.give_back_credit(from);
    }

    /// Hands back at once, without stepping aside, a request a cover pull brought that this
    /// node has no room for: the pull held no room, so the next waiting pull (one that may
    /// have it) should have the message now, not after the nak delay.
    async fn pass_on(&self, d: &Delivery, from: Origin, why: Rejection) {
        metrics::counter!(m::REJECTIONS, "reason" => why.as_str()).increment(1);
        metrics::counter!(m::DELIVERIES, "outcome" => "passed_on").increment(1);
        if let Err(e) = d.nak(Duration::ZERO).await {
            tracing::debug!(error = %e, "nak failed; the message is redelivered after ack_wait");
        }
        self.give_back_credit(from);
    }

    /// Cancels the credited pulls a cover pull's request needs the room of
    /// (`placement::pull::make_room`), worst priority first; none when it fits already or
    /// would not fit even so.
    fn make_room(&self, inner: &mut crate::agent::Inner, need: &placement::Resources) {
        let held: Vec<(PullId, u8, u32)> = inner
            .pulls
            .iter()
            .map(|(id, (_, _, priority, left))| (*id, *priority, *left))
            .collect();
        let Some(cancel) = placement::pull::make_room(&inner.ledger, &held, need) else {
            return;
        };
        for id in cancel {
            if let Some((_, _, _, left)) = inner.pulls.remove(&id) {
                inner.ledger.return_units(id, left);
            }
            self.puller.cancel(id);
            metrics::counter!(m::COVER_CANCELS).increment(1);
        }
    }

    async fn drop_stale(&self, d: &Delivery, from: Origin, outcome: &'static str) {
        metrics::counter!(m::DELIVERIES, "outcome" => outcome).increment(1);
        if let Err(e) = d.term().await {
            tracing::debug!(error = %e, "term failed");
        }
        self.give_back_credit(from);
    }

    /// Handles one delivered hint.
    pub async fn handle_delivery(self: Arc<Self>, pull: Option<PullId>, d: Delivery) {
        let cover = pull.is_some_and(|p| self.lock().ledger.is_cover(p));
        let from = Origin {
            pull,
            credit: true,
            cover,
        };
        let hint: Hint = match decode(&d.payload) {
            Ok(h) => h,
            Err(e) => {
                metrics::counter!(m::HOSTILE, "kind" => e.as_str()).increment(1);
                tracing::warn!(error = %e, subject = %d.subject, "refusing malformed hint");
                return self.drop_stale(&d, from, "malformed").await;
            }
        };
        if !d.subject.ends_with(&format!(".{}", hint.id)) {
            metrics::counter!(m::HOSTILE, "kind" => "subject_mismatch").increment(1);
            tracing::warn!(subject = %d.subject, request.id = %hint.id, "refusing hint published under another request's subject");
            return self.drop_stale(&d, from, "malformed").await;
        }
        tracing::debug!(request.id = %hint.id, node.id = %self.identity.node, pull = ?pull, delivered = d.delivered, "hint delivered");
        let span = tracing::info_span!("claim", request.id = %hint.id, node.id = %self.identity.node, attempt = hint.attempt);
        let me = self.clone();
        async move { me.claim(from, d, hint, true).await }
            .instrument(span)
            .await
    }

    /// The record a claim starts from: read from any replica; a verdict that would drop the
    /// hint for good is confirmed with the stream leader first (a lagging replica must not
    /// lose a request). None when the delivery was handed back or dropped here.
    async fn read_for_claim(
        &self,
        from: Origin,
        d: &Delivery,
        hint: &Hint,
    ) -> Option<bus::Versioned<RequestRecord>> {
        let mut current = match self.bus.records.get(&hint.id).await {
            Ok(v) => v,
            Err(e @ bus::BusError::Decode { .. }) => {
                metrics::counter!(m::HOSTILE, "kind" => "record").increment(1);
                tracing::warn!(error = %e, "refusing hint for an undecodable record");
                self.drop_stale(d, from, "malformed").await;
                return None;
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the record; handing back");
                self.hand_back(d, from, Rejection::NotTakingWork, None)
                    .await;
                return None;
            }
        };
        let stale = |c: &Option<bus::Versioned<RequestRecord>>| {
            c.as_ref()
                .is_none_or(|v| judge(hint, &v.value, &self.profile, true) == Verdict::Stale)
        };
        if stale(&current) {
            current = match self.bus.records.get_leader(&hint.id).await {
                Ok(v) => v,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot confirm with the leader; handing back");
                    self.hand_back(d, from, Rejection::NotTakingWork, None)
                        .await;
                    return None;
                }
            };
        }
        if current.is_none() {
            self.drop_stale(d, from, "stale").await;
        }
        current
    }

    /// Claims the request of a delivered hint. With `use_copy`, a record copy the hint
    /// carries (for this request and attempt) stands in for the read: the claim is a
    /// compare-and-swap on the copy's revision, which fails if the record moved on since;
    /// then the reservation is released and the claim starts over from a read. Whatever
    /// would end the delivery without a claim (stale, handed back, already held here) is
    /// decided on a read record, never on a copy.
    async fn claim(self: Arc<Self>, from: Origin, d: Delivery, hint: Hint, use_copy: bool) {
        let started = tokio::time::Instant::now();
        let copy = hint
            .record
            .as_ref()
            .filter(|c| use_copy && c.record.spec.id == hint.id && c.record.attempt == hint.attempt)
            .map(|c| bus::Versioned {
                value: c.record.clone(),
                revision: c.revision,
            });
        let from_copy = copy.is_some();
        let current = match copy {
            Some(c) => c,
            None => match self.read_for_claim(from, &d, &hint).await {
                Some(c) => c,
                None => return,
            },
        };
        let on = Some((&current.value.shard, hint.lane));
        let takes_work = self.lock().mode.takes_work();
        match judge(&hint, &current.value, &self.profile, takes_work) {
            Verdict::Proceed => {}
            // a copy serves the way to a claim only: anything else is decided on the record
            _ if from_copy => {
                metrics::counter!(m::CLAIM_COPIES, "outcome" => "declined").increment(1);
                return Box::pin(self.claim(from, d, hint, false)).await;
            }
            Verdict::Stale => return self.drop_stale(&d, from, "stale").await,
            Verdict::HandBack(r) => return self.hand_back(&d, from, r, on).await,
        }
        let spec = &current.value.spec;
        if let Some(g) = spec
            .group
            .as_ref()
            .filter(|g| g.policy == GroupPolicy::Affinity)
        {
            match self.bus.cluster.group(g.name.as_str()).await {
                Ok(Some(pin)) if pin.node != self.identity.node => {
                    return self
                        .hand_back(&d, from, Rejection::AffinityElsewhere, on)
                        .await;
                }
                Ok(_) => {}
                Err(_) => {
                    return self
                        .hand_back(&d, from, Rejection::NotTakingWork, None)
                        .await;
                }
            }
        }
        // reserve and draw the claim under the lock, with no await in between
        let claim = {
            let mut inner = self.lock();
            if from.cover {
                self.make_room(&mut inner, &spec.resources);
            }
            let res = match from.credit() {
                Some(p) => inner.ledger.reserve_from_pull(
                    p,
                    &spec.id,
                    &spec.resources,
                    spec.group.as_ref(),
                ),
                None => inner
                    .ledger
                    .reserve(&spec.id, &spec.resources, spec.group.as_ref()),
            };
            res.map(|held| {
                let token = ClaimToken::random(&mut inner.rng);
                let claim = Claim {
                    node: self.identity.node.clone(),
                    epoch: inner.epoch,
                    token,
                    at: common::clock::now(),
                    sig: None,
                };
                (held, claim)
            })
        };
        let claim = match claim {
            Ok((Reserved::New, mut c)) => {
                c.sig = self.identity.sign_claim(&spec.id, hint.attempt, c.token);
                c
            }
            // another delivery of the same request (a re-published hint) is claiming it here,
            // or it already runs here: that one owns the reservation and decides; releasing it
            // on a lost race below would free capacity a live build uses
            // (the pull's credit is returned either way: a retry reserves from spare)
            Ok((Reserved::AlreadyHeld, _)) | Err(_) if from_copy => {
                metrics::counter!(m::CLAIM_COPIES, "outcome" => "declined").increment(1);
                return Box::pin(self.claim(from.spent(), d, hint, false)).await;
            }
            Ok((Reserved::AlreadyHeld, _)) => {
                return self
                    .hand_back(&d, from.spent(), Rejection::InFlight, on)
                    .await;
            }
            Err(e) if from.cover => {
                return self
                    .pass_on(&d, from.spent(), Rejection::from_ledger(&e))
                    .await;
            }
            Err(e) => {
                return self
                    .hand_back(&d, from.spent(), Rejection::from_ledger(&e), on)
                    .await;
            }
        };
        let id = spec.id.clone();
        let attempt = hint.attempt;
        let now = common::clock::now();
        let outcome = if from_copy {
            let swapped = match current.value.claim(attempt, claim.clone(), now) {
                Ok(next) => match self.bus.records.cas(&next, current.revision).await {
                    Ok(revision) => Some(Ok(bus::Versioned {
                        value: next,
                        revision,
                    })),
                    Err(e) if e.is_conflict() => None,
                    Err(e) => Some(Err(UpdateError::Bus(e))),
                },
                Err(_) => None,
            };
            match swapped {
                Some(outcome) => {
                    metrics::counter!(m::CLAIM_COPIES, "outcome" => "used").increment(1);
                    outcome
                }
                None => {
                    // the record moved on since the copy (spilled, deleted, claimed): start
                    // over from a read, with the reservation released (its pull credit is
                    // spent: the next reserve is from spare)
                    metrics::counter!(m::CLAIM_COPIES, "outcome" => "moved_on").increment(1);
                    self.lock().ledger.release(&id);
                    return Box::pin(self.claim(from.spent(), d, hint, false)).await;
                }
            }
        } else {
            self.bus
                .records
                .update_from(&id, Some(current), |r| r.claim(attempt, claim.clone(), now))
                .await
        };
        let won = match outcome {
            Ok(v) => Some(v),
            Err(UpdateError::Transition(_)) | Err(UpdateError::Missing) => None,
            Err(e) => {
                tracing::warn!(error = %e, "claim outcome unknown; asking the leader");
                self.resolve(&id, claim.token).await
            }
        };
        let Some(won) = won else {
            metrics::counter!(m::CLAIM_CONFLICTS).increment(1);
            self.lock().ledger.release(&id);
            return self.drop_stale(&d, from.spent(), "lost_race").await;
        };
        self.lock().owned.insert(
            id.clone(),
            Owned {
                claim: claim.clone(),
                phase: Phase::Claimed,
            },
        );
        if let Err(e) = d.ack().await {
            tracing::debug!(error = %e, "ack failed; a redelivery will find the record claimed");
        }
        metrics::counter!(m::DELIVERIES, "outcome" => "claimed").increment(1);
        metrics::histogram!(m::CLAIM_DURATION).record(started.elapsed().as_secs_f64());
        tracing::info!("claim won");
        self.replan.notify_one();
        if !self.pin_affinity(&won.value).await {
            return;
        }
        let me = self.clone();
        let span = tracing::info_span!("build", request.id = %id, node.id = %self.identity.node);
        self.tasks
            .spawn(async move { me.build(id, won).await }.instrument(span));
    }

    /// After an ambiguous write: reads the leader until it answers, and says whether the record
    /// carries our claim. Never gives up while the process runs (releasing on doubt could leave
    /// a request claimed by a live node that forgot it).
    pub async fn resolve(
        &self,
        id: &RequestId,
        token: ClaimToken,
    ) -> Option<Versioned<RequestRecord>> {
        let mut delay = Duration::from_millis(50);
        loop {
            match self.bus.records.get_leader(id).await {
                Ok(Some(v)) => {
                    let ours = v
                        .value
                        .claim
                        .as_ref()
                        .is_some_and(|c| c.token == token && c.node == self.identity.node);
                    return ours.then_some(v);
                }
                Ok(None) => return None,
                Err(e) => tracing::debug!(error = %e, "leader read failed; retrying"),
            }
            tokio::select! {
                _ = self.cancel.cancelled() => return None,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }

    /// For the first member of an affinity group, pins the group to this node. Returns false
    /// (and gives the request back) when the group turned out to live elsewhere.
    async fn pin_affinity(&self, record: &RequestRecord) -> bool {
        let Some(g) = record
            .spec
            .group
            .as_ref()
            .filter(|g| g.policy == GroupPolicy::Affinity)
        else {
            return true;
        };
        let pin = GroupPin {
            v: WIRE_VERSION,
            node: self.identity.node.clone(),
            at: common::clock::now(),
        };
        let elsewhere = match self.bus.cluster.pin_group(g.name.as_str(), &pin).await {
            Ok(()) => None,
            Err(_) => match self.bus.cluster.group(g.name.as_str()).await {
                Ok(Some(p)) if p.node != self.identity.node => Some(p.node),
                _ => None,
            },
        };
        let Some(other) = elsewhere else { return true };
        let id = record.spec.id.clone();
        let reason = format!("affinity group {} lives on node {other}", g.name);
        self.give_back(&id, &reason).await;
        false
    }
}
