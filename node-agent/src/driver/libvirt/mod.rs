//! The libvirt driver: real domains through the `virt` crate.
//!
//! * Create: the domain's name and UUID derive from the request id, so a retry finds the
//!   domain a previous try made; its disk is a qcow2 overlay (a volume of the configured
//!   directory pool) on a base image volume; its metadata carries the request id, the claim
//!   and the size it holds; then define, start, and wait until it runs.
//! * Destroy: destroy, undefine, delete the disk. A missing domain is success; a domain
//!   without updraft's metadata is never touched.
//! * List: every domain, ours (with metadata) and foreign (counted against capacity).
//!
//! libvirt calls block, so each runs on tokio's blocking pool. A libvirt connection is
//! thread-safe (`virConnectPtr` may be shared by threads), so builds do not queue behind one
//! another. When libvirt goes away the driver reports [`DriverError::Unavailable`] and
//! reconnects with backoff on later calls; the agent's health loop turns that into an
//! unhealthy advert and a reconcile once libvirt answers again.

pub mod probe;
pub mod xml;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use placement::{NodeId, RequestId, Resources};
use tokio::time::Instant;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::{Error as VirtError, ErrorNumber};
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;
use virt::sys;

use self::xml::{DomainSpec, DomainType, Instance, KernelBoot, Network};
use super::{BuildLog, DomainInfo, Driver, DriverError, LogEntry, LogEvent, VmSpec};
use crate::config::{DomainTypeSetting, LibvirtConfig};

const GIB: u64 = 1 << 30;

/// Connection state, shared by the blocking calls.
struct State {
    conn: Option<Connect>,
    failures: u32,
    retry_at: Option<Instant>,
    last_error: String,
}

/// The libvirt driver.
pub struct LibvirtDriver {
    node: NodeId,
    cfg: LibvirtConfig,
    network: Network,
    log: BuildLog,
    state: Arc<Mutex<State>>,
    /// The domain type, chosen once (the probe takes seconds; builds wait for it, other
    /// calls do not).
    kind: Arc<Mutex<Option<DomainType>>>,
}

impl std::fmt::Debug for LibvirtDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LibvirtDriver")
            .field("node", &self.node)
            .field("uri", &self.cfg.uri)
            .finish_non_exhaustive()
    }
}

/// The text of a libvirt error, with what we were doing.
fn text(what: &str, e: &VirtError) -> String {
    format!("{what}: {}", e.message())
}

fn code_is(e: &VirtError, n: ErrorNumber) -> bool {
    e.code().is_known_and(|c| c == n)
}

/// True for errors that mean the connection itself is gone.
fn is_connection_error(e: &VirtError) -> bool {
    e.code().is_known_and(|c| {
        matches!(
            c,
            ErrorNumber::NoConnect
                | ErrorNumber::InvalidConn
                | ErrorNumber::SystemError
                | ErrorNumber::Rpc
                | ErrorNumber::AuthFailed
                | ErrorNumber::AuthUnavailable
                | ErrorNumber::NoServer
        )
    })
}

/// Maps a libvirt error to a driver error, keeping libvirt's text.
fn classify(what: &str, e: &VirtError) -> DriverError {
    let t = text(what, e);
    let lower = e.message().to_ascii_lowercase();
    if is_connection_error(e) {
        DriverError::Unavailable(t)
    } else if lower.contains("no space left")
        || lower.contains("not enough space")
        || lower.contains("not enough free space")
    {
        DriverError::Exhausted(t)
    } else if e.code().is_known_and(|c| {
        matches!(
            c,
            ErrorNumber::XmlError
                | ErrorNumber::XmlDetail
                | ErrorNumber::XmlInvalidSchema
                | ErrorNumber::ConfigUnsupported
                | ErrorNumber::InvalidArg
                | ErrorNumber::NoSupport
                | ErrorNumber::OperationUnsupported
                | ErrorNumber::NoStorageVolume
                | ErrorNumber::NoStoragePool
                | ErrorNumber::NoNetwork
                | ErrorNumber::NoKernel
        )
    }) {
        DriverError::Rejected(t)
    } else {
        DriverError::Failed(t)
    }
}

impl LibvirtDriver {
    /// A driver for `node` on `cfg.uri`. It connects on first use (and now, in the
    /// background of the first call), so an agent starts even while libvirt is down.
    pub fn new(node: NodeId, cfg: LibvirtConfig, log: BuildLog) -> Result<Self, DriverError> {
        let network = Network::parse(&cfg.network).ok_or_else(|| {
            DriverError::Rejected(format!(
                "driver.libvirt.network `{}` is invalid",
                cfg.network
            ))
        })?;
        // libvirt prints every error on stderr by default; we report them ourselves
        virt::error::clear_error_callback();
        Ok(LibvirtDriver {
            node,
            network,
            log,
            state: Arc::new(Mutex::new(State {
                conn: None,
                failures: 0,
                retry_at: None,
                last_error: String::new(),
            })),
            kind: Arc::new(Mutex::new(None)),
            cfg,
        })
    }

