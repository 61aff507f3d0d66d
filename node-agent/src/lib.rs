//! `node-agent`: the daemon on each compute node. It joins a cluster with nothing but a NATS
//! address, advertises its spare capacity under a lease, pulls requests from the shard queues
//! it can serve (under pull credit, with its fitness as the pull priority), claims them with a
//! compare-and-swap on the request record, builds them through its driver, and reconciles its
//! books with what the hypervisor really runs.
//!
//! Start with [`run`]. The decisions are pure and live in `placement` (`plan_pulls`, the
//! ledger, the life cycle) and in [`decide`] and [`mode`]; the rest is the async shell.
//!
//! # Layout
//! * `config`: settings and their validation.
//! * `identity`: node id, signing key and boot epoch in the state dir.
//! * `capacity`: host totals from sysinfo, overridden by config.
//! * `driver`: the provisioning trait, its log, and the in-memory driver.
//! * `mode`: the node's state machine (active, cordoned, draining, fenced, unhealthy...).
//! * `decide`: what to do with a delivered hint.
//! * `agent`: shared state, pull planning and issuing, event routing.
//! * `claim`, `build`: the claim path and the build path.
//! * `lease`: registration, renewal, self-fencing.
//! * `commands`: deletes and admin state from the node's durable channel.
//! * `reconcile`: ledger vs hypervisor.
//! * `watch`: cluster config and backlog flags, on the subjects the config bucket republishes
//!   them on; `follow`: the loop that re-opens it, shared with `commands`.
//! * `metrics`: metric names.

pub mod agent;
pub mod build;
pub mod capacity;
pub mod claim;
pub mod commands;
pub mod config;
pub mod decide;
pub mod driver;
mod follow;
pub mod identity;
pub mod lease;
pub mod metrics;
pub mod mode;
pub mod reconcile;
pub mod watch;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use bus::{Bus, BusError};
use placement::ledger::NodeLedger;
use placement::pull::NodeProfile;
use placement::{Resources, TraitName, Zone};
use rand::SeedableRng;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::agent::{AfterCleanup, Agent, Inner, Phase};
use crate::capacity::CapacitySource;
use crate::config::{Config, DriverKind};
use crate::driver::libvirt::LibvirtDriver;
use crate::driver::{BuildLog, Driver, memory::MemoryDriver};
use crate::identity::Identity;
use crate::mode::Mode;

/// Parts a caller may supply instead of what the config describes (tests, the local cluster).
#[derive(Default)]
pub struct Deps {
    /// A driver to use instead of building one from config.
    pub driver: Option<Arc<dyn Driver>>,
    /// A capacity source to use instead of sysinfo.
    pub capacity: Option<Box<dyn CapacitySource>>,
}

/// A handle on a running agent, for tests that embed it.
pub struct Running {
    /// The agent.
    pub agent: Arc<Agent>,
}

async fn until<T>(cancel: &CancellationToken, fut: impl Future<Output = T>) -> Option<T> {
    tokio::select! {
        _ = cancel.cancelled() => None,
        v = fut => Some(v),
    }
}

/// Runs the agent until `shutdown` resolves, then stops cleanly: no new pulls, in-flight
/// builds finished (or handed back after `shutdown_grace`), advert removed.
pub async fn run(
    cfg: Config,
    deps: Deps,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let cancel = CancellationToken::new();
    tokio::pin!(shutdown);
    let agent = tokio::select! {
        a = start(cfg, deps, cancel.clone()) => a?,
        _ = &mut shutdown => {
            cancel.cancel();
            return Ok(());
        }
    };
    agent.wait_and_stop(shutdown).await;
    Ok(())
}

