//! `updraft servers ...`: create (from flags, a flavor, a JSON/YAML file, or a trace), get,
//! list, delete, watch, explain, plan.

use std::io::BufRead;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Map, Value, json};

use crate::client::{Api, CliError};
use crate::output;

/// Servers per batch call.
const BATCH: usize = 500;

/// Server commands.
#[derive(Debug, Subcommand)]
pub enum ServersCmd {
    /// Create servers from flags, a flavor, a JSON/YAML file, or a trace.
    Create(CreateArgs),
    /// Show one server.
    Get {
        /// Request id.
        id: String,
    },
    /// List servers (open ones and recently finished).
    List {
        /// Only this state (queued, claimed, building, active, failed, host_down, deleting, deleted).
        #[arg(long)]
        state: Option<String>,
        /// Only those held by this node.
        #[arg(long)]
        node: Option<String>,
        /// Only this zone.
        #[arg(long)]
        zone: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Delete a server (its node destroys the VM).
    Delete {
        /// Request id.
        id: String,
        /// Finish the delete of a VM whose host is down.
        #[arg(long)]
        force: bool,
        /// Wait until it is gone.
        #[arg(long)]
        wait: bool,
    },
    /// Follow a server's state until it settles.
    Watch {
        /// Request id.
        id: String,
    },
    /// Why a server is pending or failed, or where it is.
    Explain {
        /// Request id.
        id: String,
    },
    /// Dry run: would this fit now, where could it go, what blocks it.
    Plan(SpecArgs),
}

/// What one server asks for.
#[derive(Debug, Clone, Args, Default)]
pub struct SpecArgs {
    /// Request id (for idempotent retries; a UUID is generated when absent).
    #[arg(long)]
    pub id: Option<String>,
    /// A flavor name (`m1.small`); or give --vcpus and --memory-mib.
    #[arg(long)]
    pub flavor: Option<String>,
    /// vCPUs.
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// Memory in MiB.
    #[arg(long)]
    pub memory_mib: Option<u64>,
    /// Root disk in GiB.
    #[arg(long)]
    pub disk_gib: Option<u64>,
    /// An extended resource, `name=amount` (repeatable).
    #[arg(long = "extended", value_name = "NAME=AMOUNT")]
    pub extended: Vec<String>,
    /// Zone (default: the cluster's default zone).
    #[arg(long)]
    pub zone: Option<String>,
    /// A trait the node must have (repeatable).
    #[arg(long = "require", value_name = "TRAIT")]
    pub required_traits: Vec<String>,
    /// A trait the node must not have (repeatable).
    #[arg(long = "forbid", value_name = "TRAIT")]
    pub forbidden_traits: Vec<String>,
    /// Server group name.
    #[arg(long)]
    pub group: Option<String>,
    /// Server group policy: affinity or anti-affinity.
    #[arg(long, default_value = "anti-affinity")]
    pub group_policy: String,
    /// Image reference.
    #[arg(long)]
    pub image: Option<String>,
    /// Metadata, `key=value` (repeatable).
    #[arg(long = "meta", value_name = "KEY=VALUE")]
    pub metadata: Vec<String>,
    /// Seconds it may wait for a node before failing.
    #[arg(long)]
    pub deadline_s: Option<u64>,
}

/// Create's arguments.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The server.
    #[command(flatten)]
    pub spec: SpecArgs,
    /// Create from a JSON or YAML file: one server, a list, or `{"servers": [...]}`.
    #[arg(long, short = 'f', conflicts_with = "from_trace")]
    pub file: Option<PathBuf>,
    /// Create one server per line of a trace (the Azure CSV or the simple format).
    #[arg(long)]
    pub from_trace: Option<PathBuf>,
    /// At most this many servers from the trace.
    #[arg(long)]
    pub limit: Option<usize>,
    /// This many copies of the flags' server (ids get a `-N` suffix).
    #[arg(long, default_value_t = 1)]
    pub count: usize,
    /// Wait until every server is active (or failed).
    #[arg(long)]
    pub wait: bool,
}

fn kv(list: &[String], what: &str) -> Result<Vec<(String, String)>, CliError> {
    list.iter()
        .map(|s| {
            s.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| CliError::usage(format!("{what} `{s}`: expected key=value")))
        })
        .collect()
}

