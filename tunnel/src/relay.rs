//! Tunnelled connections: the per-stream connection table and the relay between a local
//! byte stream (a backend socket on the agent, an HTTP CONNECT socket on the server) and
//! the tunnel.
//!
//! Closing rule: whoever removes a connection from its table owns the close. The relay
//! removes it when its local side ends and tells the peer; the stream's dispatch loop
//! removes it on the peer's close and hands the relay the reply to send (if any), which
//! the relay queues after the DATA it already queued, so a close never overtakes data.
use crate::flow::{inbox, CreditReturn, Inbox, InboxRx, PushError, SendWindow};
use crate::metrics::{RelayMetrics, TO_ENDPOINT, TO_TUNNEL};
use crate::outbound::Outbound;
use crate::packet;
use bytes::{Bytes, BytesMut};
use spoke_proto::Packet;
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// Largest DATA payload we produce. Upstream peers accept messages up to 4 MiB.
pub const CHUNK: usize = 64 * 1024;
/// How long a closing connection may keep flushing buffered bytes to a slow endpoint.
const FLUSH_GRACE: Duration = Duration::from_secs(10);
/// Reads smaller than this are copied into a right-sized buffer, so a trickling
/// connection does not pin a whole chunk allocation per packet.
const SMALL_READ: usize = 8 * 1024;

/// The peer (or the stream) closed a connection.
#[derive(Debug)]
pub struct PeerClose {
    /// Packet to send back after our queued data (the agent's CLOSE_RSP to a CLOSE_REQ).
    pub reply: Option<Packet>,
}

/// What a stream's dispatch loop holds for one connection.
#[derive(Debug)]
pub struct ConnEntry {
    inbox: Inbox,
    window: Arc<SendWindow>,
    closer: oneshot::Sender<PeerClose>,
    /// Tells this connection apart from a later one a peer opens under the same id.
    generation: u64,
}

/// What the connection's relay holds.
#[derive(Debug)]
pub struct ConnParts {
    pub inbox: InboxRx,
    pub window: Arc<SendWindow>,
    pub closer: oneshot::Receiver<PeerClose>,
    pub generation: u64,
}

/// Flow-control settings of one tunnel stream.
#[derive(Clone, Copy, Debug)]
pub struct FlowConfig {
    /// Our per-connection receive cap (and the credit we advertise).
    pub buffer_cap: usize,
    /// The peer's advertised per-connection window, if it speaks Spoke credits.
    pub peer_window: Option<usize>,
}

impl FlowConfig {
    /// Whether we owe the peer credit returns (it only sends what we granted).
    pub fn credits(&self) -> bool {
        self.peer_window.is_some()
    }
}

pub fn new_conn(flow: FlowConfig, metrics: &RelayMetrics) -> (ConnEntry, ConnParts) {
    let (tx, rx) = inbox(flow.buffer_cap, metrics.buffered_bytes.clone());
    let window = match flow.peer_window {
        Some(w) => SendWindow::with_credit(w),
        None => SendWindow::unlimited(),
    };
    let (ctx, crx) = oneshot::channel();
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let generation = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    (
        ConnEntry {
            inbox: tx,
            window: window.clone(),
            closer: ctx,
            generation,
        },
        ConnParts {
            inbox: rx,
            window,
            closer: crx,
            generation,
        },
    )
}

/// Result of delivering peer data to a connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivery {
    Queued,
    Unknown,
    /// The connection's buffer is full and the peer ignored flow control; it was closed.
    Overflow,
}

/// Established connections of one tunnel stream, by connectID.
#[derive(Debug, Default)]
pub struct ConnTable {
    conns: Mutex<HashMap<i64, ConnEntry>>,
}

impl ConnTable {
    fn lock(&self) -> MutexGuard<'_, HashMap<i64, ConnEntry>> {
        // A panic while holding this lock would be a bug elsewhere; the map stays usable.
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a connection; false if the id is taken.
    pub fn insert(&self, id: i64, entry: ConnEntry) -> bool {
        let mut conns = self.lock();
        if conns.contains_key(&id) {
            return false;
        }
        conns.insert(id, entry);
        true
    }

