//! The request record and its life cycle, as pure transitions.
//!
//! ```text
//!            claim            start_build        activate
//!  queued ─────────> claimed ───────────> building ───────> active ──reap──> host_down
//!    ▲  │               │                    │                │                 │
//!    │  │ fail          └──release/reap──────┤                │ delete          │ delete
//!    │  ▼                 (attempt+1, node   │                ▼                 ▼
//!    │ failed              excluded; failed  │             deleting ──deleted──> deleted
//!    └──────────────────── after max)────────┘
//! ```
//!
//! Every method takes the record as it was read and returns the record to write with a
//! compare-and-swap; a method refuses (with a [`TransitionError`]) any move that is illegal
//! from the current state or that comes from a stale attempt or a claim that is not the
//! current one. Records are values: nothing here mutates shared state.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ids::{ClaimToken, Epoch, NodeId, RequestId};
use crate::request::RequestSpec;
use crate::shard::ShardId;
use crate::time::Timestamp;

/// Most transitions kept in a record's history (older ones are dropped).
pub const HISTORY_LEN: usize = 32;
/// Default number of build attempts before a request fails.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;

/// Where a request is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Waiting in a shard queue for a node.
    Queued,
    /// A node won the claim and holds its capacity.
    Claimed,
    /// The node is building the VM.
    Building,
    /// The VM runs.
    Active,
    /// No node could take it, or every attempt failed. Terminal.
    Failed,
    /// Its node's lease expired; visible and deletable.
    HostDown,
    /// Delete requested; the owning node will destroy the VM.
    Deleting,
    /// Gone. Terminal.
    Deleted,
}

impl State {
    /// Every state, for tests and tables.
    pub const ALL: [State; 8] = [
        State::Queued,
        State::Claimed,
        State::Building,
        State::Active,
        State::Failed,
        State::HostDown,
        State::Deleting,
        State::Deleted,
    ];

    /// Terminal states never change again.
    pub fn is_terminal(self) -> bool {
        matches!(self, State::Failed | State::Deleted)
    }

    /// States in which a node holds (or held) the request and a claim is recorded.
    pub fn has_claim(self) -> bool {
        matches!(
            self,
            State::Claimed | State::Building | State::Active | State::HostDown | State::Deleting
        )
    }

    /// Stable snake_case name (metric label, CLI output).
    pub fn as_str(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Claimed => "claimed",
            State::Building => "building",
            State::Active => "active",
            State::Failed => "failed",
            State::HostDown => "host_down",
            State::Deleting => "deleting",
            State::Deleted => "deleted",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for State {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        State::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown state `{s}` (known: queued, claimed, building, active, failed, host_down, deleting, deleted)"))
    }
}

/// Who holds a request: the claim a node wrote with its compare-and-swap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// The node.
    pub node: NodeId,
    /// The node's boot epoch at claim time (re-confirmed after a fence).
    pub epoch: Epoch,
    /// Random token distinguishing this claim from any other.
    pub token: ClaimToken,
    /// When the claim was made.
    pub at: Timestamp,
    /// The node's signature (nkeys, base64url) over [`claim_payload`]: any claimer may write
    /// request records, so a claim proves with the key in the node's own advert that the node
    /// made it. Absent on claims of nodes that advertise no key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sig: Option<String>,
}

/// The bytes a node signs when it claims `id` at `attempt` with `token`. The epoch is not
/// part of it (a re-confirmed claim keeps its signature); the id and attempt are, so a valid
/// claim cannot be replayed onto another request or a later attempt.
pub fn claim_payload(id: &RequestId, attempt: u32, node: &NodeId, token: ClaimToken) -> Vec<u8> {
    format!("updraft-claim-v1\n{id}\n{attempt}\n{node}\n{token}").into_bytes()
}

impl Claim {
    /// Same node, epoch and token (the claim a node holds, exactly).
    pub fn same(&self, other: &Claim) -> bool {
        self.node == other.node && self.epoch == other.epoch && self.token == other.token
    }

    /// Same node and token, any epoch (the node's own claim, before or after a fence).
    pub fn same_owner(&self, other: &Claim) -> bool {
        self.node == other.node && self.token == other.token
    }
}

/// One entry of a record's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    /// When.
    pub at: Timestamp,
    /// State before.
    pub from: State,
    /// State after.
    pub to: State,
    /// Attempt after.
    pub attempt: u32,
    /// Node involved, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeId>,
    /// Why, for failures, releases and reaps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The request record: the only truth about a request (DESIGN.md). Stored in KV under the
