//! What one backlog-flag message costs the broker. The simulator counts how many messages a
//! workload's flags need (`flag_deliveries` in its report); this run prices one.
//!
//! K idle agents each follow their own flag keys (`placement::subjects::node_config_keys`)
//! as in production, on the subjects the config bucket republishes them on. Three windows of
//! the same length: idle; a writer putting and deleting keys of a zone no agent is in (what a
//! write costs with nobody to deliver it to); the same writer on one class's keys for empty
//! nodes, which the agents follow. The broker's CPU in the last window, less the idle load
//! and the writes' own cost, divided by the messages the agents received, is the cost of one
//! delivery. A fourth window prices a node's join (its keys subscribed, read and dropped).
//! The flags written name no takers, so no agent acts on them: the run measures deliveries,
//! not the pulls a real flag sets off.
//!
//! For comparison, the same fan-out to K plain connections, each hearing one of eight keys:
//! over core NATS publishes, over a republishing bucket, and over KV watches (how agents
//! heard their flags before), a writer at the same rate.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::time::Instant;

use placement::flag_writes::{FLAG_BUCKETS, FlagSlot};
use placement::ids::Zone;
use placement::shard::ClassKey;
use placement::takers::PartitionTakers;
use placement::wire::{BacklogFlag, WIRE_VERSION};
use placement::{Resources, Timestamp};

use crate::broker;
use crate::cluster::{Broker, Cluster};

/// CPU seconds over one window: the broker's and this process's (dispatcher and agents, or
/// the subscribers).
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu {
    /// The broker.
    pub broker: f64,
    /// This process.
    pub clients: f64,
}

/// What a fan-out run measured.
#[derive(Debug)]
pub struct FanoutResult {
    /// Length of each window, seconds.
    pub secs: f64,
    /// Keys written (or messages published) in the delivering window.
    pub writes: u64,
    /// Messages the watchers received in the delivering window, beyond their idle traffic.
    pub deliveries: u64,
    /// The deliveries the writes should have made (watchers of each written key).
    pub expected: u64,
    /// CPU with nothing written.
    pub idle: Cpu,
    /// CPU while writing keys nobody hears (None for core NATS publishes, where a publish
    /// nobody subscribes to is not stored).
    pub unwatched: Option<(u64, Cpu)>,
    /// CPU while writing the watched keys.
    pub busy: Cpu,
    /// What a node pays to start hearing its keys, and the CPU while it did: for the agents,
    /// one node's keys subscribed, read in one batch and dropped (an agent follows again when
    /// it fills or empties); for plain connections, a read of one key (republishing bucket)
    /// or a watch of one key opened, replayed and dropped (KV watches). None for core NATS
    /// publishes.
    pub joins: Option<(u64, Cpu)>,
}

impl FanoutResult {
    /// Broker CPU microseconds per operation of a window of `n` operations, net of idle load.
    fn broker_us_per_op(&self, window: Option<(u64, Cpu)>) -> f64 {
        window.map_or(0.0, |(n, cpu)| {
            #[allow(clippy::cast_precision_loss)] // a rate for a report
            let n = n.max(1) as f64;
            (cpu.broker - self.idle.broker).max(0.0) * 1e6 / n
        })
    }

    /// Broker CPU microseconds per write with nobody to deliver it to, net of idle load.
    pub fn broker_us_per_write(&self) -> f64 {
        self.broker_us_per_op(self.unwatched)
    }

    /// Broker CPU microseconds per delivered message, net of idle load and of the writes.
    pub fn broker_us_per_delivery(&self) -> f64 {
        #[allow(clippy::cast_precision_loss)] // rates for a report
        let (w, d) = (self.writes as f64, self.deliveries.max(1) as f64);
        let writes = w * self.broker_us_per_write() / 1e6;
        (self.busy.broker - self.idle.broker - writes).max(0.0) * 1e6 / d
    }

