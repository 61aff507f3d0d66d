//! `updraft-sim`: replay a workload against updraft's policy and central baselines, and find
//! how many nodes a workload needs. See docs/sim.md.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use placement::policy::Policy;
use placement::pull::{PullConfig, PullOrder};
use placement::request::DEFAULT_DEADLINE_S;
use placement::resources::AllocationRatios;
use placement::shard::{MAX_PARTITIONS, default_shard_map, zone};
use placement::takers::{DEFAULT_FLAG_AFTER, DEFAULT_SWEEP_INTERVAL};
use placement::time::duration_ms;
use sim::central::{self, CentralConfig, DecisionCost};
use sim::cluster::{ClusterSpec, ShapeCount};
use sim::stats::Report;
use sim::updraft::{self, UpdraftConfig};
use sim::workload::{Arrivals, Mix, SyntheticSpec, TickArrivals, WorkloadSpec};
use sim::{PolicyKind, plan, report};

/// The simulator allocates and frees many small values per event (plans, intents, shard ids);
/// mimalloc does that about twice as fast as glibc's allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Turns transparent huge pages off for this process (memory faulted in from now on comes in
/// 4 KiB pages). A kernel without the setting leaves things as they were.
fn no_huge_pages() {
    #[cfg(target_os = "linux")]
    if let Err(e) = nix::sys::prctl::set_thp_disable(true) {
        eprintln!("note: could not turn transparent huge pages off ({e}); running with them");
    }
}

/// updraft's capacity simulator.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Let the kernel back the simulator's memory with transparent huge pages where it would.
    /// Off by default: on the VMs we measure on, zeroing each fresh 2 MiB page cost more
    /// system time than the huge pages saved (the 1,000,000-request scale run: 84 s with
    /// them, 60 s without; BENCHMARKS.md).
    #[arg(long, global = true)]
    huge_pages: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// One policy over one workload.
    Run {
        /// The policy.
        #[arg(long, value_enum, default_value = "updraft")]
        policy: PolicyKind,
        #[command(flatten)]
        common: Common,
    },
    /// Several policies over one workload: one table, CSV time series and plots.
    Compare {
        /// Policies (comma-separated); default: all.
        #[arg(long, value_enum, value_delimiter = ',')]
        policies: Vec<PolicyKind>,
        #[command(flatten)]
        common: Common,
    },
    /// The smallest cluster (of the given shape mix) that keeps acceptance at the target.
    Plan {
        /// The policy.
        #[arg(long, value_enum, default_value = "updraft")]
        policy: PolicyKind,
        /// Acceptance to keep (0..1).
        #[arg(long, default_value_t = 0.999)]
        target: f64,
        #[command(flatten)]
        common: Common,
    },
}

/// `pull.order` on the command line.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum OrderArg {
    Demand,
    LargestThenSmallest,
    SmallestFirst,
    LargestFirst,
}

impl From<OrderArg> for PullOrder {
    fn from(o: OrderArg) -> Self {
        match o {
            OrderArg::Demand => Self::Demand,
            OrderArg::LargestThenSmallest => Self::LargestThenSmallest,
            OrderArg::SmallestFirst => Self::SmallestFirst,
            OrderArg::LargestFirst => Self::LargestFirst,
        }
    }
}

/// `--tick-arrivals`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum TickArg {
    Spread,
    Instant,
}

