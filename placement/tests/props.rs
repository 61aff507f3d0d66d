#![allow(clippy::unwrap_used, clippy::tests_outside_test_module)] // test code: a panic is the failure report

//! Property tests of the invariants the rest of updraft leans on:
//! * no sequence of ledger operations ever overcommits a node;
//! * anything routed to a class fits every node allowed to pull that class's fit lane;
//! * routing picks the smallest holding class and is a function of the request alone;
//! * the quick fit test answers what the explaining one decides;
//! * the request state machine never makes a move outside its transition table, from any
//!   reachable state, whatever it is asked to do.

use std::collections::BTreeSet;

use placement::ids::{ClaimToken, Epoch, NodeId, RequestId, Zone};
use placement::ledger::{NodeLedger, PullId};
use placement::lifecycle::{Claim, RequestRecord, State};
use placement::pull::{NodeProfile, PlanInput, PullConfig, PullOrder, plan_pulls};
use placement::request::RequestSpec;
use placement::resources::{AllocationRatios, Resources};
use placement::shard::{Lane, Routable, ShardMap, default_shard_map};
use placement::time::Timestamp;
use proptest::prelude::*;
use rand::SeedableRng;

fn res(max_cpu: u32, max_mem: u64, max_disk: u64) -> impl Strategy<Value = Resources> {
    (0..=max_cpu, 0..=max_mem, 0..=max_disk).prop_map(|(c, m, d)| Resources::new(c, m, d))
}

#[derive(Debug, Clone)]
enum LedgerOp {
    Reserve(u8, Resources),
    Release(u8),
    TakeCredit(u8, Resources, u32),
    ReturnUnit(u8),
    ReturnUnits(u8, u32),
    ReturnCredit(u8),
    FromPull(u8, u8, Resources),
    ReturnAll,
}

fn ledger_op() -> impl Strategy<Value = LedgerOp> {
    prop_oneof![
        (0u8..16, res(40, 70_000, 600)).prop_map(|(i, r)| LedgerOp::Reserve(i, r)),
        (0u8..16).prop_map(LedgerOp::Release),
        (0u8..8, res(20, 35_000, 300), 0u32..5).prop_map(|(i, r, n)| LedgerOp::TakeCredit(i, r, n)),
        (0u8..8).prop_map(LedgerOp::ReturnUnit),
        (0u8..8, 0u32..6).prop_map(|(p, n)| LedgerOp::ReturnUnits(p, n)),
        (0u8..8).prop_map(LedgerOp::ReturnCredit),
        (0u8..8, 0u8..16, res(40, 70_000, 600)).prop_map(|(p, i, r)| LedgerOp::FromPull(p, i, r)),
        Just(LedgerOp::ReturnAll),
    ]
}

