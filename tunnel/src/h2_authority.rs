//! Lets the gRPC frontend serve requests whose `:authority` the `h2` crate would refuse.
//!
//! grpc-go puts its dial target in `:authority`. kube-apiserver dials the egress Unix socket with
//! the socket *path* as target, so the authority is `/etc/kubernetes/.../x.socket` (grpc-go up to
//! 1.5x) or `%2Fetc%2F...` (newer grpc-go); Go's HTTP/2 server accepts both, but `h2` resets any
//! stream whose authority is not a valid URI authority (a `/`, a `%` in the host, an empty value)
//! before the application sees it. Spoke never uses the authority, so this filter sits between
//! the socket and `h2` and removes an authority `h2` would refuse; everything else passes as is.
//!
//! Only the client's header blocks (HEADERS + CONTINUATION) are touched: they are decoded with
//! the client's HPACK state and re-encoded with a state of our own that `h2`'s decoder mirrors,
//! so every header block is rewritten, not only the ones we change. All other frames — DATA
//! above all — are read straight into `h2`'s buffer: the filter only steps over their headers
//! and never copies their payload. The bytes that follow a header block in the same read are the
//! exception (moved aside once per header block, a few hundred bytes in practice).
//!
//! Anything the filter does not understand (no HTTP/2 preface, a CONTINUATION out of place) is
//! passed through unchanged from then on, so `h2` answers it as it would without the filter.
use bytes::{Buf, BufMut, BytesMut};
use loona_hpack::{Decoder, Encoder};
use prometheus_client::metrics::counter::Counter;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::io::poll_read_buf;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// HPACK table size: the default, which `h2` (as tonic configures it) never changes.
const TABLE_SIZE: usize = 4096;
/// Largest header block accepted (compressed); a client past it is disconnected.
const MAX_BLOCK: usize = 1 << 20;
/// Largest frame payload we emit: the smallest SETTINGS_MAX_FRAME_SIZE a peer may set.
const MAX_OUT_FRAME: usize = 16 * 1024;

/// What the filter counts.
#[derive(Clone, Debug, Default)]
pub struct FilterMetrics {
    /// Requests whose authority was removed.
    pub authorities_dropped: Counter,
    /// Connections closed because a header block could not be decoded or was too large.
    pub bad_header_blocks: Counter,
}

/// A header block being collected from HEADERS and its CONTINUATION frames.
struct Block {
    stream_id: u32,
    end_stream: bool,
    /// The 5 priority bytes of the HEADERS frame, if it had them.
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

/// An I/O stream that rewrites the client's HTTP/2 header blocks on the way in.
pub struct AuthorityFilter<IO> {
    io: IO,
    /// Preface bytes still expected (0 once seen).
    preface_left: usize,
    /// Payload bytes of the current pass-through frame still to come from the socket.
    payload_left: usize,
    /// Input held back because it starts a frame we must see whole.
    held: BytesMut,
    /// Output ready for the reader (rewritten frames, and bytes moved aside with `held`).
    out: BytesMut,
    block: Option<Block>,
    /// Stop filtering: the client speaks something we do not parse; `h2` will judge it.
    passthrough: bool,
    decoder: Decoder<'static>,
    encoder: Encoder<'static>,
    metrics: FilterMetrics,
}

impl<IO> AuthorityFilter<IO> {
    pub fn new(io: IO, metrics: FilterMetrics) -> Self {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(TABLE_SIZE);
        Self {
            io,
            preface_left: PREFACE.len(),
            payload_left: 0,
            held: BytesMut::new(),
            out: BytesMut::new(),
            block: None,
            passthrough: false,
            decoder,
            encoder: Encoder::new(),
            metrics,
        }
    }

    /// Steps over freshly read bytes that went straight to the reader. Returns the offset at
    /// which the reader must stop: the start of a frame this filter has to see whole.
    fn scan(&mut self, bytes: &[u8]) -> Option<usize> {
        let mut i = 0;
        while i < bytes.len() && !self.passthrough {
            if self.preface_left > 0 {
                let seen = PREFACE.len() - self.preface_left;
                let n = self.preface_left.min(bytes.len() - i);
                if bytes[i..i + n] != PREFACE[seen..seen + n] {
                    self.passthrough = true;
                    return None;
                }
                self.preface_left -= n;
                i += n;
            } else if self.payload_left > 0 {
                let n = self.payload_left.min(bytes.len() - i);
                self.payload_left -= n;
                i += n;
            } else {
                let rest = &bytes[i..];
                if rest.len() < FRAME_HEADER || matches!(rest[3], HEADERS | CONTINUATION) {
                    return Some(i);
                }
                self.payload_left = frame_len(rest);
                i += FRAME_HEADER;
            }
        }
        None
    }

