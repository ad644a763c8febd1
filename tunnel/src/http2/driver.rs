//! One connection's task: the socket, TLS, HTTP/2 and the gRPC streams on it, driven from
//! a single `poll`. Received packets go to their stream's [`StreamEnd`] inline; packets to
//! send are pulled from the ends while the output is short, so a full socket pushes back on
//! them. Both the agent's connections (client, one stream) and the server's ports (server,
//! streams accepted through an [`Acceptor`]) run on it.
use super::conn::{Config, Connection, Event, Role};
use super::frame::{ConnError, Reason};
use super::grpc::{self, Deframer, Outgoing};
use super::headers::Headers;
use super::io::{Io, Socket};
use super::trim;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use spoke_proto::Packet;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tonic::Code;

/// Output held (encrypted or not) before the streams are asked for more.
const OUTPUT_HIGH: usize = 512 * 1024;
/// Turns of the loop before the task yields to others.
const BUDGET: usize = 64;

/// How a stream ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ended {
    /// The call finished with this status (trailers, ours or the peer's).
    Status(Code, String),
    /// The stream was reset.
    Reset(Reason),
    /// The connection went away.
    Connection(String),
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ended::Status(code, m) => write!(f, "status {code:?}: {m}"),
            Ended::Reset(r) => write!(f, "stream reset: {r}"),
            Ended::Connection(why) => write!(f, "connection: {why}"),
        }
    }
}

/// What one gRPC stream of packets is connected to.
pub trait StreamEnd: Send {
    /// A packet from the peer; `size` of its bytes on the wire (message and prefix) still
    /// count against the stream's window (see [`StreamEnd::defers_window`]). An error ends
    /// the stream with that status.
    fn packet(&mut self, p: Packet, size: usize) -> Result<(), (Code, String)>;
    /// The next packet to send; `Ready(None)` once this side has nothing more.
    fn poll_packet(&mut self, cx: &mut Context<'_>) -> Poll<Option<Packet>>;
    /// The stream is over; nothing more goes either way.
    fn ended(&mut self, how: &Ended);
    /// Whether received bytes go back to the peer's window only as this end consumes them
    /// ([`StreamEnd::poll_consumed`]) rather than as they are delivered: for an end that
    /// queues packets for someone slower, so the window is what bounds the queue.
    fn defers_window(&self) -> bool {
        false
    }
    /// Bytes consumed since the last call (each packet: its message length plus 5).
    fn poll_consumed(&mut self, _cx: &mut Context<'_>) -> usize {
        0
    }
}

/// The answer to a stream a peer opened: response headers and the stream's end.
pub type Accepted = Result<(Headers, Box<dyn StreamEnd>), (Code, String)>;

/// Decides what a stream a peer opens is for (server side).
pub trait Acceptor: Send {
    fn accept(&mut self, path: &str, headers: Headers) -> BoxFuture<'static, Accepted>;
}

struct Bound {
    /// `None` while the acceptor decides, or (client) until the response arrives.
    end: Option<Box<dyn StreamEnd>>,
    /// Messages that arrived before the stream had its end.
    early: Vec<(Bytes, usize)>,
    deframer: Deframer,
    /// The packet being sent, and how much of it went out.
    sending: Option<(Outgoing, usize)>,
    /// The response headers (client side), or why there are none.
    response: Option<Result<Headers, Ended>>,
    /// Received bytes not given back to the peer's window yet.
    held: usize,
}

impl Bound {
    fn new(end: Option<Box<dyn StreamEnd>>) -> Bound {
        Bound {
            end,
            early: Vec::new(),
            deframer: Deframer::default(),
            sending: None,
            response: None,
            held: 0,
        }
    }
}

/// Pings on a connection and gives up on one that does not answer.
struct Keepalive {
    every: Duration,
    timeout: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
    /// The ping we wait for.
    awaiting: Option<[u8; 8]>,
}

/// Settings of a driver.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub http2: Config,
    /// Largest gRPC message accepted.
    pub max_message: usize,
    /// Ping interval (zero: never) and how long an answer may take.
    pub keepalive: Duration,
    pub keepalive_timeout: Duration,
}

