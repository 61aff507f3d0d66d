//! Starting and stopping `nats-server` processes: the local cluster's embedded default and
//! every test's own server (loopback, a random port, a temporary store).
//!
//! The binary is found through `UPDRAFT_NATS_SERVER`, then `PATH`, then the project's
//! `.tools/bin` (where `scripts/setup.sh` installs the pinned version).

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Why a server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// No binary found.
    #[error(
        "nats-server not found: set UPDRAFT_NATS_SERVER, put nats-server 2.12+ on PATH, or run scripts/setup.sh (installs the pinned 2.15.1 into .tools/bin)"
    )]
    NotFound,
    /// The process could not be spawned.
    #[error("start {binary}: {source}")]
    Spawn {
        /// Binary.
        binary: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It did not report ready in time.
    #[error("nats-server did not become ready within {0:?}; its log: {1}")]
    NotReady(Duration, String),
    /// Files for it could not be written.
    #[error("prepare nats-server files: {0}")]
    Io(#[from] std::io::Error),
}

impl ServerError {
    /// Whether the server could not bind its port (so a start on another port may succeed).
    pub fn is_port_clash(&self) -> bool {
        matches!(self, ServerError::NotReady(_, log) if log.contains("address already in use"))
    }
}

/// Finds the `nats-server` binary.
pub fn find_binary() -> Result<PathBuf, ServerError> {
    if let Some(p) = std::env::var_os("UPDRAFT_NATS_SERVER") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("nats-server");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    // the workspace's own tools dir, seen from any crate or binary inside it
    let mut dir = std::env::current_dir().ok();
    while let Some(d) = dir {
        let p = d.join(".tools/bin/nats-server");
        if p.is_file() {
            return Ok(p);
        }
        dir = d.parent().map(Path::to_path_buf);
    }
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/bin/nats-server");
    if here.is_file() {
        return Ok(here);
    }
    Err(ServerError::NotFound)
}

/// A free TCP port on 127.0.0.1 for a server this process is about to start (tests, local
/// clusters).
///
/// Ports come from outside the kernel's ephemeral range (`ip_local_port_range`), so no
/// outgoing connection can take one between this check and the server's bind, as happens
/// with a port the kernel picked for `bind(0)`. A process walks the range from an offset
/// seeded by its pid, so ports handed out in one process never repeat and two processes
/// rarely meet; each candidate is checked by binding it. A clash that still happens (another
/// process bound the port in between) shows as "address already in use" in the server's
/// log, and [`NatsServer::start`] then tries another port.
pub fn free_port() -> std::io::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let (lo, hi) = non_ephemeral_range();
    let span = u32::from(hi - lo) + 1;
    // first use: start at an offset of this process's own
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7919) % span,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..span {
        let step = NEXT.fetch_add(1, Ordering::Relaxed) % span;
        let port = lo + u16::try_from(step).expect("step < span <= u16 range");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        format!("no free port in {lo}..={hi}"),
    ))
}

/// The larger stretch of ports at or above 10000 that lies outside the kernel's ephemeral
/// range (Linux default: 32768-60999, leaving 10000-32767).
fn non_ephemeral_range() -> (u16, u16) {
    let (eph_lo, eph_hi) = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| {
            let mut it = t.split_whitespace().map(str::parse::<u16>);
            Some((it.next()?.ok()?, it.next()?.ok()?))
        })
        .unwrap_or((32768, 60999));
    let below = (10000, eph_lo.saturating_sub(1));
    let above = (eph_hi.saturating_add(1), u16::MAX);
    let len = |(a, b): (u16, u16)| b.saturating_sub(a);
    if len(below) >= len(above) && len(below) > 0 {
        below
    } else if len(above) > 0 {
        above
    } else {
        // the whole range is ephemeral: fall back to the upper ports and rely on the retry
        (10000, u16::MAX)
    }
}

/// How many times a server (or a cluster) on ports picked by [`free_port`] is started on
/// new ports when its port was taken between the check and its bind.
const PORT_ATTEMPTS: usize = 5;