/// request id; every change is a compare-and-swap on its revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// Wire version.
    pub v: u32,
    /// The validated request.
    pub spec: RequestSpec,
    /// The shard its hints go to.
    pub shard: ShardId,
    /// Current state.
    pub state: State,
    /// Attempt number, starting at 1; bumped on every re-queue. Hints carry it.
    pub attempt: u32,
    /// Nodes that must not take it again (failed a build, or died holding it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded: Vec<NodeId>,
    /// The current claim, in every state that has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<Claim>,
    /// Why it failed, or why it is still pending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the dispatcher accepted it.
    pub created_at: Timestamp,
    /// Last change.
    pub updated_at: Timestamp,
    /// When a queued request gets its final "no capacity" answer.
    pub deadline_at: Timestamp,
    /// When it last entered `queued` (spill-over is measured from here).
    pub queued_at: Timestamp,
    /// When it became active (for latency metrics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_at: Option<Timestamp>,
    /// Its hint was also published to the spill lane for this attempt.
    #[serde(default)]
    pub spilled: bool,
    /// A `failed` that a client may retry with the same id and body (the shard was full when
    /// it was submitted, so it never really entered the queue).
    #[serde(default)]
    pub retryable: bool,
    /// Recent transitions, oldest first, at most [`HISTORY_LEN`].
    #[serde(default)]
    pub history: Vec<Transition>,
}

/// An illegal or stale transition.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    /// Not allowed from this state.
    #[error("cannot {action} a request that is {from}")]
    Illegal {
        /// Current state.
        from: State,
        /// What was attempted.
        action: &'static str,
    },
    /// The hint or timer is for another attempt.
    #[error("stale attempt {got} (current attempt is {current})")]
    StaleAttempt {
        /// Current attempt.
        current: u32,
        /// Attempt given.
        got: u32,
    },
    /// The claim presented is not the record's claim.
    #[error("claim does not match the record's claim")]
    ClaimMismatch,
    /// This node may not take the request again.
    #[error("node {0} is excluded from this request")]
    Excluded(NodeId),
    /// The claim is still live; nothing to reap.
    #[error("claim is live; nothing to reap")]
    NotStale,
    /// The deadline has not passed yet.
    #[error("deadline has not passed")]
    NotDue,
}

impl TransitionError {
    /// True when the caller simply lost a race or holds an old hint (not a bug).
    pub fn is_stale(&self) -> bool {
        !matches!(self, TransitionError::Illegal { .. })
    }
}

/// What a delete asks of the system after the record was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeleteAction {
    /// Nothing runs; the record is `deleted` already.
    Done,
    /// Tell this node (durably) to destroy the VM.
    CommandNode(NodeId),
    /// Already deleting or deleted; re-send the command if there is a node.
    AlreadyInProgress(Option<NodeId>),
}

impl RequestRecord {
    /// A fresh record for an accepted request.
    pub fn new_queued(spec: RequestSpec, shard: ShardId, now: Timestamp) -> Self {
        let deadline_at = now.plus(std::time::Duration::from_secs(spec.deadline_s));
        RequestRecord {
            v: crate::wire::WIRE_VERSION,
            spec,
            shard,
            state: State::Queued,
            attempt: 1,
            excluded: Vec::new(),
            claim: None,
            reason: None,
            created_at: now,
            updated_at: now,
            deadline_at,
            queued_at: now,
            active_at: None,
            spilled: false,
            retryable: false,
            history: Vec::new(),
        }
    }

    /// The node holding the request, if any.
    pub fn node(&self) -> Option<&NodeId> {
        self.claim.as_ref().map(|c| &c.node)
    }

    fn next(
        &self,
        to: State,
        now: Timestamp,
        node: Option<NodeId>,
        reason: Option<String>,
    ) -> Self {
        let mut r = self.clone();
        r.history.push(Transition {
            at: now,
            from: self.state,
            to,
            attempt: r.attempt,
            node,
            reason: reason.clone(),
        });
        if r.history.len() > HISTORY_LEN {
            let drop = r.history.len() - HISTORY_LEN;
            r.history.drain(..drop);
        }
        r.state = to;
        r.updated_at = now;
        if reason.is_some() {
            r.reason = reason;
        }
        r
    }

