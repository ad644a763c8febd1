//! Raw HTTP/2 for replaying what real clients put on the wire: frames, the fixture format of
//! `tests/fixtures/real-clients/` (written by `tests/real-clients/goclient`), gRPC message framing
//! and a small connection driver that behaves like a client's HTTP/2 layer (acknowledges the
//! server's SETTINGS and PINGs, decodes its header blocks) while the test decides every byte the
//! client sends.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;
use spoke_proto::Packet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::BoxIo;

/// The client connection preface.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Frame types.
pub mod kind {
    /// DATA.
    pub const DATA: u8 = 0x0;
    /// HEADERS.
    pub const HEADERS: u8 = 0x1;
    /// RST_STREAM.
    pub const RST_STREAM: u8 = 0x3;
    /// SETTINGS.
    pub const SETTINGS: u8 = 0x4;
    /// PING.
    pub const PING: u8 = 0x6;
    /// GOAWAY.
    pub const GOAWAY: u8 = 0x7;
    /// CONTINUATION.
    pub const CONTINUATION: u8 = 0x9;
}

/// Frame flags.
pub mod flag {
    /// END_STREAM (DATA, HEADERS).
    pub const END_STREAM: u8 = 0x1;
    /// ACK (SETTINGS, PING).
    pub const ACK: u8 = 0x1;
    /// END_HEADERS (HEADERS, CONTINUATION).
    pub const END_HEADERS: u8 = 0x4;
    /// PADDED (DATA, HEADERS).
    pub const PADDED: u8 = 0x8;
    /// PRIORITY (HEADERS).
    pub const PRIORITY: u8 = 0x20;
}

/// One HTTP/2 frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Frame type ([`kind`]).
    pub kind: u8,
    /// Flags ([`flag`]).
    pub flags: u8,
    /// Stream identifier.
    pub stream: u32,
    /// Payload.
    pub payload: Bytes,
}

impl Frame {
    /// The frame's bytes on the wire.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(9 + self.payload.len());
        out.put_uint(self.payload.len() as u64, 3);
        out.put_u8(self.kind);
        out.put_u8(self.flags);
        out.put_u32(self.stream & 0x7fff_ffff);
        out.extend_from_slice(&self.payload);
        out
    }

    /// Parses exactly one frame from `bytes`.
    pub fn parse(bytes: &[u8]) -> anyhow::Result<Self> {
        anyhow::ensure!(
            bytes.len() >= 9,
            "{} bytes: shorter than a frame header",
            bytes.len()
        );
        let len =
            (usize::from(bytes[0]) << 16) | (usize::from(bytes[1]) << 8) | usize::from(bytes[2]);
        anyhow::ensure!(
            bytes.len() == 9 + len,
            "frame header says {len} payload bytes, unit has {}",
            bytes.len() - 9
        );
        Ok(Self {
            kind: bytes[3],
            flags: bytes[4],
            stream: u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]) & 0x7fff_ffff,
            payload: Bytes::copy_from_slice(&bytes[9..]),
        })
    }

    /// Whether this is a SETTINGS or PING acknowledgement.
    pub fn is_ack(&self) -> bool {
        matches!(self.kind, kind::SETTINGS | kind::PING) && self.flags & flag::ACK != 0
    }
}

/// A unit a client wrote: the preface or one frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unit {
    /// The connection preface.
    Preface,
    /// One frame.
    Frame(Frame),
}

/// Directory of the real-client fixtures.
pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/real-clients")
}

/// Parses a fixture: `c <hex>` lines are units the client wrote, `#` lines and blank lines are
/// ignored.
pub fn parse_fixture(text: &str) -> anyhow::Result<Vec<Unit>> {
    let mut units = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let hex = line
            .strip_prefix("c ")
            .with_context(|| format!("line {}: neither `c <hex>` nor a comment", n + 1))?;
        let bytes = decode_hex(hex.trim()).with_context(|| format!("line {}", n + 1))?;
        units.push(if bytes == PREFACE {
            Unit::Preface
        } else {
            Unit::Frame(Frame::parse(&bytes).with_context(|| format!("line {}", n + 1))?)
        });
    }
    anyhow::ensure!(
        units.first() == Some(&Unit::Preface),
        "a client's bytes start with the connection preface"
    );
    Ok(units)
}

/// Loads `tests/fixtures/real-clients/<name>`.
pub fn load_fixture(name: &str) -> anyhow::Result<Vec<Unit>> {
    let path = fixtures_dir().join(name);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    parse_fixture(&text).with_context(|| format!("fixture {}", path.display()))
}

