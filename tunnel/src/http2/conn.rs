//! An HTTP/2 connection without I/O: bytes the peer sent go in, events and bytes to send come
//! out. It keeps the protocol's state — settings, both levels of flow-control windows, stream
//! states, header compression, pings — and refuses what RFC 9113 forbids with the right
//! stream or connection error. Who drives it decides how bytes reach the socket.
use super::frame::{self, flag, kind, setting, ConnError, Head, Reason};
use super::headers::Headers;
use super::hpack::Decoder;
use bytes::{Buf, Bytes, BytesMut};
use loona_hpack::Encoder;
use std::collections::{HashMap, VecDeque};

/// Which end of the connection this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Client,
    Server,
}

/// What this end advertises and accepts.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// SETTINGS_MAX_FRAME_SIZE: the largest frame the peer may send us.
    pub max_frame_size: u32,
    /// SETTINGS_INITIAL_WINDOW_SIZE: each stream's receive window.
    pub stream_window: u32,
    /// The connection's receive window (raised from 65,535 by a WINDOW_UPDATE at start).
    pub connection_window: u32,
    /// SETTINGS_MAX_CONCURRENT_STREAMS: how many streams the peer may open at once.
    pub max_concurrent_streams: u32,
    /// SETTINGS_MAX_HEADER_LIST_SIZE, and the bound on a header block as received.
    pub max_header_list_size: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_frame_size: 1 << 20,
            stream_window: 16 << 20,
            connection_window: 32 << 20,
            max_concurrent_streams: 1000,
            max_header_list_size: 64 << 10,
        }
    }
}

/// What the peer did, for whoever drives the connection.
#[derive(Debug, PartialEq)]
pub enum Event {
    /// A header block: request or response headers, or trailers.
    Headers {
        stream: u32,
        headers: Headers,
        end_stream: bool,
    },
    /// Stream data. Its bytes count against the receive windows until [`Connection::release`].
    Data {
        stream: u32,
        data: Bytes,
        end_stream: bool,
    },
    /// A stream was reset: by the peer (or it refused one of ours), or by us.
    Reset {
        stream: u32,
        reason: Reason,
        by_peer: bool,
    },
    /// The peer is going away: streams above `last_stream` were not processed.
    GoAway {
        last_stream: u32,
        reason: Reason,
        debug: Bytes,
    },
    /// The peer answered one of our pings.
    PingAck([u8; 8]),
    /// More may be sent: a window grew (stream 0: the connection's).
    WindowOpened { stream: u32 },
}

#[derive(Debug)]
struct Stream {
    /// What we may still send on it (may go negative after a SETTINGS change).
    send_window: i64,
    /// What the peer may still send on it.
    recv_window: i64,
    /// Received bytes released since the last WINDOW_UPDATE.
    unacked: u32,
    local_done: bool,
    remote_done: bool,
}

/// A header block arriving in HEADERS + CONTINUATION frames.
struct Pending {
    stream: u32,
    end_stream: bool,
    block: Vec<u8>,
}

pub struct Connection {
    role: Role,
    config: Config,
    /// The client preface bytes still expected (server only).
    preface_left: usize,
    // What the peer allows us.
    peer_max_frame: u32,
    peer_stream_window: u32,
    peer_max_streams: u32,
    /// The connection's send window.
    send_window: i64,
    recv_window: i64,
    unacked: u32,
    streams: HashMap<u32, Stream>,
    /// Highest stream id the peer opened; every lower idle one is implicitly closed.
    last_peer_stream: u32,
    next_own_stream: u32,
    pending: Option<Pending>,
    decoder: Decoder,
    encoder: Encoder<'static>,
    /// Frames waiting to be written, in order.
    out: VecDeque<Bytes>,
    /// Small frames collected before they join `out`.
    scratch: BytesMut,
    events: VecDeque<Event>,
    goaway_sent: bool,
    goaway_received: bool,
}

/// The HPACK table size both ends use: the default, which we never change.
const TABLE_SIZE: usize = 4096;

