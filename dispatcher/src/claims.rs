//! Claim signatures. Subject permissions cannot say who may write a request record (any
//! claimer must), so each claim carries the claiming node's signature, made with the key the
//! node advertises in its own advert (which only that node may write). Dispatchers verify the
//! claim of every record they see once per (request, token); a forged or unsigned claim is
//! counted and undone (the request queued again for its next attempt).
//!
//! Checking is split in two: [`prepare`] decides everything but the signature itself (cheap,
//! on the record watch), and [`verify`] checks the signatures of a batch of [`Pending`]
//! claims at once (ed25519 batch verification, about half the cost of one by one), off the
//! watch. Advertised keys are parsed once per node and key ([`Verified`]).

use std::collections::{HashMap, HashSet};

use base64::Engine;
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use placement::lifecycle::{RequestRecord, claim_payload};
use placement::wire::NodeAdvert;
use placement::{ClaimToken, NodeId, RequestId};

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

/// A well-formed signed claim whose signature is still to be checked.
#[derive(Debug, Clone)]
pub struct Pending {
    /// The request.
    pub id: RequestId,
    /// The node the claim names.
    pub node: NodeId,
    /// The claim's token.
    pub token: ClaimToken,
    payload: Vec<u8>,
    sig: Signature,
    key: VerifyingKey,
}

impl Pending {
    /// Why a claim whose signature failed is forged.
    pub fn forged_reason(&self) -> String {
        format!(
            "claim signature does not verify with node {}'s key",
            self.node
        )
    }
}

/// What [`prepare`] found.
#[derive(Debug, Clone)]
pub enum Prepared {
    /// Decided without a signature check.
    Done(ClaimCheck),
    /// A signature to check with [`verify`].
    Signed(Box<Pending>),
}

/// Decides `record`'s claim against `advert` (the named node's advert, when known) as far as
/// it can without checking the signature.
pub fn prepare(
    record: &RequestRecord,
    advert: Option<&NodeAdvert>,
    keys: &mut Verified,
) -> Prepared {
    let Some(claim) = &record.claim else {
        return Prepared::Done(ClaimCheck::Nothing);
    };
    let Some(advert) = advert else {
        return Prepared::Done(ClaimCheck::UnknownNode);
    };
    let Some(key) = advert.public_key.as_deref() else {
        return Prepared::Done(ClaimCheck::Unverifiable);
    };
    let Some(sig) = claim.sig.as_deref() else {
        return Prepared::Done(ClaimCheck::Forged(format!(
            "unsigned claim naming node {}",
            claim.node
        )));
    };
    let Some(sig) = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(sig)
        .ok()
        .and_then(|b| Signature::from_slice(&b).ok())
    else {
        return Prepared::Done(ClaimCheck::Forged(format!(
            "malformed claim signature naming node {}",
            claim.node
        )));
    };
    let Some(key) = keys.key(&claim.node, key) else {
        return Prepared::Done(ClaimCheck::Unverifiable);
    };
    Prepared::Signed(Box::new(Pending {
        id: record.spec.id.clone(),
        node: claim.node.clone(),
        token: claim.token,
        payload: claim_payload(&record.spec.id, record.attempt, &claim.node, claim.token),
        sig,
        key,
    }))
}

/// Checks the signatures of `batch`: true for each that verifies with its node's key. One
/// batch verification when all are good; one by one, to find the bad ones, when not.
pub fn verify(batch: &[Pending]) -> Vec<bool> {
    if batch.len() > 1 {
        let payloads: Vec<&[u8]> = batch.iter().map(|p| p.payload.as_slice()).collect();
        let sigs: Vec<Signature> = batch.iter().map(|p| p.sig).collect();
        let keys: Vec<VerifyingKey> = batch.iter().map(|p| p.key).collect();
        if ed25519_dalek::verify_batch(&payloads, &sigs, &keys).is_ok() {
            return vec![true; batch.len()];
        }
    }
    batch
        .iter()
        .map(|p| p.key.verify(&p.payload, &p.sig).is_ok())
        .collect()
}

/// Verifies `record`'s claim against `advert` at once ([`prepare`] then [`verify`]).
pub fn check(record: &RequestRecord, advert: Option<&NodeAdvert>) -> ClaimCheck {
    match prepare(record, advert, &mut Verified::default()) {
        Prepared::Done(c) => c,
        Prepared::Signed(p) => {
            if verify(std::slice::from_ref(&p)) == [true] {
                ClaimCheck::Valid
            } else {
                ClaimCheck::Forged(p.forged_reason())
            }
        }
    }
}

