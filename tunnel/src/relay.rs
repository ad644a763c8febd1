//! The relay: moves one connection's bytes between its local end and the agent stream.
//!
//! The local end is what this process holds of the connection: on the agent the endpoint
//! socket, on the server the frontend (an HTTP CONNECT socket, or a gRPC `Proxy` stream through
//! an adapter). Toward the tunnel the relay sends DATA within the peer's credit; toward the
//! local end it writes what the peer sent, returning credit as it drains. Closing follows
//! the rule of [`crate::conns`]: whoever removes the connection from the table owns the close.
use crate::chunks;
use crate::conns::{ConnParts, ConnTable, FlowConfig, PeerClose};
use crate::flow::{CreditReturn, InboxRx, SendWindow};
use crate::metrics::RelayMetrics;
use crate::outbound::Outbound;
use crate::packet;
use bytes::{Bytes, BytesMut};
use spoke_proto::Packet;
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// Largest DATA payload we produce. Upstream peers accept messages up to 4 MiB.
pub const CHUNK: usize = 64 * 1024;
/// How long a closing connection may keep flushing buffered bytes to a slow local end.
const FLUSH_GRACE: Duration = Duration::from_secs(10);
/// How long a local end that asked for a close waits for the peer's answer (upstream's
/// konnectivity-client waits as long for CLOSE_RSP).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Reads smaller than this are copied into a right-sized buffer, so a trickling
/// connection does not pin a whole chunk allocation per packet.
const SMALL_READ: usize = 8 * 1024;
/// Chunks queued for the local end are written together, up to this many bytes or chunks
/// per call (a peer's chunks are at most [`CHUNK`] each).
const WRITE_BATCH: usize = 256 * 1024;
const WRITE_BATCH_CHUNKS: usize = 16;

/// What the relay reads from its local end.
#[derive(Debug)]
pub enum Read {
    /// Bytes for the peer: they become a DATA payload as they are.
    Bytes(Bytes),
    /// The local end is done (a byte stream's EOF): the connection closes now.
    Eof,
    /// The local end asks to close and still takes what the peer sends until the peer
    /// answers (a gRPC frontend's CLOSE_REQ).
    CloseRequested,
}

/// The reading half of a local end.
pub trait LocalRead: Send {
    /// Up to `max` bytes, or the end.
    fn read_chunk(&mut self, max: usize) -> impl Future<Output = io::Result<Read>> + Send;
}

/// The writing half of a local end.
pub trait LocalWrite: Send {
    fn write_chunk(&mut self, bytes: Bytes) -> impl Future<Output = io::Result<()>> + Send;
    /// Writes all of `chunks` in order, leaving it empty; one that can gathers them into fewer
    /// calls.
    fn write_chunks(
        &mut self,
        chunks: &mut VecDeque<Bytes>,
    ) -> impl Future<Output = io::Result<()>> + Send {
        async move {
            for c in chunks.drain(..) {
                self.write_chunk(c).await?;
            }
            Ok(())
        }
    }
    /// Nothing more will be written (a byte stream shuts down its write side).
    fn finish(&mut self) -> impl Future<Output = ()> + Send;
}

fn finish_read(mut buf: BytesMut, n: usize) -> Read {
    if n == 0 {
        Read::Eof
    } else if n < SMALL_READ {
        Read::Bytes(Bytes::copy_from_slice(&buf[..n]))
    } else {
        Read::Bytes(buf.split_to(n).freeze())
    }
}

macro_rules! readiness_read {
    ($t:ty) => {
        impl LocalRead for $t {
            // Wait for readability before allocating: idle connections hold no buffer. The
            // read is tokio's `poll_read`, which takes a short read as the socket drained: one
            // read per wake-up, not a second one that says EAGAIN.
            async fn read_chunk(&mut self, max: usize) -> io::Result<Read> {
                self.readable().await?;
                let mut buf = BytesMut::with_capacity(max);
                let n = std::future::poll_fn(|cx| {
                    tokio_util::io::poll_read_buf(std::pin::Pin::new(&mut *self), cx, &mut buf)
                })
                .await?;
                Ok(finish_read(buf, n))
            }
        }
    };
}
readiness_read!(tokio::net::tcp::OwnedReadHalf);
readiness_read!(tokio::net::unix::OwnedReadHalf);

