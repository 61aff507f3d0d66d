//! The bus's error type: callers branch on `kind`-like predicates, never on strings.

use placement::wire::WireError;

/// A bus operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// A compare-and-swap lost: the key moved on since it was read.
    #[error("{key}: revision conflict (it changed since it was read)")]
    Conflict {
        /// The key.
        key: String,
    },
    /// A create found the key already there.
    #[error("{key}: already exists")]
    Exists {
        /// The key.
        key: String,
    },
    /// The server did not answer in time; the operation may or may not have happened.
    #[error("{what}: timed out (the outcome is unknown; re-read before deciding)")]
    Timeout {
        /// What timed out.
        what: String,
    },
    /// A shard queue is at its message limit (the API answers 429).
    #[error("{stream}: queue is full")]
    Full {
        /// The stream.
        stream: String,
    },
    /// A stored value or message does not decode.
    #[error("{what}: {source}")]
    Decode {
        /// What was being decoded.
        what: String,
        /// Why.
        #[source]
        source: WireError,
    },
    /// Topology is missing (the dispatcher has not created it yet).
    #[error("{what} does not exist yet; start a dispatcher first, which creates the NATS topology")]
    Missing {
        /// What is missing.
        what: String,
    },
    /// Anything else NATS reported.
    #[error("{what}: {message}")]
    Nats {
        /// The operation.
        what: String,
        /// NATS's own message.
        message: String,
    },
}

impl BusError {
    /// True for a lost compare-and-swap.
    pub fn is_conflict(&self) -> bool {
        matches!(self, BusError::Conflict { .. })
    }

    /// True when the outcome is unknown (a write may have landed).
    pub fn is_ambiguous(&self) -> bool {
        matches!(self, BusError::Timeout { .. } | BusError::Nats { .. })
    }

    /// Stable label for metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            BusError::Conflict { .. } => "conflict",
            BusError::Exists { .. } => "exists",
            BusError::Timeout { .. } => "timeout",
            BusError::Full { .. } => "full",
            BusError::Decode { .. } => "decode",
            BusError::Missing { .. } => "missing",
            BusError::Nats { .. } => "nats",
        }
    }

    pub(crate) fn nats(what: impl Into<String>, err: impl std::fmt::Display) -> Self {
        let message = err.to_string();
        let what = what.into();
        if message.contains("timed out") || message.contains("timeout") {
            BusError::Timeout { what }
        } else {
            BusError::Nats { what, message }
        }
    }
}
