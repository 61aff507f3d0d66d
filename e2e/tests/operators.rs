#![allow(clippy::unwrap_used, clippy::tests_outside_test_module)] // test code: a panic is the failure report

//! What an operator sees and does: the status page rendered by a real browser against a
//! running cluster, and a node that joins with nothing but a NATS address.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use e2e::harness::{Harness, HarnessOptions, is_active};
use e2e::process::{Proc, bin};
use placement::Resources;
use placement::lifecycle::State;
use serde_json::{Value, json};

/// The DOM of `url` after its scripts ran, from headless Chromium (Debian's `chromium`,
/// installed by the setup script).
fn rendered_dom(url: &str, profile: &Path) -> String {
    let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .expect("chromium is not installed: run scripts/setup.sh");
    let out = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=6000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_status_page_renders_live_cluster_data_in_a_browser() {
    let mut h = Harness::start(HarnessOptions::default()).await.unwrap();
    for n in ["page-a", "page-b", "page-c"] {
        h.add_agent(n, Resources::new(16, 32 * 1024, 1000))
            .await
            .unwrap();
    }
    h.wait_nodes(3, Duration::from_secs(20)).await.unwrap();
    let ids: Vec<String> = (0..6).map(|i| format!("page-vm-{i}")).collect();
    for id in &ids {
        let (st, _) = h
            .create(0, &json!({ "id": id, "flavor": "m1.large" }))
            .await
            .unwrap();
        assert_eq!(st, 201);
    }
    h.wait_for(&ids, Duration::from_secs(20), is_active)
        .await
        .unwrap();
    // a request no node can ever hold: its explanation must show among recent failures
    let (st, _) = h
        .create(
            0,
            &json!({ "id": "page-huge", "resources": { "vcpus": 32, "memory_mib": 200000 } }),
        )
        .await
        .unwrap();
    assert_eq!(st, 422);
    let profile = tempfile::tempdir().unwrap();
    let dom = rendered_dom(&format!("{}/", h.api(0)), profile.path());
    // the page refreshed without an error (it would write "error: ..." into #updated)
    assert!(
        dom.contains("id=\"updated\" class=\"dim\">updated "),
        "the page did not refresh cleanly:\n{dom}"
    );
    for n in ["page-a", "page-b", "page-c"] {
        assert!(
            dom.contains(&format!("data-node=\"{n}\"")),
            "no heat map cell for {n}:\n{dom}"
        );
    }
    assert!(dom.contains("id=\"nodecount\">3<"), "node count:\n{dom}");
    assert!(dom.contains("page-huge"), "recent failures:\n{dom}");
    // the heat map shows real use: some node is not empty
    assert!(
        dom.split("data-util=\"")
            .skip(1)
            .filter_map(|s| s.split('"').next())
            .filter_map(|u| u.parse::<f64>().ok())
            .any(|u| u > 0.0),
        "every cell empty:\n{dom}"
    );
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_joins_with_only_a_nats_address_takes_work_and_leaves_after_its_ttl() {
    let mut h = Harness::start(HarnessOptions::default()).await.unwrap();
    h.add_agent("seed", Resources::new(8, 8192, 100))
        .await
        .unwrap();
    h.wait_nodes(1, Duration::from_secs(20)).await.unwrap();
    // the new node is told nothing but where NATS is (and, so that test runs do not share an
    // identity, where to keep it): it derives its id, discovers its capacity from libvirt
    // (qemu:///system, started by the setup script), probes the domain type and registers
    let state = tempfile::tempdir().unwrap();
    let log = h.dir.path().join("joiner.log");
    let mut joiner = Proc::spawn(
        &bin("updraft-agent"),
        vec![
            format!("--set=nats.url={}", h.url),
            format!("--set=state_dir={}", state.path().display()),
        ],
        log,
    )
    .unwrap();
    let t0 = tokio::time::Instant::now();
    let joined = loop {
        let (_, nodes) = h.get(0, "/v1/nodes").await.unwrap();
        let found = nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["advert"]["node"] != "seed")
            .cloned();
        if let Some(n) = found {
            break n;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "the new node never showed up:\n{}",
            joiner.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let node = joined["advert"]["node"].as_str().unwrap().to_string();
    assert!(
        joined["advert"]["totals"]["vcpus"].as_u64().unwrap() > 0,
        "{joined}"
    );
    assert_eq!(joined["advert"]["driver"], "libvirt", "{joined}");
    // take the seed out of the way: the next request can only go to the new node
    let d = h.dispatchers[0].dispatcher.clone();
    d.set_admin("seed", true, false, "test").await.unwrap();
    let (st, body) = h
        .create(
            0,
            &json!({ "id": "joined-vm", "resources": { "vcpus": 1, "memory_mib": 128 } }),
        )
        .await
        .unwrap();
    assert_eq!(st, 201, "{body}");
    let rec = h
        .wait_for(&["joined-vm".into()], Duration::from_secs(90), is_active)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", joiner.log_text()));
    assert_eq!(rec[0].node().map(|n| n.as_str()), Some(node.as_str()));
    // delete it (a real libvirt domain), then stop the node: it disappears from the list
    let (st, _) = h.delete(0, "joined-vm").await.unwrap();
    assert_eq!(st, 202);
    h.wait_for(&["joined-vm".into()], Duration::from_secs(30), |r| {
        r.state == State::Deleted
    })
    .await
    .unwrap();
    joiner.kill9();
    let t_stop = tokio::time::Instant::now();
    loop {
        let (_, nodes) = h.get(0, "/v1/nodes").await.unwrap();
        let still = nodes
            .as_array()
            .unwrap()
            .iter()
            .any(|n: &Value| n["advert"]["node"] == node.as_str());
        if !still {
            break;
        }
        assert!(
            t_stop.elapsed() < Duration::from_secs(20),
            "{node} still listed after its lease TTL"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    h.shutdown().await;
}