    fn illegal(&self, action: &'static str) -> TransitionError {
        TransitionError::Illegal {
            from: self.state,
            action,
        }
    }

    fn check_claim(&self, claim: &Claim) -> Result<(), TransitionError> {
        match &self.claim {
            Some(c) if c.same(claim) => Ok(()),
            _ => Err(TransitionError::ClaimMismatch),
        }
    }

    /// A node claims a queued request for `attempt`.
    pub fn claim(
        &self,
        attempt: u32,
        claim: Claim,
        now: Timestamp,
    ) -> Result<Self, TransitionError> {
        if self.state == State::Claimed && self.claim.as_ref().is_some_and(|c| c.same(&claim)) {
            return Ok(self.clone()); // our own claim already landed (a retry after a timeout)
        }
        if self.state != State::Queued {
            return Err(if self.state.is_terminal() || self.state.has_claim() {
                TransitionError::StaleAttempt {
                    current: self.attempt,
                    got: attempt,
                }
            } else {
                self.illegal("claim")
            });
        }
        if attempt != self.attempt {
            return Err(TransitionError::StaleAttempt {
                current: self.attempt,
                got: attempt,
            });
        }
        if self.excluded.contains(&claim.node) {
            return Err(TransitionError::Excluded(claim.node));
        }
        let node = claim.node.clone();
        let mut r = self.next(State::Claimed, now, Some(node), None);
        r.claim = Some(claim);
        r.reason = None;
        Ok(r)
    }

    /// The claiming node starts building.
    pub fn start_build(&self, claim: &Claim, now: Timestamp) -> Result<Self, TransitionError> {
        if self.state == State::Building && self.check_claim(claim).is_ok() {
            return Ok(self.clone()); // already written (a retry after a timeout)
        }
        if self.state != State::Claimed {
            return Err(self.illegal("start building"));
        }
        self.check_claim(claim)?;
        Ok(self.next(State::Building, now, Some(claim.node.clone()), None))
    }

    /// The build finished: the VM runs.
    pub fn activate(&self, claim: &Claim, now: Timestamp) -> Result<Self, TransitionError> {
        if self.state == State::Active && self.check_claim(claim).is_ok() {
            return Ok(self.clone()); // already written (a retry after a timeout)
        }
        if self.state != State::Building {
            return Err(self.illegal("activate"));
        }
        self.check_claim(claim)?;
        let mut r = self.next(State::Active, now, Some(claim.node.clone()), None);
        r.active_at = Some(now);
        Ok(r)
    }

    /// The node gives the request back (build failed, node draining, or the request did not fit
    /// after all) after cleaning up. It goes back to `queued` with the next attempt and the node
    /// excluded, or to `failed` once `max_attempts` are used up.
    pub fn release(
        &self,
        claim: &Claim,
        reason: &str,
        max_attempts: u32,
        now: Timestamp,
    ) -> Result<Self, TransitionError> {
        if !matches!(self.state, State::Claimed | State::Building) {
            return Err(self.illegal("release"));
        }
        self.check_claim(claim)?;
        Ok(self.requeue(&claim.node, reason, max_attempts, now))
    }

    fn requeue(&self, node: &NodeId, reason: &str, max_attempts: u32, now: Timestamp) -> Self {
        if self.attempt >= max_attempts {
            let why = format!("gave up after {} attempts; last: {reason}", self.attempt);
            let mut r = self.next(State::Failed, now, Some(node.clone()), Some(why));
            r.claim = None;
            return r;
        }
        let mut r = self.next(
            State::Queued,
            now,
            Some(node.clone()),
            Some(reason.to_string()),
        );
        r.attempt += 1;
        if let Some(last) = r.history.last_mut() {
            last.attempt = r.attempt;
        }
        if !r.excluded.contains(node) {
            r.excluded.push(node.clone());
        }
        r.claim = None;
        r.queued_at = now;
        r.spilled = false;
        r
    }

