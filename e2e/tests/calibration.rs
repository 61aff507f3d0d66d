#![allow(clippy::unwrap_used, clippy::tests_outside_test_module)] // test code: a panic is the failure report

//! Calibration of the simulator against the real thing: the same small workload (arrivals,
//! sizes, lifetimes) runs through a real nats-server, a dispatcher and in-process agents, and
//! through the simulator's updraft model with the same shard map, pull settings, build time,
//! deadline and node shapes. They must agree within 10% on the hosts used at peak and on the
//! acceptance rate: the real run (one draw of real latencies) lies within 10% of the range
//! the model gives over eight seeds.
//!
//! Two workloads: one at about half the cluster (packing decides the hosts used; everything
//! is accepted), one offered about 130% of the cluster with a short deadline (acceptance
//! decides).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use e2e::harness::{Harness, HarnessOptions, LEASE_TTL, agent_config, dispatcher_config};
use futures::StreamExt;
use node_agent::driver::{BuildLog, LogEvent};
use placement::Resources;
use placement::lifecycle::State;
use rand::{RngExt, SeedableRng};
use serde_json::json;
use sim::cluster::{ClusterSpec, ShapeCount};
use sim::updraft::UpdraftConfig;
use sim::workload::{TickArrivals, WorkloadSpec};

/// One request of the workload: (arrival s, lifetime s, vCPUs, memory MiB).
type Row = (u64, u64, u32, u64);

/// Disk of every request, GiB.
const DISK_GIB: u64 = 10;
/// Seeds the model runs with.
const SEEDS: u64 = 8;
/// Build time of the in-memory driver and of the model, ms.
const BUILD_MS: u64 = 200;

/// `per_s` arrivals each second for `secs` seconds, of four shapes (weights 3:3:2:1), living
/// uniformly between `life.0` and `life.1` seconds.
fn workload(seed: u64, secs: u64, per_s: u64, life: (u64, u64)) -> Vec<Row> {
    let shapes = [
        (1, 2048),
        (1, 2048),
        (1, 2048),
        (2, 4096),
        (2, 4096),
        (2, 4096),
    ];
    let shapes: Vec<(u32, u64)> = shapes
        .into_iter()
        .chain([(4, 8192), (4, 8192), (8, 16384)])
        .collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut rows = Vec::new();
    for s in 0..secs {
        for _ in 0..per_s {
            let (c, m) = shapes[rng.random_range(0..shapes.len())];
            rows.push((s, rng.random_range(life.0..=life.1), c, m));
        }
    }
    rows
}

/// What one run measured.
#[derive(Debug, Clone, Copy)]
struct Outcome {
    peak_hosts: usize,
    acceptance: f64,
}

/// The simulator's answer for `rows` on `nodes` hosts of `shape`.
fn simulate(
    rows: &[Row],
    nodes: usize,
    shape: &Resources,
    opts: &HarnessOptions,
    seed: u64,
) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.csv");
    let mut f = std::fs::File::create(&path).unwrap();
    writeln!(f, "arrival_s,lifetime_s,vcpus,memory_mib,disk_gib").unwrap();
    for (a, l, c, m) in rows {
        writeln!(f, "{a},{l},{c},{m},{DISK_GIB}").unwrap();
    }
    drop(f);
    let cluster = ClusterSpec {
        shapes: vec![ShapeCount {
            count: nodes,
            totals: shape.clone(),
        }],
        ratios: placement::AllocationRatios {
            cpu: 1.0,
            ram: 1.0,
            disk: 1.0,
        },
        reserved_mib: 0,
    };
    // the shard map the dispatcher publishes and the pull settings the agents run
    let dispatcher = dispatcher_config("nats://unused", opts);
    let map = dispatcher.cluster().unwrap().shard_map;
    let agent = agent_settings();
    let mut cfg = UpdraftConfig::new(map, agent.pull, seed);
    cfg.build_time = BUILD_MS;
    cfg.deadline = opts.deadline_s * 1000;
    cfg.nak_delay = u64::try_from(agent.nak_delay.as_millis()).unwrap();
    cfg.ack_wait = 5000;
    cfg.lease_ttl = u64::try_from(LEASE_TTL.as_millis()).unwrap();
    cfg.sample_every = 1000;
    cfg.sweep_every = u64::try_from(dispatcher.sweep_interval.as_millis()).unwrap();
    cfg.flag_after = u64::try_from(dispatcher.flag_after.as_millis()).unwrap();
    let wl = WorkloadSpec::Trace {
        path,
        limit: None,
        ticks: TickArrivals::Instant,
    }
    .open()
    .unwrap();
    let r = sim::updraft::run(cluster.nodes().unwrap(), wl, &cfg).unwrap();
    Outcome {
        peak_hosts: r.peak_hosts,
        acceptance: r.acceptance,
    }
}