/// Claims already verified (or being verified), so a claim costs one verification, not one
/// per state change; and the nodes' parsed keys.
#[derive(Debug, Default)]
pub struct Verified {
    seen: HashSet<(RequestId, ClaimToken)>,
    keys: HashMap<NodeId, (String, Option<VerifyingKey>)>,
}

/// Entries kept before a set starts over (a re-verification is only a little work).
const MAX_VERIFIED: usize = 200_000;

impl Verified {
    /// True when this claim was verified before.
    pub fn contains(&self, id: &RequestId, token: ClaimToken) -> bool {
        self.seen.contains(&(id.clone(), token))
    }

    /// Remembers a verified claim (or one handed to the verifier).
    pub fn insert(&mut self, id: RequestId, token: ClaimToken) {
        if self.seen.len() >= MAX_VERIFIED {
            self.seen.clear();
        }
        self.seen.insert((id, token));
    }

    /// Forgets a claim (its signature failed: a later sight checks it again).
    pub fn forget(&mut self, id: &RequestId, token: ClaimToken) {
        self.seen.remove(&(id.clone(), token));
    }

    /// The key `node` advertises as `encoded` (an nkeys public key), parsed once; None when
    /// it is no valid key.
    fn key(&mut self, node: &NodeId, encoded: &str) -> Option<VerifyingKey> {
        if let Some((e, k)) = self.keys.get(node)
            && e == encoded
        {
            return *k;
        }
        if self.keys.len() >= MAX_VERIFIED {
            self.keys.clear();
        }
        let key = nkeys::from_public_key(encoded)
            .ok()
            .and_then(|(_, raw)| VerifyingKey::from_bytes(&raw).ok());
        self.keys.insert(node.clone(), (encoded.to_string(), key));
        key
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

    fn pending(r: &RequestRecord, advert: &NodeAdvert, keys: &mut Verified) -> Pending {
        match prepare(r, Some(advert), keys) {
            Prepared::Signed(p) => *p,
            other => panic!("expected a signature to check, got {other:?}"),
        }
    }

    #[test]
    fn a_batch_singles_out_its_forged_claims() {
        let kp = nkeys::KeyPair::new_user();
        let node = NodeId::new("n1").unwrap_or_else(|e| panic!("{e}"));
        let advert = crate::view::tests_support::advert(&node, Some(kp.public_key()));
        let mut keys = Verified::default();
        let other = nkeys::KeyPair::new_user();
        let batch: Vec<Pending> = (0..20)
            .map(|i| {
                let r = crate::view::tests_support::record(&format!("req-{i}"));
                let signer = if i == 7 || i == 13 { &other } else { &kp };
                pending(&signed(&r, signer, &node), &advert, &mut keys)
            })
            .collect();
        let ok = verify(&batch);
        let bad: Vec<usize> = ok
            .iter()
            .enumerate()
            .filter(|(_, ok)| !**ok)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(bad, vec![7, 13]);
        // all good: one batch verification says so
        let good: Vec<Pending> = batch
            .into_iter()
            .enumerate()
            .filter(|(i, _)| *i != 7 && *i != 13)
            .map(|(_, p)| p)
            .collect();
        assert!(verify(&good).iter().all(|ok| *ok));
        assert!(verify(&[]).is_empty());
    }

    #[test]
    fn a_node_that_changes_its_key_is_checked_with_the_new_one() {
        let node = NodeId::new("n1").unwrap_or_else(|e| panic!("{e}"));
        let (old, new) = (nkeys::KeyPair::new_user(), nkeys::KeyPair::new_user());
        let mut keys = Verified::default();
        let r = crate::view::tests_support::record("req-a");
        let by_new = signed(&r, &new, &node);
        let old_advert = crate::view::tests_support::advert(&node, Some(old.public_key()));
        let p = pending(&by_new, &old_advert, &mut keys);
        assert_eq!(verify(&[p]), vec![false], "the cached old key refuses it");
        let new_advert = crate::view::tests_support::advert(&node, Some(new.public_key()));
        let p = pending(&by_new, &new_advert, &mut keys);
        assert_eq!(verify(&[p]), vec![true]);
        // a key that does not parse: the claim cannot be checked
        let junk = crate::view::tests_support::advert(&node, Some("UNOTAKEY".into()));
        assert!(matches!(
            prepare(&by_new, Some(&junk), &mut keys),
            Prepared::Done(ClaimCheck::Unverifiable)
        ));
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