fn decode_hex(s: &str) -> anyhow::Result<Vec<u8>> {
    anyhow::ensure!(s.len().is_multiple_of(2), "odd number of hex digits");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).with_context(|| format!("bad hex at {i}")))
        .collect()
}

/// A decoded header list, in order (names lower-case on the wire; values as text).
pub type Fields = Vec<(String, String)>;

/// Decodes the header blocks one side of a connection sent, in order, with one HPACK decoder
/// (later blocks may refer to the dynamic table earlier ones filled).
pub fn decode_blocks<'a>(
    blocks: impl IntoIterator<Item = &'a [u8]>,
) -> anyhow::Result<Vec<Fields>> {
    let mut decoder = loona_hpack::Decoder::new();
    blocks
        .into_iter()
        .enumerate()
        .map(|(i, b)| {
            decode_with(&mut decoder, b).with_context(|| format!("header block #{}", i + 1))
        })
        .collect()
}

fn decode_with(
    decoder: &mut loona_hpack::Decoder<'static>,
    block: &[u8],
) -> anyhow::Result<Fields> {
    let fields = decoder
        .decode(block)
        .map_err(|e| anyhow::anyhow!("HPACK decoding failed: {e:?}"))?;
    Ok(fields
        .into_iter()
        .map(|(n, v)| {
            (
                String::from_utf8_lossy(&n).into_owned(),
                String::from_utf8_lossy(&v).into_owned(),
            )
        })
        .collect())
}

/// Values of header `name` in `fields`.
pub fn values<'a>(fields: &'a Fields, name: &str) -> Vec<&'a str> {
    fields
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
        .collect()
}

/// A length-prefixed, uncompressed gRPC message carrying `packet`, as the payload of a DATA frame.
pub fn grpc_message(packet: &Packet) -> Bytes {
    let body = packet.encode_to_vec();
    let mut out = BytesMut::with_capacity(5 + body.len());
    out.put_u8(0);
    out.put_u32(body.len() as u32);
    out.extend_from_slice(&body);
    out.freeze()
}

/// The packet of a DATA payload that holds exactly one uncompressed gRPC message.
pub fn packet_of(payload: &[u8]) -> anyhow::Result<Packet> {
    anyhow::ensure!(
        payload.len() >= 5,
        "DATA payload shorter than a gRPC message prefix"
    );
    anyhow::ensure!(payload[0] == 0, "compressed gRPC message");
    let len = u32::from_be_bytes([payload[1], payload[2], payload[3], payload[4]]) as usize;
    anyhow::ensure!(
        payload.len() == 5 + len,
        "DATA payload is not exactly one gRPC message ({} bytes, prefix says {len})",
        payload.len() - 5
    );
    Packet::decode(&payload[5..]).context("decoding the packet")
}

/// Name of an HTTP/2 error code.
pub fn reason(code: u32) -> String {
    const NAMES: [&str; 14] = [
        "NO_ERROR",
        "PROTOCOL_ERROR",
        "INTERNAL_ERROR",
        "FLOW_CONTROL_ERROR",
        "SETTINGS_TIMEOUT",
        "STREAM_CLOSED",
        "FRAME_SIZE_ERROR",
        "REFUSED_STREAM",
        "CANCEL",
        "COMPRESSION_ERROR",
        "CONNECT_ERROR",
        "ENHANCE_YOUR_CALM",
        "INADEQUATE_SECURITY",
        "HTTP_1_1_REQUIRED",
    ];
    NAMES
        .get(code as usize)
        .map_or_else(|| format!("error code {code}"), |n| n.to_string())
}

/// What the server did, as seen by [`H2Conn::next`].
#[derive(Debug, Clone)]
pub enum Event {
    /// A complete header block (response headers or trailers).
    Headers {
        /// Stream.
        stream: u32,
        /// Decoded fields.
        fields: Fields,
        /// END_STREAM was set (trailers, or a trailers-only response).
        end_stream: bool,
    },
    /// One whole gRPC message.
    Message {
        /// Stream.
        stream: u32,
        /// The message (without its 5-byte prefix).
        body: Bytes,
    },
    /// DATA with END_STREAM.
    EndStream {
        /// Stream.
        stream: u32,
    },
    /// RST_STREAM.
    Reset {
        /// Stream.
        stream: u32,
        /// Error code.
        code: u32,
    },
    /// GOAWAY.
    GoAway {
        /// Last stream id the server processed.
        last_stream: u32,
        /// Error code.
        code: u32,
        /// Debug data.
        debug: String,
    },
    /// The server closed the connection.
    Closed,
}

