//! A hostile peer on one agent stream, against the engine both binaries ship.
//!
//! Each target runs a real `spoke_tunnel::session::Session`, whose `dispatch` is the packet
//! dispatch of spoke-server and spoke-agent alike, and between the peer's packets does what
//! that end's local side does, through the API the binaries use:
//! - `packets_server`: a `Session<ServerEnd>`. Frontends dial (`send_dial`), take their
//!   `DialOutcome`, or give up: their `Dial` drops and hands its receiver to `abandon_dial`,
//!   whether the dial is pending, its answer sits unread, or the answer crosses the hang-up.
//! - `packets_agent`: a `Session<AgentEnd>` whose `EndpointDialer` opens nothing: it records
//!   the dials it is asked to start with their `DialTicket`s, and later operations finish them
//!   (`dial_succeeded`, `dial_failed`), also after their cancellation, when the server may
//!   have dialled again under the same `random`; the input also makes it refuse dials.
//!
//! Relays are modelled step by step over the real `ConnParts` that `Session::relay` hands out
//! (the write loop draining, the read loop sending within credit, the local end ending, the
//! read loop seeing the peer's close): `Relay::run` needs a runtime and would hide exactly
//! those interleavings. The stream ends with `Session::close`, as it does in both binaries.
//!
//! Input: one config byte, then operations. Operations 0 to 2 are a wire packet (two length
//! bytes, then a protobuf `Packet`; bytes that do not decode end the stream as a gRPC decode
//! error does); the others are local events. The end of the input ends the stream.
use super::{Checks, Input};
use bytes::Bytes;
use futures::Stream;
use prometheus_client::metrics::histogram::Histogram;
use spoke_proto::packet::Payload;
use spoke_proto::{DialRequest, Packet, PacketType};
use spoke_tunnel::conns::{ConnParts, PeerClose};
use spoke_tunnel::flow::CreditReturn;
use spoke_tunnel::identifiers::AgentIdentifiers;
use spoke_tunnel::outbound::{outbound, OutboundRx};
use spoke_tunnel::packet;
use spoke_tunnel::relay::{Relay, CHUNK};
use spoke_tunnel::session::{
    AgentEnd, DialOutcome, DialTicket, End, EndpointDialer, ServerEnd, Session, SessionMetrics,
};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use tokio::sync::oneshot;
use tonic_prost::prost::Message;

/// Most operations in one run: keeps an execution fast.
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

/// The next wire packet of the input; `None` when it does not decode.
fn next_packet(input: &mut Input) -> Option<Packet> {
    let len = usize::from(input.u16() % 2048);
    decode(input.bytes(len))
}

