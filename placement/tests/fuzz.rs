#![allow(clippy::unwrap_used, clippy::tests_outside_test_module)] // test code: a panic is the failure report

//! Fuzzing of everything updraft parses from the outside: API create bodies (single and
//! batch), and every wire type components exchange (hints, adverts, records, flags, cluster
//! config, commands). Inputs are the committed corpus in `tests/corpus/`, mutated (bytes
//! flipped, inserted, deleted, truncated, spliced), plus arbitrary bytes and arbitrary JSON.
//! The properties: no panic, no hang (every case is bounded in size), and every refusal is an
//! error with a message that is not empty.

use std::collections::BTreeMap;
use std::path::Path;

use placement::flavor::FlavorCatalog;
use placement::lifecycle::RequestRecord;
use placement::request::{
    CreateBatch, CreateServer, DEFAULT_DEADLINE_S, ValidationContext, parse_json,
};
use placement::shard::default_shard_map;
use placement::wire::{
    AdminState, BacklogFlag, ClusterConfig, GroupPin, Hint, NodeAdvert, NodeCommand, decode,
};
use placement::{Zone, request::route_or_explain};
use proptest::prelude::*;
use rand::SeedableRng;

fn corpus() -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 10, "the corpus is in {}", dir.display());
    files.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

/// Feeds `bytes` to every parser; panics only if one panics or refuses without a message.
fn feed(bytes: &[u8]) {
    let flavors = FlavorCatalog::default();
    let shards = default_shard_map(Zone::new("az1").unwrap());
    let ctx = ValidationContext {
        flavors: &flavors,
        shards: &shards,
        default_deadline_s: DEFAULT_DEADLINE_S,
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    match parse_json::<CreateServer>(bytes) {
        Ok(req) => match req.validate(&ctx, &mut rng) {
            Ok(spec) => {
                let _ = route_or_explain(&shards, &spec);
            }
            Err(e) => assert!(!e.to_string().is_empty()),
        },
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    match parse_json::<CreateBatch>(bytes) {
        Ok(b) => {
            let _ = b.validate(&ctx, &mut rng);
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    macro_rules! wire {
        ($($t:ty),*) => {$(
            if let Err(e) = decode::<$t>(bytes) {
                assert!(!e.to_string().is_empty());
                assert!(!e.as_str().is_empty());
            }
        )*};
    }
    wire!(
        Hint,
        NodeAdvert,
        RequestRecord,
        BacklogFlag,
        ClusterConfig,
        NodeCommand,
        AdminState,
        GroupPin
    );
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Truncate(usize),
    Splice(usize, usize, usize),
}

fn apply(mut v: Vec<u8>, ms: &[Mutation], others: &[Vec<u8>]) -> Vec<u8> {
    for m in ms {
        let n = v.len().max(1);
        match *m {
            Mutation::Flip(i, b) if !v.is_empty() => v[i % n] ^= b,
            Mutation::Insert(i, b) => v.insert(i % (v.len() + 1), b),
            Mutation::Delete(i) if !v.is_empty() => {
                v.remove(i % n);
            }
            Mutation::Truncate(i) => v.truncate(i % (v.len() + 1)),
            Mutation::Splice(o, from, len) => {
                let src = &others[o % others.len()];
                if !src.is_empty() {
                    let a = from % src.len();
                    let b = (a + len).min(src.len());
                    let at = from % (v.len() + 1);
                    v.splice(at..at, src[a..b].iter().copied());
                }
            }
            _ => {}
        }
    }
    v
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Delete),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), any::<usize>(), 0usize..64)
            .prop_map(|(o, f, l)| Mutation::Splice(o, f, l)),
    ]
}

/// Arbitrary JSON values, nested a few levels.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        "[a-z0-9._ -]{0,12}".prop_map(serde_json::Value::from),
        "\\PC{0,8}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        let key = prop_oneof![
            Just("id".to_string()),
            Just("flavor".to_string()),
            Just("resources".to_string()),
            Just("vcpus".to_string()),
            Just("memory_mib".to_string()),
            Just("v".to_string()),
            Just("node".to_string()),
            Just("servers".to_string()),
            Just("metadata".to_string()),
            "[a-z_]{1,8}",
        ];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
            prop::collection::btree_map(key, inner, 0..6).prop_map(|m: BTreeMap<_, _>| {
                serde_json::Value::Object(m.into_iter().collect())
            }),
        ]
    })
}

#[test]
fn the_corpus_itself_parses_or_is_refused_with_a_message() {
    for c in corpus() {
        feed(&c);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn mutated_corpus_entries_never_panic(
        pick in any::<usize>(),
        ms in prop::collection::vec(mutation(), 1..12),
    ) {
        let c = corpus();
        let input = apply(c[pick % c.len()].clone(), &ms, &c);
        feed(&input);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        feed(&bytes);
    }

    #[test]
    fn arbitrary_json_never_panics(v in json_value()) {
        feed(&serde_json::to_vec(&v).unwrap());
    }
}

#[test]
fn an_oversized_body_is_refused_before_it_is_parsed() {
    let big = vec![b' '; placement::request::MAX_BODY_BYTES + 1];
    let e = parse_json::<CreateServer>(&big).unwrap_err();
    assert!(e.to_string().contains("bytes"), "{e}");
    let e = decode::<Hint>(&vec![b' '; 2 * 1024 * 1024]).unwrap_err();
    assert_eq!(e.as_str(), "too_large");
}