impl std::fmt::Display for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Event::Headers {
                stream,
                fields,
                end_stream,
            } => write!(
                f,
                "HEADERS on stream {stream} (end_stream={end_stream}): {fields:?}"
            ),
            Event::Message { stream, body } => {
                write!(f, "a {}-byte gRPC message on stream {stream}", body.len())
            }
            Event::EndStream { stream } => write!(f, "END_STREAM on stream {stream}"),
            Event::Reset { stream, code } => {
                write!(f, "RST_STREAM {} on stream {stream}", reason(*code))
            }
            Event::GoAway {
                last_stream,
                code,
                debug,
            } => write!(
                f,
                "GOAWAY {} (last stream {last_stream}) {debug:?}",
                reason(*code)
            ),
            Event::Closed => write!(f, "the server closed the connection"),
        }
    }
}

/// A client-side HTTP/2 connection whose outgoing bytes the test writes itself. Reading, it
/// does what every client's HTTP/2 layer does on its own: acknowledges SETTINGS and PINGs and
/// decodes header blocks with one HPACK decoder per connection. It sends no WINDOW_UPDATE, so it
/// suits exchanges under the default 64 KiB windows.
pub struct H2Conn {
    io: BoxIo,
    rbuf: BytesMut,
    decoder: loona_hpack::Decoder<'static>,
    /// Header block being assembled from HEADERS + CONTINUATION: (stream, end_stream, bytes).
    partial: Option<(u32, bool, Vec<u8>)>,
    /// Unfinished gRPC messages per stream.
    messages: HashMap<u32, BytesMut>,
    ready: VecDeque<Event>,
    settings_seen: usize,
}

impl std::fmt::Debug for H2Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Conn")
            .field("settings_seen", &self.settings_seen)
            .finish_non_exhaustive()
    }
}

impl H2Conn {
    /// Wraps a connected stream (plaintext or TLS with ALPN `h2`); sends nothing yet.
    pub fn new(io: BoxIo) -> Self {
        Self {
            io,
            rbuf: BytesMut::with_capacity(64 * 1024),
            decoder: loona_hpack::Decoder::new(),
            partial: None,
            messages: HashMap::new(),
            ready: VecDeque::new(),
            settings_seen: 0,
        }
    }

    /// Writes `bytes` as they are.
    pub async fn send(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.io
            .write_all(bytes)
            .await
            .context("writing to the server")?;
        self.io.flush().await.context("flushing to the server")
    }

    /// Writes one unit.
    pub async fn send_unit(&mut self, unit: &Unit) -> anyhow::Result<()> {
        match unit {
            Unit::Preface => self.send(PREFACE).await,
            Unit::Frame(f) => self.send(&f.encode()).await,
        }
    }

    /// SETTINGS frames received from the server (each acknowledged).
    pub fn settings_seen(&self) -> usize {
        self.settings_seen
    }

    /// Reads until the server has sent `n` SETTINGS frames; other events stay queued for
    /// [`H2Conn::next`].
    pub async fn await_settings(&mut self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.settings_seen < n {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if !self.read_frame(left).await? {
                anyhow::bail!("the server closed the connection before its SETTINGS frame #{n}");
            }
        }
        Ok(())
    }

