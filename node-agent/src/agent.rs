//! The agent's shared state and its pull machinery: plan pulls under credit, issue them,
//! route what comes back. Claims, builds, the lease, commands and reconcile live in their own
//! modules as `impl Agent` blocks over the same state.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bus::puller::{PullEnd, PullEvent, PullSpec, Puller};
use bus::{Bus, ConnState};
use placement::flag_writes;
use placement::ledger::{NodeLedger, PullId};
use placement::lifecycle::Claim;
use placement::pull::{
    HeldCover, NodeProfile, PlanInput, PullDiff, diff_pulls, plan_pulls, priority_tolerance,
};
use placement::step_aside::StepAside;
use placement::wire::{BacklogFlag, NodeAdvert, WIRE_VERSION};
use placement::{Epoch, Lane, RequestId, ShardId, ShardMap, Timestamp};
use rand_chacha::ChaCha8Rng;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::driver::Driver;
use crate::identity::Identity;
use crate::metrics as m;
use crate::mode::Mode;

/// Where a request this node holds is in its life on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Claimed, build not started.
    Claimed,
    /// The driver is building it.
    Building,
    /// Running.
    Active,
    /// Being destroyed.
    Deleting,
}

/// What to do once the domain of a request whose cleanup failed is confirmed gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterCleanup {
    /// Hand the request back (next attempt, this node excluded), with this reason.
    GiveBack(String),
    /// Forget it and return its capacity (the record moved on).
    Release,
    /// Finish the delete the user asked for.
    FinishDelete,
}

/// A request this node holds, and the claim it holds it under.
#[derive(Debug, Clone)]
pub struct Owned {
    /// The claim as last written (the epoch changes when re-confirmed after a fence).
    pub claim: Claim,
    /// Phase.
    pub phase: Phase,
}

/// Mutable state, behind one lock that is never held across an await.
pub struct Inner {
    /// The ledger.
    pub ledger: NodeLedger,
    /// Current boot epoch.
    pub epoch: Epoch,
    /// State facts.
    pub mode: Mode,
    /// Shard map in force.
    pub map: ShardMap,
    /// Attempts before a request fails (cluster config).
    pub max_attempts: u32,
    /// Backlog flags by key.
    pub flags: BTreeMap<String, BacklogFlag>,
    /// Lanes it pulls last for a while, having handed a message of them back.
    pub aside: StepAside,
    /// The class this node holds capacity back for (starvation guard), if any.
    pub holding: Option<String>,
    /// Recent demand per class in this node's zone.
    pub demand: Vec<placement::wire::DemandEntry>,
    /// Outstanding pulls: shard, lane, the priority they were issued with, and how many
    /// messages each still waits for (the ledger also holds the credit of messages that
    /// arrived and are being dealt with).
    pub pulls: BTreeMap<PullId, (ShardId, Lane, u8, u32)>,
    /// Next pull id.
    pub next_pull: u64,
    /// Requests held, by id.
    pub owned: BTreeMap<RequestId, Owned>,
    /// Held requests whose domain could not be confirmed destroyed: their capacity stays
    /// allocated until a later cleanup succeeds (reconcile retries them).
    pub unclean: BTreeMap<RequestId, AfterCleanup>,
    /// Revision of our advert (the lease).
    pub lease_rev: u64,
    /// Last successful renewal.
    pub last_renewal: tokio::time::Instant,
    /// Build failures in a row.
    pub consecutive_failures: u32,
    /// Randomness (claim tokens, random policy), seeded per node.
    pub rng: ChaCha8Rng,
}

/// The running agent.
pub struct Agent {
    /// Settings.
    pub cfg: Config,
    /// Identity.
    pub identity: Identity,
    /// Zone and traits.
    pub profile: NodeProfile,
    /// NATS.
    pub bus: Bus,
    /// Pulls.
    pub puller: Puller,
    /// Hypervisor.
    pub driver: Arc<dyn Driver>,
    /// Connection state.
    pub conn: ConnState,
    /// Mutable state.
    pub inner: Mutex<Inner>,
    /// Wakes the pull planner.
    pub replan: Notify,
    /// Whether the node is empty, as its last plan saw it: the backlog flag keys it watches
    /// depend on it (`placement::flag_writes`), so the config watch follows its changes.
    pub empty: tokio::sync::watch::Sender<bool>,
    /// Stops every task.
    pub cancel: CancellationToken,
    /// Tracks every task.
    pub tasks: TaskTracker,
    /// When this process started.
    pub started_at: Timestamp,
    /// The cluster's lease TTL (read from the node adverts' bucket): past it without a
    /// renewal the node fences itself.
    pub lease_ttl: Duration,
    /// Lease renewal period.
    pub heartbeat: Duration,
}