    /// Works on `held`: returns how many more input bytes it needs, or 0 when `held` is empty.
    fn process_held(&mut self) -> io::Result<usize> {
        while !self.held.is_empty() {
            if self.passthrough {
                self.out.unsplit(self.held.split());
                return Ok(0);
            }
            if self.held.len() < FRAME_HEADER {
                return Ok(FRAME_HEADER - self.held.len());
            }
            let len = frame_len(&self.held);
            let kind = self.held[3];
            if !matches!(kind, HEADERS | CONTINUATION) {
                // A pass-through frame: what we hold of it goes out, the rest is read directly.
                let take = self.held.len().min(FRAME_HEADER + len);
                self.payload_left = FRAME_HEADER + len - take;
                let chunk = self.held.split_to(take);
                self.out.unsplit(chunk);
                continue;
            }
            if len + self.block.as_ref().map_or(0, |b| b.fragment.len()) > MAX_BLOCK {
                return Err(self.bad_block("header block too large"));
            }
            if self.held.len() < FRAME_HEADER + len {
                return Ok(FRAME_HEADER + len - self.held.len());
            }
            let frame = self.held.split_to(FRAME_HEADER + len);
            self.header_frame(frame)?;
        }
        Ok(0)
    }

    /// Takes one whole HEADERS or CONTINUATION frame.
    fn header_frame(&mut self, frame: BytesMut) -> io::Result<()> {
        let (kind, flags) = (frame[3], frame[4]);
        let stream_id = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
        let payload = &frame[FRAME_HEADER..];
        let in_sequence = match &self.block {
            None => kind == HEADERS,
            Some(b) => kind == CONTINUATION && b.stream_id == stream_id,
        };
        let parsed = match kind {
            HEADERS => headers_payload(flags, payload),
            _ => Some((None, payload)),
        };
        let Some((priority, fragment)) = parsed.filter(|_| in_sequence) else {
            // Out of sequence or malformed: a protocol error `h2` reports to the client itself.
            self.give_up(frame);
            return Ok(());
        };
        let block = self.block.get_or_insert_with(|| Block {
            stream_id,
            end_stream: flags & END_STREAM != 0,
            priority,
            fragment: Vec::new(),
        });
        block.fragment.extend_from_slice(fragment);
        if flags & END_HEADERS != 0 {
            if let Some(block) = self.block.take() {
                self.rewrite(block)?;
            }
        }
        Ok(())
    }

    /// Decodes a whole header block and queues it re-encoded, without an authority `h2` refuses.
    fn rewrite(&mut self, block: Block) -> io::Result<()> {
        let mut fields: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut dropped = false;
        let decoded = self.decoder.decode_with_cb(&block.fragment, |name, value| {
            if &name[..] == b":authority" && !authority_ok(&value) {
                dropped = true;
            } else {
                fields.push((name.into_owned(), value.into_owned()));
            }
        });
        if let Err(e) = decoded {
            return Err(self.bad_block(&format!("undecodable header block: {e}")));
        }
        if dropped {
            self.metrics.authorities_dropped.inc();
        }
        let encoded = self
            .encoder
            .encode(fields.iter().map(|(n, v)| (&n[..], &v[..])));
        self.queue_block(&block, &encoded);
        Ok(())
    }

    /// Frames an encoded block as HEADERS (+ CONTINUATION) into `out`.
    fn queue_block(&mut self, block: &Block, encoded: &[u8]) {
        let prio = block.priority.as_ref().map_or(&[][..], |p| &p[..]);
        let first_room = MAX_OUT_FRAME - prio.len();
        let (first, mut rest) = encoded.split_at(encoded.len().min(first_room));
        let mut flags = if block.end_stream { END_STREAM } else { 0 };
        if block.priority.is_some() {
            flags |= PRIORITY;
        }
        if rest.is_empty() {
            flags |= END_HEADERS;
        }
        put_frame(
            &mut self.out,
            HEADERS,
            flags,
            block.stream_id,
            &[prio, first],
        );
        while !rest.is_empty() {
            let (piece, tail) = rest.split_at(rest.len().min(MAX_OUT_FRAME));
            rest = tail;
            let flags = if rest.is_empty() { END_HEADERS } else { 0 };
            put_frame(
                &mut self.out,
                CONTINUATION,
                flags,
                block.stream_id,
                &[piece],
            );
        }
    }