    pub fn contains(&self, id: i64) -> bool {
        self.lock().contains_key(&id)
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Queues peer data for the connection; on overflow the connection is closed and
    /// `overflow_reply` handed to its relay.
    pub fn deliver(&self, id: i64, data: Bytes, overflow_reply: Option<Packet>) -> Delivery {
        let mut conns = self.lock();
        let Some(entry) = conns.get(&id) else {
            return Delivery::Unknown;
        };
        match entry.inbox.push(data) {
            Ok(()) => Delivery::Queued,
            // The relay is already ending and will remove the entry itself.
            Err(PushError::Closed) => Delivery::Queued,
            Err(PushError::Overflow) => {
                if let Some(e) = conns.remove(&id) {
                    let _ = e.closer.send(PeerClose {
                        reply: overflow_reply,
                    });
                }
                Delivery::Overflow
            }
        }
    }

    /// Adds peer credit to a connection's send window; false if unknown.
    pub fn grant(&self, id: i64, bytes: i64) -> bool {
        match self.lock().get(&id) {
            Some(e) => {
                e.window.grant(bytes);
                true
            }
            None => false,
        }
    }

    /// The peer closed the connection: remove it and let its relay finish. False if unknown.
    pub fn close(&self, id: i64, reply: Option<Packet>) -> bool {
        let entry = self.lock().remove(&id);
        match entry {
            Some(e) => {
                let _ = e.closer.send(PeerClose { reply });
                true
            }
            None => false,
        }
    }

    /// The stream is gone: close every connection on it.
    pub fn close_all(&self) -> usize {
        let all: Vec<_> = self.lock().drain().collect();
        let n = all.len();
        for (_, e) in all {
            let _ = e.closer.send(PeerClose { reply: None });
        }
        n
    }

    /// Removes the entry only if it is still this relay's own (same generation).
    fn remove(&self, id: i64, generation: u64) -> bool {
        let mut conns = self.lock();
        if conns.get(&id).is_some_and(|e| e.generation == generation) {
            conns.remove(&id);
            true
        } else {
            false
        }
    }
}

/// Reading a local endpoint in chunks that become DATA payloads without another copy.
pub trait ChunkRead: Send {
    /// Up to `max` bytes; `None` at end of stream.
    fn read_chunk(&mut self, max: usize) -> impl Future<Output = io::Result<Option<Bytes>>> + Send;
}

fn finish_read(mut buf: BytesMut, n: usize) -> Option<Bytes> {
    if n == 0 {
        None
    } else if n < SMALL_READ {
        Some(Bytes::copy_from_slice(&buf[..n]))
    } else {
        Some(buf.split_to(n).freeze())
    }
}

macro_rules! readiness_chunk_read {
    ($t:ty) => {
        impl ChunkRead for $t {
            // Wait for readability before allocating: idle connections hold no buffer.
            async fn read_chunk(&mut self, max: usize) -> io::Result<Option<Bytes>> {
                loop {
                    self.readable().await?;
                    let mut buf = BytesMut::with_capacity(max);
                    match self.try_read_buf(&mut buf) {
                        Ok(n) => return Ok(finish_read(buf, n)),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        Err(e) => return Err(e),
                    }
                }
            }
        }
    };
}
readiness_chunk_read!(tokio::net::tcp::OwnedReadHalf);
readiness_chunk_read!(tokio::net::unix::OwnedReadHalf);

/// Any `AsyncRead` (e.g. a TLS stream), read into a fresh buffer per chunk.
pub struct BufferedRead<R>(pub R);

impl<R: AsyncRead + Unpin + Send> ChunkRead for BufferedRead<R> {
    async fn read_chunk(&mut self, max: usize) -> io::Result<Option<Bytes>> {
        let mut buf = BytesMut::with_capacity(max);
        let n = self.0.read_buf(&mut buf).await?;
        Ok(finish_read(buf, n))
    }
}

/// One connection's relay between a local endpoint and the tunnel.
pub struct Relay {
    pub id: i64,
    pub table: Arc<ConnTable>,
    pub outbound: Outbound,
    pub parts: ConnParts,
    pub flow: FlowConfig,
    /// Sent to the peer when the local side ends first (agent: CLOSE_RSP, server: CLOSE_REQ).
    pub local_close: Packet,
    pub metrics: RelayMetrics,
}

impl Relay {
    /// Runs until both directions are done. Bytes already pushed by the peer are flushed to
    /// the endpoint (for at most [`FLUSH_GRACE`]) before the write side is shut down.
    pub async fn run<R: ChunkRead, W: AsyncWrite + Unpin + Send>(self, reader: R, writer: W) {
        let local_fail = CancellationToken::new();
        let Relay {
            id,
            table,
            outbound,
            parts,
            flow,
            local_close,
            metrics,
        } = self;
        let ConnParts {
            inbox,
            window,
            closer,
            generation,
        } = parts;
        let credit = flow.credits().then(|| CreditReturn::new(flow.buffer_cap));
        let read_side = read_loop(
            (id, generation),
            reader,
            &table,
            &outbound,
            &window,
            closer,
            local_close,
            &local_fail,
            &metrics,
        );
        let write_side = write_loop(id, writer, inbox, credit, &outbound, &local_fail, &metrics);
        tokio::pin!(read_side, write_side);
        tokio::select! {
            _ = &mut read_side => {
                let _ = tokio::time::timeout(FLUSH_GRACE, &mut write_side).await;
            }
            _ = &mut write_side => read_side.await,
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn read_loop<R: ChunkRead>(
    (id, generation): (i64, u64),
    mut reader: R,
    table: &ConnTable,
    outbound: &Outbound,
    window: &SendWindow,
    mut closer: oneshot::Receiver<PeerClose>,
    local_close: Packet,
    local_fail: &CancellationToken,
    metrics: &RelayMetrics,
) {
    loop {
        let read = tokio::select! {
            biased;
            peer = &mut closer => {
                if let Ok(PeerClose { reply: Some(p) }) = peer {
                    let _ = outbound.data(p).await;
                }
                return;
            }
            _ = local_fail.cancelled() => break,
            _ = outbound.closed.cancelled() => return,
            r = async {
                if window.exhausted() {
                    metrics.flow_control_stalls.inc();
                }
                let max = window.ready(CHUNK).await;
                reader.read_chunk(max).await
            } => r,
        };
        match read {
            Ok(Some(bytes)) => {
                window.spend(bytes.len());
                metrics.relayed(TO_TUNNEL, bytes.len());
                if outbound.data(packet::data(id, bytes)).await.is_err() {
                    return;
                }
            }
            Ok(None) => {
                metrics.closed("endpoint_eof");
                break;
            }
            Err(e) => {
                tracing::debug!(connection_id = id, error = %e, "endpoint read failed");
                metrics.closed("endpoint_error");
                break;
            }
        }
    }
    // Our side ended first, unless the peer is closing at the same moment.
    if table.remove(id, generation) {
        let _ = outbound.data(local_close).await;
    } else if let Ok(PeerClose { reply: Some(p) }) = closer.await {
        let _ = outbound.data(p).await;
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    id: i64,
    mut writer: W,
    mut inbox: InboxRx,
    mut credit: Option<CreditReturn>,
    outbound: &Outbound,
    local_fail: &CancellationToken,
    metrics: &RelayMetrics,
) {
    while let Some(bytes) = inbox.recv().await {
        let n = bytes.len();
        // Out of the buffer from here on, even if the write fails or is cancelled.
        inbox.consumed(n);
        let started = metrics.write_started();
        if let Err(e) = writer.write_all(&bytes).await {
            tracing::debug!(connection_id = id, error = %e, "endpoint write failed");
            metrics.closed("endpoint_error");
            local_fail.cancel();
            return;
        }
        metrics.write_done(started);
        metrics.relayed(TO_ENDPOINT, n);
        if let Some(grant) = credit.as_mut().and_then(|c| c.drained(n)) {
            let _ = outbound.control(packet::credit(id, grant as i64));
        }
    }
    let _ = writer.shutdown().await;
}

/// A local byte stream that splits into a chunk reader and a writer for [`Relay::run`].
pub trait SplitIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    type Reader: ChunkRead + 'static;
    type Writer: AsyncWrite + Unpin + Send + 'static;
    fn split_io(self) -> (Self::Reader, Self::Writer);
}

impl SplitIo for tokio::net::TcpStream {
    type Reader = tokio::net::tcp::OwnedReadHalf;
    type Writer = tokio::net::tcp::OwnedWriteHalf;
    fn split_io(self) -> (Self::Reader, Self::Writer) {
        self.into_split()
    }
}

impl SplitIo for tokio::net::UnixStream {
    type Reader = tokio::net::unix::OwnedReadHalf;
    type Writer = tokio::net::unix::OwnedWriteHalf;
    fn split_io(self) -> (Self::Reader, Self::Writer) {
        self.into_split()
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin + Send + 'static> SplitIo
    for tokio_rustls::server::TlsStream<IO>
{
    type Reader = BufferedRead<tokio::io::ReadHalf<Self>>;
    type Writer = tokio::io::WriteHalf<Self>;
    fn split_io(self) -> (Self::Reader, Self::Writer) {
        let (r, w) = tokio::io::split(self);
        (BufferedRead(r), w)
    }
}
