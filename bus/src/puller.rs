//! A node's outstanding pulls. Each pull asks one shard lane's consumer for up to `batch`
//! messages, with the node's fitness bucket as its priority in the lane's priority group, on
//! its own inbox. The server hands each message to the first waiting pull of the best
//! priority; a pull that still waits for more then goes to the back of its priority, so the
//! pulls of one priority share a burst in turns (`tests/nats.rs`).
//!
//! A pull ends in one of four ways: its last message arrives; the server expires it (status 408) or
//! refuses it (409: max waiting, leadership change...); no answer came by its local deadline
//! (lost in a reconnect); or the node cancels it. Cancelling unsubscribes the inbox: the server
//! drops a waiting pull whose reply subject has no interest left, so a node can re-plan its
//! pulls (new priorities, other classes) at once instead of waiting for them to expire. A
//! message already in flight when the pull was cancelled is still handed over (the inbox is
//! drained, not dropped), as a delivery with no pull.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use placement::ledger::PullId;
use placement::subjects::{PRIORITY_GROUP, pull_request_subject, shard_consumer, shard_stream};
use placement::{Lane, ShardId};
use tokio::sync::{mpsc, oneshot};

use crate::BusError;

/// Extra time past a pull's expiry before it is ended locally.
pub const LOCAL_GRACE: Duration = Duration::from_secs(2);

/// One pull to issue.
#[derive(Debug, Clone)]
pub struct PullSpec {
    /// The node's id for this pull (its credit in the ledger).
    pub pull: PullId,
    /// Shard.
    pub shard: ShardId,
    /// Lane.
    pub lane: Lane,
    /// Priority (0 first).
    pub priority: u8,
    /// Messages asked for (at most the consumer's `max_batch`,
    /// [`placement::pull::MAX_PULL_BATCH`]).
    pub batch: u32,
    /// Lifetime at the server.
    pub expiry: Duration,
}

/// Why a pull ended without a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullEnd {
    /// It expired at the server (status 408).
    Expired,
    /// The server refused or ended it (409 max waiting, leadership change, consumer deleted...).
    Refused {
        /// Status code.
        code: u16,
        /// Server's description.
        description: String,
    },
    /// No answer by its local deadline (e.g. lost in a reconnect).
    Lost,
}

/// What the puller reports.
#[derive(Debug)]
pub enum PullEvent {
    /// A message arrived; `pull` is the pull it answered, `None` when that pull had been
    /// cancelled meanwhile (the delivery is real all the same and must be handled). A pull
    /// for several messages reports each; after its last it is over (no `Ended`).
    Delivered {
        /// The pull it answered.
        pull: Option<PullId>,
        /// The message.
        delivery: Box<Delivery>,
    },
    /// A pull ended before it brought all it asked for (never sent for a cancelled pull).
    Ended {
        /// The pull.
        pull: PullId,
        /// Why.
        why: PullEnd,
    },
}

/// A delivered message and its acknowledgements.
#[derive(Debug, Clone)]
pub struct Delivery {
    client: async_nats::Client,
    /// Ack subject.
    pub reply: String,
    /// Message subject.
    pub subject: String,
    /// Payload.
    pub payload: Bytes,
    /// Stream it came from.
    pub stream: String,
    /// Consumer it came through.
    pub consumer: String,
    /// How many times it has been delivered.
    pub delivered: u64,
}

impl Delivery {
    async fn send(&self, body: &'static str) -> Result<(), BusError> {
        self.client
            .publish(self.reply.clone(), Bytes::from_static(body.as_bytes()))
            .await
            .map_err(|e| BusError::nats(format!("{body} {}", self.subject), e))
    }

    /// Acknowledges (the message leaves the work queue).
    pub async fn ack(&self) -> Result<(), BusError> {
        self.send("+ACK").await
    }

    /// Hands the message back, to be redelivered after `delay`.
    pub async fn nak(&self, delay: Duration) -> Result<(), BusError> {
        let body = format!("-NAK {{\"delay\":{}}}", delay.as_nanos());
        self.client
            .publish(self.reply.clone(), body.into())
            .await
            .map_err(|e| BusError::nats(format!("nak {}", self.subject), e))
    }

