//! Test support: a real `nats-server` per test, tracing for tests, fixtures.
//! A dev-dependency only; never shipped.

use std::sync::Once;

pub use bus::server::{NatsCluster, NatsServer, ServerOptions};

/// Starts a fresh single JetStream server on a random loopback port with a temporary store.
/// Panics with an install hint when the binary is missing.
pub fn nats() -> NatsServer {
    match NatsServer::start(ServerOptions::default()) {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    }
}

/// Starts a 3-server JetStream cluster on loopback.
pub fn nats_cluster() -> NatsCluster {
    match NatsCluster::start() {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    }
}

/// Installs a test subscriber once (filter from `UPDRAFT_LOG`, default `warn`).
pub fn trace_init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_env("UPDRAFT_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

/// Connects a bus client to `url` and creates the whole topology for `map`.
pub async fn bus_for(url: &str, map: &placement::ShardMap) -> bus::Bus {
    let cfg = bus::NatsConfig {
        url: url.to_string(),
        ..Default::default()
    };
    let (client, _) = bus::connect(&cfg, "test")
        .await
        .expect("connect to test nats-server");
    let topo = bus::TopologyConfig::default();
    let b = bus::Bus::ensure(client, &topo)
        .await
        .expect("create topology");
    b.ensure_shards(map, &topo).await.expect("create shards");
    b
}

/// The default one-zone shard map (`az1`).
pub fn shard_map() -> placement::ShardMap {
    placement::shard::default_shard_map(placement::Zone::new("az1").expect("static zone"))
}
