//! Flavors: named request shapes, so a client can say `m1.large` instead of spelling out sizes.

use serde::{Deserialize, Serialize};

use crate::ids::{FlavorName, ResourceName, TraitName};
use crate::resources::Resources;

/// A named shape. Traits listed here are added to the request's required traits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flavor {
    /// The name clients use.
    pub name: FlavorName,
    /// What one server of this flavor takes.
    pub resources: Resources,
    /// Traits every server of this flavor needs (`gpu`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub required_traits: Vec<TraitName>,
}

/// The flavors a cluster offers; part of the cluster config in KV so every dispatcher agrees.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct FlavorCatalog(pub Vec<Flavor>);

impl FlavorCatalog {
    /// Looks a flavor up by name.
    pub fn get(&self, name: &str) -> Option<&Flavor> {
        self.0.iter().find(|f| f.name.as_str() == name)
    }

    /// Names, for error messages.
    pub fn names(&self) -> Vec<&str> {
        self.0.iter().map(|f| f.name.as_str()).collect()
    }

    /// Every flavor.
    pub fn iter(&self) -> impl Iterator<Item = &Flavor> {
        self.0.iter()
    }
}

impl Default for FlavorCatalog {
    /// A general-purpose set (OpenStack-style `m1.*`), memory-heavy `r1.*`, and one GPU shape.
    fn default() -> Self {
        let f = |name: &str, vcpus, mem_gib: u64, disk| Flavor {
            name: FlavorName::new(name).expect("static flavor name"),
            resources: Resources::new(vcpus, mem_gib * 1024, disk),
            required_traits: Vec::new(),
        };
        let mut gpu = f("g1.large", 8, 64, 200);
        gpu.resources = gpu
            .resources
            .with_extended(ResourceName::new("gpu").expect("static resource name"), 1);
        gpu.required_traits = vec![TraitName::new("gpu").expect("static trait name")];
        let mut tiny = f("m1.tiny", 1, 0, 1);
        tiny.resources.memory_mib = 512;
        FlavorCatalog(vec![
            tiny,
            f("m1.small", 1, 2, 20),
            f("m1.medium", 2, 4, 40),
            f("m1.large", 4, 8, 80),
            f("m1.xlarge", 8, 16, 160),
            f("m1.2xlarge", 16, 32, 320),
            f("r1.large", 2, 16, 40),
            f("r1.xlarge", 4, 32, 80),
            f("r1.4xlarge", 16, 128, 320),
            gpu,
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_catalog_is_well_formed() {
        let c = FlavorCatalog::default();
        assert_eq!(
            c.get("m1.small").unwrap().resources,
            Resources::new(1, 2048, 20)
        );
        assert!(c.get("nope").is_none());
        let mut names = c.names();
        let n = names.len();
        names.dedup();
        assert_eq!(names.len(), n, "flavor names must be unique");
        assert_eq!(c.get("g1.large").unwrap().required_traits.len(), 1);
    }
}
