//! The NATS topology: one work-queue stream per shard with its two lane consumers, the KV
//! buckets, and the timer stream, created idempotently by dispatchers; everyone else binds.
//!
//! JetStream settings that fail silently are set on purpose here (DESIGN.md): DiscardNew with
//! explicit limits, MaxDeliver unlimited (attempts live in the record), MaxAckPending and
//! MaxWaiting sized from config, one consumer per lane and never a second one on a lane.

use std::time::Duration;

use async_nats::jetstream::{
    self,
    consumer::{AckPolicy, PriorityPolicy, pull},
    kv, stream,
};
use placement::subjects::{
    COMMANDS_BUCKET, CONFIG_BUCKET, CONFIG_CHANGES, NODES_BUCKET, PRIORITY_GROUP, REQUESTS_BUCKET,
    TIMER_FIRE_FILTER, TIMER_SUBJECTS, TIMERS_CONSUMER, TIMERS_STREAM, kv_stream, kv_subject,
    lane_filter, shard_consumer, shard_stream, shard_stream_subjects,
};
use placement::{Lane, ShardId, ShardMap};
use serde::{Deserialize, Serialize};

use crate::BusError;
use crate::cluster::ClusterStore;
use crate::commands::CommandStore;
use crate::hints::HintPublisher;
use crate::kv::{Kv, ensure_bucket};
use crate::nodes::NodeStore;
use crate::records::RecordStore;
use crate::timers::TimerStore;

/// Topology settings (dispatcher config `[topology]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopologyConfig {
    /// Replicas of every stream and bucket: 1 for a single server, 3 for a cluster.
    pub replicas: usize,
    /// Window in which a re-published hint with the same `Nats-Msg-Id` is dropped.
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    /// Hints one shard holds before it answers "full" (429).
    pub max_hints_per_shard: i64,
    /// Bytes one shard holds before it answers "full".
    pub max_bytes_per_shard: i64,
    /// A node's lease: its advert expires this long after its last renewal.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// How long finished (failed, deleted) records are kept.
    #[serde(with = "humantime_serde")]
    pub finished_ttl: Duration,
    /// Unacknowledged deliveries allowed per lane consumer.
    pub max_ack_pending: i64,
    /// Pulls allowed to wait per lane consumer (size to the nodes sharing it).
    pub max_waiting: i64,
    /// Time before an unacknowledged delivery is redelivered.
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    /// Longest pull expiry accepted by the lane consumers.
    #[serde(with = "humantime_serde")]
    pub max_pull_expiry: Duration,
    /// Consumers allowed on the node commands bucket (a watch per node, a few per
    /// dispatcher, and the watches being replaced) and on the config bucket (the
    /// dispatchers' watches; nodes follow it without a consumer, `ClusterStore::follow_keys`).
    /// Set on the streams themselves, as nats-server 2.15 limits a stream that sets none to
    /// its `default_max_consumers` (1,000 unless configured), which would leave every node
    /// past the thousandth without its command watch.
    pub max_node_watches: i32,
}

/// Consumers allowed on the buckets nodes and dispatchers watch, by default: twice as many as
/// 100,000 nodes need, for their watches being replaced and the dispatchers'.
pub const DEFAULT_MAX_NODE_WATCHES: i32 = 200_000;

impl Default for TopologyConfig {
    fn default() -> Self {
        TopologyConfig {
            replicas: 1,
            duplicate_window: Duration::from_secs(120),
            max_hints_per_shard: 500_000,
            max_bytes_per_shard: 128 << 20,
            lease_ttl: Duration::from_secs(15),
            finished_ttl: Duration::from_secs(7 * 24 * 3600),
            max_ack_pending: 20_000,
            max_waiting: 20_000,
            ack_wait: Duration::from_secs(5),
            max_pull_expiry: Duration::from_secs(300),
            max_node_watches: DEFAULT_MAX_NODE_WATCHES,
        }
    }
}