impl SpecArgs {
    /// The API body for these flags.
    pub fn body(&self) -> Result<Value, CliError> {
        let mut m = Map::new();
        if let Some(id) = &self.id {
            m.insert("id".into(), json!(id));
        }
        match (&self.flavor, self.vcpus, self.memory_mib) {
            (Some(f), None, None) => {
                m.insert("flavor".into(), json!(f));
            }
            (None, Some(v), Some(mem)) => {
                let mut r = json!({ "vcpus": v, "memory_mib": mem, "disk_gib": self.disk_gib.unwrap_or(0) });
                let ext: Map<String, Value> = kv(&self.extended, "--extended")?
                    .into_iter()
                    .map(|(k, v)| {
                        v.parse::<u64>()
                            .map(|n| (k, json!(n)))
                            .map_err(|_| CliError::usage(format!("--extended {v}: not a number")))
                    })
                    .collect::<Result<_, _>>()?;
                if !ext.is_empty() {
                    r["extended"] = Value::Object(ext);
                }
                m.insert("resources".into(), r);
            }
            (None, None, None) => {
                return Err(CliError::usage(
                    "give --flavor, or --vcpus and --memory-mib (or -f FILE)",
                ));
            }
            _ => {
                return Err(CliError::usage(
                    "give either --flavor or both --vcpus and --memory-mib",
                ));
            }
        }
        if let Some(z) = &self.zone {
            m.insert("zone".into(), json!(z));
        }
        if !self.required_traits.is_empty() {
            m.insert("required_traits".into(), json!(self.required_traits));
        }
        if !self.forbidden_traits.is_empty() {
            m.insert("forbidden_traits".into(), json!(self.forbidden_traits));
        }
        if let Some(g) = &self.group {
            m.insert(
                "server_group".into(),
                json!({ "name": g, "policy": self.group_policy }),
            );
        }
        if let Some(i) = &self.image {
            m.insert("image".into(), json!(i));
        }
        let md: Map<String, Value> = kv(&self.metadata, "--meta")?
            .into_iter()
            .map(|(k, v)| (k, json!(v)))
            .collect();
        if !md.is_empty() {
            m.insert("metadata".into(), Value::Object(md));
        }
        if let Some(d) = self.deadline_s {
            m.insert("deadline_s".into(), json!(d));
        }
        Ok(Value::Object(m))
    }
}

/// Reads servers from a JSON or YAML file.
fn from_file(path: &PathBuf) -> Result<Vec<Value>, CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::usage(format!("read {}: {e}", path.display())))?;
    let yaml = path.extension().is_some_and(|e| e == "yaml" || e == "yml");
    let v: Value = if yaml {
        serde_yaml_ng::from_str(&text)
            .map_err(|e| CliError::usage(format!("{}: {e}", path.display())))?
    } else {
        serde_json::from_str(&text)
            .map_err(|e| CliError::usage(format!("{}: {e}", path.display())))?
    };
    Ok(match v {
        Value::Array(a) => a,
        Value::Object(ref o) if o.contains_key("servers") => {
            v["servers"].as_array().cloned().unwrap_or_default()
        }
        other => vec![other],
    })
}

/// Reads servers from a trace (one per line, sizes only).
fn from_trace(path: &PathBuf, limit: Option<usize>) -> Result<Vec<Value>, CliError> {
    let f = std::fs::File::open(path)
        .map_err(|e| CliError::usage(format!("open {}: {e}", path.display())))?;
    let mut lines = std::io::BufReader::new(f).lines();
    let mut out = Vec::new();
    let Some(first) = lines.next() else {
        return Ok(out);
    };
    let first = first.map_err(|e| CliError::usage(e.to_string()))?;
    let format = placement::trace::TraceFormat::detect(&first);
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("trace")
        .to_ascii_lowercase()
        .replace(|c: char| !c.is_ascii_alphanumeric(), "-");
    let all = std::iter::once(Ok(first)).chain(lines);
    for (i, line) in all.enumerate() {
        if limit.is_some_and(|l| out.len() >= l) {
            break;
        }
        let line = line.map_err(|e| CliError::usage(e.to_string()))?;
        if let Some(row) = format
            .parse(i + 1, &line)
            .map_err(|e| CliError::usage(format!("{}: {e}", path.display())))?
        {
            out.push(json!({
                "id": format!("{stem}-{:07}", i + 1),
                "resources": { "vcpus": row.vcpus, "memory_mib": row.memory_mib, "disk_gib": row.disk_gib },
            }));
        }
    }
    Ok(out)
}

fn bar(n: usize, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(u64::try_from(n).unwrap_or(u64::MAX));
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "{{spinner}} {what} [{{bar:30}}] {{pos}}/{{len}} {{per_sec}} {{msg}}"
        ))
        .expect("static template"),
    );
    pb
}

