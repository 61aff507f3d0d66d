//! A node's outstanding pulls, all answered on one subscription.
//!
//! Each pull asks one shard lane's consumer for one message, with the node's fitness bucket
//! as its priority in the consumer's priority group, and expires at the server. A delivered
//! message names its stream and consumer in its ack subject, and a node keeps at most one pull
//! per lane, so a delivery maps back to its pull; an expiry (status 408) names the pull's own
//! inbox. Pulls whose answer never came (a reconnect lost it) end by a local deadline.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use placement::ledger::PullId;
use placement::subjects::{PRIORITY_GROUP, pull_request_subject, shard_consumer, shard_stream};
use placement::time::duration_ms;
use placement::{Lane, ShardId};
use tokio::sync::mpsc;
use tokio::time::Instant;

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
    /// A message arrived; `pull` is the pull it answered (`None` if that pull had already ended
    /// locally: the delivery is still real and must be handled).
    Delivered {
        /// The pull it answered.
        pull: Option<PullId>,
        /// The message.
        delivery: Box<Delivery>,
    },
    /// A pull ended without a message.
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

struct Outstanding {
    pull: PullId,
    token: u64,
    deadline: Instant,
}

#[derive(Default)]
struct Table {
    by_lane: HashMap<(String, String), Outstanding>,
    by_token: HashMap<u64, (String, String)>,
    next_token: u64,
}

impl Table {
    fn remove_lane(&mut self, key: &(String, String)) -> Option<Outstanding> {
        let o = self.by_lane.remove(key)?;
        self.by_token.remove(&o.token);
        Some(o)
    }
}

/// Issues pulls; events arrive on the receiver returned by [`Puller::start`].
#[derive(Clone)]
pub struct Puller {
    client: async_nats::Client,
    inbox: String,
    table: Arc<Mutex<Table>>,
}

impl std::fmt::Debug for Puller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Puller")
            .field("inbox", &self.inbox)
            .finish()
    }
}

impl Puller {
    /// Subscribes the pull inbox and starts routing answers. The task ends when the receiver
    /// is dropped.
    pub async fn start(
        client: async_nats::Client,
    ) -> Result<(Puller, mpsc::Receiver<PullEvent>), BusError> {
        let inbox = client.new_inbox();
        let mut sub = client
            .subscribe(format!("{inbox}.*"))
            .await
            .map_err(|e| BusError::nats("subscribe pull inbox", e))?;
        let (tx, rx) = mpsc::channel(1024);
        let table = Arc::new(Mutex::new(Table::default()));
        let puller = Puller {
            client: client.clone(),
            inbox: inbox.clone(),
            table: table.clone(),
        };
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                let events = tokio::select! {
                    m = sub.next() => match m {
                        Some(m) => route(&client, &inbox, &table, m),
                        None => break,
                    },
                    _ = tick.tick() => expire(&table),
                };
                for ev in events {
                    if tx.send(ev).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok((puller, rx))
    }

    /// Issues one pull. Refused when a pull on that lane is already outstanding.
    pub async fn issue(&self, spec: &PullSpec) -> Result<(), BusError> {
        let stream = shard_stream(&spec.shard);
        let consumer = shard_consumer(&spec.shard, spec.lane);
        let token = {
            let mut t = self.table.lock().expect("puller table lock");
            let key = (stream.clone(), consumer.clone());
            if t.by_lane.contains_key(&key) {
                return Err(BusError::Exists {
                    key: format!("pull on {consumer}"),
                });
            }
            t.next_token += 1;
            let token = t.next_token;
            let deadline = Instant::now() + spec.expiry + LOCAL_GRACE;
            t.by_lane.insert(
                key.clone(),
                Outstanding {
                    pull: spec.pull,
                    token,
                    deadline,
                },
            );
            t.by_token.insert(token, key);
            token
        };
        let expires_ns = u64::try_from(spec.expiry.as_nanos()).unwrap_or(u64::MAX);
        let body = serde_json::json!({
            "batch": 1,
            "expires": expires_ns,
            "group": PRIORITY_GROUP,
            "priority": spec.priority,
        });
        let sent = self
            .client
            .publish_with_reply(
                pull_request_subject(&stream, &consumer),
                format!("{}.{token}", self.inbox),
                body.to_string().into(),
            )
            .await;
        if let Err(e) = sent {
            let mut t = self.table.lock().expect("puller table lock");
            t.remove_lane(&(stream, consumer.clone()));
            return Err(BusError::nats(format!("pull {consumer}"), e));
        }
        tracing::trace!(
            consumer,
            priority = spec.priority,
            expiry_ms = duration_ms(spec.expiry),
            "pull issued"
        );
        Ok(())
    }

    /// Number of pulls outstanding.
    pub fn outstanding(&self) -> usize {
        self.table.lock().expect("puller table lock").by_lane.len()
    }
}

fn route(
    client: &async_nats::Client,
    inbox: &str,
    table: &Mutex<Table>,
    m: async_nats::Message,
) -> Vec<PullEvent> {
    let mut t = table.lock().expect("puller table lock");
    if let Some(status) = m.status {
        let code = status.as_u16();
        if code == 100 {
            return Vec::new(); // idle heartbeat
        }
        let token = m
            .subject
            .as_str()
            .strip_prefix(inbox)
            .and_then(|s| s.strip_prefix('.'))
            .and_then(|s| s.parse::<u64>().ok());
        let Some(key) = token.and_then(|tok| t.by_token.get(&tok).cloned()) else {
            return Vec::new();
        };
        let Some(o) = t.remove_lane(&key) else {
            return Vec::new();
        };
        let why = if code == 408 {
            PullEnd::Expired
        } else {
            PullEnd::Refused {
                code,
                description: m.description.clone().unwrap_or_default(),
            }
        };
        return vec![PullEvent::Ended { pull: o.pull, why }];
    }
    let Some(reply) = m.reply.as_ref().map(|r| r.to_string()) else {
        return Vec::new();
    };
    let Some((stream, consumer, delivered)) = parse_ack(&reply) else {
        return Vec::new();
    };
    let pull = t
        .remove_lane(&(stream.clone(), consumer.clone()))
        .map(|o| o.pull);
    vec![PullEvent::Delivered {
        pull,
        delivery: Box::new(Delivery {
            client: client.clone(),
            reply,
            subject: m.subject.to_string(),
            payload: m.payload,
            stream,
            consumer,
            delivered,
        }),
    }]
}

fn expire(table: &Mutex<Table>) -> Vec<PullEvent> {
    let now = Instant::now();
    let mut t = table.lock().expect("puller table lock");
    let overdue: Vec<(String, String)> = t
        .by_lane
        .iter()
        .filter(|(_, o)| o.deadline <= now)
        .map(|(k, _)| k.clone())
        .collect();
    overdue
        .into_iter()
        .filter_map(|k| t.remove_lane(&k))
        .map(|o| PullEvent::Ended {
            pull: o.pull,
            why: PullEnd::Lost,
        })
        .collect()
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
