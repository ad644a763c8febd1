//! The send side of one tunnel stream, shared by all of its connections.
//!
//! Two queues: `control` (dial answers, credits, error replies) is served first and never
//! makes the dispatch loop wait; `data` carries DATA and the CLOSE that follows it, in
//! order, and pushes back on connection readers when the HTTP/2 stream is full. A control
//! queue that fills up means the peer stopped reading altogether: the stream is failed.
use crate::metrics::StreamMetrics;
use futures::Stream;
use spoke_proto::Packet;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

const CONTROL_QUEUE: usize = 4096;
const DATA_QUEUE: usize = 64;

/// Failure to queue a packet: the stream is gone (or was just failed for not reading).
#[derive(Debug, thiserror::Error)]
#[error("tunnel stream closed")]
pub struct StreamClosed;

#[derive(Clone, Debug)]
pub struct Outbound {
    control: mpsc::Sender<Packet>,
    data: mpsc::Sender<Packet>,
    /// Cancelled when the stream ends for any reason: every connection on it closes.
    pub closed: CancellationToken,
}

pub struct OutboundRx {
    control: mpsc::Receiver<Packet>,
    data: mpsc::Receiver<Packet>,
    closed: Pin<Box<WaitForCancellationFutureOwned>>,
    metrics: Option<(StreamMetrics, &'static str)>,
}

/// Creates the queues of a new stream. `metrics` counts packets as they leave, under the
/// given segment label (upstream's `to_agent`, `to_client`, `from_agent`, ...).
pub fn outbound(metrics: Option<(StreamMetrics, &'static str)>) -> (Outbound, OutboundRx) {
    let (ctx, crx) = mpsc::channel(CONTROL_QUEUE);
    let (dtx, drx) = mpsc::channel(DATA_QUEUE);
    let closed = CancellationToken::new();
    (
        Outbound {
            control: ctx,
            data: dtx,
            closed: closed.clone(),
        },
        OutboundRx {
            control: crx,
            data: drx,
            closed: Box::pin(closed.cancelled_owned()),
            metrics,
        },
    )
}

impl Outbound {
    /// Queues a control packet without waiting.
    pub fn control(&self, p: Packet) -> Result<(), StreamClosed> {
        match self.control.try_send(p) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!("peer is not reading the tunnel stream; failing it");
                self.closed.cancel();
                Err(StreamClosed)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(StreamClosed),
        }
    }

    /// Queues a data-ordered packet, waiting while the stream is full.
    pub async fn data(&self, p: Packet) -> Result<(), StreamClosed> {
        tokio::select! {
            r = self.data.send(p) => r.map_err(|_| StreamClosed),
            _ = self.closed.cancelled() => Err(StreamClosed),
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }
}

impl Stream for OutboundRx {
    type Item = Packet;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Packet>> {
        if self.closed.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        let next = match self.control.poll_recv(cx) {
            Poll::Ready(Some(p)) => Poll::Ready(Some(p)),
            control => match (self.data.poll_recv(cx), control) {
                (Poll::Ready(Some(p)), _) => Poll::Ready(Some(p)),
                // Both senders gone: the stream has nothing more to say.
                (Poll::Ready(None), Poll::Ready(None)) => Poll::Ready(None),
                _ => Poll::Pending,
            },
        };
        if let (Poll::Ready(Some(p)), Some((m, segment))) = (&next, &self.metrics) {
            m.packet(segment, p.r#type);
        }
        next
    }
}
