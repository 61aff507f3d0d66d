//! The HTTP JSON API (axum). Every route calls the same [`Dispatcher`] operation as its NATS
//! twin. Errors are JSON `{"error": {"status", "code", "message"}}` with a 4xx/5xx status.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::Stream;
use placement::request::MAX_BODY_BYTES;
use serde::{Deserialize, Serialize};

use crate::api::{ApiError, ListQuery};
use crate::metrics as m;
use crate::service::Dispatcher;

type Shared = Arc<Dispatcher>;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(serde_json::json!({ "error": self }))).into_response()
    }
}

fn ok<T: Serialize>(status: u16, v: &T) -> Response {
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
        Json(v),
    )
        .into_response()
}

fn count(endpoint: &'static str, status: u16) {
    metrics::counter!(m::API, "frontend" => "http", "endpoint" => endpoint, "status" => status.to_string()).increment(1);
}

fn reply<T: Serialize>(endpoint: &'static str, status: u16, r: Result<T, ApiError>) -> Response {
    match r {
        Ok(v) => {
            count(endpoint, status);
            ok(status, &v)
        }
        Err(e) => {
            count(endpoint, e.status);
            e.into_response()
        }
    }
}

/// The router.
pub fn router(d: Shared) -> Router {
    let api = Router::new()
        .route("/v1/servers", post(create).get(list))
        .route("/v1/servers/batch", post(batch))
        .route("/v1/servers/plan", post(plan))
        .route("/v1/servers/{id}", get(get_one).delete(delete))
        .route("/v1/servers/{id}/explain", get(explain))
        .route("/v1/servers/{id}/watch", get(watch))
        .route("/v1/nodes", get(nodes))
        .route("/v1/nodes/{id}/{action}", post(admin))
        .route("/v1/shards", get(shards))
        .route("/v1/capacity", get(capacity))
        .route("/v1/stats", get(stats))
        .route_layer(middleware::from_fn_with_state(d.clone(), auth));
    Router::new()
        .merge(api)
        .route("/healthz", get(health))
        .route("/metrics", get(prometheus))
        .route("/", get(status_page))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES * 2))
        .with_state(d)
}

async fn auth(State(d): State<Shared>, headers: HeaderMap, req: Request, next: Next) -> Response {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match d.authorize(token) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

async fn create(State(d): State<Shared>, body: Bytes) -> Response {
    match d.create(&body).await {
        Ok(c) => reply("servers.create", if c.created { 201 } else { 200 }, Ok(c)),
        Err(e) => reply::<()>("servers.create", e.status, Err(e)),
    }
}

async fn batch(State(d): State<Shared>, body: Bytes) -> Response {
    reply(
        "servers.batch",
        200,
        d.create_batch(&body)
            .await
            .map(|items| serde_json::json!({ "items": items })),
    )
}

async fn plan(State(d): State<Shared>, body: Bytes) -> Response {
    reply("servers.plan", 200, d.plan(&body))
}

async fn list(
    State(d): State<Shared>,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    match q {
        Ok(Query(q)) => reply("servers.list", 200, Ok(d.list(&q))),
        Err(e) => reply::<()>(
            "servers.list",
            400,
            Err(ApiError::new(400, "invalid", format!("query: {e}"))),
        ),
    }
}

async fn get_one(State(d): State<Shared>, Path(id): Path<String>) -> Response {
    reply("servers.get", 200, d.get(&id).await)
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct DeleteQuery {
    #[serde(default)]
    force: bool,
}

async fn delete(
    State(d): State<Shared>,
    Path(id): Path<String>,
    q: Result<Query<DeleteQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    match q {
        Ok(Query(q)) => reply("servers.delete", 202, d.delete(&id, q.force).await),
        Err(e) => reply::<()>(
            "servers.delete",
            400,
            Err(ApiError::new(400, "invalid", format!("query: {e}"))),
        ),
    }
}

async fn explain(State(d): State<Shared>, Path(id): Path<String>) -> Response {
    reply("servers.explain", 200, d.explain(&id).await)
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct WatchQuery {
    #[serde(default)]
    after: u64,
    #[serde(default)]
    timeout_s: Option<u64>,
}

/// With `Accept: text/event-stream`, a stream of the record's states until it is terminal;
/// otherwise a long poll: the record once its revision passes `after` (or at `timeout_s`).
async fn watch(
    State(d): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
    q: Result<Query<WatchQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => {
            return reply::<()>(
                "servers.watch",
                400,
                Err(ApiError::new(400, "invalid", format!("query: {e}"))),
            );
        }
    };
    let sse = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/event-stream"));
    if !sse {
        let timeout = Duration::from_secs(q.timeout_s.unwrap_or(30).min(300));
        return reply(
            "servers.watch",
            200,
            d.wait_change(&id, q.after, timeout).await,
        );
    }
    if let Err(e) = d.get(&id).await {
        return e.into_response();
    }
    count("servers.watch", 200);
    Sse::new(record_stream(d, id, q.after))
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn record_stream(
    d: Shared,
    id: String,
    after: u64,
) -> impl Stream<Item = Result<Event, Infallible>> {
    futures::stream::unfold((d, id, after, false), |(d, id, after, done)| async move {
        if done {
            return None;
        }
        match d.wait_change(&id, after, Duration::from_secs(25)).await {
            Ok(v) => {
                let terminal = v.value.state.is_terminal();
                let ev = Event::default()
                    .event("record")
                    .id(v.revision.to_string())
                    .json_data(&v.value)
                    .unwrap_or_default();
                if v.revision == after && !terminal {
                    // a quiet period: the keep-alive covers it; poll again
                    return Some((
                        Ok(Event::default().comment("waiting")),
                        (d, id, after, false),
                    ));
                }
                Some((Ok(ev), (d, id, v.revision, terminal)))
            }
            Err(e) => Some((
                Ok(Event::default().event("error").data(e.message)),
                (d, id, after, true),
            )),
        }
    })
}

async fn nodes(State(d): State<Shared>) -> Response {
    reply("nodes.list", 200, Ok(d.nodes()))
}

async fn admin(State(d): State<Shared>, Path((id, action)): Path<(String, String)>) -> Response {
    let (cordoned, draining) = match action.as_str() {
        "cordon" => (true, false),
        "uncordon" => (false, false),
        "drain" => (true, true),
        other => {
            let e = ApiError::new(
                404,
                "not_found",
                format!("unknown node action `{other}` (cordon, uncordon, drain)"),
            );
            return reply::<()>("nodes.admin", 404, Err(e));
        }
    };
    reply(
        "nodes.admin",
        200,
        d.set_admin(&id, cordoned, draining, "http")
            .await
            .map(|()| serde_json::json!({ "node": id, "action": action })),
    )
}

async fn shards(State(d): State<Shared>) -> Response {
    reply("shards.status", 200, d.shards().await)
}

async fn capacity(State(d): State<Shared>) -> Response {
    reply("capacity", 200, Ok(d.capacity()))
}

async fn stats(State(d): State<Shared>) -> Response {
    reply("stats", 200, Ok(d.stats()))
}

async fn health(State(d): State<Shared>) -> Response {
    let h = d.health();
    let status = if h.nats_connected { 200 } else { 503 };
    ok(status, &h)
}

async fn prometheus(State(d): State<Shared>) -> Response {
    match &d.prometheus {
        Some(h) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            h.render(),
        )
            .into_response(),
        None => (
            StatusCode::NOT_FOUND,
            "metrics are not enabled in this process",
        )
            .into_response(),
    }
}

async fn status_page() -> Html<&'static str> {
    Html(crate::page::STATUS_PAGE)
}
