//! The agent's end of an agent stream: it serves the server's dials by opening endpoints.
use super::{Cancelled, End, Session, Side};
use crate::conns::ConnParts;
use crate::packet;
use spoke_proto::packet::Payload;
use spoke_proto::{DialRequest, Packet, PacketType};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// One dial the agent was asked for. The server's `random` names it on the wire, but a
/// server may reuse a `random` once a dial is cancelled, so the ticket also carries a serial
/// of its own: a late result of the cancelled dial never answers the new one.
#[derive(Clone, Debug)]
pub struct DialTicket {
    pub random: i64,
    serial: u64,
    /// Fires when the server cancels the dial (DIAL_CLS) or the stream ends.
    pub cancel: CancellationToken,
}

/// How the agent opens endpoints: the part of serving a dial that is the agent's own.
pub trait EndpointDialer: Send + Sync + 'static {
    /// Why a new dial must be refused now (a limit), if it must; the text is its answer.
    fn refuse(&self) -> Option<String>;
    /// Starts dialing `req.address` in the background. It ends with
    /// [`Session::dial_succeeded`] or [`Session::dial_failed`], or stops when the ticket's
    /// `cancel` fires.
    fn start(
        self: Arc<Self>,
        session: Arc<Session<AgentEnd>>,
        req: DialRequest,
        ticket: DialTicket,
    );
}

/// The agent's end of one agent stream.
pub struct AgentEnd {
    pub server_id: String,
    dialer: Arc<dyn EndpointDialer>,
    /// connectIDs, per stream from 1, as upstream's agent numbers them.
    next_id: AtomicI64,
    /// Serials of dial tickets.
    next_serial: AtomicU64,
}

impl AgentEnd {
    pub fn new(server_id: String, dialer: Arc<dyn EndpointDialer>) -> Self {
        AgentEnd {
            server_id,
            dialer,
            next_id: AtomicI64::new(1),
            next_serial: AtomicU64::new(1),
        }
    }
}

impl Session<AgentEnd> {
    fn serve_dial(self: &Arc<Self>, req: DialRequest) {
        let random = req.random;
        let refusal = if req.protocol != "tcp" {
            Some(format!("protocol {:?} is not supported", req.protocol))
        } else {
            self.end.dialer.refuse()
        };
        if let Some(why) = refusal {
            let _ = self.outbound.control(packet::dial_err(random, why));
            return;
        }
        let ticket = DialTicket {
            random,
            serial: self.end.next_serial.fetch_add(1, Ordering::Relaxed),
            cancel: CancellationToken::new(),
        };
        if !self.add_pending(random, ticket.clone()) {
            self.reject("duplicate_dial");
            let _ = self
                .outbound
                .control(packet::dial_err(random, "duplicate dial id".into()));
            return;
        }
        self.end.dialer.clone().start(self.clone(), req, ticket);
    }

    /// Takes the ticket's dial out of the pending table, if it is still this dial's.
    fn settle(&self, ticket: &DialTicket) -> bool {
        self.take_pending_if(ticket.random, |p| p.serial == ticket.serial)
            .is_some()
    }

    /// The endpoint of the ticket's dial is open: the connection is registered and DIAL_RSP
    /// sent. Returns its connectID and what its relay needs, or `None` if the dial was
    /// cancelled meanwhile or the stream is gone (then drop the endpoint).
    pub fn dial_succeeded(&self, ticket: &DialTicket) -> Option<(i64, ConnParts)> {
        if !self.settle(ticket) {
            return None;
        }
        let random = ticket.random;
        let id = self.end.next_id.fetch_add(1, Ordering::Relaxed);
        let (entry, parts) = self.new_conn();
        self.conns.insert(id, entry);
        if self.outbound.control(packet::dial_ok(random, id)).is_err() {
            self.conns.close(id, None);
            return None;
        }
        Some((id, parts))
    }

    /// The ticket's dial failed with Go's error text (unless it was cancelled meanwhile).
    pub fn dial_failed(&self, ticket: &DialTicket, error: String) {
        if self.settle(ticket) {
            let _ = self
                .outbound
                .control(packet::dial_err(ticket.random, error));
        }
    }
}

impl End for AgentEnd {
    type Pending = DialTicket;
    const SIDE: Side = Side::Endpoint;

    fn handle(session: &Arc<Session<Self>>, p: Packet) -> Option<Packet> {
        match (PacketType::try_from(p.r#type), p.payload) {
            (Ok(PacketType::DialReq), Some(Payload::DialRequest(req))) => {
                session.serve_dial(req);
                None
            }
            (_, payload) => Some(Packet {
                r#type: p.r#type,
                payload,
            }),
        }
    }

    /// Upstream's agent ignores DIAL_CLS; we stop the dial so nothing is left behind.
    fn dial_cancelled(_: &Session<Self>, ticket: DialTicket, _: Cancelled) {
        ticket.cancel.cancel();
    }
}
