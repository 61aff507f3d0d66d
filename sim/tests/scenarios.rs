#![allow(clippy::unwrap_used, clippy::tests_outside_test_module)] // test code: a panic is the failure report

//! The simulator on scenarios whose right answers are known, its determinism, and the central
//! baselines against a brute-force reference on tiny inputs.

use std::io::Write;

use placement::Resources;
use placement::policy::Policy;
use placement::pull::PullConfig;
use placement::resources::AllocationRatios;
use placement::shard::default_shard_map;
use rand::{RngExt, SeedableRng};
use sim::central::{self, CentralConfig, DecisionCost, NOVA_US_PER_HOST};
use sim::cluster::{ClusterSpec, ShapeCount};
use sim::stats::Report;
use sim::updraft::{self, UpdraftConfig};
use sim::workload::{Arrivals, Mix, SyntheticSpec, TickArrivals, WorkloadSpec};
use sim::{PolicyKind, report};

fn cluster(nodes: usize, vcpus: u32, mem_gib: u64) -> ClusterSpec {
    ClusterSpec {
        shapes: vec![
            format!("{nodes}x{vcpus}x{mem_gib}")
                .parse::<ShapeCount>()
                .unwrap(),
        ],
        ratios: AllocationRatios {
            cpu: 1.0,
            ram: 1.0,
            disk: 1.0,
        },
        reserved_mib: 0,
    }
}

/// A trace in the simple format, (arrival s, lifetime s, vCPUs, memory MiB), replayed with
/// each tick's requests at its start (the directory holding it goes with the guard).
fn trace(rows: &[(u64, u64, u32, u64)]) -> (tempfile::TempDir, WorkloadSpec) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.csv");
    let mut f = std::fs::File::create(&path).unwrap();
    writeln!(f, "arrival_s,lifetime_s,vcpus,memory_mib").unwrap();
    for (a, l, c, m) in rows {
        writeln!(f, "{a},{l},{c},{m}").unwrap();
    }
    let w = WorkloadSpec::Trace {
        path,
        limit: None,
        ticks: TickArrivals::Instant,
    };
    (dir, w)
}

fn updraft_cfg(policy: Policy, seed: u64) -> UpdraftConfig {
    let mut c = UpdraftConfig::new(
        default_shard_map(placement::Zone::new("az1").unwrap()),
        PullConfig {
            policy,
            ..PullConfig::default()
        },
        seed,
    );
    c.build_time = 1000;
    c.deadline = 60_000;
    c.sample_every = 10_000;
    c
}

fn central_cfg(kind: PolicyKind) -> CentralConfig {
    CentralConfig {
        deadline: 60_000,
        sample_every: 10_000,
        retry_batch: 64,
        seed: 1,
        map: default_shard_map(placement::Zone::new("az1").unwrap()),
        cost: DecisionCost::of(kind),
    }
}

fn run(kind: PolicyKind, c: &ClusterSpec, w: &WorkloadSpec, seed: u64) -> Report {
    let nodes = c.nodes().unwrap();
    let wl = w.open().unwrap();
    match kind {
        PolicyKind::Updraft => updraft::run(nodes, wl, &updraft_cfg(Policy::Pack, seed)).unwrap(),
        PolicyKind::UpdraftSpread => {
            updraft::run(nodes, wl, &updraft_cfg(Policy::Spread, seed)).unwrap()
        }
        k => central::run(k, nodes, wl, &central_cfg(k)).unwrap(),
    }
}

#[test]
fn a_workload_that_exactly_fills_the_cluster_is_all_placed() {
    // 4 nodes of 16 vCPU / 64 GiB; 32 VMs of 2 vCPU / 8 GiB fill them to the last byte
    let rows: Vec<_> = (0..32).map(|i| (i, 1_000, 2, 8192)).collect();
    let (_d, w) = trace(&rows);
    let c = cluster(4, 16, 64);
    for kind in PolicyKind::ALL {
        let r = run(kind, &c, &w, 1);
        assert_eq!(r.arrived, 32, "{}", kind.name());
        assert_eq!(r.placed, 32, "{}: wait {:?}", kind.name(), r.wait);
        assert_eq!(r.failed, 0, "{}", kind.name());
        assert_eq!(r.peak_hosts, 4, "{}", kind.name());
        assert!(
            r.peak_mem_util > 0.999,
            "{}: {}",
            kind.name(),
            r.peak_mem_util
        );
    }
}

