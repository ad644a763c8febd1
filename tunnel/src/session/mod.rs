//! One agent stream as either end runs it: the engine the server and the agent share.
//!
//! A [`Session`] takes the packets its peer sends (any stream of them: Spoke's HTTP/2 driver hands them over) and
//! gives back what to send in its [`Outbound`] queues. It owns the connection table, the
//! pending dials, the receive loop and the dispatch of every packet both ends handle alike
//! (DATA, the close of a connection, DIAL_CLS, credit), the teardown when the stream ends,
//! and the load figure the server routes by. What differs is an [`End`]: the server's end
//! ([`ServerEnd`]) sends dials and hears their answers and DRAIN; the agent's end
//! ([`AgentEnd`]) serves dials to its endpoints.
mod agent_end;
mod server_end;
mod stream_end;

pub use agent_end::{AgentEnd, DialTicket, EndpointDialer};
pub use server_end::{DialOutcome, PendingDial, ServerEnd};
pub use stream_end::{OnEnd, SessionEnd};

use crate::conns::{new_conn, ConnParts, ConnTable, Delivery, FlowConfig};
use crate::metrics::{count, ReasonLabels, RelayMetrics, SegmentPackets, StreamMetrics};
use crate::outbound::Outbound;
use crate::packet;
use crate::relay::Relay;
use futures::{Stream, StreamExt};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use spoke_proto::packet::Payload;
use spoke_proto::{Packet, PacketType};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// Which part an end plays in every connection of its stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The server: it dials, closes with CLOSE_REQ and hears CLOSE_RSP.
    Dialer,
    /// The agent: it serves dials to endpoints, answers CLOSE_REQ with CLOSE_RSP.
    Endpoint,
}

impl Side {
    /// What the other end is, for logs.
    pub fn peer(self) -> &'static str {
        match self {
            Side::Dialer => "agent",
            Side::Endpoint => "server",
        }
    }

    /// What this side sends when its local end closes a connection first.
    pub fn local_close(self, id: i64) -> Packet {
        match self {
            Side::Dialer => packet::close_req(id),
            Side::Endpoint => packet::close_rsp(id, ""),
        }
    }

    /// The answer to DATA for a connection this side does not know.
    fn unknown_data(self, id: i64) -> Packet {
        match self {
            Side::Dialer => packet::close_req(id),
            Side::Endpoint => packet::close_rsp(id, "unrecognized connectID"),
        }
    }

    /// What the peer gets when it sent past a connection's buffer and the connection closed.
    fn overflow(self, id: i64) -> Packet {
        match self {
            Side::Dialer => packet::close_req(id),
            Side::Endpoint => packet::close_rsp(id, "receive buffer overflow"),
        }
    }
}

/// Why a pending dial ended without an answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cancelled {
    /// The peer sent DIAL_CLS.
    ByPeer,
    /// The agent stream ended.
    StreamGone,
}

/// One end of an agent stream: the packets and dial bookkeeping only it has.
pub trait End: Send + Sync + Sized + 'static {
    /// What the session keeps for each pending dial.
    type Pending: Send + 'static;
    const SIDE: Side;
    /// Packets only this end handles. Hands the packet back if it is not one of them.
    fn handle(session: &Arc<Session<Self>>, p: Packet) -> Option<Packet>;
    /// A pending dial ended without an answer.
    fn dial_cancelled(session: &Session<Self>, pending: Self::Pending, why: Cancelled);
}

/// What a session counts, under its process's names.
#[derive(Clone, Debug)]
pub struct SessionMetrics {
    pub stream: StreamMetrics,
    /// Upstream's segment label for received packets (server `from_agent`, agent `to_agent`).
    pub received: &'static str,
    pub relay: RelayMetrics,
    /// Packets refused as bad input, by reason.
    pub rejected: Family<ReasonLabels, Counter>,
}

/// How busy an agent stream is: what least-loaded routing compares.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Load {
    /// Established connections plus dials waiting for an answer.
    pub connections: usize,
    /// Bytes received and not yet written to local ends.
    pub buffered_bytes: u64,
}

/// One agent stream, from one end.
pub struct Session<E: End> {
    pub end: E,
    pub outbound: Outbound,
    pub conns: Arc<ConnTable>,
    pending: Mutex<HashMap<i64, E::Pending>>,
    pub flow: FlowConfig,
    pub metrics: SessionMetrics,
    /// `metrics.stream`'s counters of the packets received (segment `metrics.received`).
    received: SegmentPackets,
    /// Bytes buffered in this stream's connections (part of the process's gauge).
    buffered: Gauge,
}

impl<E: End> Session<E> {
    pub fn new(end: E, outbound: Outbound, flow: FlowConfig, metrics: SessionMetrics) -> Arc<Self> {
        Arc::new(Session {
            end,
            outbound,
            conns: Arc::new(ConnTable::default()),
            pending: Mutex::new(HashMap::new()),
            flow,
            received: metrics.stream.segment(metrics.received),
            metrics,
            buffered: Gauge::default(),
        })
    }

    fn pending(&self) -> MutexGuard<'_, HashMap<i64, E::Pending>> {
        // A panic while holding this lock would be a bug elsewhere; the map stays usable.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a dial; false if its id is already pending.
    pub fn add_pending(&self, random: i64, p: E::Pending) -> bool {
        let mut pending = self.pending();
        if pending.contains_key(&random) {
            return false;
        }
        pending.insert(random, p);
        true
    }

    pub fn take_pending(&self, random: i64) -> Option<E::Pending> {
        self.pending().remove(&random)
    }

