//! The dispatcher's settings. Every key is documented here and mirrored, with its default, in
//! deploy/config/dispatcher.toml. Environment: `UPDRAFT_DISPATCHER_<KEY>` (`__` for nesting).
//!
//! The shard map, flavors and limits seed the cluster config in KV the first time a
//! dispatcher starts; afterwards the cluster keeps its own (every dispatcher adopts it), so
//! dispatchers with different files cannot disagree.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use bus::connect::Secret;
use bus::{NatsConfig, TopologyConfig};
use placement::Resources;
use placement::flavor::{Flavor, FlavorCatalog};
use placement::ids::{FlavorName, ResourceName, TraitClassName, TraitName, Zone};
use placement::lifecycle::DEFAULT_MAX_ATTEMPTS;
use placement::request::{DEFAULT_DEADLINE_S, MAX_DEADLINE_S};
use placement::shard::{DEFAULT_SPILL_AFTER, ShardMap, TraitClass, sqrt2_ladder};
use placement::takers::{DEFAULT_FLAG_AFTER, DEFAULT_SWEEP_INTERVAL};
use placement::wire::ClusterConfig;
use serde::{Deserialize, Serialize};

/// Environment prefix.
pub const ENV_PREFIX: &str = "UPDRAFT_DISPATCHER_";

/// A resource vector in config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Size {
    /// vCPUs.
    pub vcpus: u32,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// Disk, GiB.
    #[serde(default)]
    pub disk_gib: u64,
}

impl Size {
    fn resources(&self) -> Resources {
        Resources::new(self.vcpus, self.memory_mib, self.disk_gib)
    }
}

/// The size ladder: √2 steps from `base` (the smallest class) to `top` (the largest request
/// accepted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LadderConfig {
    /// Upper bound of the smallest class.
    pub base: Size,
    /// Largest request accepted (the last class's bound).
    pub top: Size,
    /// Work-queue partitions per class.
    pub partitions: u16,
    /// Time in a class before near-fit takers see a request.
    #[serde(with = "humantime_serde")]
    pub spill_after: Duration,
}

impl Default for LadderConfig {
    fn default() -> Self {
        LadderConfig {
            base: Size {
                vcpus: 1,
                memory_mib: 1024,
                disk_gib: 10,
            },
            top: Size {
                vcpus: 64,
                memory_mib: 256 * 1024,
                disk_gib: 2560,
            },
            partitions: 1,
            spill_after: DEFAULT_SPILL_AFTER,
        }
    }
}

/// A trait class in config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraitClassConfig {
    /// Name (short: it appears in subjects).
    pub name: String,
    /// Traits a node needs to pull it.
    pub traits: Vec<String>,
    /// Its nodes take `std` work only when `std` backs up.
    #[serde(default)]
    pub exclusive: bool,
    /// Largest amount of each extended resource per request.
    #[serde(default)]
    pub extended_bound: BTreeMap<String, u64>,
}

/// A flavor in config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlavorConfig {
    /// Name.
    pub name: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// Disk, GiB.
    #[serde(default)]
    pub disk_gib: u64,
    /// Extended resources.
    #[serde(default)]
    pub extended: BTreeMap<String, u64>,
    /// Traits every server of it needs.
    #[serde(default)]
    pub required_traits: Vec<String>,
}

