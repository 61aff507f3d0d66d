//! Capacity planning: the bin-packing lower bound of a workload, and the smallest cluster
//! (of a given shape mix) that keeps acceptance at or above a target, found by search.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use placement::Resources;

use crate::Millis;
use crate::cluster::ClusterSpec;
use crate::stats::Report;
use crate::workload::{WorkloadError, WorkloadSpec};

/// The lower bound on nodes: the most nodes of capacity `per_node` the concurrent demand ever
/// needs in any one dimension (vCPU or memory) if every request started at its arrival and
/// packing were perfect. No policy can use fewer hosts at that moment.
#[allow(clippy::cast_possible_truncation)]
pub fn lower_bound(spec: &WorkloadSpec, per_node: &Resources) -> Result<usize, WorkloadError> {
    let mut departures: BinaryHeap<Reverse<(Millis, u64, u64)>> = BinaryHeap::new();
    let (mut cpu, mut mem) = (0u64, 0u64);
    let mut best = 0u64;
    for a in spec.open()? {
        let a = a?;
        while let Some(Reverse((t, c, m))) = departures.peek().copied() {
            if t > a.at {
                break;
            }
            departures.pop();
            cpu -= c;
            mem -= m;
        }
        cpu += u64::from(a.resources.vcpus);
        mem += a.resources.memory_mib;
        departures.push(Reverse((
            a.at + a.lifetime,
            u64::from(a.resources.vcpus),
            a.resources.memory_mib,
        )));
        let need = cpu
            .div_ceil(u64::from(per_node.vcpus).max(1))
            .max(mem.div_ceil(per_node.memory_mib.max(1)));
        best = best.max(need);
    }
    Ok(usize::try_from(best).unwrap_or(usize::MAX))
}

/// One probe of the search.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Probe {
    /// Nodes tried.
    pub nodes: usize,
    /// Acceptance reached.
    pub acceptance: f64,
}

/// Finds the smallest node count in `[lo, hi]` whose run reaches `target` acceptance, by
/// doubling then bisection. `run` simulates one cluster; `progress` sees each probe.
pub fn smallest_cluster<E>(
    base: &ClusterSpec,
    lo: usize,
    target: f64,
    mut run: impl FnMut(&ClusterSpec) -> Result<Report, E>,
    mut progress: impl FnMut(&Probe),
) -> Result<(usize, Vec<Probe>), E> {
    let mut probes = Vec::new();
    let mut probe = |n: usize, probes: &mut Vec<Probe>| -> Result<bool, E> {
        let r = run(&base.scaled(n))?;
        let p = Probe {
            nodes: n,
            acceptance: r.acceptance,
        };
        progress(&p);
        probes.push(p);
        Ok(r.acceptance >= target)
    };
    let mut lo = lo.max(1);
    let mut hi = lo;
    // grow until it fits
    while !probe(hi, &mut probes)? {
        lo = hi + 1;
        hi = hi.saturating_mul(2);
        if hi > 10_000_000 {
            return Ok((usize::MAX, probes));
        }
    }
    // bisect: hi fits, everything below lo does not
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if probe(mid, &mut probes)? {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    Ok((hi, probes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::{Arrivals, Mix, SyntheticSpec};

    #[test]
    fn lower_bound_counts_peak_concurrency() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.csv");
        // three 8 GiB VMs alive at once at t=10, then one
        std::fs::write(
            &p,
            "0,100,1,8192\n5,100,1,8192\n10,100,1,8192\n200,10,1,8192\n",
        )
        .unwrap();
        let spec = WorkloadSpec::Trace {
            path: p,
            limit: None,
            ticks: crate::workload::TickArrivals::Instant,
        };
        assert_eq!(
            lower_bound(&spec, &Resources::new(64, 16384, 0)).unwrap(),
            2
        );
        assert_eq!(
            lower_bound(&spec, &Resources::new(2, 1 << 20, 0)).unwrap(),
            2,
            "vCPU-bound"
        );
    }

    #[test]
    fn search_finds_the_threshold() {
        let base = ClusterSpec {
            shapes: vec!["10x8x32".parse().unwrap()],
            ratios: Default::default(),
            reserved_mib: 0,
        };
        // a fake run: acceptance reaches the target from 37 nodes on
        let run = |c: &ClusterSpec| -> Result<Report, ()> {
            let n = c.len();
            let mut rec = crate::stats::Recorder::default();
            rec.arrived = 100;
            for _ in 0..(if n >= 37 { 100 } else { 90 }) {
                rec.placed(0, 1);
            }
            Ok(rec.finish("x", 1, 0.0, 0, n))
        };
        let (n, probes) = smallest_cluster(&base, 3, 0.99, run, |_| {}).unwrap();
        assert_eq!(n, 37);
        assert!(probes.len() < 12);
        let _ = SyntheticSpec {
            requests: 1,
            rate_per_s: 1.0,
            arrivals: Arrivals::Poisson,
            mix: Mix::Azure,
            mean_lifetime_s: 1.0,
            seed: 1,
        };
    }
}
