//! A node's persistent identity: its id, its signing key (nkeys) and its boot epoch, kept in
//! the state directory. The id survives restarts; the epoch grows with every start and every
//! fence; the key lets the cluster tell a restarted node from a cloned host that copied the id.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use placement::{Epoch, NodeId};
use rand::Rng;

const NODE_ID_FILE: &str = "node-id";
const EPOCH_FILE: &str = "epoch";
const SEED_FILE: &str = "node.nk";

/// Identity could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// File system trouble.
    #[error("state dir {path}: {source}")]
    Io {
        /// Path involved.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A stored value is corrupt.
    #[error("state dir file {path} is corrupt: {message}")]
    Corrupt {
        /// Path.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The configured id differs from the one this state dir belongs to.
    #[error(
        "state dir belongs to node `{stored}` but node_id is configured as `{configured}`; use another state_dir or remove {path}"
    )]
    Mismatch {
        /// Stored id.
        stored: String,
        /// Configured id.
        configured: String,
        /// File.
        path: PathBuf,
    },
}

/// The node's identity.
pub struct Identity {
    /// Node id.
    pub node: NodeId,
    key: nkeys::KeyPair,
    dir: PathBuf,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("node", &self.node)
            .field("public_key", &self.key.public_key())
            .finish()
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `data` to `path` atomically (temp file, fsync, rename).
fn write_atomic(path: &Path, data: &[u8]) -> Result<(), IdentityError> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(data).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))?;
    Ok(())
}

/// A node id from the host name, lowercased and cleaned, with a random suffix so cloned hosts
/// with the same name still differ.
pub fn derive_node_id(hostname: &str, rng: &mut impl Rng) -> NodeId {
    let mut base: String = hostname
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    base = base.trim_matches('-').chars().take(48).collect();
    if base.is_empty() {
        base = "node".into();
    }
    let suffix: u32 = rng.next_u32();
    NodeId::new(format!("{base}-{suffix:08x}")).expect("sanitized name is a valid id")
}

impl Identity {
    /// Loads the identity from `dir`, creating what is missing.
    pub fn load_or_create(dir: &Path, configured: Option<&str>) -> Result<Identity, IdentityError> {
        fs::create_dir_all(dir).map_err(io(dir))?;
        let id_path = dir.join(NODE_ID_FILE);
        let stored = match fs::read_to_string(&id_path) {
            Ok(s) => Some(s.trim().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io(&id_path)(e)),
        };
        let node = match (stored, configured) {
            (Some(s), Some(c)) if s != c => {
                return Err(IdentityError::Mismatch {
                    stored: s,
                    configured: c.to_string(),
                    path: id_path,
                });
            }
            (Some(s), _) => NodeId::new(s.as_str()).map_err(|e| IdentityError::Corrupt {
                path: id_path.clone(),
                message: e.to_string(),
            })?,
            (None, Some(c)) => {
                let n = NodeId::new(c).map_err(|e| IdentityError::Corrupt {
                    path: id_path.clone(),
                    message: e.to_string(),
                })?;
                write_atomic(&id_path, n.as_str().as_bytes())?;
                n
            }
            (None, None) => {
                let host = sysinfo::System::host_name().unwrap_or_else(|| "node".into());
                let n = derive_node_id(&host, &mut rand::rng());
                write_atomic(&id_path, n.as_str().as_bytes())?;
                n
            }
        };
        let seed_path = dir.join(SEED_FILE);
        let key = match fs::read_to_string(&seed_path) {
            Ok(seed) => {
                nkeys::KeyPair::from_seed(seed.trim()).map_err(|e| IdentityError::Corrupt {
                    path: seed_path.clone(),
                    message: e.to_string(),
                })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let kp = nkeys::KeyPair::new_user();
                let seed = kp.seed().map_err(|e| IdentityError::Corrupt {
                    path: seed_path.clone(),
                    message: e.to_string(),
                })?;
                write_atomic(&seed_path, seed.as_bytes())?;
                restrict(&seed_path)?;
                kp
            }
            Err(e) => return Err(io(&seed_path)(e)),
        };
        Ok(Identity {
            node,
            key,
            dir: dir.to_path_buf(),
        })
    }

    /// The node's public signing key (advertised; proves "same host" on restart).
    pub fn public_key(&self) -> String {
        self.key.public_key()
    }

    /// Signs `data` with the node's key.
    pub fn sign(&self, data: &[u8]) -> Option<Vec<u8>> {
        self.key.sign(data).ok()
    }

    /// The signature of this node's claim of `id` at `attempt` with `token`
    /// ([`placement::lifecycle::claim_payload`]), base64url.
    pub fn sign_claim(
        &self,
        id: &placement::RequestId,
        attempt: u32,
        token: placement::ClaimToken,
    ) -> Option<String> {
        use base64::Engine;
        let payload = placement::lifecycle::claim_payload(id, attempt, &self.node, token);
        self.sign(&payload)
            .map(|s| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s))
    }

    /// Takes the next boot epoch (persisted before it is used, so no epoch is ever reused).
    pub fn next_epoch(&self) -> Result<Epoch, IdentityError> {
        let path = self.dir.join(EPOCH_FILE);
        let current = match fs::read_to_string(&path) {
            Ok(s) => s
                .trim()
                .parse::<u64>()
                .map_err(|e| IdentityError::Corrupt {
                    path: path.clone(),
                    message: e.to_string(),
                })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io(&path)(e)),
        };
        let next = current.checked_add(1).ok_or(IdentityError::Corrupt {
            path: path.clone(),
            message: "epoch overflow".into(),
        })?;
        write_atomic(&path, next.to_string().as_bytes())?;
        Ok(Epoch(next))
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

fn restrict(path: &Path) -> Result<(), IdentityError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(io(path))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn identity_persists_and_epochs_grow() {
        let dir = tempfile::tempdir().unwrap();
        let a = Identity::load_or_create(dir.path(), None).unwrap();
        let b = Identity::load_or_create(dir.path(), None).unwrap();
        assert_eq!(a.node, b.node);
        assert_eq!(a.public_key(), b.public_key());
        assert_eq!(a.next_epoch().unwrap(), Epoch(1));
        assert_eq!(b.next_epoch().unwrap(), Epoch(2));
        let e = Identity::load_or_create(dir.path(), Some("other")).unwrap_err();
        assert!(matches!(e, IdentityError::Mismatch { .. }), "{e}");
    }

    #[test]
    fn configured_id_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let a = Identity::load_or_create(dir.path(), Some("n-7")).unwrap();
        assert_eq!(a.node.as_str(), "n-7");
        assert_eq!(
            Identity::load_or_create(dir.path(), None)
                .unwrap()
                .node
                .as_str(),
            "n-7"
        );
    }

    #[test]
    fn derived_ids_are_valid_and_distinct() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let a = derive_node_id("Compute_01.Example.COM", &mut rng);
        let b = derive_node_id("Compute_01.Example.COM", &mut rng);
        assert!(a.as_str().starts_with("compute-01-example-com-"));
        assert_ne!(a, b);
        assert!(
            derive_node_id("---", &mut rng)
                .as_str()
                .starts_with("node-")
        );
    }

    #[test]
    fn corrupt_files_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(EPOCH_FILE), "x").unwrap();
        let a = Identity::load_or_create(dir.path(), Some("n1")).unwrap();
        assert!(matches!(a.next_epoch(), Err(IdentityError::Corrupt { .. })));
    }
}
