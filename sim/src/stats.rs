//! What a run measures, and the report it produces.

use std::collections::BTreeMap;

use placement::Resources;

use crate::Millis;

/// One point of the time series.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Sample {
    /// Simulated time, seconds.
    pub t_s: u64,
    /// Nodes running at least one VM.
    pub hosts_in_use: usize,
    /// Allocated vCPUs / schedulable vCPUs.
    pub cpu_util: f64,
    /// Allocated memory / schedulable memory.
    pub mem_util: f64,
    /// Requests waiting for a node.
    pub waiting: usize,
    /// Free memory on nodes with no free vCPU, as a share of all memory (stranded).
    pub stranded_mem: f64,
    /// Free vCPUs on nodes with less than 1 GiB free, as a share of all vCPUs (stranded).
    pub stranded_cpu: f64,
}

impl Sample {
    /// Measures a fleet given each node's (capacity, unallocated).
    pub fn measure<'a>(
        t: Millis,
        waiting: usize,
        nodes: impl Iterator<Item = (&'a Resources, Resources)>,
    ) -> Sample {
        let mut tally = FleetTally::default();
        for (cap, free) in nodes {
            tally.add(cap, &free);
        }
        tally.sample(t, waiting)
    }
}

/// Running sums over a fleet, kept up to date node by node as ledgers change, so that a
/// sample costs the same at 100 nodes and at 100,000.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetTally {
    cap_cpu: u64,
    cap_mem: u64,
    free_cpu: u64,
    free_mem: u64,
    stranded_cpu: u64,
    stranded_mem: u64,
    hosts: usize,
}

impl FleetTally {
    /// Adds a node with `free` of `cap` unallocated.
    pub fn add(&mut self, cap: &Resources, free: &Resources) {
        self.apply(cap, free, true);
    }

    /// Takes away what [`FleetTally::add`] added for the same values.
    pub fn remove(&mut self, cap: &Resources, free: &Resources) {
        self.apply(cap, free, false);
    }

    fn apply(&mut self, cap: &Resources, free: &Resources, add: bool) {
        let op = |v: &mut u64, x: u64| {
            *v = if add {
                v.saturating_add(x)
            } else {
                v.saturating_sub(x)
            };
        };
        op(&mut self.cap_cpu, u64::from(cap.vcpus));
        op(&mut self.cap_mem, cap.memory_mib);
        op(&mut self.free_cpu, u64::from(free.vcpus));
        op(&mut self.free_mem, free.memory_mib);
        // free memory with no vCPU left, and free vCPUs with less than 1 GiB left: stranded
        if free.vcpus == 0 {
            op(&mut self.stranded_mem, free.memory_mib);
        }
        if free.memory_mib < 1024 {
            op(&mut self.stranded_cpu, u64::from(free.vcpus));
        }
        if free != cap {
            if add {
                self.hosts += 1;
            } else {
                self.hosts = self.hosts.saturating_sub(1);
            }
        }
    }

    /// The sample these sums make at time `t`.
    #[allow(clippy::cast_precision_loss)]
    pub fn sample(&self, t: Millis, waiting: usize) -> Sample {
        let share = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        Sample {
            t_s: t / 1000,
            hosts_in_use: self.hosts,
            cpu_util: share(self.cap_cpu - self.free_cpu, self.cap_cpu),
            mem_util: share(self.cap_mem - self.free_mem, self.cap_mem),
            waiting,
            stranded_mem: share(self.stranded_mem, self.cap_mem),
            stranded_cpu: share(self.stranded_cpu, self.cap_cpu),
        }
    }
}

/// Latency percentiles, milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Percentiles {
    /// Samples.
    pub n: usize,
    /// Median.
    pub p50: u64,
    /// 95th.
    pub p95: u64,
    /// 99th.
    pub p99: u64,
    /// Largest.
    pub max: u64,
}