#[derive(Debug, Clone, Args)]
struct Common {
    /// A trace (Azure 2017 CSV or the simple format; `.gz` is fine).
    #[arg(long, conflicts_with = "synthetic")]
    trace: Option<PathBuf>,
    /// At most this many requests of the trace.
    #[arg(long)]
    limit: Option<u64>,
    /// Trace: how the VMs stamped with one tick arrive (the Azure trace stamps each with its
    /// 5-minute tick). `spread`: at seeded uniform times over the tick, a batch (one tenant's
    /// VMs of that tick) together; `instant`: every VM of the tick in the same instant.
    #[arg(long, value_enum, default_value = "spread")]
    tick_arrivals: TickArg,
    /// Use the synthetic generator instead of a trace.
    #[arg(long)]
    synthetic: bool,
    /// Synthetic: requests.
    #[arg(long, default_value_t = 10_000)]
    requests: u64,
    /// Synthetic: mean arrivals per second.
    #[arg(long, default_value_t = 5.0)]
    rate: f64,
    /// Synthetic: arrival process.
    #[arg(long, value_enum, default_value = "poisson")]
    arrivals: Arrivals,
    /// Synthetic: shape mix.
    #[arg(long, value_enum, default_value = "azure")]
    mix: Mix,
    /// Synthetic: mean lifetime, seconds.
    #[arg(long, default_value_t = 3600.0)]
    mean_lifetime_s: f64,
    /// Node groups, COUNTxVCPUSxMEMORY_GIB (repeatable); default: --nodes of --node-shape.
    #[arg(long = "shape")]
    shapes: Vec<ShapeCount>,
    /// Nodes (with --node-shape).
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    /// Node shape for --nodes: VCPUSxMEMORY_GIB.
    #[arg(long, default_value = "64x512")]
    node_shape: String,
    /// vCPU allocation ratio.
    #[arg(long, default_value_t = 4.0)]
    cpu_ratio: f64,
    /// Memory allocation ratio.
    #[arg(long, default_value_t = 1.0)]
    ram_ratio: f64,
    /// Memory kept for each host, MiB.
    #[arg(long, default_value_t = 0)]
    reserved_mib: u64,
    /// Seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Seconds a request may wait before it fails.
    #[arg(long, default_value_t = DEFAULT_DEADLINE_S)]
    deadline_s: u64,
    /// updraft: partitions per size class (default: one per 1,000 nodes).
    #[arg(long)]
    partitions: Option<u16>,
    /// updraft: seconds from claim to running.
    #[arg(long, default_value_t = updraft::DEFAULT_BUILD_S)]
    build_s: u64,
    /// updraft: milliseconds between the dispatcher's sweeps (the dispatcher's
    /// `sweep_interval`).
    #[arg(long, default_value_t = duration_ms(DEFAULT_SWEEP_INTERVAL))]
    sweep_ms: u64,
    /// updraft: milliseconds a class waits before it is flagged for its takers (the
    /// dispatcher's `flag_after`).
    #[arg(long, default_value_t = duration_ms(DEFAULT_FLAG_AFTER))]
    flag_after_ms: u64,
    /// updraft: a class asked for gets a standing flag (a few empty nodes pull it before any
    /// of it waits) while the nodes in use have room for fewer than this many of its largest
    /// request; 0 never raises one (the dispatcher's `standing_below`, default 40: the setting
    /// measured in docs/sim.md).
    #[arg(long, default_value_t = placement::standing::DEFAULT_STANDING_BELOW)]
    standing_below: u64,
    /// updraft: probability that a build fails.
    #[arg(long, default_value_t = 0.0)]
    build_failure_rate: f64,
    /// updraft: node deaths per node per hour.
    #[arg(long, default_value_t = 0.0)]
    node_death_rate: f64,
    /// updraft: messages one used node pulls for per class (pack).
    #[arg(long)]
    per_class: Option<usize>,
    /// updraft: tiers empty nodes open in (pack, with --no-cover).
    #[arg(long)]
    open_tiers: Option<u8>,
    /// updraft: no cover pulls (`pull.cover = false`): the credited plan alone, empty nodes
    /// opening in tiers.
    #[arg(long)]
    no_cover: bool,
    /// updraft: how a node spends its credit on classes (`pull.order`).
    #[arg(long, value_enum)]
    pull_order: Option<OrderArg>,
    /// updraft: most messages one node pulls for at once (`max_pulls`).
    #[arg(long)]
    max_pulls: Option<usize>,
    /// updraft: how long a request waits for a full-fit taker before near-fit takers may
    /// have it, ms (the dispatcher's `ladder.spill_after`; default 500).
    #[arg(long)]
    spill_ms: Option<u64>,
    /// updraft: share of eligible nodes holding back for a starving class (0 disables).
    #[arg(long)]
    guard_share: Option<f64>,
    /// Seconds between samples of the time series.
    #[arg(long, default_value_t = 300)]
    sample_s: u64,
    /// Where reports, CSV and plots go.
    #[arg(long, default_value = "sim-out")]
    out: PathBuf,
    /// Skip the plots.
    #[arg(long)]
    no_plots: bool,
    /// Leave the simulator's own wall time out of the outputs: then the same seed gives
    /// byte-identical report.md, report.json and timeseries.csv.
    #[arg(long)]
    no_wall: bool,
}

