//! The provisioning seam: a [`Driver`] creates, destroys and lists VMs. The in-memory driver
//! is for tests, demos and load runs; the libvirt driver provisions real domains.
//!
//! Every driver appends its own build and destroy events to a JSON-lines log in the state dir
//! (its own record of what really ran, independent of KV): the invariant checker reads these.

pub mod libvirt;
pub mod memory;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use async_trait::async_trait;
use placement::{ClaimToken, Epoch, NodeId, RequestId, Resources};
use serde::{Deserialize, Serialize};

/// What to build.
#[derive(Debug, Clone, PartialEq)]
pub struct VmSpec {
    /// The request (the VM's identity: name and UUID derive from it).
    pub request: RequestId,
    /// Size.
    pub resources: Resources,
    /// Image reference.
    pub image: Option<String>,
    /// Metadata carried into the VM.
    pub metadata: BTreeMap<String, String>,
    /// The claim it is built under.
    pub node: NodeId,
    /// Epoch of the claim.
    pub epoch: Epoch,
    /// Claim token.
    pub token: ClaimToken,
}

/// A domain the driver knows about.
#[derive(Debug, Clone, PartialEq)]
pub struct DomainInfo {
    /// Domain name.
    pub name: String,
    /// The updraft request it carries, if it is one of ours.
    pub request: Option<RequestId>,
    /// The claim token it was built under, if recorded.
    pub token: Option<ClaimToken>,
    /// What it uses.
    pub resources: Resources,
    /// Running (not just defined).
    pub running: bool,
}

/// A driver failure, with the hypervisor's own text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DriverError {
    /// The hypervisor cannot be reached.
    #[error("hypervisor unavailable: {0}")]
    Unavailable(String),
    /// The build was refused (bad image, XML rejected...).
    #[error("build refused: {0}")]
    Rejected(String),
    /// Out of disk or another host resource.
    #[error("host out of resources: {0}")]
    Exhausted(String),
    /// A build failed for another reason.
    #[error("build failed: {0}")]
    Failed(String),
}

impl DriverError {
    /// Stable label.
    pub fn as_str(&self) -> &'static str {
        match self {
            DriverError::Unavailable(_) => "unavailable",
            DriverError::Rejected(_) => "rejected",
            DriverError::Exhausted(_) => "exhausted",
            DriverError::Failed(_) => "failed",
        }
    }
}

/// Creates, destroys and lists VMs. Create and destroy are idempotent by request id.
#[async_trait]
pub trait Driver: Send + Sync + 'static {
    /// Short name (`memory`, `libvirt`), advertised.
    fn kind(&self) -> &'static str;
    /// Builds the VM (or finds the one a retry already built) and waits until it runs.
    async fn create(&self, vm: &VmSpec) -> Result<DomainInfo, DriverError>;
    /// Destroys the VM and its disk; a missing VM is success.
    async fn destroy(&self, request: &RequestId) -> Result<(), DriverError>;
    /// Every domain on the host, ours (carrying a request id) and foreign.
    async fn list(&self) -> Result<Vec<DomainInfo>, DriverError>;
    /// Ok when the hypervisor answers.
    async fn health(&self) -> Result<(), DriverError>;
    /// Slow one-time preparation the first build would otherwise wait for (libvirt: the
    /// domain-type probe); the agent runs it in the background at start.
    async fn prepare(&self) -> Result<(), DriverError> {
        Ok(())
    }
    /// The host as the hypervisor sees it: (logical CPUs, memory MiB); `None` when the driver
    /// has no hypervisor to ask.
    async fn host(&self) -> Result<Option<(u32, u64)>, DriverError> {
        Ok(None)
    }
}

/// One line of a driver's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// Wall clock, ms.
    pub at_ms: u64,
    /// Node.
    pub node: String,
    /// Request.
    pub request: String,
    /// What happened.
    pub event: LogEvent,
    /// Claim token (hex) for builds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// What the domain uses (builds), so a checker can replay a node's load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
}

/// Events a driver logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogEvent {
    /// A domain now exists and runs.
    Created,
    /// A domain was destroyed.
    Destroyed,
}

/// Append-only JSON-lines log, written with one `write` per line so a killed process leaves
/// whole lines behind.
#[derive(Debug)]
pub struct BuildLog {
    path: PathBuf,
    file: Mutex<Option<fs::File>>,
}

impl BuildLog {
    /// The log at `path` (created on first write).
    pub fn new(path: PathBuf) -> Self {
        BuildLog {
            path,
            file: Mutex::new(None),
        }
    }

    /// The conventional log path in a state dir.
    pub fn in_dir(dir: &Path) -> Self {
        Self::new(dir.join("driver-log.jsonl"))
    }

    /// Appends one entry; failures are logged, never fatal (the VM exists either way).
    pub fn append(&self, entry: &LogEntry) {
        let mut line = match serde_json::to_vec(entry) {
            Ok(l) => l,
            Err(_) => return,
        };
        line.push(b'\n');
        let mut guard = self.file.lock().expect("build log lock");
        if guard.is_none() {
            match fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
            {
                Ok(f) => *guard = Some(f),
                Err(e) => {
                    tracing::warn!(error = %e, path = %self.path.display(), "cannot open driver log");
                    return;
                }
            }
        }
        if let Some(f) = guard.as_mut()
            && let Err(e) = f.write_all(&line)
        {
            tracing::warn!(error = %e, "driver log write failed");
        }
    }

    /// Reads every entry of a log file (the checker's side).
    pub fn read(path: &Path) -> std::io::Result<Vec<LogEntry>> {
        let text = fs::read_to_string(path)?;
        Ok(text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}
