//! A benchmark cluster: nats-server(s), one in-process dispatcher, K in-process agents.

use std::sync::Arc;
use std::time::Duration;

use bus::server::{NatsCluster, NatsServer, ServerOptions};
use placement::Resources;
use tokio_util::sync::CancellationToken;

/// The broker side.
pub enum Broker {
    /// One server.
    Single(NatsServer),
    /// Three servers, replicas 3.
    Cluster(NatsCluster),
}

impl Broker {
    /// Starts one server or a 3-server cluster.
    pub fn start(cluster: bool) -> anyhow::Result<Broker> {
        Ok(if cluster {
            Broker::Cluster(NatsCluster::start()?)
        } else {
            Broker::Single(NatsServer::start(ServerOptions::default())?)
        })
    }

    /// Client URL(s).
    pub fn url(&self) -> String {
        match self {
            Broker::Single(s) => s.url(),
            Broker::Cluster(c) => c.urls(),
        }
    }

    /// CPU seconds of every server process.
    pub fn cpu(&self) -> f64 {
        match self {
            Broker::Single(s) => s.pid().map(crate::broker::cpu_seconds).unwrap_or(0.0),
            Broker::Cluster(c) => c
                .servers
                .iter()
                .filter_map(NatsServer::pid)
                .map(crate::broker::cpu_seconds)
                .sum(),
        }
    }

    /// Replicas to configure.
    pub fn replicas(&self) -> usize {
        match self {
            Broker::Single(_) => 1,
            Broker::Cluster(_) => 3,
        }
    }
}

/// Settings an experiment changes from the defaults.
#[derive(Debug, Clone, Default)]
pub struct Tuning {
    /// The agents' pull settings.
    pub pull: placement::pull::PullConfig,
    /// The dispatcher's spill deadline (`ladder.spill_after`).
    pub spill_after: Option<Duration>,
    /// The dispatcher's sweep period.
    pub sweep_interval: Option<Duration>,
}

/// A running cluster.
pub struct Cluster {
    /// The broker.
    pub broker: Broker,
    /// The dispatcher.
    pub dispatcher: dispatcher::Running,
    /// The agents.
    pub agents: Vec<Arc<node_agent::agent::Agent>>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts everything: `agents` agents of size `node`, all taking work.
    pub async fn start(cluster: bool, agents: usize, node: Resources) -> anyhow::Result<Cluster> {
        Self::start_with(cluster, agents, node, &Tuning::default()).await
    }

    /// Like [`Cluster::start`] with settings of an experiment.
    pub async fn start_with(
        cluster: bool,
        agents: usize,
        node: Resources,
        tuning: &Tuning,
    ) -> anyhow::Result<Cluster> {
        let pull = &tuning.pull;
        let broker = Broker::start(cluster)?;
        let url = broker.url();
        let mut dc = dispatcher::Config::default();
        if let Some(s) = tuning.spill_after {
            dc.ladder.spill_after = s;
        }
        if let Some(s) = tuning.sweep_interval {
            dc.sweep_interval = s;
        }
        dc.nats.url = url.clone();
        dc.http_listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        dc.topology.replicas = broker.replicas();
        dc.topology.max_waiting = 100_000;
        let dispatcher = loop {
            match dispatcher::start(dc.clone(), None).await {
                Ok(d) => break d,
                Err(e) if cluster => {
                    tracing::debug!(error = %e, "cluster not ready yet");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e),
            }
        };
        let dir = tempfile::tempdir()?;
        let mut out = Vec::with_capacity(agents);
        // start agents a few at a time: each one connects, registers and reconciles
        let mut pending = futures::stream::FuturesUnordered::new();
        for i in 0..agents {
            let mut c = node_agent::config::Config {
                node_id: Some(format!("bench-{i:05}")),
                state_dir: dir.path().join(format!("a{i}")),
                reserved: node_agent::config::ReservedConfig {
                    vcpus: 0,
                    memory_mib: 0,
                    disk_gib: 0,
                },
                ratios: placement::AllocationRatios {
                    cpu: 1.0,
                    ram: 1.0,
                    disk: 1.0,
                },
                capacity: node_agent::config::CapacityConfig {
                    vcpus: Some(node.vcpus),
                    memory_mib: Some(node.memory_mib),
                    disk_gib: Some(node.disk_gib),
                    extended: Default::default(),
                },
                ..Default::default()
            };
            c.nats.url = url.clone();
            c.driver.kind = node_agent::config::DriverKind::Memory;
            c.driver.memory.build_time = Duration::ZERO;
            c.pull = pull.clone();
            let deps = node_agent::Deps {
                driver: None,
                capacity: Some(Box::new(node_agent::capacity::Fixed(node.clone()))),
            };
            pending.push(node_agent::start(c, deps, CancellationToken::new()));
            if pending.len() >= 32
                && let Some(a) = futures::StreamExt::next(&mut pending).await
            {
                out.push(a?);
            }
        }
        while let Some(a) = futures::StreamExt::next(&mut pending).await {
            out.push(a?);
        }
        // wait until the dispatcher sees every node
        for _ in 0..600 {
            if dispatcher.dispatcher.view().adverts().len() >= agents {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(Cluster {
            broker,
            dispatcher,
            agents: out,
            _dir: dir,
        })
    }

    /// Every client (for message counts).
    pub fn clients(&self) -> Vec<async_nats::Client> {
        let mut v = vec![self.dispatcher.dispatcher.bus.client.clone()];
        v.extend(self.agents.iter().map(|a| a.bus.client.clone()));
        v
    }

    /// Stops everything.
    pub async fn stop(self) {
        for a in self.agents {
            a.cancel.cancel();
        }
        self.dispatcher.stop().await;
    }
}