/// The agents' config as the test runs them: the harness's, with the pack policy's open
/// tiers at their default (the harness opens every node at once for its other tests).
fn agent_settings() -> node_agent::config::Config {
    let mut c = agent_config(
        "nats://unused",
        "n",
        std::path::PathBuf::from("/nonexistent"),
        &Resources::default(),
    );
    c.pull.open_tiers = placement::pull::DEFAULT_OPEN_TIERS;
    c
}

/// Runs `rows` in real time on a real cluster: each request is submitted at its arrival
/// second and deleted `lifetime` after it became active, as the simulator does.
async fn replay(rows: &[Row], nodes: usize, shape: &Resources, opts: HarnessOptions) -> Outcome {
    let deadline_s = opts.deadline_s;
    let mut h = Harness::start(opts).await.unwrap();
    let agent = agent_settings();
    for i in 0..nodes {
        let pull = agent.pull.clone();
        // the simulator's node ids: a node's pack tier is a hash of its id
        h.add_agent_with(&format!("n{i:06}"), shape.clone(), |c| {
            c.pull = pull;
            c.driver.memory.build_time = Duration::from_millis(BUILD_MS);
        })
        .await
        .unwrap();
    }
    h.wait_nodes(nodes, Duration::from_secs(30)).await.unwrap();
    let api = h.api(0);
    let http = reqwest::Client::new();
    let ids: Vec<String> = (0..rows.len()).map(|i| format!("cal-{i:04}")).collect();
    let lifetimes: Arc<BTreeMap<String, u64>> =
        Arc::new(ids.iter().cloned().zip(rows.iter().map(|r| r.1)).collect());
    // deletes each request `lifetime` after its record turns active
    let mut watch = h.bus.records.watch_all().await.unwrap();
    let deleter = {
        let (http, api, lifetimes) = (http.clone(), api.clone(), lifetimes.clone());
        tokio::spawn(async move {
            let mut seen = BTreeSet::new();
            while let Some(ev) = watch.next().await {
                let bus::records::RecordEvent::Put(v) = ev else {
                    continue;
                };
                let r = &v.value;
                if r.state != State::Active || !seen.insert(r.spec.id.to_string()) {
                    continue;
                }
                let Some(&life) = lifetimes.get(r.spec.id.as_str()) else {
                    continue;
                };
                let (http, url) = (http.clone(), format!("{api}/v1/servers/{}", r.spec.id));
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(life)).await;
                    let s = http.delete(&url).send().await.unwrap().status();
                    assert!(s.is_success(), "delete {url}: {s}");
                });
            }
        })
    };
    let t0 = tokio::time::Instant::now();
    let mut creates = Vec::new();
    for ((at, _, vcpus, mem), id) in rows.iter().zip(&ids) {
        tokio::time::sleep_until(t0 + Duration::from_secs(*at)).await;
        let body = json!({
            "id": id,
            "resources": { "vcpus": vcpus, "memory_mib": mem, "disk_gib": DISK_GIB },
        });
        let (http, url) = (http.clone(), format!("{api}/v1/servers"));
        creates.push(tokio::spawn(async move {
            let r = http.post(&url).json(&body).send().await.unwrap();
            assert!(r.status().is_success(), "create: {}", r.status());
        }));
    }
    for c in creates {
        c.await.unwrap();
    }
    let longest = rows.iter().map(|r| r.1).max().unwrap_or(0);
    let recs = h
        .wait_for(&ids, Duration::from_secs(longest + deadline_s + 60), |r| {
            matches!(r.state, State::Deleted | State::Failed)
        })
        .await
        .unwrap();
    deleter.abort();
    let accepted = recs.iter().filter(|r| r.state == State::Deleted).count();
    let report = h.check().await.unwrap();
    assert!(report.clean(), "{:#?}", report.violations);
    let logs: Vec<_> = h.agents.iter().map(|a| a.driver_log()).collect();
    let peak = peak_hosts(&logs);
    h.shutdown().await;
    #[allow(clippy::cast_precision_loss)]
    Outcome {
        peak_hosts: peak,
        acceptance: accepted as f64 / rows.len() as f64,
    }
}