/// How to start one server.
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    /// Client port; `None` picks a free one.
    pub port: Option<u16>,
    /// JetStream store directory; `None` makes a temporary one removed on drop.
    pub store_dir: Option<PathBuf>,
    /// Extra configuration text appended to the generated config (cluster block, auth...).
    pub extra_config: String,
    /// A whole config file to run instead of the generated one, with the environment its
    /// `$VARIABLES` read (the port must then be given too).
    pub config_text: Option<(String, Vec<(String, String)>)>,
    /// Server name (required in clusters).
    pub name: Option<String>,
}

/// A running `nats-server` child process. Killed (and its temporary store removed) on drop.
#[derive(Debug)]
pub struct NatsServer {
    child: Option<Child>,
    binary: PathBuf,
    port: u16,
    config: PathBuf,
    log: PathBuf,
    env: Vec<(String, String)>,
    _dir: tempfile::TempDir,
    store: PathBuf,
}

impl NatsServer {
    /// Starts a single JetStream server on 127.0.0.1. Without a port it picks one with
    /// [`free_port`], and another one if that port was taken before the server bound it.
    pub fn start(opts: ServerOptions) -> Result<NatsServer, ServerError> {
        if opts.port.is_some() {
            return Self::start_once(opts);
        }
        let mut attempt = 1;
        loop {
            let opts = ServerOptions {
                port: Some(free_port()?),
                ..opts.clone()
            };
            match Self::start_once(opts) {
                Err(e) if attempt < PORT_ATTEMPTS && e.is_port_clash() => attempt += 1,
                other => return other,
            }
        }
    }

    fn start_once(opts: ServerOptions) -> Result<NatsServer, ServerError> {
        let binary = find_binary()?;
        let dir = tempfile::Builder::new().prefix("updraft-nats-").tempdir()?;
        let store = opts
            .store_dir
            .clone()
            .unwrap_or_else(|| dir.path().join("store"));
        fs::create_dir_all(&store)?;
        let port = match opts.port {
            Some(p) => p,
            None => free_port()?,
        };
        let name = opts
            .name
            .clone()
            .unwrap_or_else(|| format!("updraft-{port}"));
        let config = dir.path().join("nats.conf");
        let log = dir.path().join("nats.log");
        let (text, env) = match &opts.config_text {
            Some((text, env)) => {
                let mut env = env.clone();
                env.push((
                    "UPDRAFT_NATS_STORE".into(),
                    store.to_string_lossy().into_owned(),
                ));
                (text.clone(), env)
            }
            None => (
                format!(
                    "server_name: {name}\nlisten: 127.0.0.1:{port}\nmax_payload: 1MB\njetstream {{\n  store_dir: {store:?}\n  max_memory_store: 256MB\n  max_file_store: 64GB\n}}\n{}\n",
                    opts.extra_config
                ),
                Vec::new(),
            ),
        };
        fs::write(&config, text)?;
        let mut s = NatsServer {
            child: None,
            binary,
            port,
            config,
            log,
            env,
            _dir: dir,
            store,
        };
        s.spawn()?;
        Ok(s)
    }

