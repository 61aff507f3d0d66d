//! Connection settings and a client that reconnects forever, with backoff, and reports its
//! connection state (a node claims nothing while disconnected).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::BusError;

/// Default server address.
pub const DEFAULT_URL: &str = "nats://127.0.0.1:4222";
/// Default time to wait for the first connection.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default time to wait for a request (JetStream API, KV) answer.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A string that never shows in logs or `Debug` output.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

/// How to reach NATS. Every field is optional but the URL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated (`nats://a:4222,nats://b:4222`).
    pub url: String,
    /// A `.creds` file (JWT + nkey seed).
    pub creds_file: Option<PathBuf>,
    /// A file holding an nkey seed (`SU...`).
    pub nkey_seed_file: Option<PathBuf>,
    /// User for user/password auth.
    pub user: Option<String>,
    /// Password for user/password auth.
    pub password: Option<Secret>,
    /// Token auth.
    pub token: Option<Secret>,
    /// CA certificate (PEM) to trust for TLS.
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    pub tls_cert_file: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS.
    pub tls_key_file: Option<PathBuf>,
    /// Refuse to talk without TLS.
    pub require_tls: bool,
    /// Time to wait for a connection.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time to wait for a request's answer.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Inbox prefix (permissions can pin a node to its own inboxes).
    pub inbox_prefix: Option<String>,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: DEFAULT_URL.to_string(),
            creds_file: None,
            nkey_seed_file: None,
            user: None,
            password: None,
            token: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            require_tls: false,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            inbox_prefix: None,
        }
    }
}

/// Whether the client is connected right now.
#[derive(Debug, Clone)]
pub struct ConnState(watch::Receiver<bool>);

impl ConnState {
    /// True while connected.
    pub fn is_connected(&self) -> bool {
        *self.0.borrow()
    }

    /// Waits until connected.
    pub async fn connected(&mut self) {
        let _ = self.0.wait_for(|c| *c).await;
    }

    /// Waits for the next change.
    pub async fn changed(&mut self) -> bool {
        self.0.changed().await.is_ok()
    }

    /// Waits until the connection has gone down and come back (a server restart or a network
    /// cut), counting from the call; never returns once the client is closed for good. A watch
    /// whose consumer lived in the server's memory re-watches then instead of waiting for its
    /// missed heartbeats.
    pub async fn reconnected(&mut self) {
        if self.0.wait_for(|c| !*c).await.is_err() || self.0.wait_for(|c| *c).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Backoff between reconnect attempts: 100 ms doubling to 5 s, with jitter from the attempt.
fn backoff(attempts: usize) -> Duration {
    let exp = u32::try_from(attempts.min(6)).unwrap_or(6);
    let base = 100u64.saturating_mul(1u64 << exp).min(5_000);
    let jitter = u64::try_from(attempts.wrapping_mul(37) % 100).unwrap_or(0);
    Duration::from_millis(base + jitter)
}

/// Connects with `name` as the connection name and waits up to `connect_timeout` for the first
/// connection; afterwards the client reconnects forever with backoff.
pub async fn connect(
    cfg: &NatsConfig,
    name: &str,
) -> Result<(async_nats::Client, ConnState), BusError> {
    let (client, mut state) = connect_lazy(cfg, name).await?;
    if tokio::time::timeout(cfg.connect_timeout, state.connected())
        .await
        .is_err()
    {
        return Err(BusError::Timeout {
            what: format!("connect to NATS at {}", cfg.url),
        });
    }
    Ok((client, state))
}

/// Like [`connect`] but returns at once; the client keeps trying in the background (a node
/// that boots before NATS is reachable). Watch the returned state to know when it is up.
pub async fn connect_lazy(
    cfg: &NatsConfig,
    name: &str,
) -> Result<(async_nats::Client, ConnState), BusError> {
    let (tx, rx) = watch::channel(false);
    let mut opts = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(cfg.connect_timeout)
        .request_timeout(Some(cfg.request_timeout))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .reconnect_delay_callback(backoff)
        .require_tls(cfg.require_tls)
        .event_callback(move |ev| {
            let tx = tx.clone();
            async move {
                match ev {
                    async_nats::Event::Connected => {
                        let _ = tx.send(true);
                        tracing::info!("nats connected");
                    }
                    async_nats::Event::Disconnected => {
                        let _ = tx.send(false);
                        tracing::warn!("nats disconnected; reconnecting");
                    }
                    async_nats::Event::Closed => {
                        let _ = tx.send(false);
                    }
                    other => tracing::debug!(event = %other, "nats event"),
                }
            }
        });
    if let Some(p) = &cfg.creds_file {
        opts = opts
            .credentials_file(p)
            .await
            .map_err(|e| BusError::nats(format!("read creds file {}", p.display()), e))?;
    }
    if let Some(p) = &cfg.nkey_seed_file {
        let seed = std::fs::read_to_string(p)
            .map_err(|e| BusError::nats(format!("read nkey seed {}", p.display()), e))?;
        opts = opts.nkey(seed.trim().to_string());
    }
    if let (Some(u), Some(pw)) = (&cfg.user, &cfg.password) {
        opts = opts.user_and_password(u.clone(), pw.0.clone());
    }
    if let Some(t) = &cfg.token {
        opts = opts.token(t.0.clone());
    }
    if let Some(ca) = &cfg.tls_ca_file {
        opts = opts.add_root_certificates(ca.clone());
    }
    if let (Some(c), Some(k)) = (&cfg.tls_cert_file, &cfg.tls_key_file) {
        opts = opts.add_client_certificate(c.clone(), k.clone());
    }
    if let Some(prefix) = &cfg.inbox_prefix {
        opts = opts.custom_inbox_prefix(prefix);
    }
    let urls: Vec<String> = cfg
        .url
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    let addrs: Vec<async_nats::ServerAddr> = urls
        .iter()
        .map(|u| {
            u.parse::<async_nats::ServerAddr>()
                .map_err(|e| BusError::nats(format!("nats url `{u}`"), e))
        })
        .collect::<Result<_, _>>()?;
    let client = opts
        .connect(addrs)
        .await
        .map_err(|e| BusError::nats(format!("connect to NATS at {}", cfg.url), e))?;
    Ok((client, ConnState(rx)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted() {
        let c = NatsConfig {
            password: Some(Secret("hunter2".into())),
            ..Default::default()
        };
        let s = format!("{c:?}");
        assert!(!s.contains("hunter2"));
        assert!(s.contains("<redacted>"));
    }

    #[test]
    fn backoff_grows_and_caps() {
        assert!(backoff(0) < backoff(3));
        assert!(backoff(100) <= Duration::from_millis(5_100));
    }

    #[tokio::test]
    async fn reconnected_waits_for_a_drop_and_a_return() {
        use futures::FutureExt;
        let (tx, rx) = watch::channel(true);
        let mut state = ConnState(rx);
        let mut closed = state.clone();
        let waiting = state.reconnected();
        tokio::pin!(waiting);
        assert!(
            (&mut waiting).now_or_never().is_none(),
            "connected all along"
        );
        tx.send(false).unwrap();
        assert!(
            (&mut waiting).now_or_never().is_none(),
            "down, not back yet"
        );
        tx.send(true).unwrap();
        assert!((&mut waiting).now_or_never().is_some(), "back");
        // a client closed for good never reports a return
        drop(tx);
        let never = closed.reconnected();
        assert!(
            tokio::time::timeout(Duration::from_millis(50), never)
                .await
                .is_err()
        );
    }
}
