#![allow(clippy::unwrap_used, clippy::tests_outside_test_module)] // test code: a panic is the failure report

//! The `updraft` CLI as an operator uses it, against a running cluster: tables and `--json`,
//! exit codes that mean something, errors that say what to do; and `updraft up`, the README's
//! run command, on its own embedded nats-server.

use std::process::{Command, Output};
use std::time::Duration;

use e2e::harness::{Harness, HarnessOptions};
use e2e::process::bin;
use placement::Resources;
use serde_json::Value;

fn cli(api: &str, args: &[&str]) -> Output {
    Command::new(bin("updraft"))
        .arg("--api")
        .arg(api)
        .args(args)
        .env_remove("UPDRAFT_TOKEN")
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn json(o: &Output) -> Value {
    assert!(o.status.success(), "{}", text(o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(o)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cli_drives_a_cluster_with_tables_json_and_exit_codes() {
    let mut h = Harness::start(HarnessOptions::default()).await.unwrap();
    h.add_agent("cli-a", Resources::new(16, 32 * 1024, 1000))
        .await
        .unwrap();
    h.add_agent("cli-b", Resources::new(16, 32 * 1024, 1000))
        .await
        .unwrap();
    h.wait_nodes(2, Duration::from_secs(20)).await.unwrap();
    let api = h.api(0);
    let api = api.as_str();

    // create from flags and wait
    let o = cli(
        api,
        &[
            "servers", "create", "--flavor", "m1.large", "--id", "cli-1", "--wait",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("cli-1"), "{}", text(&o));
    // many at once from a YAML file
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("servers.yaml");
    std::fs::write(
        &file,
        "servers:\n  - id: cli-2\n    flavor: m1.small\n  - id: cli-3\n    resources: { vcpus: 2, memory_mib: 2048 }\n",
    )
    .unwrap();
    let o = cli(
        api,
        &["servers", "create", "-f", file.to_str().unwrap(), "--wait"],
    );
    assert!(o.status.success(), "{}", text(&o));
    // get as a table and as JSON
    let o = cli(api, &["servers", "get", "cli-3"]);
    assert!(
        o.status.success() && text(&o).contains("active"),
        "{}",
        text(&o)
    );
    let v = json(&cli(api, &["--json", "servers", "get", "cli-3"]));
    assert_eq!(v["state"], "active", "{v}");
    // list with a filter
    let v = json(&cli(
        api,
        &["--json", "servers", "list", "--state", "active"],
    ));
    assert_eq!(v["items"].as_array().unwrap().len(), 3, "{v}");
    // explain and plan
    let o = cli(api, &["servers", "explain", "cli-1"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("cli-a") || text(&o).contains("cli-b"),
        "{}",
        text(&o)
    );
    let v = json(&cli(
        api,
        &["--json", "servers", "plan", "--flavor", "r1.4xlarge"],
    ));
    assert_eq!(v["admissible"], false, "128 GiB fits no 32 GiB node: {v}");
    // nodes: list, cordon, uncordon, drain
    let o = cli(api, &["nodes", "list"]);
    assert!(
        text(&o).contains("cli-a") && text(&o).contains("cli-b"),
        "{}",
        text(&o)
    );
    assert!(cli(api, &["nodes", "cordon", "cli-a"]).status.success());
    let t0 = tokio::time::Instant::now();
    loop {
        let v = json(&cli(api, &["--json", "nodes", "list"]));
        let a = v
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["advert"]["node"] == "cli-a")
            .cloned()
            .unwrap();
        if a["advert"]["state"] == "cordoned" {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "{a}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(cli(api, &["nodes", "uncordon", "cli-a"]).status.success());
    let o = cli(api, &["nodes", "drain", "cli-b", "--wait"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(cli(api, &["nodes", "uncordon", "cli-b"]).status.success());
    // shards, capacity, status
    for cmd in [&["shards", "--all"][..], &["capacity"], &["status"]] {
        let o = cli(api, cmd);
        assert!(o.status.success(), "{cmd:?}: {}", text(&o));
    }
    let v = json(&cli(api, &["--json", "status"]));
    assert!(v.to_string().contains("nodes"), "{v}");
    // delete and wait
    let o = cli(api, &["servers", "delete", "cli-2", "--wait"]);
    assert!(o.status.success(), "{}", text(&o));
    let v = json(&cli(api, &["--json", "servers", "get", "cli-2"]));
    assert_eq!(v["state"], "deleted");

    // exit codes: refused (1), bad usage (2), not found (3), unreachable (4), failed (5)
    let o = cli(
        api,
        &["servers", "create", "--id", "cli-1", "--flavor", "m1.small"],
    );
    assert_eq!(
        o.status.code(),
        Some(1),
        "same id, other body: {}",
        text(&o)
    );
    assert!(
        text(&o).contains("already exists with a different body"),
        "{}",
        text(&o)
    );
    let o = cli(api, &["servers", "create", "--vcpus", "2"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let o = cli(api, &["servers", "get", "no-such-server"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let o = cli("http://127.0.0.1:9", &["servers", "list"]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(
        text(&o).contains("127.0.0.1:9"),
        "says where it tried: {}",
        text(&o)
    );
    // every node cordoned: a request that fits their shape is accepted, waits, and fails at
    // its deadline with the reason; `--wait` then exits 5
    assert!(cli(api, &["nodes", "cordon", "cli-a"]).status.success());
    assert!(cli(api, &["nodes", "cordon", "cli-b"]).status.success());
    std::thread::sleep(Duration::from_secs(1));
    let o = cli(
        api,
        &[
            "servers",
            "create",
            "--id",
            "cli-short",
            "--flavor",
            "m1.small",
            "--deadline-s",
            "2",
            "--wait",
        ],
    );
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert!(text(&o).contains("cli-short"), "{}", text(&o));
    h.shutdown().await;
}

#[test]
fn updraft_up_runs_a_whole_cluster_on_its_own_nats_server_and_stops_cleanly() {
    // the README's run command is `scripts/run.sh`, which builds and runs `updraft up`
    let data = tempfile::tempdir().unwrap();
    let port = bus::server::free_port().unwrap();
    let o = Command::new(bin("updraft"))
        .args([
            "up",
            "--nodes",
            "3",
            "--demo",
            "30",
            "--build-time",
            "100ms",
            "--exit-after-demo",
            "--http-port",
        ])
        .arg(port.to_string())
        .arg("--data-dir")
        .arg(data.path())
        .output()
        .unwrap();
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains(&format!("http://127.0.0.1:{port}")), "{out}");
    assert!(out.contains("30"), "reports the demo: {out}");
    // it kept its state where it was told, and left nothing running
    assert!(data.path().join("nats").is_dir());
    let listening = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
    assert!(!listening, "the dispatcher is still up after exit");
}