fn rid(i: u8) -> RequestId {
    RequestId::new(format!("r{i}")).expect("valid id")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn ledger_never_overcommits(ops in prop::collection::vec(ledger_op(), 1..200)) {
        let mut l = NodeLedger::new(Resources::new(32, 131_072, 1000), Resources::new(2, 4096, 20), AllocationRatios::default()).unwrap();
        let cap = l.capacity().clone();
        for op in ops {
            match op {
                LedgerOp::Reserve(i, r) => { let _ = l.reserve(&rid(i), &r, None); }
                LedgerOp::Release(i) => { l.release(&rid(i)); }
                LedgerOp::TakeCredit(p, r, n) => {
                    let before = l.credits().clone();
                    if l.take_credit(PullId(u64::from(p)), &r, n).is_ok() {
                        prop_assert_eq!(l.credits(), &before.checked_add(&r.checked_mul(n).unwrap()).unwrap());
                        prop_assert_eq!(l.pull_units(PullId(u64::from(p))), n);
                    }
                }
                LedgerOp::ReturnUnit(p) => {
                    let units = l.pull_units(PullId(u64::from(p)));
                    l.return_unit(PullId(u64::from(p)));
                    prop_assert_eq!(l.pull_units(PullId(u64::from(p))), units.saturating_sub(1));
                }
                LedgerOp::ReturnUnits(p, n) => {
                    let units = l.pull_units(PullId(u64::from(p)));
                    l.return_units(PullId(u64::from(p)), n);
                    prop_assert_eq!(l.pull_units(PullId(u64::from(p))), units.saturating_sub(n));
                }
                LedgerOp::ReturnCredit(p) => { l.return_credit(PullId(u64::from(p))); }
                LedgerOp::FromPull(p, i, r) => {
                    // spends one unit whether or not the reserve succeeds
                    let units = l.pull_units(PullId(u64::from(p)));
                    let _ = l.reserve_from_pull(PullId(u64::from(p)), &rid(i), &r, None);
                    prop_assert_eq!(l.pull_units(PullId(u64::from(p))), units.saturating_sub(1));
                }
                LedgerOp::ReturnAll => { l.return_all_credit(); }
            }
            let used = l.allocated().checked_add(l.credits()).unwrap();
            prop_assert!(used.fits(&cap), "used {used} exceeds capacity {cap}");
            prop_assert!(!l.is_overcommitted());
            // the books add up: allocated is the sum of allocations
            let mut sum = Resources::default();
            for (_, a) in l.allocations() { sum = sum.checked_add(&a.resources).unwrap(); }
            prop_assert_eq!(&sum, l.allocated());
            let mut credit = Resources::default();
            for (_, c) in l.pulls() {
                prop_assert!(c.units > 0, "a pull with no unit left holds no credit");
                credit = credit.checked_add(&c.per.checked_mul(c.units).unwrap()).unwrap();
            }
            prop_assert_eq!(&credit, l.credits());
        }
    }

    #[test]
    fn routed_requests_fit_every_full_fit_puller(
        reqs in prop::collection::vec(res(64, 262_144, 1024), 1..40),
        used in res(256, 500_000, 3000),
        order in prop_oneof![Just(PullOrder::LargestThenSmallest), Just(PullOrder::SmallestFirst), Just(PullOrder::LargestFirst)],
    ) {
        let zone = Zone::new("az1").unwrap();
        let map = default_shard_map(zone.clone());
        let node = NodeProfile { id: NodeId::new("n1").unwrap(), zone: zone.clone(), traits: vec![] };
        let mut ledger = NodeLedger::new(Resources::new(64, 512 * 1024, 4000), Resources::default(), AllocationRatios::default()).unwrap();
        let _ = ledger.reserve(&rid(0), &used, None);
        let cfg = PullConfig { order, open_tiers: 1, ..Default::default() };
        let input = PlanInput { node: &node, map: &map, ledger: &ledger, ignore_credit: false, outstanding: &[], backlog: &[], covers: &[], demand: &[], cfg: &cfg, now: Timestamp(0) };
        let plan = plan_pulls(&input, &mut rand_chacha::ChaCha8Rng::seed_from_u64(0));
        let mut total_credit = Resources::default();
        for intent in &plan.pulls {
            total_credit = total_credit.checked_add(&intent.credit).unwrap();
        }
        prop_assert!(total_credit.fits(&ledger.spare()), "plan credit {total_credit} exceeds spare");
        for (i, r) in reqs.iter().enumerate() {
            let id = format!("q{i}");
            let Ok(shard) = map.route(&Routable { id: &id, zone: &zone, required_traits: &[], resources: r }) else {
                prop_assert!(!r.fits(map.largest()));
                continue;
            };
            for intent in plan.pulls.iter().filter(|p| p.lane == Lane::Fit && p.shard.class() == shard.class()) {
                // a credited pull holds room for it; a cover pull holds none, but its class
                // fits the node's unallocated capacity
                if intent.cover {
                    prop_assert!(intent.credit.is_zero());
                } else {
                    prop_assert!(r.fits(&intent.credit), "{r} routed to {shard} does not fit credit {}", intent.credit);
                }
                prop_assert!(r.fits(&ledger.unallocated()));
            }
        }
    }

    #[test]
    fn routing_is_minimal_and_deterministic(r in res(64, 262_144, 1024), id in "[a-z0-9]{1,20}") {
        let zone = Zone::new("az1").unwrap();
        let map = default_shard_map(zone.clone());
        let req = Routable { id: &id, zone: &zone, required_traits: &[], resources: &r };
        if let Ok(shard) = map.route(&req) {
            prop_assert!(r.fits(&map.upper_bound(&shard.tclass, shard.size)));
            if shard.size > 0 {
                prop_assert!(!r.fits(&map.upper_bound(&shard.tclass, shard.size - 1)));
            }
            prop_assert_eq!(map.route(&req).unwrap(), shard);
        }
    }

    #[test]
    fn fits_answers_what_fits_within_decides(
        a in res(8, 64, 8),
        b in res(8, 64, 8),
        ga in prop::option::of(0u64..4),
        gb in prop::option::of(0u64..4),
    ) {
        let gpu = placement::ids::ResourceName::new("gpu").unwrap();
        let with = |r: Resources, g: Option<u64>| match g {
            Some(n) => r.with_extended(gpu.clone(), n),
            None => r,
        };
        let (a, b) = (with(a, ga), with(b, gb));
        prop_assert_eq!(a.fits(&b), a.fits_within(&b).is_ok());
    }
}