    /// Takes the pending dial `random` only if `is_it` recognizes it (not a later dial that
    /// reused the id).
    pub fn take_pending_if(
        &self,
        random: i64,
        is_it: impl FnOnce(&E::Pending) -> bool,
    ) -> Option<E::Pending> {
        let mut pending = self.pending();
        if pending.get(&random).is_some_and(is_it) {
            pending.remove(&random)
        } else {
            None
        }
    }

    pub fn load(&self) -> Load {
        Load {
            connections: self.conns.len() + self.pending().len(),
            buffered_bytes: self.buffered.get().max(0) as u64,
        }
    }

    pub fn reject(&self, reason: &'static str) {
        count(&self.metrics.rejected, reason);
    }

    /// A new connection's two halves, its buffered bytes counted for the process and here.
    pub fn new_conn(&self) -> (crate::conns::ConnEntry, ConnParts) {
        let totals = [
            self.metrics.relay.buffered_bytes.clone(),
            self.buffered.clone(),
        ];
        new_conn(self.flow, totals)
    }

    /// The relay of connection `id`, for its local end to run.
    pub fn relay(&self, id: i64, parts: ConnParts) -> Relay {
        Relay {
            id,
            table: self.conns.clone(),
            outbound: self.outbound.clone(),
            parts,
            flow: self.flow,
            local_close: E::SIDE.local_close(id),
            metrics: self.metrics.relay.clone(),
        }
    }

    /// Reads the peer's packets until the stream ends; returns why it ended. The caller
    /// then takes the stream out of wherever it is listed and calls [`Session::close`].
    pub async fn run<S>(self: &Arc<Self>, mut inbound: S) -> String
    where
        S: Stream<Item = Result<Packet, tonic::Status>> + Unpin,
    {
        loop {
            let next = tokio::select! {
                p = inbound.next() => p,
                _ = self.outbound.closed.cancelled() => return "stream failed".to_string(),
            };
            match next {
                Some(Ok(p)) => self.receive(p),
                None => return "peer closed the stream".to_string(),
                Some(Err(status)) => {
                    let m = &self.metrics;
                    m.stream.error(m.received, status.code(), None);
                    return format!("stream error: {:?}: {}", status.code(), status.message());
                }
            }
        }
    }

    /// The stream is gone: every connection on it closes and every pending dial ends.
    /// Returns how many of each there were.
    pub fn close(&self) -> (usize, usize) {
        self.outbound.closed.cancel();
        let conns = self.conns.close_all();
        let dials: Vec<_> = self.pending().drain().map(|(_, p)| p).collect();
        let n = dials.len();
        for p in dials {
            E::dial_cancelled(self, p, Cancelled::StreamGone);
        }
        (conns, n)
    }

    /// A packet from the peer, counted and dispatched.
    pub fn receive(self: &Arc<Self>, p: Packet) {
        self.received.inc(p.r#type);
        self.dispatch(p);
    }

    /// Handles one packet from the peer. Never waits: replies go to the control queue.
    pub fn dispatch(self: &Arc<Self>, p: Packet) {
        let kind = p.r#type;
        let out = &self.outbound;
        match (PacketType::try_from(kind), p.payload) {
            (Ok(PacketType::Data), Some(Payload::Data(d))) => {
                let id = d.connect_id;
                match self.conns.deliver(id, d.data, Some(E::SIDE.overflow(id))) {
                    Delivery::Queued => {}
                    Delivery::Unknown => {
                        self.reject("unknown_connection");
                        tracing::debug!(connection_id = id, "DATA for an unknown connection");
                        let _ = out.control(E::SIDE.unknown_data(id));
                    }
                    Delivery::Overflow => {
                        self.metrics.relay.closed("buffer_overflow");
                        tracing::warn!(
                            connection_id = id,
                            "peer sent past the connection's buffer; closed it"
                        );
                    }
                }
            }
            (Ok(PacketType::CloseReq), Some(Payload::CloseRequest(c)))
                if E::SIDE == Side::Endpoint =>
            {
                let id = c.connect_id;
                if !self.conns.close(id, Some(packet::close_rsp(id, ""))) {
                    let _ = out.control(packet::close_rsp(id, "Unknown connectID"));
                }
            }
            (Ok(PacketType::CloseRsp), Some(Payload::CloseResponse(c)))
                if E::SIDE == Side::Dialer =>
            {
                if !self.conns.close(c.connect_id, None) {
                    tracing::debug!(
                        connection_id = c.connect_id,
                        "CLOSE_RSP for a connection already closed"
                    );
                }
            }
            (Ok(PacketType::DialCls), Some(Payload::CloseDial(c))) => {
                if let Some(pending) = self.take_pending(c.random) {
                    let by = E::SIDE.peer();
                    tracing::debug!(random = c.random, "dial cancelled by {by}");
                    E::dial_cancelled(self, pending, Cancelled::ByPeer);
                }
            }
            (Ok(PacketType::SpokeCredit), Some(Payload::Credit(c))) if c.blocked => {
                if let Some(extra) = self.conns.peer_blocked(c.connect_id) {
                    let _ = out.control(packet::credit(c.connect_id, extra as i64));
                }
            }
            (Ok(PacketType::SpokeCredit), Some(Payload::Credit(c))) => {
                self.conns.grant(c.connect_id, c.bytes);
            }
            (_, payload) => {
                let p = Packet {
                    r#type: kind,
                    payload,
                };
                if let Some(p) = E::handle(self, p) {
                    self.reject("unexpected_packet");
                    tracing::debug!(
                        kind = packet::type_name(p.r#type),
                        "ignoring an unexpected packet"
                    );
                }
            }
        }
    }
}