    /// Stops filtering: this frame and everything after it go to `h2` untouched.
    fn give_up(&mut self, frame: BytesMut) {
        self.passthrough = true;
        self.out.unsplit(frame);
    }

    fn bad_block(&self, why: &str) -> io::Error {
        self.metrics.bad_header_blocks.inc();
        tracing::info!(
            error = why,
            "frontend sent a bad HTTP/2 header block; closing"
        );
        io::Error::new(io::ErrorKind::InvalidData, why.to_string())
    }
}

fn frame_len(header: &[u8]) -> usize {
    (usize::from(header[0]) << 16) | (usize::from(header[1]) << 8) | usize::from(header[2])
}

/// Splits a HEADERS payload into its priority bytes and header block fragment.
fn headers_payload(flags: u8, payload: &[u8]) -> Option<(Option<[u8; 5]>, &[u8])> {
    let (pad, mut body) = if flags & PADDED != 0 {
        let (&pad, body) = payload.split_first()?;
        (usize::from(pad), body)
    } else {
        (0, payload)
    };
    body = body.get(..body.len().checked_sub(pad)?)?;
    if flags & PRIORITY == 0 {
        return Some((None, body));
    }
    let (prio, fragment) = body.split_first_chunk::<5>()?;
    Some((Some(*prio), fragment))
}

fn put_frame(out: &mut BytesMut, kind: u8, flags: u8, stream_id: u32, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    out.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream_id.to_be_bytes());
    for p in parts {
        out.extend_from_slice(p);
    }
}