/// Every handle a component needs, bound to the topology.
#[derive(Clone)]
pub struct Bus {
    /// The client.
    pub client: async_nats::Client,
    /// JetStream context.
    pub js: jetstream::Context,
    /// Request records.
    pub records: RecordStore,
    /// Adverts and leases.
    pub nodes: NodeStore,
    /// Per-node commands.
    pub commands: CommandStore,
    /// Cluster config, flags, pins.
    pub cluster: ClusterStore,
    /// Hint publishing.
    pub hints: HintPublisher,
    /// Timers.
    pub timers: TimerStore,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Bus")
    }
}

fn bucket(name: &str, cfg: &TopologyConfig) -> kv::Config {
    kv::Config {
        bucket: name.to_string(),
        history: 1,
        num_replicas: cfg.replicas,
        storage: stream::StorageType::File,
        ..Default::default()
    }
}

/// Sets stream `name`'s consumer limit to `max` unless it has it already (a warning where the
/// server refuses).
async fn ensure_max_consumers(
    js: &jetstream::Context,
    name: &str,
    max: i32,
) -> Result<(), BusError> {
    let mut stream = js
        .get_stream(name)
        .await
        .map_err(|e| BusError::nats(format!("read stream {name}"), e))?;
    let mut config = stream
        .info()
        .await
        .map_err(|e| BusError::nats(format!("read stream {name}"), e))?
        .config
        .clone();
    if config.max_consumers != max {
        config.max_consumers = max;
        // a server before 2.15 may refuse to change the limit; it sets no default limit
        // either, so the stream keeps room for every node
        if let Err(e) = js.update_stream(config).await {
            tracing::warn!(stream = name, error = %e, "could not set the stream's consumer limit; a nats-server 2.15 or later without it lets only its default_max_consumers nodes watch");
        }
    }
    Ok(())
}

impl Bus {
    /// Creates (or updates) the buckets and the timer stream, then binds. Shards are separate:
    /// see [`Bus::ensure_shards`].
    pub async fn ensure(client: async_nats::Client, cfg: &TopologyConfig) -> Result<Bus, BusError> {
        let js = jetstream::new(client.clone());
        ensure_bucket(
            &js,
            kv::Config {
                limit_markers: Some(Duration::from_secs(3600)),
                ..bucket(REQUESTS_BUCKET, cfg)
            },
        )
        .await?;
        ensure_bucket(
            &js,
            kv::Config {
                max_age: cfg.lease_ttl,
                limit_markers: Some(cfg.lease_ttl.max(Duration::from_secs(1))),
                ..bucket(NODES_BUCKET, cfg)
            },
        )
        .await?;
        ensure_bucket(&js, bucket(COMMANDS_BUCKET, cfg)).await?;
        ensure_bucket(
            &js,
            kv::Config {
                history: 5,
                // every change again on core NATS, where each node hears only its own keys
                // without a consumer of its own (`ClusterStore::follow_keys`)
                republish: Some(stream::Republish {
                    source: kv_subject(CONFIG_BUCKET, ">"),
                    destination: format!("{CONFIG_CHANGES}.>"),
                    headers_only: false,
                }),
                ..bucket(CONFIG_BUCKET, cfg)
            },
        )
        .await?;
        for name in [COMMANDS_BUCKET, CONFIG_BUCKET] {
            ensure_max_consumers(&js, &kv_stream(name), cfg.max_node_watches).await?;
        }
        let timers = js
            .create_or_update_stream(stream::Config {
                name: TIMERS_STREAM.to_string(),
                subjects: vec![TIMER_SUBJECTS.to_string()],
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::File,
                num_replicas: cfg.replicas,
                allow_message_schedules: true,
                max_messages_per_subject: 1,
                ..Default::default()
            })
            .await
            .map_err(|e| BusError::nats("create timer stream", e))?;
        let _ = timers;
        let stream = js
            .get_stream(TIMERS_STREAM)
            .await
            .map_err(|e| BusError::nats("bind timer stream", e))?;
        ensure_consumer(
            &stream,
            pull::Config {
                durable_name: Some(TIMERS_CONSUMER.to_string()),
                filter_subject: TIMER_FIRE_FILTER.to_string(),
                ack_policy: AckPolicy::Explicit,
                ack_wait: Duration::from_secs(5),
                max_deliver: -1,
                max_ack_pending: 10_000,
                ..Default::default()
            },
        )
        .await?;
        Self::bind_with(client, js, cfg.finished_ttl).await
    }

