#![allow(clippy::unwrap_used, missing_docs)] // bench code: a panic is the failure report

//! Per-operation cost of the hot pure paths: validate + route a create request, and a ledger
//! reserve/release pair. Target: each under 1 µs (BENCHMARKS.md).

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use placement::flavor::FlavorCatalog;
use placement::ids::{RequestId, Zone};
use placement::ledger::{NodeLedger, PullId};
use placement::request::{
    CreateServer, DEFAULT_DEADLINE_S, ValidationContext, parse_json, route_or_explain,
};
use placement::resources::{AllocationRatios, Resources};
use placement::shard::default_shard_map;
use rand::SeedableRng;

fn validate_route(c: &mut Criterion) {
    let flavors = FlavorCatalog::default();
    let shards = default_shard_map(Zone::new("az1").expect("zone"));
    let ctx = ValidationContext {
        flavors: &flavors,
        shards: &shards,
        default_deadline_s: DEFAULT_DEADLINE_S,
    };
    let req: CreateServer = parse_json(
        br#"{"id":"web-000123","resources":{"vcpus":2,"memory_mib":4096,"disk_gib":40},"required_traits":["ssd"]}"#,
    )
    .expect("valid body");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    c.bench_function("validate+route (parsed request)", |b| {
        b.iter(|| {
            let spec = black_box(&req).validate(&ctx, &mut rng).expect("valid");
            black_box(route_or_explain(&shards, &spec).expect("routes"))
        })
    });
    let body = br#"{"id":"web-000123","resources":{"vcpus":2,"memory_mib":4096,"disk_gib":40},"required_traits":["ssd"]}"#;
    c.bench_function("parse+validate+route (JSON body)", |b| {
        b.iter(|| {
            let req: CreateServer = parse_json(black_box(body)).expect("valid body");
            let spec = req.validate(&ctx, &mut rng).expect("valid");
            black_box(route_or_explain(&shards, &spec).expect("routes"))
        })
    });
}

fn ledger(c: &mut Criterion) {
    let mut l = NodeLedger::new(
        Resources::new(64, 512 * 1024, 4000),
        Resources::new(2, 8192, 50),
        AllocationRatios::default(),
    )
    .expect("capacity");
    // a realistic node: 60 VMs already placed
    for i in 0..60 {
        let id = RequestId::new(format!("existing-{i:04}")).expect("id");
        l.reserve(&id, &Resources::new(2, 4096, 20), None)
            .expect("fits");
    }
    let id = RequestId::new("0b6f3c2e-9a41-4d7e-8d0b-2f6b1f1a9c77").expect("id");
    let r = Resources::new(2, 4096, 40);
    c.bench_function("ledger reserve+release", |b| {
        b.iter(|| {
            l.reserve(black_box(&id), black_box(&r), None)
                .expect("fits");
            black_box(l.release(&id));
        })
    });
    c.bench_function("ledger credit take+reserve_from_pull+release", |b| {
        b.iter(|| {
            l.take_credit(PullId(1), black_box(&r), 1).expect("fits");
            l.reserve_from_pull(PullId(1), black_box(&id), &r, None)
                .expect("fits");
            black_box(l.release(&id));
        })
    });
}

criterion_group!(benches, validate_route, ledger);
criterion_main!(benches);
