//! What clients send, and its validation into a [`RequestSpec`].
//!
//! The API types reject unknown fields: a typo (`"flavour"`) must be an error, not a request
//! silently built without it. Each validation error names the field and says what to change.

use std::collections::BTreeMap;
use std::fmt;

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::flavor::FlavorCatalog;
use crate::ids::{FlavorName, GroupName, NameError, RequestId, ResourceName, TraitName, Zone};
use crate::resources::{Resources, human_mib};
use crate::shard::{Routable, RouteError, ShardId, ShardMap};

/// Smallest memory a server may ask for.
pub const MIN_MEMORY_MIB: u64 = 64;
/// Beyond these, a size is a mistake rather than a big VM.
pub const ABSURD_VCPUS: u32 = 4096;
/// 64 TiB.
pub const ABSURD_MEMORY_MIB: u64 = 64 * 1024 * 1024;
/// 1 PiB.
pub const ABSURD_DISK_GIB: u64 = 1024 * 1024;
/// Most required (or forbidden) traits per request.
pub const MAX_TRAITS: usize = 32;
/// Most metadata entries.
pub const MAX_METADATA_ENTRIES: usize = 64;
/// Longest metadata key.
pub const MAX_METADATA_KEY: usize = 64;
/// Longest metadata value in bytes.
pub const MAX_METADATA_VALUE: usize = 1024;
/// Most metadata bytes in total (keys and values).
pub const MAX_METADATA_TOTAL: usize = 16 * 1024;
/// Longest image reference.
pub const MAX_IMAGE_LEN: usize = 512;
/// Most servers in one batch create.
pub const MAX_BATCH: usize = 1000;
/// Default time a request may wait for a node before failing.
pub const DEFAULT_DEADLINE_S: u64 = 300;
/// Longest deadline accepted (one day).
pub const MAX_DEADLINE_S: u64 = 86_400;
/// Largest API body accepted, in bytes (a full batch of small requests fits).
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// Create one server. Exactly one of `flavor` and `resources` is required.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateServer {
    /// Client-chosen id for idempotent retries; a UUID is generated when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// A flavor name from the catalog.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flavor: Option<String>,
    /// Explicit sizes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceSpec>,
    /// Zone; the cluster's default zone when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Traits the node must have.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub required_traits: Vec<String>,
    /// Traits the node must not have.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forbidden_traits: Vec<String>,
    /// Server group membership.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_group: Option<ServerGroupSpec>,
    /// Image reference handed to the driver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Free-form labels carried to the VM.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// Seconds the request may wait for a node before it fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_s: Option<u64>,
}

/// Explicit sizes in a create request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceSpec {
    /// Virtual CPUs (at least 1).
    pub vcpus: u32,
    /// Memory in MiB (at least 64).
    pub memory_mib: u64,
    /// Root disk in GiB.
    #[serde(default)]
    pub disk_gib: u64,
    /// Extended resources (`{"gpu": 1}`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extended: BTreeMap<String, u64>,
}

/// Server group membership in a create request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerGroupSpec {
    /// Group name.
    pub name: String,
    /// `affinity` or `anti-affinity`.
    pub policy: GroupPolicy,
}

/// How members of a server group are placed relative to each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GroupPolicy {
    /// All members on one node.
    Affinity,
    /// No two members on one node.
    AntiAffinity,
}

/// Create many servers at once.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBatch {
    /// The servers (at most [`MAX_BATCH`]).
    pub servers: Vec<CreateServer>,
}

/// A validated server group.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ServerGroup {
    /// Name.
    pub name: GroupName,
    /// Policy.
    pub policy: GroupPolicy,
}

/// A validated, normalized request: what is stored in the record and carried by hints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestSpec {
    /// Request id (the VM's identity).
    pub id: RequestId,
    /// Resolved size.
    pub resources: Resources,
    /// The flavor it came from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flavor: Option<FlavorName>,
    /// Resolved zone.
    pub zone: Zone,
    /// Required traits, sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub required_traits: Vec<TraitName>,
    /// Forbidden traits, sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forbidden_traits: Vec<TraitName>,
    /// Server group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<ServerGroup>,
    /// Image reference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Metadata.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// Seconds the request may wait for a node.
    pub deadline_s: u64,
}