    /// This process's CPU microseconds per delivered message (receiving it; the agents also
    /// decode it and plan again), net of idle load.
    pub fn clients_us_per_delivery(&self) -> f64 {
        #[allow(clippy::cast_precision_loss)]
        let d = self.deliveries.max(1) as f64;
        (self.busy.clients - self.idle.clients).max(0.0) * 1e6 / d
    }

    /// Broker CPU microseconds per join (see `joins`), net of idle load.
    pub fn broker_us_per_join(&self) -> f64 {
        self.broker_us_per_op(self.joins)
    }

    /// Share of one core the broker used while delivering.
    pub fn broker_busy_share(&self) -> f64 {
        self.busy.broker / self.secs
    }
}

/// Samples the CPU of `broker` and of this process.
fn cpu_now(broker: &Broker) -> Cpu {
    Cpu {
        broker: broker.cpu(),
        clients: broker::cpu_seconds(std::process::id()),
    }
}

fn since(a: Cpu, b: Cpu) -> Cpu {
    Cpu {
        broker: b.broker - a.broker,
        clients: b.clients - a.clients,
    }
}

/// A flag every agent watching `slot` receives and none acts on (no share for anyone).
fn inert_flag(class: &ClassKey, slot: FlagSlot, now: Timestamp) -> BacklogFlag {
    BacklogFlag {
        v: WIRE_VERSION,
        class: class.clone(),
        since: now,
        oldest_age_ms: 0,
        depth: 1,
        smallest: Resources::default(),
        updated_at: now,
        takers: Some(vec![PartitionTakers {
            part: slot.part,
            in_use: 0.0,
            empty: 0.0,
            empty_floor: 0,
        }]),
    }
}

/// Calls `op` `rate` times a second for `window`; returns how many succeeded and how long
/// it took.
async fn at_rate<F, Fut>(rate: f64, window: Duration, mut op: F) -> (u64, f64)
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let start = Instant::now();
    let (mut done, mut i) = (0u64, 0usize);
    while start.elapsed() < window {
        tick.tick().await;
        if op(i).await {
            done += 1;
        }
        i += 1;
    }
    (done, start.elapsed().as_secs_f64())
}

