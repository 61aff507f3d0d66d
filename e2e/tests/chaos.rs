#![allow(clippy::unwrap_used, clippy::tests_outside_test_module)] // test code: a panic is the failure report

//! The chaos suite: real processes (nats-server, two dispatchers, six agents), a steady stream
//! of requests, and one kind of fault injected again and again while it runs: agents killed
//! with SIGKILL mid-build and restarted; agents frozen past their lease and thawed (zombies);
//! dispatchers killed and restarted; the NATS stream leader of a 3-server R3 cluster killed
//! and restarted; agents cut off the network (their own namespace's link taken down) past
//! their lease and healed. At the end the invariant checker reads the drivers' own logs and every
//! record, and each run prints one row of RELIABILITY.md (and writes it as JSON under
//! `target/reliability/`).
//!
//! Rerun: `cargo test -p e2e --test chaos -- --test-threads 1 --nocapture`; more requests with
//! `UPDRAFT_CHAOS_REQUESTS=20000`.

use std::collections::BTreeSet;
use std::time::Duration;

use e2e::harness::{Harness, HarnessOptions, LEASE_TTL};
use e2e::netns::{Forwarder, Netns};
use e2e::process::{Proc, bin};
use placement::Resources;
use placement::lifecycle::{RequestRecord, State};
use rand::{RngExt, SeedableRng};
use serde_json::json;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    KillAgent,
    FreezeAgent,
    KillDispatcher,
    KillNatsLeader,
    CutAgent,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::KillAgent => "kill -9 agent mid-build, restart",
            Fault::FreezeAgent => "SIGSTOP agent past its lease, SIGCONT",
            Fault::KillDispatcher => "kill -9 dispatcher, restart",
            Fault::KillNatsLeader => "kill NATS stream leader (R3), restart",
            Fault::CutAgent => "cut agent off the network past its lease (netns), heal",
        }
    }

    fn slug(self) -> &'static str {
        match self {
            Fault::KillAgent => "kill-agent",
            Fault::FreezeAgent => "freeze-agent",
            Fault::KillDispatcher => "kill-dispatcher",
            Fault::KillNatsLeader => "kill-nats-leader",
            Fault::CutAgent => "cut-agent",
        }
    }
}

/// Settled: active, terminal, or visibly host_down (its node died with the VM in memory).
fn is_settled(r: &RequestRecord) -> bool {
    r.state == State::Active || r.state == State::HostDown || r.state.is_terminal()
}