impl RequestSpec {
    /// A request for `resources` in `zone` that asks nothing else: no flavor, traits, group,
    /// image or metadata; it waits up to `deadline_s` for a node.
    pub fn plain(id: RequestId, resources: Resources, zone: Zone, deadline_s: u64) -> Self {
        RequestSpec {
            id,
            resources,
            flavor: None,
            zone,
            required_traits: Vec::new(),
            forbidden_traits: Vec::new(),
            group: None,
            image: None,
            metadata: BTreeMap::new(),
            deadline_s,
        }
    }

    /// The routing view of this request.
    pub fn routable(&self) -> Routable<'_> {
        Routable {
            id: self.id.as_str(),
            zone: &self.zone,
            required_traits: &self.required_traits,
            resources: &self.resources,
        }
    }
}

/// Why a create request was refused. `field()` names the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    /// The body is not valid JSON of the expected shape (unknown field, wrong type...).
    #[error("{path}: {message}")]
    Parse {
        /// Where in the document (`resources.vcpus`, or `.` for the whole body).
        path: String,
        /// What was wrong.
        message: String,
    },
    /// The body is larger than [`MAX_BODY_BYTES`].
    #[error("body: {got} bytes is larger than the {max} bytes allowed")]
    BodyTooLarge {
        /// Size received.
        got: usize,
        /// Limit.
        max: usize,
    },
    /// Bad request id.
    #[error("id: {0}")]
    Id(NameError),
    /// Both size forms given.
    #[error("flavor, resources: give either a flavor or explicit resources, not both")]
    FlavorAndResources,
    /// No size given.
    #[error("flavor, resources: one of flavor or resources is required")]
    NoSize,
    /// Flavor not in the catalog.
    #[error("flavor: unknown flavor `{name}` (known: {known})")]
    UnknownFlavor {
        /// Name given.
        name: String,
        /// Known flavor names.
        known: String,
    },
    /// A size below the minimum.
    #[error("resources.{dim}: {got} is too small (minimum {min})")]
    TooSmall {
        /// Field.
        dim: &'static str,
        /// Minimum, formatted.
        min: String,
        /// Value, formatted.
        got: String,
    },
    /// A size no real VM has.
    #[error("resources.{dim}: {got} is not a plausible size (maximum {max})")]
    Absurd {
        /// Field.
        dim: &'static str,
        /// Maximum, formatted.
        max: String,
        /// Value, formatted.
        got: String,
    },
    /// Larger than the largest size class.
    #[error(
        "resources: {got} is larger than the largest size class ({largest}); ask your operator to extend the shard map"
    )]
    LargerThanAnyClass {
        /// Requested size.
        got: String,
        /// Largest class bound.
        largest: String,
    },
    /// Bad extended resource name or amount.
    #[error("resources.extended.{name}: {reason}")]
    Extended {
        /// Name given.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// Zone not in the cluster.
    #[error("zone: unknown zone `{zone}` (known: {known})")]
    UnknownZone {
        /// Zone given.
        zone: String,
        /// Known zones.
        known: String,
    },
    /// Bad zone syntax.
    #[error("zone: {0}")]
    Zone(NameError),
    /// Bad trait syntax.
    #[error("{field}[{index}]: {err}")]
    Trait {
        /// `required_traits` or `forbidden_traits`.
        field: &'static str,
        /// Position.
        index: usize,
        /// Problem.
        err: NameError,
    },
    /// A trait listed twice.
    #[error("{field}: `{name}` is listed twice")]
    DuplicateTrait {
        /// Field.
        field: &'static str,
        /// Trait.
        name: String,
    },
    /// A trait both required and forbidden.
    #[error("required_traits, forbidden_traits: `{0}` cannot be both required and forbidden")]
    TraitConflict(String),
    /// Too many traits.
    #[error("{field}: at most {max} traits (got {got})")]
    TooManyTraits {
        /// Field.
        field: &'static str,
        /// Limit.
        max: usize,
        /// Count given.
        got: usize,
    },
    /// Bad group name.
    #[error("server_group.name: {0}")]
    Group(NameError),
    /// Bad image reference.
    #[error("image: {0}")]
    Image(String),
    /// Bad metadata.
    #[error("metadata{key}: {reason}")]
    Metadata {
        /// `.key` or empty for the whole map.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// Deadline out of range.
    #[error("deadline_s: must be between 1 and {max} seconds (got {got})")]
    Deadline {
        /// Value given.
        got: u64,
        /// Limit.
        max: u64,
    },
    /// Routing failed for another reason.
    #[error("{0}")]
    Route(String),
    /// Empty or oversized batch.
    #[error("servers: a batch holds between 1 and {max} servers (got {got})")]
    BatchSize {
        /// Count given.
        got: usize,
        /// Limit.
        max: usize,
    },
    /// Two servers of one batch share an id.
    #[error("servers[{index}].id: `{id}` is used twice in this batch")]
    DuplicateInBatch {
        /// Position of the second use.
        index: usize,
        /// The id.
        id: String,
    },
    /// An error in one server of a batch.
    #[error("servers[{index}].{inner}")]
    InBatch {
        /// Position.
        index: usize,
        /// The error.
        inner: Box<ValidationError>,
    },
}

impl ValidationError {
    /// Stable snake_case kind, for metric labels and API error codes.
    pub fn code(&self) -> &'static str {
        match self {
            ValidationError::Parse { .. } => "malformed",
            ValidationError::BodyTooLarge { .. } => "body_too_large",
            ValidationError::LargerThanAnyClass { .. } => "too_large",
            ValidationError::InBatch { inner, .. } => inner.code(),
            _ => "invalid",
        }
    }
}

