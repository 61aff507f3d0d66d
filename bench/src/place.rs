//! Placement runs: N requests into the dispatcher, as fast as it takes them or at a fixed
//! rate, until every one is active; then what it cost.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bus::records::RecordEvent;
use futures::StreamExt;
use placement::Resources;
use placement::lifecycle::{RequestRecord, State};

use crate::cluster::Cluster;

/// How to submit.
#[derive(Debug, Clone)]
pub struct PlaceOpts {
    /// Requests.
    pub requests: usize,
    /// Creates in flight at once (throughput runs).
    pub concurrency: usize,
    /// Fixed submission rate (requests per second) instead of as fast as possible.
    pub rate: Option<f64>,
    /// Id prefix (unique per run).
    pub prefix: String,
}

/// What a run measured.
#[derive(Debug, Clone, Default)]
pub struct PlaceResult {
    /// Requests placed.
    pub placed: usize,
    /// Wall time from first submit to last active, seconds.
    pub secs: f64,
    /// Placements per second.
    pub rate: f64,
    /// submit → claimed p50, p99 (ms).
    pub to_claim: (u64, u64),
    /// submit → active p50, p99 (ms).
    pub to_active: (u64, u64),
    /// JetStream messages stored per placement, total and by group.
    pub stored: f64,
    /// Stored per placement by group.
    pub stored_by_group: BTreeMap<&'static str, f64>,
    /// Client messages (sent + received) per placement.
    pub messages: f64,
    /// Broker CPU seconds per placement.
    pub cpu: f64,
    /// CPU seconds per placement of this process (the dispatcher and every agent).
    pub client_cpu: f64,
    /// Hosts that received work.
    pub hosts: usize,
    /// Bin-packing lower bound on hosts.
    pub lower_bound: usize,
}

/// The flavor mix of a run (small shapes, as in the Azure trace).
const MIX: [&str; 5] = ["m1.small", "m1.tiny", "m1.small", "m1.medium", "m1.tiny"];

fn pct(v: &mut [u64], p: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )] // an index
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    v[i]
}

/// Every record in KV.
pub async fn records(c: &Cluster) -> anyhow::Result<Vec<RequestRecord>> {
    let mut w = c.dispatcher.dispatcher.bus.records.watch_all().await?;
    let mut out = Vec::new();
    while let Some(ev) = w.next().await {
        match ev {
            RecordEvent::Put(v) => out.push(v.value),
            RecordEvent::Caught => break,
            _ => {}
        }
    }
    Ok(out)
}