fn requests() -> usize {
    std::env::var("UPDRAFT_CHAOS_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

fn percentile(v: &mut [u64], q: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    v[i]
}

/// When a record settled (became active, or failed), ms.
fn settled_at(r: &RequestRecord) -> Option<u64> {
    match r.state {
        _ if r.active_at.is_some() => r.active_at.map(|t| t.as_millis()),
        State::Failed | State::HostDown | State::Deleted => Some(r.updated_at.as_millis()),
        _ => None,
    }
}

async fn submit_one(http: &reqwest::Client, apis: &[String], i: usize, body: &serde_json::Value) {
    // a client retries what was not accepted (a dispatcher down, NATS failing over): same id,
    // same body, any dispatcher
    let mut attempt = 0usize;
    loop {
        let api = &apis[(i + attempt) % apis.len()];
        if let Ok(r) = http
            .post(format!("{api}/v1/servers"))
            .json(body)
            .send()
            .await
        {
            let s = r.status().as_u16();
            if s == 200 || s == 201 {
                return;
            }
            assert!(s >= 500 || s == 429, "request {i} refused with {s}");
        }
        attempt += 1;
        assert!(attempt < 600, "request {i} never accepted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn chaos(fault: Fault) {
    let n = requests();
    let mut h = Harness::start(HarnessOptions {
        dispatchers: 0,
        cluster: fault == Fault::KillNatsLeader,
        ..Default::default()
    })
    .await
    .unwrap();
    let http = reqwest::Client::new();
    // two dispatcher processes
    let mut dispatchers = Vec::new();
    let mut apis = Vec::new();
    for i in 0..2 {
        let port = bus::server::free_port().unwrap();
        let replicas = if fault == Fault::KillNatsLeader { 3 } else { 1 };
        let p = Proc::spawn(
            &bin("updraft-dispatcher"),
            vec![
                format!("--set=nats.url={}", h.url),
                format!("--set=http_listen=127.0.0.1:{port}"),
                format!("--set=topology.lease_ttl={}s", LEASE_TTL.as_secs()),
                format!("--set=topology.replicas={replicas}"),
                format!("--set=reap_grace={}s", LEASE_TTL.as_secs()),
                "--set=sweep_interval=500ms".into(),
                "--set=hint_check_after=5s".into(),
                "--set=default_deadline_s=120".into(),
                "--set=ladder.spill_after=800ms".into(),
            ],
            h.dir.path().join(format!("dispatcher-{i}.log")),
        )
        .unwrap();
        let api = format!("http://127.0.0.1:{port}");
        // one at a time: the first creates the topology, the next adopts it
        let t0 = tokio::time::Instant::now();
        loop {
            let ok = http
                .get(format!("{api}/healthz"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(90),
                "{api} never became healthy:\n{}",
                p.log_text()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        dispatchers.push(p);
        apis.push(api);
    }
    // six agents that build slowly enough to be caught mid-build; to be cut off, each runs in
    // its own network namespace and reaches NATS through a relay on its link
    let agents: Vec<String> = (0..6).map(|i| format!("c{i}")).collect();
    let mut nets = Vec::new();
    // the cluster harness's url lists every server; a cut agent's relay points at the first
    let nats_addr = (fault == Fault::CutAgent).then(|| {
        let first = h.url.split(',').next().unwrap_or_default();
        first
            .trim_start_matches("nats://")
            .parse::<std::net::SocketAddr>()
            .unwrap_or_else(|e| panic!("nats url {first}: {e}"))
    });
    for (i, a) in agents.iter().enumerate() {
        let extra = [
            "--set=driver.memory.build_time=300ms".to_string(),
            "--set=driver.memory.build_jitter=400ms".to_string(),
        ];
        let totals = Resources::new(512, 2048 * 1024, 100_000);
        if let Some(nats_addr) = nats_addr {
            let ns = Netns::create(u8::try_from(i).unwrap()).unwrap();
            let relay = Forwarder::start(ns.host_addr, nats_addr).await.unwrap();
            let url = format!("nats://{}", relay.addr);
            h.spawn_agent_in(a, totals, &extra, &url, Some(&ns))
                .unwrap();
            nets.push((ns, relay));
        } else {
            h.spawn_agent(a, totals, &extra).unwrap();
        }
    }
    h.wait_nodes(agents.len(), Duration::from_secs(60))
        .await
        .unwrap();
    for api in &apis {
        e2e::harness::wait_listed(api, agents.len(), Duration::from_secs(30))
            .await
            .unwrap();
    }
    let flavors = ["m1.tiny", "m1.small", "m1.small", "m1.medium"];
    let ids: Vec<String> = (0..n).map(|i| format!("chaos-{i:05}")).collect();
    let started = common::clock::now().as_millis();
    let load = {
        let http = http.clone();
        let apis = apis.clone();
        let ids = ids.clone();
        tokio::spawn(async move {
            // about 40 requests a second, several in flight
            let mut pending = futures::stream::FuturesUnordered::new();
            for (i, id) in ids.iter().enumerate() {
                let body = json!({ "id": id, "flavor": flavors[i % flavors.len()] });
                let http = http.clone();
                let apis = apis.clone();
                pending.push(async move { submit_one(&http, &apis, i, &body).await });
                if pending.len() >= 8 {
                    futures::StreamExt::next(&mut pending).await;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            while futures::StreamExt::next(&mut pending).await.is_some() {}
        })
    };
    // the faults, one every few seconds while the load runs
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut injected: Vec<(u64, BTreeSet<String>)> = Vec::new();
    tokio::time::sleep(Duration::from_secs(3)).await;
    while !load.is_finished() {
        // what is in flight now (a snapshot can time out while NATS fails over: try again)
        let mut open = BTreeSet::new();
        for _ in 0..10 {
            if let Ok(recs) = h.records().await {
                open = recs
                    .iter()
                    .filter(|r| matches!(r.state, State::Queued | State::Claimed | State::Building))
                    .map(|r| r.spec.id.to_string())
                    .collect();
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let at = common::clock::now().as_millis();
        match fault {
            Fault::KillAgent => {
                let victim = agents[rng.random_range(0..agents.len())].clone();
                h.agent(&victim).process().kill9();
                h.note_death(&victim);
                tokio::time::sleep(Duration::from_secs(2)).await;
                h.agent(&victim).process().restart().unwrap();
            }
            Fault::FreezeAgent => {
                let victim = agents[rng.random_range(0..agents.len())].clone();
                let from = common::clock::now().as_millis();
                h.agent(&victim).process().stop();
                tokio::time::sleep(LEASE_TTL + Duration::from_secs(2)).await;
                h.agent(&victim).process().cont();
                let to = common::clock::now().as_millis();
                h.note_pause(&victim, from, to);
            }
            Fault::KillDispatcher => {
                let i = rng.random_range(0..dispatchers.len());
                dispatchers[i].kill9();
                tokio::time::sleep(Duration::from_secs(2)).await;
                dispatchers[i].restart().unwrap();
            }
            Fault::CutAgent => {
                let i = rng.random_range(0..agents.len());
                let from = common::clock::now().as_millis();
                nets[i].0.cut().unwrap();
                tokio::time::sleep(LEASE_TTL + Duration::from_secs(2)).await;
                nets[i].0.heal().unwrap();
                let to = common::clock::now().as_millis();
                // cut off, it could not learn it was replaced: count the cut like a freeze
                h.note_pause(&agents[i], from, to);
            }
            Fault::KillNatsLeader => {
                let js = h.bus.js.clone();
                let leader = match js.get_stream("KV_UPDRAFT_REQUESTS").await {
                    Ok(mut s) => s
                        .info()
                        .await
                        .ok()
                        .and_then(|i| i.cluster.clone())
                        .and_then(|c| c.leader),
                    Err(_) => None,
                };
                if let Some(l) = leader {
                    let idx: usize = l.trim_start_matches('n').parse().unwrap();
                    h.cluster_servers()[idx].kill();
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    h.cluster_servers()[idx].restart().unwrap();
                }
            }
        }
        injected.push((at, open));
        // a replicated cluster re-elects leaders for every stream the killed server led: let
        // it settle before the next kill
        let pause = if fault == Fault::KillNatsLeader {
            12
        } else {
            4
        };
        tokio::time::sleep(Duration::from_secs(pause)).await;
    }
    load.await.unwrap();
    // everything settles: active, or failed with a reason, or host_down (its host died)
    let recs = h
        .wait_for(&ids, Duration::from_secs(180), is_settled)
        .await
        .unwrap();
    let report = h.check().await.unwrap();
    let mut to_terminal: Vec<u64> = recs
        .iter()
        .filter_map(|r| settled_at(r).map(|t| t.saturating_sub(r.created_at.as_millis())))
        .collect();
    let by_id: std::collections::BTreeMap<String, &RequestRecord> =
        recs.iter().map(|r| (r.spec.id.to_string(), r)).collect();
    let mut recovery: Vec<u64> = injected
        .iter()
        .map(|(at, open)| {
            open.iter()
                .filter_map(|id| by_id.get(id).and_then(|r| settled_at(r)))
                .map(|t| t.saturating_sub(*at))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let lost = recs.iter().filter(|r| !is_settled(r)).count();
    let failed = recs.iter().filter(|r| r.state == State::Failed).count();
    let host_down = recs.iter().filter(|r| r.state == State::HostDown).count();
    let wall_s = (common::clock::now().as_millis() - started) / 1000;
    let row = format!(
        "| {} | {} | {} | {} | {} | {} | {} | {} ms | {} / {} ms | {} active, {} host_down, {} failed | {} s |",
        fault.name(),
        recs.len(),
        injected.len(),
        report.builds,
        report.duplicates,
        report.longest_overlap_ms,
        lost + report
            .violations
            .iter()
            .filter(|v| v.contains("no live domain"))
            .count(),
        percentile(&mut to_terminal, 0.99),
        percentile(&mut recovery, 0.5),
        percentile(&mut recovery, 1.0),
        recs.len() - failed - host_down,
        host_down,
        failed,
        wall_s,
    );
    println!(
        "RELIABILITY | fault | requests | faults | builds | requests with two live domains | longest overlap | lost | p99 to terminal | recovery p50 / max | end states | wall |"
    );
    println!("RELIABILITY {row}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/reliability");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join(format!("{}.json", fault.slug())),
        serde_json::to_vec_pretty(&json!({
            "fault": fault.name(),
            "requests": recs.len(),
            "faults": injected.len(),
            "builds": report.builds,
            "duplicates": report.duplicates,
            "longest_overlap_ms": report.longest_overlap_ms,
            "overcommits": report.overcommits,
            "lost": lost,
            "failed": failed,
            "host_down": host_down,
            "p99_to_terminal_ms": percentile(&mut to_terminal, 0.99),
            "recovery_ms": recovery,
            "violations": report.violations,
            "markdown": row,
        }))
        .unwrap(),
    )
    .unwrap();
    if !report.clean() || lost > 0 {
        // keep the components' logs and the drivers' build/destroy logs for the post-mortem
        let keep = dir.join(format!("{}-logs", fault.slug()));
        let _ = std::fs::remove_dir_all(&keep);
        let copied = std::process::Command::new("cp")
            .arg("-r")
            .arg(h.dir.path())
            .arg(&keep)
            .status();
        println!("logs of the failed run: {} ({copied:?})", keep.display());
    }
    assert!(report.clean(), "{:#?}", report.violations);
    assert_eq!(report.overcommits, 0);
    assert_eq!(lost, 0, "requests neither settled nor visibly pending");
    for r in recs
        .iter()
        .filter(|r| r.state == State::Failed || r.state == State::HostDown)
    {
        assert!(
            r.reason.is_some(),
            "{} is {} without a reason",
            r.spec.id,
            r.state
        );
    }
    h.shutdown().await;
    drop(nets);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_kill_agents_mid_build() {
    chaos(Fault::KillAgent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_freeze_agents_past_their_lease() {
    chaos(Fault::FreezeAgent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_kill_dispatchers() {
    chaos(Fault::KillDispatcher).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_kill_the_nats_stream_leader() {
    chaos(Fault::KillNatsLeader).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_cut_agents_off_the_network() {
    assert!(
        Netns::available(),
        "this test makes network namespaces: run it as root with iproute2 installed"
    );
    chaos(Fault::CutAgent).await;
}