    /// The next event, within `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> anyhow::Result<Event> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(e) = self.ready.pop_front() {
                return Ok(e);
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if !self.read_frame(left).await? {
                return Ok(Event::Closed);
            }
        }
    }

    async fn fill(&mut self, want: usize, deadline: tokio::time::Instant) -> anyhow::Result<bool> {
        while self.rbuf.len() < want {
            let read = tokio::time::timeout_at(deadline, self.io.read_buf(&mut self.rbuf))
                .await
                .map_err(|_| anyhow::anyhow!("nothing from the server in time"))?;
            match read {
                Ok(0) => return Ok(false),
                Ok(_) => {}
                // A reset after the server's last frame reads as the connection ending.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(false),
                Err(e) => return Err(e).context("reading from the server"),
            }
        }
        Ok(true)
    }

    /// Reads and handles one frame; `false` when the connection ended.
    async fn read_frame(&mut self, timeout: Duration) -> anyhow::Result<bool> {
        let deadline = tokio::time::Instant::now() + timeout;
        if !self.fill(9, deadline).await? {
            return Ok(false);
        }
        let len = (usize::from(self.rbuf[0]) << 16)
            | (usize::from(self.rbuf[1]) << 8)
            | usize::from(self.rbuf[2]);
        if !self.fill(9 + len, deadline).await? {
            return Ok(false);
        }
        let mut head = self.rbuf.split_to(9);
        let payload = self.rbuf.split_to(len).freeze();
        let _len = head.get_uint(3);
        let frame = Frame {
            kind: head.get_u8(),
            flags: head.get_u8(),
            stream: head.get_u32() & 0x7fff_ffff,
            payload,
        };
        self.handle(frame).await?;
        Ok(true)
    }

    async fn handle(&mut self, f: Frame) -> anyhow::Result<()> {
        match f.kind {
            kind::SETTINGS if f.flags & flag::ACK == 0 => {
                self.settings_seen += 1;
                self.send(&settings_ack().encode()).await?;
            }
            kind::PING if f.flags & flag::ACK == 0 => {
                let ack = Frame {
                    kind: kind::PING,
                    flags: flag::ACK,
                    stream: 0,
                    payload: f.payload,
                };
                self.send(&ack.encode()).await?;
            }
            kind::HEADERS => {
                let mut block = unpad(&f)?;
                if f.flags & flag::PRIORITY != 0 {
                    anyhow::ensure!(block.len() >= 5, "HEADERS too short for its priority");
                    block.advance(5);
                }
                let end_stream = f.flags & flag::END_STREAM != 0;
                self.partial = Some((f.stream, end_stream, block.to_vec()));
                if f.flags & flag::END_HEADERS != 0 {
                    self.finish_headers()?;
                }
            }
            kind::CONTINUATION => {
                let (_, _, block) = self
                    .partial
                    .as_mut()
                    .context("CONTINUATION without HEADERS")?;
                block.extend_from_slice(&f.payload);
                if f.flags & flag::END_HEADERS != 0 {
                    self.finish_headers()?;
                }
            }
            kind::DATA => {
                let data = unpad(&f)?;
                let buf = self.messages.entry(f.stream).or_default();
                buf.extend_from_slice(&data);
                while buf.len() >= 5 {
                    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
                    if buf.len() < 5 + len {
                        break;
                    }
                    anyhow::ensure!(buf[0] == 0, "the server sent a compressed gRPC message");
                    buf.advance(5);
                    let body = buf.split_to(len).freeze();
                    self.ready.push_back(Event::Message {
                        stream: f.stream,
                        body,
                    });
                }
                if f.flags & flag::END_STREAM != 0 {
                    self.ready.push_back(Event::EndStream { stream: f.stream });
                }
            }
            kind::RST_STREAM => {
                anyhow::ensure!(
                    f.payload.len() == 4,
                    "RST_STREAM of {} bytes",
                    f.payload.len()
                );
                let code =
                    u32::from_be_bytes([f.payload[0], f.payload[1], f.payload[2], f.payload[3]]);
                self.ready.push_back(Event::Reset {
                    stream: f.stream,
                    code,
                });
            }
            kind::GOAWAY => {
                anyhow::ensure!(f.payload.len() >= 8, "GOAWAY of {} bytes", f.payload.len());
                let p = &f.payload;
                self.ready.push_back(Event::GoAway {
                    last_stream: u32::from_be_bytes([p[0], p[1], p[2], p[3]]) & 0x7fff_ffff,
                    code: u32::from_be_bytes([p[4], p[5], p[6], p[7]]),
                    debug: String::from_utf8_lossy(&p[8..]).into_owned(),
                });
            }
            // SETTINGS/PING acks, WINDOW_UPDATE, PRIORITY, unknown types: nothing to do.
            _ => {}
        }
        Ok(())
    }

    fn finish_headers(&mut self) -> anyhow::Result<()> {
        let (stream, end_stream, block) = self.partial.take().context("no header block")?;
        let fields = decode_with(&mut self.decoder, &block)
            .with_context(|| format!("the server's header block on stream {stream}"))?;
        self.ready.push_back(Event::Headers {
            stream,
            fields,
            end_stream,
        });
        Ok(())
    }
}

/// An empty SETTINGS acknowledgement.
pub fn settings_ack() -> Frame {
    Frame {
        kind: kind::SETTINGS,
        flags: flag::ACK,
        stream: 0,
        payload: Bytes::new(),
    }
}

fn unpad(f: &Frame) -> anyhow::Result<Bytes> {
    let mut p = f.payload.clone();
    if f.flags & flag::PADDED != 0 {
        anyhow::ensure!(!p.is_empty(), "PADDED frame without a pad length");
        let pad = usize::from(p[0]);
        p.advance(1);
        anyhow::ensure!(pad <= p.len(), "padding longer than the frame");
        p.truncate(p.len() - pad);
    }
    Ok(p)
}
