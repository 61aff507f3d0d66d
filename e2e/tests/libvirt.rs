#![allow(clippy::unwrap_used, clippy::tests_outside_test_module)] // test code: a panic is the failure report

//! The libvirt driver end to end.
//!
//! * Reconcile against libvirt's test driver (`test:///default`, shared by every connection
//!   of this process): a restarted agent adopts the domains its records give it, frees the
//!   capacity of a VM that vanished, destroys an updraft domain no record backs, and counts a
//!   foreign domain against capacity without touching it.
//! * A real guest on `qemu:///system` (libvirtd started by the setup script; TCG here, KVM
//!   where the probe finds it works): a request becomes a running guest whose serial console
//!   prints the init's marker; deleting the server removes the domain and its disk.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use e2e::harness::{AgentHandle, Harness, HarnessOptions, is_active};
use node_agent::config::{DomainTypeSetting, DriverKind, LibvirtConfig};
use node_agent::driver::libvirt::LibvirtDriver;
use node_agent::driver::{BuildLog, Driver, VmSpec};
use placement::lifecycle::State;
use placement::{ClaimToken, Epoch, NodeId, RequestId, Resources};
use serde_json::json;
use virt::connect::Connect;

fn test_driver_cfg(dir: &Path) -> LibvirtConfig {
    LibvirtConfig {
        uri: "test:///default".into(),
        domain_type: DomainTypeSetting::Auto,
        pool: "updraft-rec".into(),
        instances_dir: dir.join("instances"),
        console_dir: dir.join("console"),
        network: "none".into(),
        ..Default::default()
    }
}