impl Percentiles {
    /// Of `v` (sorted in place).
    pub fn of(v: &mut [u64]) -> Percentiles {
        if v.is_empty() {
            return Percentiles::default();
        }
        v.sort_unstable();
        let at = |q: f64| {
            #[allow(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                clippy::cast_precision_loss
            )]
            let i = ((v.len() as f64 - 1.0) * q).round() as usize;
            v[i.min(v.len() - 1)]
        };
        Percentiles {
            n: v.len(),
            p50: at(0.5),
            p95: at(0.95),
            p99: at(0.99),
            max: v[v.len() - 1],
        }
    }
}

/// Collects a run's measurements.
#[derive(Debug, Default)]
pub struct Recorder {
    /// Wait (arrival to claim) per placed request, with its size class.
    waits: Vec<(u8, u32)>,
    /// Requests that arrived.
    pub arrived: u64,
    /// Requests placed.
    pub placed: u64,
    /// Requests failed (deadline, or too large for every node).
    pub failed: u64,
    /// Running VMs lost with their node.
    pub lost: u64,
    /// Placement decisions attempted (central) or deliveries (updraft).
    pub decisions: u64,
    /// Nodes examined (central) or broker messages (updraft), summed.
    pub work: u64,
    /// Time series.
    pub samples: Vec<Sample>,
    hosts_area: f64,
    hosts_last: (Millis, usize),
    /// Most hosts in use at once.
    pub peak_hosts: usize,
    /// Counters specific to one model (claim races, naks, ...).
    pub counters: BTreeMap<&'static str, u64>,
}

impl Recorder {
    /// A request was placed after waiting `wait`.
    pub fn placed(&mut self, class: u8, wait: Millis) {
        self.placed += 1;
        self.waits
            .push((class, u32::try_from(wait).unwrap_or(u32::MAX)));
    }

    /// Hosts in use changed to `n` at `t`.
    #[allow(clippy::cast_precision_loss)]
    pub fn hosts(&mut self, t: Millis, n: usize) {
        let (t0, n0) = self.hosts_last;
        self.hosts_area += (t.saturating_sub(t0)) as f64 * n0 as f64;
        self.hosts_last = (t, n);
        self.peak_hosts = self.peak_hosts.max(n);
    }

    /// Adds to a named counter.
    pub fn count(&mut self, name: &'static str, n: u64) {
        *self.counters.entry(name).or_default() += n;
    }

    /// The report.
    #[allow(clippy::cast_precision_loss)]
    pub fn finish(
        mut self,
        policy: &str,
        end: Millis,
        wall_s: f64,
        events: u64,
        nodes: usize,
    ) -> Report {
        self.hosts(end, self.hosts_last.1);
        let mut all: Vec<u64> = self.waits.iter().map(|w| u64::from(w.1)).collect();
        all.sort_unstable();
        let wait_cdf = if all.is_empty() {
            Vec::new()
        } else {
            (0..=100)
                .map(|q| {
                    let i = (all.len() - 1) * q / 100;
                    (all[i], f64::from(u32::try_from(q).unwrap_or(0)) / 100.0)
                })
                .collect()
        };
        let mut by_class: BTreeMap<u8, Vec<u64>> = BTreeMap::new();
        for (c, w) in &self.waits {
            by_class.entry(*c).or_default().push(u64::from(*w));
        }
        let wait_by_class = by_class
            .into_iter()
            .map(|(c, mut v)| (c, Percentiles::of(&mut v)))
            .collect();
        let mean = |f: fn(&Sample) -> f64| {
            if self.samples.is_empty() {
                0.0
            } else {
                self.samples.iter().map(f).sum::<f64>() / self.samples.len() as f64
            }
        };
        Report {
            policy: policy.to_string(),
            nodes,
            arrived: self.arrived,
            placed: self.placed,
            failed: self.failed,
            lost: self.lost,
            acceptance: if self.arrived == 0 {
                1.0
            } else {
                self.placed as f64 / self.arrived as f64
            },
            wait: Percentiles::of(&mut all),
            wait_by_class,
            wait_cdf,
            peak_hosts: self.peak_hosts,
            mean_hosts: if end == 0 {
                0.0
            } else {
                self.hosts_area / end as f64
            },
            mean_cpu_util: mean(|s| s.cpu_util),
            mean_mem_util: mean(|s| s.mem_util),
            peak_mem_util: self.samples.iter().map(|s| s.mem_util).fold(0.0, f64::max),
            mean_stranded_mem: mean(|s| s.stranded_mem),
            mean_stranded_cpu: mean(|s| s.stranded_cpu),
            work_per_decision: if self.decisions == 0 {
                0.0
            } else {
                self.work as f64 / self.placed.max(1) as f64
            },
            counters: self
                .counters
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            events,
            wall_s,
            samples: self.samples,
        }
    }
}