/// The K agents' run, as production delivers flags: each agent follows its keys on the
/// subjects the config bucket republishes them on.
pub async fn agent_follows(
    agents: usize,
    secs: u64,
    rate: f64,
    node: &Resources,
) -> anyhow::Result<FanoutResult> {
    let c = Cluster::start(false, agents, node.clone()).await?;
    // let joins, first plans and the watches' history settle
    tokio::time::sleep(Duration::from_secs(5)).await;
    let d = &c.dispatcher.dispatcher;
    let map = d
        .bus
        .cluster
        .config()
        .await?
        .ok_or_else(|| anyhow::anyhow!("no cluster config"))?
        .value
        .shard_map;
    let (zone, nodes) = {
        let view = d.view();
        let zone = view
            .adverts()
            .values()
            .next()
            .map(|a| a.zone.clone())
            .ok_or_else(|| anyhow::anyhow!("no agent advertised"))?;
        (zone, view.adverts().keys().cloned().collect::<Vec<_>>())
    };
    let tclass = map
        .pullable_classes(&[])
        .0
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no trait class"))?;
    let class = ClassKey {
        zone,
        tclass: tclass.clone(),
        size: 0,
    };
    let nobodys = ClassKey {
        zone: Zone::new("nobody")?,
        tclass,
        size: 0,
    };
    // every agent is empty: it watches its empty slot of the class
    let mut watchers: BTreeMap<FlagSlot, u64> = BTreeMap::new();
    for n in &nodes {
        *watchers
            .entry(FlagSlot::of_node(&map, n, &class, true))
            .or_default() += 1;
    }
    let slots: Vec<FlagSlot> = (0..map.partitions(class.size))
        .flat_map(|part| {
            (0..FLAG_BUCKETS).map(move |bucket| FlagSlot {
                part,
                empty: true,
                bucket,
            })
        })
        .collect();
    // put every slot, then delete every slot, and again
    let write = |class: &ClassKey, i: usize| {
        let slot = slots[i % slots.len()];
        let up = (i / slots.len()).is_multiple_of(2);
        let cluster = d.bus.cluster.clone();
        let class = class.clone();
        async move {
            let done = if up {
                let flag = inert_flag(&class, slot, common::clock::now());
                cluster.put_flag(slot, &flag).await
            } else {
                cluster.clear_flag(&class, slot).await
            };
            done.is_ok()
        }
    };
    let agent_clients: Vec<async_nats::Client> =
        c.agents.iter().map(|a| a.bus.client.clone()).collect();
    let received = || broker::client_messages(&agent_clients).1;
    let window = Duration::from_secs(secs);

    let (c0, r0) = (cpu_now(&c.broker), received());
    tokio::time::sleep(window).await;
    let (c1, r1) = (cpu_now(&c.broker), received());
    let (unwatched, _) = at_rate(rate, window, |i| write(&nobodys, i)).await;
    let (c2, r2) = (cpu_now(&c.broker), received());
    let (writes, secs_busy) = at_rate(rate, window, |i| write(&class, i)).await;
    // the last deliveries land
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (c3, r3) = (cpu_now(&c.broker), received());
    // a node's join: its keys (as an agent in use follows them) subscribed, read in one
    // batch, and dropped
    let probe = placement::NodeId::new("fanout-probe")?;
    let keys = placement::subjects::node_config_keys(&map, &probe, &class.zone, &[], false);
    let (joins, _) = at_rate(rate.min(100.0), window, |_| {
        let (cluster, keys) = (d.bus.cluster.clone(), keys.clone());
        async move {
            match cluster.follow_keys(&keys).await {
                Ok(_) => true,
                Err(e) => {
                    tracing::warn!(error = %e, "join failed");
                    false
                }
            }
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let c4 = cpu_now(&c.broker);
    c.stop().await;
    let expected = (0..usize::try_from(writes).unwrap_or(usize::MAX))
        .map(|i| watchers.get(&slots[i % slots.len()]).copied().unwrap_or(0))
        .sum();
    // the agents' idle traffic (heartbeats, pull expiries) in the windows with writes
    let idle_in = (r1 - r0).max(r2 - r1);
    Ok(FanoutResult {
        secs: secs_busy,
        writes,
        deliveries: (r3 - r2).saturating_sub(idle_in),
        expected,
        idle: since(c0, c1),
        unwatched: Some((unwatched, since(c1, c2))),
        busy: since(c2, c3),
        joins: Some((joins, since(c3, c4))),
    })
}

/// How the comparison's messages reach its subscribers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Published on core NATS.
    Publish,
    /// Put in a KV bucket that republishes each stored message on core NATS (how flags reach
    /// nodes): the subscribers are the same.
    Republish,
    /// Put in a KV bucket each subscriber watches (how flags reached nodes before).
    KvWatch,
}

/// The comparison: `clients` plain connections, each hearing one of eight keys or subjects,
/// and a writer at `rate` for `secs` (`how`). With a bucket, a window of puts nobody hears
/// prices the stored write, and a window of joins prices what a node pays to start hearing
/// a key: one key read (republished), or a watch of one key opened, replayed and dropped.
pub async fn plain_connections(
    clients: usize,
    secs: u64,
    rate: f64,
    how: Delivery,
) -> anyhow::Result<FanoutResult> {
    let broker = Broker::start(false)?;
    let url = broker.url();
    let publisher = async_nats::connect(&url).await?;
    let js = async_nats::jetstream::new(publisher.clone());
    let kv = js
        .create_key_value(async_nats::jetstream::kv::Config {
            bucket: "FANOUT".into(),
            republish: (how == Delivery::Republish).then(|| {
                async_nats::jetstream::stream::Republish {
                    source: "$KV.FANOUT.>".into(),
                    destination: "fanout.r.>".into(),
                    headers_only: false,
                }
            }),
            ..Default::default()
        })
        .await?;
    // room for a watch per client (nats-server 2.15 allows 1,000 consumers by default)
    let mut stream = js.get_stream("KV_FANOUT").await?;
    let mut config = stream.info().await?.config.clone();
    config.max_consumers = i32::try_from(clients * 2 + 100).unwrap_or(i32::MAX);
    js.update_stream(config).await?;
    let received = Arc::new(AtomicU64::new(0));
    let mut conns = Vec::with_capacity(clients);
    let mut tasks = Vec::with_capacity(clients);
    for i in 0..clients {
        let c = async_nats::connect(&url).await?;
        let n = received.clone();
        let key = format!("k{}", i % 8);
        let mut heard: BoxStream<'static, ()> = match how {
            Delivery::KvWatch => async_nats::jetstream::new(c.clone())
                .get_key_value("FANOUT")
                .await?
                .watch(key)
                .await?
                .map(|_| ())
                .boxed(),
            Delivery::Republish => c
                .subscribe(format!("fanout.r.{key}"))
                .await?
                .map(|_| ())
                .boxed(),
            Delivery::Publish => c
                .subscribe(format!("fanout.{key}"))
                .await?
                .map(|_| ())
                .boxed(),
        };
        tasks.push(tokio::spawn(async move {
            while heard.next().await.is_some() {
                n.fetch_add(1, Ordering::Relaxed);
            }
        }));
        conns.push(c);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let window = Duration::from_secs(secs);
    // a message the size of a flag
    let body = bytes::Bytes::from(vec![b'x'; 300]);
    let send = |key: String| {
        let (p, kv, body) = (publisher.clone(), kv.clone(), body.clone());
        async move {
            match how {
                Delivery::Publish => p.publish(format!("fanout.{key}"), body).await.is_ok(),
                Delivery::Republish | Delivery::KvWatch => kv.put(key, body).await.is_ok(),
            }
        }
    };
    let c0 = cpu_now(&broker);
    tokio::time::sleep(window).await;
    let c1 = cpu_now(&broker);
    // puts of keys nobody hears
    let unwatched = if how == Delivery::Publish {
        None
    } else {
        let (n, _) = at_rate(rate, window, |i| send(format!("n{}", i % 8))).await;
        Some(n)
    };
    let (c2, r2) = (cpu_now(&broker), received.load(Ordering::Relaxed));
    let (writes, secs_busy) = at_rate(rate, window, |i| send(format!("k{}", i % 8))).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (c3, r3) = (cpu_now(&broker), received.load(Ordering::Relaxed));
    // joins: what a node pays to start hearing one key
    let joins = if how == Delivery::Publish {
        None
    } else {
        let (n, _) = at_rate(rate, window, |i| {
            let (kv, key) = (kv.clone(), format!("k{}", i % 8));
            async move {
                if how == Delivery::Republish {
                    return kv.entry(key).await.is_ok();
                }
                let Ok(mut w) = kv.watch_with_history(key).await else {
                    return false;
                };
                w.next().await.is_some()
            }
        })
        .await;
        Some((n, since(c3, cpu_now(&broker))))
    };
    for t in tasks {
        t.abort();
    }
    Ok(FanoutResult {
        secs: secs_busy,
        writes,
        deliveries: r3 - r2,
        expected: (0..clients)
            .map(|i| {
                let k = u64::try_from(i % 8).unwrap_or(0);
                writes / 8 + u64::from(k < writes % 8)
            })
            .sum(),
        idle: since(c0, c1),
        unwatched: unwatched.map(|n| (n, since(c1, c2))),
        busy: since(c2, c3),
        joins,
    })
}
