//! `updraft-bench`: updraft's NATS path, measured in one run. Places N requests on K
//! in-process agents through real nats-server(s) and reports placements per second, latency,
//! what each placement costs the broker, idle load per 1,000 agents, packing quality, and the
//! raw JetStream work-queue rate of the same broker as the denominator. Results go to stdout
//! as the markdown BENCHMARKS.md holds.

mod broker;
mod cluster;
mod fanout;
mod libvirt;
mod place;
mod raw;

use std::time::Duration;

use clap::Parser;
use placement::Resources;

use crate::cluster::{Cluster, Tuning};
use crate::place::{PlaceOpts, PlaceResult};

/// Benchmarks of the NATS path.
#[derive(Debug, Parser)]
#[command(about)]
struct Cli {
    /// Requests in the throughput run.
    #[arg(long, default_value_t = 20_000)]
    requests: usize,
    /// Agents in the throughput run.
    #[arg(long, default_value_t = 10)]
    agents: usize,
    /// Creates in flight at once in the throughput run.
    #[arg(long, default_value_t = 512)]
    concurrency: usize,
    /// Rate of the latency run (requests per second) and its length in seconds.
    #[arg(long, default_value_t = 2000.0)]
    rate: f64,
    /// Length of the latency run, seconds.
    #[arg(long, default_value_t = 10)]
    rate_secs: u64,
    /// Agents of the scaling run (cost per placement at K agents vs the throughput run's).
    #[arg(long, default_value_t = 1000)]
    scale_agents: usize,
    /// Requests of the scaling runs.
    #[arg(long, default_value_t = 10_000)]
    scale_requests: usize,
    /// Seconds of the idle measurement.
    #[arg(long, default_value_t = 20)]
    idle_secs: u64,
    /// Flag keys written (or deleted) per second in the fan-out run.
    #[arg(long, default_value_t = 200.0)]
    fanout_rate: f64,
    /// Length of each window of the fan-out run, seconds (at least two pull lifetimes, so
    /// that each window holds as many of the idle agents' pull re-issues).
    #[arg(long, default_value_t = 60)]
    fanout_secs: u64,
    /// Skip the 3-server R3 runs.
    #[arg(long)]
    no_cluster: bool,
    /// Only this run (repeatable): for profiling one of them.
    #[arg(long, value_enum)]
    only: Vec<Run>,
    /// Only the throughput run, with these pull settings (experiments): per-class pulls.
    #[arg(long)]
    per_class: Option<usize>,
    /// Experiments: tiers empty nodes open in.
    #[arg(long)]
    open_tiers: Option<u8>,
    /// Experiments: the dispatcher's spill deadline, ms.
    #[arg(long)]
    spill_ms: Option<u64>,
    /// Experiments: the dispatcher's sweep period, ms.
    #[arg(long)]
    sweep_ms: Option<u64>,
    /// The idle run's pull expiry, seconds (default: the agents' default): what outstanding
    /// pulls cost an idle broker.
    #[arg(long)]
    idle_pull_expiry_s: Option<u64>,
    /// Only the libvirt run: boot this many real guests on qemu:///system, one after another.
    #[arg(long)]
    libvirt_guests: Option<usize>,
    /// The test guest for the libvirt run (default: the setup script's `.tools/guest`).
    #[arg(long)]
    guest_dir: Option<std::path::PathBuf>,
}

/// The runs of a bench.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Run {
    /// As fast as accepted, with the raw work-queue rate.
    Throughput,
    /// At `--rate` for `--rate-secs`.
    Rate,
    /// Cost per placement at K=10 and K=`--scale-agents`.
    Scale,
    /// Idle load of `--scale-agents` agents.
    Idle,
    /// The throughput run on a 3-server R3 cluster.
    Cluster,
    /// What a backlog flag message costs the broker: `--scale-agents` idle agents watching
    /// their flag keys while one class's keys are written at `--fanout-rate`.
    Fanout,
}

impl Cli {
    fn runs(&self, run: Run) -> bool {
        (self.only.is_empty() || self.only.contains(&run))
            && !(run == Run::Cluster && self.no_cluster)
    }
}

fn pct(v: &[u64], q: f64) -> u64 {
    let mut s = v.to_vec();
    s.sort_unstable();
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )] // an index into a short list
    let i = ((s.len() as f64 - 1.0) * q).round() as usize;
    s.get(i).copied().unwrap_or(0)
}

