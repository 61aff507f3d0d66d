#![allow(clippy::unwrap_used, clippy::tests_outside_test_module)] // test code: a panic is the failure report

//! Security end to end: the NATS users and subject permissions of `deploy/nats/accounts.conf`
//! (made by the same generator) on a real server; claims signed with the node's key, a
//! forged or unsigned claim undone by the dispatchers; the API token; secrets kept out of logs.

use std::time::Duration;

use bus::connect::Secret;
use bus::permissions::{accounts_conf, agent_inbox_prefix};
use bus::server::{NatsServer, ServerOptions, free_port};
use e2e::harness::{Harness, HarnessOptions, agent_config, dispatcher_config, is_active};
use e2e::process::{Proc, bin};
use futures::StreamExt;
use node_agent::capacity::Fixed;
use placement::lifecycle::{Claim, State};
use placement::{ClaimToken, Epoch, NodeId, RequestId, Resources, Timestamp};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// The permission violations the server logged.
fn violations(server: &NatsServer) -> String {
    server
        .log()
        .lines()
        .filter(|l| l.contains("Violation"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn node_id(s: &str) -> NodeId {
    NodeId::new(s).unwrap()
}

/// A nats-server running updraft's generated accounts for agents `sec-a` and `sec-b`.
fn secured_server() -> NatsServer {
    let port = free_port().unwrap();
    let agents = [
        (node_id("sec-a"), "$UPDRAFT_AGENT_1_PASSWORD".to_string()),
        (node_id("sec-b"), "$UPDRAFT_AGENT_2_PASSWORD".to_string()),
    ];
    let conf = format!(
        "host: 127.0.0.1\nport: {port}\nmax_payload: 1MB\njetstream {{\n  store_dir: $UPDRAFT_NATS_STORE\n}}\n{}",
        accounts_conf(&agents)
    );
    let env = [
        ("UPDRAFT_DISPATCHER_PASSWORD", "disp-secret-1"),
        ("UPDRAFT_OPERATOR_PASSWORD", "op-secret-2"),
        ("UPDRAFT_SYS_PASSWORD", "sys-secret-3"),
        ("UPDRAFT_AGENT_1_PASSWORD", "agent-a-secret"),
        ("UPDRAFT_AGENT_2_PASSWORD", "agent-b-secret"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    NatsServer::start(ServerOptions {
        port: Some(port),
        config_text: Some((conf, env)),
        ..Default::default()
    })
    .unwrap()
}

async fn connect_as(
    url: &str,
    user: &str,
    password: &str,
    inbox: Option<String>,
) -> async_nats::Client {
    let mut o = async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
        .request_timeout(Some(Duration::from_secs(2)));
    if let Some(p) = inbox {
        o = o.custom_inbox_prefix(p);
    }
    o.connect(url).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agents_are_confined_by_their_nats_permissions() {
    let server = secured_server();
    let url = server.url();
    let opts = HarnessOptions::default();
    let mut dc = dispatcher_config(&url, &opts);
    dc.nats.user = Some("dispatcher".into());
    dc.nats.password = Some(Secret("disp-secret-1".into()));
    let d = dispatcher::start(dc, None).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut agents = Vec::new();
    for (n, pw) in [("sec-a", "agent-a-secret"), ("sec-b", "agent-b-secret")] {
        let totals = Resources::new(16, 32 * 1024, 1000);
        let mut c = agent_config(&url, n, dir.path().join(n), &totals);
        c.nats.user = Some(format!("agent-{n}"));
        c.nats.password = Some(Secret(pw.into()));
        c.nats.inbox_prefix = Some(agent_inbox_prefix(&node_id(n)));
        let deps = node_agent::Deps {
            driver: None,
            capacity: Some(Box::new(Fixed(totals))),
        };
        let a = tokio::time::timeout(
            Duration::from_secs(20),
            node_agent::start(c, deps, CancellationToken::new()),
        )
        .await
        .expect("an agent with only its own permissions starts")
        .unwrap();
        agents.push(a);
    }
    // the permissions are enough to do the job: a request is placed and built
    let http = reqwest::Client::new();
    let api = format!("http://{}", d.http_addr);
    let mut placed = false;
    for _ in 0..100 {
        let r = http
            .post(format!("{api}/v1/servers"))
            .json(&json!({ "id": "sec-vm", "flavor": "m1.small" }))
            .send()
            .await
            .unwrap();
        if matches!(r.status().as_u16(), 200 | 201) {
            placed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(placed);
    let rid = RequestId::new("sec-vm").unwrap();
    let t0 = tokio::time::Instant::now();
    loop {
        let r = d.dispatcher.bus.records.get(&rid).await.unwrap().unwrap();
        if r.value.state == State::Active {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{:?}; violations:\n{}",
            r.value.state,
            violations(&server)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let a = connect_as(
        &url,
        "agent-sec-a",
        "agent-a-secret",
        Some(agent_inbox_prefix(&node_id("sec-a"))),
    )
    .await;
    let js = async_nats::jetstream::new(a.clone());
    // 1. an agent cannot publish requests (hints onto a shard)
    let rec = d
        .dispatcher
        .bus
        .records
        .get(&rid)
        .await
        .unwrap()
        .unwrap()
        .value;
    let hint_subject = placement::subjects::hint_subject(
        &rec.shard,
        placement::Lane::Fit,
        &RequestId::new("evil").unwrap(),
    );
    let published = js
        .publish(hint_subject, "{}".into())
        .await
        .map(|ack| futures::FutureExt::boxed(ack.into_future()));
    let refused = match published {
        Err(_) => true,
        Ok(ack) => tokio::time::timeout(Duration::from_secs(3), ack)
            .await
            .map(|r| r.is_err())
            .unwrap_or(true),
    };
    assert!(refused, "an agent published a hint");
    // nor call the API
    let api_call = a
        .request(
            "updraft.v1.api.servers.create",
            r#"{"id":"evil-2","flavor":"m1.small"}"#.into(),
        )
        .await;
    assert!(api_call.is_err(), "an agent called the API");
    // 2. it cannot renew (or overwrite) another node's lease
    let kv_b = js.get_key_value("UPDRAFT_NODES").await;
    let before = d
        .dispatcher
        .bus
        .nodes
        .get(&node_id("sec-b"))
        .await
        .unwrap()
        .unwrap();
    let forged = match kv_b {
        Ok(kv) => tokio::time::timeout(
            Duration::from_secs(3),
            kv.update("sec-b", "{}".into(), before.revision),
        )
        .await
        .map(|r| r.is_ok())
        .unwrap_or(false),
        Err(_) => false,
    };
    assert!(!forged, "an agent wrote another node's lease");
    let after = d
        .dispatcher
        .bus
        .nodes
        .get(&node_id("sec-b"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(after.value.node, node_id("sec-b"));
    // its own lease it may write (the agent renews it): the permission is per node
    // 3. it cannot read another node's commands: no watch, no direct get
    d.dispatcher
        .set_admin("sec-b", true, false, "test")
        .await
        .unwrap();
    let watch = async {
        let kv = js.get_key_value("UPDRAFT_CMDS").await?;
        let mut w = kv.watch_with_history("sec-b.>").await?;
        let first = tokio::time::timeout(Duration::from_secs(3), w.next()).await;
        Ok::<bool, Box<dyn std::error::Error + Send + Sync>>(matches!(first, Ok(Some(Ok(_)))))
    }
    .await;
    assert!(
        !matches!(watch, Ok(true)),
        "an agent read another node's commands"
    );
    let direct = a
        .request(
            "$JS.API.DIRECT.GET.KV_UPDRAFT_CMDS.$KV.UPDRAFT_CMDS.sec-b.admin",
            "".into(),
        )
        .await;
    assert!(
        direct.is_err() || direct.as_ref().is_ok_and(|m| m.payload.is_empty()),
        "an agent read another node's admin state"
    );
    // while its own it can read (the agent's command loop depends on it)
    let own = a
        .request(
            "$JS.API.DIRECT.GET.KV_UPDRAFT_CMDS.$KV.UPDRAFT_CMDS.sec-a.admin",
            "".into(),
        )
        .await;
    assert!(own.is_ok(), "{own:?}");
    // it hears its config keys without a consumer: the bucket republishes them on core NATS,
    // and it reads them all in one batch request
    let own_bus = bus::Bus::open(a.clone()).await.unwrap();
    let map = d
        .dispatcher
        .bus
        .cluster
        .config()
        .await
        .unwrap()
        .unwrap()
        .value
        .shard_map;
    let node = node_id("sec-a");
    let zone = placement::Zone::new("az1").unwrap();
    let keys = placement::subjects::node_config_keys(&map, &node, &zone, &[], false);
    let mut follow = own_bus.cluster.follow_keys(&keys).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), follow.next()).await;
    assert!(
        matches!(first, Ok(Some(bus::cluster::ClusterEvent::Config(_)))),
        "{first:?}; violations:\n{}",
        violations(&server)
    );
    // the operator user may call the API but not touch records
    let op = connect_as(&url, "operator", "op-secret-2", None).await;
    let health = op.request("updraft.v1.api.health", "{}".into()).await;
    assert!(health.is_ok(), "{health:?}");
    for a in agents {
        a.stop().await;
    }
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forged_and_unsigned_claims_are_counted_and_undone() {
    let mut h = Harness::start(HarnessOptions::default()).await.unwrap();
    h.add_agent("honest", Resources::new(16, 32 * 1024, 1000))
        .await
        .unwrap();
    h.wait_nodes(1, Duration::from_secs(20)).await.unwrap();
    let d = h.dispatchers[0].dispatcher.clone();
    d.set_admin("honest", true, false, "test").await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    for id in ["forged-1", "forged-2"] {
        let (st, _) = h
            .create(0, &json!({ "id": id, "flavor": "m1.small" }))
            .await
            .unwrap();
        assert_eq!(st, 201);
    }
    // anyone who can write records writes claims naming the honest node: one unsigned, one
    // signed with some other key
    let other = nkeys::KeyPair::new_user();
    for (id, signed) in [("forged-1", false), ("forged-2", true)] {
        let rid = RequestId::new(id).unwrap();
        let cur = h.bus.records.get(&rid).await.unwrap().unwrap();
        let token = ClaimToken(77);
        let sig = signed.then(|| {
            use base64::Engine;
            let p = placement::lifecycle::claim_payload(
                &rid,
                cur.value.attempt,
                &node_id("honest"),
                token,
            );
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(other.sign(&p).unwrap())
        });
        let claimed = cur
            .value
            .claim(
                cur.value.attempt,
                Claim {
                    node: node_id("honest"),
                    epoch: Epoch(1),
                    token,
                    at: Timestamp(1),
                    sig,
                },
                common::clock::now(),
            )
            .unwrap();
        h.bus.records.cas(&claimed, cur.revision).await.unwrap();
    }
    // the dispatcher undoes both: queued again for the next attempt, with the reason
    let recs = h
        .wait_for(
            &["forged-1".into(), "forged-2".into()],
            Duration::from_secs(10),
            |r| r.state == State::Queued && r.attempt == 2,
        )
        .await
        .unwrap();
    for r in &recs {
        assert!(
            r.history
                .iter()
                .any(|t| t.reason.as_deref().is_some_and(|x| x.contains("refused"))),
            "{r:?}"
        );
    }
    // and counts them
    let (_, _) = h.get(0, "/healthz").await.unwrap();
    // the honest node then takes them for real, with valid signatures
    d.set_admin("honest", false, false, "test").await.unwrap();
    let done = h
        .wait_for(
            &["forged-1".into(), "forged-2".into()],
            Duration::from_secs(20),
            is_active,
        )
        .await
        .unwrap();
    for r in done {
        assert!(r.claim.unwrap().sig.is_some());
    }
    let report = h.check().await.unwrap();
    assert!(report.clean(), "{:#?}", report.violations);
    assert_eq!(report.builds, 2);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_api_token_is_required_and_secrets_never_reach_the_logs() {
    let h = Harness::start(HarnessOptions {
        dispatchers: 0,
        ..Default::default()
    })
    .await
    .unwrap();
    let port = free_port().unwrap();
    let log = h.dir.path().join("dispatcher.log");
    let token = "tok-3f9a7c-very-secret";
    let nats_password = "nats-pw-5d1e-very-secret";
    let d = Proc::spawn(
        &bin("updraft-dispatcher"),
        vec![
            format!("--set=nats.url={}", h.url),
            format!("--set=http_listen=127.0.0.1:{port}"),
            format!("--set=api_token={token}"),
            // unused by this server (it has no auth), but it must not be logged either
            format!("--set=nats.password={nats_password}"),
            "--set=nats.user=dispatcher".into(),
        ],
        log.clone(),
    )
    .unwrap();
    let http = reqwest::Client::new();
    let api = format!("http://127.0.0.1:{port}");
    let mut up = false;
    for _ in 0..100 {
        if http.get(format!("{api}/healthz")).send().await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up, "{}", d.log_text());
    let no = http.get(format!("{api}/v1/nodes")).send().await.unwrap();
    assert_eq!(no.status().as_u16(), 401);
    let wrong = http
        .get(format!("{api}/v1/nodes"))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status().as_u16(), 401);
    let yes = http
        .get(format!("{api}/v1/nodes"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(yes.status().as_u16(), 200);
    // the NATS API too
    let c = async_nats::connect(&h.url).await.unwrap();
    // the NATS service starts beside the HTTP one, not before it: wait for its responder
    let reply = {
        let mut tries = 0;
        loop {
            match c.request("updraft.v1.api.nodes.list", "{}".into()).await {
                Err(e)
                    if tries < 50
                        && e.kind() == async_nats::client::RequestErrorKind::NoResponders =>
                {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => break other.unwrap(),
            }
        }
    };
    let v: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(v["status"], 401, "{v}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let text = d.log_text();
    assert!(text.contains("effective configuration"), "{text}");
    assert!(text.contains("redacted"), "{text}");
    assert!(!text.contains(token), "the API token reached the log");
    assert!(
        !text.contains(nats_password),
        "the NATS password reached the log"
    );
    h.shutdown().await;
}
