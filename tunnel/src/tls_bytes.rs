//! A TLS byte stream on Spoke's own record layer (the HTTP CONNECT frontend over mTLS, and the
//! bench's client of it): the handshake by rustls, then TLS 1.3 records sealed and opened in
//! place by [`Io`], as on the tunnel. tokio-rustls would copy every byte twice more (into
//! rustls' buffers and out).
//!
//! For the request head and the answer it is an `AsyncRead + AsyncWrite`; for the relay it
//! splits into halves that hand over `Bytes` without a copy: what is read is a slice of the
//! receive buffer, and what is written is queued as it is until it is sealed.
use crate::http2::io::{Crypto, Io, Socket};
use crate::relay::{LocalRead, LocalWrite, Read, SplitIo};
use bytes::Bytes;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A TLS connection whose handshake is done.
pub struct TlsBytes<S: Socket> {
    io: Io<S>,
    /// close_notify is queued (shutting down).
    notified: bool,
}

impl<S: Socket + AsyncWrite + Unpin> TlsBytes<S> {
    /// Completes the handshake on `socket`.
    pub async fn accept(
        socket: S,
        conn: rustls::server::UnbufferedServerConnection,
    ) -> io::Result<Self> {
        Self::handshake(Io::new(socket, Crypto::Server(Box::new(conn)))).await
    }

    /// Completes the handshake on `socket` as the client.
    pub async fn connect(
        socket: S,
        conn: rustls::client::UnbufferedClientConnection,
    ) -> io::Result<Self> {
        Self::handshake(Io::new(socket, Crypto::Client(Box::new(conn)))).await
    }

    async fn handshake(mut io: Io<S>) -> io::Result<Self> {
        io.handshake().await?;
        Ok(TlsBytes {
            io,
            notified: false,
        })
    }

    pub fn io(&self) -> &Io<S> {
        &self.io
    }

    pub fn io_mut(&mut self) -> &mut Io<S> {
        &mut self.io
    }

    /// Queues `bytes` as they are (no copy), once what was queued before has gone out, and
    /// writes what it can.
    pub fn poll_send_bytes(
        &mut self,
        cx: &mut Context<'_>,
        bytes: &mut Bytes,
    ) -> Poll<io::Result<()>> {
        ready!(self.io.poll_flush(cx))?;
        self.io.queue(std::mem::take(bytes));
        let _ = self.io.poll_flush(cx)?;
        Poll::Ready(Ok(()))
    }

    /// Up to `max` (> 0) decrypted bytes as a slice of the receive buffer (no copy); `None` at
    /// the end. For a reader that consumes in place what `poll_read` would copy out.
    pub fn poll_read_bytes(
        &mut self,
        cx: &mut Context<'_>,
        max: usize,
    ) -> Poll<io::Result<Option<Bytes>>> {
        poll_take(&mut self.io, cx, max)
    }
}

/// Up to `max` bytes of what `io` has decrypted (a slice of its buffer), reading when it has
/// none; `None` at the end.
fn poll_take<S: Socket>(
    io: &mut Io<S>,
    cx: &mut Context<'_>,
    max: usize,
) -> Poll<io::Result<Option<Bytes>>> {
    loop {
        if !io.plain.is_empty() {
            let n = io.plain.len().min(max);
            return Poll::Ready(Ok(Some(io.plain.split_to(n).freeze())));
        }
        if ready!(io.poll_read(cx))? == 0 {
            return Poll::Ready(Ok(None));
        }
        // An alert queued by the read goes out at once; a full socket waits for
        // the writer's next flush.
        let _ = io.poll_flush(cx);
    }
}

fn poll_close<S: Socket + AsyncWrite + Unpin>(
    io: &mut Io<S>,
    cx: &mut Context<'_>,
    notified: &mut bool,
) -> Poll<io::Result<()>> {
    if !*notified {
        io.close_notify();
        *notified = true;
    }
    ready!(io.poll_flush(cx))?;
    Pin::new(&mut io.socket).poll_shutdown(cx)
}

impl<S: Socket + Unpin> AsyncRead for TlsBytes<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(b) = ready!(poll_take(&mut self.io, cx, buf.remaining()))? {
            buf.put_slice(&b);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: Socket + AsyncWrite + Unpin> AsyncWrite for TlsBytes<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        // The caller keeps its buffer, so the bytes are copied (the relay's halves hand over
        // `Bytes` instead); one write is queued at a time.
        ready!(self.io.poll_flush(cx))?;
        ready!(self.poll_send_bytes(cx, &mut Bytes::copy_from_slice(data)))?;
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io.poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let TlsBytes { io, notified } = &mut *self;
        poll_close(io, cx, notified)
    }
}

/// The connection shared by the two halves; the lock is never held across an await.
struct Shared<S: Socket>(Arc<Mutex<Io<S>>>);

impl<S: Socket> Shared<S> {
    fn lock(&self) -> MutexGuard<'_, Io<S>> {
        // A panic elsewhere cannot leave the buffers half-updated in a way that matters
        // more than closing: go on with what is there.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct TlsReader<S: Socket>(Shared<S>);
pub struct TlsWriter<S: Socket> {
    shared: Shared<S>,
    notified: bool,
}

impl<S: Socket + AsyncWrite + Unpin> LocalRead for TlsReader<S> {
    async fn read_chunk(&mut self, max: usize) -> io::Result<Read> {
        let taken = std::future::poll_fn(|cx| poll_take(&mut self.0.lock(), cx, max)).await?;
        Ok(taken.map_or(Read::Eof, Read::Bytes))
    }
}

impl<S: Socket + AsyncWrite + Unpin> LocalWrite for TlsWriter<S> {
    async fn write_chunk(&mut self, bytes: Bytes) -> io::Result<()> {
        self.shared.lock().queue(bytes);
        std::future::poll_fn(|cx| self.shared.lock().poll_flush(cx)).await
    }

    // All queued first, so that they are packed into full records and written together.
    async fn write_chunks(
        &mut self,
        chunks: &mut std::collections::VecDeque<Bytes>,
    ) -> io::Result<()> {
        {
            let mut io = self.shared.lock();
            for c in chunks.drain(..) {
                io.queue(c);
            }
        }
        std::future::poll_fn(|cx| self.shared.lock().poll_flush(cx)).await
    }

    async fn finish(&mut self) {
        let notified = &mut self.notified;
        let shared = &self.shared;
        let _ = std::future::poll_fn(|cx| poll_close(&mut shared.lock(), cx, notified)).await;
    }
}

impl<S: Socket + AsyncRead + AsyncWrite + Unpin> SplitIo for TlsBytes<S> {
    type Reader = TlsReader<S>;
    type Writer = TlsWriter<S>;
    fn split_io(self) -> (Self::Reader, Self::Writer) {
        let shared = Arc::new(Mutex::new(self.io));
        (
            TlsReader(Shared(shared.clone())),
            TlsWriter {
                shared: Shared(shared),
                notified: false,
            },
        )
    }
}
