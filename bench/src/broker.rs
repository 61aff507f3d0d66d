//! What the broker did: CPU seconds of the nats-server processes, messages stored per stream,
//! and messages clients exchanged with it.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use async_nats::jetstream;
use futures::StreamExt;

/// CPU seconds (user + system) a process has used, from /proc.
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // the command name may hold spaces: fields start after the closing parenthesis
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // after ')': state is field 0, utime field 11, stime field 12
    #[allow(clippy::cast_precision_loss)] // seconds for a report
    let secs = (ticks(11) + ticks(12)) as f64 / 100.0;
    secs
}

/// Messages ever stored, per stream (last sequence).
pub async fn stored(js: &jetstream::Context) -> anyhow::Result<BTreeMap<String, u64>> {
    let mut out = BTreeMap::new();
    let mut streams = js.streams();
    while let Some(s) = streams.next().await {
        let s = s?;
        out.insert(s.config.name.clone(), s.state.last_sequence);
    }
    Ok(out)
}

/// Messages sent plus received by a set of clients.
pub fn client_messages(clients: &[async_nats::Client]) -> (u64, u64) {
    clients.iter().fold((0, 0), |(o, i), c| {
        let s = c.statistics();
        (
            o + s.out_messages.load(Ordering::Relaxed),
            i + s.in_messages.load(Ordering::Relaxed),
        )
    })
}

/// A group of stream names for reporting ("request records", "shard queues", ...).
pub fn group(stream: &str) -> &'static str {
    if stream == "KV_UPDRAFT_REQUESTS" {
        "request records"
    } else if stream.starts_with("UPDRAFT_REQ_") {
        "shard queues (hints)"
    } else if stream == "UPDRAFT_TIMERS" {
        "timers"
    } else if stream == "KV_UPDRAFT_NODES" {
        "adverts (leases)"
    } else if stream == "KV_UPDRAFT_CONFIG" {
        "config, flags, demand"
    } else if stream == "KV_UPDRAFT_CMDS" {
        "node commands"
    } else {
        "other"
    }
}

/// Stored messages per group between two snapshots.
pub fn delta_by_group(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> BTreeMap<&'static str, u64> {
    let mut m = BTreeMap::new();
    for (name, a) in after {
        let b = before.get(name).copied().unwrap_or(0);
        *m.entry(group(name)).or_insert(0) += a.saturating_sub(b);
    }
    m
}