    /// A dispatcher found the claim's node gone or on another epoch (`live` is the node's
    /// current epoch, `None` when its lease expired). Claimed and building requests are
    /// re-queued; active ones become `host_down`.
    pub fn reap(
        &self,
        live: Option<Epoch>,
        max_attempts: u32,
        now: Timestamp,
    ) -> Result<Self, TransitionError> {
        let claim = self.claim.as_ref().ok_or_else(|| self.illegal("reap"))?;
        if live == Some(claim.epoch) {
            return Err(TransitionError::NotStale);
        }
        let why = match live {
            None => format!("node {} lease expired", claim.node),
            Some(e) => format!(
                "node {} restarted (epoch {} -> {e})",
                claim.node, claim.epoch
            ),
        };
        match self.state {
            State::Claimed | State::Building => {
                Ok(self.requeue(&claim.node, &why, max_attempts, now))
            }
            State::Active => {
                Ok(self.next(State::HostDown, now, Some(claim.node.clone()), Some(why)))
            }
            _ => Err(self.illegal("reap")),
        }
    }

    /// A dispatcher saw a node's lease expire; `ended` is the epoch of that lease (`None`
    /// when the dispatcher never saw it). A claim made or re-confirmed under a later epoch is
    /// not stale: the node came back and re-confirmed it before this expiry was handled.
    pub fn reap_expired(
        &self,
        ended: Option<Epoch>,
        max_attempts: u32,
        now: Timestamp,
    ) -> Result<Self, TransitionError> {
        let claim = self.claim.as_ref().ok_or_else(|| self.illegal("reap"))?;
        if ended.is_some_and(|e| claim.epoch > e) {
            return Err(TransitionError::NotStale);
        }
        self.reap(None, max_attempts, now)
    }

    /// A dispatcher found the claim forged (its signature does not verify with the key the
    /// named node advertises): the claim is undone and the request queued again for its next
    /// attempt.
    pub fn refuse_forged(
        &self,
        why: &str,
        max_attempts: u32,
        now: Timestamp,
    ) -> Result<Self, TransitionError> {
        let claim = self
            .claim
            .as_ref()
            .ok_or_else(|| self.illegal("refuse a claim"))?;
        match self.state {
            State::Claimed | State::Building | State::Active | State::HostDown => {
                let node = claim.node.clone();
                let was_excluded = self.excluded.contains(&node);
                let mut r = self.requeue(&node, why, max_attempts, now);
                // the named node never took it: do not keep it from taking the next attempt
                if !was_excluded {
                    r.excluded.retain(|n| n != &node);
                }
                Ok(r)
            }
            _ => Err(self.illegal("refuse a claim")),
        }
    }

    /// A queued request gets its final answer: no node could take it in time.
    pub fn fail(
        &self,
        attempt: u32,
        reason: &str,
        now: Timestamp,
    ) -> Result<Self, TransitionError> {
        if self.state != State::Queued {
            return Err(self.illegal("fail"));
        }
        if attempt != self.attempt {
            return Err(TransitionError::StaleAttempt {
                current: self.attempt,
                got: attempt,
            });
        }
        Ok(self.next(State::Failed, now, None, Some(reason.to_string())))
    }

    /// Fails a queued request that could not enter its queue (the shard is full); a later
    /// submit of the same id and body may [`retry`](Self::retry) it.
    pub fn fail_retryable(
        &self,
        attempt: u32,
        reason: &str,
        now: Timestamp,
    ) -> Result<Self, TransitionError> {
        let mut r = self.fail(attempt, reason, now)?;
        r.retryable = true;
        Ok(r)
    }

    /// Puts a retryable failed request back in the queue, as a new attempt with a fresh
    /// deadline.
    pub fn retry(&self, now: Timestamp) -> Result<Self, TransitionError> {
        if self.state != State::Failed || !self.retryable {
            return Err(self.illegal("retry"));
        }
        let mut r = self.next(State::Queued, now, None, None);
        r.attempt += 1;
        r.retryable = false;
        r.spilled = false;
        r.reason = None;
        r.queued_at = now;
        r.deadline_at = now.plus(std::time::Duration::from_secs(self.spec.deadline_s));
        Ok(r)
    }

    /// Fails a queued request whose deadline has passed (sweep and timer path).
    pub fn expire(&self, reason: &str, now: Timestamp) -> Result<Self, TransitionError> {
        if now < self.deadline_at {
            return Err(TransitionError::NotDue);
        }
        self.fail(self.attempt, reason, now)
    }

    /// Marks that this attempt's hint was also published to the spill lane.
    pub fn mark_spilled(&self, attempt: u32, now: Timestamp) -> Result<Self, TransitionError> {
        if self.state != State::Queued {
            return Err(self.illegal("spill"));
        }
        if attempt != self.attempt {
            return Err(TransitionError::StaleAttempt {
                current: self.attempt,
                got: attempt,
            });
        }
        let mut r = self.clone();
        r.spilled = true;
        r.updated_at = now;
        Ok(r)
    }