// ---- state machine ----

#[derive(Debug, Clone)]
enum Action {
    Claim {
        attempt_delta: i8,
        node: u8,
        epoch: u8,
        token: u8,
    },
    StartBuild {
        node: u8,
        epoch: u8,
        token: u8,
    },
    Activate {
        node: u8,
        epoch: u8,
        token: u8,
    },
    Release {
        node: u8,
        epoch: u8,
        token: u8,
    },
    Reap {
        live: Option<u8>,
    },
    Fail {
        attempt_delta: i8,
    },
    Expire {
        at: u64,
    },
    Delete,
    Deleted {
        node: u8,
        token: u8,
    },
    Force,
    Reconfirm {
        node: u8,
        token: u8,
        epoch: u8,
    },
    Spill {
        attempt_delta: i8,
    },
    Lost {
        node: u8,
        token: u8,
    },
    FailRetryable,
    Retry,
}

fn action() -> impl Strategy<Value = Action> {
    let n = 0u8..3;
    let e = 0u8..3;
    let t = 0u8..3;
    prop_oneof![
        4 => (-1i8..=1, n.clone(), e.clone(), t.clone()).prop_map(|(a, n, e, t)| Action::Claim { attempt_delta: a, node: n, epoch: e, token: t }),
        3 => (n.clone(), e.clone(), t.clone()).prop_map(|(n, e, t)| Action::StartBuild { node: n, epoch: e, token: t }),
        3 => (n.clone(), e.clone(), t.clone()).prop_map(|(n, e, t)| Action::Activate { node: n, epoch: e, token: t }),
        2 => (n.clone(), e.clone(), t.clone()).prop_map(|(n, e, t)| Action::Release { node: n, epoch: e, token: t }),
        2 => prop::option::of(0u8..3).prop_map(|live| Action::Reap { live }),
        1 => (-1i8..=1).prop_map(|a| Action::Fail { attempt_delta: a }),
        1 => (0u64..200_000).prop_map(|at| Action::Expire { at }),
        1 => Just(Action::Delete),
        2 => (n.clone(), t.clone()).prop_map(|(n, t)| Action::Deleted { node: n, token: t }),
        1 => Just(Action::Force),
        1 => (n, t, e).prop_map(|(n, t, e)| Action::Reconfirm { node: n, token: t, epoch: e }),
        1 => (-1i8..=1).prop_map(|a| Action::Spill { attempt_delta: a }),
        1 => (0u8..3, 0u8..3).prop_map(|(n, t)| Action::Lost { node: n, token: t }),
        1 => Just(Action::FailRetryable),
        1 => Just(Action::Retry),
    ]
}

fn claim(node: u8, epoch: u8, token: u8) -> Claim {
    Claim {
        node: NodeId::new(format!("n{node}")).unwrap(),
        epoch: Epoch(u64::from(epoch)),
        token: ClaimToken(u64::from(token)),
        at: Timestamp(0),
        sig: None,
    }
}

