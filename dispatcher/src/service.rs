//! The dispatcher and its operations, shared by the HTTP and NATS front ends.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bus::{Bus, BusError, ConnState, Versioned};
use futures::StreamExt;
use placement::explain::explain;
use placement::lifecycle::{DeleteAction, RequestRecord, State};
use placement::request::{
    CreateBatch, CreateServer, RequestSpec, ValidationContext, parse_json, route_or_explain,
};
use placement::wire::{
    AdminState, ClusterConfig, CommandKind, NodeCommand, Timer, TimerKind, WIRE_VERSION,
};
use placement::{Lane, NodeId, RequestId, Timestamp};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::*;
use crate::config::Config;
use crate::metrics as m;
use crate::view::View;

/// Concurrent creates within one batch.
const BATCH_CONCURRENCY: usize = 64;

/// The dispatcher.
pub struct Dispatcher {
    /// Settings.
    pub cfg: Config,
    /// NATS.
    pub bus: Bus,
    /// Connection state.
    pub conn: ConnState,
    /// The cluster config in force.
    pub cluster: RwLock<ClusterConfig>,
    /// The view.
    pub view: RwLock<View>,
    /// Every record change, for watchers.
    pub changes: broadcast::Sender<Arc<Versioned<RequestRecord>>>,
    /// (request, attempt) pairs whose hint this dispatcher published.
    pub hinted: Mutex<HashSet<(RequestId, u32)>>,
    /// Claims whose signature this dispatcher verified (or handed to the verifier).
    pub verified: Mutex<crate::claims::Verified>,
    /// Signed claims to the verifier ([`Dispatcher::verify_loop`]).
    pub verify_tx: tokio::sync::mpsc::Sender<crate::claims::Pending>,
    /// Demand last written per zone (when, what).
    pub demand_sent:
        Mutex<BTreeMap<placement::Zone, (Timestamp, Vec<placement::wire::DemandEntry>)>>,
    /// Backlog flags as their keys in KV hold them, by class (this dispatcher's writes and
    /// every dispatcher's, through the watch; `placement::flag_writes`).
    pub flags: Mutex<BTreeMap<placement::shard::ClassKey, placement::flag_writes::StoredFlag>>,
    /// Prometheus rendering, when this process installed the recorder.
    pub prometheus: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// Stops every task.
    pub cancel: CancellationToken,
    /// Every task.
    pub tasks: TaskTracker,
}

fn bus_err(e: BusError) -> ApiError {
    ApiError::unavailable(e)
}

