//! The bytes under a connection: a socket, and TLS on it (rustls' unbuffered API) or not (h2c
//! over a Unix socket).
//!
//! The buffers are the connection's own and live as long as it. Once a TLS 1.3 handshake is
//! done, the records are ours (`records.rs`): ciphertext is read in large reads into the block
//! that ends `plain`, a gap of one record's size past it, each record is opened from there
//! straight to the end of `plain`, and HTTP/2 frames are split off `plain` without a copy.
//! Outgoing plaintext is packed into full records straight in `tls_out`, written with as few
//! calls as the socket takes. Nothing is allocated per record once the
//! buffers have grown to their working size. The handshake and TLS 1.2 go through rustls'
//! unbuffered API (`tls_in` → `plain`, one copy).
use super::records::{self, Opened, Records};
use crate::chunks;
use crate::metrics::ReasonLabels;
use bytes::{Buf, Bytes, BytesMut};
use prometheus_client::metrics::{counter::Counter, family::Family};
use rustls::client::UnbufferedClientConnection;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use std::io;
use std::task::{Context, Poll};
use tokio::io::Interest;

/// Reads start this large and double while the socket fills them, up to `MAX_READ`: an idle
/// connection keeps small buffers, a busy one makes few large reads.
const MIN_READ: usize = 16 * 1024;
const MAX_READ: usize = 256 * 1024;
/// The most ciphertext written per write call.
const WRITE_SIZE: usize = 256 * 1024;
/// Plaintext sealed at a time before it is written: the records are still in the cache when
/// the kernel copies them (sealing all that is queued, up to half a MiB, then writing it cost
/// the sender cache misses on both passes).
const SEAL_BATCH: usize = 128 * 1024;