async fn libvirt_run(guests: usize, dir: std::path::PathBuf) -> anyhow::Result<()> {
    let r = libvirt::run(guests, &dir).await?;
    println!(
        "| run | domain type | claim → first serial line p50 / max (ms) | claim → init marker p50 / max (ms) | agent RSS / PSS / anonymous, 0 guests | same, {guests} guests |"
    );
    println!("|---|---|---|---|---|---|");
    #[allow(clippy::cast_precision_loss)] // KiB for a report
    let m = |v: &libvirt::Mem| {
        format!(
            "{:.1} / {:.1} / {:.1} MiB",
            v.rss as f64 / 1024.0,
            v.pss as f64 / 1024.0,
            v.anon as f64 / 1024.0
        )
    };
    println!(
        "| {guests} guests, one after another | {} | {} / {} | {} / {} | {} | {} |",
        r.domain_type,
        pct(&r.first_line_ms, 0.5),
        pct(&r.first_line_ms, 1.0),
        pct(&r.marker_ms, 0.5),
        pct(&r.marker_ms, 1.0),
        m(&r.idle),
        m(&r.busy)
    );
    Ok(())
}

fn row(name: &str, r: &PlaceResult) -> String {
    format!(
        "| {name} | {:.0} | {} / {} | {} / {} | {:.2} | {:.1} | {:.3} | {:.3} | {} / {} |",
        r.rate,
        r.to_claim.0,
        r.to_claim.1,
        r.to_active.0,
        r.to_active.1,
        r.stored,
        r.messages,
        r.cpu * 1000.0,
        r.client_cpu * 1000.0,
        r.hosts,
        r.lower_bound
    )
}

/// One placement run on a fresh single-server cluster of `agents` agents of size `node`.
async fn place_on(
    agents: usize,
    node: &Resources,
    tuning: &Tuning,
    opts: &PlaceOpts,
) -> anyhow::Result<PlaceResult> {
    let c = Cluster::start_with(false, agents, node.clone(), tuning).await?;
    let r = place::run(&c, node, opts).await;
    c.stop().await;
    r
}

async fn throughput(
    cluster_mode: bool,
    agents: usize,
    node: &Resources,
    opts: &PlaceOpts,
) -> anyhow::Result<(PlaceResult, f64)> {
    let c = Cluster::start(cluster_mode, agents, node.clone()).await?;
    let r = place::run(&c, node, opts).await?;
    let raw = raw::rate(
        &c.broker.url(),
        c.broker.replicas(),
        opts.requests.min(20_000),
        agents,
    )
    .await?;
    c.stop().await;
    Ok((r, raw))
}

async fn idle(
    agents: usize,
    secs: u64,
    node: &Resources,
    tuning: &Tuning,
) -> anyhow::Result<(f64, f64)> {
    let c = Cluster::start_with(false, agents, node.clone(), tuning).await?;
    // let joins and the first plans settle
    tokio::time::sleep(Duration::from_secs(5)).await;
    let clients = c.clients();
    let cpu0 = c.broker.cpu();
    let (o0, i0) = broker::client_messages(&clients);
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let cpu = c.broker.cpu() - cpu0;
    let (o1, i1) = broker::client_messages(&clients);
    c.stop().await;
    #[allow(clippy::cast_precision_loss)] // rates for a report
    let per_k = 1000.0 / agents as f64;
    #[allow(clippy::cast_precision_loss)]
    let msgs = ((o1 - o0) + (i1 - i0)) as f64 / secs as f64;
    #[allow(clippy::cast_precision_loss)]
    let cpu_share = cpu / secs as f64;
    Ok((cpu_share * per_k, msgs * per_k))
}

/// One line of the fan-out run's report: `how` the messages went, and what a node's join
/// (`fanout::FanoutResult::joins`) is there.
fn fanout_note(how: &str, join: &str, agents: usize, f: &fanout::FanoutResult) -> String {
    #[allow(clippy::cast_precision_loss)] // rates for a report
    let per_s = |v: u64| v as f64 / f.secs;
    let write = if f.unwatched.is_some() {
        format!("; a write nobody watches {:.0} µs", f.broker_us_per_write())
    } else {
        String::new()
    };
    let joins = f.joins.map_or(String::new(), |(n, _)| {
        format!(
            "; {join} {:.0} µs ({:.0}/s)",
            f.broker_us_per_join(),
            per_s(n)
        )
    });
    format!(
        "flag fan-out over {how}, {agents} watchers, 1 in 8 watching each key: {:.0} writes/s, {:.0} messages/s delivered ({:.0} expected); broker CPU {:.1} µs per delivered message net of idle load and of the writes{write}{joins} (the broker at {:.0} % of a core); watchers {:.1} µs per message",
        per_s(f.writes),
        per_s(f.deliveries),
        per_s(f.expected),
        f.broker_us_per_delivery(),
        100.0 * f.broker_busy_share(),
        f.clients_us_per_delivery(),
    )
}