/// Everything the dispatcher reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// NATS connection.
    pub nats: NatsConfig,
    /// Streams, buckets and their limits.
    pub topology: TopologyConfig,
    /// HTTP API and status page address.
    pub http_listen: SocketAddr,
    /// Serve the API as a NATS service too.
    pub nats_api: bool,
    /// When set, HTTP and NATS API calls must carry this token (`Authorization: Bearer`).
    pub api_token: Option<Secret>,
    /// Zones (first cluster start only).
    pub zones: Vec<String>,
    /// Default zone (first cluster start only).
    pub default_zone: String,
    /// Size ladder (first cluster start only).
    pub ladder: LadderConfig,
    /// Trait classes (first cluster start only).
    pub trait_classes: Vec<TraitClassConfig>,
    /// Flavors; empty means the built-in set (first cluster start only).
    pub flavors: Vec<FlavorConfig>,
    /// Deadline for requests that give none, seconds (first cluster start only).
    pub default_deadline_s: u64,
    /// Build attempts before a request fails (first cluster start only).
    pub max_attempts: u32,
    /// How often the sweep looks at every open request.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
    /// A class whose oldest request has waited this long is flagged (capped at its spill
    /// deadline): nodes with room for the class's bound pull it.
    #[serde(with = "humantime_serde")]
    pub flag_after: Duration,
    /// A class asked for whose largest request the nodes in use have room for fewer times
    /// than this gets a standing flag: a few empty nodes pull it before any of it waits
    /// (`placement::standing`; 0 never raises one).
    pub standing_below: u64,
    /// Time a restarted node gets to re-confirm its claims before they are reaped.
    #[serde(with = "humantime_serde")]
    pub reap_grace: Duration,
    /// A queued request older than this gets its hint checked (and re-published if missing).
    #[serde(with = "humantime_serde")]
    pub hint_check_after: Duration,
    /// Finished records kept in memory for listing and the status page.
    pub recent_finished: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            nats: NatsConfig::default(),
            topology: TopologyConfig::default(),
            http_listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            nats_api: true,
            api_token: None,
            zones: vec!["az1".into()],
            default_zone: "az1".into(),
            ladder: LadderConfig::default(),
            trait_classes: vec![TraitClassConfig {
                name: "gpu".into(),
                traits: vec!["gpu".into()],
                exclusive: true,
                extended_bound: [("gpu".to_string(), 8)].into_iter().collect(),
            }],
            flavors: Vec::new(),
            default_deadline_s: DEFAULT_DEADLINE_S,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            sweep_interval: DEFAULT_SWEEP_INTERVAL,
            flag_after: DEFAULT_FLAG_AFTER,
            standing_below: placement::standing::DEFAULT_STANDING_BELOW,
            reap_grace: Duration::from_secs(15),
            hint_check_after: Duration::from_secs(10),
            recent_finished: 10_000,
        }
    }
}

/// A setting that parses but cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ConfigError {
    /// The key.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

fn err(key: impl Into<String>, message: impl ToString) -> ConfigError {
    ConfigError {
        key: key.into(),
        message: message.to_string(),
    }
}

impl Config {
    /// The cluster config these settings describe (validated).
    pub fn cluster(&self) -> Result<ClusterConfig, ConfigError> {
        let zones = self
            .zones
            .iter()
            .enumerate()
            .map(|(i, z)| Zone::new(z.as_str()).map_err(|e| err(format!("zones[{i}]"), e)))
            .collect::<Result<Vec<_>, _>>()?;
        let default_zone =
            Zone::new(self.default_zone.as_str()).map_err(|e| err("default_zone", e))?;
        let mut classes = sqrt2_ladder(&self.ladder.base.resources(), &self.ladder.top.resources());
        for c in &mut classes {
            c.partitions = self.ladder.partitions;
            c.spill_after_ms = placement::time::duration_ms(self.ladder.spill_after);
        }
        let mut trait_classes = Vec::new();
        for (i, t) in self.trait_classes.iter().enumerate() {
            let key = |f: &str| format!("trait_classes[{i}].{f}");
            let mut extended_bound = BTreeMap::new();
            for (n, v) in &t.extended_bound {
                extended_bound.insert(
                    ResourceName::new(n.as_str()).map_err(|e| err(key("extended_bound"), e))?,
                    *v,
                );
            }
            trait_classes.push(TraitClass {
                name: TraitClassName::new(t.name.as_str()).map_err(|e| err(key("name"), e))?,
                traits: t
                    .traits
                    .iter()
                    .map(|x| TraitName::new(x.as_str()).map_err(|e| err(key("traits"), e)))
                    .collect::<Result<_, _>>()?,
                exclusive: t.exclusive,
                extended_bound,
            });
        }
        let shard_map = ShardMap {
            version: 1,
            zones,
            default_zone,
            trait_classes,
            size_classes: classes,
        };
        shard_map
            .validate()
            .map_err(|e| err("ladder/zones/trait_classes", e))?;
        let flavors = if self.flavors.is_empty() {
            FlavorCatalog::default()
        } else {
            let mut v = Vec::new();
            for (i, f) in self.flavors.iter().enumerate() {
                let key = |k: &str| format!("flavors[{i}].{k}");
                let mut resources = Resources::new(f.vcpus, f.memory_mib, f.disk_gib);
                for (n, a) in &f.extended {
                    resources.extended.insert(
                        ResourceName::new(n.as_str()).map_err(|e| err(key("extended"), e))?,
                        *a,
                    );
                }
                v.push(Flavor {
                    name: FlavorName::new(f.name.as_str()).map_err(|e| err(key("name"), e))?,
                    resources,
                    required_traits: f
                        .required_traits
                        .iter()
                        .map(|x| {
                            TraitName::new(x.as_str()).map_err(|e| err(key("required_traits"), e))
                        })
                        .collect::<Result<_, _>>()?,
                });
            }
            FlavorCatalog(v)
        };
        if !(1..=MAX_DEADLINE_S).contains(&self.default_deadline_s) {
            return Err(err(
                "default_deadline_s",
                format!("must be between 1 and {MAX_DEADLINE_S}"),
            ));
        }
        if self.max_attempts == 0 {
            return Err(err("max_attempts", "must be at least 1"));
        }
        let mut c = ClusterConfig::new(shard_map);
        c.flavors = flavors;
        c.default_deadline_s = self.default_deadline_s;
        c.max_attempts = self.max_attempts;
        Ok(c)
    }