fn legal(from: State, to: State, retryable: bool) -> bool {
    use State::*;
    from == to
        || (from == Failed && to == Queued && retryable)
        || matches!(
            (from, to),
            (Queued, Claimed | Failed | Deleted)
                | (Claimed, Building | Queued | Failed | Deleting)
                | (Building, Active | Queued | Failed | Deleting)
                | (Active, HostDown | Deleting | Failed)
                | (HostDown, Active | Deleting | Deleted | Failed)
                | (Deleting, Deleted)
                | (Failed, Deleted)
        )
}

fn start() -> RequestRecord {
    let zone = Zone::new("az1").unwrap();
    let map: ShardMap = default_shard_map(zone.clone());
    let spec = RequestSpec::plain(
        RequestId::new("r").unwrap(),
        Resources::new(1, 1024, 0),
        zone.clone(),
        100,
    );
    let shard = map.route(&spec.routable()).unwrap();
    RequestRecord::new_queued(spec, shard, Timestamp(0))
}

fn delta(a: u32, d: i8) -> u32 {
    a.saturating_add_signed(i32::from(d))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn state_machine_only_makes_legal_moves(actions in prop::collection::vec(action(), 1..60)) {
        let mut r = start();
        let mut seen_claims: BTreeSet<(u8, u8)> = BTreeSet::new();
        for (step, a) in actions.into_iter().enumerate() {
            let now = Timestamp(1000 + step as u64);
            let before = r.clone();
            let out = match &a {
                Action::Claim { attempt_delta, node, epoch, token } => r.claim(delta(r.attempt, *attempt_delta), claim(*node, *epoch, *token), now),
                Action::StartBuild { node, epoch, token } => r.start_build(&claim(*node, *epoch, *token), now),
                Action::Activate { node, epoch, token } => r.activate(&claim(*node, *epoch, *token), now),
                Action::Release { node, epoch, token } => r.release(&claim(*node, *epoch, *token), "x", 4, now),
                Action::Reap { live } => r.reap(live.map(|e| Epoch(u64::from(e))), 4, now),
                Action::Fail { attempt_delta } => r.fail(delta(r.attempt, *attempt_delta), "x", now),
                Action::Expire { at } => r.expire("x", Timestamp(*at)),
                Action::Delete => Ok(r.request_delete(now).0),
                Action::Deleted { node, token } => r.deleted(&claim(*node, 0, *token), now),
                Action::Force => r.force_delete(now),
                Action::Reconfirm { node, token, epoch } => r.reconfirm(&claim(*node, 0, *token), Epoch(u64::from(*epoch)), now),
                Action::Spill { attempt_delta } => r.mark_spilled(delta(r.attempt, *attempt_delta), now),
                Action::Lost { node, token } => r.lost(&claim(*node, 0, *token), "gone", now),
                Action::FailRetryable => r.fail_retryable(r.attempt, "full", now),
                Action::Retry => r.retry(now),
            };
            let Ok(next) = out else { continue };
            prop_assert!(legal(before.state, next.state, before.retryable), "{:?} -> {:?} via {:?}", before.state, next.state, a);
            prop_assert!(next.attempt >= before.attempt, "attempt went backwards");
            prop_assert!(next.attempt <= before.attempt + 1, "attempts grow one at a time");
            prop_assert_eq!(next.state.has_claim(), next.claim.is_some(), "claim presence in {:?}", next.state);
            if next.state == State::Active { prop_assert!(next.active_at.is_some()); }
            prop_assert!(before.excluded.iter().all(|n| next.excluded.contains(n)), "exclusions are never lifted");
            if before.state == State::Deleted { prop_assert_eq!(&next, &before); }
            // a claim is never handed from one node to another without going through queued
            if let (Some(b), Some(n)) = (&before.claim, &next.claim) {
                prop_assert!(b.same_owner(n), "claim changed owner without a re-queue");
            }
            if let Some(c) = &next.claim {
                seen_claims.insert((c.node.as_str().as_bytes()[1], u8::try_from(c.token.0).unwrap()));
                prop_assert!(!next.excluded.contains(&c.node) || before.claim.as_ref().is_some_and(|b| b.same_owner(c)));
            }
            r = next;
        }
    }
}