fn agent_of(h: &mut Harness, node: &str) -> std::sync::Arc<node_agent::agent::Agent> {
    match &h.agent(node).handle {
        AgentHandle::InProcess { agent, .. } => agent.clone(),
        AgentHandle::Process(_) => unreachable!(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reconcile_adopts_frees_destroys_orphans_and_counts_foreign() {
    let mut h = Harness::start(HarnessOptions::default()).await.unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let lv = test_driver_cfg(scratch.path());
    let totals = Resources::new(32, 64 * 1024, 2000);
    let setup = |c: &mut node_agent::config::Config| {
        c.driver.kind = DriverKind::Libvirt;
        c.driver.libvirt = lv.clone();
    };
    h.add_agent_with("lv1", totals.clone(), setup)
        .await
        .unwrap();
    h.wait_nodes(1, Duration::from_secs(20)).await.unwrap();
    let ids: Vec<String> = vec!["rec-a".into(), "rec-b".into()];
    for id in &ids {
        let (st, body) = h
            .create(0, &json!({ "id": id, "flavor": "m1.small" }))
            .await
            .unwrap();
        assert_eq!(st, 201, "{body}");
    }
    h.wait_for(&ids, Duration::from_secs(20), is_active)
        .await
        .unwrap();
    virt::error::clear_error_callback();
    let conn = Connect::open(Some("test:///default")).unwrap();
    for id in &ids {
        assert!(
            conn.lookup_domain_by_name(&format!("updraft-{id}"))
                .unwrap()
                .is_active()
                .unwrap()
        );
    }

    // foreign: the test driver's own running `test` domain counts against capacity
    let test_dom = conn.lookup_domain_by_name("test").unwrap();
    let info = test_dom.info().unwrap();
    let agent = agent_of(&mut h, "lv1");
    agent.reconcile().await;
    {
        let inner = agent.lock();
        assert_eq!(inner.ledger.foreign().vcpus, info.nr_virt_cpu);
        assert_eq!(inner.ledger.foreign().memory_mib, info.max_mem / 1024);
    }

    // vanished: a VM destroyed behind the agent's back frees its capacity, and its request
    // fails with the reason
    let b = conn.lookup_domain_by_name("updraft-rec-b").unwrap();
    b.destroy().unwrap();
    b.undefine().unwrap();
    let report = agent.reconcile().await;
    assert_eq!(report.vanished, 1, "{report:?}");
    let rb = RequestId::new("rec-b").unwrap();
    assert!(agent.lock().ledger.get(&rb).is_none());
    let recs = h
        .wait_for(&["rec-b".into()], Duration::from_secs(10), |r| {
            r.state == State::Failed
        })
        .await
        .unwrap();
    assert!(
        recs[0].reason.as_deref().unwrap().contains("vanished"),
        "{:?}",
        recs[0].reason
    );

    // orphan: an updraft domain (our metadata) that no record gives to this node
    let orphan = LibvirtDriver::new(
        NodeId::new("lv1").unwrap(),
        lv.clone(),
        BuildLog::new(scratch.path().join("orphan-log.jsonl")),
    )
    .unwrap();
    orphan
        .create(&VmSpec {
            request: RequestId::new("rec-orphan").unwrap(),
            resources: Resources::new(1, 512, 1),
            image: None,
            metadata: BTreeMap::new(),
            node: NodeId::new("lv1").unwrap(),
            epoch: Epoch(1),
            token: ClaimToken(42),
        })
        .await
        .unwrap();

    // adopt: the agent restarts (new epoch); while it was away its lease ended and its VM
    // went host_down; the restarted agent adopts the VM its record gives it, re-confirms it
    // (active again), and destroys the orphan
    h.stop_agent("lv1").await;
    h.wait_for(&["rec-a".into()], Duration::from_secs(20), |r| {
        r.state == State::HostDown
    })
    .await
    .unwrap();
    h.add_agent_with("lv1", totals.clone(), setup)
        .await
        .unwrap();
    let agent = agent_of(&mut h, "lv1");
    let ra = RequestId::new("rec-a").unwrap();
    assert!(
        agent.lock().ledger.get(&ra).is_some_and(|a| a.adopted),
        "the running VM is adopted into the new ledger"
    );
    let back = h
        .wait_for(&["rec-a".into()], Duration::from_secs(20), is_active)
        .await
        .unwrap();
    assert!(
        back[0].attempt == 1,
        "the same claim, re-confirmed, not a rebuild"
    );
    assert!(conn.lookup_domain_by_name("updraft-rec-orphan").is_err());
    // the foreign domain was never touched
    assert!(test_dom.is_active().unwrap());
    h.shutdown().await;
}

/// The test guest the setup script builds (kernel + initramfs).
fn guest_dir() -> PathBuf {
    let dir = std::env::var_os("UPDRAFT_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/guest"));
    assert!(
        dir.join("vmlinux").is_file() && dir.join("initrd.gz").is_file(),
        "no test guest in {}: run scripts/setup.sh (it builds one from Debian packages)",
        dir.display()
    );
    // libvirt runs QEMU as its own user, which must reach the kernel and initramfs: a clone
    // under a private directory (mktemp -d makes 0700 ones) cannot boot the guest
    let dir = dir.canonicalize().unwrap();
    for a in dir.ancestors() {
        let mode = std::fs::metadata(a).unwrap().permissions().mode();
        assert!(
            mode & 0o001 != 0,
            "libvirt's QEMU user cannot reach the test guest in {}: {} is not world-traversable \
             (chmod o+x it, or set UPDRAFT_GUEST_DIR to a guest elsewhere)",
            dir.display(),
            a.display()
        );
    }
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_becomes_a_running_guest_and_its_delete_removes_domain_and_disk() {
    let guest = guest_dir();
    virt::error::clear_error_callback();
    let conn = Connect::open(Some("qemu:///system"))
        .expect("libvirtd on qemu:///system (scripts/setup.sh starts it)");
    let mut h = Harness::start(HarnessOptions::default()).await.unwrap();
    // the instance dir must be reachable by the QEMU user libvirt runs guests as
    let scratch = tempfile::tempdir().unwrap();
    std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let instances = scratch.path().join("instances");
    std::fs::create_dir_all(&instances).unwrap();
    std::fs::set_permissions(&instances, std::fs::Permissions::from_mode(0o755)).unwrap();
    let base = instances.join("base.qcow2");
    let made = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&base)
        .arg("64M")
        .status()
        .unwrap();
    assert!(made.success());
    let console = scratch.path().join("console");
    let pool = format!("updraft-e2e-{}", std::process::id());
    let args = vec![
        "--set=driver.kind=libvirt".to_string(),
        "--set=driver.libvirt.uri=qemu:///system".to_string(),
        format!("--set=driver.libvirt.pool={pool}"),
        format!("--set=driver.libvirt.instances_dir={}", instances.display()),
        format!("--set=driver.libvirt.console_dir={}", console.display()),
        "--set=driver.libvirt.default_image=base.qcow2".to_string(),
        "--set=driver.libvirt.network=none".to_string(),
        format!(
            "--set=driver.libvirt.kernel={}",
            guest.join("vmlinux").display()
        ),
        format!(
            "--set=driver.libvirt.initrd={}",
            guest.join("initrd.gz").display()
        ),
        "--set=driver.libvirt.cmdline=console=ttyS0 quiet panic=-1".to_string(),
        "--set=driver.libvirt.boot_timeout=60s".to_string(),
        "--set=driver.libvirt.probe_timeout=8s".to_string(),
    ];
    h.spawn_agent("guest-host", Resources::new(4, 4096, 100), &args)
        .unwrap();
    h.wait_nodes(1, Duration::from_secs(60)).await.unwrap();
    let (st, body) = h
        .create(
            0,
            &json!({ "id": "guest-1",
                     "resources": { "vcpus": 1, "memory_mib": 256, "disk_gib": 1 },
                     "metadata": { "purpose": "e2e" } }),
        )
        .await
        .unwrap();
    assert_eq!(st, 201, "{body}");
    h.wait_for(&["guest-1".into()], Duration::from_secs(120), is_active)
        .await
        .unwrap();
    let dom = conn.lookup_domain_by_name("updraft-guest-1").unwrap();
    assert!(dom.is_active().unwrap());
    let xml = dom.xml_desc(0).unwrap();
    assert!(
        xml.contains("base.qcow2"),
        "the disk is an overlay on the base: {xml}"
    );
    let disk = instances.join("updraft-guest-1.qcow2");
    assert!(disk.is_file());
    // the guest booted: its init's marker is on the serial console
    let log = console.join("updraft-guest-1.log");
    let t0 = tokio::time::Instant::now();
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("UPDRAFT-GUEST-READY") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "no marker on the console after 90s: {text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // delete: the domain and its disk go, the record says deleted
    let (st, body) = h.delete(0, "guest-1").await.unwrap();
    assert!(st == 200 || st == 202, "{st} {body}");
    h.wait_for(&["guest-1".into()], Duration::from_secs(60), |r| {
        r.state == State::Deleted
    })
    .await
    .unwrap();
    assert!(conn.lookup_domain_by_name("updraft-guest-1").is_err());
    assert!(!disk.exists(), "the overlay disk is removed");
    assert!(base.exists(), "the base image stays");
    let report = h.check().await.unwrap();
    assert!(report.clean(), "{:#?}", report.violations);
    assert_eq!(report.builds, 1);
    // the domain type came from the probe guest, not from /dev/kvm
    let agent_log = h.agent("guest-host").process().log_text();
    let chosen = agent_log
        .lines()
        .find(|l| l.contains("libvirt domain type chosen"))
        .unwrap_or_else(|| panic!("no probe outcome in the agent log:\n{agent_log}"));
    eprintln!("{chosen}");
    h.shutdown().await;
    if let Ok(p) = conn.lookup_storage_pool_by_name(&pool) {
        let _ = p.destroy();
        let _ = p.undefine();
    }
}