    /// Checks everything that parses but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.cluster()?;
        if self.topology.replicas == 0 || self.topology.replicas > 5 {
            return Err(err("topology.replicas", "must be between 1 and 5"));
        }
        if self.sweep_interval.is_zero() {
            return Err(err("sweep_interval", "must be more than zero"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../deploy/config/dispatcher.toml");

    #[test]
    fn the_deploy_example_is_the_defaults_and_names_every_key() {
        let parsed: Config = toml::from_str(EXAMPLE).unwrap();
        assert_eq!(parsed, Config::default());
        let mut full = Config {
            api_token: Some(Secret("t".into())),
            flavors: vec![FlavorConfig {
                name: "f".into(),
                vcpus: 1,
                memory_mib: 1,
                disk_gib: 1,
                extended: BTreeMap::from([("gpu".to_string(), 1)]),
                required_traits: vec!["gpu".into()],
            }],
            ..Default::default()
        };
        full.nats.creds_file = Some("c".into());
        full.nats.nkey_seed_file = Some("k".into());
        full.nats.user = Some("u".into());
        full.nats.password = Some(Secret("p".into()));
        full.nats.token = Some(Secret("t".into()));
        full.nats.tls_ca_file = Some("ca".into());
        full.nats.tls_cert_file = Some("cert".into());
        full.nats.tls_key_file = Some("key".into());
        full.nats.inbox_prefix = Some("_INBOX.x".into());
        let documented = common::config::documented_keys(EXAMPLE);
        for key in common::config::leaf_keys(&full) {
            // `flavors.extended.gpu` is an example value, not a key
            let key = if key.starts_with("flavors.extended.") {
                "flavors.extended".to_string()
            } else {
                key
            };
            assert!(
                documented.contains(&key),
                "deploy/config/dispatcher.toml does not name `{key}`"
            );
        }
    }

    #[test]
    fn defaults_make_a_valid_cluster() {
        let c = Config::default();
        c.validate().unwrap();
        let cluster = c.cluster().unwrap();
        assert_eq!(cluster.shard_map.size_classes.len(), 17);
        assert!(cluster.flavors.get("m1.small").is_some());
    }

    #[test]
    fn errors_name_the_key() {
        let c = Config {
            zones: vec!["Bad Zone".into()],
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().key.starts_with("zones[0]"));
        let c = Config {
            default_zone: "az9".into(),
            ..Default::default()
        };
        assert!(c.validate().is_err());
        let mut c = Config::default();
        c.topology.replicas = 0;
        assert_eq!(c.validate().unwrap_err().key, "topology.replicas");
    }
}
