//! `updraft-dispatcher`: load config, set up logs and metrics, serve until SIGTERM.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// updraft dispatcher: accepts VM requests, routes them to shard queues, tracks them.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// TOML config file (every key is optional; see deploy/config/dispatcher.toml).
    #[arg(long, short = 'c', env = "UPDRAFT_DISPATCHER_CONFIG")]
    config: Option<PathBuf>,
    /// Override one setting: `--set http_listen=0.0.0.0:8080` (repeatable).
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

/// Every record, hint and NATS message allocates and frees small buffers; mimalloc does
/// that with less CPU than glibc's allocator under the tokio workers' contention.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let src = common::config::Sources {
        file: cli.config.as_deref(),
        env_prefix: dispatcher::config::ENV_PREFIX,
        sets: &cli.set,
    };
    let cfg: dispatcher::Config = common::config::load(&src)?;
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
        .enable_all()
        .build()?;
    rt.block_on(async move {
        common::telemetry::init_tracing();
        let handle = common::telemetry::install_metrics(None)?;
        dispatcher::metrics::describe();
        dispatcher::run(cfg, Some(handle), common::signal::shutdown()).await
    })
}
