//! The node-agent's settings. Every key is documented here and mirrored, with its default, in
//! deploy/config/node-agent.toml. Environment: `UPDRAFT_AGENT_<KEY>` (`__` for nesting).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bus::NatsConfig;
use placement::pull::PullConfig;
use placement::resources::AllocationRatios;
use serde::{Deserialize, Serialize};

/// Environment prefix.
pub const ENV_PREFIX: &str = "UPDRAFT_AGENT_";
/// Default state directory (node id, epoch, keys, driver log).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/updraft/agent";

/// Host capacity overrides; unset dimensions are discovered.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CapacityConfig {
    /// Logical CPUs.
    pub vcpus: Option<u32>,
    /// Memory in MiB.
    pub memory_mib: Option<u64>,
    /// Disk in GiB.
    pub disk_gib: Option<u64>,
    /// Extended resources (never discovered): `{ "gpu" = 2 }`.
    pub extended: BTreeMap<String, u64>,
}

/// The host share kept back from VMs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReservedConfig {
    /// vCPUs kept for the host.
    pub vcpus: u32,
    /// Memory kept for the host (MiB).
    pub memory_mib: u64,
    /// Disk kept for the host (GiB).
    pub disk_gib: u64,
}

impl Default for ReservedConfig {
    fn default() -> Self {
        ReservedConfig {
            vcpus: 0,
            memory_mib: 512,
            disk_gib: 0,
        }
    }
}

/// Which hypervisor driver provisions VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DriverKind {
    /// Real domains through libvirt (`driver.libvirt`).
    #[default]
    Libvirt,
    /// In-memory VMs (tests, demos, the load bench).
    Memory,
}

/// The libvirt domain type (`<domain type=...>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DomainTypeSetting {
    /// Probe at start: `kvm` when a probe guest really runs under KVM and runs faster than
    /// under emulation, else `qemu`; `test` on libvirt's test driver.
    #[default]
    Auto,
    /// Hardware virtualization.
    Kvm,
    /// Software emulation (TCG).
    Qemu,
    /// libvirt's test driver (`test:///default`).
    Test,
}

/// The libvirt driver's behaviour.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LibvirtConfig {
    /// Connection URI (`qemu:///system`; `test:///default` for demos and tests).
    pub uri: String,
    /// Domain type; `auto` probes.
    pub domain_type: DomainTypeSetting,
    /// Storage pool of instance disks: a directory pool, defined at `instances_dir` (and
    /// started) when missing. Base images are volumes of this pool.
    pub pool: String,
    /// Directory of the pool (and of the probe's scratch files).
    pub instances_dir: PathBuf,
    /// Base image (a volume of `pool`) for requests that name none; unset: a blank disk.
    pub default_image: Option<String>,
    /// Network of every VM: `none`, `user`, `network:<libvirt network>` or `bridge:<name>`.
    pub network: String,
    /// Direct kernel boot: kernel image (unset: boot from the disk).
    pub kernel: Option<PathBuf>,
    /// Direct kernel boot: initrd.
    pub initrd: Option<PathBuf>,
    /// Direct kernel boot: kernel command line.
    pub cmdline: String,
    /// Where each VM's serial console log goes (`<dir>/<domain name>.log`).
    pub console_dir: PathBuf,
    /// Machine type (`q35`, `pc`); unset: libvirt's default.
    pub machine: Option<String>,
    /// Longest wait for a started domain to report running.
    #[serde(with = "humantime_serde")]
    pub boot_timeout: Duration,
    /// Longest wait for the domain-type probe guest's marker.
    #[serde(with = "humantime_serde")]
    pub probe_timeout: Duration,
    /// Longest pause between reconnect attempts after libvirt went away.
    #[serde(with = "humantime_serde")]
    pub max_reconnect_backoff: Duration,
}

