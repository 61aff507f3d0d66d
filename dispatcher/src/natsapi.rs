//! The API as a NATS service (`updraft.v1.api.*`, request/reply). Same operations as HTTP;
//! every reply is a JSON envelope: `{"status": 201, "result": ...}` or
//! `{"status": 400, "error": {...}}`. When an API token is configured, requests carry it in an
//! `Authorization: Bearer <token>` header.

use std::sync::Arc;
use std::time::Duration;

use async_nats::service::ServiceExt;
use futures::StreamExt;
use placement::subjects::{API_PREFIX, SERVICE_NAME};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::api::{ApiError, ListQuery};
use crate::metrics as m;
use crate::service::Dispatcher;

/// Every endpoint, relative to `updraft.v1.api`.
pub const ENDPOINTS: &[&str] = &[
    "servers.create",
    "servers.batch",
    "servers.get",
    "servers.list",
    "servers.delete",
    "servers.explain",
    "servers.plan",
    "servers.watch",
    "nodes.list",
    "nodes.admin",
    "shards.status",
    "capacity",
    "health",
    "stats",
];

/// The reply envelope.
#[derive(Debug, Serialize, Deserialize)]
pub struct Envelope<T> {
    /// HTTP-like status.
    pub status: u16,
    /// The result, on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<T>,
    /// The error, on failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ApiError>,
}

/// `{"id": ..}` bodies (get, explain, delete).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IdBody {
    id: String,
    #[serde(default)]
    force: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WatchBody {
    id: String,
    #[serde(default)]
    after: u64,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminBody {
    node: String,
    action: String,
}

fn body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    placement::request::parse_json(bytes).map_err(ApiError::from)
}

fn envelope<T: Serialize>(status: u16, r: Result<T, ApiError>) -> Vec<u8> {
    let e = match r {
        Ok(v) => Envelope {
            status,
            result: Some(v),
            error: None,
        },
        Err(e) => Envelope {
            status: e.status,
            result: None,
            error: Some(e),
        },
    };
    serde_json::to_vec(&e).unwrap_or_else(|_| b"{\"status\":500}".to_vec())
}

async fn handle(d: &Dispatcher, endpoint: &str, payload: &[u8]) -> (u16, Vec<u8>) {
    macro_rules! out {
        ($status:expr, $r:expr) => {{
            let r = $r;
            let status = match &r {
                Ok(_) => $status,
                Err(e) => e.status,
            };
            (status, envelope($status, r))
        }};
    }
    match endpoint {
        "servers.create" => match d.create(payload).await {
            Ok(c) => {
                let s = if c.created { 201 } else { 200 };
                (s, envelope(s, Ok(c)))
            }
            Err(e) => (e.status, envelope::<()>(0, Err(e))),
        },
        "servers.batch" => out!(
            200,
            d.create_batch(payload)
                .await
                .map(|items| serde_json::json!({ "items": items }))
        ),
        "servers.get" => out!(
            200,
            async { d.get(&body::<IdBody>(payload)?.id).await }.await
        ),
        "servers.list" => out!(
            200,
            if payload.is_empty() {
                Ok(ListQuery::default())
            } else {
                body::<ListQuery>(payload)
            }
            .map(|q| d.list(&q))
        ),
        "servers.delete" => out!(
            202,
            async {
                let b = body::<IdBody>(payload)?;
                d.delete(&b.id, b.force).await
            }
            .await
        ),
        "servers.explain" => out!(
            200,
            async { d.explain(&body::<IdBody>(payload)?.id).await }.await
        ),
        "servers.plan" => out!(200, d.plan(payload)),
        "servers.watch" => out!(
            200,
            async {
                let b = body::<WatchBody>(payload)?;
                let t = Duration::from_millis(b.timeout_ms.unwrap_or(30_000).min(300_000));
                d.wait_change(&b.id, b.after, t).await
            }
            .await
        ),
        "nodes.list" => out!(200, Ok::<_, ApiError>(d.nodes())),
        "nodes.admin" => out!(
            200,
            async {
                let b = body::<AdminBody>(payload)?;
                let (c, dr) = match b.action.as_str() {
                    "cordon" => (true, false),
                    "uncordon" => (false, false),
                    "drain" => (true, true),
                    other => {
                        return Err(ApiError::new(
                            400,
                            "invalid",
                            format!("action: unknown `{other}` (cordon, uncordon, drain)"),
                        ));
                    }
                };
                d.set_admin(&b.node, c, dr, "nats")
                    .await
                    .map(|()| serde_json::json!({ "node": b.node, "action": b.action }))
            }
            .await
        ),
        "shards.status" => out!(200, d.shards().await),
        "capacity" => out!(200, Ok::<_, ApiError>(d.capacity())),
        "health" => out!(200, Ok::<_, ApiError>(d.health())),
        "stats" => out!(200, Ok::<_, ApiError>(d.stats())),
        other => {
            let e = ApiError::new(404, "not_found", format!("unknown endpoint {other}"));
            (404, envelope::<()>(0, Err(e)))
        }
    }
}

/// Serves every endpoint until cancelled. Several dispatchers share the load through the
/// service's queue group.
pub async fn serve(d: Arc<Dispatcher>) -> anyhow::Result<()> {
    let service = d
        .bus
        .client
        .service_builder()
        .description("updraft VM placement API")
        .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| anyhow::anyhow!("start NATS service: {e}"))?;
    let group = service.group(API_PREFIX);
    for name in ENDPOINTS {
        let mut endpoint = group
            .endpoint(*name)
            .await
            .map_err(|e| anyhow::anyhow!("add endpoint {name}: {e}"))?;
        let d = d.clone();
        let cancel = d.cancel.clone();
        d.tasks.clone().spawn(async move {
            loop {
                let req = tokio::select! {
                    _ = cancel.cancelled() => return,
                    r = endpoint.next() => match r { Some(r) => r, None => return },
                };
                let d = d.clone();
                tokio::spawn(async move {
                    let token = req
                        .message
                        .headers
                        .as_ref()
                        .and_then(|h| h.get("Authorization"))
                        .map(|v| v.as_str().trim_start_matches("Bearer ").to_string());
                    let (status, bytes) = match d.authorize(token.as_deref()) {
                        Ok(()) => handle(&d, name, &req.message.payload).await,
                        Err(e) => (e.status, envelope::<()>(0, Err(e))),
                    };
                    metrics::counter!(m::API, "frontend" => "nats", "endpoint" => *name, "status" => status.to_string()).increment(1);
                    if let Err(e) = req.respond(Ok(bytes.into())).await {
                        tracing::debug!(error = %e, "API reply not delivered");
                    }
                });
            }
        });
    }
    d.cancel.cancelled().await;
    let _ = service.stop().await;
    Ok(())
}