impl Common {
    fn workload(&self) -> anyhow::Result<WorkloadSpec> {
        if let Some(path) = &self.trace {
            return Ok(WorkloadSpec::Trace {
                path: path.clone(),
                limit: self.limit,
                ticks: match self.tick_arrivals {
                    TickArg::Spread => TickArrivals::Spread { seed: self.seed },
                    TickArg::Instant => TickArrivals::Instant,
                },
            });
        }
        if !self.synthetic {
            bail!("give a workload: --trace FILE or --synthetic");
        }
        if !(self.rate > 0.0 && self.rate.is_finite()) {
            bail!("--rate must be positive");
        }
        Ok(WorkloadSpec::Synthetic(SyntheticSpec {
            requests: self.requests,
            rate_per_s: self.rate,
            arrivals: self.arrivals,
            mix: self.mix,
            mean_lifetime_s: self.mean_lifetime_s,
            seed: self.seed,
        }))
    }

    fn cluster(&self) -> anyhow::Result<ClusterSpec> {
        let shapes = if self.shapes.is_empty() {
            vec![format!("{}x{}", self.nodes, self.node_shape).parse::<ShapeCount>()?]
        } else {
            self.shapes.clone()
        };
        let c = ClusterSpec {
            shapes,
            ratios: AllocationRatios {
                cpu: self.cpu_ratio,
                ram: self.ram_ratio,
                disk: 1.0,
            },
            reserved_mib: self.reserved_mib,
        };
        c.ratios.validate().context("allocation ratios")?;
        if c.is_empty() {
            bail!("the cluster has no nodes");
        }
        Ok(c)
    }

    fn updraft(&self, policy: Policy, nodes: usize) -> anyhow::Result<UpdraftConfig> {
        let mut map = default_shard_map(zone("az1")?);
        let parts = self
            .partitions
            .unwrap_or_else(|| u16::try_from(nodes.div_ceil(1000)).unwrap_or(MAX_PARTITIONS))
            .clamp(1, MAX_PARTITIONS);
        for c in &mut map.size_classes {
            c.partitions = parts;
            if let Some(ms) = self.spill_ms {
                c.spill_after_ms = ms;
            }
        }
        map.validate().context("shard map")?;
        let mut pull = PullConfig {
            policy,
            ..PullConfig::default()
        };
        if let Some(p) = self.per_class {
            pull.per_class = p;
        }
        if let Some(m) = self.max_pulls {
            pull.max_pulls = m;
        }
        if let Some(t) = self.open_tiers {
            pull.open_tiers = t;
        }
        pull.cover = !self.no_cover;
        if let Some(o) = self.pull_order {
            pull.order = o.into();
        }
        if let Some(s) = self.guard_share {
            pull.guard.share = s;
        }
        let mut cfg = UpdraftConfig::new(map, pull, self.seed);
        cfg.build_time = self.build_s * 1000;
        cfg.sweep_every = self.sweep_ms.max(1);
        cfg.flag_after = self.flag_after_ms;
        cfg.standing_below = self.standing_below;
        cfg.deadline = self.deadline_s * 1000;
        cfg.build_failure_rate = self.build_failure_rate;
        cfg.node_death_rate = self.node_death_rate;
        cfg.sample_every = self.sample_s * 1000;
        Ok(cfg)
    }

    fn run(&self, policy: PolicyKind, cluster: &ClusterSpec) -> anyhow::Result<Report> {
        let nodes = cluster.nodes()?;
        let workload = self.workload()?.open()?;
        let n = nodes.len();
        Ok(match policy {
            PolicyKind::Updraft => updraft::run(nodes, workload, &self.updraft(Policy::Pack, n)?)?,
            PolicyKind::UpdraftSpread => {
                updraft::run(nodes, workload, &self.updraft(Policy::Spread, n)?)?
            }
            other => {
                let cfg = CentralConfig {
                    deadline: self.deadline_s * 1000,
                    sample_every: self.sample_s * 1000,
                    retry_batch: 64,
                    seed: self.seed,
                    map: default_shard_map(zone("az1")?),
                    cost: DecisionCost::of(other),
                };
                central::run(other, nodes, workload, &cfg)?
            }
        })
    }

