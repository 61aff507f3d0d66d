//! Identifiers and names, each validated once at the edge so the rest of the code can trust them.
//!
//! Ids end up in NATS subjects, KV keys and stream names, so they share one small alphabet:
//! lowercase ASCII letters, digits and `-`, starting with a letter or digit. Trait and
//! resource names also allow `.` and `_` (`gpu.a100`), because they never become subject tokens.

use std::fmt;

use rand::Rng;
use serde::{Deserialize, Serialize};

/// Why a name or id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The string is empty.
    #[error("must not be empty")]
    Empty,
    /// The string is longer than the kind allows.
    #[error("must be at most {max} characters (got {len})")]
    TooLong {
        /// Longest allowed length.
        max: usize,
        /// Length that was given.
        len: usize,
    },
    /// A character outside the allowed alphabet.
    #[error("invalid character {ch:?} at position {pos}: allowed are {allowed}")]
    BadChar {
        /// The offending character.
        ch: char,
        /// Its position (in characters).
        pos: usize,
        /// Human description of the alphabet.
        allowed: &'static str,
    },
    /// The first character must be a letter or a digit.
    #[error("must start with a lowercase letter or a digit")]
    BadStart,
}

const ID_ALPHABET: &str = "lowercase letters, digits and '-'";
const NAME_ALPHABET: &str = "lowercase letters, digits, '-', '_' and '.'";

fn check(s: &str, max: usize, extra: &[char], allowed: &'static str) -> Result<(), NameError> {
    if s.is_empty() {
        return Err(NameError::Empty);
    }
    let len = s.chars().count();
    if len > max {
        return Err(NameError::TooLong { max, len });
    }
    for (pos, ch) in s.chars().enumerate() {
        let ok = ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '-' || extra.contains(&ch);
        if !ok {
            return Err(NameError::BadChar { ch, pos, allowed });
        }
    }
    let first = s.as_bytes()[0];
    if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
        return Err(NameError::BadStart);
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, max = $max:expr, extra = $extra:expr, allowed = $allowed:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Longest accepted length in characters.
            pub const MAX_LEN: usize = $max;

            /// Validates and wraps `s`.
            pub fn new(s: impl Into<String>) -> Result<Self, NameError> {
                let s = s.into();
                check(&s, $max, $extra, $allowed)?;
                Ok(Self(s))
            }

            /// The id as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

id_type!(
    /// A request id: client-supplied for idempotency, or a generated UUID. Also the VM's identity.
    RequestId, max = 64, extra = &[], allowed = ID_ALPHABET
);
id_type!(
    /// A compute node's stable id (persisted in its state directory).
    NodeId, max = 64, extra = &[], allowed = ID_ALPHABET
);
id_type!(
    /// An availability zone name. Appears in subjects and stream names, hence short.
    Zone, max = 16, extra = &[], allowed = ID_ALPHABET
);
id_type!(
    /// A trait a node has or a request requires or forbids (`ssd`, `gpu`, `cpu.avx512`).
    TraitName, max = 64, extra = &['.', '_'], allowed = NAME_ALPHABET
);
id_type!(
    /// An extended resource name (`gpu.a100`).
    ResourceName, max = 64, extra = &['.', '_'], allowed = NAME_ALPHABET
);
id_type!(
    /// A server group name (affinity and anti-affinity).
    GroupName, max = 64, extra = &['.', '_'], allowed = NAME_ALPHABET
);
id_type!(
    /// A flavor name (`m1.small`).
    FlavorName, max = 64, extra = &['.', '_'], allowed = NAME_ALPHABET
);
id_type!(
    /// A trait class name: appears in subjects and stream names, hence short.
    TraitClassName, max = 8, extra = &[], allowed = ID_ALPHABET
);

impl RequestId {
    /// A fresh random (v4) UUID id; randomness is an argument so callers can seed it.
    pub fn generate(rng: &mut impl Rng) -> Self {
        let mut bytes = [0u8; 16];
        rng.fill_bytes(&mut bytes);
        let id = uuid::Builder::from_random_bytes(bytes).into_uuid();
        Self(id.hyphenated().to_string())
    }
}

/// A node's boot epoch: bumped on every start and every self-fence, so a claim made before a
/// restart or a fence can be told apart from one made after.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Epoch(pub u64);

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A random token that makes one claim distinguishable from every other, even by the same node
/// in the same epoch (a node that lost track of a write can recognise its own claim).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ClaimToken(pub u64);

impl ClaimToken {
    /// Draws a token from `rng`.
    pub fn random(rng: &mut impl Rng) -> Self {
        Self(rng.next_u64())
    }
}

impl fmt::Display for ClaimToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A stable hash for routing and elections: XXH3 (64 bits, seed 0) over the parts, each
/// followed by a separator byte. Rust's default hasher is seeded per process, which would make
/// partitions differ between a dispatcher and a node; XXH3 is specified, so every build and
/// platform agrees. Its bits are all well mixed: partitions, opening tiers and election draws
/// take different residues of hashes of the same node id, which must not depend on each other
/// (the FNV-1a used before kept the low bits of its input, so a node's partition and its tier
/// agreed in their lowest bit).
pub fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut h = StableHasher::default();
    for part in parts {
        h.bytes(part);
        h.end_part();
    }
    h.finish()
}

/// Bytes a [`StableHasher`] holds before it hashes as a stream (ids and class names fit).
const INLINE: usize = 128;

/// [`stable_hash`] fed piece by piece: a part may be written in several pieces (or through
/// `fmt::Write`) without building it first. Short inputs (every id and class key) are kept
/// and hashed in one call at the end, with no streaming state to set up (the hash runs on
/// every re-plan of every node); longer ones go through XXH3's streaming state, which gives
/// the same hash.
#[derive(Clone)]
pub struct StableHasher {
    inline: [u8; INLINE],
    len: usize,
    stream: Option<Box<xxhash_rust::xxh3::Xxh3>>,
}