    /// The domain type in use (after the first successful connection).
    pub fn domain_type(&self) -> Option<DomainType> {
        *self.kind.lock().expect("libvirt kind lock")
    }

    /// Runs `f` on the blocking pool with a live connection.
    async fn call<T, F>(&self, f: F) -> Result<T, DriverError>
    where
        T: Send + 'static,
        F: FnOnce(&Ctx<'_>) -> Result<T, DriverError> + Send + 'static,
    {
        let state = self.state.clone();
        let kind = self.kind.clone();
        let cfg = self.cfg.clone();
        let network = self.network.clone();
        tokio::task::spawn_blocking(move || {
            let conn = connection(&state, &cfg)?;
            let ctx = Ctx {
                conn: &conn,
                kind: &kind,
                cfg: &cfg,
                network: &network,
            };
            let out = f(&ctx);
            if let Err(DriverError::Unavailable(why)) = &out {
                let mut s = state.lock().expect("libvirt state lock");
                s.conn = None;
                s.last_error = why.clone();
            }
            out
        })
        .await
        .map_err(|e| DriverError::Failed(format!("libvirt call panicked or was cancelled: {e}")))?
    }

    fn entry(&self, request: &RequestId, event: LogEvent, vm: Option<&VmSpec>) -> LogEntry {
        LogEntry {
            at_ms: common::clock::now().as_millis(),
            node: self.node.to_string(),
            request: request.to_string(),
            event,
            token: vm.map(|v| v.token.to_string()),
            resources: vm.map(|v| v.resources.clone()),
        }
    }
}

/// A live connection and what the calls need.
struct Ctx<'a> {
    conn: &'a Connect,
    kind: &'a Mutex<Option<DomainType>>,
    cfg: &'a LibvirtConfig,
    network: &'a Network,
}

/// The cached connection, or a new one.
fn connection(state: &Mutex<State>, cfg: &LibvirtConfig) -> Result<Connect, DriverError> {
    {
        let mut s = state.lock().expect("libvirt state lock");
        if let Some(c) = &s.conn {
            if c.is_alive().unwrap_or(false) {
                return Ok(c.clone());
            }
            s.conn = None;
            s.last_error = "the libvirt connection was lost".into();
        }
        if let Some(at) = s.retry_at
            && Instant::now() < at
        {
            return Err(DriverError::Unavailable(format!(
                "libvirt at {} unreachable ({}); next attempt in {:?}",
                cfg.uri,
                s.last_error,
                at - Instant::now()
            )));
        }
    }
    let opened =
        Connect::open(Some(&cfg.uri)).map_err(|e| text(&format!("connect {}", cfg.uri), &e));
    let mut s = state.lock().expect("libvirt state lock");
    let conn = match opened {
        Ok(c) => c,
        Err(why) => {
            s.failures = s.failures.saturating_add(1);
            let backoff = Duration::from_millis(500)
                .saturating_mul(1u32 << s.failures.min(8))
                .min(cfg.max_reconnect_backoff);
            s.retry_at = Some(Instant::now() + backoff);
            s.last_error = why.clone();
            return Err(DriverError::Unavailable(why));
        }
    };
    if s.failures > 0 {
        tracing::info!(uri = %cfg.uri, "libvirt reachable again");
    }
    s.conn = Some(conn.clone());
    s.failures = 0;
    s.retry_at = None;
    Ok(conn)
}