/// Most hosts holding at least one domain at once, from the drivers' own logs.
fn peak_hosts(logs: &[std::path::PathBuf]) -> usize {
    let mut events: Vec<(u64, usize, i64)> = Vec::new();
    for (node, path) in logs.iter().enumerate() {
        // a node that never built anything has no log
        let entries = match BuildLog::read(path) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => panic!("{}: {e}", path.display()),
        };
        for e in entries {
            let d = match e.event {
                LogEvent::Created => 1,
                LogEvent::Destroyed => -1,
            };
            events.push((e.at_ms, node, d));
        }
    }
    // at one instant, departures before arrivals (as the simulator orders a tie)
    events.sort_by_key(|(t, _, d)| (*t, *d));
    let mut vms = vec![0i64; logs.len()];
    let (mut in_use, mut peak) = (0usize, 0usize);
    for (_, node, d) in events {
        let before = vms[node];
        vms[node] += d;
        match (before, vms[node]) {
            (0, 1) => in_use += 1,
            (1, 0) => in_use -= 1,
            _ => {}
        }
        peak = peak.max(in_use);
    }
    peak
}

/// |a - b| / b.
fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.max(f64::MIN_POSITIVE)
}

/// The simulated outcomes over several seeds (the model draws NATS latencies; the real run is
/// one draw of the real ones), and the real outcome.
async fn calibrate(rows: Vec<Row>, nodes: usize, opts: HarnessOptions) -> (Outcome, Vec<Outcome>) {
    let shape = Resources::new(16, 32 * 1024, 10_000);
    let simulated: Vec<Outcome> = (1..=SEEDS)
        .map(|seed| simulate(&rows, nodes, &shape, &opts, seed))
        .collect();
    // on a worker of its own: the whole cluster's start-up future is too deep for the test
    // thread's stack in a debug build
    let real = {
        let (rows, shape) = (rows.clone(), shape.clone());
        tokio::spawn(async move { replay(&rows, nodes, &shape, opts).await })
            .await
            .unwrap()
    };
    eprintln!(
        "calibration on {nodes} nodes, {} requests: real {real:?}, simulated {simulated:?}",
        rows.len()
    );
    (real, simulated)
}

/// How far `real` lies outside the range the seeds gave, relative to that range's near edge
/// (0 inside it).
fn apart(real: f64, sims: impl Iterator<Item = f64> + Clone) -> f64 {
    let lo = sims.clone().fold(f64::INFINITY, f64::min);
    let hi = sims.fold(f64::NEG_INFINITY, f64::max);
    if real < lo {
        rel(real, lo)
    } else if real > hi {
        rel(real, hi)
    } else {
        0.0
    }
}

#[allow(clippy::cast_precision_loss)]
fn hosts(o: &Outcome) -> f64 {
    o.peak_hosts as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sim_agrees_with_nats_on_hosts_used_at_half_load() {
    // 5 requests/s living 15-25 s: about 550 GiB in use, ~17 hosts' worth of 40
    let rows = workload(11, 40, 5, (15, 25));
    let (real, simulated) = calibrate(rows, 40, HarnessOptions::default()).await;
    let d = apart(hosts(&real), simulated.iter().map(hosts));
    assert!(
        d <= 0.10,
        "peak hosts: real {} vs simulated {:?} ({:.1}% apart)",
        real.peak_hosts,
        simulated.iter().map(|o| o.peak_hosts).collect::<Vec<_>>(),
        d * 100.0
    );
    assert!(apart(real.acceptance, simulated.iter().map(|o| o.acceptance)) <= 0.10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sim_agrees_with_nats_on_acceptance_when_overloaded() {
    // the same rate on 8 hosts: about 130% of the cluster offered, 5 s to find a place
    let rows = workload(12, 40, 3, (15, 25));
    let opts = HarnessOptions {
        deadline_s: 5,
        ..HarnessOptions::default()
    };
    let (real, simulated) = calibrate(rows, 8, opts).await;
    let d = apart(real.acceptance, simulated.iter().map(|o| o.acceptance));
    assert!(
        d <= 0.10,
        "acceptance: real {:.3} vs simulated {:?} ({:.1}% apart)",
        real.acceptance,
        simulated.iter().map(|o| o.acceptance).collect::<Vec<_>>(),
        d * 100.0
    );
    assert!(
        simulated.iter().all(|o| o.acceptance < 0.95),
        "the workload must overload"
    );
}
