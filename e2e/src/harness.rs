//! A whole cluster for a test: NATS, dispatchers, agents, and API helpers.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use bus::records::RecordEvent;
use futures::StreamExt;
use node_agent::capacity::Fixed;
use placement::Resources;
use placement::lifecycle::{RequestRecord, State};
use serde_json::Value;
use testkit::{NatsCluster, NatsServer};
use tokio_util::sync::CancellationToken;

use crate::process::{Proc, bin};

/// Lease TTL used by every test cluster (short, so failures show quickly).
pub const LEASE_TTL: Duration = Duration::from_secs(3);

/// Knobs of a test cluster.
#[derive(Debug, Clone)]
pub struct HarnessOptions {
    /// Dispatchers to start in-process.
    pub dispatchers: usize,
    /// A 3-server JetStream cluster (replicas 3) instead of one server.
    pub cluster: bool,
    /// Default request deadline (seconds).
    pub deadline_s: u64,
    /// Time in a class before spill-over.
    pub spill_after: Duration,
    /// Size ladder top (largest request accepted).
    pub ladder_top: Resources,
    /// Work-queue partitions of every size class.
    pub partitions: u16,
    /// The dispatchers' `flag_after` (capped at `spill_after`, as in the dispatcher).
    pub flag_after: Duration,
    /// The dispatchers' `standing_below` (0: no standing flags).
    pub standing_below: u64,
}

impl Default for HarnessOptions {
    fn default() -> Self {
        HarnessOptions {
            dispatchers: 1,
            cluster: false,
            deadline_s: 60,
            spill_after: Duration::from_millis(800),
            ladder_top: Resources::new(64, 256 * 1024, 2560),
            partitions: 1,
            flag_after: placement::takers::DEFAULT_FLAG_AFTER,
            standing_below: placement::standing::DEFAULT_STANDING_BELOW,
        }
    }
}

enum Nats {
    Single(NatsServer),
    Cluster(NatsCluster),
}

/// An agent the harness started.
pub enum AgentHandle {
    /// In this process.
    InProcess {
        /// The agent.
        agent: Arc<node_agent::agent::Agent>,
        /// Cancels it.
        cancel: CancellationToken,
    },
    /// A real `updraft-agent` process.
    Process(Proc),
}

/// One agent and what the checker needs to know about it.
pub struct AgentInfo {
    /// Node id.
    pub node: String,
    /// Its state dir (driver log inside).
    pub state_dir: PathBuf,
    /// Schedulable capacity (for the overcommit check).
    pub capacity: Resources,
    /// The running agent.
    pub handle: AgentHandle,
}

impl AgentInfo {
    /// Its driver log.
    pub fn driver_log(&self) -> PathBuf {
        self.state_dir.join("driver-log.jsonl")
    }

    /// The process, for signals.
    pub fn process(&mut self) -> &mut Proc {
        match &mut self.handle {
            AgentHandle::Process(p) => p,
            AgentHandle::InProcess { .. } => panic!("agent {} runs in-process", self.node),
        }
    }
}

/// A running test cluster.
pub struct Harness {
    nats: Nats,
    /// NATS URL(s).
    pub url: String,
    /// Scratch directory.
    pub dir: tempfile::TempDir,
    /// Dispatchers (in-process).
    pub dispatchers: Vec<dispatcher::Running>,
    /// Agents.
    pub agents: Vec<AgentInfo>,
    /// Deaths and freezes the test caused.
    pub faults: crate::checker::Faults,
    /// The harness's own NATS view (records, adverts), independent of any dispatcher.
    pub bus: bus::Bus,
    http: reqwest::Client,
    opts: HarnessOptions,
}

/// `count` node names, `late-000` on, that the default pull config puts in its last pack tier
/// (a tier that pulls nothing without a backlog flag's floor).
pub fn last_tier_names(count: usize) -> Vec<String> {
    let pull = placement::pull::PullConfig::default();
    let last = pull.open_tiers - 1;
    let names: Vec<String> = (0..1000)
        .map(|i| format!("late-{i:03}"))
        .filter(|n| placement::NodeId::new(n.as_str()).is_ok_and(|id| pull.pack_tier(&id) == last))
        .take(count)
        .collect();
    assert_eq!(names.len(), count, "last-tier names");
    names
}