impl Agent {
    /// Locks the state (never across an await).
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().expect("agent state lock")
    }

    /// The current claim of a held request.
    pub fn claim_of(&self, id: &RequestId) -> Option<Claim> {
        self.lock().owned.get(id).map(|o| o.claim.clone())
    }

    /// Builds the advert from the current state.
    pub fn advert(&self, inner: &Inner, now: Timestamp) -> NodeAdvert {
        let l = &inner.ledger;
        NodeAdvert {
            v: WIRE_VERSION,
            node: self.identity.node.clone(),
            epoch: inner.epoch,
            zone: self.profile.zone.clone(),
            traits: self.profile.traits.clone(),
            totals: l.totals().clone(),
            reserved: l.reserved().clone(),
            ratios: *l.ratios(),
            capacity: l.capacity().clone(),
            unallocated: l.unallocated(),
            vms: u32::try_from(l.len()).unwrap_or(u32::MAX),
            building: u32::try_from(
                inner
                    .owned
                    .values()
                    .filter(|o| matches!(o.phase, Phase::Claimed | Phase::Building))
                    .count(),
            )
            .unwrap_or(u32::MAX),
            state: inner.mode.state(),
            state_reason: inner.mode.reason(),
            overcommitted: inner.mode.overcommitted,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            driver: self.driver.kind().to_string(),
            started_at: self.started_at,
            heartbeat_at: now,
            public_key: Some(self.identity.public_key()),
            pack_tier: self.cfg.pull.pack_tier(&self.identity.node),
            guard: placement::wire::GuardReach::of(&self.cfg.pull.guard),
        }
    }

    /// Publishes gauges of the ledger.
    pub fn gauges(&self, inner: &Inner) {
        let l = &inner.ledger;
        let spare = l.unallocated();
        for (dim, v) in spare.dims() {
            metrics::gauge!(m::SPARE, "resource" => dim.as_str().to_string()).set(v as f64);
        }
        for (dim, v) in l.capacity().dims() {
            metrics::gauge!(m::CAPACITY, "resource" => dim.as_str().to_string()).set(v as f64);
        }
        metrics::gauge!(m::VMS).set(l.len() as f64);
        metrics::gauge!(m::PULLS_OUTSTANDING).set(inner.pulls.len() as f64);
        let building = inner
            .owned
            .values()
            .filter(|o| matches!(o.phase, Phase::Claimed | Phase::Building))
            .count();
        metrics::gauge!(m::IN_FLIGHT).set(building as f64);
    }

    /// Stops pulling: every outstanding pull cancelled, every credit back (a message already
    /// in flight still arrives and is handed back).
    pub fn stop_pulling(&self, inner: &mut Inner) {
        for id in inner.ledger.return_all_credit() {
            self.puller.cancel(id);
        }
        for id in std::mem::take(&mut inner.pulls).into_keys() {
            self.puller.cancel(id);
        }
    }

    /// Re-plans the node's pulls: computes the set it should have now (from scratch, as if no
    /// credit were held), keeps the outstanding pulls that are in it with the same priority,
    /// cancels the rest and issues what is missing.
    pub async fn plan_and_issue(&self) {
        let specs: Vec<PullSpec> = {
            let mut guard = self.lock();
            let inner = &mut *guard;
            if !inner.mode.takes_work() {
                if !inner.pulls.is_empty() {
                    self.stop_pulling(inner);
                }
                return;
            }
            let now = common::clock::now();
            // a key whose refreshes stopped lost its delete on the way
            let flags: Vec<BacklogFlag> = inner
                .flags
                .values()
                .filter(|f| flag_writes::is_current(f, now))
                .cloned()
                .collect();
            let covers: Vec<HeldCover> = inner
                .pulls
                .iter()
                .filter(|(id, (_, lane, _, _))| *lane == Lane::Fit && inner.ledger.is_cover(**id))
                .map(|(_, (shard, _, priority, left))| HeldCover {
                    shard: shard.clone(),
                    priority: *priority,
                    left: *left,
                })
                .collect();
            let input = PlanInput {
                node: &self.profile,
                map: &inner.map,
                ledger: &inner.ledger,
                ignore_credit: true,
                outstanding: &[],
                backlog: &flags,
                covers: &covers,
                demand: &inner.demand,
                cfg: &self.cfg.pull,
                now,
            };
            let mut plan = plan_pulls(&input, &mut inner.rng);
            let empty = inner.ledger.unallocated() == *inner.ledger.capacity();
            self.empty
                .send_if_modified(|was| std::mem::replace(was, empty) != empty);
            inner.aside.apply(&mut plan.pulls, input.now);
            let hold = plan.hold.as_ref().map(|h| h.class.to_string());
            if hold != inner.holding {
                match &hold {
                    Some(class) => {
                        tracing::info!(class, "holding back capacity for a backlogged large class")
                    }
                    None => tracing::info!("hold-back ended"),
                }
                inner.holding = hold;
            }
            let held: Vec<_> = inner
                .pulls
                .iter()
                .map(|(id, (shard, lane, priority, left))| {
                    let cover = inner.ledger.is_cover(*id);
                    (*id, shard.clone(), *lane, *priority, *left, cover)
                })
                .collect();
            let PullDiff {
                cancel,
                issue: desired,
            } = diff_pulls(plan.pulls, &held, priority_tolerance(self.cfg.pull.policy));
            for id in cancel {
                if let Some((_, _, _, left)) = inner.pulls.remove(&id) {
                    inner.ledger.return_units(id, left);
                }
                self.puller.cancel(id);
            }
            let mut specs = Vec::with_capacity(desired.len());
            for intent in desired {
                inner.next_pull += 1;
                let id = PullId(inner.next_pull);
                if inner
                    .ledger
                    .take_credit(id, &intent.credit, intent.batch)
                    .is_err()
                {
                    continue; // a late delivery took some spare meanwhile; the next plan adjusts
                }
                inner.pulls.insert(
                    id,
                    (
                        intent.shard.clone(),
                        intent.lane,
                        intent.priority,
                        intent.batch,
                    ),
                );
                specs.push(PullSpec {
                    pull: id,
                    shard: intent.shard,
                    lane: intent.lane,
                    priority: intent.priority,
                    batch: intent.batch,
                    expiry: self.cfg.pull.expiry,
                });
            }
            specs
        };
        for spec in specs {
            match self.puller.issue(&spec).await {
                Ok(()) => {
                    metrics::counter!(m::PULLS_ISSUED, "lane" => spec.lane.as_str()).increment(1)
                }
                Err(e) => {
                    tracing::debug!(error = %e, shard = %spec.shard, "pull not issued");
                    let mut inner = self.lock();
                    inner.pulls.remove(&spec.pull);
                    inner.ledger.return_credit(spec.pull);
                }
            }
        }
    }

    /// Re-plans when woken, when a step-aside ends, and at least every second (expired pulls,
    /// changed flags).
    pub async fn pull_loop(self: Arc<Self>) {
        loop {
            let mut wait = Duration::from_secs(1);
            {
                let mut inner = self.lock();
                let now = common::clock::now();
                inner.aside.expire(now);
                if let Some(end) = inner.aside.next_end() {
                    wait = wait.min(end.since(now));
                }
            }
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = self.replan.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
            self.plan_and_issue().await;
        }
    }

    /// Routes pull events: ended pulls return their credit, deliveries are handled.
    pub async fn event_loop(self: Arc<Self>, mut events: mpsc::Receiver<PullEvent>) {
        loop {
            let ev = tokio::select! {
                _ = self.cancel.cancelled() => return,
                ev = events.recv() => match ev { Some(ev) => ev, None => return },
            };
            match ev {
                PullEvent::Ended { pull, why } => {
                    let label = match &why {
                        PullEnd::Expired => "expired",
                        PullEnd::Refused { .. } => "refused",
                        PullEnd::Lost => "lost",
                    };
                    if let PullEnd::Refused { code, description } = &why {
                        tracing::debug!(code, description, "pull refused by the server");
                    }
                    metrics::counter!(m::PULLS_ENDED, "why" => label).increment(1);
                    {
                        // what it still waited for will not come; what it brought is being
                        // dealt with and keeps its credit until then
                        let mut inner = self.lock();
                        if let Some((_, _, _, left)) = inner.pulls.remove(&pull) {
                            inner.ledger.return_units(pull, left);
                        }
                    }
                    self.replan.notify_one();
                }
                PullEvent::Delivered { pull, delivery } => {
                    if let Some(p) = pull {
                        let mut inner = self.lock();
                        if let Some((_, _, _, left)) = inner.pulls.get_mut(&p) {
                            *left = left.saturating_sub(1);
                            if *left == 0 {
                                inner.pulls.remove(&p);
                            }
                        }
                    }
                    let me = self.clone();
                    self.tasks
                        .spawn(async move { me.handle_delivery(pull, *delivery).await });
                }
            }
        }
    }

    /// Follows the connection: no pulls or claims while disconnected.
    pub async fn conn_loop(self: Arc<Self>) {
        let mut conn = self.conn.clone();
        loop {
            let up = conn.is_connected();
            self.lock().mode.connected = up;
            if up {
                self.replan.notify_one();
            }
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                alive = conn.changed() => if !alive { return },
            }
        }
    }
}
