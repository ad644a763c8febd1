//! A hostile peer on one tunnel stream, end to end through the shared data-path pieces.
//!
//! The packet dispatch of each side lives in a binary (`server/src/agent_service.rs`
//! `handle_packet`, `agent/src/server_stream.rs` `ServerStream::handle`); the models below
//! follow them statement by statement over the real `ConnTable`, `Inbox`, `SendWindow`,
//! `Outbound` and `packet` helpers, interleaved with what the local side does meanwhile
//! (frontends dialling and giving up, relays draining, reading, closing). TODO-lead: once
//! the dispatch functions are reachable from a library target, call them instead.
//!
//! Input: one config byte, then operations. Operation 0 is a wire packet (two length
//! bytes, then a protobuf `Packet`; bytes that do not decode end the stream like a gRPC
//! decode error does); the others are local events. The end of the input ends the stream.
use super::{Checks, Input};
use bytes::Bytes;
use futures::Stream;
use spoke_proto::packet::Payload;
use spoke_proto::{Packet, PacketType};
use spoke_tunnel::conns::{
    new_conn, ConnEntry, ConnParts, ConnTable, Delivery, FlowConfig, PeerClose,
};
use spoke_tunnel::metrics::RelayMetrics;
use spoke_tunnel::outbound::{outbound, Outbound, OutboundRx};
use spoke_tunnel::packet;
use spoke_tunnel::relay::CHUNK;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use tokio::sync::oneshot;
use tonic_prost::prost::Message;

/// Most packets the peer gets to send in one run: keeps an execution fast.
const MAX_OPS: usize = 4096;

fn poll_once<F: Future>(f: F) -> Option<F::Output> {
    let mut cx = Context::from_waker(Waker::noop());
    match pin!(f).poll(&mut cx) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}