/// Starts an agent and returns once it is registered and working.
pub async fn start(
    cfg: Config,
    deps: Deps,
    cancel: CancellationToken,
) -> anyhow::Result<Arc<Agent>> {
    cfg.validate()?;
    let identity = Identity::load_or_create(&cfg.state_dir, cfg.node_id.as_deref())?;
    let epoch = identity.next_epoch()?;
    let node = identity.node.clone();
    tracing::info!(node.id = %node, epoch = %epoch, "starting node agent");
    tracing::info!(config = ?RedactedConfig(&cfg), "effective configuration");
    let (client, conn) = bus::connect_lazy(&cfg.nats, &format!("updraft-agent-{node}")).await?;
    let mut waiting = conn.clone();
    if tokio::time::timeout(Duration::from_secs(2), waiting.connected())
        .await
        .is_err()
    {
        tracing::warn!(url = %cfg.nats.url, "waiting for NATS");
        until(&cancel, waiting.connected())
            .await
            .context("stopped while waiting for NATS")?;
    }
    let bus = loop {
        match Bus::open(client.clone()).await {
            Ok(b) => break b,
            Err(BusError::Missing { what }) => {
                tracing::warn!(missing = %what, "waiting for a dispatcher to create the topology")
            }
            Err(e) => tracing::warn!(error = %e, "cannot bind the topology; retrying"),
        }
        until(&cancel, tokio::time::sleep(Duration::from_secs(1)))
            .await
            .context("stopped while waiting for the topology")?;
    };
    let lease_ttl = bus
        .nodes
        .lease_ttl()
        .await
        .context("read the cluster's lease TTL")?;
    let heartbeat = cfg.heartbeat_for(lease_ttl)?;
    tracing::info!(lease_ttl = ?lease_ttl, heartbeat = ?heartbeat, "lease timing from the cluster");
    let cluster = loop {
        match bus.cluster.config().await {
            Ok(Some(c)) => break c.value,
            Ok(None) => tracing::warn!("waiting for the cluster config"),
            Err(e) => tracing::warn!(error = %e, "cannot read the cluster config; retrying"),
        }
        until(&cancel, tokio::time::sleep(Duration::from_secs(1)))
            .await
            .context("stopped while waiting for the cluster config")?;
    };
    if let Ok(false) = bus.cluster.republishes().await {
        // the node follows its config keys on the subjects a dispatcher of this version has
        // the bucket republish them on; it hears them once one has started
        tracing::error!(
            "the config bucket does not republish its changes (its dispatchers are older than this agent): this node hears no change of the shard map or of the backlog flags until a dispatcher of this version starts; upgrade dispatchers before agents"
        );
    }
    let map = cluster.shard_map;
    let zone = match &cfg.zone {
        Some(z) => Zone::new(z.as_str())?,
        None => map.default_zone.clone(),
    };
    if !map.zones.contains(&zone) {
        bail!(
            "zone `{zone}` is not in the cluster's shard map (zones: {:?})",
            map.zones.iter().map(Zone::as_str).collect::<Vec<_>>()
        );
    }
    let traits = cfg
        .traits
        .iter()
        .map(|t| TraitName::new(t.as_str()))
        .collect::<Result<Vec<_>, _>>()?;
    let driver: Arc<dyn Driver> = match deps.driver {
        Some(d) => d,
        None => match cfg.driver.kind {
            DriverKind::Memory => Arc::new(MemoryDriver::new(
                node.clone(),
                cfg.driver.memory.clone(),
                BuildLog::in_dir(&cfg.state_dir),
            )),
            DriverKind::Libvirt => Arc::new(
                LibvirtDriver::new(
                    node.clone(),
                    cfg.driver.libvirt.clone(),
                    BuildLog::in_dir(&cfg.state_dir),
                )
                .context("libvirt driver")?,
            ),
        },
    };
    let source: Box<dyn CapacitySource> = match deps.capacity {
        Some(c) => c,
        None => capacity::discover_for(&cfg, driver.as_ref()).await,
    };
    let totals = capacity::totals(&cfg.capacity, source.as_ref());
    let reserved = Resources::new(
        cfg.reserved.vcpus,
        cfg.reserved.memory_mib,
        cfg.reserved.disk_gib,
    );
    let ledger = NodeLedger::new(totals.clone(), reserved, cfg.ratios)
        .context("capacity from totals, reserve and ratios")?;
    tracing::info!(totals = %totals, capacity = %ledger.capacity(), "capacity");
    let (puller, events) = bus::puller::Puller::new(client.clone());
    let seed = placement::ids::stable_hash(&[node.as_str().as_bytes(), &epoch.0.to_le_bytes()]);
    let inner = Inner {
        ledger,
        epoch,
        mode: Mode {
            connected: conn.is_connected(),
            ..Default::default()
        },
        map,
        max_attempts: cluster.max_attempts,
        flags: BTreeMap::new(),
        aside: placement::step_aside::StepAside::default(),
        demand: Vec::new(),
        holding: None,
        pulls: BTreeMap::new(),
        next_pull: 0,
        owned: BTreeMap::new(),
        unclean: BTreeMap::new(),
        lease_rev: 0,
        last_renewal: tokio::time::Instant::now(),
        consecutive_failures: 0,
        rng: rand_chacha::ChaCha8Rng::seed_from_u64(seed),
    };
    let agent = Arc::new(Agent {
        profile: NodeProfile {
            id: node.clone(),
            zone,
            traits,
        },
        identity,
        bus,
        puller,
        driver,
        conn,
        inner: Mutex::new(inner),
        replan: Notify::new(),
        empty: tokio::sync::watch::Sender::new(true),
        cancel: cancel.clone(),
        tasks: TaskTracker::new(),
        started_at: common::clock::now(),
        lease_ttl,
        heartbeat,
        cfg,
    });
    {
        let d = agent.driver.clone();
        agent.tasks.spawn(async move {
            if let Err(e) = d.prepare().await {
                tracing::warn!(error = %e, "driver preparation failed; the first build retries it");
            }
        });
    }
    agent.register().await?;
    let report = agent.reconcile().await;
    tracing::info!(
        adopted = report.adopted,
        destroyed = report.destroyed,
        foreign = report.foreign,
        "initial reconcile"
    );
    agent.tasks.spawn(agent.clone().event_loop(events));
    agent.tasks.spawn(agent.clone().pull_loop());
    agent.tasks.spawn(agent.clone().lease_loop());
    agent.tasks.spawn(agent.clone().command_loop());
    agent.tasks.spawn(agent.clone().cluster_loop());
    agent.tasks.spawn(agent.clone().reconcile_loop());
    agent.tasks.spawn(agent.clone().health_loop());
    agent.tasks.spawn(agent.clone().conn_loop());
    agent.replan.notify_one();
    tracing::info!(node.id = %node, "node agent running");
    Ok(agent)
}