/// A connection and its streams.
pub struct Driver<S> {
    io: Io<S>,
    conn: Connection,
    streams: HashMap<u32, Bound>,
    acceptor: Option<Box<dyn Acceptor>>,
    accepting: FuturesUnordered<BoxFuture<'static, (u32, Accepted)>>,
    keepalive: Option<Keepalive>,
    max_message: usize,
    /// Scratch for messages cut from DATA.
    messages: Vec<Bytes>,
    /// When the connection gives its buffers back, and the timer of its next check.
    trim: trim::Clock,
    trim_timer: Pin<Box<tokio::time::Sleep>>,
}

impl<S: Socket> Driver<S> {
    /// A server connection whose streams `acceptor` takes.
    pub fn server(io: Io<S>, opts: Options, acceptor: Box<dyn Acceptor>) -> Driver<S> {
        Driver::new(io, Role::Server, opts, Some(acceptor))
    }

    /// A client connection.
    pub fn client(io: Io<S>, opts: Options) -> Driver<S> {
        Driver::new(io, Role::Client, opts, None)
    }

    fn new(io: Io<S>, role: Role, opts: Options, acceptor: Option<Box<dyn Acceptor>>) -> Self {
        let keepalive = (!opts.keepalive.is_zero()).then(|| Keepalive {
            every: opts.keepalive,
            timeout: opts.keepalive_timeout,
            timer: Box::pin(tokio::time::sleep(opts.keepalive)),
            awaiting: None,
        });
        Driver {
            io,
            conn: Connection::new(role, opts.http2),
            streams: HashMap::new(),
            acceptor,
            accepting: FuturesUnordered::new(),
            keepalive,
            max_message: opts.max_message,
            messages: Vec::new(),
            trim: trim::Clock::default(),
            trim_timer: Box::pin(tokio::time::sleep(trim::FIRST)),
        }
    }

    /// Opens a stream (client) and waits for its response headers. A call refused (a
    /// trailers-only response), a reset or a lost connection is an error.
    pub async fn open(&mut self, request: &Headers) -> Result<(u32, Headers), Ended> {
        let Some(id) = self.conn.open(request, false) else {
            return Err(Ended::Connection("no new stream allowed".into()));
        };
        self.streams.insert(id, Bound::new(None));
        std::future::poll_fn(|cx| {
            let answered = |d: &Self| d.streams.get(&id).is_none_or(|b| b.response.is_some());
            if answered(self) {
                return Poll::Ready(());
            }
            match self.poll_drive(cx) {
                Poll::Ready(r) => {
                    let why = match r {
                        Ok(()) => Ended::Connection("closed by the peer".into()),
                        Err(e) => e,
                    };
                    if let Some(b) = self.streams.get_mut(&id) {
                        b.response.get_or_insert(Err(why));
                    }
                    Poll::Ready(())
                }
                Poll::Pending if answered(self) => Poll::Ready(()),
                Poll::Pending => Poll::Pending,
            }
        })
        .await;
        match self.streams.get_mut(&id).and_then(|b| b.response.take()) {
            Some(Ok(h)) => Ok((id, h)),
            Some(Err(e)) => {
                self.streams.remove(&id);
                Err(e)
            }
            None => Err(Ended::Connection(
                "stream closed before its response".into(),
            )),
        }
    }

    /// Connects an opened stream to its end (packets already received go to it first).
    pub fn bind(&mut self, id: u32, end: Box<dyn StreamEnd>) {
        if let Some(b) = self.streams.get_mut(&id) {
            if !end.defers_window() {
                let held = std::mem::take(&mut b.held);
                self.conn.release(id, held);
            }
            b.end = Some(end);
            let early = std::mem::take(&mut b.early);
            for (m, held) in early {
                self.deliver(id, m, held);
            }
        } else {
            let mut end = end;
            end.ended(&Ended::Connection(
                "stream closed before it was bound".into(),
            ));
        }
    }