    fn largest_node(&self, cluster: &ClusterSpec) -> anyhow::Result<placement::Resources> {
        Ok(cluster
            .nodes()?
            .iter()
            .map(|n| n.capacity.clone())
            .fold(placement::Resources::default(), |a, c| a.max(&c)))
    }
}

fn spinner(msg: String) -> ProgressBar {
    let pb = ProgressBar::new_spinner();
    pb.set_style(
        ProgressStyle::with_template("{spinner} {msg} {elapsed}").expect("static template"),
    );
    pb.set_message(msg);
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}

fn write_outputs(
    common: &Common,
    reports: &[Report],
    header: &str,
    lb: usize,
) -> anyhow::Result<()> {
    let mut reports = reports.to_vec();
    if common.no_wall {
        for r in &mut reports {
            r.wall_s = 0.0;
        }
    }
    let reports = &reports[..];
    let out = &common.out;
    std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
    let md = format!(
        "{header}\n\n{}\n### p99 wait by size class (classes with ≥ 50 placements under every policy)\n\n{}",
        report::table(reports, Some(lb)),
        report::class_table(reports, 50)
    );
    println!("{md}");
    std::fs::write(out.join("report.md"), &md)?;
    std::fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(reports)?,
    )?;
    report::write_csv(out, reports)?;
    if !common.no_plots {
        report::write_plots(out, reports)?;
    }
    eprintln!(
        "wrote {}/report.md, report.json, timeseries.csv{}",
        out.display(),
        if common.no_plots {
            ""
        } else {
            ", utilization/hosts/wait_cdf .svg and .png"
        }
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if !cli.huge_pages {
        no_huge_pages();
    }
    match cli.cmd {
        Cmd::Run { policy, common } => {
            let cluster = common.cluster()?;
            let pb = spinner(format!("{} on {} nodes", policy.name(), cluster.len()));
            let r = common.run(policy, &cluster)?;
            pb.finish_and_clear();
            let lb = plan::lower_bound(&common.workload()?, &common.largest_node(&cluster)?)?;
            let header = format!(
                "## {} · {}",
                common.workload()?.describe(),
                cluster.describe()
            );
            write_outputs(&common, &[r], &header, lb)
        }
        Cmd::Compare { policies, common } => {
            let policies = if policies.is_empty() {
                PolicyKind::ALL.to_vec()
            } else {
                policies
            };
            let cluster = common.cluster()?;
            let mut reports = Vec::new();
            for p in policies {
                let pb = spinner(format!("{} on {} nodes", p.name(), cluster.len()));
                reports.push(common.run(p, &cluster)?);
                pb.finish_and_clear();
            }
            let lb = plan::lower_bound(&common.workload()?, &common.largest_node(&cluster)?)?;
            let header = format!(
                "## {} · {}",
                common.workload()?.describe(),
                cluster.describe()
            );
            write_outputs(&common, &reports, &header, lb)
        }
        Cmd::Plan {
            policy,
            target,
            common,
        } => {
            if !(0.0..=1.0).contains(&target) {
                bail!("--target is a fraction between 0 and 1");
            }
            let cluster = common.cluster()?;
            let lb = plan::lower_bound(&common.workload()?, &common.largest_node(&cluster)?)?;
            let pb = spinner(format!("searching from the lower bound of {lb} nodes"));
            let (n, probes) = plan::smallest_cluster(
                &cluster,
                lb,
                target,
                |c| common.run(policy, c),
                |p| {
                    pb.set_message(format!(
                        "{} nodes → {:.3}% accepted",
                        p.nodes,
                        p.acceptance * 100.0
                    ))
                },
            )?;
            pb.finish_and_clear();
            for p in &probes {
                println!(
                    "{:>8} nodes: {:.3}% accepted",
                    p.nodes,
                    p.acceptance * 100.0
                );
            }
            if n == usize::MAX {
                bail!("no cluster size up to 10,000,000 nodes reaches {target}");
            }
            println!(
                "{}: {} nodes ({}) keep acceptance ≥ {:.3}% for {}; lower bound {lb}",
                policy.name(),
                n,
                cluster.scaled(n).describe(),
                target * 100.0,
                common.workload()?.describe()
            );
            Ok(())
        }
    }
}