impl Agent {
    /// Waits for `shutdown` (or an internal fatal stop), then stops cleanly.
    pub async fn wait_and_stop(self: Arc<Self>, shutdown: impl Future<Output = ()>) {
        tokio::select! {
            _ = shutdown => {}
            _ = self.cancel.cancelled() => {}
        }
        self.stop().await;
    }

    /// Clean stop: no new work, builds finished or handed back, advert removed.
    pub async fn stop(self: Arc<Self>) {
        tracing::info!("stopping: no new work; finishing in-flight builds");
        {
            let mut inner = self.lock();
            inner.mode.stopping = true;
            self.stop_pulling(&mut inner);
        }
        let deadline = tokio::time::Instant::now() + self.cfg.shutdown_grace;
        while tokio::time::Instant::now() < deadline && self.building() > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let unfinished: Vec<_> = self
            .lock()
            .owned
            .iter()
            .filter(|(_, o)| matches!(o.phase, Phase::Claimed | Phase::Building))
            .map(|(k, _)| k.clone())
            .collect();
        for id in unfinished {
            tracing::warn!(request.id = %id, "build unfinished at shutdown; handing it back");
            let reason = format!("node {} shut down during the build", self.identity.node);
            if self
                .destroy_confirmed(&id, AfterCleanup::GiveBack(reason.clone()))
                .await
            {
                self.give_back(&id, &reason).await;
            }
        }
        let (node, rev) = { (self.identity.node.clone(), self.lock().lease_rev) };
        if let Err(e) = self.bus.nodes.deregister(&node, rev).await {
            tracing::warn!(error = %e, "could not remove the advert; it expires with its lease");
        }
        self.cancel.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tasks.wait()).await;
        tracing::info!("node agent stopped");
    }

    /// Builds in flight.
    pub fn building(&self) -> usize {
        self.lock()
            .owned
            .values()
            .filter(|o| matches!(o.phase, Phase::Claimed | Phase::Building))
            .count()
    }
}

struct RedactedConfig<'a>(&'a Config);

impl std::fmt::Debug for RedactedConfig<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // NatsConfig's secrets already print as <redacted>
        write!(f, "{:?}", self.0)
    }
}
