//! `updraft`: the operator CLI and the one-command local cluster.
//!
//! Every command except `up` talks to a dispatcher's HTTP API (`--api`, `UPDRAFT_API`,
//! default `http://127.0.0.1:8080`). Exit codes: 0 ok, 1 refused by the cluster, 2 bad usage,
//! 3 not found, 4 cluster unreachable or failing, 5 a waited-on request failed.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use cli::client::{Api, CliError};
use cli::{cluster, servers, up};

/// updraft: decentralized VM placement. Nodes pull work; nobody walks every host.
#[derive(Debug, Parser)]
#[command(version, about, propagate_version = true)]
struct Cli {
    /// Dispatcher HTTP API.
    #[arg(
        long,
        global = true,
        env = "UPDRAFT_API",
        default_value = "http://127.0.0.1:8080"
    )]
    api: String,
    /// API token (when the dispatcher requires one).
    #[arg(long, global = true, env = "UPDRAFT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print the API's JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once at start: its size does not matter
enum Cmd {
    /// Run a whole local cluster: nats-server, a dispatcher and agents, with a demo workload.
    Up(up::UpArgs),
    /// Servers (VM requests).
    #[command(subcommand, alias = "server")]
    Servers(servers::ServersCmd),
    /// Compute nodes.
    #[command(subcommand, alias = "node")]
    Nodes(cluster::NodesCmd),
    /// Shard queues: depth, oldest age, consumers.
    Shards {
        /// Show empty shards too.
        #[arg(long)]
        all: bool,
    },
    /// Capacity per zone and size class.
    Capacity {
        /// Show classes nobody can fit and nothing waits for.
        #[arg(long)]
        all: bool,
    },
    /// Cluster health and live placement statistics.
    Status,
    /// Print NATS accounts and per-role users with subject permissions (a nats-server config
    /// include, like deploy/nats/accounts.conf) for the given agents.
    NatsAccounts {
        /// An agent: `NODE` (password from `$UPDRAFT_AGENT_<n>_PASSWORD`) or `NODE=$VAR`.
        #[arg(long = "agent", value_name = "NODE[=$VAR]")]
        agents: Vec<String>,
        /// The example of deploy/nats/accounts.conf.
        #[arg(long, conflicts_with = "agents")]
        example: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: start the runtime: {e}");
            return ExitCode::from(4);
        }
    };
    let result = rt.block_on(run(cli));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", e.message);
            ExitCode::from(e.code)
        }
    }
}

fn nats_accounts(agents: &[String], example: bool) -> Result<(), CliError> {
    let list = if example {
        bus::permissions::example_agents()
    } else {
        let mut out = Vec::new();
        for (i, a) in agents.iter().enumerate() {
            let (node, var) = match a.split_once('=') {
                Some((n, v)) => (n, v.to_string()),
                None => (a.as_str(), format!("$UPDRAFT_AGENT_{}_PASSWORD", i + 1)),
            };
            if !var.starts_with('$') {
                return Err(CliError::usage(format!(
                    "--agent {a}: give the password as a $VARIABLE of nats-server's environment, never in the file"
                )));
            }
            let id = placement::NodeId::new(node)
                .map_err(|e| CliError::usage(format!("--agent {a}: {e}")))?;
            out.push((id, var));
        }
        out
    };
    print!("{}", bus::permissions::accounts_file(&list));
    Ok(())
}

async fn run(cli: Cli) -> Result<(), CliError> {
    let api = Api::new(&cli.api, cli.token.clone());
    match cli.cmd {
        Cmd::Up(args) => up::run(args).await,
        Cmd::Servers(cmd) => servers::run(&api, cmd, cli.json).await,
        Cmd::Nodes(cmd) => cluster::nodes(&api, cmd, cli.json).await,
        Cmd::Shards { all } => cluster::shards(&api, all, cli.json).await,
        Cmd::Capacity { all } => cluster::capacity(&api, all, cli.json).await,
        Cmd::Status => cluster::status(&api, cli.json).await,
        Cmd::NatsAccounts { agents, example } => nats_accounts(&agents, example),
    }
}
