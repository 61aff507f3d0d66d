//! `updraft up`: a whole cluster on this machine with nothing installed but the workspace:
//! it starts its own `nats-server` (the embedded default), one or more dispatchers and a
//! handful of node-agents of different shapes (in-memory driver), submits a demo workload
//! with a progress bar, prints where to look, and tears everything down on Ctrl-C.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

use bus::server::{NatsServer, ServerOptions};
use clap::Args;
use serde_json::{Value, json};

use crate::client::{Api, CliError};
use crate::servers;

/// `up`'s options.
#[derive(Debug, Clone, Args)]
pub struct UpArgs {
    /// Compute nodes to start.
    #[arg(long, default_value_t = 8)]
    pub nodes: usize,
    /// Dispatchers to start (each on its own HTTP port, counting up from --http-port).
    #[arg(long, default_value_t = 1)]
    pub dispatchers: usize,
    /// HTTP port of the first dispatcher (API and status page).
    #[arg(long, default_value_t = 8080)]
    pub http_port: u16,
    /// Use this NATS instead of starting one (e.g. `nats://127.0.0.1:4222`).
    #[arg(long)]
    pub nats_url: Option<String>,
    /// Client port of the started nats-server (default: a free one).
    #[arg(long)]
    pub nats_port: Option<u16>,
    /// Keep state (NATS store, node identities, logs) here; default: a temporary directory
    /// removed on exit.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Servers in the demo workload (0 for none).
    #[arg(long, default_value_t = 200)]
    pub demo: usize,
    /// How long one in-memory build takes.
    #[arg(long, default_value = "2s")]
    pub build_time: String,
    /// Driver of the nodes: `memory` (in-memory VMs) or `libvirt` (real libvirt domains on
    /// `--libvirt-uri`; each node-agent process gets its own `test:///default` by default).
    #[arg(long, value_enum, default_value = "memory")]
    pub driver: UpDriver,
    /// libvirt connection of `--driver libvirt`.
    #[arg(long, default_value = "test:///default")]
    pub libvirt_uri: String,
    /// Exit once the demo workload has settled instead of running until Ctrl-C.
    #[arg(long)]
    pub exit_after_demo: bool,
}

/// Which driver the local cluster's nodes use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum UpDriver {
    /// In-memory VMs.
    Memory,
    /// libvirt domains.
    Libvirt,
}

/// Node shapes the local cluster cycles through: (vCPUs, memory GiB, disk GiB, traits, gpus).
const SHAPES: &[(u32, u64, u64, &str, u64)] = &[
    (16, 64, 1000, "", 0),
    (32, 128, 2000, "ssd", 0),
    (8, 32, 500, "", 0),
    (64, 256, 4000, "ssd", 0),
    (32, 256, 2000, "gpu", 4),
];

/// A child daemon; SIGTERM then kill on drop.
struct Daemon {
    name: String,
    child: Child,
}