#[test]
fn what_cannot_fit_fails_and_nothing_else_does() {
    // one more VM than fits, and one larger than any node
    let mut rows: Vec<_> = (0..33).map(|i| (i, 1_000, 2, 8192)).collect();
    rows.push((40, 1_000, 32, 200 * 1024));
    let (_d, w) = trace(&rows);
    let c = cluster(4, 16, 64);
    for kind in PolicyKind::ALL {
        let r = run(kind, &c, &w, 1);
        assert_eq!(
            (r.arrived, r.placed, r.failed),
            (34, 32, 2),
            "{}",
            kind.name()
        );
    }
}

#[test]
fn departures_make_room_for_waiting_requests() {
    // the cluster holds one VM at a time; each lives 10 s; the second waits for the first
    let rows = vec![(0, 10, 16, 60 * 1024), (1, 10, 16, 60 * 1024)];
    let (_d, w) = trace(&rows);
    let c = cluster(1, 16, 64);
    for kind in [
        PolicyKind::Updraft,
        PolicyKind::BestFit,
        PolicyKind::FirstFit,
    ] {
        let r = run(kind, &c, &w, 1);
        assert_eq!(r.placed, 2, "{}", kind.name());
        // the second waited for the first to leave: about 9 s (plus the protocol's own time)
        assert!(r.wait.max >= 8_000, "{}: {:?}", kind.name(), r.wait);
    }
}

#[test]
fn the_same_seed_gives_identical_outputs_and_another_seed_does_not() {
    let w = WorkloadSpec::Synthetic(SyntheticSpec {
        requests: 3000,
        rate_per_s: 20.0,
        arrivals: Arrivals::Bursty,
        mix: Mix::Large,
        mean_lifetime_s: 120.0,
        seed: 9,
    });
    let c = cluster(12, 64, 256);
    let outputs = |seed: u64| {
        let mut r = run(PolicyKind::Updraft, &c, &w, seed);
        r.wall_s = 0.0;
        let dir = tempfile::tempdir().unwrap();
        report::write_csv(dir.path(), std::slice::from_ref(&r)).unwrap();
        let csv = std::fs::read(dir.path().join("timeseries.csv")).unwrap();
        (
            serde_json::to_string(&r).unwrap(),
            report::table(&[r], None),
            csv,
        )
    };
    let a = outputs(5);
    let b = outputs(5);
    assert_eq!(a, b, "same seed, same bytes");
    let c2 = outputs(6);
    assert_ne!(a.0, c2.0, "another seed draws other latencies and choices");
}

/// The reference central scheduler: place each arrival (no departures) on the node the policy
/// names, scanning every node, in plain code.
fn reference(kind: PolicyKind, nodes: &[Resources], reqs: &[Resources]) -> (u64, usize) {
    let mut free = nodes.to_vec();
    let mut used = vec![false; nodes.len()];
    let mut placed = 0;
    for r in reqs {
        let fits: Vec<usize> = (0..free.len()).filter(|i| r.fits(&free[*i])).collect();
        let left = |i: usize| {
            let f = &free[i];
            f64::from(f.vcpus - r.vcpus) / f64::from(nodes[i].vcpus)
                + (f.memory_mib - r.memory_mib) as f64 / nodes[i].memory_mib as f64
        };
        let pick = match kind {
            PolicyKind::FirstFit => fits.first().copied(),
            PolicyKind::BestFit => fits
                .iter()
                .copied()
                .min_by(|a, b| left(*a).total_cmp(&left(*b))),
            PolicyKind::WorstFit => fits
                .iter()
                .copied()
                .min_by(|a, b| left(*b).total_cmp(&left(*a))),
            // the least free memory that fits, then the fewest free vCPUs
            PolicyKind::BestFitIndexed => fits
                .iter()
                .copied()
                .min_by_key(|i| (free[*i].memory_mib, free[*i].vcpus, *i)),
            // Nova's RAM weigher: the most free memory, the first such node on a tie
            PolicyKind::Nova => fits
                .iter()
                .copied()
                .min_by_key(|i| (std::cmp::Reverse(free[*i].memory_mib), *i)),
            _ => unreachable!(),
        };
        if let Some(i) = pick {
            free[i] = free[i].checked_sub(r).unwrap();
            used[i] = true;
            placed += 1;
        }
    }
    (placed, used.iter().filter(|u| **u).count())
}