/// Runs one placement run on a fresh cluster.
pub async fn run(c: &Cluster, node: &Resources, opts: &PlaceOpts) -> anyhow::Result<PlaceResult> {
    let d = c.dispatcher.dispatcher.clone();
    let js = d.bus.js.clone();
    let clients = c.clients();
    let stored0 = crate::broker::stored(&js).await?;
    let (out0, in0) = crate::broker::client_messages(&clients);
    let cpu0 = c.broker.cpu();
    let me0 = crate::broker::cpu_seconds(std::process::id());
    let t0 = tokio::time::Instant::now();
    let bodies: Vec<Vec<u8>> = (0..opts.requests)
        .map(|i| {
            format!(
                r#"{{"id":"{}-{i:07}","flavor":"{}"}}"#,
                opts.prefix,
                MIX[i % MIX.len()]
            )
            .into_bytes()
        })
        .collect();
    let submit = async {
        match opts.rate {
            None => {
                let results: Vec<_> = futures::stream::iter(bodies.iter())
                    .map(|b| {
                        let d = d.clone();
                        async move { d.create(b).await }
                    })
                    .buffer_unordered(opts.concurrency)
                    .collect()
                    .await;
                if let Some(Err(e)) = results.iter().find(|r| r.is_err()) {
                    eprintln!("first create error: {e}");
                }
                results.iter().filter(|r| r.is_err()).count()
            }
            Some(rate) => {
                let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                let mut inflight = futures::stream::FuturesUnordered::new();
                let mut errors = 0;
                for b in &bodies {
                    tick.tick().await;
                    let d = d.clone();
                    inflight.push(async move { d.create(b).await });
                    while let Some(Some(r)) = futures::FutureExt::now_or_never(inflight.next()) {
                        errors += usize::from(r.is_err());
                    }
                }
                while let Some(r) = inflight.next().await {
                    errors += usize::from(r.is_err());
                }
                errors
            }
        }
    };
    let errors = submit.await;
    anyhow::ensure!(errors == 0, "{errors} creates failed");
    // wait for every request to be active
    let deadline = t0 + Duration::from_secs(60);
    loop {
        let active = d.view().counts().get(&State::Active).copied().unwrap_or(0);
        if active >= opts.requests {
            break;
        }
        let counts = d.view().counts();
        if tokio::time::Instant::now() >= deadline {
            let all = records(c).await?;
            let mut by: BTreeMap<String, usize> = BTreeMap::new();
            for r in &all {
                *by.entry(r.state.as_str().to_string()).or_insert(0) += 1;
            }
            eprintln!("KV holds {} records: {by:?}", all.len());
            for st in d.shards().await.map_err(|e| anyhow::anyhow!("{e}"))? {
                if st.messages > 0 || st.fit.waiting_pulls > 0 || st.fit.ack_pending > 0 {
                    eprintln!(
                        "{} msgs {} fit {:?} spill {:?}",
                        st.stream, st.messages, st.fit, st.spill
                    );
                }
            }
            let flags = d.flags.lock().expect("flags").clone();
            eprintln!(
                "flag keys by class: {:?}",
                flags
                    .iter()
                    .map(|(class, keys)| (class.to_string(), keys.len()))
                    .collect::<Vec<_>>()
            );
            for a in &c.agents {
                let inner = a.lock();
                eprintln!(
                    "{} state {:?} pulls {} unalloc {} holding {:?} demand {:?}",
                    a.identity.node,
                    inner.mode.state(),
                    inner.pulls.len(),
                    inner.ledger.unallocated(),
                    inner.holding,
                    inner.demand.len()
                );
            }
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline && !counts.contains_key(&State::Failed),
            "only {active} of {} placed after {:.0} s: {counts:?}",
            opts.requests,
            t0.elapsed().as_secs_f64()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = c.broker.cpu() - cpu0;
    let me = crate::broker::cpu_seconds(std::process::id()) - me0;
    let (out1, in1) = crate::broker::client_messages(&clients);
    let stored1 = crate::broker::stored(&js).await?;
    let recs: Vec<RequestRecord> = records(c)
        .await?
        .into_iter()
        .filter(|r| r.spec.id.as_str().starts_with(&opts.prefix))
        .collect();
    let mut claim: Vec<u64> = recs
        .iter()
        .filter_map(|r| {
            r.history.iter().find(|h| h.to == State::Claimed).map(|h| {
                h.at.since(r.queued_at)
                    .as_millis()
                    .try_into()
                    .unwrap_or(u64::MAX)
            })
        })
        .collect();
    let mut active: Vec<u64> = recs
        .iter()
        .filter_map(|r| {
            r.active_at.map(|a| {
                a.since(r.queued_at)
                    .as_millis()
                    .try_into()
                    .unwrap_or(u64::MAX)
            })
        })
        .collect();
    if std::env::var_os("UPDRAFT_BENCH_DEBUG").is_some() {
        let mut slow: Vec<&RequestRecord> = recs.iter().filter(|r| r.active_at.is_some()).collect();
        slow.sort_by_key(|r| std::cmp::Reverse(r.active_at.map(|a| a.since(r.queued_at))));
        // when the slow ones were submitted: a stall shows as a cluster of 100 ms slots
        let t_first = recs.iter().map(|r| r.queued_at).min();
        let mut slow_by_slot: BTreeMap<u128, u32> = BTreeMap::new();
        for r in &recs {
            let claimed = r.history.iter().find(|h| h.to == State::Claimed);
            if let (Some(t0), Some(c)) = (t_first, claimed)
                && c.at.since(r.queued_at) > Duration::from_millis(10)
            {
                *slow_by_slot
                    .entry(r.queued_at.since(t0).as_millis() / 100)
                    .or_default() += 1;
            }
        }
        eprintln!(
            "claimed after over 10 ms, by 100 ms slot of submission from {} ms (wall): {slow_by_slot:?}",
            t_first.map_or(0, |t| t.0)
        );
        for r in slow.iter().take(5) {
            eprintln!(
                "slow {}: {:?} {:?}",
                r.spec.id,
                r.active_at.map(|a| a.since(r.queued_at)),
                r.history
                    .iter()
                    .map(|h| (h.to, h.at.since(r.queued_at)))
                    .collect::<Vec<_>>()
            );
        }
    }
    let hosts: BTreeSet<String> = recs
        .iter()
        .filter_map(|r| r.node().map(ToString::to_string))
        .collect();
    let mut total = Resources::default();
    for r in &recs {
        total = total.checked_add(&r.spec.resources)?;
    }
    let lb = [
        u64::from(total.vcpus).div_ceil(u64::from(node.vcpus)),
        total.memory_mib.div_ceil(node.memory_mib),
        total.disk_gib.div_ceil(node.disk_gib.max(1)),
    ]
    .into_iter()
    .max()
    .unwrap_or(0);
    #[allow(clippy::cast_precision_loss)] // ratios for a report
    let n = opts.requests as f64;
    let by_group = crate::broker::delta_by_group(&stored0, &stored1);
    #[allow(clippy::cast_precision_loss)]
    let stored_total = by_group.values().sum::<u64>() as f64;
    #[allow(clippy::cast_precision_loss)]
    Ok(PlaceResult {
        placed: recs.len(),
        secs,
        rate: n / secs,
        to_claim: (pct(&mut claim, 0.5), pct(&mut claim, 0.99)),
        to_active: (pct(&mut active, 0.5), pct(&mut active, 0.99)),
        stored: stored_total / n,
        stored_by_group: by_group
            .into_iter()
            .map(|(g, v)| (g, v as f64 / n))
            .collect(),
        messages: ((out1 - out0) + (in1 - in0)) as f64 / n,
        cpu: cpu / n,
        client_cpu: me / n,
        hosts: hosts.len(),
        lower_bound: usize::try_from(lb).unwrap_or(usize::MAX),
    })
}