impl Daemon {
    fn spawn(name: &str, binary: &Path, args: &[String], log: &Path) -> Result<Daemon, CliError> {
        let out = File::create(log)
            .map_err(|e| CliError::unavailable(format!("create {}: {e}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(|e| CliError::unavailable(e.to_string()))?;
        let child = Command::new(binary)
            .args(args)
            .env("UPDRAFT_LOG_FORMAT", "pretty")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| CliError::unavailable(format!("start {}: {e}", binary.display())))?;
        Ok(Daemon {
            name: name.to_string(),
            child,
        })
    }

    fn terminate(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The sibling binary `name` (next to this executable), with a hint when it is missing.
fn sibling(name: &str) -> Result<PathBuf, CliError> {
    let exe = std::env::current_exe().map_err(|e| CliError::unavailable(e.to_string()))?;
    let p = exe.with_file_name(name);
    if p.is_file() {
        Ok(p)
    } else {
        Err(CliError::unavailable(format!(
            "{} not found next to {}: build every binary (`cargo build --release --bins`)",
            name,
            exe.display()
        )))
    }
}

async fn wait_ready(
    api: &Api,
    nodes: usize,
    daemons: &mut [Daemon],
    logs: &Path,
) -> Result<(), CliError> {
    let start = Instant::now();
    loop {
        for d in daemons.iter_mut() {
            if let Some(status) = d.exited() {
                return Err(CliError::unavailable(format!(
                    "{} exited ({status}); see its log in {}",
                    d.name,
                    logs.display()
                )));
            }
        }
        if let Ok(h) = api.get("/healthz").await
            && h["caught_up"].as_bool() == Some(true)
            && h["nodes"].as_u64().unwrap_or(0) >= u64::try_from(nodes).unwrap_or(u64::MAX)
        {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(60) {
            return Err(CliError::unavailable(format!(
                "the cluster did not come up within 60 s; logs in {}",
                logs.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A mixed demo workload: mostly small general-purpose, some memory-heavy, a few GPU.
/// The demo: `n` servers of a mixed flavor set, sized to fit the local cluster of `nodes`
/// nodes (at most 70% of its memory and disk; flavors that would pass that fall back to
/// `m1.tiny`), with a GPU server now and then when a GPU node is up.
fn demo_workload(n: usize, nodes: usize) -> Vec<Value> {
    let flavors = [
        "m1.small",
        "m1.medium",
        "m1.small",
        "m1.large",
        "m1.tiny",
        "r1.large",
        "m1.medium",
        "m1.xlarge",
        "r1.xlarge",
        "m1.small",
    ];
    let catalog = placement::flavor::FlavorCatalog::default();
    let shapes = (0..nodes).map(|i| SHAPES[i % SHAPES.len()]);
    let (mut mem_left, mut disk_left) = shapes.clone().fold((0u64, 0u64), |(m, d), s| {
        (m + s.1 * 1024 * 7 / 10, d + s.2 * 7 / 10)
    });
    let gpu = shapes.clone().any(|s| s.4 > 0);
    let run = std::process::id();
    (0..n)
        .map(|i| {
            let mut flavor = if gpu && i % 50 == 49 {
                "g1.large"
            } else {
                flavors[i % flavors.len()]
            };
            let size = |f: &str| {
                catalog
                    .get(f)
                    .map(|f| (f.resources.memory_mib, f.resources.disk_gib))
                    .unwrap_or((0, 0))
            };
            let (m, d) = size(flavor);
            if m > mem_left || d > disk_left {
                flavor = "m1.tiny";
            }
            let (m, d) = size(flavor);
            mem_left = mem_left.saturating_sub(m);
            disk_left = disk_left.saturating_sub(d);
            json!({ "id": format!("demo-{run}-{i:05}"), "flavor": flavor, "metadata": { "demo": "true" } })
        })
        .collect()
}

/// Runs the local cluster until Ctrl-C (or until the demo settles with --exit-after-demo).
pub async fn run(args: UpArgs) -> Result<(), CliError> {
    if args.nodes == 0 || args.dispatchers == 0 {
        return Err(CliError::usage(
            "--nodes and --dispatchers must be at least 1",
        ));
    }
    let agent_bin = sibling("updraft-agent")?;
    let dispatcher_bin = sibling("updraft-dispatcher")?;
    let temp = tempfile::Builder::new()
        .prefix("updraft-up-")
        .tempdir()
        .map_err(|e| CliError::unavailable(e.to_string()))?;
    let data = args
        .data_dir
        .clone()
        .unwrap_or_else(|| temp.path().to_path_buf());
    let logs = data.join("logs");
    std::fs::create_dir_all(&logs)
        .map_err(|e| CliError::unavailable(format!("create {}: {e}", logs.display())))?;

    let mut nats = None;
    let url = match &args.nats_url {
        Some(u) => u.clone(),
        None => {
            let opts = ServerOptions {
                port: args.nats_port,
                store_dir: Some(data.join("nats")),
                ..ServerOptions::default()
            };
            let s = NatsServer::start(opts).map_err(|e| CliError::unavailable(e.to_string()))?;
            let u = s.url();
            nats = Some(s);
            u
        }
    };
    eprintln!(
        "nats-server     {url}{}",
        if nats.is_some() {
            " (started by updraft up)"
        } else {
            ""
        }
    );

    let mut daemons = Vec::new();
    let mut apis = Vec::new();
    for i in 0..args.dispatchers {
        let port = args
            .http_port
            .checked_add(u16::try_from(i).unwrap_or(u16::MAX))
            .ok_or_else(|| CliError::usage("--http-port too high"))?;
        let set = vec![
            format!("--set=nats.url={url}"),
            format!("--set=http_listen=127.0.0.1:{port}"),
        ];
        daemons.push(Daemon::spawn(
            &format!("dispatcher-{i}"),
            &dispatcher_bin,
            &set,
            &logs.join(format!("dispatcher-{i}.log")),
        )?);
        apis.push(format!("http://127.0.0.1:{port}"));
    }
    for i in 0..args.nodes {
        let (vcpus, mem_gib, disk, traits, gpus) = SHAPES[i % SHAPES.len()];
        let node = format!("node-{i:03}");
        let state = data.join("agents").join(&node);
        std::fs::create_dir_all(&state)
            .map_err(|e| CliError::unavailable(format!("create {}: {e}", state.display())))?;
        let mut set = vec![
            format!("--set=node_id={node}"),
            format!("--set=state_dir={}", state.display()),
            format!("--set=nats.url={url}"),
            format!("--set=capacity.vcpus={vcpus}"),
            format!("--set=capacity.memory_mib={}", mem_gib * 1024),
            format!("--set=capacity.disk_gib={disk}"),
        ];
        match args.driver {
            UpDriver::Memory => set.extend([
                "--set=driver.kind=memory".to_string(),
                "--set=driver.memory.build_jitter=1s".to_string(),
                format!("--set=driver.memory.build_time={}", args.build_time),
            ]),
            UpDriver::Libvirt => set.extend([
                "--set=driver.kind=libvirt".to_string(),
                format!("--set=driver.libvirt.uri={}", args.libvirt_uri),
                format!(
                    "--set=driver.libvirt.instances_dir={}",
                    state.join("instances").display()
                ),
                format!(
                    "--set=driver.libvirt.console_dir={}",
                    state.join("console").display()
                ),
                "--set=driver.libvirt.network=none".to_string(),
            ]),
        }
        if !traits.is_empty() {
            set.push(format!("--set=traits=[\"{traits}\"]"));
        }
        if gpus > 0 {
            set.push(format!("--set=capacity.extended.gpu={gpus}"));
        }
        daemons.push(Daemon::spawn(
            &node,
            &agent_bin,
            &set,
            &logs.join(format!("{node}.log")),
        )?);
    }

    let api = Api::new(&apis[0], None);
    let shutdown = common::signal::shutdown();
    tokio::pin!(shutdown);
    let ready = tokio::select! {
        r = wait_ready(&api, args.nodes, &mut daemons, &logs) => r,
        () = &mut shutdown => Err(CliError { code: 130, message: "interrupted".into() }),
    };
    let result = match ready {
        Ok(()) => {
            eprintln!("dispatcher API  {}", apis.join(", "));
            eprintln!("status page     {}/", apis[0]);
            eprintln!("metrics         {}/metrics", apis[0]);
            eprintln!("logs            {}", logs.display());
            eprintln!(
                "{} nodes up; try: updraft nodes list · updraft servers create --flavor m1.small --wait · updraft capacity",
                args.nodes
            );
            let demo = async {
                if args.demo == 0 {
                    return Ok(());
                }
                let started = Instant::now();
                let records =
                    servers::create_many(&api, demo_workload(args.demo, args.nodes), false).await?;
                let ids: Vec<String> = records
                    .iter()
                    .filter_map(|r| r["spec"]["id"].as_str().map(ToString::to_string))
                    .collect();
                servers::wait_settled(&api, &ids, false).await?;
                eprintln!(
                    "demo: {} servers placed and built in {:.1} s; `updraft servers list` shows them",
                    ids.len(),
                    started.elapsed().as_secs_f64()
                );
                Ok::<(), CliError>(())
            };
            tokio::select! {
                r = demo => match r {
                    Ok(()) if args.exit_after_demo => Ok(()),
                    Ok(()) => {
                        eprintln!("running; Ctrl-C stops the cluster");
                        (&mut shutdown).await;
                        Ok(())
                    }
                    Err(e) => Err(e),
                },
                () = &mut shutdown => Ok(()),
            }
        }
        Err(e) => Err(e),
    };

    eprintln!("stopping: agents hand back their work, then the dispatchers and nats-server stop");
    for d in daemons.iter_mut().rev() {
        d.terminate();
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline && daemons.iter_mut().any(|d| d.exited().is_none()) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(daemons);
    if let Some(mut s) = nats {
        s.stop();
    }
    if args.data_dir.is_some() {
        eprintln!("state kept in {}", data.display());
    }
    result
}
