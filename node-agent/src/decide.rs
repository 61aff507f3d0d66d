//! What to do with a delivered hint, given the record it points at: a pure decision, so the
//! claim path's rules are tested without NATS.

use placement::checks::{Rejection, admit};
use placement::lifecycle::{RequestRecord, State};
use placement::pull::NodeProfile;
use placement::wire::Hint;

/// The decision before the ledger is consulted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Go on: reserve and claim.
    Proceed,
    /// The hint is stale (the record moved on): remove it for good.
    Stale,
    /// Another node may take it: hand it back.
    HandBack(Rejection),
}

/// Judges a hint against the record and this node.
pub fn judge(hint: &Hint, record: &RequestRecord, node: &NodeProfile, takes_work: bool) -> Verdict {
    if record.state != State::Queued || record.attempt != hint.attempt || record.spec.id != hint.id
    {
        return Verdict::Stale;
    }
    if !takes_work {
        return Verdict::HandBack(Rejection::NotTakingWork);
    }
    match admit(node, &record.spec, &record.excluded) {
        Ok(()) => Verdict::Proceed,
        Err(r) => Verdict::HandBack(r),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use placement::request::RequestSpec;
    use placement::shard::default_shard_map;
    use placement::wire::WIRE_VERSION;
    use placement::{Lane, NodeId, RequestId, Resources, Timestamp, TraitName, Zone};

    fn rec() -> RequestRecord {
        let map = default_shard_map(Zone::new("az1").unwrap());
        let spec = RequestSpec {
            id: RequestId::new("r").unwrap(),
            resources: Resources::new(1, 1024, 0),
            flavor: None,
            zone: Zone::new("az1").unwrap(),
            required_traits: vec![TraitName::new("ssd").unwrap()],
            forbidden_traits: vec![],
            group: None,
            image: None,
            metadata: Default::default(),
            deadline_s: 60,
        };
        let shard = map.route(&spec.routable()).unwrap();
        RequestRecord::new_queued(spec, shard, Timestamp(0))
    }

    fn hint(attempt: u32) -> Hint {
        Hint {
            v: WIRE_VERSION,
            id: RequestId::new("r").unwrap(),
            attempt,
            lane: Lane::Fit,
            published_at: Timestamp(0),
            record: None,
        }
    }

    fn node(traits: &[&str]) -> NodeProfile {
        NodeProfile {
            id: NodeId::new("n1").unwrap(),
            zone: Zone::new("az1").unwrap(),
            traits: traits.iter().map(|t| TraitName::new(*t).unwrap()).collect(),
        }
    }

    #[test]
    fn verdicts() {
        let r = rec();
        assert_eq!(judge(&hint(1), &r, &node(&["ssd"]), true), Verdict::Proceed);
        assert_eq!(judge(&hint(2), &r, &node(&["ssd"]), true), Verdict::Stale);
        assert_eq!(
            judge(&hint(1), &r, &node(&["ssd"]), false),
            Verdict::HandBack(Rejection::NotTakingWork)
        );
        assert_eq!(
            judge(&hint(1), &r, &node(&[]), true),
            Verdict::HandBack(Rejection::MissingTrait)
        );
        let (deleted, _) = r.request_delete(Timestamp(1));
        assert_eq!(
            judge(&hint(1), &deleted, &node(&["ssd"]), true),
            Verdict::Stale
        );
    }
}