/// Creates many servers through the batch API with a progress bar; returns the records.
pub async fn create_many(
    api: &Api,
    servers: Vec<Value>,
    quiet: bool,
) -> Result<Vec<Value>, CliError> {
    let pb = if quiet {
        ProgressBar::hidden()
    } else {
        bar(servers.len(), "creating")
    };
    let mut records = Vec::new();
    let mut errors = Vec::new();
    for chunk in servers.chunks(BATCH) {
        let resp = api
            .post("/v1/servers/batch", &json!({ "servers": chunk }))
            .await?;
        for item in resp["items"].as_array().cloned().unwrap_or_default() {
            match item["record"].clone() {
                Value::Null => errors.push(format!(
                    "{}: {}",
                    item["id"].as_str().unwrap_or("?"),
                    item["error"]["message"].as_str().unwrap_or("failed")
                )),
                r if item["status"].as_u64().unwrap_or(0) >= 400 => {
                    errors.push(format!(
                        "{}: {}",
                        item["id"].as_str().unwrap_or("?"),
                        item["error"]["message"].as_str().unwrap_or("failed")
                    ));
                    records.push(r);
                }
                r => records.push(r),
            }
        }
        pb.inc(u64::try_from(chunk.len()).unwrap_or(0));
    }
    pb.finish_and_clear();
    if !errors.is_empty() {
        for e in errors.iter().take(10) {
            eprintln!("error: {e}");
        }
        return Err(CliError {
            code: 1,
            message: format!("{} of {} servers were refused", errors.len(), servers.len()),
        });
    }
    Ok(records)
}