    /// Sets a pending reason on a queued request without changing its state.
    pub fn note_pending(&self, reason: &str, now: Timestamp) -> Result<Self, TransitionError> {
        if self.state != State::Queued {
            return Err(self.illegal("annotate"));
        }
        let mut r = self.clone();
        r.reason = Some(reason.to_string());
        r.updated_at = now;
        Ok(r)
    }

    /// A user asks for deletion. Returns the record to write and what to do next.
    pub fn request_delete(&self, now: Timestamp) -> (Self, DeleteAction) {
        match self.state {
            State::Queued | State::Failed => {
                let mut r = self.next(State::Deleted, now, None, Some("deleted by user".into()));
                r.claim = None;
                (r, DeleteAction::Done)
            }
            State::Claimed | State::Building | State::Active | State::HostDown => {
                let node = self
                    .node()
                    .cloned()
                    .expect("claim present in claimed states");
                (
                    self.next(State::Deleting, now, Some(node.clone()), None),
                    DeleteAction::CommandNode(node),
                )
            }
            State::Deleting => (
                self.clone(),
                DeleteAction::AlreadyInProgress(self.node().cloned()),
            ),
            State::Deleted => (self.clone(), DeleteAction::AlreadyInProgress(None)),
        }
    }

    /// The owning node destroyed the VM.
    pub fn deleted(&self, claim: &Claim, now: Timestamp) -> Result<Self, TransitionError> {
        if self.state != State::Deleting {
            return Err(self.illegal("finish deleting"));
        }
        match &self.claim {
            Some(c) if c.same_owner(claim) => {}
            _ => return Err(TransitionError::ClaimMismatch),
        }
        let mut r = self.next(State::Deleted, now, Some(claim.node.clone()), None);
        r.claim = None;
        Ok(r)
    }

    /// An operator forces the delete of a VM whose host is down (or stuck deleting).
    pub fn force_delete(&self, now: Timestamp) -> Result<Self, TransitionError> {
        if !matches!(self.state, State::HostDown | State::Deleting) {
            return Err(self.illegal("force-delete"));
        }
        let node = self.node().cloned();
        let mut r = self.next(
            State::Deleted,
            now,
            node,
            Some("force-deleted by operator".into()),
        );
        r.claim = None;
        Ok(r)
    }

    /// The owning node found the VM gone (reconcile): the request fails, with the reason.
    pub fn lost(
        &self,
        claim: &Claim,
        reason: &str,
        now: Timestamp,
    ) -> Result<Self, TransitionError> {
        if !matches!(self.state, State::Active | State::HostDown) {
            return Err(self.illegal("mark lost"));
        }
        match &self.claim {
            Some(c) if c.same_owner(claim) => {}
            _ => return Err(TransitionError::ClaimMismatch),
        }
        let mut r = self.next(
            State::Failed,
            now,
            Some(claim.node.clone()),
            Some(reason.to_string()),
        );
        r.claim = None;
        Ok(r)
    }