/// A stream socket driven by readiness (TCP or Unix).
pub trait Socket: Send + Sync + 'static {
    fn poll_ready(&self, cx: &mut Context<'_>, interest: Interest) -> Poll<io::Result<()>>;
    /// Reads into `buf`'s spare room. A short read counts as draining the socket (tokio's
    /// `poll_read`), so a wake-up costs one read, not a second one that says EAGAIN.
    fn poll_read_bytes(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<usize>>;
    fn try_write_from(&self, buf: &[u8]) -> io::Result<usize>;
    fn try_write_vectored_from(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize>;
}

macro_rules! socket {
    ($t:ty) => {
        impl Socket for $t {
            fn poll_ready(&self, cx: &mut Context<'_>, interest: Interest) -> Poll<io::Result<()>> {
                if interest.is_readable() {
                    self.poll_read_ready(cx)
                } else {
                    self.poll_write_ready(cx)
                }
            }
            fn poll_read_bytes(
                &mut self,
                cx: &mut Context<'_>,
                buf: &mut BytesMut,
            ) -> Poll<io::Result<usize>> {
                tokio_util::io::poll_read_buf(std::pin::Pin::new(self), cx, buf)
            }
            fn try_write_from(&self, buf: &[u8]) -> io::Result<usize> {
                self.try_write(buf)
            }
            fn try_write_vectored_from(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
                self.try_write_vectored(bufs)
            }
        }
    };
}
socket!(tokio::net::TcpStream);
socket!(tokio::net::UnixStream);

/// TLS on the connection, or none.
pub enum Crypto {
    Plain,
    Client(Box<UnbufferedClientConnection>),
    Server(Box<UnbufferedServerConnection>),
    /// TLS 1.3 after the handshake: the records are sealed and opened here.
    Records(Box<Records>),
    /// Taking the records over from rustls failed: nothing is read or written any more
    /// (never plaintext in place of TLS).
    Failed,
}

/// What TLS did with the input it was given.
#[derive(Debug, PartialEq, Eq)]
enum Progress {
    /// Needs more bytes from the peer.
    NeedInput,
    /// The peer sent close_notify: nothing more will come.
    PeerClosed,
}

/// A buffer that is filled and drained by cursors, allocated once and reused.
#[derive(Default)]
pub(super) struct Ring {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Ring {
    fn len(&self) -> usize {
        self.end - self.start
    }
    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }
    /// Room for at least `n` more bytes at the end (moving what is left to the front, or
    /// growing once), returned as a slice to write into.
    pub(super) fn spare(&mut self, n: usize) -> &mut [u8] {
        if self.buf.len() - self.end < n {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.buf.len() - self.end < n {
                self.buf.resize(self.end + n, 0);
            }
        }
        &mut self.buf[self.end..]
    }
    pub(super) fn filled_by(&mut self, n: usize) {
        self.end += n;
    }
}

/// A socket with TLS (or not) and its buffers.
pub struct Io<S> {
    pub socket: S,
    crypto: Crypto,
    tls_in: BytesMut,
    tls_out: Ring,
    /// What the next read asks for.
    read_size: usize,
    /// Decrypted bytes not yet taken as frames.
    pub plain: BytesMut,
    /// Plaintext waiting to be encrypted (TLS) or written (plain), and its length.
    pending: std::collections::VecDeque<Bytes>,
    pending_len: usize,
    /// Bytes added to `plain` that no read has reported yet (decrypted while flushing).
    fresh: usize,
    peer_closed: bool,
    /// Where errors after the handshake are counted, by reason (the listener's or agent's
    /// `spoke_tls_connection_errors_total`).
    errors: Option<Family<ReasonLabels, Counter>>,
}

fn tls_err(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

fn failed() -> io::Error {
    io::Error::other("TLS connection unusable: taking over its records failed")
}

/// Steps a rustls unbuffered connection (client or server: the same calls on two types) until
/// it needs input or has made progress; on an error the fatal alert rustls queued goes out
/// before we hang up. Evaluates to the `Progress`; returns from the caller on an error.
///
/// While the handshake runs, rustls is given whole records one more at a time, never past
/// the one that ends the handshake: what follows it (a key update request, a session ticket)
/// is left untouched for Spoke's own records (`records.rs`), which take over then. Given it,
/// rustls would answer a key update into a slot the take-over does not carry, or decrypt a
/// split message's records in place without discarding them.
macro_rules! records {
    ($c:expr, $tls_in:expr, $tls_out:expr, $plain:expr, $pending:expr) => {{
        // Records fed beyond the first while rustls waits for more of a handshake message.
        let mut more = 0;
        loop {
            let handshaking = $c.is_handshaking();
            let end = if handshaking {
                whole_records(&$tls_in, 1 + more)
            } else {
                $tls_in.len()
            };
            let status = $c.process_tls_records(&mut $tls_in[..end]);
            let (discard, progress) = match step(status, $tls_out, $plain, $pending) {
                Ok(r) => r,
                Err(e) => {
                    while let ConnectionStateKind::Encoded =
                        encode_pending($c.process_tls_records(&mut $tls_in[..end]), $tls_out)
                    {
                    }
                    return Err(e);
                }
            };
            $tls_in.advance(discard);
            if discard > 0 {
                more = 0;
            }
            match progress {
                // Still handshaking with whole records held back: give rustls the next.
                Some(Progress::NeedInput)
                    if handshaking
                        && $c.is_handshaking()
                        && whole_records(&$tls_in, usize::MAX) > end - discard =>
                {
                    more += 1;
                }
                Some(p) => break p,
                None => {}
            }
        }
    }};
}

/// Where the first `n` whole TLS records in `buf` end (all of `buf` when it holds none whole,
/// so that rustls sees a partial record and waits for the rest).
fn whole_records(buf: &[u8], n: usize) -> usize {
    let (mut end, mut count) = (0, 0);
    while count < n {
        let Some(header) = buf.get(end..end + 5) else {
            break;
        };
        let next = end + 5 + usize::from(u16::from_be_bytes([header[3], header[4]]));
        if next > buf.len() {
            break;
        }
        end = next;
        count += 1;
    }
    if count == 0 {
        buf.len()
    } else {
        end
    }
}

impl<S: Socket> Io<S> {
    pub fn new(socket: S, crypto: Crypto) -> Io<S> {
        Io {
            socket,
            crypto,
            tls_in: BytesMut::new(),
            tls_out: Ring::default(),
            read_size: MIN_READ,
            plain: BytesMut::new(),
            pending: Default::default(),
            pending_len: 0,
            fresh: 0,
            peer_closed: false,
            errors: None,
        }
    }

    /// Counts errors after the handshake in `errors`, by reason (once per connection).
    pub fn count_errors(&mut self, errors: Family<ReasonLabels, Counter>) {
        self.errors = Some(errors);
    }

    fn count_error(&self, reason: &'static str) {
        if let Some(errors) = &self.errors {
            crate::metrics::count(errors, reason);
        }
    }

    pub fn crypto(&self) -> &Crypto {
        &self.crypto
    }

    #[cfg(test)]
    pub(super) fn records_mut(&mut self) -> Option<&mut Records> {
        match &mut self.crypto {
            Crypto::Records(r) => Some(r),
            _ => None,
        }
    }

    /// Completes the TLS handshake (nothing to do without TLS).
    pub async fn handshake(&mut self) -> io::Result<()> {
        loop {
            let need_input = match self.process() {
                Ok(p) => p == Progress::NeedInput,
                Err(e) => {
                    // Tell the peer why (the alert is encoded already), as far as it listens.
                    let flush = std::future::poll_fn(|cx| self.poll_flush(cx));
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), flush).await;
                    return Err(e);
                }
            };
            std::future::poll_fn(|cx| self.poll_flush(cx)).await?;
            let handshaking = match &self.crypto {
                Crypto::Plain | Crypto::Records(_) | Crypto::Failed => false,
                Crypto::Client(c) => c.is_handshaking(),
                Crypto::Server(c) => c.is_handshaking(),
            };
            if !handshaking {
                return self.take_over_records();
            }
            if need_input {
                let n = std::future::poll_fn(|cx| self.poll_read_tls(cx)).await?;
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            }
        }
    }

    /// After a TLS 1.3 handshake the records are ours (TLS 1.2 stays on rustls).
    fn take_over_records(&mut self) -> io::Result<()> {
        let tls13 =
            |v: Option<rustls::ProtocolVersion>| v == Some(rustls::ProtocolVersion::TLSv1_3);
        self.crypto = match std::mem::replace(&mut self.crypto, Crypto::Failed) {
            Crypto::Client(c) if tls13(c.protocol_version()) => {
                Crypto::Records(Box::new(records::client(*c)?))
            }
            Crypto::Server(c) if tls13(c.protocol_version()) => {
                Crypto::Records(Box::new(records::server(*c)?))
            }
            other => other,
        };
        if !matches!(self.crypto, Crypto::Plain) {
            // Records that came after the one ending the handshake were held back from it:
            // opened now (by our layer, or by rustls on TLS 1.2).
            self.process()?;
        }
        Ok(())
    }

    /// Queues plaintext to send (encrypted on the next [`Io::poll_flush`]).
    pub fn queue(&mut self, piece: Bytes) {
        if !piece.is_empty() {
            self.pending_len += piece.len();
            self.pending.push_back(piece);
        }
    }

    /// Bytes queued or encrypted and not yet written.
    pub fn unsent(&self) -> usize {
        self.tls_out.len() + self.pending_len
    }

    /// Reads what the socket has (one large read) and decrypts it into `plain`. `Ready(0)`
    /// means the peer closed the connection.
    pub fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        loop {
            if self.fresh > 0 {
                return Poll::Ready(Ok(std::mem::take(&mut self.fresh)));
            }
            if self.peer_closed {
                return Poll::Ready(Ok(0));
            }
            if let Crypto::Plain = self.crypto {
                return self.poll_read_plain(cx);
            }
            let n = std::task::ready!(self.poll_read_tls(cx))?;
            if n == 0 {
                // Only close_notify ends a TLS stream: a bare TCP close may be a cut, and
                // must not pass for the end of the data (RFC 8446 6.1).
                self.count_error("truncated");
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed the connection without a TLS close_notify",
                )));
            }
            self.process()?;
        }
    }

    fn poll_read_plain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let room = reserve(&mut self.plain, self.read_size);
        let n = std::task::ready!(self.socket.poll_read_bytes(cx, &mut self.plain))?;
        self.grow_reads(n, room);
        Poll::Ready(Ok(n))
    }

    fn poll_read_tls(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if let Crypto::Failed = self.crypto {
            return Poll::Ready(Err(failed()));
        }
        let (read, room) = if let Crypto::Records(r) = &self.crypto {
            r.check()?;
            // Into the block that ends `plain`, so records open where they land.
            let (mut buf, plain_len) = self.join();
            let room = reserve(&mut buf, self.read_size);
            let read = self.socket.poll_read_bytes(cx, &mut buf);
            self.split(buf, plain_len);
            (read, room)
        } else {
            let room = reserve(&mut self.tls_in, self.read_size);
            (self.socket.poll_read_bytes(cx, &mut self.tls_in), room)
        };
        let n = std::task::ready!(read)?;
        self.grow_reads(n, room);
        Poll::Ready(Ok(n))
    }

    /// `plain` and `tls_in` as one buffer, and where the ciphertext starts. No copy once the
    /// two have been split from one block (they stay adjacent in it).
    fn join(&mut self) -> (BytesMut, usize) {
        let mut buf = std::mem::take(&mut self.plain);
        let plain_len = buf.len();
        buf.unsplit(std::mem::take(&mut self.tls_in));
        (buf, plain_len)
    }

    fn split(&mut self, mut buf: BytesMut, plain_len: usize) {
        self.tls_in = buf.split_off(plain_len);
        self.plain = buf;
    }

    /// A read that filled its buffer asks for twice as much next time.
    fn grow_reads(&mut self, got: usize, room: usize) {
        if got == room && self.read_size < MAX_READ {
            self.read_size *= 2;
        }
    }

    /// Gives back the memory of buffers that hold nothing (an idle connection).
    pub fn trim(&mut self) {
        if let Crypto::Records(r) = &mut self.crypto {
            r.drop_gap(&mut self.tls_in);
        }
        if self.tls_in.is_empty() {
            self.tls_in = BytesMut::new();
        }
        if self.plain.is_empty() {
            self.plain = BytesMut::new();
        }
        if self.tls_out.len() == 0 {
            self.tls_out = Ring::default();
        }
        self.read_size = MIN_READ;
    }

    /// Runs rustls over the ciphertext held: answers the handshake, decrypts application data
    /// into `plain`, and encrypts pending plaintext once it may.
    fn process(&mut self) -> io::Result<Progress> {
        let before = self.plain.len();
        if let Crypto::Records(_) = self.crypto {
            // Only opening: pending plaintext is sealed as it is written (`poll_flush`), under
            // whatever key is current then (a key update the peer asked for goes out first).
            let (mut buf, mut plain_len) = self.join();
            let Crypto::Records(r) = &mut self.crypto else {
                unreachable!("matched above")
            };
            let failed_before = r.failure.is_some();
            let opened = r.open(&mut buf, &mut plain_len, &mut self.tls_out);
            // Counted once, when the failure happens.
            let failure = r.failure.filter(|_| !failed_before);
            self.split(buf, plain_len);
            self.fresh += self.plain.len() - before;
            if let Some(reason) = failure {
                self.count_error(reason);
            }
            if opened? == Opened::PeerClosed {
                self.peer_closed = true;
                return Ok(Progress::PeerClosed);
            }
            return Ok(Progress::NeedInput);
        }
        let Io {
            crypto,
            tls_in,
            tls_out,
            plain,
            pending,
            ..
        } = self;
        let progress = match crypto {
            Crypto::Plain => {
                while let Some(p) = pending.pop_front() {
                    let n = p.len();
                    tls_out.spare(n)[..n].copy_from_slice(&p);
                    tls_out.filled_by(n);
                }
                Progress::NeedInput
            }
            Crypto::Client(c) => records!(c, tls_in, tls_out, plain, pending),
            Crypto::Server(c) => records!(c, tls_in, tls_out, plain, pending),
            Crypto::Records(_) => unreachable!("handled above"),
            Crypto::Failed => return Err(failed()),
        };
        if self.pending.is_empty() {
            self.pending_len = 0;
        }
        self.fresh += self.plain.len() - before;
        if progress == Progress::PeerClosed {
            self.peer_closed = true;
        }
        Ok(progress)
    }

    /// Writes out what is encrypted (encrypting what is pending first). Ready once all is
    /// written.
    pub fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.crypto {
            Crypto::Failed => return Poll::Ready(Err(failed())),
            Crypto::Plain if !self.pending.is_empty() => return self.poll_flush_plain(cx),
            Crypto::Records(_) => loop {
                std::task::ready!(self.poll_write_out(cx))?;
                let Crypto::Records(r) = &mut self.crypto else {
                    unreachable!("matched above")
                };
                if self.pending.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                let n = r.seal(&mut self.pending, &mut self.tls_out, SEAL_BATCH)?;
                self.pending_len -= n;
            },
            _ if !self.pending.is_empty() => {
                self.process()?;
            }
            _ => {}
        }
        self.poll_write_out(cx)
    }

    /// Writes what is sealed (or, without TLS records of ours, encoded). Ready once all is.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.tls_out.len() > 0 {
            let n = self.tls_out.len().min(WRITE_SIZE);
            let start = self.tls_out.start;
            match self
                .socket
                .try_write_from(&self.tls_out.buf[start..start + n])
            {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => self.tls_out.consume(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::task::ready!(self.socket.poll_ready(cx, Interest::WRITABLE))?
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Without TLS the queued pieces go out as they are, gathered into one call.
    fn poll_flush_plain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.pending.is_empty() {
            let mut slices = [io::IoSlice::new(&[]); 64];
            let k = chunks::front_slices(&self.pending, &mut slices);
            match self.socket.try_write_vectored_from(&slices[..k]) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    chunks::advance(&mut self.pending, n);
                    self.pending_len -= n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::task::ready!(self.socket.poll_ready(cx, Interest::WRITABLE))?
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Queues TLS close_notify (when the handshake is done) ahead of closing.
    pub fn close_notify(&mut self) {
        if let Crypto::Records(r) = &mut self.crypto {
            // What is queued goes before it.
            if r.seal(&mut self.pending, &mut self.tls_out, usize::MAX)
                .is_ok()
            {
                self.pending_len = 0;
                r.close_notify(&mut self.tls_out);
            }
            return;
        }
        self.process().ok();
        let Io {
            crypto,
            tls_in,
            tls_out,
            ..
        } = self;
        // rustls must see the same input buffer on every call (it keeps offsets into it).
        let _ = match crypto {
            Crypto::Plain | Crypto::Records(_) | Crypto::Failed => return,
            Crypto::Client(c) => close_notify(c.process_tls_records(&mut tls_in[..]), tls_out),
            Crypto::Server(c) => close_notify(c.process_tls_records(&mut tls_in[..]), tls_out),
        };
    }
}

/// Whether a call after an error still had TLS data (an alert) to encode.
enum ConnectionStateKind {
    Encoded,
    Done,
}

fn encode_pending<Data>(
    status: UnbufferedStatus<'_, '_, Data>,
    out: &mut Ring,
) -> ConnectionStateKind {
    match status.state {
        Ok(ConnectionState::EncodeTlsData(mut e)) => {
            if let Ok(n) = e.encode(out.spare(1024)) {
                out.filled_by(n);
            }
            ConnectionStateKind::Encoded
        }
        Ok(ConnectionState::TransmitTlsData(t)) => {
            t.done();
            ConnectionStateKind::Encoded
        }
        _ => ConnectionStateKind::Done,
    }
}

/// Room for at least `want` more bytes in `buf` (a fresh block when the old one is shared
/// with frames handed out); returns the room there is.
fn reserve(buf: &mut BytesMut, want: usize) -> usize {
    if buf.capacity() - buf.len() < want / 2 {
        buf.reserve(want);
    }
    buf.capacity() - buf.len()
}

fn close_notify<Data>(status: UnbufferedStatus<'_, '_, Data>, out: &mut Ring) -> Option<()> {
    if let Ok(ConnectionState::WriteTraffic(mut w)) = status.state {
        let spare = out.spare(64);
        if let Ok(n) = w.queue_close_notify(spare) {
            out.filled_by(n);
        }
    }
    Some(())
}

/// One turn of rustls' state machine: how many input bytes it is done with, and `Some` when
/// it needs more input or the peer closed.
fn step<Data>(
    status: UnbufferedStatus<'_, '_, Data>,
    tls_out: &mut Ring,
    plain: &mut BytesMut,
    pending: &mut std::collections::VecDeque<Bytes>,
) -> io::Result<(usize, Option<Progress>)> {
    let UnbufferedStatus { mut discard, state } = status;
    let result = match state.map_err(tls_err)? {
        ConnectionState::ReadTraffic(mut r) => {
            while let Some(record) = r.next_record() {
                let record = record.map_err(tls_err)?;
                discard += record.discard;
                if plain.capacity() - plain.len() < record.payload.len() {
                    plain.reserve(MAX_READ.max(record.payload.len()));
                }
                plain.extend_from_slice(record.payload);
            }
            None
        }
        ConnectionState::EncodeTlsData(mut e) => {
            let mut want = 4096;
            loop {
                match e.encode(tls_out.spare(want)) {
                    Ok(n) => {
                        tls_out.filled_by(n);
                        break;
                    }
                    Err(EncodeError::InsufficientSize(s)) => want = s.required_size,
                    Err(EncodeError::AlreadyEncoded) => break,
                }
            }
            None
        }
        // The encoded bytes stay in `tls_out`, written in order by whoever flushes.
        ConnectionState::TransmitTlsData(t) => {
            t.done();
            None
        }
        ConnectionState::BlockedHandshake => Some(Progress::NeedInput),
        ConnectionState::WriteTraffic(mut w) => {
            while let Some(p) = pending.pop_front() {
                // Records add 22 bytes per 16 KiB; ask for room generously.
                let mut want = p.len() + p.len() / 512 + 64;
                loop {
                    match w.encrypt(&p, tls_out.spare(want)) {
                        Ok(n) => {
                            tls_out.filled_by(n);
                            break;
                        }
                        Err(EncryptError::InsufficientSize(s)) => want = s.required_size,
                        Err(e) => return Err(io::Error::other(e.to_string())),
                    }
                }
            }
            Some(Progress::NeedInput)
        }
        ConnectionState::PeerClosed | ConnectionState::Closed => Some(Progress::PeerClosed),
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "unexpected TLS state (early data is not accepted)",
            ))
        }
    };
    Ok((discard, result))
}
