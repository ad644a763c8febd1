//! The server's end of an agent stream: it sends dials for its frontends, matches the
//! agent's answers to them, and hears DRAIN.
use super::{Cancelled, End, Session, Side};
use crate::conns::ConnParts;
use crate::identifiers::AgentIdentifiers;
use crate::metrics::{count, ReasonLabels};
use crate::packet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use spoke_proto::packet::Payload;
use spoke_proto::{Packet, PacketType};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::oneshot;

/// What a frontend learns about its dial.
#[derive(Debug)]
pub enum DialOutcome {
    Established { connect_id: i64, parts: ConnParts },
    Failed(String),
}

/// A dial sent to the agent and not answered yet.
#[derive(Debug)]
pub struct PendingDial {
    reply: oneshot::Sender<DialOutcome>,
    started: Instant,
}

/// The server's end of one agent stream.
#[derive(Debug)]
pub struct ServerEnd {
    /// Tells this stream apart from the agent's other (and later) streams.
    pub stream_id: u64,
    pub agent_id: String,
    pub identifiers: AgentIdentifiers,
    draining: AtomicBool,
    /// Upstream's `dial_failure_count{reason}`.
    pub dial_failures: Family<ReasonLabels, Counter>,
    /// Upstream's `dial_duration_seconds`: DIAL_REQ to a successful DIAL_RSP.
    pub dial_duration: Histogram,
}

impl ServerEnd {
    pub fn new(
        agent_id: String,
        identifiers: AgentIdentifiers,
        dial_failures: Family<ReasonLabels, Counter>,
        dial_duration: Histogram,
    ) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        ServerEnd {
            stream_id: NEXT.fetch_add(1, Ordering::Relaxed),
            agent_id,
            identifiers,
            draining: AtomicBool::new(false),
            dial_failures,
            dial_duration,
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    fn dial_failure(&self, reason: &'static str) {
        count(&self.dial_failures, reason);
    }
}

impl Session<ServerEnd> {
    /// Sends DIAL_REQ for `address`; the agent's answer arrives on the receiver. `None` if
    /// the id is already pending or the stream is gone.
    pub fn send_dial(
        &self,
        random: i64,
        address: String,
    ) -> Option<oneshot::Receiver<DialOutcome>> {
        let (reply, rx) = oneshot::channel();
        let pending = PendingDial {
            reply,
            started: Instant::now(),
        };
        if !self.add_pending(random, pending) {
            return None;
        }
        if self
            .outbound
            .control(packet::dial_req(address, random))
            .is_err()
        {
            self.take_pending(random);
            return None;
        }
        Some(rx)
    }

    /// A frontend stopped waiting for its dial (upstream's `frontend_close`). Not answered
    /// yet: it is forgotten and the agent told to stop (DIAL_CLS). Answered but unread (the
    /// answer and the frontend's hang-up crossed): the connection it established is closed.
    pub fn abandon_dial(&self, random: i64, mut answer: oneshot::Receiver<DialOutcome>) {
        // From here on an answer finds nobody waiting, and `dial_answered` closes it.
        answer.close();
        if self.take_pending(random).is_some() {
            self.end.dial_failure("frontend_close");
            let _ = self.outbound.control(packet::dial_cls(random));
        } else if let Ok(DialOutcome::Established { connect_id, .. }) = answer.try_recv() {
            self.end.dial_failure("frontend_close");
            if self.conns.close(connect_id, None) {
                let _ = self.outbound.control(packet::close_req(connect_id));
            }
        }
    }

    fn dial_answered(&self, random: i64, connect_id: i64, error: String) {
        let out = &self.outbound;
        let Some(pending) = self.take_pending(random) else {
            self.end.dial_failure("unrecognized_response");
            tracing::debug!(
                random,
                connection_id = connect_id,
                "DIAL_RSP for no pending dial"
            );
            if connect_id != 0 {
                let _ = out.control(packet::close_req(connect_id));
            }
            return;
        };
        if !error.is_empty() {
            self.end.dial_failure("error_response");
            let _ = pending.reply.send(DialOutcome::Failed(error));
            return;
        }
        let (entry, parts) = self.new_conn();
        if connect_id == 0 || !self.conns.insert(connect_id, entry) {
            self.reject("bad_connect_id");
            let _ = pending.reply.send(DialOutcome::Failed(format!(
                "agent answered with unusable connectID {connect_id}"
            )));
            return;
        }
        let established = DialOutcome::Established { connect_id, parts };
        if pending.reply.send(established).is_err() {
            // The frontend gave up in the meantime.
            self.conns.close(connect_id, None);
            self.end.dial_failure("frontend_close");
            let _ = out.control(packet::close_req(connect_id));
            return;
        }
        self.end
            .dial_duration
            .observe(pending.started.elapsed().as_secs_f64());
    }
}

impl End for ServerEnd {
    type Pending = PendingDial;
    const SIDE: Side = Side::Dialer;

    fn handle(session: &Arc<Session<Self>>, p: Packet) -> Option<Packet> {
        match (PacketType::try_from(p.r#type), p.payload) {
            (Ok(PacketType::DialRsp), Some(Payload::DialResponse(r))) => {
                session.dial_answered(r.random, r.connect_id, r.error);
            }
            (Ok(PacketType::Drain), _) => {
                tracing::info!(agent_id = %session.end.agent_id, "agent is draining");
                session.end.draining.store(true, Ordering::Relaxed);
            }
            (_, payload) => {
                return Some(Packet {
                    r#type: p.r#type,
                    payload,
                })
            }
        }
        None
    }

    fn dial_cancelled(session: &Session<Self>, pending: PendingDial, why: Cancelled) {
        session.end.dial_failure("backend_close");
        let text = match why {
            Cancelled::ByPeer => "dial closed",
            Cancelled::StreamGone => "Backend context error",
        };
        let _ = pending.reply.send(DialOutcome::Failed(text.into()));
    }
}