impl fmt::Debug for StableHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("StableHasher").field(&self.finish()).finish()
    }
}

impl Default for StableHasher {
    fn default() -> Self {
        StableHasher {
            inline: [0; INLINE],
            len: 0,
            stream: None,
        }
    }
}

/// Ends a part, so ("ab", "c") and ("a", "bc") differ.
const PART_END: u8 = 0xff;

impl StableHasher {
    /// Feeds bytes of the current part.
    pub fn bytes(&mut self, bytes: &[u8]) {
        if let Some(s) = &mut self.stream {
            s.update(bytes);
            return;
        }
        match self.inline.get_mut(self.len..self.len + bytes.len()) {
            Some(dst) => {
                dst.copy_from_slice(bytes);
                self.len += bytes.len();
            }
            None => {
                let mut s = Box::new(xxhash_rust::xxh3::Xxh3::new());
                s.update(&self.inline[..self.len]);
                s.update(bytes);
                self.stream = Some(s);
            }
        }
    }

    /// Ends the current part.
    pub fn end_part(&mut self) {
        self.bytes(&[PART_END]);
    }

    /// The hash.
    pub fn finish(&self) -> u64 {
        match &self.stream {
            Some(s) => s.digest(),
            None => xxhash_rust::xxh3::xxh3_64(&self.inline[..self.len]),
        }
    }
}

impl fmt::Write for StableHasher {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.bytes(s.as_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn ids_accept_the_alphabet() {
        assert!(RequestId::new("web-01").is_ok());
        assert!(RequestId::new("0abc").is_ok());
        assert!(TraitName::new("gpu.a100").is_ok());
        assert!(TraitName::new("cpu_avx512").is_ok());
    }

    #[test]
    fn ids_refuse_bad_input_with_reasons() {
        assert_eq!(RequestId::new(""), Err(NameError::Empty));
        assert_eq!(RequestId::new("-x"), Err(NameError::BadStart));
        assert!(matches!(
            RequestId::new("Web"),
            Err(NameError::BadChar {
                ch: 'W',
                pos: 0,
                ..
            })
        ));
        assert!(matches!(
            RequestId::new("a.b"),
            Err(NameError::BadChar { ch: '.', .. })
        ));
        assert!(matches!(
            RequestId::new("a b"),
            Err(NameError::BadChar { ch: ' ', .. })
        ));
        assert_eq!(
            Zone::new("a".repeat(17)),
            Err(NameError::TooLong { max: 16, len: 17 })
        );
        assert!(matches!(
            RequestId::new("é"),
            Err(NameError::BadChar { .. })
        ));
    }

    #[test]
    fn deserialize_validates() {
        let ok: Result<RequestId, _> = serde_json::from_str("\"abc\"");
        assert!(ok.is_ok());
        let bad: Result<RequestId, _> = serde_json::from_str("\"A B\"");
        let err = bad.expect_err("uppercase must be refused").to_string();
        assert!(err.contains("invalid character"), "{err}");
    }

    #[test]
    fn generated_ids_are_valid_and_seeded() {
        let mut a = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut b = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let x = RequestId::generate(&mut a);
        assert_eq!(x, RequestId::generate(&mut b));
        assert_eq!(x.as_str().len(), 36);
        assert!(RequestId::new(x.as_str()).is_ok());
    }

    #[test]
    fn stable_hash_is_stable_and_separates_parts() {
        assert_eq!(stable_hash(&[b"abc"]), stable_hash(&[b"abc"]));
        assert_ne!(stable_hash(&[b"ab", b"c"]), stable_hash(&[b"a", b"bc"]));
        // pinned: XXH3-64 (seed 0) of "node-1" and the separator, as any XXH3 implementation
        // computes it; a change here would re-partition every running cluster
        assert_eq!(stable_hash(&[b"node-1"]), 16_206_767_058_909_742_176);
    }

    /// Past the inline buffer the hasher streams; the hash is the same either way.
    #[test]
    fn long_inputs_hash_as_their_bytes() {
        let long = vec![b'x'; 300];
        let mut whole = long.clone();
        whole.push(0xff);
        assert_eq!(
            stable_hash(&[&long]),
            xxhash_rust::xxh3::xxh3_64(&whole),
            "one long part"
        );
        let mut pieces = StableHasher::default();
        for chunk in long.chunks(7) {
            pieces.bytes(chunk);
        }
        pieces.end_part();
        assert_eq!(pieces.finish(), stable_hash(&[&long]), "fed in pieces");
    }

    /// A node's partition (its id and a size) and its opening tier ("open-tier" and its id) are
    /// residues of different hashes of the same id: they must be independent, or the nodes of
    /// one tier all fall in the same partitions. FNV-1a kept the lowest bit of its input, so
    /// with two partitions and four tiers every tier-0 node was in partition 1.
    #[test]
    fn residues_of_hashes_of_one_id_are_independent() {
        let mut cells = [[0u32; 2]; 4];
        for i in 0..4000 {
            let id = format!("n{i:06}");
            let tier = stable_hash(&[b"open-tier", id.as_bytes()]) % 4;
            let part = stable_hash(&[id.as_bytes(), &[14]]) % 2;
            cells[tier as usize][part as usize] += 1;
        }
        for (tier, row) in cells.iter().enumerate() {
            for (part, n) in row.iter().enumerate() {
                assert!(
                    (400..=600).contains(n),
                    "tier {tier}, partition {part}: {n} of 4000"
                );
            }
        }
    }
}