/// A dispatcher config for tests.
pub fn dispatcher_config(url: &str, opts: &HarnessOptions) -> dispatcher::Config {
    let mut c = dispatcher::Config::default();
    c.nats.url = url.to_string();
    c.http_listen = SocketAddr::from(([127, 0, 0, 1], 0));
    c.topology.lease_ttl = LEASE_TTL;
    c.topology.replicas = if opts.cluster { 3 } else { 1 };
    c.topology.ack_wait = Duration::from_secs(5);
    c.sweep_interval = Duration::from_millis(500);
    c.reap_grace = LEASE_TTL;
    c.hint_check_after = Duration::from_secs(5);
    c.default_deadline_s = opts.deadline_s;
    c.ladder.spill_after = opts.spill_after;
    c.ladder.partitions = opts.partitions;
    c.flag_after = opts.flag_after;
    c.standing_below = opts.standing_below;
    c.ladder.top = dispatcher::config::Size {
        vcpus: opts.ladder_top.vcpus,
        memory_mib: opts.ladder_top.memory_mib,
        disk_gib: opts.ladder_top.disk_gib,
    };
    c
}

/// An agent config for tests.
pub fn agent_config(
    url: &str,
    node: &str,
    state_dir: PathBuf,
    totals: &Resources,
) -> node_agent::config::Config {
    let mut c = node_agent::config::Config {
        node_id: Some(node.to_string()),
        state_dir,
        heartbeat_interval: Some(Duration::from_secs(1)),
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
            vcpus: Some(totals.vcpus),
            memory_mib: Some(totals.memory_mib),
            disk_gib: Some(totals.disk_gib),
            extended: Default::default(),
        },
        nak_delay: Duration::from_millis(200),
        reconcile_interval: Duration::from_secs(5),
        shutdown_grace: Duration::from_secs(5),
        ..Default::default()
    };
    c.nats.url = url.to_string();
    c.driver.kind = node_agent::config::DriverKind::Memory;
    c.driver.memory.build_time = Duration::from_millis(20);
    c.pull.expiry = Duration::from_secs(5);
    // every node pulls at once (the pack policy's open tiers have their own test)
    c.pull.open_tiers = 1;
    c
}

