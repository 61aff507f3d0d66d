//! Durable commands to one node (deletes) and its operator-set admin state, as keys in the
//! commands bucket under the node's id. A node that is down finds them when it returns.

use futures::StreamExt;
use futures::stream::BoxStream;
use placement::subjects::{admin_key, command_key, node_commands_filter};
use placement::wire::{AdminState, NodeCommand, decode, encode};
use placement::{NodeId, RequestId};

use crate::BusError;
use crate::kv::Kv;

/// Access to the commands bucket.
#[derive(Debug, Clone)]
pub struct CommandStore {
    kv: Kv,
}

/// What a node's command watcher sees.
#[derive(Debug, Clone, PartialEq)]
pub enum CommandEvent {
    /// A command to act on.
    Command(NodeCommand),
    /// The admin state changed.
    Admin(AdminState),
    /// The admin state was cleared (uncordoned).
    AdminCleared,
    /// Something under the node's prefix that does not decode; never acted on.
    Undecodable {
        /// Key.
        key: String,
        /// Why.
        error: String,
    },
}

impl CommandStore {
    pub(crate) fn new(kv: Kv) -> Self {
        CommandStore { kv }
    }

    /// Stores a command for `node` (idempotent: the key is per request).
    pub async fn send(&self, node: &NodeId, cmd: &NodeCommand) -> Result<(), BusError> {
        self.kv
            .put(&command_key(node, &cmd.request), encode(cmd).into())
            .await
            .map(|_| ())
    }

    /// Removes a command the node has carried out.
    pub async fn done(&self, node: &NodeId, request: &RequestId) -> Result<(), BusError> {
        self.kv.delete(&command_key(node, request), None).await
    }

    /// True when a command for `request` is pending on `node`.
    pub async fn pending(&self, node: &NodeId, request: &RequestId) -> Result<bool, BusError> {
        Ok(self.kv.get(&command_key(node, request)).await?.is_some())
    }

    /// Sets a node's admin state.
    pub async fn set_admin(&self, node: &NodeId, state: &AdminState) -> Result<(), BusError> {
        self.kv
            .put(&admin_key(node), encode(state).into())
            .await
            .map(|_| ())
    }

    /// Clears a node's admin state (back to taking work).
    pub async fn clear_admin(&self, node: &NodeId) -> Result<(), BusError> {
        self.kv.delete(&admin_key(node), None).await
    }

    /// A node's admin state, if set.
    pub async fn admin(&self, node: &NodeId) -> Result<Option<AdminState>, BusError> {
        match self.kv.get(&admin_key(node)).await? {
            Some((b, _)) => decode(&b).map(Some).map_err(|source| BusError::Decode {
                what: admin_key(node),
                source,
            }),
            None => Ok(None),
        }
    }

    /// Every admin state that is set, by node id.
    pub async fn all_admin(&self) -> Result<Vec<(String, AdminState)>, BusError> {
        let mut out = Vec::new();
        for (key, bytes, _) in self.kv.snapshot("*.admin").await? {
            if let (Some(node), Ok(state)) =
                (key.strip_suffix(".admin"), decode::<AdminState>(&bytes))
            {
                out.push((node.to_string(), state));
            }
        }
        Ok(out)
    }

    /// Everything addressed to `node`: pending commands and admin state first, then changes.
    pub async fn watch(&self, node: &NodeId) -> Result<BoxStream<'static, CommandEvent>, BusError> {
        let admin = admin_key(node);
        let node_id = node.clone();
        // a named watch: permissions pin an agent to its own commands (deploy/nats/accounts.conf)
        static WATCHES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = WATCHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("cmds-{node}-{}-{n}", std::process::id());
        let watch = self
            .kv
            .watch_named(&node_commands_filter(node), &name)
            .await?;
        Ok(watch
            .filter_map(move |entry| {
                let admin = admin.clone();
                let node_id = node_id.clone();
                async move {
                    let e = match entry {
                        Ok(e) => e,
                        Err(err) => {
                            tracing::warn!(error = %err, "command watch error; the watcher recovers");
                            return None;
                        }
                    };
                    let is_admin = e.key == admin;
                    match (e.deleted, is_admin) {
                        (false, true) => Some(match decode::<AdminState>(&e.value) {
                            Ok(a) => CommandEvent::Admin(a),
                            Err(err) => CommandEvent::Undecodable {
                                key: e.key,
                                error: err.to_string(),
                            },
                        }),
                        (false, false) => Some(match decode::<NodeCommand>(&e.value) {
                            Ok(c) if command_key(&node_id, &c.request) == e.key => {
                                CommandEvent::Command(c)
                            }
                            Ok(_) => CommandEvent::Undecodable {
                                key: e.key,
                                error: "command stored under another key".into(),
                            },
                            Err(err) => CommandEvent::Undecodable {
                                key: e.key,
                                error: err.to_string(),
                            },
                        }),
                        (true, true) => Some(CommandEvent::AdminCleared),
                        (true, false) => None,
                    }
                }
            })
            .boxed())
    }
}