    /// Removes the message for good (a stale hint).
    pub async fn term(&self) -> Result<(), BusError> {
        self.send("+TERM").await
    }

    /// Says work on it is in progress (resets the ack timer).
    pub async fn in_progress(&self) -> Result<(), BusError> {
        self.send("+WPI").await
    }
}

/// `$JS.ACK.<stream>.<consumer>.<delivered>...` (v1) or with domain and account hash (v2).
fn parse_ack(reply: &str) -> Option<(String, String, u64)> {
    let t: Vec<&str> = reply.split('.').collect();
    if t.len() < 9 || t[0] != "$JS" || t[1] != "ACK" {
        return None;
    }
    let (s, c, d) = if t.len() == 9 { (2, 3, 4) } else { (4, 5, 6) };
    Some((t[s].to_string(), t[c].to_string(), t[d].parse().ok()?))
}

fn delivery(client: &async_nats::Client, m: async_nats::Message) -> Option<Delivery> {
    let reply = m.reply.as_ref()?.to_string();
    let (stream, consumer, delivered) = parse_ack(&reply)?;
    Some(Delivery {
        client: client.clone(),
        reply,
        subject: m.subject.to_string(),
        payload: m.payload,
        stream,
        consumer,
        delivered,
    })
}

/// Issues and cancels pulls; events arrive on the receiver returned by [`Puller::new`].
#[derive(Clone)]
pub struct Puller {
    client: async_nats::Client,
    events: mpsc::Sender<PullEvent>,
    cancels: Arc<Mutex<HashMap<PullId, oneshot::Sender<()>>>>,
}

impl std::fmt::Debug for Puller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Puller")
            .field("outstanding", &self.outstanding())
            .finish()
    }
}

impl Puller {
    /// A puller on `client` and the receiver of its events.
    pub fn new(client: async_nats::Client) -> (Puller, mpsc::Receiver<PullEvent>) {
        let (events, rx) = mpsc::channel(1024);
        (
            Puller {
                client,
                events,
                cancels: Arc::new(Mutex::new(HashMap::new())),
            },
            rx,
        )
    }

