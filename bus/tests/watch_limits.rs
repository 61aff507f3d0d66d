#![allow(clippy::unwrap_used, clippy::tests_outside_test_module)] // test code: a panic is the failure report

//! The command bucket holds a watch per node past nats-server 2.15's default limit of 1,000
//! consumers per stream, and every node follows its config keys (without a consumer),
//! against a real nats-server.

use futures::StreamExt;
use placement::subjects::node_config_keys;
use placement::{NodeId, Zone};

/// More watches than the server's default limit lets a stream have.
const WATCHES: usize = 1_100;

#[tokio::test]
async fn every_node_of_a_large_cluster_gets_its_config_and_command_watches() {
    testkit::trace_init();
    let server = testkit::nats();
    let map = testkit::shard_map();
    let b = testkit::bus_for(&server.url(), &map).await;
    // a second dispatcher's start (create-or-update of the buckets) leaves the limit in place
    let b2 = testkit::bus_for(&server.url(), &map).await;
    let zone = Zone::new("az1").unwrap();
    let mut held = Vec::with_capacity(2 * WATCHES);
    for i in 0..WATCHES {
        let node = NodeId::new(format!("n{i:05}")).unwrap();
        let bus = if i % 2 == 0 { &b } else { &b2 };
        let keys = node_config_keys(&map, &node, &zone, &[], false);
        let config = bus.cluster.follow_keys(&keys).await;
        let commands = bus.commands.watch(&node).await;
        match (config, commands) {
            (Ok(c), Ok(m)) => {
                held.push(c.map(|_| ()).boxed());
                held.push(m.map(|_| ()).boxed());
            }
            (c, m) => panic!(
                "node {i}: config watch {:?}, command watch {:?}",
                c.err(),
                m.err()
            ),
        }
    }
    assert_eq!(held.len(), 2 * WATCHES);
}