#[test]
fn central_baselines_match_a_brute_force_reference_on_tiny_inputs() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    for case in 0..200 {
        let n_nodes = rng.random_range(1..5usize);
        let c = cluster(n_nodes, 8, 32);
        let nodes: Vec<Resources> = c
            .nodes()
            .unwrap()
            .iter()
            .map(|n| n.capacity.clone())
            .collect();
        let n_reqs = rng.random_range(1..12usize);
        let reqs: Vec<(u64, u64, u32, u64)> = (0..n_reqs)
            .map(|i| {
                let v = rng.random_range(1..=8u32);
                let m = rng.random_range(1..=32u64) * 1024;
                (i as u64, 1_000, v, m)
            })
            .collect();
        let (_d, w) = trace(&reqs);
        let rs: Vec<Resources> = reqs
            .iter()
            .map(|(_, _, v, m)| Resources::new(*v, *m, 0))
            .collect();
        for kind in [
            PolicyKind::FirstFit,
            PolicyKind::BestFit,
            PolicyKind::WorstFit,
            PolicyKind::BestFitIndexed,
            PolicyKind::Nova,
        ] {
            let r = run(kind, &c, &w, 1);
            let (placed, hosts) = reference(kind, &nodes, &rs);
            assert_eq!(
                (r.placed, r.peak_hosts),
                (placed, hosts),
                "case {case} {}: nodes {nodes:?} reqs {rs:?}",
                kind.name()
            );
        }
        // the lower bound never exceeds what a policy used when it placed everything
        let lb = sim::plan::lower_bound(&w, &nodes[0]).unwrap();
        let lin = run(PolicyKind::BestFit, &c, &w, 1);
        if usize::try_from(lin.placed) == Ok(rs.len()) {
            assert!(
                lb <= lin.peak_hosts,
                "case {case}: lb {lb} > {}",
                lin.peak_hosts
            );
        }
    }
}

#[test]
fn a_burst_queues_at_a_central_scheduler_one_decision_after_another() {
    // 100 nodes; 50 requests at once, each fits anywhere
    let rows: Vec<_> = (0..50).map(|_| (0, 3_600, 1, 1024)).collect();
    let (_d, w) = trace(&rows);
    let c = cluster(100, 16, 64);
    // Nova-like: every host filtered and weighed, 133 µs each: 13.3 ms a decision
    let nova = run(PolicyKind::Nova, &c, &w, 1);
    assert_eq!(nova.placed, 50);
    let per_decision_ms = 100.0 * NOVA_US_PER_HOST / 1000.0;
    #[allow(clippy::cast_precision_loss)]
    let (p50, max) = (nova.wait.p50 as f64, nova.wait.max as f64);
    assert!(
        (max - 50.0 * per_decision_ms).abs() < 10.0,
        "the last of 50 waits for 50 decisions: {max} ms"
    );
    assert!(
        (p50 - 25.0 * per_decision_ms).abs() < 20.0,
        "the median one for about 25: {p50} ms"
    );
    // indexed best-fit decides in microseconds: the commit is what the wait is made of
    let bf = run(PolicyKind::BestFitIndexed, &c, &w, 1);
    assert_eq!(bf.placed, 50);
    assert!(bf.wait.max <= 10, "{:?}", bf.wait);
}

#[test]
fn requests_the_scheduler_cannot_reach_before_their_deadline_fail() {
    // 1,000 nodes: 133 ms a Nova decision; a burst of 100 with a 5 s deadline
    let rows: Vec<_> = (0..100).map(|_| (0, 3_600, 1, 1024)).collect();
    let (_d, w) = trace(&rows);
    let c = cluster(1_000, 16, 64);
    let cfg = CentralConfig {
        deadline: 5_000,
        ..central_cfg(PolicyKind::Nova)
    };
    let r = central::run(
        PolicyKind::Nova,
        c.nodes().unwrap(),
        w.open().unwrap(),
        &cfg,
    )
    .unwrap();
    // decisions start at 0, 133, 266 ... ms: those starting within 5 s are made
    let reached = 5_000 / 133 + 1;
    assert_eq!(r.placed, reached, "{r:?}");
    assert_eq!(r.failed, 100 - reached);
    // with no decision cost (the old model) every one would have been placed at once
    let free = CentralConfig {
        cost: DecisionCost {
            per_node_us: 0.0,
            ..cfg.cost
        },
        ..cfg
    };
    let r = central::run(
        PolicyKind::Nova,
        c.nodes().unwrap(),
        w.open().unwrap(),
        &free,
    )
    .unwrap();
    assert_eq!(r.placed, 100);
}