    fn spawn(&mut self) -> Result<(), ServerError> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let err = log.try_clone()?;
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(&self.config)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .spawn()
            .map_err(|source| ServerError::Spawn {
                binary: self.binary.clone(),
                source,
            })?;
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(20))
    }

    fn wait_ready(&mut self, within: Duration) -> Result<(), ServerError> {
        let start = std::time::SystemTime::now();
        let mut ready_lines = 0;
        loop {
            // a server that exited (a port clash, a bad config) will never be ready
            let exited = self
                .child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
            if let Ok(f) = fs::File::open(&self.log) {
                ready_lines = BufReader::new(f)
                    .lines()
                    .map_while(Result::ok)
                    .filter(|l| l.contains("Server is ready"))
                    .count();
            }
            // a restart appends to the same log: wait for a new "ready" line
            if ready_lines >= self.starts() {
                return Ok(());
            }
            if exited || start.elapsed().unwrap_or_default() > within {
                let text = fs::read_to_string(&self.log).unwrap_or_default();
                let tail: String = text
                    .lines()
                    .rev()
                    .take(20)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n");
                return Err(ServerError::NotReady(within, tail));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn starts(&self) -> usize {
        fs::read_to_string(&self.log)
            .map(|t| {
                t.lines()
                    .filter(|l| l.contains("Starting nats-server"))
                    .count()
            })
            .unwrap_or(1)
            .max(1)
    }

    /// Client URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The JetStream store directory.
    pub fn store_dir(&self) -> &Path {
        &self.store
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills the process with SIGKILL (a crash).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the process with SIGTERM and waits for it (a clean shutdown).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Ok(pid) = i32::try_from(c.id()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let deadline = std::time::SystemTime::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                if std::time::SystemTime::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Starts the process again on the same port and store.
    pub fn restart(&mut self) -> Result<(), ServerError> {
        self.kill();
        self.spawn()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The 3-server cluster config of `deploy/nats/local-cluster.conf`.
pub const LOCAL_CLUSTER_CONF: &str = include_str!("../../deploy/nats/local-cluster.conf");

/// A JetStream cluster of three servers on 127.0.0.1, each run from
/// `deploy/nats/local-cluster.conf` (random ports), for R3 tests and the 3-server benchmark.
#[derive(Debug)]
pub struct NatsCluster {
    /// The servers, in order.
    pub servers: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts the three servers `n0`, `n1`, `n2` of `deploy/nats/local-cluster.conf`, all
    /// on new ports again if one of them found its port taken.
    pub fn start() -> Result<NatsCluster, ServerError> {
        let mut attempt = 1;
        loop {
            match Self::start_once() {
                Err(e) if attempt < PORT_ATTEMPTS && e.is_port_clash() => attempt += 1,
                other => return other,
            }
        }
    }

    fn start_once() -> Result<NatsCluster, ServerError> {
        let n = 3;
        let client_ports: Vec<u16> = (0..n).map(|_| free_port()).collect::<Result<_, _>>()?;
        let route_ports: Vec<u16> = (0..n).map(|_| free_port()).collect::<Result<_, _>>()?;
        let mut starting = Vec::new();
        // start all without waiting for each: a cluster member is ready only with a quorum
        for i in 0..n {
            let mut env = vec![
                ("UPDRAFT_NATS_NAME".to_string(), format!("n{i}")),
                ("UPDRAFT_NATS_PORT".to_string(), client_ports[i].to_string()),
                (
                    "UPDRAFT_NATS_CLUSTER_PORT".to_string(),
                    route_ports[i].to_string(),
                ),
            ];
            for (j, p) in route_ports.iter().enumerate() {
                env.push((
                    format!("UPDRAFT_NATS_ROUTE{j}"),
                    format!("nats-route://127.0.0.1:{p}"),
                ));
            }
            let opts = ServerOptions {
                port: Some(client_ports[i]),
                name: Some(format!("n{i}")),
                config_text: Some((LOCAL_CLUSTER_CONF.to_string(), env)),
                ..Default::default()
            };
            starting.push(std::thread::spawn(move || NatsServer::start(opts)));
        }
        let mut servers = Vec::new();
        for h in starting {
            servers.push(h.join().map_err(|_| {
                ServerError::NotReady(Duration::ZERO, "start thread panicked".into())
            })??);
        }
        Ok(NatsCluster { servers })
    }

    /// Comma-separated client URLs of every server.
    pub fn urls(&self) -> String {
        self.servers
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct_bindable_and_outside_the_ephemeral_range() {
        let (lo, hi) = non_ephemeral_range();
        assert!(lo >= 10000 && lo <= hi, "range {lo}..={hi}");
        let ports: Vec<u16> = (0..50).map(|_| free_port().expect("a free port")).collect();
        let distinct: std::collections::HashSet<_> = ports.iter().collect();
        assert_eq!(distinct.len(), ports.len(), "a port was handed out twice");
        for p in &ports {
            assert!((lo..=hi).contains(p), "{p} outside {lo}..={hi}");
        }
        // a port handed out can really be bound
        TcpListener::bind(("127.0.0.1", ports[0])).expect("bind the port handed out");
    }

    #[test]
    fn a_clash_is_recognised_from_the_log() {
        let clash = ServerError::NotReady(
            Duration::ZERO,
            "[FTL] Error listening on port: 127.0.0.1:46493, \"listen tcp 127.0.0.1:46493: bind: address already in use\"".into(),
        );
        assert!(clash.is_port_clash());
        assert!(!ServerError::NotReady(Duration::ZERO, "[FTL] bad config".into()).is_port_clash());
        assert!(!ServerError::NotFound.is_port_clash());
    }
}
