//! Claim signatures. Subject permissions cannot say who may write a request record (any
//! claimer must), so each claim carries the claiming node's signature, made with the key the
//! node advertises in its own advert (which only that node may write). Dispatchers verify the
//! claim of every record they see once per (request, token); a forged or unsigned claim is
//! counted and undone (the request queued again for its next attempt).

use std::collections::HashSet;

use base64::Engine;
use placement::lifecycle::{RequestRecord, claim_payload};
use placement::wire::NodeAdvert;
use placement::{ClaimToken, RequestId};

/// What a record's claim turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimCheck {
    /// No claim, or one already verified.
    Nothing,
    /// Signed by the key the node advertises.
    Valid,
    /// The named node advertises no key (claims of such nodes cannot be checked).
    Unverifiable,
    /// The node is not advertised (yet): the sweep's reaper decides once its lease is missing.
    UnknownNode,
    /// Missing or bad signature: forged.
    Forged(String),
}

/// Verifies `record`'s claim against `advert` (the named node's advert, when known).
pub fn check(record: &RequestRecord, advert: Option<&NodeAdvert>) -> ClaimCheck {
    let Some(claim) = &record.claim else {
        return ClaimCheck::Nothing;
    };
    let Some(advert) = advert else {
        return ClaimCheck::UnknownNode;
    };
    let Some(key) = advert.public_key.as_deref() else {
        return ClaimCheck::Unverifiable;
    };
    let Some(sig) = claim.sig.as_deref() else {
        return ClaimCheck::Forged(format!("unsigned claim naming node {}", claim.node));
    };
    let Ok(sig) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(sig) else {
        return ClaimCheck::Forged(format!(
            "malformed claim signature naming node {}",
            claim.node
        ));
    };
    let Ok(kp) = nkeys::KeyPair::from_public_key(key) else {
        return ClaimCheck::Unverifiable;
    };
    let payload = claim_payload(&record.spec.id, record.attempt, &claim.node, claim.token);
    match kp.verify(&payload, &sig) {
        Ok(()) => ClaimCheck::Valid,
        Err(_) => ClaimCheck::Forged(format!(
            "claim signature does not verify with node {}'s key",
            claim.node
        )),
    }
}

/// Claims already verified, so a claim costs one verification, not one per state change.
#[derive(Debug, Default)]
pub struct Verified {
    seen: HashSet<(RequestId, ClaimToken)>,
}

/// Entries kept before the set starts over (a re-verification is only a little work).
const MAX_VERIFIED: usize = 200_000;

impl Verified {
    /// True when this claim was verified before.
    pub fn contains(&self, id: &RequestId, token: ClaimToken) -> bool {
        self.seen.contains(&(id.clone(), token))
    }

    /// Remembers a verified claim.
    pub fn insert(&mut self, id: RequestId, token: ClaimToken) {
        if self.seen.len() >= MAX_VERIFIED {
            self.seen.clear();
        }
        self.seen.insert((id, token));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use placement::lifecycle::Claim;
    use placement::{Epoch, NodeId, Timestamp};

    fn signed(record: &RequestRecord, kp: &nkeys::KeyPair, node: &NodeId) -> RequestRecord {
        let token = ClaimToken(9);
        let payload = claim_payload(&record.spec.id, record.attempt, node, token);
        let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(kp.sign(&payload).unwrap_or_default());
        record
            .claim(
                record.attempt,
                Claim {
                    node: node.clone(),
                    epoch: Epoch(1),
                    token,
                    at: Timestamp(1),
                    sig: Some(sig),
                },
                Timestamp(1),
            )
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn good_forged_unsigned_and_replayed_claims() {
        let kp = nkeys::KeyPair::new_user();
        let node = NodeId::new("n1").unwrap_or_else(|e| panic!("{e}"));
        let advert = crate::view::tests_support::advert(&node, Some(kp.public_key()));
        let r = crate::view::tests_support::record("req-a");
        let good = signed(&r, &kp, &node);
        assert_eq!(check(&good, Some(&advert)), ClaimCheck::Valid);
        // signed with another key
        let other = nkeys::KeyPair::new_user();
        let forged = signed(&r, &other, &node);
        assert!(matches!(
            check(&forged, Some(&advert)),
            ClaimCheck::Forged(_)
        ));
        // no signature
        let mut unsigned = good.clone();
        if let Some(c) = unsigned.claim.as_mut() {
            c.sig = None;
        }
        assert!(matches!(
            check(&unsigned, Some(&advert)),
            ClaimCheck::Forged(_)
        ));
        // a valid signature replayed onto another request
        let mut replayed = crate::view::tests_support::record("req-b");
        replayed.state = good.state;
        replayed.claim = good.claim.clone();
        assert!(matches!(
            check(&replayed, Some(&advert)),
            ClaimCheck::Forged(_)
        ));
        // unknown node, keyless node, no claim
        assert_eq!(check(&good, None), ClaimCheck::UnknownNode);
        let keyless = crate::view::tests_support::advert(&node, None);
        assert_eq!(check(&good, Some(&keyless)), ClaimCheck::Unverifiable);
        assert_eq!(check(&r, Some(&advert)), ClaimCheck::Nothing);
    }
}