impl Connection {
    pub fn new(role: Role, config: Config) -> Connection {
        let mut encoder = Encoder::new();
        // Never index: no dynamic-table state to keep in step with the peer's settings.
        encoder.set_max_table_size(0);
        let mut c = Connection {
            role,
            config,
            preface_left: if role == Role::Server {
                frame::PREFACE.len()
            } else {
                0
            },
            peer_max_frame: frame::DEFAULT_MAX_FRAME,
            peer_stream_window: frame::DEFAULT_WINDOW,
            peer_max_streams: u32::MAX,
            send_window: i64::from(frame::DEFAULT_WINDOW),
            recv_window: i64::from(config.connection_window),
            unacked: 0,
            streams: HashMap::new(),
            last_peer_stream: 0,
            next_own_stream: if role == Role::Client { 1 } else { 2 },
            pending: None,
            decoder: Decoder::new(TABLE_SIZE),
            encoder,
            out: VecDeque::new(),
            scratch: BytesMut::new(),
            events: VecDeque::new(),
            goaway_sent: false,
            goaway_received: false,
        };
        if role == Role::Client {
            c.scratch.extend_from_slice(frame::PREFACE);
        }
        let mut settings = vec![
            (setting::MAX_FRAME_SIZE, config.max_frame_size),
            (setting::INITIAL_WINDOW_SIZE, config.stream_window),
            (setting::MAX_HEADER_LIST_SIZE, config.max_header_list_size),
        ];
        match role {
            Role::Client => settings.push((setting::ENABLE_PUSH, 0)),
            Role::Server => settings.push((
                setting::MAX_CONCURRENT_STREAMS,
                config.max_concurrent_streams,
            )),
        }
        frame::put_settings(&mut c.scratch, &settings);
        let extra = config
            .connection_window
            .saturating_sub(frame::DEFAULT_WINDOW);
        if extra > 0 {
            frame::put_window_update(&mut c.scratch, 0, extra);
        }
        c
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn next_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The next piece of output, in order.
    pub fn take_output(&mut self) -> Option<Bytes> {
        self.flush_scratch();
        self.out.pop_front()
    }

    pub fn has_output(&self) -> bool {
        !self.out.is_empty() || !self.scratch.is_empty()
    }

    /// Bytes of output waiting.
    pub fn output_len(&self) -> usize {
        self.scratch.len() + self.out.iter().map(Bytes::len).sum::<usize>()
    }

    fn flush_scratch(&mut self) {
        if !self.scratch.is_empty() {
            let s = self.scratch.split().freeze();
            self.out.push_back(s);
        }
    }

    /// Open streams (not fully closed).
    pub fn stream_count(&self) -> usize {
        self.streams.len()
    }

    pub fn is_open(&self, stream: u32) -> bool {
        self.streams.contains_key(&stream)
    }

    pub fn going_away(&self) -> bool {
        self.goaway_sent || self.goaway_received
    }

    /// How many bytes of DATA may be sent on `stream` now.
    pub fn send_capacity(&self, stream: u32) -> usize {
        let Some(s) = self.streams.get(&stream) else {
            return 0;
        };
        if s.local_done {
            return 0;
        }
        s.send_window.min(self.send_window).max(0) as usize
    }

    /// The largest DATA payload the peer accepts in one frame.
    pub fn max_send_frame(&self) -> usize {
        self.peer_max_frame as usize
    }

    // ---- receiving ----------------------------------------------------------------------

    /// Takes every complete frame at the front of `buf` (partial ones stay). Events and
    /// replies queue up; an error is a connection error: send [`Connection::go_away`] and close.
    pub fn recv(&mut self, buf: &mut BytesMut) -> Result<(), ConnError> {
        if self.preface_left > 0 {
            let seen = frame::PREFACE.len() - self.preface_left;
            let n = self.preface_left.min(buf.len());
            if buf[..n] != frame::PREFACE[seen..seen + n] {
                return Err(ConnError::new(
                    Reason::PROTOCOL_ERROR,
                    "not an HTTP/2 connection preface",
                ));
            }
            buf.advance(n);
            self.preface_left -= n;
            if self.preface_left > 0 {
                return Ok(());
            }
        }
        while buf.len() >= frame::HEADER_LEN {
            let head = Head::parse(buf);
            if head.len > self.config.max_frame_size {
                return Err(ConnError::new(
                    Reason::FRAME_SIZE_ERROR,
                    format!(
                        "{} byte frame, over our maximum {}",
                        head.len, self.config.max_frame_size
                    ),
                ));
            }
            let total = frame::HEADER_LEN + head.len as usize;
            if buf.len() < total {
                // Room for the rest, so the next read completes it.
                buf.reserve(total - buf.len());
                break;
            }
            let mut f = buf.split_to(total).freeze();
            f.advance(frame::HEADER_LEN);
            self.frame(head, f)?;
        }
        Ok(())
    }

    fn frame(&mut self, head: Head, payload: Bytes) -> Result<(), ConnError> {
        if let Some(p) = &self.pending {
            if head.kind != kind::CONTINUATION || head.stream != p.stream {
                return Err(ConnError::new(
                    Reason::PROTOCOL_ERROR,
                    "a header block was interrupted",
                ));
            }
        }
        match head.kind {
            kind::DATA => self.data(head, payload),
            kind::HEADERS => self.headers(head, payload),
            kind::CONTINUATION => self.continuation(head, payload),
            kind::SETTINGS => self.settings(head, payload),
            kind::PING => self.ping_frame(head, payload),
            kind::WINDOW_UPDATE => self.window_update(head, payload),
            kind::RST_STREAM => self.rst(head, payload),
            kind::GOAWAY => self.goaway(head, payload),
            kind::PRIORITY => {
                if head.stream == 0 || payload.len() != 5 {
                    return Err(ConnError::new(Reason::PROTOCOL_ERROR, "bad PRIORITY"));
                }
                Ok(())
            }
            kind::PUSH_PROMISE => Err(ConnError::new(
                Reason::PROTOCOL_ERROR,
                "PUSH_PROMISE is not enabled",
            )),
            // Unknown frame types are ignored (RFC 9113 §4.1).
            _ => Ok(()),
        }
    }

    /// Whether `stream` is one the peer may open (its parity) and has not used yet.
    fn peer_initiated(&self, stream: u32) -> bool {
        match self.role {
            Role::Server => stream % 2 == 1,
            Role::Client => stream.is_multiple_of(2),
        }
    }

    /// A stream that once existed (or was skipped over) and is closed now.
    fn was_used(&self, stream: u32) -> bool {
        if self.peer_initiated(stream) {
            stream <= self.last_peer_stream
        } else {
            stream < self.next_own_stream
        }
    }

    fn data(&mut self, head: Head, payload: Bytes) -> Result<(), ConnError> {
        if head.stream == 0 {
            return Err(ConnError::new(Reason::PROTOCOL_ERROR, "DATA on stream 0"));
        }
        // The whole frame counts against the windows, padding included.
        let len = i64::from(head.len);
        self.recv_window -= len;
        if self.recv_window < 0 {
            return Err(ConnError::new(
                Reason::FLOW_CONTROL_ERROR,
                "DATA past the connection window",
            ));
        }
        let data = frame::unpad(&head, payload)?;
        let padding = head.len - data.len() as u32;
        let end = head.has(flag::END_STREAM);
        let Some(s) = self.streams.get_mut(&head.stream) else {
            if !self.was_used(head.stream) {
                return Err(ConnError::new(
                    Reason::PROTOCOL_ERROR,
                    "DATA on an idle stream",
                ));
            }
            // Late data for a stream already closed (or reset): ignored, its window returned.
            self.release_connection(head.len);
            return Ok(());
        };
        if s.remote_done {
            self.release_connection(head.len);
            self.reset(head.stream, Reason::STREAM_CLOSED);
            return Ok(());
        }
        s.recv_window -= len;
        if s.recv_window < 0 {
            self.release_connection(head.len);
            self.reset(head.stream, Reason::FLOW_CONTROL_ERROR);
            return Ok(());
        }
        if end {
            s.remote_done = true;
        }
        // Padding is nobody's to release: give it back now.
        if padding > 0 {
            self.release(head.stream, padding as usize);
        }
        if !data.is_empty() || end {
            self.events.push_back(Event::Data {
                stream: head.stream,
                data,
                end_stream: end,
            });
        }
        self.close_if_done(head.stream);
        Ok(())
    }

    fn headers(&mut self, head: Head, payload: Bytes) -> Result<(), ConnError> {
        if head.stream == 0 {
            return Err(ConnError::new(
                Reason::PROTOCOL_ERROR,
                "HEADERS on stream 0",
            ));
        }
        let fragment = frame::unpad(&head, payload)?;
        self.pending = Some(Pending {
            stream: head.stream,
            end_stream: head.has(flag::END_STREAM),
            block: fragment.to_vec(),
        });
        self.check_block_size()?;
        if head.has(flag::END_HEADERS) {
            self.header_block()?;
        }
        Ok(())
    }

    fn continuation(&mut self, head: Head, payload: Bytes) -> Result<(), ConnError> {
        let Some(p) = self.pending.as_mut() else {
            return Err(ConnError::new(
                Reason::PROTOCOL_ERROR,
                "CONTINUATION without HEADERS",
            ));
        };
        p.block.extend_from_slice(&payload);
        self.check_block_size()?;
        if head.has(flag::END_HEADERS) {
            self.header_block()?;
        }
        Ok(())
    }

    fn check_block_size(&self) -> Result<(), ConnError> {
        let size = self.pending.as_ref().map_or(0, |p| p.block.len());
        // A compressed block can only be smaller than its list; past 4× the list limit
        // it is not worth decoding.
        if size > 4 * self.config.max_header_list_size as usize {
            return Err(ConnError::new(
                Reason::ENHANCE_YOUR_CALM,
                "header block too large",
            ));
        }
        Ok(())
    }

    fn header_block(&mut self) -> Result<(), ConnError> {
        let Some(p) = self.pending.take() else {
            return Ok(());
        };
        let mut fields = Vec::new();
        let mut size = 0usize;
        let limit = self.config.max_header_list_size as usize;
        self.decoder
            .decode(&p.block, |n, v| {
                size += n.len() + v.len() + 32;
                // Past the limit the stream is refused: keep decoding (the table must stay
                // in step) but hold nothing more.
                if size <= limit {
                    fields.push((n, v));
                }
            })
            .map_err(|e| ConnError::new(Reason::COMPRESSION_ERROR, e.to_string()))?;
        let stream = p.stream;
        if size > limit {
            self.refuse(stream, Reason::PROTOCOL_ERROR);
            return Ok(());
        }
        let headers = Headers::from_fields(fields);
        let known = self.streams.contains_key(&stream);
        let used = self.was_used(stream);
        if let Some(s) = self.streams.get_mut(&stream) {
            if s.remote_done {
                self.reset(stream, Reason::STREAM_CLOSED);
                return Ok(());
            }
            // Response headers or trailers.
            if p.end_stream {
                s.remote_done = true;
            }
        } else if self.peer_initiated(stream) && !used {
            self.last_peer_stream = stream;
            if self.goaway_sent {
                return Ok(());
            }
            if self.streams.len() >= self.config.max_concurrent_streams as usize {
                frame::put_rst(&mut self.scratch, stream, Reason::REFUSED_STREAM);
                return Ok(());
            }
            self.streams.insert(
                stream,
                Stream {
                    send_window: i64::from(self.peer_stream_window),
                    recv_window: i64::from(self.config.stream_window),
                    unacked: 0,
                    local_done: false,
                    remote_done: p.end_stream,
                },
            );
        } else if !known && used {
            frame::put_rst(&mut self.scratch, stream, Reason::STREAM_CLOSED);
            return Ok(());
        } else {
            return Err(ConnError::new(
                Reason::PROTOCOL_ERROR,
                format!("HEADERS on stream {stream}, which the peer may not open"),
            ));
        }
        self.events.push_back(Event::Headers {
            stream,
            headers,
            end_stream: p.end_stream,
        });
        self.close_if_done(stream);
        Ok(())
    }

    fn settings(&mut self, head: Head, payload: Bytes) -> Result<(), ConnError> {
        if head.stream != 0 {
            return Err(ConnError::new(
                Reason::PROTOCOL_ERROR,
                "SETTINGS on a stream",
            ));
        }
        if head.has(flag::ACK) {
            if !payload.is_empty() {
                return Err(ConnError::new(
                    Reason::FRAME_SIZE_ERROR,
                    "SETTINGS ACK with a payload",
                ));
            }
            return Ok(());
        }
        if !payload.len().is_multiple_of(6) {
            return Err(ConnError::new(Reason::FRAME_SIZE_ERROR, "SETTINGS length"));
        }
        for p in payload.chunks(6) {
            let id = u16::from_be_bytes([p[0], p[1]]);
            let v = u32::from_be_bytes([p[2], p[3], p[4], p[5]]);
            match id {
                setting::ENABLE_PUSH if v > 1 => {
                    return Err(ConnError::new(Reason::PROTOCOL_ERROR, "ENABLE_PUSH > 1"))
                }
                setting::INITIAL_WINDOW_SIZE => {
                    if v > frame::MAX_WINDOW {
                        return Err(ConnError::new(
                            Reason::FLOW_CONTROL_ERROR,
                            "INITIAL_WINDOW_SIZE too large",
                        ));
                    }
                    let delta = i64::from(v) - i64::from(self.peer_stream_window);
                    self.peer_stream_window = v;
                    for (id, s) in self.streams.iter_mut() {
                        s.send_window += delta;
                        if s.send_window > i64::from(frame::MAX_WINDOW) {
                            return Err(ConnError::new(
                                Reason::FLOW_CONTROL_ERROR,
                                "a stream window overflowed",
                            ));
                        }
                        if delta > 0 {
                            self.events.push_back(Event::WindowOpened { stream: *id });
                        }
                    }
                }
                setting::MAX_FRAME_SIZE => {
                    if !(frame::DEFAULT_MAX_FRAME..=frame::MAX_MAX_FRAME).contains(&v) {
                        return Err(ConnError::new(Reason::PROTOCOL_ERROR, "bad MAX_FRAME_SIZE"));
                    }
                    self.peer_max_frame = v;
                }
                setting::MAX_CONCURRENT_STREAMS => self.peer_max_streams = v,
                // Our encoder keeps no dynamic table, so the peer's size does not matter;
                // the header list size is advisory.
                _ => {}
            }
        }
        frame::put(&mut self.scratch, kind::SETTINGS, flag::ACK, 0, &[]);
        Ok(())
    }

    fn ping_frame(&mut self, head: Head, payload: Bytes) -> Result<(), ConnError> {
        if head.stream != 0 {
            return Err(ConnError::new(Reason::PROTOCOL_ERROR, "PING on a stream"));
        }
        let Ok(data) = <[u8; 8]>::try_from(&payload[..]) else {
            return Err(ConnError::new(Reason::FRAME_SIZE_ERROR, "PING length"));
        };
        if head.has(flag::ACK) {
            self.events.push_back(Event::PingAck(data));
        } else {
            frame::put(&mut self.scratch, kind::PING, flag::ACK, 0, &data);
        }
        Ok(())
    }

    fn window_update(&mut self, head: Head, payload: Bytes) -> Result<(), ConnError> {
        let Ok(b) = <[u8; 4]>::try_from(&payload[..]) else {
            return Err(ConnError::new(
                Reason::FRAME_SIZE_ERROR,
                "WINDOW_UPDATE length",
            ));
        };
        let inc = i64::from(u32::from_be_bytes(b) & 0x7fff_ffff);
        if head.stream == 0 {
            if inc == 0 {
                return Err(ConnError::new(Reason::PROTOCOL_ERROR, "zero WINDOW_UPDATE"));
            }
            self.send_window += inc;
            if self.send_window > i64::from(frame::MAX_WINDOW) {
                return Err(ConnError::new(
                    Reason::FLOW_CONTROL_ERROR,
                    "connection window overflowed",
                ));
            }
            self.events.push_back(Event::WindowOpened { stream: 0 });
            return Ok(());
        }
        let Some(s) = self.streams.get_mut(&head.stream) else {
            if !self.was_used(head.stream) {
                return Err(ConnError::new(
                    Reason::PROTOCOL_ERROR,
                    "WINDOW_UPDATE on an idle stream",
                ));
            }
            return Ok(());
        };
        if inc == 0 {
            self.reset(head.stream, Reason::PROTOCOL_ERROR);
            return Ok(());
        }
        s.send_window += inc;
        if s.send_window > i64::from(frame::MAX_WINDOW) {
            self.reset(head.stream, Reason::FLOW_CONTROL_ERROR);
            return Ok(());
        }
        self.events.push_back(Event::WindowOpened {
            stream: head.stream,
        });
        Ok(())
    }

    fn rst(&mut self, head: Head, payload: Bytes) -> Result<(), ConnError> {
        if head.stream == 0 {
            return Err(ConnError::new(
                Reason::PROTOCOL_ERROR,
                "RST_STREAM on stream 0",
            ));
        }
        let Ok(b) = <[u8; 4]>::try_from(&payload[..]) else {
            return Err(ConnError::new(
                Reason::FRAME_SIZE_ERROR,
                "RST_STREAM length",
            ));
        };
        if !self.was_used(head.stream) && !self.streams.contains_key(&head.stream) {
            return Err(ConnError::new(
                Reason::PROTOCOL_ERROR,
                "RST_STREAM on an idle stream",
            ));
        }
        if self.streams.remove(&head.stream).is_some() {
            self.events.push_back(Event::Reset {
                stream: head.stream,
                reason: Reason(u32::from_be_bytes(b)),
                by_peer: true,
            });
        }
        Ok(())
    }

    fn goaway(&mut self, head: Head, mut payload: Bytes) -> Result<(), ConnError> {
        if head.stream != 0 || payload.len() < 8 {
            return Err(ConnError::new(Reason::PROTOCOL_ERROR, "bad GOAWAY"));
        }
        let last_stream = payload.get_u32() & 0x7fff_ffff;
        let reason = Reason(payload.get_u32());
        self.goaway_received = true;
        // Our streams above `last_stream` were never processed: they are gone.
        let dropped: Vec<u32> = self
            .streams
            .keys()
            .copied()
            .filter(|id| !self.peer_initiated(*id) && *id > last_stream)
            .collect();
        for id in dropped {
            self.streams.remove(&id);
            self.events.push_back(Event::Reset {
                stream: id,
                reason: Reason::REFUSED_STREAM,
                by_peer: true,
            });
        }
        self.events.push_back(Event::GoAway {
            last_stream,
            reason,
            debug: payload,
        });
        Ok(())
    }

    // ---- sending ------------------------------------------------------------------------

    /// Opens a stream with request headers (client). `None` when the peer's stream limit or
    /// a GOAWAY forbids a new one.
    pub fn open(&mut self, headers: &Headers, end_stream: bool) -> Option<u32> {
        if self.role != Role::Client
            || self.going_away()
            || self.streams.len() >= self.peer_max_streams as usize
            || self.next_own_stream > frame::MAX_WINDOW
        {
            return None;
        }
        let id = self.next_own_stream;
        self.next_own_stream += 2;
        self.streams.insert(
            id,
            Stream {
                send_window: i64::from(self.peer_stream_window),
                recv_window: i64::from(self.config.stream_window),
                unacked: 0,
                local_done: false,
                remote_done: false,
            },
        );
        self.send_headers(id, headers, end_stream);
        Some(id)
    }

    /// Sends response headers or trailers on an open stream.
    pub fn send_headers(&mut self, stream: u32, headers: &Headers, end_stream: bool) {
        let Some(s) = self.streams.get_mut(&stream) else {
            return;
        };
        if s.local_done {
            return;
        }
        if end_stream {
            s.local_done = true;
        }
        let block = self.encoder.encode(headers.iter());
        let max = self.peer_max_frame as usize;
        let mut chunks = block.chunks(max).peekable();
        let first = chunks.next().unwrap_or(&[]);
        let mut flags = if end_stream { flag::END_STREAM } else { 0 };
        if chunks.peek().is_none() {
            flags |= flag::END_HEADERS;
        }
        frame::put(&mut self.scratch, kind::HEADERS, flags, stream, first);
        while let Some(c) = chunks.next() {
            let flags = if chunks.peek().is_none() {
                flag::END_HEADERS
            } else {
                0
            };
            frame::put(&mut self.scratch, kind::CONTINUATION, flags, stream, c);
        }
        self.close_if_done(stream);
    }

    /// Sends one DATA frame: `head` (a few bytes, copied) then `body` (queued as is). The
    /// caller keeps within [`Connection::send_capacity`] and [`Connection::max_send_frame`].
    pub fn send_data(&mut self, stream: u32, head: &[u8], body: Bytes, end_stream: bool) {
        let len = head.len() + body.len();
        let Some(s) = self.streams.get_mut(&stream) else {
            return;
        };
        if s.local_done {
            return;
        }
        s.send_window -= len as i64;
        self.send_window -= len as i64;
        if end_stream {
            s.local_done = true;
        }
        let flags = if end_stream { flag::END_STREAM } else { 0 };
        Head {
            len: len as u32,
            kind: kind::DATA,
            flags,
            stream,
        }
        .encode(&mut self.scratch);
        self.scratch.extend_from_slice(head);
        if !body.is_empty() {
            self.flush_scratch();
            self.out.push_back(body);
        }
        self.close_if_done(stream);
    }

    /// Gives back `n` received bytes of `stream` (the application took them), sending
    /// WINDOW_UPDATE once half a window is owed.
    pub fn release(&mut self, stream: u32, n: usize) {
        let n = n as u32;
        if let Some(s) = self.streams.get_mut(&stream) {
            if !s.remote_done {
                s.unacked += n;
                if s.unacked >= self.config.stream_window / 2 {
                    let inc = std::mem::take(&mut s.unacked);
                    s.recv_window += i64::from(inc);
                    frame::put_window_update(&mut self.scratch, stream, inc);
                }
            }
        }
        self.release_connection(n);
    }

    fn release_connection(&mut self, n: u32) {
        self.unacked += n;
        if self.unacked >= self.config.connection_window / 2 {
            let inc = std::mem::take(&mut self.unacked);
            self.recv_window += i64::from(inc);
            frame::put_window_update(&mut self.scratch, 0, inc);
        }
    }

    /// Abandons a stream: RST_STREAM to the peer; it is forgotten here.
    pub fn reset(&mut self, stream: u32, reason: Reason) {
        if self.streams.remove(&stream).is_some() {
            frame::put_rst(&mut self.scratch, stream, reason);
            self.events.push_back(Event::Reset {
                stream,
                reason,
                by_peer: false,
            });
        }
    }

    /// Refuses a stream the peer just opened, before anyone saw it.
    fn refuse(&mut self, stream: u32, reason: Reason) {
        self.streams.remove(&stream);
        if self.peer_initiated(stream) {
            self.last_peer_stream = self.last_peer_stream.max(stream);
        }
        frame::put_rst(&mut self.scratch, stream, reason);
    }

    pub fn ping(&mut self, data: [u8; 8]) {
        frame::put(&mut self.scratch, kind::PING, 0, 0, &data);
    }

    /// Tells the peer we are going away; no new streams are accepted after this.
    pub fn go_away(&mut self, reason: Reason, debug: &str) {
        if !self.goaway_sent {
            self.goaway_sent = true;
            let last = self.last_peer_stream;
            frame::put_goaway(&mut self.scratch, last, reason, debug.as_bytes());
        }
    }

    /// Forgets a stream both sides have finished.
    fn close_if_done(&mut self, stream: u32) {
        if self
            .streams
            .get(&stream)
            .is_some_and(|s| s.local_done && s.remote_done)
        {
            self.streams.remove(&stream);
        }
    }
}

#[cfg(test)]
mod tests;
