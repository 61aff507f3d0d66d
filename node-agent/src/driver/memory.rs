//! The in-memory driver: VMs are entries in a map, builds take a configured time and fail at
//! a configured rate. Its log is as real as libvirt's, so the invariant checker treats both
//! alike. A killed agent process takes its in-memory VMs with it, like a host that died.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use placement::{NodeId, RequestId};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{BuildLog, DomainInfo, Driver, DriverError, LogEntry, LogEvent, VmSpec};
use crate::config::MemoryDriverConfig;

/// In-memory VMs.
#[derive(Debug)]
pub struct MemoryDriver {
    node: NodeId,
    cfg: MemoryDriverConfig,
    domains: Mutex<BTreeMap<RequestId, DomainInfo>>,
    foreign: Mutex<Vec<DomainInfo>>,
    rng: Mutex<ChaCha8Rng>,
    log: BuildLog,
    healthy: AtomicBool,
}

impl MemoryDriver {
    /// A driver for `node`, logging to `log`, seeded from the node id.
    pub fn new(node: NodeId, cfg: MemoryDriverConfig, log: BuildLog) -> Self {
        let seed = placement::ids::stable_hash(&[node.as_str().as_bytes()]);
        MemoryDriver {
            node,
            cfg,
            domains: Mutex::new(BTreeMap::new()),
            foreign: Mutex::new(Vec::new()),
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)),
            log,
            healthy: AtomicBool::new(true),
        }
    }

    fn entry(
        &self,
        request: &RequestId,
        event: LogEvent,
        token: Option<String>,
        resources: Option<placement::Resources>,
    ) -> LogEntry {
        LogEntry {
            at_ms: common::clock::now().as_millis(),
            node: self.node.to_string(),
            request: request.to_string(),
            event,
            token,
            resources,
        }
    }

    /// Adds a domain updraft does not own (tests of foreign accounting).
    pub fn add_foreign(&self, d: DomainInfo) {
        self.foreign.lock().expect("foreign lock").push(d);
    }

    /// Makes the hypervisor look down or up.
    pub fn set_healthy(&self, up: bool) {
        self.healthy.store(up, Ordering::SeqCst);
    }

    /// Removes a VM behind updraft's back (a VM that vanished).
    pub fn vanish(&self, request: &RequestId) {
        if self
            .domains
            .lock()
            .expect("domains lock")
            .remove(request)
            .is_some()
        {
            self.log
                .append(&self.entry(request, LogEvent::Destroyed, None, None));
        }
    }

    /// Pretends a VM is already running (adoption tests).
    pub fn insert_running(&self, d: DomainInfo) {
        if let Some(r) = d.request.clone() {
            self.log.append(&self.entry(
                &r,
                LogEvent::Created,
                d.token.map(|t| t.to_string()),
                Some(d.resources.clone()),
            ));
            self.domains.lock().expect("domains lock").insert(r, d);
        }
    }
}

#[async_trait]
impl Driver for MemoryDriver {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn create(&self, vm: &VmSpec) -> Result<DomainInfo, DriverError> {
        self.health().await?;
        if let Some(d) = self.domains.lock().expect("domains lock").get(&vm.request) {
            return Ok(d.clone());
        }
        let (delay, fail) = {
            let mut rng = self.rng.lock().expect("rng lock");
            let jitter_ms = placement::time::duration_ms(self.cfg.build_jitter);
            let extra = if jitter_ms > 0 {
                rng.random_range(0..=jitter_ms)
            } else {
                0
            };
            let fail = self.cfg.failure_rate > 0.0 && rng.random_bool(self.cfg.failure_rate);
            (self.cfg.build_time + Duration::from_millis(extra), fail)
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if fail {
            return Err(DriverError::Failed(
                "injected build failure (driver.memory.failure_rate)".into(),
            ));
        }
        let d = DomainInfo {
            name: format!("updraft-{}", vm.request),
            request: Some(vm.request.clone()),
            token: Some(vm.token),
            resources: vm.resources.clone(),
            running: true,
        };
        let mut domains = self.domains.lock().expect("domains lock");
        if let Some(existing) = domains.get(&vm.request) {
            return Ok(existing.clone());
        }
        domains.insert(vm.request.clone(), d.clone());
        self.log.append(&self.entry(
            &vm.request,
            LogEvent::Created,
            Some(vm.token.to_string()),
            Some(vm.resources.clone()),
        ));
        Ok(d)
    }

    async fn destroy(&self, request: &RequestId) -> Result<(), DriverError> {
        self.health().await?;
        if self
            .domains
            .lock()
            .expect("domains lock")
            .remove(request)
            .is_some()
        {
            self.log
                .append(&self.entry(request, LogEvent::Destroyed, None, None));
        }
        Ok(())
    }

    async fn list(&self) -> Result<Vec<DomainInfo>, DriverError> {
        self.health().await?;
        let mut v: Vec<DomainInfo> = self
            .domains
            .lock()
            .expect("domains lock")
            .values()
            .cloned()
            .collect();
        v.extend(self.foreign.lock().expect("foreign lock").iter().cloned());
        Ok(v)
    }

    async fn health(&self) -> Result<(), DriverError> {
        if self.healthy.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(DriverError::Unavailable("memory driver marked down".into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use placement::{ClaimToken, Epoch, Resources};

    fn vm(id: &str) -> VmSpec {
        VmSpec {
            request: RequestId::new(id).unwrap(),
            resources: Resources::new(1, 512, 1),
            image: None,
            metadata: Default::default(),
            node: NodeId::new("n1").unwrap(),
            epoch: Epoch(1),
            token: ClaimToken(7),
        }
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn create_is_idempotent_and_logged() {
        let dir = tempfile::tempdir().unwrap();
        let d = MemoryDriver::new(
            NodeId::new("n1").unwrap(),
            MemoryDriverConfig::default(),
            BuildLog::in_dir(dir.path()),
        );
        let a = d.create(&vm("a")).await.unwrap();
        let again = d.create(&vm("a")).await.unwrap();
        assert_eq!(a, again);
        d.destroy(&RequestId::new("a").unwrap()).await.unwrap();
        d.destroy(&RequestId::new("a").unwrap()).await.unwrap();
        let log = BuildLog::read(&dir.path().join("driver-log.jsonl")).unwrap();
        let events: Vec<LogEvent> = log.iter().map(|e| e.event).collect();
        assert_eq!(events, vec![LogEvent::Created, LogEvent::Destroyed]);
        assert_eq!(log[0].token.as_deref(), Some("0000000000000007"));
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn failures_and_outages() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = MemoryDriverConfig {
            failure_rate: 1.0,
            ..Default::default()
        };
        let d = MemoryDriver::new(
            NodeId::new("n1").unwrap(),
            cfg,
            BuildLog::in_dir(dir.path()),
        );
        assert!(matches!(
            d.create(&vm("a")).await,
            Err(DriverError::Failed(_))
        ));
        d.set_healthy(false);
        assert!(matches!(d.list().await, Err(DriverError::Unavailable(_))));
    }
}