/// The packet's type, when its payload is the one that type carries (what `dispatch` acts on).
fn kind(p: &Packet) -> Option<PacketType> {
    let t = PacketType::try_from(p.r#type).ok()?;
    let fits = matches!(
        (t, &p.payload),
        (PacketType::DialReq, Some(Payload::DialRequest(_)))
            | (PacketType::DialRsp, Some(Payload::DialResponse(_)))
            | (PacketType::DialCls, Some(Payload::CloseDial(_)))
            | (PacketType::Data, Some(Payload::Data(_)))
            | (PacketType::SpokeCredit, Some(Payload::Credit(_)))
            | (PacketType::Drain, _)
    );
    fits.then_some(t)
}

/// What the harness knows about one connection's inbox: what the dispatch queued into it,
/// less what the relay took.
#[derive(Default)]
struct Stats {
    /// Chunks queued and not yet taken (empty DATA is not queued).
    queued: usize,
    /// Bytes queued and not yet released.
    bytes: usize,
    /// Largest chunk ever queued (an oversize chunk may enter an empty inbox).
    largest: usize,
}

impl Stats {
    fn push(&mut self, len: usize) {
        if len > 0 {
            self.queued += 1;
            self.bytes += len;
            self.largest = self.largest.max(len);
        }
    }

    /// Whether the inbox must refuse `len` more bytes (it takes any chunk while empty).
    fn overflows(&self, len: usize, cap: usize) -> bool {
        len > 0 && self.bytes > 0 && self.bytes + len > cap
    }

    fn check(&self, cap: usize) {
        // Every queued chunk holds a byte; past the cap the inbox refuses more.
        assert!(
            self.queued <= cap + 1,
            "{} chunks queued, cap {cap}",
            self.queued
        );
        assert!(
            self.bytes <= cap.max(self.largest),
            "inbox holds {} bytes, cap {cap}, largest chunk {}",
            self.bytes,
            self.largest
        );
    }
}

/// One connection's relay, as `Relay::run` holds it, one step at a time.
struct RelayModel {
    relay: Relay,
    /// A chunk taken from the inbox whose write to the local end has not finished.
    writing: Option<usize>,
    credit_back: Option<CreditReturn>,
}

/// One connection of the stream, from its establishment until its local side lets go.
struct Conn {
    id: i64,
    stats: Stats,
    /// Send credit per the harness: the peer's window, plus positive grants, less bytes sent.
    credit: i128,
    /// Its relay, once running (a server frontend starts it when it takes its answer).
    relay: Option<RelayModel>,
}

impl Conn {
    fn check(&self, cap: usize) {
        self.stats.check(cap);
        let Some(r) = &self.relay else { return };
        let window = &r.relay.parts.window;
        if window.is_limited() {
            assert_eq!(
                window.exhausted(),
                self.credit <= 0,
                "send window disagrees with credit {}",
                self.credit
            );
        } else {
            assert!(!window.exhausted(), "unlimited window exhausted");
        }
    }

    /// The write loop takes up to `n` chunks and writes them.
    fn drain(&mut self, n: u8) {
        let Some(r) = self.relay.as_mut() else { return };
        for _ in 0..n {
            if let Some(len) = r.writing.take() {
                // The write finished: the write loop returns credit as it goes.
                let window = r.relay.parts.inbox.window();
                if let Some(grant) = r.credit_back.as_mut().and_then(|c| c.drained(len, window)) {
                    assert!(grant > 0);
                    let _ = r
                        .relay
                        .outbound
                        .control(packet::credit(self.id, grant as i64));
                }
            }
            let Some(chunk) = r.relay.parts.inbox.try_recv() else {
                assert_eq!(self.stats.queued, 0, "queued chunks vanished");
                break;
            };
            assert!(self.stats.queued > 0, "inbox yielded a chunk never queued");
            assert!(!chunk.is_empty(), "empty chunk queued");
            self.stats.queued -= 1;
            // Out of the buffer once taken, as the write loop releases it before writing.
            r.relay.parts.inbox.consumed(chunk.len());
            self.stats.bytes = (self.stats.bytes.checked_sub(chunk.len()))
                .expect("inbox released more bytes than were queued");
            r.writing = Some(chunk.len());
        }
    }

    /// The read loop reads up to `want` bytes from the local end and sends them, if it may.
    fn read(&mut self, want: usize) {
        let Some(r) = self.relay.as_mut() else { return };
        let window = &r.relay.parts.window;
        let Some(max) = poll_once(window.ready(CHUNK)) else {
            assert!(window.exhausted(), "window not ready yet not exhausted");
            return;
        };
        assert!(max > 0 && max <= CHUNK);
        let n = want.min(max);
        if n == 0 {
            return;
        }
        // `Outbound::data` waits while the stream is full; the model retries later.
        let bytes = Bytes::from(vec![b'x'; n]);
        if let Some(Ok(())) = poll_once(r.relay.outbound.data(packet::data(self.id, bytes))) {
            window.spend(n);
            if window.is_limited() {
                self.credit -= n as i128;
            }
        }
    }
}

/// One end's session under a hostile peer, and the local side's connections.
struct Harness<E: End> {
    session: Arc<Session<E>>,
    out_rx: OutboundRx,
    /// By `ConnParts::generation`: a connection and a later one under its id are two.
    conns: BTreeMap<u64, Conn>,
    /// The generation each connectID last stood for.
    current: HashMap<i64, u64>,
    /// Connections ever established: the table can never hold more.
    established: usize,
    /// What this end tells the peer when its local end closes first.
    local_close: fn(i64) -> Packet,
}

impl<E: End> Harness<E> {
    fn new(cfg: u8, end: E, local_close: fn(i64) -> Packet) -> Self {
        let (out, out_rx) = outbound(None);
        // Small caps so overflow, oversize chunks and credit batching all happen.
        let flow = spoke_tunnel::conns::FlowConfig {
            buffer_cap: 1 + usize::from(cfg & 0x1f) * 7,
            peer_window: (cfg & 0x20 != 0).then_some(1 + usize::from(cfg >> 6) * 5),
        };
        let metrics = SessionMetrics {
            stream: Default::default(),
            received: "fuzz",
            relay: Default::default(),
            rejected: Default::default(),
        };
        Harness {
            session: Session::new(end, out, flow, metrics),
            out_rx,
            conns: BTreeMap::new(),
            current: HashMap::new(),
            established: 0,
            local_close,
        }
    }

    fn cap(&self) -> usize {
        self.session.flow.buffer_cap
    }

    /// Whether the table's entry for `id` is connection `generation`'s.
    fn owns_entry(&self, generation: u64, id: i64) -> bool {
        self.current.get(&id) == Some(&generation) && self.session.conns.contains(id)
    }

    /// Hands `p` to the engine's dispatch and follows what it did to a connection's inbox
    /// and send window.
    fn dispatch(&mut self, p: Packet) {
        let target = match (kind(&p), &p.payload) {
            (Some(PacketType::Data), Some(Payload::Data(d))) => {
                Some((d.connect_id, Some(d.data.len()), 0))
            }
            // A blocked report grants nothing (its window cannot grow: these caps are below
            // the initial window, so the window is the cap from the start).
            (Some(PacketType::SpokeCredit), Some(Payload::Credit(c))) => {
                Some((c.connect_id, None, if c.blocked { 0 } else { c.bytes }))
            }
            _ => None,
        };
        let known = target.is_some_and(|(id, ..)| self.session.conns.contains(id));
        self.session.dispatch(p);
        let Some((id, data, grant)) = target else {
            return;
        };
        let still = self.session.conns.contains(id);
        if !known {
            assert!(!still, "a packet for unknown connection {id} created it");
            return;
        }
        let cap = self.cap();
        // A connection whose local side let go (strict mode only) is not followed.
        let Some(c) = self.current.get(&id).and_then(|g| self.conns.get_mut(g)) else {
            return;
        };
        match data {
            Some(len) => {
                assert_eq!(
                    !still,
                    c.stats.overflows(len, cap),
                    "connection {id} holding {} bytes, cap {cap}: {len} more {}",
                    c.stats.bytes,
                    if still { "queued" } else { "overflowed" }
                );
                if still {
                    c.stats.push(len);
                }
            }
            None => {
                assert!(still, "credit closed connection {id}");
                if self.session.flow.peer_window.is_some() && grant > 0 {
                    c.credit += i128::from(grant);
                }
            }
        }
    }

    /// Connection `id` entered the table as `generation`.
    fn connected(&mut self, id: i64, generation: u64) {
        assert!(
            self.session.conns.contains(id),
            "connection {id} not in the table"
        );
        let credit = self.session.flow.peer_window.unwrap_or(0) as i128;
        let conn = Conn {
            id,
            stats: Stats::default(),
            credit,
            relay: None,
        };
        assert!(
            self.conns.insert(generation, conn).is_none(),
            "generation {generation} handed out twice"
        );
        self.current.insert(id, generation);
    }

    /// The local side starts the relay of connection `id`.
    fn start_relay(&mut self, id: i64, parts: ConnParts) {
        let generation = parts.generation;
        let flow = self.session.flow;
        let relay = self.session.relay(id, parts);
        assert_eq!(relay.local_close, (self.local_close)(id), "relay's close");
        let Some(c) = self.conns.get_mut(&generation) else {
            panic!("relay for connection {id}, which was never established");
        };
        assert_eq!(c.id, id);
        assert!(c.relay.is_none(), "two relays for connection {id}");
        c.relay = Some(RelayModel {
            relay,
            writing: None,
            credit_back: flow.credits().then(CreditReturn::default),
        });
    }

    /// A relay's step: `op` 0 the write loop drains, 1 the read loop sends, 2 the local end
    /// ends, 3 the read loop looks for the peer's close.
    fn relay_event(&mut self, op: u8, input: &mut Input) {
        let k = usize::from(input.u8());
        let running = self.conns.values().filter(|c| c.relay.is_some()).count();
        if running == 0 {
            return;
        }
        let Some(generation) = self
            .conns
            .iter()
            .filter(|(_, c)| c.relay.is_some())
            .nth(k % running)
            .map(|(g, _)| *g)
        else {
            return;
        };
        match op {
            0 => {
                let n = input.u8();
                self.conns.entry(generation).and_modify(|c| c.drain(n));
            }
            1 => {
                let want = usize::from(input.u16());
                self.conns.entry(generation).and_modify(|c| c.read(want));
            }
            2 => self.local_end_gone(generation),
            _ => self.notice_peer_close(generation),
        }
    }

    /// The local end is done: whoever takes the entry out of the table owns the close.
    fn local_end_gone(&mut self, generation: u64) {
        let Some(c) = self.conns.remove(&generation) else {
            return;
        };
        let Some(r) = c.relay else { return };
        let out = &self.session.outbound;
        if self.current.get(&c.id) == Some(&generation) && self.session.conns.close(c.id, None) {
            // The relay took its entry out (the server's `frontend_gone` does the same): it
            // tells the peer.
            let _ = poll_once(out.data(r.relay.local_close));
            return;
        }
        // The peer closed first: its reply, if any, waits for the relay.
        let mut closer = r.relay.parts.closer;
        match closer.try_recv() {
            Ok(PeerClose { reply }) => {
                if let Some(p) = reply {
                    let _ = poll_once(out.data(p));
                }
            }
            Err(e) => panic!("connection {} left the table untold: {e:?}", c.id),
        }
    }

    fn notice_peer_close(&mut self, generation: u64) {
        let Some(c) = self.conns.get(&generation) else {
            return;
        };
        let owned = self.owns_entry(generation, c.id);
        let Some(c) = self.conns.get_mut(&generation) else {
            return;
        };
        let Some(r) = c.relay.as_mut() else { return };
        match r.relay.parts.closer.try_recv() {
            Ok(PeerClose { reply }) => {
                assert!(!owned, "closed connection {} still in the table", c.id);
                if let Some(p) = reply {
                    let _ = poll_once(self.session.outbound.data(p));
                }
                // The relay ends; its write side flushes what is queued and drops the inbox.
                self.conns.remove(&generation);
            }
            Err(oneshot::error::TryRecvError::Empty) => {
                assert!(owned, "relay of {} live but its entry is gone", c.id);
            }
            Err(oneshot::error::TryRecvError::Closed) => {
                panic!("connection {} dropped without a close", c.id)
            }
        }
    }

    /// The peer reads up to `n` packets off the stream.
    fn peer_reads(&mut self, n: u8) {
        let mut cx = Context::from_waker(Waker::noop());
        for _ in 0..n {
            let Poll::Ready(Some(p)) = Pin::new(&mut self.out_rx).poll_next(&mut cx) else {
                break;
            };
            let bytes = p.encode_to_vec();
            assert_eq!(decode(&bytes).as_ref(), Some(&p));
            if let Some(Payload::Credit(c)) = &p.payload {
                assert!(c.bytes > 0, "credit packet with {} bytes", c.bytes);
            }
            if let Some(Payload::Data(d)) = &p.payload {
                assert!(d.data.len() <= CHUNK, "DATA larger than a chunk");
            }
        }
    }

    /// Invariants after every operation; `pending` is how many dials the session should hold.
    fn check(&self, pending: usize) {
        let table = &self.session.conns;
        let entries = table.len();
        assert!(
            entries <= self.established,
            "table holds {entries} connections, {} ever established",
            self.established
        );
        // Every entry leaves on every path: only through a local side that holds it.
        let held = self
            .conns
            .iter()
            .filter(|(g, c)| self.owns_entry(**g, c.id))
            .count();
        assert_eq!(
            held, entries,
            "{entries} connections in the table, {held} held by a local side"
        );
        let load = self.session.load();
        assert_eq!(
            load.connections,
            entries + pending,
            "the session counts {} connections and dials; {entries} connections, {pending} dials pending",
            load.connections
        );
        let buffered: usize = self.conns.values().map(|c| c.stats.bytes).sum();
        assert_eq!(
            load.buffered_bytes, buffered as u64,
            "stream's buffered bytes"
        );
        assert_eq!(
            self.session.metrics.relay.buffered_bytes.get(),
            buffered as i64,
            "process's buffered bytes"
        );
        for c in self.conns.values() {
            c.check(self.cap());
        }
    }

    /// The stream ends as both binaries end it: every connection and dial on it ends.
    fn close(&mut self, pending: usize) {
        let entries = self.session.conns.len();
        assert_eq!(
            self.session.close(),
            (entries, pending),
            "close ended other connections and dials than were open"
        );
        assert!(self.session.conns.is_empty(), "table not empty after close");
        assert_eq!(self.session.close(), (0, 0), "a second close found more");
        assert_eq!(self.session.load().connections, 0);
    }

    /// After [`Harness::close`] and the local side's own checks: every relay was told to close,
    /// nothing stays buffered, and the response stream is over.
    fn finish(mut self) -> Arc<Session<E>> {
        for (_, c) in std::mem::take(&mut self.conns) {
            let Some(r) = c.relay else {
                panic!("connection {} has no local side at the end", c.id)
            };
            let mut closer = r.relay.parts.closer;
            assert!(
                closer.try_recv().is_ok(),
                "connection {} not told to close",
                c.id
            );
            // Dropped here: its write side finishes and drops the inbox.
        }
        assert_eq!(self.session.load().buffered_bytes, 0, "stream leaked bytes");
        assert_eq!(
            self.session.metrics.relay.buffered_bytes.get(),
            0,
            "process leaked bytes"
        );
        // The response stream ends at once, and once gRPC drops it nothing more queues.
        let mut cx = Context::from_waker(Waker::noop());
        assert!(
            matches!(
                Pin::new(&mut self.out_rx).poll_next(&mut cx),
                Poll::Ready(None)
            ),
            "the response stream did not end"
        );
        drop(self.out_rx);
        assert!(
            self.session.outbound.control(packet::drain()).is_err(),
            "closed stream still queues"
        );
        self.session
    }
}

fn pick(k: u8, len: usize) -> Option<usize> {
    (len > 0).then(|| usize::from(k) % len)
}

/// A frontend's dial, as the frontend holds it.
enum Answer {
    /// On the receiver `send_dial` gave.
    Waiting(oneshot::Receiver<DialOutcome>),
    /// Arrived; the frontend has not acted on it yet.
    Arrived(DialOutcome),
}

struct Frontend {
    random: i64,
    answer: Answer,
}

/// The server's end: a hostile agent against `Session<ServerEnd>`, with frontends.
pub fn packets_server_with(data: &[u8], _checks: Checks) {
    let mut input = Input::new(data);
    let end = ServerEnd::new(
        "fuzz-agent".into(),
        AgentIdentifiers::default(),
        Default::default(),
        Histogram::new([1.0]),
    );
    let mut h = Harness::new(input.u8(), end, packet::close_req);
    let mut frontends: Vec<Frontend> = Vec::new();
    // Frontends that dropped their dial while the dispatch was answering it: their receiver
    // is closed (the first thing `abandon_dial` does) and the rest of `abandon_dial` runs
    // after the next packet. The flag: the session still holds the dial.
    let mut abandoning: BTreeMap<i64, (bool, oneshot::Receiver<DialOutcome>)> = BTreeMap::new();

    for _ in 0..MAX_OPS {
        if input.is_empty() || h.session.outbound.is_closed() {
            break;
        }
        match input.u8() % 12 {
            0..=2 => {
                let Some(p) = next_packet(&mut input) else {
                    break; // decode error: the stream fails
                };
                let kind = kind(&p);
                let answers = match (kind, &p.payload) {
                    (Some(PacketType::DialRsp), Some(Payload::DialResponse(r))) => {
                        if r.error.is_empty() && r.connect_id != 0 {
                            h.established += 1;
                        }
                        Some((r.random, r.connect_id))
                    }
                    (Some(PacketType::DialCls), Some(Payload::CloseDial(c))) => Some((c.random, 0)),
                    _ => None,
                };
                h.dispatch(p);
                if kind == Some(PacketType::Drain) {
                    assert!(h.session.end.is_draining(), "DRAIN did not mark the agent");
                }
                if let Some((random, connect_id)) = answers {
                    abandoning
                        .entry(random)
                        .and_modify(|(held, _)| *held = false);
                    answered(&mut h, &mut frontends, random, connect_id);
                }
                for (random, (_, rx)) in std::mem::take(&mut abandoning) {
                    h.session.abandon_dial(random, rx);
                }
            }
            // A frontend dials (`Server::dial`). Its id is its own while it holds the dial.
            3 => {
                let random = i64::from(input.u8() as i8);
                let holder = frontends.iter().find(|f| f.random == random);
                if let Some(f) = holder {
                    if matches!(f.answer, Answer::Waiting(_)) {
                        assert!(
                            h.session.send_dial(random, "10.0.0.1:443".into()).is_none(),
                            "a second dial under pending id {random} was sent"
                        );
                    }
                } else if abandoning.contains_key(&random) {
                    // Its last holder has not let go of it yet.
                } else if let Some(rx) = h.session.send_dial(random, "10.0.0.1:443".into()) {
                    frontends.push(Frontend {
                        random,
                        answer: Answer::Waiting(rx),
                    });
                } else {
                    assert!(h.session.outbound.is_closed(), "dial {random} refused");
                }
            }
            // A frontend gives up (the client hung up): its `Dial` drops.
            4 => {
                let Some(i) = pick(input.u8(), frontends.len()) else {
                    continue;
                };
                let race = input.u8() & 1 == 1;
                let f = frontends.swap_remove(i);
                match f.answer {
                    Answer::Waiting(mut rx) if race => {
                        rx.close();
                        abandoning.insert(f.random, (true, rx));
                    }
                    Answer::Waiting(rx) => h.session.abandon_dial(f.random, rx),
                    // The answer sits unread in the dropped `Dial`'s receiver.
                    Answer::Arrived(outcome) => {
                        let generation = match &outcome {
                            DialOutcome::Established { parts, .. } => Some(parts.generation),
                            DialOutcome::Failed(_) => None,
                        };
                        let (tx, rx) = oneshot::channel();
                        let _ = tx.send(outcome);
                        h.session.abandon_dial(f.random, rx);
                        // Its local side is gone with the answer.
                        if let Some(generation) = generation {
                            h.conns.remove(&generation);
                        }
                    }
                }
            }
            // A frontend takes its answer: a failure to report, or a connection to relay.
            5 => {
                let Some(i) = pick(input.u8(), frontends.len()) else {
                    continue;
                };
                let Answer::Arrived(_) = frontends[i].answer else {
                    continue; // not there yet
                };
                let f = frontends.swap_remove(i);
                if let Answer::Arrived(DialOutcome::Established { connect_id, parts }) = f.answer {
                    h.start_relay(connect_id, parts);
                }
            }
            6..=9 => h.relay_event(input.u8() % 4, &mut input),
            _ => h.peer_reads(input.u8()),
        }
        let waiting = frontends
            .iter()
            .filter(|f| matches!(f.answer, Answer::Waiting(_)))
            .count();
        h.check(waiting + abandoning.values().filter(|(held, _)| *held).count());
    }

    // The stream ends (the registry let go of it first, so no dial starts meanwhile).
    for (random, (_, rx)) in std::mem::take(&mut abandoning) {
        h.session.abandon_dial(random, rx);
    }
    let waiting = frontends
        .iter()
        .filter(|f| matches!(f.answer, Answer::Waiting(_)))
        .count();
    h.close(waiting);
    for f in frontends {
        let outcome = match f.answer {
            Answer::Waiting(mut rx) => rx
                .try_recv()
                .unwrap_or_else(|e| panic!("dial {} left without an answer: {e:?}", f.random)),
            Answer::Arrived(outcome) => outcome,
        };
        match outcome {
            DialOutcome::Failed(e) => assert!(!e.is_empty()),
            DialOutcome::Established { connect_id, parts } => {
                // Answered before the end and never taken: the table must have let go of it.
                let ConnParts {
                    mut closer,
                    generation,
                    ..
                } = parts;
                assert!(
                    closer.try_recv().is_ok(),
                    "dial {} → {connect_id} never closed",
                    f.random
                );
                h.conns.remove(&generation);
            }
        }
    }
    let session = h.finish();
    assert!(
        session.send_dial(1, "10.0.0.1:443".into()).is_none(),
        "a dial went out on a closed stream"
    );
    assert_eq!(
        session.load().connections,
        0,
        "a refused dial stayed pending"
    );
}

/// The agent answered (or cancelled) dial `random`: the frontend waiting on it has its answer.
fn answered(h: &mut Harness<ServerEnd>, frontends: &mut [Frontend], random: i64, connect_id: i64) {
    let Some(f) = frontends.iter_mut().find(|f| f.random == random) else {
        return;
    };
    let Answer::Waiting(rx) = &mut f.answer else {
        return;
    };
    let outcome = match rx.try_recv() {
        Ok(o) => o,
        Err(e) => panic!("dial {random}'s answer did not reach its frontend: {e:?}"),
    };
    match &outcome {
        DialOutcome::Established {
            connect_id: id,
            parts,
        } => {
            assert_eq!(
                *id, connect_id,
                "dial {random} established another connection"
            );
            h.connected(*id, parts.generation);
        }
        DialOutcome::Failed(e) => assert!(!e.is_empty(), "dial {random} failed without a reason"),
    }
    f.answer = Answer::Arrived(outcome);
}

/// The agent's dialer under fuzz: it opens nothing. It records the dials it is asked to
/// start; the input finishes them later, as a dial task would.
#[derive(Default)]
struct FuzzDialer {
    refusing: AtomicBool,
    started: Mutex<Vec<(DialRequest, DialTicket)>>,
}

impl FuzzDialer {
    fn take_started(&self) -> Vec<(DialRequest, DialTicket)> {
        std::mem::take(&mut *self.started.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

impl EndpointDialer for FuzzDialer {
    fn refuse(&self) -> Option<String> {
        self.refusing
            .load(Ordering::Relaxed)
            .then(|| "agent limit reached: --max-connections".to_string())
    }

    fn start(
        self: Arc<Self>,
        _session: Arc<Session<AgentEnd>>,
        req: DialRequest,
        ticket: DialTicket,
    ) {
        self.started
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((req, ticket));
    }
}

/// A dial the agent started and that has not finished.
struct Dialing {
    random: i64,
    ticket: DialTicket,
}

impl Dialing {
    fn live(&self) -> bool {
        !self.ticket.cancel.is_cancelled()
    }
}

/// The agent's end: a hostile server against `Session<AgentEnd>`, with a dialer.
pub fn packets_agent_with(data: &[u8], _checks: Checks) {
    let mut input = Input::new(data);
    let dialer = Arc::new(FuzzDialer::default());
    let end = AgentEnd::new("fuzz-server".into(), dialer.clone());
    let mut h = Harness::new(input.u8(), end, |id| packet::close_rsp(id, ""));
    let mut dials: Vec<Dialing> = Vec::new();
    let mut last_id = 0;

    for _ in 0..MAX_OPS {
        if input.is_empty() || h.session.outbound.is_closed() {
            break;
        }
        match input.u8() % 11 {
            0..=2 => {
                let Some(p) = next_packet(&mut input) else {
                    break;
                };
                // A DIAL_REQ starts one dial unless it is refused: not TCP, over a limit, or
                // under the id of a dial still running.
                let (starts, cancels) = match (kind(&p), &p.payload) {
                    (Some(PacketType::DialReq), Some(Payload::DialRequest(r))) => {
                        let serve = r.protocol == "tcp"
                            && !dialer.refusing.load(Ordering::Relaxed)
                            && !dials.iter().any(|d| d.random == r.random && d.live());
                        (serve.then(|| (r.random, r.address.clone())), None)
                    }
                    (Some(PacketType::DialCls), Some(Payload::CloseDial(c))) => {
                        (None, Some(c.random))
                    }
                    _ => (None, None),
                };
                h.dispatch(p);
                let started = dialer.take_started();
                match (&starts, started.as_slice()) {
                    (None, []) => {}
                    (Some((random, address)), [(req, _)]) => {
                        assert_eq!((req.random, &req.address), (*random, address));
                    }
                    _ => panic!("expected to start {starts:?}, started {}", started.len()),
                }
                dials.extend(started.into_iter().map(|(req, ticket)| Dialing {
                    random: req.random,
                    ticket,
                }));
                if let Some(random) = cancels {
                    assert!(
                        !dials.iter().any(|d| d.random == random && d.live()),
                        "DIAL_CLS left dial {random} running"
                    );
                }
            }
            // A dial task finishes: connected, failed, or it was cancelled.
            3 => {
                let Some(i) = pick(input.u8(), dials.len()) else {
                    continue;
                };
                let connects = input.u8() & 1 == 1;
                let d = dials.swap_remove(i);
                if d.live() {
                    if !connects {
                        h.session.dial_failed(
                            &d.ticket,
                            "dial tcp 10.0.0.1:10250: connect: connection refused".into(),
                        );
                        continue;
                    }
                    let Some((id, parts)) = h.session.dial_succeeded(&d.ticket) else {
                        assert!(h.session.outbound.is_closed(), "dial {} lost", d.random);
                        continue;
                    };
                    assert!(id > last_id, "connectID {id} after {last_id}");
                    last_id = id;
                    h.established += 1;
                    h.connected(id, parts.generation);
                    h.start_relay(id, parts);
                    continue;
                }
                // It finished as it was cancelled (a dial task's select may take either): that
                // must change nothing, also when the server has dialled again under its id.
                let before = h.session.load();
                if connects {
                    assert!(
                        h.session.dial_succeeded(&d.ticket).is_none(),
                        "cancelled dial {} was established",
                        d.random
                    );
                } else {
                    h.session
                        .dial_failed(&d.ticket, "dial tcp: i/o timeout".into());
                }
                assert_eq!(
                    h.session.load(),
                    before,
                    "cancelled dial {} answered",
                    d.random
                );
            }
            4..=8 => h.relay_event(input.u8() % 4, &mut input),
            9 => h.peer_reads(input.u8()),
            // The agent's limits are reached, or no longer.
            _ => {
                dialer.refusing.fetch_xor(true, Ordering::Relaxed);
            }
        }
        h.check(dials.iter().filter(|d| d.live()).count());
    }

    h.close(dials.iter().filter(|d| d.live()).count());
    for d in &dials {
        assert!(!d.live(), "dial {} still running after the end", d.random);
        // Finishing after the end answers nothing.
        assert!(h.session.dial_succeeded(&d.ticket).is_none());
    }
    h.finish();
}