    /// Binds to a topology a dispatcher created; [`BusError::Missing`] if there is none yet.
    pub async fn open(client: async_nats::Client) -> Result<Bus, BusError> {
        let js = jetstream::new(client.clone());
        Self::bind_with(client, js, TopologyConfig::default().finished_ttl).await
    }

    async fn bind_with(
        client: async_nats::Client,
        js: jetstream::Context,
        finished_ttl: Duration,
    ) -> Result<Bus, BusError> {
        Ok(Bus {
            records: RecordStore::new(Kv::bind(&js, REQUESTS_BUCKET).await?, finished_ttl),
            nodes: NodeStore::new(Kv::bind(&js, NODES_BUCKET).await?),
            commands: CommandStore::new(Kv::bind(&js, COMMANDS_BUCKET).await?),
            cluster: ClusterStore::new(Kv::bind(&js, CONFIG_BUCKET).await?),
            hints: HintPublisher::new(js.clone(), client.clone()),
            timers: TimerStore::new(js.clone()),
            client,
            js,
        })
    }

    /// Creates (or updates) the stream and lane consumers of every shard of `map`.
    pub async fn ensure_shards(
        &self,
        map: &ShardMap,
        cfg: &TopologyConfig,
    ) -> Result<usize, BusError> {
        let shards = map.all_shards();
        for shard in &shards {
            self.ensure_shard(shard, cfg).await?;
        }
        Ok(shards.len())
    }

    async fn ensure_shard(&self, shard: &ShardId, cfg: &TopologyConfig) -> Result<(), BusError> {
        let name = shard_stream(shard);
        self.js
            .create_or_update_stream(stream::Config {
                name: name.clone(),
                subjects: vec![shard_stream_subjects(shard)],
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::File,
                num_replicas: cfg.replicas,
                discard: stream::DiscardPolicy::New,
                // and the shard's keeper (`keeper`)
                max_messages: cfg.max_hints_per_shard.saturating_add(1),
                max_bytes: cfg.max_bytes_per_shard,
                max_messages_per_subject: 1,
                duplicate_window: cfg.duplicate_window,
                // no request waits longer than the longest deadline: older hints are garbage
                max_age: Duration::from_secs(placement::request::MAX_DEADLINE_S + 3600),
                allow_direct: true,
                ..Default::default()
            })
            .await
            .map_err(|e| BusError::nats(format!("create shard stream {name}"), e))?;
        let stream = self
            .js
            .get_stream(&name)
            .await
            .map_err(|e| BusError::nats(format!("bind {name}"), e))?;
        for lane in [Lane::Fit, Lane::Spill] {
            ensure_consumer(
                &stream,
                pull::Config {
                    durable_name: Some(shard_consumer(shard, lane)),
                    filter_subject: lane_filter(shard, lane),
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: cfg.ack_wait,
                    max_deliver: -1,
                    max_waiting: cfg.max_waiting,
                    max_ack_pending: cfg.max_ack_pending,
                    max_batch: i64::from(placement::pull::MAX_PULL_BATCH),
                    max_expires: cfg.max_pull_expiry,
                    priority_policy: PriorityPolicy::Prioritized,
                    priority_groups: vec![PRIORITY_GROUP.to_string()],
                    ..Default::default()
                },
            )
            .await?;
        }
        Ok(())
    }
}

async fn ensure_consumer(stream: &stream::Stream, config: pull::Config) -> Result<(), BusError> {
    let name = config.durable_name.clone().unwrap_or_default();
    match stream.create_consumer(config.clone()).await {
        Ok(_) => Ok(()),
        Err(e) if e.to_string().contains("already exists") => stream
            .update_consumer(config)
            .await
            .map(|_| ())
            .map_err(|e| BusError::nats(format!("update consumer {name}"), e)),
        Err(e) => Err(BusError::nats(format!("create consumer {name}"), e)),
    }
}