impl Ctx<'_> {
    /// The domain type: configured, or probed on first use and kept.
    fn domain_type(&self) -> DomainType {
        let mut k = self.kind.lock().expect("libvirt kind lock");
        if let Some(t) = *k {
            return t;
        }
        let t = match self.cfg.domain_type {
            DomainTypeSetting::Kvm => DomainType::Kvm,
            DomainTypeSetting::Qemu => DomainType::Qemu,
            DomainTypeSetting::Test => DomainType::Test,
            DomainTypeSetting::Auto => {
                let out = probe::choose(
                    self.conn,
                    &self.cfg.instances_dir.join(".probe"),
                    self.cfg.probe_timeout,
                );
                tracing::info!(domain_type = out.kind.as_str(), why = %out.why, "libvirt domain type chosen");
                out.kind
            }
        };
        *k = Some(t);
        t
    }

    /// The instance pool, defined, built and started when missing.
    fn pool(&self) -> Result<StoragePool, DriverError> {
        let name = &self.cfg.pool;
        let pool = match self.conn.lookup_storage_pool_by_name(name) {
            Ok(p) => p,
            Err(e) if code_is(&e, ErrorNumber::NoStoragePool) => {
                let xml = xml::pool_xml(name, &self.cfg.instances_dir);
                match self.conn.define_storage_pool_xml(&xml, 0) {
                    Ok(p) => {
                        p.build(0)
                            .map_err(|e| classify(&format!("build storage pool {name}"), &e))?;
                        let _ = p.set_autostart(true);
                        tracing::info!(pool = %name, dir = %self.cfg.instances_dir.display(), "defined the instance pool");
                        p
                    }
                    // a concurrent build defined it first
                    Err(e) => self
                        .conn
                        .lookup_storage_pool_by_name(name)
                        .map_err(|_| classify(&format!("define storage pool {name}"), &e))?,
                }
            }
            Err(e) => return Err(classify(&format!("look up storage pool {name}"), &e)),
        };
        if !pool.is_active().unwrap_or(false)
            && let Err(e) = pool.create(0)
            && !pool.is_active().unwrap_or(false)
        {
            return Err(classify(&format!("start storage pool {name}"), &e));
        }
        Ok(pool)
    }

    /// A volume of the pool by name, refreshing the pool once (files copied in by hand).
    fn volume(&self, pool: &StoragePool, name: &str) -> Result<Option<StorageVol>, DriverError> {
        for attempt in 0..2 {
            match pool.lookup_storage_vol_by_name(name) {
                Ok(v) => return Ok(Some(v)),
                Err(e) if code_is(&e, ErrorNumber::NoStorageVolume) => {
                    if attempt == 0 {
                        let _ = pool.refresh(0);
                    }
                }
                Err(e) => return Err(classify(&format!("look up volume {name}"), &e)),
            }
        }
        Ok(None)
    }

    fn delete_volume(&self, pool: &StoragePool, name: &str) -> Result<(), DriverError> {
        if let Some(v) = self.volume(pool, name)? {
            v.delete(0)
                .map_err(|e| classify(&format!("delete volume {name}"), &e))?;
        }
        Ok(())
    }

    /// The request's disk: an overlay on its base image, or a blank disk; `None` when the
    /// request has neither a size nor an image.
    fn make_disk(&self, vm: &VmSpec) -> Result<Option<String>, DriverError> {
        let base = vm.image.as_deref().or(self.cfg.default_image.as_deref());
        if base.is_none() && vm.resources.disk_gib == 0 {
            return Ok(None);
        }
        let pool = self.pool()?;
        let backing = match base {
            Some(b) => {
                if !xml::is_volume_name(b) {
                    return Err(DriverError::Rejected(format!(
                        "image `{b}` is not a volume name of pool {}",
                        self.cfg.pool
                    )));
                }
                let vol = self.volume(&pool, b)?.ok_or_else(|| {
                    DriverError::Rejected(format!(
                        "image `{b}` not found in storage pool {} ({})",
                        self.cfg.pool,
                        self.cfg.instances_dir.display()
                    ))
                })?;
                let path = vol
                    .path()
                    .map_err(|e| classify(&format!("path of image {b}"), &e))?;
                let desc = vol
                    .xml_desc(0)
                    .map_err(|e| classify(&format!("describe image {b}"), &e))?;
                let capacity = vol.info().map(|i| i.capacity).unwrap_or(0);
                Some((path, xml::volume_format(&desc), capacity))
            }
            None => None,
        };
        let name = xml::volume_name(&vm.request);
        // a volume left by a build that died before its domain was defined
        self.delete_volume(&pool, &name)?;
        let want = vm.resources.disk_gib.saturating_mul(GIB);
        let bytes = want
            .max(backing.as_ref().map(|b| b.2).unwrap_or(0))
            .max(GIB);
        let desc = xml::volume_xml(
            &name,
            bytes,
            backing.as_ref().map(|(p, f, _)| (p.as_str(), f.as_str())),
        );
        let vol = StorageVol::create_xml(&pool, &desc, 0)
            .map_err(|e| classify(&format!("create disk {name}"), &e))?;
        vol.path()
            .map(Some)
            .map_err(|e| classify(&format!("path of disk {name}"), &e))
    }

    fn console_log(&self, id: &RequestId) -> PathBuf {
        self.cfg
            .console_dir
            .join(format!("{}.log", xml::domain_name(id)))
    }

    /// Finds the domain of `id`: `Ok(None)` when there is none.
    fn find(&self, id: &RequestId) -> Result<Option<Domain>, DriverError> {
        let name = xml::domain_name(id);
        match self.conn.lookup_domain_by_name(&name) {
            Ok(d) => Ok(Some(d)),
            Err(e) if code_is(&e, ErrorNumber::NoDomain) => Ok(None),
            Err(e) => Err(classify(&format!("look up domain {name}"), &e)),
        }
    }

    fn create(&self, vm: &VmSpec) -> Result<DomainInfo, DriverError> {
        let name = xml::domain_name(&vm.request);
        if let Some(dom) = self.find(&vm.request)? {
            match instance_of(&dom) {
                Some(inst) if inst.token == vm.token => {
                    // a retry under the same claim: the domain is the one we made
                    if !dom.is_active().unwrap_or(false) {
                        dom.create()
                            .map_err(|e| classify(&format!("start domain {name}"), &e))?;
                    }
                    self.wait_running(&dom, &name)?;
                    return Ok(info_of(&dom, Some(&inst)));
                }
                Some(_) => {
                    // left by an earlier claim of this request on this node: it is stale
                    tracing::warn!(request.id = %vm.request, "replacing a domain left by an earlier claim");
                    self.remove(&vm.request, &dom)?;
                }
                None => {
                    return Err(DriverError::Rejected(format!(
                        "a domain named {name} exists without updraft's metadata; it is left alone"
                    )));
                }
            }
        }
        let disk = self.make_disk(vm)?;
        let dir = &self.cfg.console_dir;
        std::fs::create_dir_all(dir).map_err(|e| {
            DriverError::Failed(format!("create console dir {}: {e}", dir.display()))
        })?;
        let inst = Instance {
            request: vm.request.clone(),
            node: vm.node.clone(),
            epoch: vm.epoch,
            token: vm.token,
            resources: vm.resources.clone(),
            metadata: vm.metadata.clone(),
        };
        let log = self.console_log(&vm.request);
        let kernel = self.cfg.kernel.as_deref().map(|k| KernelBoot {
            kernel: k,
            initrd: self.cfg.initrd.as_deref(),
            cmdline: &self.cfg.cmdline,
        });
        let desc = xml::domain_xml(&DomainSpec {
            kind: self.domain_type(),
            instance: &inst,
            disk: disk.as_deref(),
            disk_format: "qcow2",
            network: self.network,
            kernel,
            console_log: &log,
            machine: self.cfg.machine.as_deref(),
        });
        let cleanup_disk = || {
            if disk.is_some()
                && let Ok(pool) = self.pool()
            {
                let _ = self.delete_volume(&pool, &xml::volume_name(&vm.request));
            }
        };
        let dom = match self.conn.define_domain_xml(&desc) {
            Ok(d) => d,
            Err(e) => {
                cleanup_disk();
                let mut err = classify(&format!("define domain {name}"), &e);
                if let DriverError::Failed(t) = err {
                    err = DriverError::Rejected(t);
                }
                return Err(err);
            }
        };
        if let Err(e) = dom
            .create()
            .map_err(|e| classify(&format!("start domain {name}"), &e))
        {
            let _ = dom.undefine();
            cleanup_disk();
            return Err(e);
        }
        if let Err(e) = self.wait_running(&dom, &name) {
            let _ = dom.destroy();
            let _ = dom.undefine();
            cleanup_disk();
            return Err(e);
        }
        Ok(info_of(&dom, Some(&inst)))
    }

    fn wait_running(&self, dom: &Domain, name: &str) -> Result<(), DriverError> {
        use virt::domain::DomainState;
        let t0 = Instant::now();
        loop {
            let (state, _) = dom
                .state()
                .map_err(|e| classify(&format!("state of domain {name}"), &e))?;
            match state.unwrap_or(DomainState::NoState) {
                DomainState::Running | DomainState::Blocked => return Ok(()),
                DomainState::Shutoff | DomainState::Crashed | DomainState::Shutdown => {
                    return Err(DriverError::Failed(format!(
                        "domain {name} stopped while starting ({state:?})"
                    )));
                }
                _ => {}
            }
            if t0.elapsed() >= self.cfg.boot_timeout {
                return Err(DriverError::Failed(format!(
                    "domain {name} not running after {:?} ({state:?})",
                    self.cfg.boot_timeout
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Destroys, undefines and deletes the disk of a domain of ours.
    fn remove(&self, id: &RequestId, dom: &Domain) -> Result<(), DriverError> {
        let name = xml::domain_name(id);
        if dom.is_active().unwrap_or(false)
            && let Err(e) = dom.destroy()
            && !code_is(&e, ErrorNumber::OperationInvalid)
        {
            return Err(classify(&format!("destroy domain {name}"), &e));
        }
        let flags = sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            | sys::VIR_DOMAIN_UNDEFINE_NVRAM;
        if let Err(e) = dom.undefine_flags(flags) {
            let gone = code_is(&e, ErrorNumber::NoDomain);
            // drivers without those flags take a plain undefine
            if !gone
                && let Err(e) = dom.undefine()
                && !code_is(&e, ErrorNumber::NoDomain)
                && !code_is(&e, ErrorNumber::OperationInvalid)
            {
                return Err(classify(&format!("undefine domain {name}"), &e));
            }
        }
        let pool = self.pool()?;
        self.delete_volume(&pool, &xml::volume_name(id))
    }

    fn destroy(&self, id: &RequestId) -> Result<bool, DriverError> {
        let existed = match self.find(id)? {
            Some(dom) => {
                if instance_of(&dom).is_none() {
                    return Err(DriverError::Rejected(format!(
                        "domain {} has no updraft metadata; it is not destroyed",
                        xml::domain_name(id)
                    )));
                }
                self.remove(id, &dom)?;
                true
            }
            None => {
                // no domain; a disk may be left by a build that died before defining it
                let pool = self.pool()?;
                self.delete_volume(&pool, &xml::volume_name(id))?;
                false
            }
        };
        Ok(existed)
    }

    fn list(&self) -> Result<Vec<DomainInfo>, DriverError> {
        let doms = self
            .conn
            .list_all_domains(0)
            .map_err(|e| classify("list domains", &e))?;
        Ok(doms
            .iter()
            .map(|d| {
                let inst = instance_of(d);
                info_of(d, inst.as_ref())
            })
            .collect())
    }
}

/// Our metadata on a domain, when it has any.
fn instance_of(dom: &Domain) -> Option<Instance> {
    let raw = dom
        .metadata(
            i32::try_from(sys::VIR_DOMAIN_METADATA_ELEMENT).unwrap_or(2),
            Some(xml::METADATA_NS),
            0,
        )
        .ok()?;
    match Instance::parse(&raw) {
        Ok(i) => Some(i),
        Err(e) => {
            tracing::warn!(error = %e, "domain carries unreadable updraft metadata; treated as foreign");
            None
        }
    }
}

fn info_of(dom: &Domain, inst: Option<&Instance>) -> DomainInfo {
    let name = dom.name().unwrap_or_default();
    let running = dom.is_active().unwrap_or(false);
    match inst {
        Some(i) => DomainInfo {
            name,
            request: Some(i.request.clone()),
            token: Some(i.token),
            resources: i.resources.clone(),
            running,
        },
        None => {
            let (vcpus, mem) = dom
                .info()
                .map(|i| (i.nr_virt_cpu, i.max_mem / 1024))
                .unwrap_or((0, 0));
            DomainInfo {
                name,
                request: None,
                token: None,
                resources: Resources::new(vcpus, mem, 0),
                running,
            }
        }
    }
}

#[async_trait]
impl Driver for LibvirtDriver {
    fn kind(&self) -> &'static str {
        "libvirt"
    }

    async fn create(&self, vm: &VmSpec) -> Result<DomainInfo, DriverError> {
        let spec = vm.clone();
        let info = self.call(move |c| c.create(&spec)).await?;
        self.log
            .append(&self.entry(&vm.request, LogEvent::Created, Some(vm)));
        Ok(info)
    }

    async fn destroy(&self, request: &RequestId) -> Result<(), DriverError> {
        let id = request.clone();
        let existed = self.call(move |c| c.destroy(&id)).await?;
        if existed {
            self.log
                .append(&self.entry(request, LogEvent::Destroyed, None));
        }
        Ok(())
    }

    async fn list(&self) -> Result<Vec<DomainInfo>, DriverError> {
        self.call(|c| c.list()).await
    }

    async fn host(&self) -> Result<Option<(u32, u64)>, DriverError> {
        self.call(|c| {
            let n = c.conn.node_info().map_err(|e| classify("node info", &e))?;
            Ok(Some((n.cpus, n.memory / 1024)))
        })
        .await
    }

    async fn prepare(&self) -> Result<(), DriverError> {
        self.call(|c| {
            c.domain_type();
            Ok(())
        })
        .await
    }

    async fn health(&self) -> Result<(), DriverError> {
        self.call(|c| {
            c.conn
                .num_of_domains()
                .map(|_| ())
                .map_err(|e| classify("libvirt health check", &e))
        })
        .await
    }
}