/// The result of one policy over one workload.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Report {
    /// Policy.
    pub policy: String,
    /// Nodes in the cluster.
    pub nodes: usize,
    /// Requests that arrived.
    pub arrived: u64,
    /// Placed.
    pub placed: u64,
    /// Failed.
    pub failed: u64,
    /// Running VMs lost with their node.
    pub lost: u64,
    /// placed / arrived.
    pub acceptance: f64,
    /// Arrival to claim.
    pub wait: Percentiles,
    /// Arrival to claim per size class.
    pub wait_by_class: BTreeMap<u8, Percentiles>,
    /// (wait ms, fraction of placements waiting at most that), at every percent.
    #[serde(skip)]
    pub wait_cdf: Vec<(u64, f64)>,
    /// Most hosts in use at once.
    pub peak_hosts: usize,
    /// Time-weighted mean of hosts in use.
    pub mean_hosts: f64,
    /// Mean vCPU utilization over samples.
    pub mean_cpu_util: f64,
    /// Mean memory utilization over samples.
    pub mean_mem_util: f64,
    /// Peak memory utilization over samples.
    pub peak_mem_util: f64,
    /// Mean stranded memory share.
    pub mean_stranded_mem: f64,
    /// Mean stranded vCPU share.
    pub mean_stranded_cpu: f64,
    /// Nodes examined (central) or broker messages (updraft) per placement.
    pub work_per_decision: f64,
    /// Model-specific counters.
    pub counters: BTreeMap<String, u64>,
    /// Events handled.
    pub events: u64,
    /// The simulator's own wall time, seconds.
    pub wall_s: f64,
    /// Time series.
    #[serde(skip)]
    pub samples: Vec<Sample>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_hosts_area() {
        let mut v: Vec<u64> = (1..=100).rev().collect();
        let p = Percentiles::of(&mut v);
        assert_eq!((p.n, p.p50, p.p95, p.p99, p.max), (100, 51, 95, 99, 100));
        assert_eq!(Percentiles::of(&mut []), Percentiles::default());
        let mut r = Recorder::default();
        r.hosts(0, 2);
        r.hosts(1000, 4);
        r.arrived = 2;
        r.placed(0, 10);
        let rep = r.finish("x", 2000, 0.0, 0, 4);
        // 2 hosts for 1 s, then 4 for 1 s
        assert!((rep.mean_hosts - 3.0).abs() < 1e-9);
        assert_eq!(rep.peak_hosts, 4);
        assert!((rep.acceptance - 0.5).abs() < 1e-9);
    }

    #[test]
    fn stranded_capacity() {
        let cap = Resources::new(4, 8192, 0);
        let nodes = [
            (cap.clone(), Resources::new(0, 4096, 0)),
            (cap.clone(), Resources::new(2, 512, 0)),
            (cap.clone(), cap.clone()),
        ];
        let s = Sample::measure(5000, 1, nodes.iter().map(|(c, f)| (c, f.clone())));
        assert_eq!(s.hosts_in_use, 2);
        assert!((s.stranded_mem - 4096.0 / 24576.0).abs() < 1e-9);
        assert!((s.stranded_cpu - 2.0 / 12.0).abs() < 1e-9);
    }
}