    /// Runs the connection until it ends: the peer closes it, an error, or (client) its
    /// last stream is over. Every stream's end hears how it ended.
    pub async fn run(mut self) -> Result<(), Ended> {
        let r = std::future::poll_fn(|cx| self.poll_drive(cx)).await;
        let why = match &r {
            Ok(()) => Ended::Connection("closed".into()),
            Err(e) => e.clone(),
        };
        self.end_all(&why);
        // Say goodbye if the socket still takes it; a failure changes nothing now.
        self.conn.go_away(Reason::NO_ERROR, "");
        while let Some(b) = self.conn.take_output() {
            self.io.queue(b);
        }
        // Last: nothing sealed after close_notify is read.
        self.io.close_notify();
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            std::future::poll_fn(|cx| self.io.poll_flush(cx)),
        )
        .await;
        r
    }

    fn end_all(&mut self, why: &Ended) {
        for (_, mut b) in self.streams.drain() {
            if let Some(mut end) = b.end.take() {
                end.ended(why);
            }
        }
    }

    /// One stream is over: its end hears how, the peer hears of it unless it said so.
    fn end_stream(&mut self, id: u32, how: Ended) {
        let Some(mut b) = self.streams.remove(&id) else {
            return;
        };
        // Whatever the stream still held goes back to the connection's window.
        self.conn.release(id, std::mem::take(&mut b.held));
        if let Some(mut end) = b.end.take() {
            end.ended(&how);
        } else if self.conn.role() == Role::Client {
            // Not bound yet: `open` is waiting for the answer; keep it for `open` to read.
            b.response.get_or_insert(Err(how));
            self.streams.insert(id, b);
        }
    }

    /// Everything there is to do now; `Ready` when the connection is over.
    fn poll_drive(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Ended>> {
        for _ in 0..BUDGET {
            let mut progress = false;
            while let Poll::Ready(Some((id, accepted))) = self.accepting.poll_next_unpin(cx) {
                self.accepted(id, accepted);
                progress = true;
            }
            match self.io.poll_read(cx) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(_)) => {
                    if let Err(e) = self.conn.recv(&mut self.io.plain) {
                        return Poll::Ready(Err(self.fail(e)));
                    }
                    progress = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(Ended::Connection(e.to_string()))),
                Poll::Pending => {}
            }
            self.events();
            if self.io.unsent() + self.conn.output_len() < OUTPUT_HIGH {
                progress |= self.pull(cx);
            }
            while let Some(b) = self.conn.take_output() {
                self.io.queue(b);
            }
            let unsent = self.io.unsent();
            if let Poll::Ready(Err(e)) = self.io.poll_flush(cx) {
                return Poll::Ready(Err(Ended::Connection(e.to_string())));
            }
            // Room made in the output lets the streams send more: go round again.
            progress |= self.io.unsent() < unsent;
            if let Err(e) = self.poll_keepalive(cx) {
                return Poll::Ready(Err(e));
            }
            let timer = &mut self.trim_timer;
            match self.trim.turn(progress, tokio::time::Instant::now, || {
                timer.as_mut().poll(cx).is_ready()
            }) {
                trim::Step::Nothing => {}
                trim::Step::Trim => self.io.trim(),
                trim::Step::Arm(after) => {
                    timer.as_mut().reset(tokio::time::Instant::now() + after);
                    let _ = timer.as_mut().poll(cx);
                }
            }
            if self.conn.role() == Role::Client
                && self.streams.is_empty()
                && self.io.unsent() == 0
                && !self.conn.has_output()
            {
                return Poll::Ready(Ok(()));
            }
            if !progress {
                return Poll::Pending;
            }
        }
        // Others get a turn; we come back at once.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// A connection error: GOAWAY with its reason goes out first.
    fn fail(&mut self, e: ConnError) -> Ended {
        self.conn.go_away(e.reason, &e.why);
        Ended::Connection(format!("HTTP/2 error: {e}"))
    }

    fn events(&mut self) {
        while let Some(ev) = self.conn.next_event() {
            match ev {
                Event::Headers {
                    stream,
                    headers,
                    end_stream,
                } => self.headers(stream, headers, end_stream),
                Event::Data {
                    stream,
                    data,
                    end_stream,
                } => self.data(stream, data, end_stream),
                Event::Reset { stream, reason, .. } => {
                    self.end_stream(stream, Ended::Reset(reason))
                }
                Event::GoAway { .. } | Event::WindowOpened { .. } => {}
                Event::PingAck(data) => {
                    if let Some(k) = self.keepalive.as_mut() {
                        if k.awaiting == Some(data) {
                            k.awaiting = None;
                            let next = tokio::time::Instant::now() + k.every;
                            k.timer.as_mut().reset(next);
                        }
                    }
                }
            }
        }
    }

    fn headers(&mut self, id: u32, headers: Headers, end_stream: bool) {
        if self.conn.role() == Role::Server && !self.streams.contains_key(&id) {
            self.open_by_peer(id, headers, end_stream);
            return;
        }
        let Some(b) = self.streams.get_mut(&id) else {
            return;
        };
        if b.response.is_none() && b.end.is_none() {
            // The response (client side); a trailers-only one refuses the call.
            b.response = Some(match grpc::status(&headers) {
                Some((code, m)) if end_stream => Err(Ended::Status(code, m)),
                _ if headers.get(":status") != Some("200") => Err(Ended::Status(
                    Code::Unknown,
                    format!(
                        "HTTP status {}",
                        headers.get(":status").unwrap_or("missing")
                    ),
                )),
                _ => Ok(headers),
            });
            if end_stream {
                self.conn.reset(id, Reason::CANCEL);
            }
            return;
        }
        if end_stream {
            // Trailers: the call is over.
            let (code, m) = grpc::status(&headers)
                .unwrap_or((Code::Unknown, "trailers without grpc-status".into()));
            self.conn.reset(id, Reason::NO_ERROR);
            self.end_stream(id, Ended::Status(code, m));
        }
    }

    fn open_by_peer(&mut self, id: u32, headers: Headers, end_stream: bool) {
        let path = match grpc::check_request(&headers) {
            Ok(p) => p.to_string(),
            Err((code, m)) => {
                self.conn
                    .send_headers(id, &grpc::trailers_only(code, &m), true);
                self.conn.reset(id, Reason::NO_ERROR);
                return;
            }
        };
        let Some(acceptor) = self.acceptor.as_mut() else {
            self.conn.reset(id, Reason::REFUSED_STREAM);
            return;
        };
        let fut = acceptor.accept(&path, headers);
        self.accepting
            .push(Box::pin(async move { (id, fut.await) }));
        self.streams.insert(id, Bound::new(None));
        if end_stream {
            // A request with no messages at all: nothing for a packet stream to do.
            self.end_stream(
                id,
                Ended::Status(Code::Ok, "request had no messages".into()),
            );
            self.conn
                .send_headers(id, &grpc::trailers_only(Code::Ok, ""), true);
        }
    }

    fn accepted(&mut self, id: u32, accepted: Accepted) {
        if !self.streams.contains_key(&id) {
            // Gone meanwhile (reset by the peer, connection ending): tell the end.
            if let Ok((_, mut end)) = accepted {
                end.ended(&Ended::Reset(Reason::CANCEL));
            }
            return;
        }
        match accepted {
            Ok((headers, end)) => {
                self.conn.send_headers(id, &headers, false);
                self.bind(id, end);
            }
            Err((code, m)) => {
                self.conn
                    .send_headers(id, &grpc::trailers_only(code, &m), true);
                self.conn.reset(id, Reason::NO_ERROR);
                self.streams.remove(&id);
            }
        }
    }

    fn data(&mut self, id: u32, data: Bytes, end_stream: bool) {
        let len = data.len();
        let Some(b) = self.streams.get_mut(&id) else {
            self.conn.release(id, len);
            return;
        };
        let mut msgs = std::mem::take(&mut self.messages);
        let gathered = b.deframer.buffered();
        let cut = b.deframer.push(data, self.max_message, &mut msgs);
        // Bytes of the messages complete now that were not already given back: a message
        // still being gathered gives its window back at once (else one larger than the
        // window would wait for itself; `max_message` bounds it), a complete one is held.
        let mut hold = 0;
        for (i, m) in msgs.drain(..).enumerate() {
            let size = m.len() + grpc::PREFIX;
            let held = if i == 0 {
                size.saturating_sub(gathered)
            } else {
                size
            };
            hold += held;
            self.deliver(id, m, held);
        }
        let hold = hold.min(len);
        self.messages = msgs;
        // Packets are with their end now. A session never holds them back: the window goes
        // back at once (what bounds memory is each connection's own buffer). An end that
        // queues them gives it back as they are taken.
        match self.streams.get_mut(&id) {
            Some(b) if b.end.as_ref().is_some_and(|e| !e.defers_window()) => {
                self.conn.release(id, len)
            }
            Some(b) => {
                b.held += hold;
                self.conn.release(id, len - hold);
            }
            None => self.conn.release(id, len),
        }
        if let Err(e) = cut {
            let m = match e {
                grpc::DeframeError::TooLarge(n) => {
                    format!(
                        "message of {n} bytes over the limit of {}",
                        self.max_message
                    )
                }
                grpc::DeframeError::Compressed => "compressed messages are not supported".into(),
            };
            self.finish(id, Code::ResourceExhausted, &m);
            return;
        }
        if end_stream {
            // The peer sent all it will: for a packet stream, the call is over.
            self.finish(id, Code::Ok, "");
        }
    }

    /// Hands `msg` to the stream's end; `held` of its bytes still count against the window.
    fn deliver(&mut self, id: u32, msg: Bytes, held: usize) {
        let Some(b) = self.streams.get_mut(&id) else {
            return;
        };
        let Some(end) = b.end.as_mut() else {
            b.early.push((msg, held));
            return;
        };
        let result = match grpc::decode(msg) {
            Ok(p) => end.packet(p, held),
            Err(e) => Err((Code::Internal, format!("undecodable packet: {e}"))),
        };
        if let Err((code, m)) = result {
            self.finish(id, code, &m);
        }
    }

    /// Ends a stream from our side with a status: trailers (server) or a reset (client).
    fn finish(&mut self, id: u32, code: Code, message: &str) {
        if !self.streams.contains_key(&id) {
            return;
        }
        match self.conn.role() {
            Role::Server => {
                self.conn
                    .send_headers(id, &grpc::trailers(code, message), true);
                self.conn.reset(id, Reason::NO_ERROR);
            }
            Role::Client => self.conn.reset(id, Reason::CANCEL),
        }
        // The reset above raised no event for a stream the trailers already closed.
        self.end_stream(id, Ended::Status(code, message.to_string()));
    }

    /// Sends what the streams have, within the windows, and gives back the window of what
    /// queueing ends consumed. True if anything happened.
    fn pull(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        let ids: Vec<u32> = self.streams.keys().copied().collect();
        for &id in &ids {
            let Some(b) = self.streams.get_mut(&id) else {
                continue;
            };
            let Some(end) = b.end.as_mut().filter(|e| e.defers_window()) else {
                continue;
            };
            let n = end.poll_consumed(cx).min(b.held);
            if n > 0 {
                b.held -= n;
                self.conn.release(id, n);
                progress = true;
            }
        }
        for id in ids {
            loop {
                if self.io.unsent() + self.conn.output_len() >= OUTPUT_HIGH {
                    return progress;
                }
                let Some(b) = self.streams.get_mut(&id) else {
                    break;
                };
                if b.sending.is_none() {
                    let Some(end) = b.end.as_mut() else {
                        break;
                    };
                    match end.poll_packet(cx) {
                        Poll::Ready(Some(p)) => b.sending = Some((grpc::encode(&p), 0)),
                        Poll::Ready(None) => {
                            self.finish(id, Code::Ok, "");
                            progress = true;
                            break;
                        }
                        Poll::Pending => break,
                    }
                }
                let room = self.conn.send_capacity(id).min(self.conn.max_send_frame());
                let Some((msg, sent)) = b.sending.as_mut() else {
                    break;
                };
                if room == 0 {
                    break;
                }
                let n = room.min(msg.len() - *sent);
                let head_part = if *sent < msg.head.len() {
                    let end = msg.head.len().min(*sent + n);
                    msg.head.slice(*sent..end)
                } else {
                    Bytes::new()
                };
                let body_from = sent.saturating_sub(msg.head.len());
                let body_to = (*sent + n).saturating_sub(msg.head.len());
                let body_part = msg.body.slice(body_from..body_to);
                *sent += n;
                let done = *sent == msg.len();
                if done {
                    b.sending = None;
                }
                self.conn.send_data(id, &head_part, body_part, false);
                progress = true;
            }
        }
        progress
    }

    fn poll_keepalive(&mut self, cx: &mut Context<'_>) -> Result<(), Ended> {
        let Some(k) = self.keepalive.as_mut() else {
            return Ok(());
        };
        while k.timer.as_mut().poll(cx).is_ready() {
            if k.awaiting.is_some() {
                return Err(Ended::Connection(format!(
                    "keepalive ping not answered within {:?}",
                    k.timeout
                )));
            }
            let data = rand::random::<[u8; 8]>();
            k.awaiting = Some(data);
            self.conn.ping(data);
            let next = tokio::time::Instant::now() + k.timeout;
            k.timer.as_mut().reset(next);
        }
        while let Some(b) = self.conn.take_output() {
            self.io.queue(b);
        }
        Ok(())
    }
}