impl Harness {
    /// Starts NATS and the dispatchers.
    pub async fn start(opts: HarnessOptions) -> anyhow::Result<Harness> {
        testkit::trace_init();
        let (nats, url) = if opts.cluster {
            let c = testkit::nats_cluster();
            let url = c.urls();
            (Nats::Cluster(c), url)
        } else {
            let s = testkit::nats();
            let url = s.url();
            (Nats::Single(s), url)
        };
        let topo = bus::TopologyConfig {
            replicas: if opts.cluster { 3 } else { 1 },
            lease_ttl: LEASE_TTL,
            ..Default::default()
        };
        let (client, _) = bus::connect(
            &bus::NatsConfig {
                url: url.clone(),
                ..Default::default()
            },
            "harness",
        )
        .await?;
        // a fresh cluster elects its JetStream meta leader first: retry until it answers
        let mut tries = 0;
        let bus = loop {
            match bus::Bus::ensure(client.clone(), &topo).await {
                Ok(b) => break b,
                Err(e) if tries < 60 => {
                    tries += 1;
                    tracing::debug!(error = %e, "JetStream not ready yet");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        let mut h = Harness {
            bus,
            nats,
            url,
            dir: tempfile::tempdir()?,
            dispatchers: Vec::new(),
            agents: Vec::new(),
            faults: Default::default(),
            http: reqwest::Client::new(),
            opts,
        };
        for _ in 0..h.opts.dispatchers {
            h.add_dispatcher().await?;
        }
        Ok(h)
    }

    /// Starts one more in-process dispatcher.
    pub async fn add_dispatcher(&mut self) -> anyhow::Result<usize> {
        let cfg = dispatcher_config(&self.url, &self.opts);
        let d = dispatcher::start(cfg, None).await?;
        self.dispatchers.push(d);
        Ok(self.dispatchers.len() - 1)
    }

    /// The single server (panics for a cluster).
    pub fn server(&mut self) -> &mut NatsServer {
        match &mut self.nats {
            Nats::Single(s) => s,
            Nats::Cluster(_) => panic!("cluster harness"),
        }
    }

    /// The cluster's servers (panics for a single server).
    pub fn cluster_servers(&mut self) -> &mut Vec<NatsServer> {
        match &mut self.nats {
            Nats::Cluster(c) => &mut c.servers,
            Nats::Single(_) => panic!("single-server harness"),
        }
    }

    /// Base URL of dispatcher `i`'s HTTP API.
    pub fn api(&self, i: usize) -> String {
        format!("http://{}", self.dispatchers[i].http_addr)
    }

    fn state_dir(&self, node: &str) -> PathBuf {
        self.dir.path().join(node)
    }

    /// Starts an in-process agent with these totals (ratios 1.0, no reserve).
    pub async fn add_agent(&mut self, node: &str, totals: Resources) -> anyhow::Result<()> {
        self.add_agent_with(node, totals, |_| {}).await
    }

    /// Starts an in-process agent after `tweak` adjusts its config.
    pub async fn add_agent_with(
        &mut self,
        node: &str,
        totals: Resources,
        tweak: impl FnOnce(&mut node_agent::config::Config),
    ) -> anyhow::Result<()> {
        let mut cfg = agent_config(&self.url, node, self.state_dir(node), &totals);
        tweak(&mut cfg);
        let capacity = placement::resources::schedulable_capacity(
            &totals,
            &Resources::new(
                cfg.reserved.vcpus,
                cfg.reserved.memory_mib,
                cfg.reserved.disk_gib,
            ),
            &cfg.ratios,
        )?;
        let cancel = CancellationToken::new();
        let deps = node_agent::Deps {
            driver: None,
            capacity: Some(Box::new(Fixed(totals))),
        };
        let agent = tokio::time::timeout(
            Duration::from_secs(20),
            node_agent::start(cfg.clone(), deps, cancel.clone()),
        )
        .await
        .context("agent start timed out")??;
        self.agents.push(AgentInfo {
            node: node.to_string(),
            state_dir: cfg.state_dir,
            capacity,
            handle: AgentHandle::InProcess { agent, cancel },
        });
        Ok(())
    }

    /// Starts a real `updraft-agent` process.
    pub fn spawn_agent(
        &mut self,
        node: &str,
        totals: Resources,
        extra: &[String],
    ) -> anyhow::Result<()> {
        let url = self.url.clone();
        self.spawn_agent_in(node, totals, extra, &url, None)
    }

    /// Starts a real `updraft-agent` process that connects to `url`, inside network
    /// namespace `netns` when given (the agent runs as `ip netns exec <ns> updraft-agent`).
    pub fn spawn_agent_in(
        &mut self,
        node: &str,
        totals: Resources,
        extra: &[String],
        url: &str,
        netns: Option<&crate::netns::Netns>,
    ) -> anyhow::Result<()> {
        let cfg = agent_config(url, node, self.state_dir(node), &totals);
        let mut args = vec![
            format!("--set=node_id={node}"),
            format!("--set=state_dir={}", cfg.state_dir.display()),
            format!("--set=nats.url={url}"),
            "--set=heartbeat_interval=1s".into(),
            "--set=reserved.vcpus=0".into(),
            "--set=reserved.memory_mib=0".into(),
            "--set=reserved.disk_gib=0".into(),
            "--set=ratios.cpu=1.0".into(),
            format!("--set=capacity.vcpus={}", totals.vcpus),
            format!("--set=capacity.memory_mib={}", totals.memory_mib),
            format!("--set=capacity.disk_gib={}", totals.disk_gib),
            "--set=driver.kind=memory".into(),
            "--set=driver.memory.build_time=20ms".into(),
            "--set=pull.expiry=5s".into(),
            "--set=pull.open_tiers=1".into(),
            "--set=nak_delay=200ms".into(),
            "--set=reconcile_interval=5s".into(),
            "--set=shutdown_grace=5s".into(),
        ];
        args.extend(extra.iter().cloned());
        std::fs::create_dir_all(&cfg.state_dir)?;
        let log = self.dir.path().join(format!("{node}.log"));
        let p = match netns {
            None => Proc::spawn(&bin("updraft-agent"), args, log)?,
            Some(ns) => {
                let mut all = ns.exec_prefix();
                all.push(bin("updraft-agent").display().to_string());
                all.extend(args);
                Proc::spawn(std::path::Path::new("ip"), all, log)?
            }
        };
        let capacity = placement::resources::schedulable_capacity(
            &totals,
            &Resources::default(),
            &placement::AllocationRatios {
                cpu: 1.0,
                ram: 1.0,
                disk: 1.0,
            },
        )?;
        self.agents.push(AgentInfo {
            node: node.to_string(),
            state_dir: cfg.state_dir,
            capacity,
            handle: AgentHandle::Process(p),
        });
        Ok(())
    }

    /// Stops an in-process agent cleanly and forgets it. Its state dir (identity, driver log)
    /// stays, so `add_agent_with` under the same node id restarts it with a new epoch.
    pub async fn stop_agent(&mut self, node: &str) {
        let i = self
            .agents
            .iter()
            .position(|a| a.node == node)
            .expect("known agent");
        let a = self.agents.remove(i);
        match a.handle {
            AgentHandle::InProcess { agent, .. } => agent.stop().await,
            AgentHandle::Process(mut p) => {
                p.terminate(Duration::from_secs(10));
            }
        }
    }

    /// The agent named `node`.
    pub fn agent(&mut self, node: &str) -> &mut AgentInfo {
        self.agents
            .iter_mut()
            .find(|a| a.node == node)
            .expect("known agent")
    }

    /// Records that `node` died now (its domains count as gone from this instant).
    pub fn note_death(&mut self, node: &str) {
        self.faults
            .deaths
            .push((node.to_string(), common::clock::now().as_millis()));
    }

    /// Records that `node` was frozen from `from` to `to` (wall ms).
    pub fn note_pause(&mut self, node: &str, from: u64, to: u64) {
        self.faults.pauses.push((node.to_string(), from, to));
    }

    /// Waits until `n` nodes are advertised and taking work (per dispatcher 0).
    pub async fn wait_nodes(&self, n: usize, within: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let active = self
                .bus
                .nodes
                .list()
                .await
                .unwrap_or_default()
                .iter()
                .filter(|a| a.takes_work())
                .count();
            if active >= n {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                bail!("only {active} of {n} nodes came up");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // the dispatchers admit on their own view of the adverts, which follows the bucket
        for i in 0..self.dispatchers.len() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            wait_listed(&self.api(i), n, left).await?;
        }
        Ok(())
    }

    /// POSTs a create through dispatcher `d`; returns (status, body).
    pub async fn create(&self, d: usize, body: &Value) -> anyhow::Result<(u16, Value)> {
        let r = self
            .http
            .post(format!("{}/v1/servers", self.api(d)))
            .json(body)
            .send()
            .await?;
        let status = r.status().as_u16();
        Ok((status, r.json().await?))
    }

    /// POSTs raw bytes to a path of dispatcher `d`.
    pub async fn post_raw(
        &self,
        d: usize,
        path: &str,
        body: Vec<u8>,
    ) -> anyhow::Result<(u16, Value)> {
        let r = self
            .http
            .post(format!("{}{path}", self.api(d)))
            .body(body)
            .send()
            .await?;
        let status = r.status().as_u16();
        let text = r.text().await?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    /// GETs a path of dispatcher `d`.
    pub async fn get(&self, d: usize, path: &str) -> anyhow::Result<(u16, Value)> {
        let r = self
            .http
            .get(format!("{}{path}", self.api(d)))
            .send()
            .await?;
        let status = r.status().as_u16();
        Ok((status, r.json().await?))
    }

    /// DELETEs a server through dispatcher `d`.
    pub async fn delete(&self, d: usize, id: &str) -> anyhow::Result<(u16, Value)> {
        let r = self
            .http
            .delete(format!("{}/v1/servers/{id}", self.api(d)))
            .send()
            .await?;
        let status = r.status().as_u16();
        Ok((status, r.json().await?))
    }

    /// Every request record in KV.
    pub async fn records(&self) -> anyhow::Result<Vec<RequestRecord>> {
        let mut w = self.bus.records.watch_all().await?;
        let mut out = BTreeMap::new();
        loop {
            match tokio::time::timeout(Duration::from_secs(10), w.next()).await {
                Ok(Some(RecordEvent::Put(v))) => {
                    out.insert(v.value.spec.id.clone(), v.value);
                }
                Ok(Some(RecordEvent::Caught)) => break,
                Ok(Some(_)) => {}
                _ => bail!("record snapshot did not finish"),
            }
        }
        Ok(out.into_values().collect())
    }

    /// Waits until every one of `ids` satisfies `done` (reading KV), or fails with the stragglers.
    pub async fn wait_for(
        &self,
        ids: &[String],
        within: Duration,
        done: impl Fn(&RequestRecord) -> bool,
    ) -> anyhow::Result<Vec<RequestRecord>> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let recs = match self.records().await {
                Ok(r) => r,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::warn!(error = %e, "record snapshot failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let by_id: BTreeMap<&str, &RequestRecord> =
                recs.iter().map(|r| (r.spec.id.as_str(), r)).collect();
            let pending: Vec<&String> = ids
                .iter()
                .filter(|id| !by_id.get(id.as_str()).is_some_and(|r| done(r)))
                .collect();
            if pending.is_empty() {
                return Ok(ids
                    .iter()
                    .filter_map(|id| by_id.get(id.as_str()).map(|r| (*r).clone()))
                    .collect());
            }
            if tokio::time::Instant::now() > deadline {
                let sample: Vec<String> = pending
                    .iter()
                    .take(5)
                    .map(|id| match by_id.get(id.as_str()) {
                        Some(r) => format!(
                            "{id}: {} ({})",
                            r.state,
                            r.reason.clone().unwrap_or_default()
                        ),
                        None => format!("{id}: no record"),
                    })
                    .collect();
                bail!(
                    "{} of {} requests not done within {within:?}; e.g. {sample:?}",
                    pending.len(),
                    ids.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Runs the invariant checker over every agent's driver log and every record.
    ///
    /// Two live domains of one request that have overlapped for less than the bound are not
    /// judged at once: a fenced node destroys its copy when its build next reads the record,
    /// which may be just after the records settled. The check is repeated until none is left
    /// or the bound has passed (then each is a violation: it outlived the bound).
    pub async fn check(&self) -> anyhow::Result<crate::Report> {
        let nodes: Vec<crate::checker::NodeLog> = self
            .agents
            .iter()
            .map(|a| crate::checker::NodeLog {
                node: a.node.clone(),
                log: a.driver_log(),
                capacity: a.capacity.clone(),
            })
            .collect();
        let bound = LEASE_TTL + Duration::from_secs(1) + Duration::from_secs(2);
        let bound_ms = bound.as_millis().try_into().unwrap_or(u64::MAX);
        let give_up = tokio::time::Instant::now() + bound + Duration::from_secs(1);
        loop {
            let records = self.records().await?;
            let mut report = crate::check(&nodes, &records, &self.faults, bound_ms);
            if report.unsettled.is_empty() {
                return Ok(report);
            }
            if tokio::time::Instant::now() >= give_up {
                let left = std::mem::take(&mut report.unsettled);
                report.violations.extend(
                    left.into_iter()
                        .map(|u| format!("{u}, still after {bound:?}")),
                );
                return Ok(report);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops every in-process agent and dispatcher (processes are killed on drop).
    pub async fn shutdown(mut self) {
        for a in self.agents.drain(..) {
            if let AgentHandle::InProcess { agent, .. } = a.handle {
                agent.stop().await;
            }
        }
        for d in self.dispatchers.drain(..) {
            d.stop().await;
        }
    }
}

/// Waits until the dispatcher at `api` lists `n` nodes taking work in `GET /v1/nodes`: its
/// admission sees them, so a create through it is judged against them.
pub async fn wait_listed(api: &str, n: usize, within: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    let http = reqwest::Client::new();
    loop {
        let mut listed = 0;
        if let Ok(r) = http.get(format!("{api}/v1/nodes")).send().await
            && let Ok(body) = r.json::<Vec<dispatcher::api::NodeView>>().await
        {
            listed = body.iter().filter(|v| v.advert.takes_work()).count();
        }
        if listed >= n {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{api} lists {listed} of {n} nodes");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// True for records that reached `active`.
pub fn is_active(r: &RequestRecord) -> bool {
    r.state == State::Active
}

/// True for records in a terminal state, or active.
pub fn is_settled(r: &RequestRecord) -> bool {
    r.state == State::Active || r.state.is_terminal()
}