async fn main_async(cli: Cli) -> anyhow::Result<()> {
    if let Some(g) = cli.libvirt_guests {
        let dir = cli
            .guest_dir
            .clone()
            .unwrap_or_else(libvirt::default_guest_dir);
        return libvirt_run(g, dir).await;
    }
    // hosts that could each hold a whole run: capacity never limits a run (and never makes
    // requests wait for another tier of empty hosts to open), and the hosts a run uses show
    // how pack concentrates a burst (against the bin-packing lower bound)
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // a request count
    let rate_requests = (cli.rate * cli.rate_secs as f64) as usize;
    let n =
        u32::try_from(cli.requests.max(cli.scale_requests).max(rate_requests)).unwrap_or(u32::MAX);
    let per_request = Resources::new(2, 2048, 20); // m1.small, the mix's largest common shape
    let node = Resources::new(
        per_request.vcpus * n,
        per_request.memory_mib * u64::from(n),
        per_request.disk_gib * u64::from(n),
    );
    let mut lines = vec![
        "| run | placements/s | submit→claimed p50 / p99 (ms) | submit→active p50 / p99 (ms) | stored writes / placement | NATS messages / placement | broker CPU ms / placement | dispatcher + agents CPU ms / placement | hosts used / lower bound |".to_string(),
        "|---|---|---|---|---|---|---|---|---|".to_string(),
    ];
    let mut notes = Vec::new();
    let opts = PlaceOpts {
        requests: cli.requests,
        concurrency: cli.concurrency,
        rate: None,
        prefix: "t".into(),
    };
    let rate_opts = PlaceOpts {
        requests: rate_requests,
        concurrency: cli.concurrency,
        rate: Some(cli.rate),
        prefix: "r".into(),
    };
    if cli.per_class.is_some()
        || cli.open_tiers.is_some()
        || cli.spill_ms.is_some()
        || cli.sweep_ms.is_some()
    {
        let mut t = Tuning::default();
        t.pull.per_class = cli.per_class.unwrap_or(t.pull.per_class);
        t.pull.open_tiers = cli.open_tiers.unwrap_or(t.pull.open_tiers);
        t.spill_after = cli.spill_ms.map(Duration::from_millis);
        t.sweep_interval = cli.sweep_ms.map(Duration::from_millis);
        let name = format!(
            "experiment per_class={} open_tiers={} spill_ms={} sweep_ms={}",
            t.pull.per_class,
            t.pull.open_tiers,
            cli.spill_ms.map_or("default".into(), |v| v.to_string()),
            cli.sweep_ms.map_or("default".into(), |v| v.to_string()),
        );
        for run in [Run::Throughput, Run::Rate] {
            if !cli.runs(run) {
                continue;
            }
            let o = if run == Run::Rate { &rate_opts } else { &opts };
            let r = place_on(cli.agents, &node, &t, o).await?;
            println!("{}", row(&format!("{name} {run:?}"), &r));
        }
        return Ok(());
    }
    if cli.runs(Run::Throughput) {
        let (t, raw) = throughput(false, cli.agents, &node, &opts).await?;
        eprintln!("throughput: {t:?} raw {raw:.0}/s");
        lines.push(row(
            &format!(
                "1 server, {} req, K={} (as fast as accepted)",
                cli.requests, cli.agents
            ),
            &t,
        ));
        notes.push(format!(
            "throughput run: {} placed in {:.1} s",
            t.placed, t.secs
        ));
        notes.push(format!("raw JetStream work-queue rate on the same server (publish → fetch → ack, batch 1, {} workers): {raw:.0} msg/s; updraft end to end: {:.0} placements/s = {:.0}% of raw", cli.agents, t.rate, 100.0 * t.rate / raw));
        notes.push(format!(
            "stored writes per placement by where they go: {}",
            t.stored_by_group
                .iter()
                .map(|(g, v)| format!("{g} {v:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if cli.runs(Run::Rate) {
        let r = place_on(cli.agents, &node, &Tuning::default(), &rate_opts).await?;
        eprintln!("rate: {r:?}");
        lines.push(row(
            &format!(
                "1 server, {:.0} req/s for {} s, K={}",
                cli.rate, cli.rate_secs, cli.agents
            ),
            &r,
        ));
    }
    if cli.runs(Run::Scale) {
        let scale_opts = PlaceOpts {
            requests: cli.scale_requests,
            concurrency: cli.concurrency,
            rate: Some(cli.rate),
            prefix: "s".into(),
        };
        let s10 = place_on(10, &node, &Tuning::default(), &scale_opts).await?;
        let sk = place_on(cli.scale_agents, &node, &Tuning::default(), &scale_opts).await?;
        eprintln!("scale: {s10:?} {sk:?}");
        lines.push(row(
            &format!(
                "1 server, {} req at {:.0}/s, K=10",
                cli.scale_requests, cli.rate
            ),
            &s10,
        ));
        lines.push(row(
            &format!(
                "1 server, {} req at {:.0}/s, K={}",
                cli.scale_requests, cli.rate, cli.scale_agents
            ),
            &sk,
        ));
        notes.push(format!(
            "cost per placement at K={} vs K=10: broker CPU {:.2}×, NATS messages {:.2}×, stored writes {:.2}×",
            cli.scale_agents,
            sk.cpu / s10.cpu.max(1e-9),
            sk.messages / s10.messages.max(1e-9),
            sk.stored / s10.stored.max(1e-9)
        ));
    }
    if cli.runs(Run::Idle) {
        let mut tuning = Tuning::default();
        if let Some(s) = cli.idle_pull_expiry_s {
            tuning.pull.expiry = Duration::from_secs(s);
        }
        let (idle_cpu, idle_msgs) = idle(cli.scale_agents, cli.idle_secs, &node, &tuning).await?;
        notes.push(format!(
            "idle load per 1,000 idle agents (heartbeats, pull re-issues every {:?}): {:.1}% of one broker core, {idle_msgs:.0} NATS messages/s",
            tuning.pull.expiry,
            idle_cpu * 100.0
        ));
    }
    if cli.runs(Run::Fanout) {
        let (k, secs, rate) = (cli.scale_agents, cli.fanout_secs, cli.fanout_rate);
        let shipped = fanout::agent_follows(k, secs, rate, &node).await?;
        eprintln!("fanout (agents): {shipped:?}");
        notes.push(fanout_note(
            "agents following their keys on republished subjects (as shipped)",
            "a node's join (its 19 flag and config keys subscribed, read in one batch and dropped)",
            k,
            &shipped,
        ));
        for (how, label, join) in [
            (
                fanout::Delivery::Publish,
                "core NATS publishes (comparison)",
                "",
            ),
            (
                fanout::Delivery::Republish,
                "core NATS from a republishing KV bucket (comparison)",
                "a read of one key",
            ),
            (
                fanout::Delivery::KvWatch,
                "KV watches, one per client (comparison: how agents heard flags before)",
                "a watch of one key opened, replayed and dropped",
            ),
        ] {
            let f = fanout::plain_connections(k, secs, rate, how).await?;
            eprintln!("fanout ({label}): {f:?}");
            notes.push(fanout_note(label, join, k, &f));
        }
    }
    if cli.runs(Run::Cluster) {
        let opts = PlaceOpts {
            requests: cli.requests / 2,
            concurrency: cli.concurrency,
            rate: None,
            prefix: "c".into(),
        };
        let (t3, raw3) = throughput(true, cli.agents, &node, &opts).await?;
        eprintln!("cluster: {t3:?} raw {raw3:.0}/s");
        lines.push(row(
            &format!("3 servers R3, {} req, K={}", opts.requests, cli.agents),
            &t3,
        ));
        notes.push(format!("raw rate on the R3 cluster: {raw3:.0} msg/s; updraft: {:.0} placements/s = {:.0}% of raw", t3.rate, 100.0 * t3.rate / raw3));
    }
    println!("{}", lines.join("\n"));
    println!();
    for n in notes {
        println!("- {n}");
    }
    Ok(())
}

/// As the dispatcher's binary (`updraft-dispatcher`): mimalloc. The agents this process runs
/// use it too, where `updraft-agent` keeps glibc's allocator (its memory matters more).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    common::telemetry::init_tracing();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(main_async(cli))
}