/// Waits until every id is active or terminal, with a progress bar; errors if any failed.
pub async fn wait_settled(api: &Api, ids: &[String], quiet: bool) -> Result<(), CliError> {
    let pb = if quiet {
        ProgressBar::hidden()
    } else {
        bar(ids.len(), "placing")
    };
    let mut pending: Vec<String> = ids.to_vec();
    let mut failed = Vec::new();
    while !pending.is_empty() {
        let mut still = Vec::new();
        for id in &pending {
            let r = api.get(&format!("/v1/servers/{id}")).await?;
            match r["state"].as_str().unwrap_or("") {
                "active" | "deleted" | "host_down" => pb.inc(1),
                "failed" => {
                    pb.inc(1);
                    failed.push(format!("{id}: {}", r["reason"].as_str().unwrap_or("")));
                }
                _ => still.push(id.clone()),
            }
        }
        pending = still;
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    pb.finish_and_clear();
    if failed.is_empty() {
        Ok(())
    } else {
        for f in failed.iter().take(10) {
            eprintln!("failed: {f}");
        }
        Err(CliError {
            code: 5,
            message: format!("{} of {} servers failed", failed.len(), ids.len()),
        })
    }
}

fn print_records(records: &[Value]) {
    let mut t = output::table(&["ID", "STATE", "SIZE", "NODE", "ATTEMPT", "AGE", "REASON"]);
    for r in records {
        t.add_row(vec![
            r["spec"]["id"].as_str().unwrap_or("").to_string(),
            r["state"].as_str().unwrap_or("").to_string(),
            r["spec"]["flavor"]
                .as_str()
                .map(ToString::to_string)
                .unwrap_or_else(|| output::resources(&r["spec"]["resources"])),
            r["claim"]["node"].as_str().unwrap_or("-").to_string(),
            r["attempt"].to_string(),
            output::age(&r["created_at"]),
            r["reason"]
                .as_str()
                .unwrap_or("")
                .chars()
                .take(80)
                .collect(),
        ]);
    }
    println!("{t}");
}

/// Runs a servers command.
pub async fn run(api: &Api, cmd: ServersCmd, json: bool) -> Result<(), CliError> {
    match cmd {
        ServersCmd::Create(args) => {
            let servers = if let Some(f) = &args.file {
                from_file(f)?
            } else if let Some(t) = &args.from_trace {
                from_trace(t, args.limit)?
            } else {
                let body = args.spec.body()?;
                if args.count <= 1 {
                    vec![body]
                } else {
                    (0..args.count)
                        .map(|i| {
                            let mut b = body.clone();
                            if let Some(id) = args.spec.id.as_ref() {
                                b["id"] = json!(format!("{id}-{i}"));
                            }
                            b
                        })
                        .collect()
                }
            };
            if servers.is_empty() {
                return Err(CliError::usage("nothing to create"));
            }
            let records = if servers.len() == 1 {
                let r = api.post("/v1/servers", &servers[0]).await?;
                vec![r["record"].clone()]
            } else {
                create_many(api, servers, json).await?
            };
            let ids: Vec<String> = records
                .iter()
                .filter_map(|r| r["spec"]["id"].as_str().map(ToString::to_string))
                .collect();
            if args.wait {
                wait_settled(api, &ids, json).await?;
            }
            if json {
                output::json(&Value::Array(records));
            } else if records.len() == 1 {
                println!("{} {}", ids[0], records[0]["state"].as_str().unwrap_or(""));
            } else {
                println!("created {} servers", records.len());
            }
            Ok(())
        }
        ServersCmd::Get { id } => {
            let r = api.get(&format!("/v1/servers/{id}")).await?;
            if json {
                output::json(&r);
            } else {
                print_records(std::slice::from_ref(&r));
                for h in r["history"].as_array().cloned().unwrap_or_default() {
                    println!(
                        "  {} {} -> {}{}{}",
                        output::age(&h["at"]),
                        h["from"].as_str().unwrap_or(""),
                        h["to"].as_str().unwrap_or(""),
                        h["node"]
                            .as_str()
                            .map(|n| format!(" on {n}"))
                            .unwrap_or_default(),
                        h["reason"]
                            .as_str()
                            .map(|r| format!(": {r}"))
                            .unwrap_or_default()
                    );
                }
            }
            Ok(())
        }
        ServersCmd::List {
            state,
            node,
            zone,
            limit,
        } => {
            let mut q = vec![format!("limit={limit}")];
            q.extend(state.map(|s| format!("state={s}")));
            q.extend(node.map(|n| format!("node={n}")));
            q.extend(zone.map(|z| format!("zone={z}")));
            let r = api.get(&format!("/v1/servers?{}", q.join("&"))).await?;
            if json {
                output::json(&r);
            } else {
                print_records(r["items"].as_array().map(Vec::as_slice).unwrap_or(&[]));
                if r["truncated"].as_bool().unwrap_or(false) {
                    println!("(more match; raise --limit)");
                }
            }
            Ok(())
        }
        ServersCmd::Delete { id, force, wait } => {
            let path = if force {
                format!("/v1/servers/{id}?force=true")
            } else {
                format!("/v1/servers/{id}")
            };
            let r = api.delete(&path).await?;
            if wait {
                loop {
                    let now = api.get(&format!("/v1/servers/{id}")).await?;
                    if now["state"] == "deleted" {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
            if json {
                output::json(&r);
            } else {
                println!(
                    "{id} {}",
                    if wait {
                        "deleted"
                    } else {
                        r["state"].as_str().unwrap_or("")
                    }
                );
            }
            Ok(())
        }
        ServersCmd::Watch { id } => {
            let mut after = 0;
            let mut last = String::new();
            loop {
                let r = api
                    .get(&format!(
                        "/v1/servers/{id}/watch?after={after}&timeout_s=30"
                    ))
                    .await?;
                after = r["revision"].as_u64().unwrap_or(after);
                let rec = &r["value"];
                let state = rec["state"].as_str().unwrap_or("").to_string();
                if state != last {
                    if json {
                        println!("{}", serde_json::to_string(rec).unwrap_or_default());
                    } else {
                        let node = rec["claim"]["node"]
                            .as_str()
                            .map(|n| format!(" on {n}"))
                            .unwrap_or_default();
                        let why = rec["reason"]
                            .as_str()
                            .map(|r| format!(" ({r})"))
                            .unwrap_or_default();
                        println!("{id}: {state}{node}{why}");
                    }
                    last = state.clone();
                }
                match state.as_str() {
                    "active" | "deleted" => return Ok(()),
                    "failed" => {
                        return Err(CliError {
                            code: 5,
                            message: format!("{id} failed"),
                        });
                    }
                    _ => {}
                }
            }
        }
        ServersCmd::Explain { id } => {
            let r = api.get(&format!("/v1/servers/{id}/explain")).await?;
            if json {
                output::json(&r);
            } else {
                println!("{}", r["summary"].as_str().unwrap_or(""));
                if let Some(ex) = r["excluded"].as_array().filter(|a| !a.is_empty()) {
                    println!(
                        "excluded after failed attempts: {}",
                        ex.iter()
                            .filter_map(Value::as_str)
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
            }
            Ok(())
        }
        ServersCmd::Plan(spec) => {
            let r = api.post("/v1/servers/plan", &spec.body()?).await?;
            if json {
                output::json(&r);
            } else {
                let e = &r["explanation"];
                println!(
                    "shard: {}.{}.s{:02}.p{}",
                    r["shard"]["zone"].as_str().unwrap_or(""),
                    r["shard"]["tclass"].as_str().unwrap_or(""),
                    r["shard"]["size"].as_u64().unwrap_or(0),
                    r["shard"]["part"].as_u64().unwrap_or(0)
                );
                println!(
                    "would fit now: {}",
                    if r["fits_now"].as_bool().unwrap_or(false) {
                        "yes"
                    } else {
                        "no"
                    }
                );
                println!("{}", e["summary"].as_str().unwrap_or(""));
                if let Some(c) = e["candidates"].as_array().filter(|c| !c.is_empty()) {
                    println!(
                        "nodes that could take it now: {}",
                        c.iter()
                            .filter_map(Value::as_str)
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
                if !r["admissible"].as_bool().unwrap_or(false) {
                    return Err(CliError {
                        code: 1,
                        message: "no node could ever hold it".into(),
                    });
                }
            }
            Ok(())
        }
    }
}