impl Default for LibvirtConfig {
    fn default() -> Self {
        LibvirtConfig {
            uri: DEFAULT_LIBVIRT_URI.into(),
            domain_type: DomainTypeSetting::Auto,
            pool: "updraft".into(),
            instances_dir: PathBuf::from("/var/lib/updraft/instances"),
            default_image: None,
            network: "network:default".into(),
            kernel: None,
            initrd: None,
            cmdline: "console=ttyS0".into(),
            console_dir: PathBuf::from("/var/log/updraft/console"),
            machine: None,
            boot_timeout: Duration::from_secs(60),
            probe_timeout: Duration::from_secs(10),
            max_reconnect_backoff: Duration::from_secs(30),
        }
    }
}

/// Default libvirt connection.
pub const DEFAULT_LIBVIRT_URI: &str = "qemu:///system";

/// The in-memory driver's behaviour.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryDriverConfig {
    /// Time one build takes.
    #[serde(with = "humantime_serde")]
    pub build_time: Duration,
    /// Extra random build time, uniform in [0, jitter].
    #[serde(with = "humantime_serde")]
    pub build_jitter: Duration,
    /// Probability that a build fails.
    pub failure_rate: f64,
}

impl Default for MemoryDriverConfig {
    fn default() -> Self {
        MemoryDriverConfig {
            build_time: Duration::from_millis(50),
            build_jitter: Duration::ZERO,
            failure_rate: 0.0,
        }
    }
}

/// Driver settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DriverConfig {
    /// Which driver.
    pub kind: DriverKind,
    /// libvirt driver settings.
    pub libvirt: LibvirtConfig,
    /// In-memory driver settings.
    pub memory: MemoryDriverConfig,
    /// How often the agent checks that the hypervisor answers (an unhealthy node stops
    /// pulling, and reconciles once the hypervisor is back).
    #[serde(with = "humantime_serde")]
    pub health_interval: Duration,
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig {
            kind: DriverKind::default(),
            libvirt: LibvirtConfig::default(),
            memory: MemoryDriverConfig::default(),
            health_interval: Duration::from_secs(5),
        }
    }
}

/// Everything the node-agent reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Node id; by default the one persisted in `state_dir`, else derived from the hostname
    /// plus a random suffix and persisted.
    pub node_id: Option<String>,
    /// Where the node keeps its identity, epoch, signing key and driver log.
    pub state_dir: PathBuf,
    /// Zone; by default the cluster's default zone.
    pub zone: Option<String>,
    /// Traits this node has (`ssd`, `gpu`).
    pub traits: Vec<String>,
    /// NATS connection.
    pub nats: NatsConfig,
    /// Capacity overrides.
    pub capacity: CapacityConfig,
    /// Host reserve.
    pub reserved: ReservedConfig,
    /// Allocation ratios.
    pub ratios: AllocationRatios,
    /// Lease renewal period; by default a third of the cluster's lease TTL (which the agent
    /// reads from the cluster: the node adverts' bucket). A set value must stay under a third.
    #[serde(default, with = "humantime_serde::option")]
    pub heartbeat_interval: Option<Duration>,
    /// Pulls: policy, order, limits, starvation guard.
    pub pull: PullConfig,
    /// Delay before a handed-back request is redelivered (the node pulls that lane at the
    /// worst priority for twice this, at least 1 s: `placement::step_aside`).
    #[serde(with = "humantime_serde")]
    pub nak_delay: Duration,
    /// Consecutive build failures after which the node cordons itself.
    pub max_build_failures: u32,
    /// Reconcile period.
    #[serde(with = "humantime_serde")]
    pub reconcile_interval: Duration,
    /// Time to finish in-flight builds on SIGTERM before handing them back.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Serve Prometheus metrics here (`127.0.0.1:9101`); off when unset.
    pub metrics_listen: Option<SocketAddr>,
    /// Hypervisor driver.
    pub driver: DriverConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_id: None,
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            zone: None,
            traits: Vec::new(),
            nats: NatsConfig::default(),
            capacity: CapacityConfig::default(),
            reserved: ReservedConfig::default(),
            ratios: AllocationRatios::default(),
            heartbeat_interval: None,
            pull: PullConfig::default(),
            nak_delay: Duration::from_millis(500),
            max_build_failures: 3,
            reconcile_interval: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(30),
            metrics_listen: None,
            driver: DriverConfig::default(),
        }
    }
}