    /// Issues one pull (subscribes its inbox, sends the request for `spec.batch` messages).
    pub async fn issue(&self, spec: &PullSpec) -> Result<(), BusError> {
        let stream = shard_stream(&spec.shard);
        let consumer = shard_consumer(&spec.shard, spec.lane);
        let inbox = self.client.new_inbox();
        let mut sub = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| BusError::nats(format!("pull inbox for {consumer}"), e))?;
        let expires_ns = u64::try_from(spec.expiry.as_nanos()).unwrap_or(u64::MAX);
        let batch = spec.batch.max(1);
        let body = serde_json::json!({ "batch": batch, "expires": expires_ns, "group": PRIORITY_GROUP, "priority": spec.priority });
        self.client
            .publish_with_reply(
                pull_request_subject(&stream, &consumer),
                inbox,
                body.to_string().into(),
            )
            .await
            .map_err(|e| BusError::nats(format!("pull {consumer}"), e))?;
        let (cancel_tx, mut cancel_rx) = oneshot::channel();
        self.cancels
            .lock()
            .expect("cancels lock")
            .insert(spec.pull, cancel_tx);
        let client = self.client.clone();
        let events = self.events.clone();
        let cancels = self.cancels.clone();
        let pull = spec.pull;
        let deadline = tokio::time::sleep(spec.expiry + LOCAL_GRACE);
        tokio::spawn(async move {
            tokio::pin!(deadline);
            let mut left = batch;
            let ended = loop {
                tokio::select! {
                    m = sub.next() => match m {
                        None => break Some(PullEnd::Lost),
                        Some(m) => match m.status.map(|s| s.as_u16()) {
                            Some(100) => continue,
                            Some(408) => break Some(PullEnd::Expired),
                            Some(code) => break Some(PullEnd::Refused { code, description: m.description.clone().unwrap_or_default() }),
                            None => {
                                let Some(d) = delivery(&client, m) else { continue };
                                left -= 1;
                                // the pull's own message only while it was not cancelled (a
                                // cancelled pull's credit went back already)
                                let live = {
                                    let mut c = cancels.lock().expect("cancels lock");
                                    let live = c.contains_key(&pull);
                                    if live && left == 0 {
                                        c.remove(&pull);
                                    }
                                    live
                                };
                                let _ = events.send(PullEvent::Delivered { pull: live.then_some(pull), delivery: Box::new(d) }).await;
                                // (cancelled: the cancel branch drains the rest)
                                if left == 0 {
                                    break None;
                                }
                            }
                        },
                    },
                    _ = &mut cancel_rx => {
                        // cancelled: stop interest, but hand over anything already in flight
                        let _ = sub.drain().await;
                        while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(2), sub.next()).await {
                            if m.status.is_none()
                                && let Some(d) = delivery(&client, m) {
                                    let _ = events.send(PullEvent::Delivered { pull: None, delivery: Box::new(d) }).await;
                                }
                        }
                        return;
                    }
                    _ = &mut deadline => break Some(PullEnd::Lost),
                }
            };
            let _ = sub.unsubscribe().await;
            if let Some(why) = ended
                && cancels
                    .lock()
                    .expect("cancels lock")
                    .remove(&pull)
                    .is_some()
            {
                let _ = events.send(PullEvent::Ended { pull, why }).await;
            }
        });
        Ok(())
    }

    /// Cancels a pull; true when it was still outstanding. Its credit may be reused at once: a
    /// message already in flight arrives as a delivery with no pull.
    pub fn cancel(&self, pull: PullId) -> bool {
        match self.cancels.lock().expect("cancels lock").remove(&pull) {
            Some(tx) => {
                let _ = tx.send(());
                true
            }
            None => false,
        }
    }

    /// Number of pulls outstanding.
    pub fn outstanding(&self) -> usize {
        self.cancels.lock().expect("cancels lock").len()
    }
}

/// Fetches up to `n` messages from one lane in a single pull request (tools and tests: a
/// node pulls one at a time under credit). Returns what arrived before `expiry`.
pub async fn fetch_batch(
    client: &async_nats::Client,
    shard: &ShardId,
    lane: Lane,
    n: usize,
    expiry: Duration,
) -> Result<Vec<Delivery>, BusError> {
    let stream = shard_stream(shard);
    let consumer = shard_consumer(shard, lane);
    let inbox = client.new_inbox();
    let mut sub = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| BusError::nats("fetch inbox", e))?;
    let body = serde_json::json!({
        "batch": n,
        "expires": u64::try_from(expiry.as_nanos()).unwrap_or(u64::MAX),
        "group": PRIORITY_GROUP,
        "priority": 0,
    });
    client
        .publish_with_reply(
            pull_request_subject(&stream, &consumer),
            inbox,
            body.to_string().into(),
        )
        .await
        .map_err(|e| BusError::nats(format!("fetch from {consumer}"), e))?;
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + expiry + LOCAL_GRACE;
    while out.len() < n {
        match tokio::time::timeout_at(deadline, sub.next()).await {
            Ok(Some(m)) if m.status.is_none() => out.extend(delivery(client, m)),
            Ok(Some(m)) if m.status.map(|s| s.as_u16()) == Some(100) => {}
            _ => break,
        }
    }
    let _ = sub.unsubscribe().await;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_subjects_parse_in_both_formats() {
        assert_eq!(
            parse_ack(
                "$JS.ACK.UPDRAFT_REQ_AZ1_STD_S00_P0.shard-az1-std-s00-p0-fit.1.3.1.1795596803608769913.2"
            ),
            Some((
                "UPDRAFT_REQ_AZ1_STD_S00_P0".into(),
                "shard-az1-std-s00-p0-fit".into(),
                1
            ))
        );
        assert_eq!(
            parse_ack("$JS.ACK.dom.ACCHASH.S.C.2.10.5.1795596803608769913.0.abc"),
            Some(("S".into(), "C".into(), 2))
        );
        assert_eq!(parse_ack("_INBOX.x"), None);
    }
}
