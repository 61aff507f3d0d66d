//! `updraft-agent`: load config, set up logs and metrics, run the agent until SIGTERM.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// updraft node agent: advertises this host's spare capacity and takes VM requests it can fit.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// TOML config file (every key is optional; see deploy/config/node-agent.toml).
    #[arg(long, short = 'c', env = "UPDRAFT_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// Override one setting: `--set nats.url=nats://10.0.0.5:4222` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Check the configuration and exit.
    #[arg(long)]
    check_config: bool,
    /// Print the effective configuration (every key, after file, environment and flags; secrets
    /// redacted) as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let src = common::config::Sources {
        file: cli.config.as_deref(),
        env_prefix: node_agent::config::ENV_PREFIX,
        sets: &cli.set,
    };
    let cfg: node_agent::config::Config = common::config::load(&src)?;
    cfg.validate().context("invalid configuration")?;
    if cli.print_config {
        print!("{}", common::config::render(&cfg)?);
        return Ok(());
    }
    if cli.check_config {
        println!("configuration is valid");
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        common::telemetry::init_tracing();
        if cfg.metrics_listen.is_some() {
            common::telemetry::install_metrics(cfg.metrics_listen)?;
            node_agent::metrics::describe();
        }
        node_agent::run(cfg, node_agent::Deps::default(), common::signal::shutdown()).await
    })
}