/// Settings that parse but cannot work.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// A name is malformed.
    #[error("{key}: {message}")]
    Name {
        /// Key.
        key: &'static str,
        /// Why.
        message: String,
    },
    /// Renewals too slow for the lease.
    #[error(
        "heartbeat_interval ({heartbeat:?}) must be positive and at most a third of the cluster's lease TTL ({ttl:?})"
    )]
    Heartbeat {
        /// Heartbeat.
        heartbeat: Duration,
        /// TTL.
        ttl: Duration,
    },
    /// Ratios out of range.
    #[error("ratios: {0}")]
    Ratios(String),
    /// Failure rate not a probability.
    #[error("driver.memory.failure_rate must be between 0 and 1 (got {0})")]
    FailureRate(f64),
    /// Pull settings out of range.
    #[error("pull: {0}")]
    Pull(String),
    /// libvirt settings that cannot work.
    #[error("{0}")]
    Libvirt(String),
}

impl LibvirtConfig {
    /// Checks the libvirt settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Libvirt(m));
        if self.uri.trim().is_empty() {
            return bad("driver.libvirt.uri must not be empty".into());
        }
        if crate::driver::libvirt::xml::Network::parse(&self.network).is_none() {
            return bad(format!(
                "driver.libvirt.network: `{}` is not none, user, network:<name> or bridge:<name>",
                self.network
            ));
        }
        if !crate::driver::libvirt::xml::is_volume_name(&self.pool) {
            return bad(format!(
                "driver.libvirt.pool: `{}` must be letters, digits, `.`, `_` or `-`",
                self.pool
            ));
        }
        if let Some(img) = &self.default_image
            && !crate::driver::libvirt::xml::is_volume_name(img)
        {
            return bad(format!(
                "driver.libvirt.default_image: `{img}` must be a volume name of the pool"
            ));
        }
        if self.initrd.is_some() && self.kernel.is_none() {
            return bad("driver.libvirt.initrd needs driver.libvirt.kernel".into());
        }
        if self.boot_timeout.is_zero() || self.probe_timeout.is_zero() {
            return bad("driver.libvirt.boot_timeout and probe_timeout must be positive".into());
        }
        Ok(())
    }
}

impl Config {
    /// The renewal period under a cluster lease TTL of `ttl`: the configured one (refused when
    /// slower than a third of it), else a third.
    pub fn heartbeat_for(&self, ttl: Duration) -> Result<Duration, ConfigError> {
        match self.heartbeat_interval {
            None => Ok((ttl / 3).max(Duration::from_millis(100))),
            Some(h) if !h.is_zero() && h * 3 <= ttl => Ok(h),
            Some(h) => Err(ConfigError::Heartbeat { heartbeat: h, ttl }),
        }
    }