/// A wire packet as received: decoded, with the packet helpers' views checked.
fn decode(bytes: &[u8]) -> Option<Packet> {
    let p = Packet::decode(bytes).ok()?;
    // Re-encoding is canonical and decodes to the same packet.
    let again = Packet::decode(p.encode_to_vec().as_slice()).expect("re-encoded packet decodes");
    assert_eq!(again, p);
    let name = packet::type_name(p.r#type);
    assert_eq!(name == "Unknown", PacketType::try_from(p.r#type).is_err());
    let want = match &p.payload {
        Some(Payload::Data(d)) => d.data.len(),
        _ => 0,
    };
    assert_eq!(packet::payload_len(&p), want);
    Some(p)
}

/// What the model knows about one connection's inbox.
#[derive(Default)]
struct Stats {
    /// Chunks queued and not yet taken by the write loop (empty DATA is not queued).
    queued: usize,
    /// Largest chunk ever queued (an oversize chunk may enter an empty inbox).
    largest: usize,
}

impl Stats {
    fn check(&self, cap: usize, _checks: Checks) {
        // Every queued chunk holds a byte; past the cap the inbox refuses more.
        assert!(
            self.queued <= cap + 1,
            "{} chunks queued, cap {cap}",
            self.queued
        );
    }
}

/// One connection's relay, as `Relay::run` holds it, plus what the model knows about it.
struct RelayModel {
    parts: ConnParts,
    /// Per-connection metrics, so the buffered-bytes gauge is this inbox's fill level.
    metrics: RelayMetrics,
    stats: Stats,
    /// A chunk taken from the inbox whose write has not finished.
    writing: Option<usize>,
    credit_back: Option<spoke_tunnel::flow::CreditReturn>,
    /// Send credit per the model: initial + positive grants - spent.
    credit: i128,
    limited: bool,
}

impl RelayModel {
    fn new(parts: ConnParts, metrics: RelayMetrics, flow: FlowConfig, stats: Stats) -> Self {
        let limited = parts.window.is_limited();
        RelayModel {
            parts,
            metrics,
            stats,
            writing: None,
            credit_back: flow
                .credits()
                .then(|| spoke_tunnel::flow::CreditReturn::new(flow.buffer_cap)),
            credit: flow.peer_window.unwrap_or(0) as i128,
            limited,
        }
    }

    fn check(&self, cap: usize, checks: Checks) {
        let buffered = self.metrics.buffered_bytes.get();
        assert!(buffered >= 0, "negative buffered bytes {buffered}");
        let buffered = buffered as usize;
        assert!(
            buffered <= cap.max(self.stats.largest),
            "inbox holds {buffered} bytes, cap {cap}, largest chunk {}",
            self.stats.largest
        );
        self.stats.check(cap, checks);
        if self.limited {
            assert_eq!(
                self.parts.window.exhausted(),
                self.credit <= 0,
                "send window disagrees with credit {}",
                self.credit
            );
        } else {
            assert!(!self.parts.window.exhausted(), "unlimited window exhausted");
        }
    }

    /// The write loop takes up to `n` chunks and writes them.
    fn drain(&mut self, n: u8, out: &Outbound, id: i64) {
        for _ in 0..n {
            if let Some(len) = self.writing.take() {
                self.parts.inbox.consumed(len);
                if let Some(grant) = self.credit_back.as_mut().and_then(|c| c.drained(len)) {
                    assert!(grant > 0);
                    let _ = out.control(packet::credit(id, grant as i64));
                }
            }
            match self.parts.inbox.try_recv() {
                Some(chunk) => {
                    assert!(self.stats.queued > 0, "inbox yielded a chunk never queued");
                    self.stats.queued -= 1;
                    assert!(!chunk.is_empty(), "empty chunk queued");
                    self.writing = Some(chunk.len());
                }
                None => {
                    assert_eq!(self.stats.queued, 0, "queued chunks vanished");
                    break;
                }
            }
        }
    }

    /// The read loop reads `want` bytes from the endpoint and sends them, if it may.
    fn read(&mut self, want: usize, out: &Outbound, id: i64) {
        let Some(max) = poll_once(self.parts.window.ready(CHUNK)) else {
            assert!(
                self.parts.window.exhausted(),
                "window not ready yet not exhausted"
            );
            return;
        };
        assert!(max > 0 && max <= CHUNK);
        let n = want.min(max);
        if n == 0 {
            return;
        }
        // `Outbound::data` waits while the stream is full; the model retries later.
        if let Some(Ok(())) = poll_once(out.data(packet::data(id, Bytes::from(vec![b'x'; n])))) {
            self.parts.window.spend(n);
            if self.limited {
                self.credit -= n as i128;
            }
        }
    }
}

/// The shared half of both sides: the stream's queues, table and relays.
struct Tunnel {
    out: Outbound,
    out_rx: OutboundRx,
    conns: Arc<ConnTable>,
    relays: BTreeMap<i64, RelayModel>,
    /// Connections in the table whose relay has not started yet (server: the frontend
    /// has not picked up its dial answer).
    pre: HashMap<i64, Stats>,
    flow: FlowConfig,
    checks: Checks,
    /// Connections ever established: the table can never hold more.
    established: usize,
}

impl Tunnel {
    fn new(cfg: u8, checks: Checks) -> Self {
        let (out, out_rx) = outbound(None);
        // Small caps so overflow, oversize chunks and credit batching all happen.
        let buffer_cap = 1 + usize::from(cfg & 0x1f) * 7;
        let peer_window = (cfg & 0x20 != 0).then_some(1 + usize::from(cfg >> 6) * 5);
        Tunnel {
            out,
            out_rx,
            conns: Arc::new(ConnTable::default()),
            relays: BTreeMap::new(),
            pre: HashMap::new(),
            flow: FlowConfig {
                buffer_cap,
                peer_window,
            },
            checks,
            established: 0,
        }
    }

    fn new_conn(&mut self) -> (ConnEntry, ConnParts, RelayMetrics) {
        let metrics = RelayMetrics::default();
        let (entry, parts) = new_conn(
            self.flow,
            [metrics.buffered_bytes.clone(), Default::default()],
        );
        (entry, parts, metrics)
    }

    /// `ConnTable::insert`, counted.
    fn insert(&mut self, id: i64, entry: ConnEntry) -> bool {
        let ok = self.conns.insert(id, entry);
        if ok {
            // A hostile peer may reuse the id of a connection it closed; the old relay
            // was told to close when its entry went and has finished by now.
            if let Some(old) = self.relays.remove(&id) {
                let mut closer = old.parts.closer;
                assert!(closer.try_recv().is_ok(), "entry {id} replaced while live");
            }
            self.established += 1;
            self.pre.insert(id, Stats::default());
        }
        ok
    }

    fn add_relay(&mut self, id: i64, parts: ConnParts, metrics: RelayMetrics) {
        let stats = self.pre.remove(&id).unwrap_or_default();
        let prev = self
            .relays
            .insert(id, RelayModel::new(parts, metrics, self.flow, stats));
        assert!(prev.is_none(), "two relays for connection {id}");
    }

    /// Bookkeeping after `ConnTable::deliver` queued a chunk for `id`.
    fn delivered(&mut self, id: i64, len: usize, result: &Delivery) {
        let stats = match self.relays.get_mut(&id) {
            Some(r) => Some(&mut r.stats),
            None => self.pre.get_mut(&id),
        };
        match result {
            Delivery::Queued => {
                if let (Some(st), true) = (stats, len > 0) {
                    st.queued += 1;
                    st.largest = st.largest.max(len);
                }
            }
            Delivery::Overflow => {
                assert!(
                    stats.is_some(),
                    "overflow on a connection never established"
                );
                assert!(
                    !self.conns.contains(id),
                    "overflowed connection still in table"
                );
            }
            Delivery::Unknown => assert!(!self.conns.contains(id), "known connection {id} unknown"),
        }
    }

    fn granted(&mut self, id: i64, bytes: i64, known: bool) {
        if let Some(r) = self.relays.get_mut(&id) {
            if known && r.limited && bytes > 0 {
                r.credit += bytes as i128;
            }
        }
    }

    fn pick(&self, k: u8) -> Option<i64> {
        if self.relays.is_empty() {
            return None;
        }
        self.relays
            .keys()
            .nth(usize::from(k) % self.relays.len())
            .copied()
    }

    /// A local relay event; `local_close` is what the relay sends when its endpoint ends.
    fn relay_event(&mut self, op: u8, input: &mut Input, local_close: impl Fn(i64) -> Packet) {
        let k = input.u8();
        let Some(id) = self.pick(k) else { return };
        match op {
            // Write loop drains.
            0 => {
                let n = input.u8();
                let out = self.out.clone();
                self.relays.get_mut(&id).unwrap().drain(n, &out, id);
            }
            // Read loop sends endpoint bytes.
            1 => {
                let want = usize::from(input.u16());
                let out = self.out.clone();
                self.relays.get_mut(&id).unwrap().read(want, &out, id);
            }
            // Endpoint ended: whoever removes the entry owns the close.
            2 => {
                let r = self.relays.remove(&id).unwrap();
                if self.conns.close(id, None) {
                    let _ = poll_once(self.out.data(local_close(id)));
                } else {
                    // The peer closed first: its reply is waiting for us.
                    let mut closer = r.parts.closer;
                    if let Ok(PeerClose { reply: Some(p) }) = closer.try_recv() {
                        let _ = poll_once(self.out.data(p));
                    }
                }
            }
            // Read loop notices a peer close.
            _ => {
                let r = self.relays.get_mut(&id).unwrap();
                match r.parts.closer.try_recv() {
                    Ok(PeerClose { reply }) => {
                        assert!(!self.conns.contains(id), "closed connection still in table");
                        if let Some(p) = reply {
                            let _ = poll_once(self.out.data(p));
                        }
                        self.relays.remove(&id);
                    }
                    Err(oneshot::error::TryRecvError::Empty) => {
                        assert!(self.conns.contains(id), "relay live but entry gone");
                    }
                    Err(oneshot::error::TryRecvError::Closed) => {
                        panic!("connection {id} dropped without a close")
                    }
                }
            }
        }
    }

    /// The peer reads up to `n` packets off the stream.
    fn peer_reads(&mut self, n: u8) -> Vec<Packet> {
        let mut got = Vec::new();
        let mut cx = Context::from_waker(Waker::noop());
        for _ in 0..n {
            match std::pin::Pin::new(&mut self.out_rx).poll_next(&mut cx) {
                Poll::Ready(Some(p)) => {
                    let bytes = p.encode_to_vec();
                    assert_eq!(decode(&bytes).as_ref(), Some(&p));
                    if let Some(Payload::Credit(c)) = &p.payload {
                        assert!(c.bytes > 0, "credit packet with {} bytes", c.bytes);
                    }
                    if let Some(Payload::Data(d)) = &p.payload {
                        assert!(d.data.len() <= CHUNK, "DATA larger than a chunk");
                    }
                    got.push(p);
                }
                _ => break,
            }
        }
        got
    }

    fn check(&self) {
        assert!(
            self.conns.len() <= self.established,
            "table holds {} connections, {} ever established",
            self.conns.len(),
            self.established
        );
        for r in self.relays.values() {
            r.check(self.flow.buffer_cap, self.checks);
        }
        for st in self.pre.values() {
            st.check(self.flow.buffer_cap, self.checks);
        }
    }

    /// The stream ended: every connection on it must close, leaving nothing behind.
    fn end(mut self) {
        self.out.closed.cancel();
        let n = self.conns.close_all();
        assert!(n <= self.relays.len() + self.established);
        assert!(self.conns.is_empty(), "table not empty after close_all");
        assert_eq!(self.conns.close_all(), 0);
        for (id, r) in std::mem::take(&mut self.relays) {
            let mut closer = r.parts.closer;
            assert!(
                closer.try_recv().is_ok(),
                "connection {id} not told to close"
            );
            // The relay finishes its write and drops its inbox: nothing stays counted.
            if let Some(n) = r.writing {
                r.parts.inbox.consumed(n);
            }
            drop(r.parts.inbox);
            assert_eq!(
                r.metrics.buffered_bytes.get(),
                0,
                "connection {id} leaked buffered bytes"
            );
        }
        // The response stream ends at once, and once gRPC drops it nothing more queues.
        let mut cx = Context::from_waker(Waker::noop());
        assert!(matches!(
            std::pin::Pin::new(&mut self.out_rx).poll_next(&mut cx),
            Poll::Ready(None)
        ));
        drop(self.out_rx);
        assert!(
            self.out.control(packet::drain()).is_err(),
            "closed stream still queues"
        );
    }
}

/// What a server frontend learns about its dial (`backends::DialOutcome`).
enum DialOutcome {
    Established {
        connect_id: i64,
        parts: ConnParts,
        metrics: RelayMetrics,
    },
    Failed(String),
}

/// The server side: a hostile agent against `agent_service::handle_packet`.
pub fn packets_server_with(data: &[u8], checks: Checks) {
    let mut input = Input::new(data);
    let mut s = Tunnel::new(input.u8(), checks);
    // backends::Backend::pending, and the frontends waiting on them.
    let mut pending: HashMap<i64, oneshot::Sender<DialOutcome>> = HashMap::new();
    let mut frontends: BTreeMap<i64, oneshot::Receiver<DialOutcome>> = BTreeMap::new();
    let mut draining = false;

    for _ in 0..MAX_OPS {
        if input.is_empty() || s.out.is_closed() {
            break;
        }
        match input.u8() % 12 {
            0..=2 => {
                let len = usize::from(input.u16() % 2048);
                let Some(p) = decode(input.bytes(len)) else {
                    break; // decode error: the stream fails
                };
                server_handle(&mut s, &mut pending, &mut draining, p);
            }
            // A frontend starts a dial (State::start_dial → Backend::start_dial).
            3 => {
                let random = i64::from(input.u8() as i8);
                let (tx, rx) = oneshot::channel();
                if let std::collections::hash_map::Entry::Vacant(e) = pending.entry(random) {
                    e.insert(tx);
                    if s.out
                        .control(packet::dial_req("10.0.0.1:443".into(), random))
                        .is_err()
                    {
                        pending.remove(&random);
                    } else {
                        frontends.insert(random, rx);
                    }
                }
            }
            // A frontend gives up (Dial::drop): forget the dial, tell the agent.
            4 => {
                if let Some(random) = frontends
                    .keys()
                    .nth(usize::from(input.u8()) % frontends.len().max(1))
                    .copied()
                {
                    let rx = frontends.remove(&random).unwrap();
                    if input.u8() & 1 == 0 {
                        pending.remove(&random);
                    } // else: the dispatch loop already took it (race)
                    let _ = s.out.control(packet::dial_cls(random));
                    drop(rx);
                }
            }
            // A frontend gets its answer and starts its relay.
            5 => {
                if let Some(random) = frontends
                    .keys()
                    .nth(usize::from(input.u8()) % frontends.len().max(1))
                    .copied()
                {
                    let rx = frontends.get_mut(&random).unwrap();
                    match rx.try_recv() {
                        Ok(DialOutcome::Established {
                            connect_id,
                            parts,
                            metrics,
                        }) => {
                            frontends.remove(&random);
                            let mut parts = parts;
                            match parts.closer.try_recv() {
                                // Still open: its entry is in the table.
                                Err(oneshot::error::TryRecvError::Empty) => {
                                    assert!(s.conns.contains(connect_id));
                                    s.add_relay(connect_id, parts, metrics);
                                }
                                // Closed before the relay started: it ends at once.
                                Ok(_) => {}
                                Err(e) => panic!("connection {connect_id} dropped: {e:?}"),
                            }
                        }
                        Ok(DialOutcome::Failed(e)) => {
                            assert!(!e.is_empty());
                            frontends.remove(&random);
                        }
                        Err(oneshot::error::TryRecvError::Empty) => {
                            assert!(pending.contains_key(&random), "dial {random} forgotten");
                        }
                        Err(oneshot::error::TryRecvError::Closed) => {
                            panic!("dial {random} dropped without an answer")
                        }
                    }
                }
            }
            6..=9 => s.relay_event(input.u8() % 4, &mut input, packet::close_req),
            _ => {
                s.peer_reads(input.u8());
            }
        }
        s.check();
        assert!(pending.len() <= 256, "pending dials grew past the ids used");
    }
    let _ = draining;
    // serve_backend's epilogue: connections first, then pending dials.
    s.out.closed.cancel();
    s.conns.close_all();
    for (_, tx) in pending.drain() {
        let _ = tx.send(DialOutcome::Failed("Backend context error".into()));
    }
    for (random, mut rx) in frontends {
        match rx.try_recv() {
            Ok(DialOutcome::Failed(_)) => {}
            Ok(DialOutcome::Established {
                connect_id, parts, ..
            }) => {
                // Answered just before the end; the table must have let go of it.
                let mut closer = parts.closer;
                assert!(
                    closer.try_recv().is_ok(),
                    "dial {random} → {connect_id} never closed"
                );
            }
            Err(e) => panic!("dial {random} left without an answer: {e:?}"),
        }
    }
    s.end();
}

/// `agent_service::handle_packet`, over the model's state.
fn server_handle(
    s: &mut Tunnel,
    pending: &mut HashMap<i64, oneshot::Sender<DialOutcome>>,
    draining: &mut bool,
    p: Packet,
) {
    match (PacketType::try_from(p.r#type), p.payload) {
        (Ok(PacketType::DialRsp), Some(Payload::DialResponse(r))) => {
            let Some(reply) = pending.remove(&r.random) else {
                if r.connect_id != 0 {
                    let _ = s.out.control(packet::close_req(r.connect_id));
                }
                return;
            };
            if !r.error.is_empty() {
                let _ = reply.send(DialOutcome::Failed(r.error));
                return;
            }
            let (entry, parts, metrics) = s.new_conn();
            if r.connect_id == 0 || !s.insert(r.connect_id, entry) {
                let _ = reply.send(DialOutcome::Failed(format!(
                    "agent answered with unusable connectID {}",
                    r.connect_id
                )));
                return;
            }
            let established = DialOutcome::Established {
                connect_id: r.connect_id,
                parts,
                metrics,
            };
            if reply.send(established).is_err() {
                s.conns.close(r.connect_id, None);
                let _ = s.out.control(packet::close_req(r.connect_id));
            }
        }
        (Ok(PacketType::Data), Some(Payload::Data(d))) => {
            let id = d.connect_id;
            let len = d.data.len();
            let result = s.conns.deliver(id, d.data, Some(packet::close_req(id)));
            s.delivered(id, len, &result);
            if result == Delivery::Unknown {
                let _ = s.out.control(packet::close_req(id));
            }
        }
        (Ok(PacketType::CloseRsp), Some(Payload::CloseResponse(c))) => {
            s.conns.close(c.connect_id, None);
        }
        (Ok(PacketType::DialCls), Some(Payload::CloseDial(c))) => {
            if let Some(reply) = pending.remove(&c.random) {
                let _ = reply.send(DialOutcome::Failed("dial closed".into()));
            }
        }
        (Ok(PacketType::Drain), _) => *draining = true,
        (Ok(PacketType::SpokeCredit), Some(Payload::Credit(c))) => {
            let known = s.conns.grant(c.connect_id, c.bytes);
            s.granted(c.connect_id, c.bytes, known);
        }
        _ => {}
    }
}

/// The agent side: a hostile server against `ServerStream::handle`.
pub fn packets_agent_with(data: &[u8], checks: Checks) {
    let mut input = Input::new(data);
    let mut s = Tunnel::new(input.u8(), checks);
    // ServerStream::pending: dials in flight (their tasks), by the server's random.
    let mut pending: BTreeMap<i64, ()> = BTreeMap::new();
    let mut next_id: i64 = 1;

    for _ in 0..MAX_OPS {
        if input.is_empty() || s.out.is_closed() {
            break;
        }
        match input.u8() % 11 {
            0..=2 => {
                let len = usize::from(input.u16() % 2048);
                let Some(p) = decode(input.bytes(len)) else {
                    break;
                };
                agent_handle(&mut s, &mut pending, p);
            }
            // A dial task finishes (start_dial's spawned task).
            3 => {
                if let Some(random) = pending
                    .keys()
                    .nth(usize::from(input.u8()) % pending.len().max(1))
                    .copied()
                {
                    pending.remove(&random);
                    let id = next_id;
                    next_id += 1;
                    if input.u8() & 1 == 0 {
                        let _ = s.out.control(packet::dial_err(
                            random,
                            "dial tcp: connection refused".into(),
                        ));
                    } else {
                        let (entry, parts, metrics) = s.new_conn();
                        assert!(s.insert(id, entry), "fresh connection id {id} taken");
                        if s.out.control(packet::dial_ok(random, id)).is_err() {
                            s.conns.close(id, None);
                        } else {
                            s.add_relay(id, parts, metrics);
                        }
                    }
                }
            }
            4..=8 => s.relay_event(input.u8() % 4, &mut input, |id| packet::close_rsp(id, "")),
            _ => {
                s.peer_reads(input.u8());
            }
        }
        s.check();
    }
    pending.clear();
    s.end();
}

/// `ServerStream::handle`, over the model's state.
fn agent_handle(s: &mut Tunnel, pending: &mut BTreeMap<i64, ()>, p: Packet) {
    match (PacketType::try_from(p.r#type), p.payload) {
        (Ok(PacketType::DialReq), Some(Payload::DialRequest(req))) => {
            let random = req.random;
            if req.protocol != "tcp" {
                let _ = s.out.control(packet::dial_err(
                    random,
                    format!("protocol {:?} is not supported", req.protocol),
                ));
                return;
            }
            if pending.contains_key(&random) {
                let _ = s
                    .out
                    .control(packet::dial_err(random, "duplicate dial id".into()));
                return;
            }
            pending.insert(random, ());
        }
        (Ok(PacketType::DialCls), Some(Payload::CloseDial(c))) => {
            pending.remove(&c.random);
        }
        (Ok(PacketType::Data), Some(Payload::Data(d))) => {
            let id = d.connect_id;
            let len = d.data.len();
            let result = s.conns.deliver(
                id,
                d.data,
                Some(packet::close_rsp(id, "receive buffer overflow")),
            );
            s.delivered(id, len, &result);
            if result == Delivery::Unknown {
                let _ = s
                    .out
                    .control(packet::close_rsp(id, "unrecognized connectID"));
            }
        }
        (Ok(PacketType::CloseReq), Some(Payload::CloseRequest(c))) => {
            let id = c.connect_id;
            if !s.conns.close(id, Some(packet::close_rsp(id, ""))) {
                let _ = s.out.control(packet::close_rsp(id, "Unknown connectID"));
            }
        }
        (Ok(PacketType::SpokeCredit), Some(Payload::Credit(c))) => {
            let known = s.conns.grant(c.connect_id, c.bytes);
            s.granted(c.connect_id, c.bytes, known);
        }
        _ => {}
    }
}