/// What validation needs from the cluster config.
#[derive(Debug, Clone, Copy)]
pub struct ValidationContext<'a> {
    /// Flavor catalog.
    pub flavors: &'a FlavorCatalog,
    /// Shard map (zones, trait classes, largest class).
    pub shards: &'a ShardMap,
    /// Deadline applied when the request gives none.
    pub default_deadline_s: u64,
}

/// Parses a create body: JSON, at most [`MAX_BODY_BYTES`], unknown fields refused, with the
/// path of the first bad field in the error.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ValidationError> {
    if body.len() > MAX_BODY_BYTES {
        return Err(ValidationError::BodyTooLarge {
            got: body.len(),
            max: MAX_BODY_BYTES,
        });
    }
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        ValidationError::Parse {
            path,
            message: clean_serde_message(&inner),
        }
    })
}

fn clean_serde_message(e: &serde_json::Error) -> String {
    let s = e.to_string();
    // serde_json appends " at line L column C"; keep it only for syntax errors, where it helps.
    if e.is_syntax() || e.is_eof() {
        return s;
    }
    match s.rfind(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

impl CreateServer {
    /// Validates and normalizes; generates an id (from `rng`) when none was given.
    pub fn validate(
        &self,
        ctx: &ValidationContext<'_>,
        rng: &mut impl Rng,
    ) -> Result<RequestSpec, ValidationError> {
        let id = match &self.id {
            Some(s) => RequestId::new(s.as_str()).map_err(ValidationError::Id)?,
            None => RequestId::generate(rng),
        };
        let (resources, flavor, mut required) = self.size(ctx.flavors)?;
        let mut required_traits = std::mem::take(&mut required);
        required_traits.extend(traits("required_traits", &self.required_traits)?);
        required_traits.sort();
        required_traits.dedup();
        let mut forbidden_traits = traits("forbidden_traits", &self.forbidden_traits)?;
        forbidden_traits.sort();
        if let Some(t) = required_traits
            .iter()
            .find(|t| forbidden_traits.contains(t))
        {
            return Err(ValidationError::TraitConflict(t.to_string()));
        }
        let zone = match &self.zone {
            None => ctx.shards.default_zone.clone(),
            Some(z) => {
                let zone = Zone::new(z.as_str()).map_err(ValidationError::Zone)?;
                if !ctx.shards.zones.contains(&zone) {
                    return Err(ValidationError::UnknownZone {
                        zone: z.clone(),
                        known: join(ctx.shards.zones.iter().map(Zone::as_str)),
                    });
                }
                zone
            }
        };
        let group = match &self.server_group {
            None => None,
            Some(g) => Some(ServerGroup {
                name: GroupName::new(g.name.as_str()).map_err(ValidationError::Group)?,
                policy: g.policy,
            }),
        };
        if let Some(img) = &self.image {
            check_image(img)?;
        }
        check_metadata(&self.metadata)?;
        let deadline_s = match self.deadline_s {
            None => ctx.default_deadline_s,
            Some(d) if (1..=MAX_DEADLINE_S).contains(&d) => d,
            Some(d) => {
                return Err(ValidationError::Deadline {
                    got: d,
                    max: MAX_DEADLINE_S,
                });
            }
        };
        let spec = RequestSpec {
            id,
            resources,
            flavor,
            zone,
            required_traits,
            forbidden_traits,
            group,
            image: self.image.clone(),
            metadata: self.metadata.clone(),
            deadline_s,
        };
        route_or_explain(ctx.shards, &spec)?;
        Ok(spec)
    }

    fn size(
        &self,
        flavors: &FlavorCatalog,
    ) -> Result<(Resources, Option<FlavorName>, Vec<TraitName>), ValidationError> {
        match (&self.flavor, &self.resources) {
            (Some(_), Some(_)) => Err(ValidationError::FlavorAndResources),
            (None, None) => Err(ValidationError::NoSize),
            (Some(name), None) => {
                let f = flavors
                    .get(name)
                    .ok_or_else(|| ValidationError::UnknownFlavor {
                        name: name.clone(),
                        known: join(flavors.names().into_iter()),
                    })?;
                Ok((
                    f.resources.clone(),
                    Some(f.name.clone()),
                    f.required_traits.clone(),
                ))
            }
            (None, Some(spec)) => Ok((spec.to_resources()?, None, Vec::new())),
        }
    }
}

impl ResourceSpec {
    /// Checks the sizes are plausible and converts them.
    pub fn to_resources(&self) -> Result<Resources, ValidationError> {
        if self.vcpus == 0 {
            return Err(ValidationError::TooSmall {
                dim: "vcpus",
                min: "1".into(),
                got: "0".into(),
            });
        }
        if self.vcpus > ABSURD_VCPUS {
            return Err(ValidationError::Absurd {
                dim: "vcpus",
                max: ABSURD_VCPUS.to_string(),
                got: self.vcpus.to_string(),
            });
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(ValidationError::TooSmall {
                dim: "memory_mib",
                min: format!("{MIN_MEMORY_MIB} MiB"),
                got: format!("{} MiB", self.memory_mib),
            });
        }
        if self.memory_mib > ABSURD_MEMORY_MIB {
            return Err(ValidationError::Absurd {
                dim: "memory_mib",
                max: human_mib(ABSURD_MEMORY_MIB),
                got: human_mib(self.memory_mib),
            });
        }
        if self.disk_gib > ABSURD_DISK_GIB {
            return Err(ValidationError::Absurd {
                dim: "disk_gib",
                max: format!("{ABSURD_DISK_GIB} GiB"),
                got: format!("{} GiB", self.disk_gib),
            });
        }
        let mut r = Resources::new(self.vcpus, self.memory_mib, self.disk_gib);
        for (name, amount) in &self.extended {
            let n = ResourceName::new(name.as_str()).map_err(|e| ValidationError::Extended {
                name: name.clone(),
                reason: e.to_string(),
            })?;
            if *amount == 0 || *amount > 1024 {
                return Err(ValidationError::Extended {
                    name: name.clone(),
                    reason: format!("amount must be between 1 and 1024 (got {amount})"),
                });
            }
            r.extended.insert(n, *amount);
        }
        Ok(r)
    }
}

impl CreateBatch {
    /// Validates every server; the first error wins and names its index.
    pub fn validate(
        &self,
        ctx: &ValidationContext<'_>,
        rng: &mut impl Rng,
    ) -> Result<Vec<RequestSpec>, ValidationError> {
        let n = self.servers.len();
        if n == 0 || n > MAX_BATCH {
            return Err(ValidationError::BatchSize {
                got: n,
                max: MAX_BATCH,
            });
        }
        let mut out: Vec<RequestSpec> = Vec::with_capacity(n);
        let mut ids = std::collections::BTreeSet::new();
        for (index, s) in self.servers.iter().enumerate() {
            let spec = s.validate(ctx, rng).map_err(|e| ValidationError::InBatch {
                index,
                inner: Box::new(e),
            })?;
            if !ids.insert(spec.id.clone()) {
                return Err(ValidationError::DuplicateInBatch {
                    index,
                    id: spec.id.to_string(),
                });
            }
            out.push(spec);
        }
        Ok(out)
    }
}

/// Routes a spec, turning a routing failure into a validation error users understand.
pub fn route_or_explain(shards: &ShardMap, spec: &RequestSpec) -> Result<ShardId, ValidationError> {
    shards.route(&spec.routable()).map_err(|e| match e {
        RouteError::TooLarge => ValidationError::LargerThanAnyClass {
            got: spec.resources.to_string(),
            largest: shards.largest().to_string(),
        },
        other => ValidationError::Route(other.to_string()),
    })
}

fn traits(field: &'static str, raw: &[String]) -> Result<Vec<TraitName>, ValidationError> {
    if raw.len() > MAX_TRAITS {
        return Err(ValidationError::TooManyTraits {
            field,
            max: MAX_TRAITS,
            got: raw.len(),
        });
    }
    let mut out: Vec<TraitName> = Vec::with_capacity(raw.len());
    for (index, t) in raw.iter().enumerate() {
        let name = TraitName::new(t.as_str()).map_err(|err| ValidationError::Trait {
            field,
            index,
            err,
        })?;
        if out.contains(&name) {
            return Err(ValidationError::DuplicateTrait {
                field,
                name: t.clone(),
            });
        }
        out.push(name);
    }
    Ok(out)
}

fn check_image(img: &str) -> Result<(), ValidationError> {
    if img.is_empty() {
        return Err(ValidationError::Image(
            "must not be empty when given".into(),
        ));
    }
    if img.len() > MAX_IMAGE_LEN {
        return Err(ValidationError::Image(format!(
            "must be at most {MAX_IMAGE_LEN} bytes (got {})",
            img.len()
        )));
    }
    if let Some(c) = img.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(ValidationError::Image(format!(
            "must not contain whitespace or control characters (found {c:?})"
        )));
    }
    Ok(())
}

fn check_metadata(md: &BTreeMap<String, String>) -> Result<(), ValidationError> {
    let err = |key: &str, reason: String| ValidationError::Metadata {
        key: if key.is_empty() {
            String::new()
        } else {
            format!(".{key}")
        },
        reason,
    };
    if md.len() > MAX_METADATA_ENTRIES {
        return Err(err(
            "",
            format!("at most {MAX_METADATA_ENTRIES} entries (got {})", md.len()),
        ));
    }
    let mut total = 0usize;
    for (k, v) in md {
        let key_ok = !k.is_empty()
            && k.len() <= MAX_METADATA_KEY
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'));
        if !key_ok {
            return Err(err(
                "",
                format!(
                    "key {k:?} must be 1 to {MAX_METADATA_KEY} characters of letters, digits, '.', '_', '-' and '/'"
                ),
            ));
        }
        if v.len() > MAX_METADATA_VALUE {
            return Err(err(
                k,
                format!(
                    "value must be at most {MAX_METADATA_VALUE} bytes (got {})",
                    v.len()
                ),
            ));
        }
        if v.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
            return Err(err(k, "value must not contain control characters".into()));
        }
        total += k.len() + v.len();
    }
    if total > MAX_METADATA_TOTAL {
        return Err(err(
            "",
            format!("at most {MAX_METADATA_TOTAL} bytes in total (got {total})"),
        ));
    }
    Ok(())
}

