//! `updraft nodes|shards|capacity|status`: what the cluster looks like.

use std::time::Duration;

use clap::Subcommand;
use serde_json::Value;

use crate::client::{Api, CliError};
use crate::output;

/// Node commands.
#[derive(Debug, Subcommand)]
pub enum NodesCmd {
    /// List nodes with their capacity, use and state.
    List,
    /// Stop a node from pulling new work (what it runs stays).
    Cordon {
        /// Node id.
        id: String,
    },
    /// Let a cordoned or drained node pull again.
    Uncordon {
        /// Node id.
        id: String,
    },
    /// Cordon a node and let its in-flight builds finish.
    Drain {
        /// Node id.
        id: String,
        /// Wait until nothing is building on it.
        #[arg(long)]
        wait: bool,
    },
}

fn state_of(n: &Value) -> String {
    let state = n["advert"]["state"].as_str().unwrap_or("?").to_string();
    match n["advert"]["state_reason"].as_str() {
        Some(r) => format!("{state} ({r})"),
        None => state,
    }
}

/// Runs a nodes command.
pub async fn nodes(api: &Api, cmd: NodesCmd, json: bool) -> Result<(), CliError> {
    let (id, action, wait) = match cmd {
        NodesCmd::List => {
            let r = api.get("/v1/nodes").await?;
            if json {
                output::json(&r);
                return Ok(());
            }
            let mut items = r.as_array().cloned().unwrap_or_default();
            items.sort_by(|a, b| {
                a["advert"]["node"]
                    .as_str()
                    .cmp(&b["advert"]["node"].as_str())
            });
            let mut t = output::table(&[
                "NODE",
                "ZONE",
                "STATE",
                "VCPU USED",
                "MEMORY USED",
                "VMS",
                "BUILDING",
                "HEARTBEAT",
                "TRAITS",
            ]);
            for n in &items {
                let a = &n["advert"];
                t.add_row(vec![
                    a["node"].as_str().unwrap_or("").to_string(),
                    a["zone"].as_str().unwrap_or("").to_string(),
                    state_of(n),
                    output::used_of(&a["capacity"], &a["unallocated"], "vcpus"),
                    output::used_of(&a["capacity"], &a["unallocated"], "memory_mib"),
                    a["vms"].to_string(),
                    a["building"].to_string(),
                    format!("{:.1}s ago", n["heartbeat_age_s"].as_f64().unwrap_or(0.0)),
                    a["traits"]
                        .as_array()
                        .map(|t| {
                            t.iter()
                                .filter_map(Value::as_str)
                                .collect::<Vec<_>>()
                                .join(",")
                        })
                        .unwrap_or_default(),
                ]);
            }
            println!("{t}");
            println!("{} nodes", items.len());
            return Ok(());
        }
        NodesCmd::Cordon { id } => (id, "cordon", false),
        NodesCmd::Uncordon { id } => (id, "uncordon", false),
        NodesCmd::Drain { id, wait } => (id, "drain", wait),
    };
    let r = api
        .post(&format!("/v1/nodes/{id}/{action}"), &Value::Null)
        .await?;
    if wait {
        // the node reports `building` in its advert; drained = draining with nothing building
        loop {
            let all = api.get("/v1/nodes").await?;
            let n = all.as_array().and_then(|a| {
                a.iter()
                    .find(|n| n["advert"]["node"] == id.as_str())
                    .cloned()
            });
            let Some(n) = n else {
                return Err(CliError {
                    code: 3,
                    message: format!("node {id} is no longer advertised"),
                });
            };
            if n["advert"]["state"] == "draining" && n["advert"]["building"].as_u64() == Some(0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    if json {
        output::json(&r);
    } else {
        println!(
            "{id}: {action}{}",
            if wait {
                "ed (nothing building)"
            } else {
                " requested"
            }
        );
    }
    Ok(())
}

/// `updraft shards`.
pub async fn shards(api: &Api, all: bool, json: bool) -> Result<(), CliError> {
    let r = api.get("/v1/shards").await?;
    if json {
        output::json(&r);
        return Ok(());
    }
    let items = r.as_array().cloned().unwrap_or_default();
    let mut t = output::table(&[
        "SHARD",
        "WAITING",
        "OLDEST",
        "FIT PULLS",
        "SPILL PULLS",
        "IN FLIGHT",
        "REDELIVERED",
    ]);
    let mut shown = 0;
    for s in &items {
        let waiting =
            s["fit"]["pending"].as_u64().unwrap_or(0) + s["spill"]["pending"].as_u64().unwrap_or(0);
        let pulls = s["fit"]["waiting_pulls"].as_u64().unwrap_or(0)
            + s["spill"]["waiting_pulls"].as_u64().unwrap_or(0);
        if !all && waiting == 0 && pulls == 0 {
            continue;
        }
        shown += 1;
        let id = &s["shard"];
        t.add_row(vec![
            format!(
                "{}.{}.s{:02}.p{}",
                id["zone"].as_str().unwrap_or(""),
                id["tclass"].as_str().unwrap_or(""),
                id["size"].as_u64().unwrap_or(0),
                id["part"].as_u64().unwrap_or(0)
            ),
            waiting.to_string(),
            s["oldest_age_ms"]
                .as_u64()
                .map(|ms| placement::time::human_duration(Duration::from_millis(ms)))
                .unwrap_or_else(|| "-".into()),
            s["fit"]["waiting_pulls"].to_string(),
            s["spill"]["waiting_pulls"].to_string(),
            (s["fit"]["ack_pending"].as_u64().unwrap_or(0)
                + s["spill"]["ack_pending"].as_u64().unwrap_or(0))
            .to_string(),
            (s["fit"]["redelivered"].as_u64().unwrap_or(0)
                + s["spill"]["redelivered"].as_u64().unwrap_or(0))
            .to_string(),
        ]);
    }
    println!("{t}");
    println!(
        "{shown} of {} shards shown{}",
        items.len(),
        if all {
            ""
        } else {
            " (with work or waiting pulls; --all for every one)"
        }
    );
    Ok(())
}

/// `updraft capacity`.
pub async fn capacity(api: &Api, all: bool, json: bool) -> Result<(), CliError> {
    let r = api.get("/v1/capacity").await?;
    if json {
        output::json(&r);
        return Ok(());
    }
    let mut z = output::table(&["ZONE", "NODES", "TAKING WORK", "VCPU USED", "MEMORY USED"]);
    for (name, c) in r["zones"].as_object().cloned().unwrap_or_default() {
        z.add_row(vec![
            name,
            c["nodes"].to_string(),
            c["active"].to_string(),
            output::used_of(&c["capacity"], &c["unallocated"], "vcpus"),
            output::used_of(&c["capacity"], &c["unallocated"], "memory_mib"),
        ]);
    }
    println!("{z}");
    let mut t = output::table(&[
        "ZONE",
        "CLASS",
        "UP TO",
        "NODES THAT FIT",
        "SLOTS",
        "WAITING",
    ]);
    for c in r["classes"].as_array().cloned().unwrap_or_default() {
        let slots = c["slots"].as_u64().unwrap_or(0);
        let queued = c["queued"].as_u64().unwrap_or(0);
        if !all && slots == 0 && queued == 0 {
            continue;
        }
        t.add_row(vec![
            c["zone"].as_str().unwrap_or("").to_string(),
            format!(
                "{}.s{:02}",
                c["tclass"].as_str().unwrap_or(""),
                c["size"].as_u64().unwrap_or(0)
            ),
            c["bound"].as_str().unwrap_or("").to_string(),
            c["nodes_fitting"].to_string(),
            slots.to_string(),
            queued.to_string(),
        ]);
    }
    println!("{t}");
    Ok(())
}

fn ms(v: &Value) -> String {
    v.as_u64()
        .map(|m| format!("{m} ms"))
        .unwrap_or_else(|| "-".into())
}

/// `updraft status`.
pub async fn status(api: &Api, json: bool) -> Result<(), CliError> {
    let health = api.get("/healthz").await?;
    let stats = api.get("/v1/stats").await?;
    if json {
        output::json(&serde_json::json!({ "health": health, "stats": stats }));
        return Ok(());
    }
    println!("dispatcher   {}", api.base());
    println!(
        "nats         {}",
        if health["nats_connected"].as_bool().unwrap_or(false) {
            "connected"
        } else {
            "DISCONNECTED"
        }
    );
    println!(
        "view         {}",
        if health["caught_up"].as_bool().unwrap_or(false) {
            "caught up"
        } else {
            "catching up"
        }
    );
    println!("nodes        {}", health["nodes"]);
    let open: Vec<String> = stats["open"]
        .as_object()
        .map(|o| o.iter().map(|(k, v)| format!("{k} {v}")).collect())
        .unwrap_or_default();
    println!(
        "open         {}",
        if open.is_empty() {
            "none".to_string()
        } else {
            open.join(", ")
        }
    );
    println!(
        "placements   {:.1}/s over the last minute",
        stats["placement_rate"].as_f64().unwrap_or(0.0)
    );
    let l = |k: &str| {
        format!(
            "p50 {} · p95 {} · p99 {}",
            ms(&stats[k]["p50_ms"]),
            ms(&stats[k]["p95_ms"]),
            ms(&stats[k]["p99_ms"])
        )
    };
    println!("to claim     {}", l("to_claim"));
    println!("to active    {}", l("to_active"));
    let failures = stats["failures"].as_array().cloned().unwrap_or_default();
    if !failures.is_empty() {
        println!("recent failures:");
        for f in failures.iter().rev().take(5) {
            println!(
                "  {}: {}",
                f["id"].as_str().unwrap_or("?"),
                f["reason"].as_str().unwrap_or("")
            );
        }
    }
    Ok(())
}