impl Dispatcher {
    /// Reads the view.
    pub fn view(&self) -> std::sync::RwLockReadGuard<'_, View> {
        self.view.read().expect("view lock")
    }

    /// The cluster config in force.
    pub fn cluster(&self) -> ClusterConfig {
        self.cluster.read().expect("cluster lock").clone()
    }

    fn check_token(&self, token: Option<&str>) -> Result<(), ApiError> {
        match &self.cfg.api_token {
            Some(want) if token != Some(want.0.as_str()) => Err(ApiError::new(
                401,
                "unauthorized",
                "a valid API token is required (Authorization: Bearer <token>)",
            )),
            _ => Ok(()),
        }
    }

    /// Authorizes a call.
    pub fn authorize(&self, token: Option<&str>) -> Result<(), ApiError> {
        self.check_token(token)
    }

    /// Creates one server from a JSON body.
    pub async fn create(&self, body: &[u8]) -> Result<Created, ApiError> {
        let req: CreateServer = parse_json(body).inspect_err(|e| {
            metrics::counter!(m::REQUESTS, "outcome" => e.code()).increment(1);
        })?;
        let spec = self.validate(&req)?;
        self.create_spec(spec).await
    }

    fn validate(&self, req: &CreateServer) -> Result<RequestSpec, ApiError> {
        let cluster = self.cluster.read().expect("cluster lock");
        let ctx = ValidationContext {
            flavors: &cluster.flavors,
            shards: &cluster.shard_map,
            default_deadline_s: cluster.default_deadline_s,
        };
        req.validate(&ctx, &mut rand::rng()).map_err(|e| {
            metrics::counter!(m::REQUESTS, "outcome" => e.code()).increment(1);
            ApiError::from(e)
        })
    }

    /// Creates many servers; each item gets its own status.
    pub async fn create_batch(&self, body: &[u8]) -> Result<Vec<BatchItem>, ApiError> {
        let batch: CreateBatch = parse_json(body)?;
        let specs = {
            let cluster = self.cluster.read().expect("cluster lock");
            let ctx = ValidationContext {
                flavors: &cluster.flavors,
                shards: &cluster.shard_map,
                default_deadline_s: cluster.default_deadline_s,
            };
            batch.validate(&ctx, &mut rand::rng())?
        };
        let items = futures::stream::iter(specs)
            .map(|spec| async move {
                let id = spec.id.to_string();
                match self.create_spec(spec).await {
                    Ok(c) => BatchItem {
                        id,
                        status: if c.created { 201 } else { 200 },
                        record: Some(c.record),
                        error: None,
                    },
                    Err(e) => BatchItem {
                        id,
                        status: e.status,
                        record: e.record.clone().map(|r| *r),
                        error: Some(e),
                    },
                }
            })
            .buffered(BATCH_CONCURRENCY)
            .collect::<Vec<_>>()
            .await;
        Ok(items)
    }

    /// Creates a validated request: admission, record, hint, timers. Idempotent by id.
    pub async fn create_spec(&self, spec: RequestSpec) -> Result<Created, ApiError> {
        let now = common::clock::now();
        let shard = {
            let cluster = self.cluster.read().expect("cluster lock");
            route_or_explain(&cluster.shard_map, &spec)?
        };
        let refusal = {
            let view = self.view();
            // admission walks distinct node shapes; the full explanation only when refusing
            if !view.nodes_caught_up || view.admissible(&spec, common::clock::now()) {
                None
            } else {
                Some(explain(&spec, view.adverts().values(), &[]).summary)
            }
        };
        let mut record = RequestRecord::new_queued(spec, shard, now);
        if let Some(summary) = refusal {
            let reason = format!("no node could ever hold this request: {summary}");
            record = record
                .fail(1, &reason, now)
                .map_err(|e| ApiError::new(500, "internal", e.to_string()))?;
        }
        let revision = match self.bus.records.create(&record).await {
            Ok(revision) => revision,
            Err(BusError::Exists { .. }) => return self.existing(record).await,
            Err(e) => return Err(bus_err(e)),
        };
        if record.state == State::Failed {
            metrics::counter!(m::REQUESTS, "outcome" => "inadmissible").increment(1);
            let msg = record.reason.clone().unwrap_or_default();
            return Err(ApiError::new(422, "no_capacity", msg).with_record(record));
        }
        let id = record.spec.id.clone();
        if let Err(e) = self
            .publish_hint(&record, Some(revision), Lane::Fit, now)
            .await
        {
            if let BusError::Full { stream } = &e {
                let why =
                    format!("shard queue {stream} is full; retry later with the same id and body");
                let failed = self
                    .bus
                    .records
                    .update(&id, |r| r.fail_retryable(1, &why, now))
                    .await;
                metrics::counter!(m::REQUESTS, "outcome" => "full").increment(1);
                let mut err = ApiError::new(429, "full", why);
                if let Ok(v) = failed {
                    err = err.with_record(v.value);
                }
                return Err(err);
            }
            tracing::warn!(request.id = %id, error = %e, "hint not published; the sweep re-publishes it");
        }
        metrics::counter!(m::REQUESTS, "outcome" => "accepted").increment(1);
        tracing::info!(request.id = %id, shard = %record.shard, "request accepted");
        Ok(Created {
            created: true,
            record,
        })
    }

    /// A create whose id exists: same body → the existing request (its hint re-published if it
    /// is still queued); another body → 409. A retryable failure (full shard) is re-queued.
    async fn existing(&self, wanted: RequestRecord) -> Result<Created, ApiError> {
        let id = wanted.spec.id.clone();
        let Some(current) = self.bus.records.get(&id).await.map_err(bus_err)? else {
            return Err(ApiError::unavailable(
                "request id exists but could not be read",
            ));
        };
        if current.value.spec != wanted.spec {
            metrics::counter!(m::REQUESTS, "outcome" => "conflict").increment(1);
            return Err(ApiError::new(
                409,
                "conflict",
                format!("request id {id} already exists with a different body; use a new id or repeat the original body"),
            )
            .with_record(current.value));
        }
        metrics::counter!(m::REQUESTS, "outcome" => "duplicate").increment(1);
        let now = common::clock::now();
        let current = if current.value.state == State::Failed && current.value.retryable {
            self.bus
                .records
                .update_from(&id, Some(current), |r| r.retry(now))
                .await
                .map_err(ApiError::unavailable)?
        } else {
            current
        };
        let (record, revision) = (current.value, current.revision);
        if record.state == State::Queued
            && let Err(e) = self
                .publish_hint(&record, Some(revision), Lane::Fit, now)
                .await
        {
            tracing::warn!(request.id = %id, error = %e, "hint not re-published");
        }
        Ok(Created {
            created: false,
            record,
        })
    }

    /// Publishes a hint and remembers it; `revision` holds exactly `record` when known (the
    /// hint then carries a copy: see `placement::wire::Hint`).
    pub async fn publish_hint(
        &self,
        record: &RequestRecord,
        revision: Option<u64>,
        lane: Lane,
        now: Timestamp,
    ) -> Result<(), BusError> {
        let res = self.bus.hints.publish(record, revision, lane, now).await;
        let label = match &res {
            Ok(a) if a.duplicate => "duplicate",
            Ok(_) => "published",
            Err(e) => e.as_str(),
        };
        metrics::counter!(m::HINTS, "lane" => lane.as_str(), "outcome" => label).increment(1);
        if res.is_ok() && lane == Lane::Fit {
            self.hinted
                .lock()
                .expect("hinted lock")
                .insert((record.spec.id.clone(), record.attempt));
        }
        res.map(|_| ())
    }

    /// Sets the durable timer of a request that waits past its class deadline: the final
    /// deadline. (Requests placed within their class deadline, nearly all of them, never cost
    /// a timer; the sweep finds the others and calls this as it spills them.)
    pub async fn schedule_deadline(&self, record: &RequestRecord) {
        let t = Timer {
            v: WIRE_VERSION,
            id: record.spec.id.clone(),
            attempt: record.attempt,
            kind: TimerKind::Deadline,
            due_at: record.deadline_at,
        };
        if let Err(e) = self.bus.timers.schedule(&t).await {
            tracing::warn!(request.id = %t.id, error = %e, "deadline timer not set; the sweep covers it");
        }
    }

    /// The record of one request (from KV, the truth).
    pub async fn get(&self, id: &str) -> Result<RequestRecord, ApiError> {
        let id =
            RequestId::new(id).map_err(|e| ApiError::new(400, "invalid", format!("id: {e}")))?;
        match self.bus.records.get(&id).await {
            Ok(Some(v)) => Ok(v.value),
            Ok(None) => Err(ApiError::not_found(format!("request {id}"))),
            Err(e) => Err(bus_err(e)),
        }
    }

    /// Lists open and recently finished requests, newest first.
    pub fn list(&self, q: &ListQuery) -> ListResult {
        let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
        let view = self.view();
        let matches = |r: &RequestRecord| {
            q.state.is_none_or(|s| r.state == s)
                && q.zone.as_deref().is_none_or(|z| r.spec.zone.as_str() == z)
                && q.node.as_deref().is_none_or(|n| {
                    r.node().map(NodeId::as_str) == Some(n)
                        || r.history
                            .last()
                            .and_then(|h| h.node.as_ref())
                            .map(NodeId::as_str)
                            == Some(n)
                })
        };
        let mut items: Vec<RequestRecord> = view
            .open()
            .map(|v| &v.value)
            .chain(view.finished())
            .filter(|r| matches(r))
            .cloned()
            .collect();
        items.sort_by(|a, b| {
            b.created_at
                .cmp(&a.created_at)
                .then_with(|| a.spec.id.cmp(&b.spec.id))
        });
        let truncated = items.len() > limit;
        items.truncate(limit);
        ListResult { items, truncated }
    }

    /// Deletes a request: a queued one at once; a placed one through its node's durable
    /// command channel. `force` finishes a delete whose host is down.
    pub async fn delete(&self, id: &str, force: bool) -> Result<RequestRecord, ApiError> {
        let id =
            RequestId::new(id).map_err(|e| ApiError::new(400, "invalid", format!("id: {e}")))?;
        let now = common::clock::now();
        if force {
            let v = self
                .bus
                .records
                .update(&id, |r| r.force_delete(now))
                .await
                .map_err(|e| match e {
                    bus::records::UpdateError::Missing => {
                        ApiError::not_found(format!("request {id}"))
                    }
                    bus::records::UpdateError::Transition(t) => ApiError::new(
                        409,
                        "conflict",
                        format!("{t}; force-delete applies to host_down or deleting requests"),
                    ),
                    other => ApiError::unavailable(other),
                })?;
            if let Some(node) = v.value.history.last().and_then(|h| h.node.clone()) {
                let _ = self.bus.commands.done(&node, &id).await;
            }
            return Ok(v.value);
        }
        let mut action = DeleteAction::Done;
        let v = self
            .bus
            .records
            .update(&id, |r| {
                let (next, a) = r.request_delete(now);
                action = a;
                Ok(next)
            })
            .await
            .map_err(|e| match e {
                bus::records::UpdateError::Missing => ApiError::not_found(format!("request {id}")),
                other => ApiError::unavailable(other),
            })?;
        let node = match action {
            DeleteAction::CommandNode(n) | DeleteAction::AlreadyInProgress(Some(n)) => Some(n),
            _ => None,
        };
        if let Some(node) = node {
            let cmd = NodeCommand {
                v: WIRE_VERSION,
                kind: CommandKind::Delete,
                request: id.clone(),
                issued_at: now,
            };
            self.bus.commands.send(&node, &cmd).await.map_err(bus_err)?;
        }
        metrics::counter!(m::DELETES).increment(1);
        Ok(v.value)
    }

    /// Why a request is pending, failed, or where it is.
    pub async fn explain(&self, id: &str) -> Result<Explained, ApiError> {
        let r = self.get(id).await?;
        let excluded: Vec<String> = r.excluded.iter().map(ToString::to_string).collect();
        let (summary, placement) = match r.state {
            State::Queued => {
                let e = explain(&r.spec, self.view().adverts().values(), &r.excluded);
                let waited = common::clock::now().since(r.queued_at);
                (
                    format!(
                        "queued for {} (attempt {}): {}",
                        placement::time::human_duration(waited),
                        r.attempt,
                        e.summary
                    ),
                    Some(e),
                )
            }
            State::Failed => (
                format!("failed: {}", r.reason.clone().unwrap_or_default()),
                None,
            ),
            s => {
                let node = r.node().map(ToString::to_string).unwrap_or_default();
                (format!("{s} on node {node}"), None)
            }
        };
        Ok(Explained {
            id: r.spec.id.to_string(),
            state: r.state,
            attempt: r.attempt,
            summary,
            placement,
            excluded,
        })
    }

    /// A dry run of a create against the live adverts.
    pub fn plan(&self, body: &[u8]) -> Result<Plan, ApiError> {
        let req: CreateServer = parse_json(body)?;
        let spec = self.validate(&req)?;
        let shard = route_or_explain(&self.cluster.read().expect("cluster lock").shard_map, &spec)?;
        let e = explain(&spec, self.view().adverts().values(), &[]);
        Ok(Plan {
            shard,
            admissible: e.admissible(),
            fits_now: e.fit_now > 0,
            explanation: e,
        })
    }

    /// Nodes as advertised.
    pub fn nodes(&self) -> Vec<NodeView> {
        let view = self.view();
        let now = common::clock::now();
        view.adverts()
            .values()
            .map(|a| NodeView {
                held: view.claims_of(&a.node).len(),
                heartbeat_age_s: now.since(a.heartbeat_at).as_secs_f64(),
                advert: a.clone(),
            })
            .collect()
    }

    /// Cordons, uncordons or drains a node.
    pub async fn set_admin(
        &self,
        node: &str,
        cordoned: bool,
        draining: bool,
        by: &str,
    ) -> Result<(), ApiError> {
        let node =
            NodeId::new(node).map_err(|e| ApiError::new(400, "invalid", format!("node: {e}")))?;
        if !self.view().adverts().contains_key(&node) {
            return Err(ApiError::not_found(format!("node {node}")));
        }
        if !cordoned && !draining {
            return self.bus.commands.clear_admin(&node).await.map_err(bus_err);
        }
        let state = AdminState {
            v: WIRE_VERSION,
            cordoned,
            draining,
            updated_at: common::clock::now(),
            by: by.to_string(),
        };
        self.bus
            .commands
            .set_admin(&node, &state)
            .await
            .map_err(bus_err)
    }

    /// Depth, oldest age and consumers of every shard.
    pub async fn shards(&self) -> Result<Vec<bus::status::ShardStatus>, ApiError> {
        let shards = self.cluster().shard_map.all_shards();
        let now = common::clock::now().as_millis();
        let js = self.bus.js.clone();
        let results: Vec<_> = futures::stream::iter(shards)
            .map(|s| {
                let js = js.clone();
                async move { bus::status::shard_status(&js, &s, now).await }
            })
            .buffered(16)
            .collect()
            .await;
        results
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(bus_err)
    }

    /// Capacity per zone and per class, from adverts.
    pub fn capacity(&self) -> Capacity {
        let cluster = self.cluster();
        let map = &cluster.shard_map;
        let view = self.view();
        let queued = view.queued_by_class();
        let mut zones: BTreeMap<String, ZoneCapacity> = BTreeMap::new();
        for a in view.adverts().values() {
            let z = zones.entry(a.zone.to_string()).or_default();
            z.nodes += 1;
            if a.takes_work() {
                z.active += 1;
            }
            z.capacity = z
                .capacity
                .checked_add(&a.capacity)
                .unwrap_or(z.capacity.clone());
            z.unallocated = z
                .unallocated
                .checked_add(&a.unallocated)
                .unwrap_or(z.unallocated.clone());
        }
        let mut classes = Vec::new();
        for zone in &map.zones {
            for tclass in map.trait_class_names() {
                let traits = map
                    .trait_class(&tclass)
                    .map(|t| t.traits.clone())
                    .unwrap_or_default();
                for i in 0..map.size_classes.len() {
                    let size = u8::try_from(i).unwrap_or(u8::MAX);
                    let bound = map.upper_bound(&tclass, size);
                    let mut nodes_fitting = 0;
                    let mut slots = 0u64;
                    for a in view.adverts().values().filter(|a| {
                        &a.zone == zone
                            && a.takes_work()
                            && traits.iter().all(|t| a.traits.contains(t))
                    }) {
                        if bound.fits(&a.unallocated) {
                            nodes_fitting += 1;
                            slots += fit_count(&bound, &a.unallocated);
                        }
                    }
                    let key = placement::shard::ClassKey {
                        zone: zone.clone(),
                        tclass: tclass.clone(),
                        size,
                    };
                    classes.push(ClassCapacity {
                        zone: zone.to_string(),
                        tclass: tclass.to_string(),
                        size,
                        bound: bound.to_string(),
                        nodes_fitting,
                        slots,
                        queued: queued.get(&key).map(|q| q.count).unwrap_or(0),
                    });
                }
            }
        }
        Capacity { zones, classes }
    }

    /// Health.
    pub fn health(&self) -> Health {
        let view = self.view();
        Health {
            nats_connected: self.conn.is_connected(),
            caught_up: view.caught_up && view.nodes_caught_up,
            nodes: view.adverts().len(),
            open: view
                .counts()
                .into_iter()
                .map(|(s, n)| (s.as_str().to_string(), n))
                .collect(),
        }
    }

    /// Live statistics.
    pub fn stats(&self) -> Stats {
        let view = self.view();
        let now = common::clock::now();
        Stats {
            placement_rate: view.placement_rate(now),
            to_claim: view.latency_to_claim(),
            to_active: view.latency_to_active(),
            open: view
                .counts()
                .into_iter()
                .map(|(s, n)| (s.as_str().to_string(), n))
                .collect(),
            failures: view.failures().cloned().collect(),
        }
    }

    /// Waits until request `id` has a revision newer than `after` (or `timeout`), then
    /// returns the record as it is.
    pub async fn wait_change(
        &self,
        id: &str,
        after: u64,
        timeout: Duration,
    ) -> Result<Versioned<RequestRecord>, ApiError> {
        let rid =
            RequestId::new(id).map_err(|e| ApiError::new(400, "invalid", format!("id: {e}")))?;
        let mut rx = self.changes.subscribe();
        let current = self
            .bus
            .records
            .get(&rid)
            .await
            .map_err(bus_err)?
            .ok_or_else(|| ApiError::not_found(format!("request {rid}")))?;
        if current.revision > after || current.value.state.is_terminal() {
            return Ok(current);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let next = tokio::time::timeout_at(deadline, rx.recv()).await;
            match next {
                Err(_) => return Ok(current),
                Ok(Ok(v)) if v.value.spec.id == rid && v.revision > after => {
                    return Ok((*v).clone());
                }
                Ok(Ok(_)) => {}
                Ok(Err(broadcast::error::RecvError::Lagged(_))) => {
                    if let Ok(Some(v)) = self.bus.records.get(&rid).await
                        && v.revision > after
                    {
                        return Ok(v);
                    }
                }
                Ok(Err(broadcast::error::RecvError::Closed)) => return Ok(current),
            }
        }
    }
}

/// How many copies of `bound` fit in `free` (the scarcest dimension decides).
fn fit_count(bound: &placement::Resources, free: &placement::Resources) -> u64 {
    bound
        .dims()
        .filter(|(_, b)| *b > 0)
        .map(|(d, b)| free.get(&d) / b)
        .min()
        .unwrap_or(0)
}