/// The writing half of a byte stream.
pub struct ByteWriter<W>(pub W);

impl<W: AsyncWrite + Unpin + Send> LocalWrite for ByteWriter<W> {
    async fn write_chunk(&mut self, bytes: Bytes) -> io::Result<()> {
        self.0.write_all(&bytes).await
    }

    async fn write_chunks(&mut self, chunks: &mut VecDeque<Bytes>) -> io::Result<()> {
        // Empty chunks (a peer may send empty DATA) need no call; a call with nothing but
        // them would return 0, which is not a failure here.
        chunks::advance(chunks, 0);
        while !chunks.is_empty() {
            let n = {
                let mut slices = [io::IoSlice::new(&[]); WRITE_BATCH_CHUNKS];
                let k = chunks::front_slices(chunks, &mut slices);
                self.0.write_vectored(&slices[..k]).await?
            };
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            chunks::advance(chunks, n);
        }
        Ok(())
    }
    async fn finish(&mut self) {
        let _ = self.0.shutdown().await;
    }
}

/// One connection's relay between its local end and the agent stream.
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
    /// the local end (for at most [`FLUSH_GRACE`]) before it is finished.
    pub async fn run<R: LocalRead, W: LocalWrite>(self, reader: R, writer: W) {
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
        let credit = flow.credits().then(CreditReturn::default);
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
async fn read_loop<R: LocalRead>(
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
                let max = if window.exhausted() {
                    metrics.flow_control_stalls.inc();
                    wait_for_credit(id, window, outbound).await
                } else {
                    window.ready(CHUNK).await
                };
                reader.read_chunk(max).await
            } => r,
        };
        match read {
            Ok(Read::Bytes(bytes)) => {
                window.spend(bytes.len());
                metrics.relayed_to_tunnel(bytes.len());
                if outbound.data(packet::data(id, bytes)).await.is_err() {
                    return;
                }
            }
            Ok(Read::Eof) => {
                metrics.closed("endpoint_eof");
                break;
            }
            Ok(Read::CloseRequested) => {
                // Ask the peer to close, keeping the entry: what it still sends reaches the
                // local end, until its answer (which removes the entry) or the timeout.
                let _ = outbound.data(local_close).await;
                let answer = tokio::select! {
                    a = tokio::time::timeout(CLOSE_TIMEOUT, &mut closer) => a,
                    _ = outbound.closed.cancelled() => return,
                };
                match answer {
                    Ok(Ok(PeerClose { reply: Some(p) })) => {
                        let _ = outbound.data(p).await;
                    }
                    Ok(_) => {}
                    Err(_) => {
                        tracing::debug!(
                            connection_id = id,
                            "peer did not answer the close in time"
                        );
                        table.remove(id, generation);
                    }
                }
                return;
            }
            Err(e) => {
                tracing::debug!(connection_id = id, error = %e, "local end read failed");
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

/// How long a credit stall lasts before the peer hears we are blocked (and may grow the
/// window: `flow::Inbox::grow`). Over a link with a long round trip credit takes that long
/// to come back; on a short one it returns within a scheduling delay, the window already
/// covers the bandwidth-delay product, and growing it would only keep more bytes in flight
/// and out of cache (gRPC over mTLS on loopback: 12 % slower with windows grown to 16 MiB).
const REPORT_BLOCKED_AFTER: Duration = Duration::from_millis(5);

/// Waits for the peer's credit; reports the stall to the peer if it outlasts
/// [`REPORT_BLOCKED_AFTER`].
async fn wait_for_credit(id: i64, window: &SendWindow, outbound: &Outbound) -> usize {
    match tokio::time::timeout(REPORT_BLOCKED_AFTER, window.ready(CHUNK)).await {
        Ok(max) => max,
        Err(_) => {
            let _ = outbound.control(packet::blocked(id));
            window.ready(CHUNK).await
        }
    }
}

async fn write_loop<W: LocalWrite>(
    id: i64,
    mut writer: W,
    mut inbox: InboxRx,
    mut credit: Option<CreditReturn>,
    outbound: &Outbound,
    local_fail: &CancellationToken,
    metrics: &RelayMetrics,
) {
    let mut batch = VecDeque::with_capacity(WRITE_BATCH_CHUNKS);
    while let Some(bytes) = inbox.recv().await {
        // What else is queued goes along, in one call where the writer can gather.
        let mut n = bytes.len();
        batch.push_back(bytes);
        while n < WRITE_BATCH && batch.len() < WRITE_BATCH_CHUNKS {
            let Some(more) = inbox.try_recv() else { break };
            n += more.len();
            batch.push_back(more);
        }
        // Credit is counted chunk by chunk, as the peer sent them, so that it comes back at the
        // same points as without gathering (a quarter window at a time, none held back once
        // whole chunks add up to it), in one packet once the write is done.
        let grant: usize = match credit.as_mut() {
            Some(c) => {
                let window = inbox.window();
                batch
                    .iter()
                    .filter_map(|b| c.drained(b.len(), window))
                    .sum()
            }
            None => 0,
        };
        // Out of the buffer from here on, even if the write fails or is cancelled.
        inbox.consumed(n);
        let started = metrics.write_started();
        if let Err(e) = writer.write_chunks(&mut batch).await {
            tracing::debug!(connection_id = id, error = %e, "local end write failed");
            metrics.closed("endpoint_error");
            local_fail.cancel();
            return;
        }
        metrics.write_done(started);
        metrics.relayed_to_endpoint(n);
        if grant > 0 {
            let _ = outbound.control(packet::credit(id, grant as i64));
        }
    }
    writer.finish().await;
}

/// A local byte stream that splits into the two halves [`Relay::run`] takes.
pub trait SplitIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    type Reader: LocalRead + 'static;
    type Writer: LocalWrite + 'static;
    fn split_io(self) -> (Self::Reader, Self::Writer);
}

impl SplitIo for tokio::net::TcpStream {
    type Reader = tokio::net::tcp::OwnedReadHalf;
    type Writer = ByteWriter<tokio::net::tcp::OwnedWriteHalf>;
    fn split_io(self) -> (Self::Reader, Self::Writer) {
        let (r, w) = self.into_split();
        (r, ByteWriter(w))
    }
}

impl SplitIo for tokio::net::UnixStream {
    type Reader = tokio::net::unix::OwnedReadHalf;
    type Writer = ByteWriter<tokio::net::unix::OwnedWriteHalf>;
    fn split_io(self) -> (Self::Reader, Self::Writer) {
        let (r, w) = self.into_split();
        (r, ByteWriter(w))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// Gathered writes that the socket takes a piece at a time still deliver every byte, in
    /// order, and leave the batch empty.
    #[tokio::test]
    async fn gathered_writes_survive_short_writes() {
        let (a, mut b) = tokio::io::duplex(7);
        let mut w = ByteWriter(a);
        // Empty ones among them, and last.
        let chunks: VecDeque<Bytes> = (0..41u8)
            .map(|i| Bytes::from(vec![i; usize::from(i % 5) * 3]))
            .collect();
        let want: Vec<u8> = chunks.iter().flat_map(|c| c.to_vec()).collect();
        let mut batch = chunks.clone();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            b.read_to_end(&mut got).await.map(|_| got)
        });
        w.write_chunks(&mut batch).await.expect("write");
        assert!(batch.is_empty());
        w.finish().await;
        drop(w);
        assert_eq!(reader.await.expect("join").expect("read"), want);
    }
}
