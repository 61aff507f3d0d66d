//! The libvirt path measured: a real `updraft-agent` process on `qemu:///system` boots the
//! setup script's test guest (direct kernel boot; TCG where the probe finds KVM unusable) for
//! each of N requests, one after another. Reports the time from the claim (the agent's own
//! claim timestamp in the record) to the guest's first serial line and to its init's marker,
//! and the agent's resident memory with no guests and with N running.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use placement::lifecycle::State;
use placement::{RequestId, Resources};

use crate::cluster::Cluster;

/// What the run measured.
#[derive(Debug, Clone)]
pub struct LibvirtResult {
    /// Domain type the agent's probe chose.
    pub domain_type: String,
    /// Claim → first serial line, per guest (ms).
    pub first_line_ms: Vec<u64>,
    /// Claim → the init's marker, per guest (ms).
    pub marker_ms: Vec<u64>,
    /// Agent memory with no guests.
    pub idle: Mem,
    /// Agent memory with every guest running.
    pub busy: Mem,
}

/// A process's memory, KiB, from `/proc/<pid>/smaps_rollup`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Mem {
    /// Resident set: private pages plus every shared page mapped (binary and library code).
    pub rss: u64,
    /// Proportional set: shared pages divided among the processes that map them.
    pub pss: u64,
    /// Anonymous (heap, stacks): the agent's own memory.
    pub anon: u64,
}

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn mem(pid: u32) -> anyhow::Result<Mem> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {name} in smaps_rollup"))
    };
    Ok(Mem {
        rss: field("Rss:")?,
        pss: field("Pss:")?,
        anon: field("Anonymous:")?,
    })
}

fn open_dir(p: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(p)?;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// Runs the measurement with `guests` guests from `guest_dir` (vmlinux, initrd.gz).
pub async fn run(guests: usize, guest_dir: &Path) -> anyhow::Result<LibvirtResult> {
    for f in ["vmlinux", "initrd.gz"] {
        if !guest_dir.join(f).is_file() {
            bail!(
                "no {f} in {}: run scripts/setup.sh first",
                guest_dir.display()
            );
        }
    }
    let node = Resources::new(64, 64 * 1024, 1000);
    let c = Cluster::start(false, 0, node).await?;
    let scratch = tempfile::tempdir()?;
    open_dir(scratch.path())?;
    let instances = scratch.path().join("instances");
    open_dir(&instances)?;
    let base = instances.join("base.qcow2");
    let ok = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&base)
        .arg("64M")
        .status()
        .context("qemu-img")?;
    if !ok.success() {
        bail!("qemu-img create failed");
    }
    let console = scratch.path().join("console");
    let pool = format!("updraft-bench-{}", std::process::id());
    let exe = std::env::current_exe()?.with_file_name("updraft-agent");
    let log_path = scratch.path().join("agent.log");
    let log = std::fs::File::create(&log_path)?;
    let state = scratch.path().join("agent");
    let args: Vec<String> = vec![
        "--set=node_id=bench-libvirt".into(),
        format!("--set=state_dir={}", state.display()),
        format!("--set=nats.url={}", c.broker.url()),
        "--set=capacity.vcpus=64".into(),
        "--set=capacity.memory_mib=65536".into(),
        "--set=capacity.disk_gib=1000".into(),
        "--set=driver.kind=libvirt".into(),
        "--set=driver.libvirt.uri=qemu:///system".into(),
        format!("--set=driver.libvirt.pool={pool}"),
        format!("--set=driver.libvirt.instances_dir={}", instances.display()),
        format!("--set=driver.libvirt.console_dir={}", console.display()),
        "--set=driver.libvirt.default_image=base.qcow2".into(),
        "--set=driver.libvirt.network=none".into(),
        format!(
            "--set=driver.libvirt.kernel={}",
            guest_dir.join("vmlinux").display()
        ),
        format!(
            "--set=driver.libvirt.initrd={}",
            guest_dir.join("initrd.gz").display()
        ),
        "--set=driver.libvirt.cmdline=console=ttyS0 quiet panic=-1".into(),
    ];
    let child = Command::new(&exe)
        .args(&args)
        .env("UPDRAFT_LOG_FORMAT", "pretty")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("start {}", exe.display()))?;
    let agent = Agent(child);
    let pid = agent.0.id();
    let d = c.dispatcher.dispatcher.clone();
    let t0 = tokio::time::Instant::now();
    while d.view().adverts().is_empty() {
        if t0.elapsed() > Duration::from_secs(90) {
            bail!(
                "the agent never registered; its log:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle = mem(pid)?;
    let mut first_line_ms = Vec::new();
    let mut marker_ms = Vec::new();
    let mut ids = Vec::new();
    for i in 0..guests {
        let id = format!("lv-{i:03}");
        let body = serde_json::json!({
            "id": id,
            "resources": { "vcpus": 1, "memory_mib": 256, "disk_gib": 1 },
        });
        d.create(&serde_json::to_vec(&body)?)
            .await
            .map_err(|e| anyhow::anyhow!("create {id}: {e:?}"))?;
        let rid = RequestId::new(id.clone())?;
        let console_log = console.join(format!("updraft-{id}.log"));
        let (mut first, mut marker) = (None, None);
        let started = tokio::time::Instant::now();
        while marker.is_none() {
            let now_ms = common::clock::now().as_millis();
            let text = std::fs::read_to_string(&console_log).unwrap_or_default();
            if first.is_none() && text.contains('\n') {
                first = Some(now_ms);
            }
            if text.contains("UPDRAFT-GUEST-READY") {
                marker = Some(now_ms);
            }
            if started.elapsed() > Duration::from_secs(180) {
                bail!("guest {id} printed no marker within 180 s: {text}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let rec = d
            .bus
            .records
            .get(&rid)
            .await?
            .context("record vanished")?
            .value;
        let claimed = rec.claim.as_ref().context("no claim")?.at.as_millis();
        if rec.state != State::Active && rec.state != State::Building {
            bail!("{id} is {}", rec.state);
        }
        first_line_ms.push(first.unwrap_or(0).saturating_sub(claimed));
        marker_ms.push(marker.unwrap_or(0).saturating_sub(claimed));
        ids.push(id);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let busy = mem(pid)?;
    for id in &ids {
        let _ = d.delete(id, false).await;
    }
    let t0 = tokio::time::Instant::now();
    loop {
        let mut left = 0;
        for id in &ids {
            let rid = RequestId::new(id.clone())?;
            if let Some(r) = d.bus.records.get(&rid).await?
                && r.value.state != State::Deleted
            {
                left += 1;
            }
        }
        if left == 0 || t0.elapsed() > Duration::from_secs(60) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let agent_log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let domain_type = agent_log
        .lines()
        .find(|l| l.contains("libvirt domain type chosen"))
        .map(|l| {
            if l.contains("\"kvm\"") {
                "kvm".to_string()
            } else {
                "qemu (TCG)".to_string()
            }
        })
        .unwrap_or_else(|| "unknown".into());
    drop(agent);
    c.stop().await;
    if let Ok(conn) = virt::connect::Connect::open(Some("qemu:///system"))
        && let Ok(p) = conn.lookup_storage_pool_by_name(&pool)
    {
        let _ = p.destroy();
        let _ = p.undefine();
    }
    Ok(LibvirtResult {
        domain_type,
        first_line_ms,
        marker_ms,
        idle,
        busy,
    })
}

/// The setup script's guest directory, relative to the workspace.
pub fn default_guest_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/guest")
}
