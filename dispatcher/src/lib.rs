//! `dispatcher`: updraft's stateless front door. It validates requests, routes them to shard
//! queues, and tracks each to a terminal state, without ever choosing a node: nodes pull.
//! Any number run side by side; all state is in NATS, so killing one at any moment loses
//! nothing (another finishes its work).
//!
//! Start with [`start`]. The operations are in `service`; the reactions to KV changes in
//! `reactor`; timers and the sweep in `timekeeper`.
//!
//! # Layout
//! * `config`: settings, and the cluster config they seed.
//! * `view`: the in-memory view built from KV watches (open requests, claims per node, adverts).
//! * `service`: create, batch, get, list, delete, explain, plan, nodes, shards, capacity.
//! * `claims`: claim signatures: verify, and undo forged claims.
//! * `reactor`: watch loops; hint publishing for queued records; reaping on lease loss.
//! * `timekeeper`: durable timer fires (spill, deadline) and the sweep; backlog flags.
//! * `api`, `http`, `natsapi`: the API types and its two front ends; `page`: the status page.
//! * `metrics`: metric names.

pub mod api;
pub mod claims;
pub mod config;
pub mod http;
pub mod metrics;
pub mod natsapi;
pub mod page;
pub mod reactor;
pub mod service;
pub mod standing;
pub mod timekeeper;
pub mod view;

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::Context;
use bus::Bus;
use bus::BusError;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use crate::config::Config;
pub use crate::service::Dispatcher;
use crate::view::View;

/// A started dispatcher.
pub struct Running {
    /// The dispatcher.
    pub dispatcher: Arc<Dispatcher>,
    /// Where its HTTP API listens.
    pub http_addr: SocketAddr,
}

impl Running {
    /// Stops it and waits for its tasks.
    pub async fn stop(self) {
        self.dispatcher.cancel.cancel();
        self.dispatcher.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.dispatcher.tasks.wait()).await;
    }
}

/// Runs a dispatcher until `shutdown` resolves.
pub async fn run(
    cfg: Config,
    prometheus: Option<metrics_exporter_prometheus::PrometheusHandle>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let running = start(cfg, prometheus).await?;
    let cancel = running.dispatcher.cancel.clone();
    tokio::select! {
        _ = shutdown => {}
        _ = cancel.cancelled() => {}
    }
    tracing::info!("dispatcher stopping");
    running.stop().await;
    Ok(())
}

/// Starts a dispatcher: creates (or adopts) the topology and cluster config, starts the
/// watches, timers, sweep and both API front ends.
pub async fn start(
    cfg: Config,
    prometheus: Option<metrics_exporter_prometheus::PrometheusHandle>,
) -> anyhow::Result<Running> {
    cfg.validate().context("invalid configuration")?;
    tracing::info!(config = ?cfg, "effective configuration");
    let seed = cfg.cluster()?;
    let (client, conn) = bus::connect_lazy(&cfg.nats, "updraft-dispatcher").await?;
    let mut waiting = conn.clone();
    if tokio::time::timeout(cfg.nats.connect_timeout, waiting.connected())
        .await
        .is_err()
    {
        tracing::warn!(url = %cfg.nats.url, "waiting for NATS");
        waiting.connected().await;
    }
    let bus = loop {
        match Bus::ensure(client.clone(), &cfg.topology).await {
            Ok(b) => break b,
            Err(e) => {
                tracing::warn!(error = %e, "cannot create the topology yet; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    let cluster = bus
        .cluster
        .init_config(&seed)
        .await
        .context("store or adopt the cluster config")?
        .value;
    if cluster != seed {
        tracing::info!(
            version = cluster.shard_map.version,
            "adopted the cluster's existing config (the file only seeds a new cluster)"
        );
    }
    // idempotent, so retried: a cluster electing leaders (or busy creating replicated
    // streams for several dispatchers at once) answers slowly for a while
    let mut delay = Duration::from_millis(500);
    let mut attempts = 0u32;
    let shards = loop {
        attempts += 1;
        match bus.ensure_shards(&cluster.shard_map, &cfg.topology).await {
            Ok(n) => break n,
            // a timeout always, other NATS errors (no leader yet...) for a while
            Err(e)
                if matches!(e, BusError::Timeout { .. }) || (e.is_ambiguous() && attempts < 20) =>
            {
                tracing::warn!(error = %e, "cannot create the shard streams yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e).context("create shard streams"),
        }
    };
    tracing::info!(
        shards,
        zones = cluster.shard_map.zones.len(),
        classes = cluster.shard_map.size_classes.len(),
        "topology ready"
    );
    let (changes, _) = broadcast::channel(4096);
    let (verify_tx, verify_rx) = tokio::sync::mpsc::channel(reactor::VERIFY_QUEUE);
    let d = Arc::new(Dispatcher {
        view: RwLock::new(View::new(cfg.recent_finished)),
        cluster: RwLock::new(cluster),
        bus,
        conn,
        changes,
        hinted: Mutex::new(HashSet::new()),
        verified: Mutex::new(claims::Verified::default()),
        verify_tx,
        flags: Mutex::new(BTreeMap::new()),
        demand_sent: Mutex::new(BTreeMap::new()),
        prometheus,
        cancel: CancellationToken::new(),
        tasks: TaskTracker::new(),
        cfg,
    });
    d.tasks.spawn(d.clone().verify_loop(verify_rx));
    d.tasks.spawn(d.clone().record_loop());
    d.tasks.spawn(d.clone().node_loop());
    d.tasks.spawn(d.clone().cluster_loop());
    d.tasks.spawn(d.clone().timer_loop());
    d.tasks.spawn(d.clone().sweep_loop());
    if d.cfg.nats_api {
        let dd = d.clone();
        d.tasks.spawn(async move {
            if let Err(e) = natsapi::serve(dd).await {
                tracing::error!(error = %e, "NATS API stopped");
            }
        });
    }
    // serve once the view holds what KV holds (bounded: a huge bucket still gets an API that
    // answers, with admission deferred until the adverts are in)
    let caught_up = async {
        loop {
            {
                let v = d.view();
                if v.caught_up && v.nodes_caught_up {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(10), caught_up)
        .await
        .is_err()
    {
        tracing::warn!("serving before the view caught up with KV");
    }
    let listener = tokio::net::TcpListener::bind(d.cfg.http_listen)
        .await
        .with_context(|| format!("bind the HTTP API on {}", d.cfg.http_listen))?;
    let http_addr = listener.local_addr()?;
    let app = http::router(d.clone());
    let cancel = d.cancel.clone();
    d.tasks.spawn(async move {
        let res = axum::serve(listener, app)
            .with_graceful_shutdown(async move { cancel.cancelled().await })
            .await;
        if let Err(e) = res {
            tracing::error!(error = %e, "HTTP API stopped");
        }
    });
    tracing::info!(http = %format!("http://{http_addr}"), "dispatcher running");
    Ok(Running {
        dispatcher: d,
        http_addr,
    })
}