#[test]
fn a_node_that_hands_a_request_back_lets_a_peer_take_it() {
    // under pack the fullest node is the first in line for every request; when a build fails
    // there, the request comes back excluding it. Were it to stay first in line, every
    // redelivery would come back to it until the deadline failed the request. And a request
    // handed back waits on its fit lane for a spill deadline of its own: one a full-fit empty
    // node took first (a standing flag elects some) would otherwise sit where no node in use,
    // short of its bound, pulls, until its deadline.
    let rows: Vec<_> = (0..40).map(|i| (i, 3_600, 2, 8192)).collect();
    let (_d, w) = trace(&rows);
    let c = cluster(6, 16, 64);
    let mut cfg = updraft_cfg(Policy::Pack, 3);
    cfg.build_failure_rate = 0.25;
    let r = updraft::run(c.nodes().unwrap(), w.open().unwrap(), &cfg).unwrap();
    let count = |k: &str| r.counters.get(k).copied().unwrap_or(0);
    let failed_builds = count("builds_failed");
    assert!(failed_builds >= 5, "the scenario needs failures: {r:?}");
    // a request fails only by running out of attempts, never by waiting out its deadline
    assert_eq!(r.placed + r.failed, 40, "{r:?}");
    assert!(r.failed <= failed_builds / 3, "{r:?}");
    // each failed build costs a nak or two, not one per nak delay until the deadline
    assert!(count("naks") <= 2 * failed_builds, "{:?}", r.counters);
    assert!(r.wait.max < 15_000, "{:?}", r.wait);
}

#[test]
fn a_node_in_use_takes_a_class_its_credit_left_out_at_once() {
    // one node of 64 vCPU / 48 GiB: with a 1 vCPU / 512 MiB VM on it, its credit goes to the
    // largest class that fits and the smallest ones; a 2 vCPU / 16 GiB request ten seconds
    // later is of a class (bounded by 16 vCPU / 16 GiB) it holds no credit for. A cover pull
    // is waiting on that class and takes it at once; without cover pulls it waits for its
    // spill deadline (500 ms) and the flag after it.
    let rows = [(0, 3_600, 1, 512), (10, 3_600, 2, 16_384)];
    let (_d, w) = trace(&rows);
    let c = cluster(1, 64, 48);
    let waits = |cover: bool| {
        let mut cfg = updraft_cfg(Policy::Pack, 1);
        cfg.pull.cover = cover;
        cfg.pull.open_tiers = 1;
        let r = updraft::run(c.nodes().unwrap(), w.open().unwrap(), &cfg).unwrap();
        assert_eq!(r.placed, 2, "{r:?}");
        r.wait.max
    };
    let with = waits(true);
    let without = waits(false);
    assert!(with < 50, "with cover pulls: {with} ms");
    assert!(without >= 500, "without: {without} ms");
}

#[test]
fn a_class_no_node_in_use_can_hold_is_taken_at_once_by_a_standing_flag() {
    // nodes of 64 vCPU / 24 GiB: one 2 vCPU / 20 GiB VM on each node of pack tier 0 (the
    // only tier that pulls without a flag) puts that tier in use with no room for a 2 vCPU /
    // 16 GiB request (a class bounded by 16 vCPU / 16 GiB). Ten such requests, one every
    // 30 s from 30 s on, can go only to nodes of later tiers. With standing flags (the class
    // is asked for once the first has come, and the nodes in use have no room for it) a few
    // of those pull the class before the next comes and take it at once; without, each
    // waits for its spill deadline (500 ms) and the backlog flag.
    let c = cluster(16, 64, 24);
    let pull = updraft_cfg(Policy::Pack, 1).pull;
    let tier0 = c
        .nodes()
        .unwrap()
        .iter()
        .filter(|n| pull.pack_tier(&n.id) == 0)
        .count();
    assert!((1..16).contains(&tier0), "{tier0} nodes of tier 0");
    let mut rows: Vec<(u64, u64, u32, u64)> = (0..tier0).map(|_| (0, 3_600, 2, 20_480)).collect();
    rows.extend((1..=10).map(|i| (30 * i, 20, 2, 16_384)));
    let (_d, w) = trace(&rows);
    let last_wait = |below: u64| {
        let mut cfg = updraft_cfg(Policy::Pack, 1);
        cfg.standing_below = below;
        let r = updraft::run(c.nodes().unwrap(), w.open().unwrap(), &cfg).unwrap();
        assert_eq!(r.placed, tier0 as u64 + 10, "{r:?}");
        // each lives 20 s: one more host at a time
        assert_eq!(r.peak_hosts, tier0 + 1, "{r:?}");
        r.wait_by_class[&8].p50
    };
    let with = last_wait(placement::standing::MEASURED_STANDING_BELOW);
    let without = last_wait(0);
    // the first of them waits for its flag either way (nothing asked for the class before)
    assert!(with < 50, "with standing flags: p50 {with} ms");
    assert!(without >= 500, "without: p50 {without} ms");
}