/// Whether `h2` accepts this `:authority` (it builds an `http::uri::Authority` from it).
fn authority_ok(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

impl<IO: tonic::transport::server::Connected> tonic::transport::server::Connected
    for AuthorityFilter<IO>
{
    type ConnectInfo = IO::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for AuthorityFilter<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        loop {
            if !me.out.is_empty() {
                let n = me.out.len().min(buf.remaining());
                buf.put_slice(&me.out[..n]);
                me.out.advance(n);
                return Poll::Ready(Ok(()));
            }
            if me.passthrough && me.held.is_empty() {
                return Pin::new(&mut me.io).poll_read(cx, buf);
            }
            let need = me.process_held()?;
            if !me.out.is_empty() {
                continue;
            }
            if need > 0 {
                // Read exactly what completes the held frame, so no payload is copied after it.
                me.held.reserve(need);
                let n = ready!(poll_read_buf(
                    Pin::new(&mut me.io),
                    cx,
                    &mut (&mut me.held).limit(need)
                ))?;
                if n == 0 {
                    // EOF inside a frame: hand over what we hold, `h2` sees the truncation.
                    me.passthrough = true;
                }
                continue;
            }
            let start = buf.filled().len();
            ready!(Pin::new(&mut me.io).poll_read(cx, buf))?;
            let Some(cut) = me.scan(&buf.filled()[start..]) else {
                return Poll::Ready(Ok(()));
            };
            let end = buf.filled().len();
            me.held.extend_from_slice(&buf.filled()[start + cut..end]);
            buf.set_filled(start + cut);
            if cut > 0 {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for AuthorityFilter<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
    impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

    fn chunked(data: Vec<u8>, sizes: &[usize]) -> Chunked {
        Chunked {
            data,
            pos: 0,
            sizes: sizes.to_vec(),
            turn: 0,
        }
    }

    /// Hands out its bytes in chunks of the given sizes (cycled), like a socket would.
    struct Chunked {
        data: Vec<u8>,
        pos: usize,
        sizes: Vec<usize>,
        turn: usize,
    }

    impl AsyncRead for Chunked {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let me = self.get_mut();
            let size = me.sizes[me.turn % me.sizes.len()];
            me.turn += 1;
            let n = size.min(buf.remaining()).min(me.data.len() - me.pos);
            buf.put_slice(&me.data[me.pos..me.pos + n]);
            me.pos += n;
            Poll::Ready(Ok(()))
        }
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        put_frame(&mut out, kind, flags, stream, &[payload]);
        out.to_vec()
    }

    fn block(fields: &[(&str, &str)]) -> Vec<u8> {
        Encoder::new().encode(fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())))
    }

    async fn filtered(input: Vec<u8>, sizes: &[usize]) -> (Vec<u8>, FilterMetrics) {
        let metrics = FilterMetrics::default();
        let mut f = AuthorityFilter::new(chunked(input, sizes), metrics.clone());
        let mut out = Vec::new();
        f.read_to_end(&mut out).await.expect("filter read");
        (out, metrics)
    }

    /// Splits filter output into (kind, flags, stream, payload) frames after the preface.
    fn frames(out: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        assert_eq!(&out[..PREFACE.len()], PREFACE);
        let mut rest = &out[PREFACE.len()..];
        let mut all = Vec::new();
        while !rest.is_empty() {
            let len = frame_len(rest);
            let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]);
            all.push((rest[3], rest[4], stream, rest[9..9 + len].to_vec()));
            rest = &rest[9 + len..];
        }
        all
    }

    fn decode(blocks: &[&[u8]]) -> Vec<Vec<(String, String)>> {
        let mut d = Decoder::new();
        blocks
            .iter()
            .map(|b| {
                d.decode(b)
                    .expect("decodable")
                    .into_iter()
                    .map(|(n, v)| {
                        (
                            String::from_utf8(n).expect("utf8"),
                            String::from_utf8(v).expect("utf8"),
                        )
                    })
                    .collect()
            })
            .collect()
    }

    const SIZES: &[&[usize]] = &[&[1 << 20], &[1], &[7, 3, 1000, 2], &[9], &[10, 8]];

    #[tokio::test]
    async fn non_header_frames_pass_unchanged_however_the_reads_fall() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        input.extend(frame(0x0, 0, 1, &vec![7u8; 40_000])); // DATA
        input.extend(frame(0x8, 0, 0, &[0, 0, 1, 0])); // WINDOW_UPDATE
        input.extend(frame(0x0, 1, 3, b"tail")); // DATA, END_STREAM
        for sizes in SIZES {
            let (out, m) = filtered(input.clone(), sizes).await;
            assert_eq!(out, input, "read sizes {sizes:?}");
            assert_eq!(m.authorities_dropped.get(), 0);
        }
    }

    #[tokio::test]
    async fn socket_path_authorities_are_removed_and_the_rest_kept() {
        for authority in ["/etc/k/konnectivity.socket", "%2Ftmp%2Fx.sock", ""] {
            let fields = [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", "/ProxyService/Proxy"),
                (":authority", authority),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ];
            // Two requests: the second one's block refers to the client's dynamic table.
            let mut enc = Encoder::new();
            let pairs = || fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes()));
            let (b1, b2) = (enc.encode(pairs()), enc.encode(pairs()));
            let mut input = PREFACE.to_vec();
            input.extend(frame(HEADERS, END_HEADERS, 1, &b1));
            input.extend(frame(0x0, 0, 1, b"payload"));
            input.extend(frame(HEADERS, END_HEADERS, 3, &b2));
            for sizes in SIZES {
                let (out, m) = filtered(input.clone(), sizes).await;
                let f = frames(&out);
                assert_eq!(f.len(), 3, "{sizes:?}");
                assert_eq!((f[0].0, f[0].1, f[0].2), (HEADERS, END_HEADERS, 1));
                assert_eq!((f[1].0, f[1].2, &f[1].3[..]), (0x0, 1, &b"payload"[..]));
                let want: Vec<_> = fields
                    .iter()
                    .filter(|(n, _)| *n != ":authority")
                    .map(|(n, v)| (n.to_string(), v.to_string()))
                    .collect();
                assert_eq!(decode(&[&f[0].3, &f[2].3]), vec![want.clone(), want]);
                assert_eq!(m.authorities_dropped.get(), 2);
            }
        }
    }

    #[tokio::test]
    async fn valid_authority_stays_and_padding_priority_continuation_are_understood() {
        let fields = [
            (":method", "POST"),
            (":scheme", "https"),
            (":path", "/AgentService/Connect"),
            (":authority", "server.example:8091"),
            ("agentid", "a"),
        ];
        let b = block(&fields);
        let (head, tail) = b.split_at(10);
        // HEADERS with padding 3 and priority, then a CONTINUATION with the rest.
        let mut payload = vec![3u8];
        payload.extend([0, 0, 0, 0, 16]);
        payload.extend(head);
        payload.extend([0, 0, 0]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, PADDED | PRIORITY | END_STREAM, 5, &payload));
        input.extend(frame(CONTINUATION, END_HEADERS, 5, tail));
        for sizes in SIZES {
            let (out, m) = filtered(input.clone(), sizes).await;
            let f = frames(&out);
            assert_eq!(f.len(), 1);
            assert_eq!(f[0].1, PRIORITY | END_STREAM | END_HEADERS);
            assert_eq!(&f[0].3[..5], &[0, 0, 0, 0, 16]);
            let want: Vec<_> = fields
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect();
            assert_eq!(decode(&[&f[0].3[5..]]), vec![want]);
            assert_eq!(m.authorities_dropped.get(), 0);
        }
    }

    #[tokio::test]
    async fn what_is_not_http2_or_out_of_sequence_passes_through() {
        let http1 = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        assert_eq!(filtered(http1.clone(), &[5]).await.0, http1);
        let mut stray = PREFACE.to_vec();
        stray.extend(frame(CONTINUATION, END_HEADERS, 1, b"\x82"));
        stray.extend(frame(0x0, 0, 1, b"x"));
        assert_eq!(filtered(stray.clone(), &[3]).await.0, stray);
    }

    #[tokio::test]
    async fn garbage_header_blocks_close_the_connection_with_a_count() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            HEADERS,
            END_HEADERS,
            1,
            &[0xff, 0xff, 0xff, 0xff, 0xff],
        ));
        let metrics = FilterMetrics::default();
        let mut f = AuthorityFilter::new(chunked(input, &[1 << 20]), metrics.clone());
        let err = f.read_to_end(&mut Vec::new()).await.expect_err("bad block");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert_eq!(metrics.bad_header_blocks.get(), 1);
        // A block past the limit, announced in a frame header, is refused before it is read.
        let mut big = PREFACE.to_vec();
        big.extend(&[0x10, 0x00, 0x01, HEADERS, 0, 0, 0, 0, 1]);
        let metrics = FilterMetrics::default();
        let mut f = AuthorityFilter::new(chunked(big, &[64]), metrics.clone());
        assert!(f.read_to_end(&mut Vec::new()).await.is_err());
        assert_eq!(metrics.bad_header_blocks.get(), 1);
    }

    /// The reason this module exists, shown with the real `h2` server on both sides of the fix.
    #[tokio::test]
    async fn h2_serves_a_socket_path_authority_only_behind_the_filter() {
        for filtered in [false, true] {
            let (client, server) = tokio::io::duplex(1 << 16);
            let served = tokio::spawn(async move {
                let server: Box<dyn Io> = if filtered {
                    Box::new(AuthorityFilter::new(server, FilterMetrics::default()))
                } else {
                    Box::new(server)
                };
                let mut conn = h2::server::handshake(server).await.expect("handshake");
                let req = conn.accept().await;
                tokio::spawn(async move { while conn.accept().await.is_some() {} });
                req.map(|r| r.map(|(req, _)| req.uri().path().to_string()))
            });
            let (mut reader, mut client) = tokio::io::split(client);
            let mut input = PREFACE.to_vec();
            input.extend(frame(0x4, 0, 0, &[]));
            input.extend(frame(
                HEADERS,
                END_HEADERS,
                1,
                &block(&[
                    (":method", "POST"),
                    (":scheme", "http"),
                    (":path", "/ProxyService/Proxy"),
                    (":authority", "/tmp/konnectivity.socket"),
                    ("content-type", "application/grpc"),
                ]),
            ));
            tokio::io::AsyncWriteExt::write_all(&mut client, &input)
                .await
                .expect("write");
            if filtered {
                let got = served.await.expect("join");
                assert_eq!(
                    got.map(|r| r.ok()),
                    Some(Some("/ProxyService/Proxy".into()))
                );
            } else {
                // h2 resets the stream itself: RST_STREAM (type 3) with PROTOCOL_ERROR (1).
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                let rst = loop {
                    let n = tokio::io::AsyncReadExt::read(&mut reader, &mut buf)
                        .await
                        .expect("read");
                    assert!(n > 0, "connection closed without RST_STREAM");
                    seen.extend_from_slice(&buf[..n]);
                    let mut at = 0;
                    let mut found = None;
                    while seen.len() >= at + 9 && seen.len() >= at + 9 + frame_len(&seen[at..]) {
                        let len = frame_len(&seen[at..]);
                        if seen[at + 3] == 0x3 {
                            found = Some(seen[at + 9..at + 9 + len].to_vec());
                        }
                        at += 9 + len;
                    }
                    if let Some(f) = found {
                        break f;
                    }
                };
                assert_eq!(rst, [0, 0, 0, 1]);
                served.abort();
            }
        }
    }
}
