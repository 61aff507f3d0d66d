//! The denominator: the raw JetStream work-queue rate on the same broker, with the same
//! number of workers: publish → fetch (batch 1) → ack, file storage.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, stream};
use futures::StreamExt;

/// Every server of a comma-separated URL list.
fn addrs(url: &str) -> anyhow::Result<Vec<async_nats::ServerAddr>> {
    url.split(',')
        .map(|u| {
            u.trim()
                .parse::<async_nats::ServerAddr>()
                .map_err(anyhow::Error::from)
        })
        .collect()
}

/// Messages per second through publish → fetch → ack with `workers` workers.
pub async fn rate(
    url: &str,
    replicas: usize,
    messages: usize,
    workers: usize,
) -> anyhow::Result<f64> {
    let client = async_nats::connect(addrs(url)?).await?;
    let js = jetstream::new(client.clone());
    let _ = js.delete_stream("BENCH_RAW").await;
    let s = js
        .create_stream(stream::Config {
            name: "BENCH_RAW".into(),
            subjects: vec!["bench.raw.>".into()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            num_replicas: replicas,
            ..Default::default()
        })
        .await?;
    s.create_consumer(pull::Config {
        durable_name: Some("w".into()),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        max_waiting: 100_000,
        max_ack_pending: 100_000,
        ..Default::default()
    })
    .await?;
    let done = Arc::new(AtomicUsize::new(0));
    let t0 = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for w in 0..workers {
        let servers = addrs(url)?;
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let client = async_nats::connect(servers).await?;
            let js = jetstream::new(client);
            let c: jetstream::consumer::PullConsumer = js
                .get_stream("BENCH_RAW")
                .await?
                .get_consumer("w")
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            while done.load(Ordering::Relaxed) < messages {
                let mut batch = c
                    .batch()
                    .max_messages(1)
                    .expires(Duration::from_millis(500))
                    .messages()
                    .await?;
                while let Some(m) = batch.next().await {
                    let m = m.map_err(|e| anyhow::anyhow!("{e}"))?;
                    m.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
            let _ = w;
            anyhow::Ok(())
        }));
    }
    let publisher = async {
        let mut acks = futures::stream::FuturesUnordered::new();
        for i in 0..messages {
            acks.push(
                js.publish(format!("bench.raw.{}", i % 64), "x".into())
                    .await?
                    .into_future(),
            );
            if acks.len() >= 256
                && let Some(a) = acks.next().await
            {
                a?;
            }
        }
        while let Some(a) = acks.next().await {
            a?;
        }
        anyhow::Ok(())
    };
    publisher.await?;
    while done.load(Ordering::Relaxed) < messages {
        anyhow::ensure!(t0.elapsed() < Duration::from_secs(300), "raw run stalled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    for t in tasks {
        t.abort();
    }
    let _ = js.delete_stream("BENCH_RAW").await;
    #[allow(clippy::cast_precision_loss)] // a rate
    let r = messages as f64 / secs;
    Ok(r)
}