    /// The owning node re-confirms its claim under a new epoch (after a fence or restart).
    /// A `host_down` request whose VM survived becomes `active` again.
    pub fn reconfirm(
        &self,
        old: &Claim,
        epoch: Epoch,
        now: Timestamp,
    ) -> Result<Self, TransitionError> {
        let current = self
            .claim
            .as_ref()
            .ok_or_else(|| self.illegal("re-confirm"))?;
        if !current.same_owner(old) {
            return Err(TransitionError::ClaimMismatch);
        }
        let mut r = match self.state {
            State::Claimed | State::Building | State::Active | State::Deleting => self.clone(),
            State::HostDown => self.next(
                State::Active,
                now,
                Some(old.node.clone()),
                Some("host recovered".into()),
            ),
            _ => return Err(self.illegal("re-confirm")),
        };
        if let Some(c) = r.claim.as_mut() {
            c.epoch = epoch;
        }
        r.updated_at = now;
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{TraitClassName, Zone};
    use crate::resources::Resources;

    pub(crate) fn record() -> RequestRecord {
        let zone = Zone::new("az1").unwrap();
        let spec = RequestSpec::plain(
            RequestId::new("r1").unwrap(),
            Resources::new(1, 1024, 0),
            zone.clone(),
            60,
        );
        let shard = ShardId {
            zone,
            tclass: TraitClassName::new("std").unwrap(),
            size: 0,
            part: 0,
        };
        RequestRecord::new_queued(spec, shard, Timestamp(1000))
    }

    fn claim(node: &str, epoch: u64, token: u64) -> Claim {
        Claim {
            node: NodeId::new(node).unwrap(),
            epoch: Epoch(epoch),
            token: ClaimToken(token),
            at: Timestamp(0),
            sig: None,
        }
    }

    #[test]
    fn happy_path() {
        let r = record();
        let c = claim("n1", 1, 7);
        let r = r.claim(1, c.clone(), Timestamp(2000)).unwrap();
        assert_eq!(r.state, State::Claimed);
        let r = r.start_build(&c, Timestamp(2100)).unwrap();
        let r = r.activate(&c, Timestamp(3000)).unwrap();
        assert_eq!(r.state, State::Active);
        assert_eq!(r.active_at, Some(Timestamp(3000)));
        assert_eq!(r.history.len(), 3);
        let (r, act) = r.request_delete(Timestamp(4000));
        assert_eq!(act, DeleteAction::CommandNode(c.node.clone()));
        let r = r.deleted(&c, Timestamp(5000)).unwrap();
        assert_eq!(r.state, State::Deleted);
    }

    #[test]
    fn node_steps_are_idempotent_for_the_same_claim() {
        let c = claim("n1", 1, 7);
        let claimed = record().claim(1, c.clone(), Timestamp(1)).unwrap();
        assert_eq!(claimed.claim(1, c.clone(), Timestamp(2)).unwrap(), claimed);
        let building = claimed.start_build(&c, Timestamp(3)).unwrap();
        assert_eq!(building.start_build(&c, Timestamp(4)).unwrap(), building);
        let active = building.activate(&c, Timestamp(5)).unwrap();
        assert_eq!(active.activate(&c, Timestamp(6)).unwrap(), active);
        // but never for somebody else's claim
        assert!(
            building
                .start_build(&claim("n2", 1, 8), Timestamp(4))
                .is_err()
        );
        assert!(claimed.claim(1, claim("n2", 1, 8), Timestamp(2)).is_err());
    }

    #[test]
    fn stale_attempts_and_foreign_claims_are_refused() {
        let r = record();
        assert_eq!(
            r.claim(2, claim("n1", 1, 1), Timestamp(1)),
            Err(TransitionError::StaleAttempt { current: 1, got: 2 })
        );
        let c = claim("n1", 1, 1);
        let r = r.claim(1, c.clone(), Timestamp(1)).unwrap();
        // a second claimer with the same hint loses
        assert!(
            r.claim(1, claim("n2", 1, 2), Timestamp(1))
                .unwrap_err()
                .is_stale()
        );
        assert_eq!(
            r.start_build(&claim("n2", 1, 2), Timestamp(1)),
            Err(TransitionError::ClaimMismatch)
        );
        assert_eq!(
            r.start_build(&claim("n1", 2, 1), Timestamp(1)),
            Err(TransitionError::ClaimMismatch)
        );
        assert!(matches!(
            r.activate(&c, Timestamp(1)),
            Err(TransitionError::Illegal { .. })
        ));
    }

    #[test]
    fn release_requeues_then_fails() {
        let mut r = record();
        for attempt in 1..=3 {
            let c = claim(&format!("n{attempt}"), 1, attempt.into());
            r = r.claim(attempt, c.clone(), Timestamp(1)).unwrap();
            r = r.release(&c, "boom", 3, Timestamp(2)).unwrap();
        }
        assert_eq!(r.state, State::Failed);
        assert!(
            r.reason
                .as_deref()
                .unwrap()
                .starts_with("gave up after 3 attempts")
        );
        let mut r = record();
        let c = claim("n1", 1, 1);
        r = r.claim(1, c.clone(), Timestamp(1)).unwrap();
        r = r.release(&c, "boom", 5, Timestamp(2)).unwrap();
        assert_eq!((r.state, r.attempt), (State::Queued, 2));
        assert_eq!(r.excluded, vec![c.node.clone()]);
        assert_eq!(
            r.claim(2, claim("n1", 1, 9), Timestamp(3)),
            Err(TransitionError::Excluded(c.node))
        );
    }

    #[test]
    fn reap_requeues_claims_and_marks_host_down() {
        let c = claim("n1", 3, 1);
        let r = record().claim(1, c.clone(), Timestamp(1)).unwrap();
        assert_eq!(
            r.reap(Some(Epoch(3)), 5, Timestamp(2)),
            Err(TransitionError::NotStale)
        );
        let q = r.reap(None, 5, Timestamp(2)).unwrap();
        assert_eq!((q.state, q.attempt), (State::Queued, 2));
        let a = r
            .start_build(&c, Timestamp(2))
            .unwrap()
            .activate(&c, Timestamp(3))
            .unwrap();
        let down = a.reap(Some(Epoch(4)), 5, Timestamp(4)).unwrap();
        assert_eq!(down.state, State::HostDown);
        // the node comes back with its VM and re-confirms
        let back = down.reconfirm(&c, Epoch(4), Timestamp(5)).unwrap();
        assert_eq!(back.state, State::Active);
        assert_eq!(back.claim.clone().unwrap().epoch, Epoch(4));
        // the expiry of the epoch-3 lease, handled after the node re-confirmed under epoch 4,
        // leaves the claim alone; an expiry of epoch 4 (or of an unknown epoch) reaps it
        assert_eq!(
            back.reap_expired(Some(Epoch(3)), 5, Timestamp(6)),
            Err(TransitionError::NotStale)
        );
        assert_eq!(
            back.reap_expired(Some(Epoch(4)), 5, Timestamp(6))
                .unwrap()
                .state,
            State::HostDown
        );
        assert_eq!(
            back.reap_expired(None, 5, Timestamp(6)).unwrap().state,
            State::HostDown
        );
    }

    #[test]
    fn forged_claims_are_undone_without_excluding_the_named_node() {
        let c = claim("n1", 1, 7);
        let r = record().claim(1, c, Timestamp(1)).unwrap();
        let undone = r.refuse_forged("forged", 5, Timestamp(2)).unwrap();
        assert_eq!((undone.state, undone.attempt), (State::Queued, 2));
        assert!(undone.claim.is_none());
        assert!(undone.excluded.is_empty());
        assert!(record().refuse_forged("x", 5, Timestamp(2)).is_err());
        // the payload binds the request and the attempt
        let id = RequestId::new("a").unwrap();
        let other = RequestId::new("b").unwrap();
        let n = NodeId::new("n1").unwrap();
        assert_ne!(
            claim_payload(&id, 1, &n, ClaimToken(7)),
            claim_payload(&other, 1, &n, ClaimToken(7))
        );
        assert_ne!(
            claim_payload(&id, 1, &n, ClaimToken(7)),
            claim_payload(&id, 2, &n, ClaimToken(7))
        );
    }

    #[test]
    fn deletes() {
        let (d, act) = record().request_delete(Timestamp(5));
        assert_eq!((d.state, act), (State::Deleted, DeleteAction::Done));
        let (again, act) = d.request_delete(Timestamp(6));
        assert_eq!(again, d);
        assert_eq!(act, DeleteAction::AlreadyInProgress(None));
        let c = claim("n1", 1, 1);
        let a = record().claim(1, c.clone(), Timestamp(1)).unwrap();
        let (del, _) = a.request_delete(Timestamp(2));
        // a build finishing after the delete cannot activate
        assert!(del.activate(&c, Timestamp(3)).is_err());
        assert!(del.force_delete(Timestamp(4)).is_ok());
        assert!(a.force_delete(Timestamp(4)).is_err());
    }

    #[test]
    fn deadline() {
        let r = record();
        assert_eq!(r.expire("x", Timestamp(2000)), Err(TransitionError::NotDue));
        let f = r.expire("no capacity", Timestamp(61_000)).unwrap();
        assert_eq!(f.state, State::Failed);
        assert_eq!(f.reason.as_deref(), Some("no capacity"));
    }

    #[test]
    fn history_is_bounded() {
        let mut r = record();
        for i in 0..40u64 {
            let c = claim("n1", 1, i);
            r.excluded.clear();
            r = r.claim(r.attempt, c.clone(), Timestamp(i)).unwrap();
            r = r.release(&c, "x", 1000, Timestamp(i)).unwrap();
        }
        assert_eq!(r.history.len(), HISTORY_LEN);
    }

    #[test]
    fn states_parse() {
        for s in State::ALL {
            assert_eq!(s.as_str().parse::<State>().unwrap(), s);
        }
        assert!("nope".parse::<State>().is_err());
    }
}