    /// Checks values that parse but cannot work together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(id) = &self.node_id {
            placement::NodeId::new(id.as_str()).map_err(|e| ConfigError::Name {
                key: "node_id",
                message: e.to_string(),
            })?;
        }
        if let Some(z) = &self.zone {
            placement::Zone::new(z.as_str()).map_err(|e| ConfigError::Name {
                key: "zone",
                message: e.to_string(),
            })?;
        }
        for t in &self.traits {
            placement::TraitName::new(t.as_str()).map_err(|e| ConfigError::Name {
                key: "traits",
                message: format!("`{t}`: {e}"),
            })?;
        }
        for name in self.capacity.extended.keys() {
            placement::ids::ResourceName::new(name.as_str()).map_err(|e| ConfigError::Name {
                key: "capacity.extended",
                message: format!("`{name}`: {e}"),
            })?;
        }
        if self.heartbeat_interval.is_some_and(|h| h.is_zero()) {
            return Err(ConfigError::Heartbeat {
                heartbeat: Duration::ZERO,
                ttl: Duration::ZERO,
            });
        }
        self.ratios
            .validate()
            .map_err(|e| ConfigError::Ratios(e.to_string()))?;
        let f = self.driver.memory.failure_rate;
        if !(0.0..=1.0).contains(&f) {
            return Err(ConfigError::FailureRate(f));
        }
        self.driver.libvirt.validate()?;
        if self.driver.health_interval.is_zero() {
            return Err(ConfigError::Libvirt(
                "driver.health_interval must be positive".into(),
            ));
        }
        if self.pull.max_pulls == 0 || self.pull.expiry < Duration::from_millis(100) {
            return Err(ConfigError::Pull(
                "max_pulls must be at least 1 and expiry at least 100ms".into(),
            ));
        }
        if !(0.0..=1.0).contains(&self.pull.guard.share) {
            return Err(ConfigError::Pull(format!(
                "guard.share must be between 0 and 1 (got {})",
                self.pull.guard.share
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    const EXAMPLE: &str = include_str!("../../deploy/config/node-agent.toml");

    #[test]
    fn the_deploy_example_is_the_defaults_and_names_every_key() {
        let parsed: Config = toml::from_str(EXAMPLE).unwrap();
        assert_eq!(parsed, Config::default());
        // every key, optional ones too (commented out in the example)
        let mut full = Config {
            node_id: Some("n".into()),
            zone: Some("z".into()),
            metrics_listen: Some("127.0.0.1:9101".parse().unwrap()),
            heartbeat_interval: Some(Duration::from_secs(5)),
            ..Default::default()
        };
        full.capacity = CapacityConfig {
            vcpus: Some(1),
            memory_mib: Some(1),
            disk_gib: Some(1),
            extended: BTreeMap::new(),
        };
        full.nats.creds_file = Some("c".into());
        full.nats.nkey_seed_file = Some("k".into());
        full.nats.user = Some("u".into());
        full.nats.password = Some(bus::connect::Secret("p".into()));
        full.nats.token = Some(bus::connect::Secret("t".into()));
        full.nats.tls_ca_file = Some("ca".into());
        full.nats.tls_cert_file = Some("cert".into());
        full.nats.tls_key_file = Some("key".into());
        full.nats.inbox_prefix = Some("_INBOX.x".into());
        let lv = &mut full.driver.libvirt;
        lv.default_image = Some("i".into());
        lv.kernel = Some("k".into());
        lv.initrd = Some("i".into());
        lv.machine = Some("q35".into());
        let documented = common::config::documented_keys(EXAMPLE);
        for key in common::config::leaf_keys(&full) {
            assert!(
                documented.contains(&key),
                "deploy/config/node-agent.toml does not name `{key}`"
            );
        }
    }

    #[test]
    fn validation_names_the_key() {
        let c = Config {
            node_id: Some("Bad Id".into()),
            ..Default::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .starts_with("node_id:")
        );
        let c = Config {
            heartbeat_interval: Some(Duration::from_secs(10)),
            ..Default::default()
        };
        c.validate().unwrap();
        assert!(matches!(
            c.heartbeat_for(Duration::from_secs(15)),
            Err(ConfigError::Heartbeat { .. })
        ));
        assert_eq!(
            Config::default()
                .heartbeat_for(Duration::from_secs(15))
                .unwrap(),
            Duration::from_secs(5)
        );
        let mut c = Config::default();
        c.driver.memory.failure_rate = 2.0;
        assert_eq!(c.validate(), Err(ConfigError::FailureRate(2.0)));
        let c = Config {
            traits: vec!["GPU".into()],
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().starts_with("traits:"));
    }
}
