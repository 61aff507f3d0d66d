//! The simulated cluster's nodes: shapes, counts, allocation ratios and reserved share.

use placement::ledger::NodeLedger;
use placement::resources::{AllocationRatios, schedulable_capacity};
use placement::{NodeId, Resources};

/// A node shape and how many nodes have it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ShapeCount {
    /// Nodes of this shape.
    pub count: usize,
    /// Host totals.
    pub totals: Resources,
}

/// Why a shape does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("shape `{0}`: expected COUNTxVCPUSxMEMORY_GIB, e.g. 200x64x512")]
pub struct ShapeError(String);

impl std::str::FromStr for ShapeCount {
    type Err = ShapeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split('x').collect();
        let err = || ShapeError(s.to_string());
        if parts.len() != 3 {
            return Err(err());
        }
        let count: usize = parts[0].parse().map_err(|_| err())?;
        let vcpus: u32 = parts[1].parse().map_err(|_| err())?;
        let mem_gib: u64 = parts[2].parse().map_err(|_| err())?;
        if vcpus == 0 || mem_gib == 0 {
            return Err(err());
        }
        Ok(ShapeCount {
            count,
            totals: Resources::new(vcpus, mem_gib.checked_mul(1024).ok_or_else(err)?, 10_000),
        })
    }
}

/// The cluster.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ClusterSpec {
    /// Shapes with counts.
    pub shapes: Vec<ShapeCount>,
    /// Allocation ratios (as in the node-agent: cpu 4.0, ram 1.0, disk 1.0 by default).
    pub ratios: AllocationRatios,
    /// Memory kept for each host, MiB.
    pub reserved_mib: u64,
}

/// One node as the simulator sees it.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// Id.
    pub id: NodeId,
    /// Totals.
    pub totals: Resources,
    /// Reserved share.
    pub reserved: Resources,
    /// Schedulable capacity.
    pub capacity: Resources,
    /// Allocation ratios.
    pub ratios: AllocationRatios,
}

impl NodeSpec {
    /// A fresh ledger for this node.
    pub fn ledger(&self) -> NodeLedger {
        NodeLedger::new(self.totals.clone(), self.reserved.clone(), self.ratios)
            .expect("capacity was checked when the node spec was built")
    }
}

impl ClusterSpec {
    /// Total nodes.
    pub fn len(&self) -> usize {
        self.shapes.iter().map(|s| s.count).sum()
    }

    /// No nodes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every node, in a stable order (ids `n000000`, …).
    pub fn nodes(&self) -> Result<Vec<NodeSpec>, placement::resources::CapacityError> {
        let mut out = Vec::with_capacity(self.len());
        for s in &self.shapes {
            let reserved = Resources::new(0, self.reserved_mib, 0);
            let capacity = schedulable_capacity(&s.totals, &reserved, &self.ratios)?;
            for _ in 0..s.count {
                let id = NodeId::new(format!("n{:06}", out.len()))
                    .expect("generated node ids are valid");
                out.push(NodeSpec {
                    id,
                    totals: s.totals.clone(),
                    reserved: reserved.clone(),
                    capacity: capacity.clone(),
                    ratios: self.ratios,
                });
            }
        }
        Ok(out)
    }

    /// The same mix scaled to `total` nodes (counts in proportion, at least one of each
    /// shape that had any).
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    pub fn scaled(&self, total: usize) -> ClusterSpec {
        let now = self.len().max(1) as f64;
        let mut shapes: Vec<ShapeCount> = self
            .shapes
            .iter()
            .map(|s| ShapeCount {
                count: ((s.count as f64) * total as f64 / now).round().max(1.0) as usize,
                totals: s.totals.clone(),
            })
            .collect();
        // fix rounding on the largest group
        let sum: usize = shapes.iter().map(|s| s.count).sum();
        if let Some(big) = shapes.iter_mut().max_by_key(|s| s.count) {
            if sum > total {
                big.count = big.count.saturating_sub(sum - total).max(1);
            } else {
                big.count += total - sum;
            }
        }
        ClusterSpec {
            shapes,
            ..self.clone()
        }
    }

    /// Short description.
    pub fn describe(&self) -> String {
        let shapes: Vec<String> = self
            .shapes
            .iter()
            .map(|s| {
                format!(
                    "{} × {} vCPU / {} GiB",
                    s.count,
                    s.totals.vcpus,
                    s.totals.memory_mib / 1024
                )
            })
            .collect();
        format!(
            "{} (cpu ratio {}, ram ratio {})",
            shapes.join(" + "),
            self.ratios.cpu,
            self.ratios.ram
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_parse_and_scale() {
        let s: ShapeCount = "200x64x512".parse().unwrap();
        assert_eq!(s.count, 200);
        assert_eq!(s.totals.memory_mib, 512 * 1024);
        assert!("64x512".parse::<ShapeCount>().is_err());
        assert!("1x0x512".parse::<ShapeCount>().is_err());
        let c = ClusterSpec {
            shapes: vec![s, "100x32x256".parse().unwrap()],
            ratios: AllocationRatios::default(),
            reserved_mib: 0,
        };
        assert_eq!(c.len(), 300);
        let half = c.scaled(150);
        assert_eq!(half.len(), 150);
        assert_eq!(half.shapes[0].count, 100);
        assert_eq!(c.nodes().unwrap()[299].id.as_str(), "n000299");
    }
}