fn join<'a>(it: impl Iterator<Item = &'a str>) -> String {
    let v: Vec<&str> = it.collect();
    v.join(", ")
}

impl fmt::Display for GroupPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GroupPolicy::Affinity => "affinity",
            GroupPolicy::AntiAffinity => "anti-affinity",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::default_shard_map;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    struct Fx {
        flavors: FlavorCatalog,
        shards: ShardMap,
    }

    impl Fx {
        fn new() -> Self {
            Fx {
                flavors: FlavorCatalog::default(),
                shards: default_shard_map(Zone::new("az1").unwrap()),
            }
        }
        fn ctx(&self) -> ValidationContext<'_> {
            ValidationContext {
                flavors: &self.flavors,
                shards: &self.shards,
                default_deadline_s: DEFAULT_DEADLINE_S,
            }
        }
        fn check(&self, body: &str) -> Result<RequestSpec, ValidationError> {
            let req: CreateServer = parse_json(body.as_bytes())?;
            req.validate(&self.ctx(), &mut ChaCha8Rng::seed_from_u64(1))
        }
    }

    #[test]
    fn flavor_request_is_normalized() {
        let fx = Fx::new();
        let s = fx
            .check(r#"{"id":"web-1","flavor":"m1.small","required_traits":["ssd"]}"#)
            .unwrap();
        assert_eq!(s.id.as_str(), "web-1");
        assert_eq!(s.resources, Resources::new(1, 2048, 20));
        assert_eq!(s.zone.as_str(), "az1");
        assert_eq!(s.deadline_s, DEFAULT_DEADLINE_S);
        assert_eq!(s.required_traits.len(), 1);
    }

    #[test]
    fn generated_id_when_absent() {
        let fx = Fx::new();
        let s = fx
            .check(r#"{"resources":{"vcpus":2,"memory_mib":4096}}"#)
            .unwrap();
        assert_eq!(s.id.as_str().len(), 36);
    }

    #[test]
    fn unknown_fields_are_named() {
        let fx = Fx::new();
        let e = fx.check(r#"{"flavour":"m1.small"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `flavour`"), "{e}");
        let e = fx
            .check(r#"{"resources":{"vcpus":1,"memory_mib":512,"gpus":1}}"#)
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("resources.gpus: unknown field `gpus`"),
            "{e}"
        );
    }

    #[test]
    fn wrong_types_name_the_path() {
        let fx = Fx::new();
        let e = fx
            .check(r#"{"resources":{"vcpus":-1,"memory_mib":512}}"#)
            .unwrap_err();
        assert!(e.to_string().starts_with("resources.vcpus:"), "{e}");
        let e = fx
            .check(r#"{"resources":{"vcpus":"two","memory_mib":512}}"#)
            .unwrap_err();
        assert!(e.to_string().starts_with("resources.vcpus:"), "{e}");
        let e = fx.check("{not json").unwrap_err();
        assert_eq!(e.code(), "malformed");
        let e = parse_json::<CreateServer>(b"\xff\xfe").unwrap_err();
        assert_eq!(e.code(), "malformed");
    }

    #[test]
    fn sizes_are_checked() {
        let fx = Fx::new();
        let e = fx
            .check(r#"{"resources":{"vcpus":0,"memory_mib":512}}"#)
            .unwrap_err();
        assert_eq!(e.to_string(), "resources.vcpus: 0 is too small (minimum 1)");
        let e = fx
            .check(r#"{"resources":{"vcpus":1,"memory_mib":10}}"#)
            .unwrap_err();
        assert!(matches!(
            e,
            ValidationError::TooSmall {
                dim: "memory_mib",
                ..
            }
        ));
        let e = fx
            .check(r#"{"resources":{"vcpus":100000,"memory_mib":512}}"#)
            .unwrap_err();
        assert!(matches!(e, ValidationError::Absurd { dim: "vcpus", .. }));
        let e = fx
            .check(r#"{"resources":{"vcpus":2,"memory_mib":1048576}}"#)
            .unwrap_err();
        assert!(
            matches!(e, ValidationError::LargerThanAnyClass { .. }),
            "{e}"
        );
        assert!(
            e.to_string()
                .contains("largest size class (64 vCPU, 256 GiB"),
            "{e}"
        );
    }

    #[test]
    fn flavor_and_resources_rules() {
        let fx = Fx::new();
        assert_eq!(fx.check("{}").unwrap_err(), ValidationError::NoSize);
        let e = fx.check(r#"{"flavor":"m1.small","resources":{"vcpus":1,"memory_mib":512}}"#);
        assert_eq!(e.unwrap_err(), ValidationError::FlavorAndResources);
        let e = fx.check(r#"{"flavor":"m9.huge"}"#).unwrap_err();
        assert!(
            e.to_string()
                .contains("unknown flavor `m9.huge` (known: m1.tiny"),
            "{e}"
        );
    }

    #[test]
    fn traits_zone_group_image_metadata() {
        let fx = Fx::new();
        let e = fx
            .check(r#"{"flavor":"m1.small","required_traits":["SSD"]}"#)
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("required_traits[0]: invalid character 'S'"),
            "{e}"
        );
        let e = fx
            .check(r#"{"flavor":"m1.small","required_traits":["ssd","ssd"]}"#)
            .unwrap_err();
        assert!(matches!(e, ValidationError::DuplicateTrait { .. }));
        let e = fx
            .check(r#"{"flavor":"m1.small","required_traits":["ssd"],"forbidden_traits":["ssd"]}"#);
        assert_eq!(e.unwrap_err(), ValidationError::TraitConflict("ssd".into()));
        let e = fx
            .check(r#"{"flavor":"m1.small","zone":"mars"}"#)
            .unwrap_err();
        assert_eq!(e.to_string(), "zone: unknown zone `mars` (known: az1)");
        let e =
            fx.check(r#"{"flavor":"m1.small","server_group":{"name":"db","policy":"sideways"}}"#);
        assert!(
            e.unwrap_err()
                .to_string()
                .starts_with("server_group.policy:")
        );
        let ok = fx.check(
            r#"{"flavor":"m1.small","server_group":{"name":"db","policy":"anti-affinity"}}"#,
        );
        assert_eq!(ok.unwrap().group.unwrap().policy, GroupPolicy::AntiAffinity);
        let e = fx
            .check(r#"{"flavor":"m1.small","image":"a b"}"#)
            .unwrap_err();
        assert!(matches!(e, ValidationError::Image(_)));
        let big = "x".repeat(2000);
        let e = fx
            .check(&format!(
                r#"{{"flavor":"m1.small","metadata":{{"k":"{big}"}}}}"#
            ))
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("metadata.k: value must be at most"),
            "{e}"
        );
        let e = fx
            .check(r#"{"flavor":"m1.small","metadata":{"bad key":"v"}}"#)
            .unwrap_err();
        assert!(matches!(e, ValidationError::Metadata { .. }));
        let e = fx
            .check(r#"{"flavor":"m1.small","deadline_s":0}"#)
            .unwrap_err();
        assert!(matches!(e, ValidationError::Deadline { got: 0, .. }));
    }

    #[test]
    fn gpu_flavor_routes_with_its_trait() {
        let fx = Fx::new();
        let s = fx.check(r#"{"flavor":"g1.large"}"#).unwrap();
        assert_eq!(s.required_traits, vec![TraitName::new("gpu").unwrap()]);
        let shard = route_or_explain(&fx.shards, &s).unwrap();
        assert_eq!(shard.tclass.as_str(), "gpu");
        let e = fx
            .check(r#"{"resources":{"vcpus":1,"memory_mib":512,"extended":{"gpu":1}}}"#)
            .unwrap_err();
        assert!(matches!(e, ValidationError::Route(_)), "{e}");
    }

    #[test]
    fn batches() {
        let fx = Fx::new();
        let b: CreateBatch = parse_json(
            br#"{"servers":[{"id":"a","flavor":"m1.small"},{"id":"a","flavor":"m1.small"}]}"#,
        )
        .unwrap();
        let e = b
            .validate(&fx.ctx(), &mut ChaCha8Rng::seed_from_u64(1))
            .unwrap_err();
        assert!(matches!(
            e,
            ValidationError::DuplicateInBatch { index: 1, .. }
        ));
        let b: CreateBatch =
            parse_json(br#"{"servers":[{"flavor":"m1.small"},{"flavor":"nope"}]}"#).unwrap();
        let e = b
            .validate(&fx.ctx(), &mut ChaCha8Rng::seed_from_u64(1))
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("servers[1].flavor: unknown flavor"),
            "{e}"
        );
        let b = CreateBatch::default();
        assert!(matches!(
            b.validate(&fx.ctx(), &mut ChaCha8Rng::seed_from_u64(1)),
            Err(ValidationError::BatchSize { .. })
        ));
    }

    #[test]
    fn oversized_body_is_refused_before_parsing() {
        let body = vec![b' '; MAX_BODY_BYTES + 1];
        assert!(matches!(
            parse_json::<CreateServer>(&body),
            Err(ValidationError::BodyTooLarge { .. })
        ));
    }

    #[test]
    fn same_body_same_spec() {
        let fx = Fx::new();
        let a = fx
            .check(r#"{"id":"x","flavor":"m1.small","required_traits":["b","a"]}"#)
            .unwrap();
        let b = fx
            .check(r#"{"required_traits":["a","b"],"flavor":"m1.small","id":"x"}"#)
            .unwrap();
        assert_eq!(a, b);
    }
}
