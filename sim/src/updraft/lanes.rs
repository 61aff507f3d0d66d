//! The shard lanes as JetStream serves them: waiting messages go to the best waiting pull
//! (priority, then arrival; a pull that still waits for more goes to the back of its priority
//! after each message, as nats-server serves them),
//! expired pulls are re-issued at the back of their priority, and a delivered hint is
//! claimed or handed back (nak'd: due again after the nak delay, its node stepping aside).

use std::time::Duration;

use placement::Timestamp;
use placement::ledger::PullId;
use placement::pull::make_room;
use placement::step_aside::step_aside_for;

use super::{Ev, Msg, ReqState, Sim, WaitingPull, rid};
use crate::Millis;

impl Sim<'_> {
    /// Hands waiting messages of `lane` to its best waiting pulls.
    pub(super) fn serve(&mut self, lane: u32, now: Millis) {
        let expiry = u64::try_from(self.cfg.pull.expiry.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        loop {
            // purge hints of requests that moved on (the dispatcher purges them too)
            let lq = &mut self.lanes[lane as usize];
            let Some(msg) = lq.msgs.front().copied() else {
                return;
            };
            let live = self.reqs.get(&msg.req).is_some_and(|r| {
                r.attempt == msg.attempt
                    && matches!(r.state, ReqState::Waiting | ReqState::Claiming(_))
            });
            if !live {
                lq.msgs.pop_front();
                continue;
            }
            // the best waiting pull: priority, then arrival (an expired pull was re-issued)
            let mut chosen = None;
            'buckets: for b in 0..10 {
                while let Some(w) = self.lanes[lane as usize].buckets[b].front().copied() {
                    let alive = self.nodes[w.node as usize]
                        .pulls
                        .get(&w.pull)
                        .is_some_and(|(l, _, _)| *l == lane);
                    let lq = &mut self.lanes[lane as usize];
                    if !alive {
                        lq.buckets[b].pop_front();
                        continue;
                    }
                    if now.saturating_sub(w.issued) >= expiry {
                        lq.buckets[b].pop_front();
                        let reissued = w.issued + (now - w.issued) / expiry * expiry;
                        lq.buckets[b].push_back(WaitingPull {
                            issued: reissued,
                            ..w
                        });
                        self.rec.count("pulls_reissued", 1);
                        continue;
                    }
                    chosen = Some((b, w));
                    break 'buckets;
                }
            }
            let Some((b, w)) = chosen else { return };
            // a pull that still waits for more goes to the back of its priority (the server
            // serves the pulls of one priority in turns: bus/tests/nats.rs)
            let node = &mut self.nodes[w.node as usize];
            let lq = &mut self.lanes[lane as usize];
            lq.msgs.pop_front();
            match node.pulls.get_mut(&w.pull) {
                Some((_, _, left)) if *left > 1 => {
                    *left -= 1;
                    if let Some(w) = lq.buckets[b].pop_front() {
                        lq.buckets[b].push_back(w);
                    }
                }
                _ => {
                    node.pulls.remove(&w.pull);
                    lq.buckets[b].pop_front();
                    lq.waiting -= 1;
                }
            }
            self.rec.count("deliveries", 1);
            let at = now + self.cfg.fetch.draw(&mut self.rng);
            self.q.push(
                at,
                Ev::Deliver {
                    node: w.node,
                    pull: w.pull,
                    msg,
                    lane,
                },
            );
        }
    }

    pub(super) fn deliver(&mut self, node: u32, pull: u64, msg: Msg, lane: u32, now: Millis) {
        let back = |s: &mut Self, delay: Millis, why: &'static str| {
            s.rec.count(why, 1);
            s.q.push(now + delay, Ev::Redeliver { lane, msg });
        };
        if !self.nodes[node as usize].alive {
            return back(self, self.cfg.ack_wait, "redelivered_after_death");
        }
        let state = self
            .reqs
            .get(&msg.req)
            .filter(|r| r.attempt == msg.attempt)
            .map(|r| r.state);
        let n = &mut self.nodes[node as usize];
        match state {
            Some(ReqState::Waiting | ReqState::Claiming(_)) => {}
            _ => {
                // stale: the record moved on
                n.ledger.return_unit(PullId(pull));
                self.rec.count("stale_deliveries", 1);
                return self.replan(node, now);
            }
        }
        let r = self.reqs.get(&msg.req).expect("checked above");
        if r.excluded.contains(&node) {
            n.ledger.return_unit(PullId(pull));
            self.step_back(node, pull, lane, now);
            back(self, self.cfg.nak_delay, "naks");
            return self.replan(node, now);
        }
        let cover = n.ledger.is_cover(PullId(pull));
        if cover {
            // a cover pull holds no credit: make room from credited pulls, or hand it back
            // at once (`placement::pull::cover`)
            self.rec.count("cover_deliveries", 1);
            let held: Vec<(PullId, u8, u32)> = n
                .pulls
                .iter()
                .map(|(id, (_, prio, left))| (PullId(*id), *prio, *left))
                .collect();
            if let Some(cancel) = make_room(&n.ledger, &held, &r.res) {
                if !cancel.is_empty() {
                    self.rec.count("cover_cancels", cancel.len() as u64);
                }
                for id in cancel {
                    if let Some((l, _, left)) = n.pulls.remove(&id.0) {
                        n.ledger.return_units(id, left);
                        self.lanes[l as usize].waiting -= 1;
                    }
                }
            }
        }
        let n = &mut self.nodes[node as usize];
        if n.ledger
            .reserve_from_pull(PullId(pull), &rid(msg.req), &r.res, None)
            .is_err()
        {
            if cover {
                back(self, 0, "cover_hand_backs");
                return self.replan(node, now);
            }
            self.step_back(node, pull, lane, now);
            back(self, self.cfg.nak_delay, "naks");
            return self.replan(node, now);
        }
        if let Some(r) = self.reqs.get_mut(&msg.req)
            && r.state == ReqState::Waiting
        {
            r.state = ReqState::Claiming(node);
        }
        let at = now + self.cfg.cas.draw(&mut self.rng);
        self.q.push(at, Ev::ClaimDone { node, req: msg.req });
        self.replan(node, now);
    }

    /// A node that hands a message back cancels the rest of the pull that brought it and
    /// pulls that lane last for a while (as the agent does, `node-agent/src/claim.rs`): the
    /// best-placed node's pull, or its new one at its usual priority, would be first in line
    /// again (alone in its bucket, it is served every time); it would be handed the message
    /// again at once.
    fn step_back(&mut self, node: u32, pull: u64, lane: u32, now: Millis) {
        let n = &mut self.nodes[node as usize];
        if let Some((l, _, left)) = n.pulls.remove(&pull) {
            n.ledger.return_units(PullId(pull), left);
            self.lanes[l as usize].waiting -= 1;
        }
        let window = step_aside_for(Duration::from_millis(self.cfg.nak_delay));
        let until = now + u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
        n.aside.note(
            &self.shards[(lane / 2) as usize],
            Self::lane_kind(lane),
            Timestamp(until),
        );
        self.q.push(until, Ev::Replan { node });
    }
}
