//! The send side of one tunnel stream, shared by all of its connections.
//!
//! Two queues: `control` (dial answers, credits, error replies) is served first and never
//! makes the dispatch loop wait; `data` carries DATA and the CLOSE that follows it, in
//! order, and pushes back on connection readers when the HTTP/2 stream is full. A control
//! queue that fills up means the peer stopped reading altogether: the stream is failed.
//!
//! An idle stream's queues hold no memory: they allocate on their first packet and give a
//! grown buffer back once drained (a server keeps one such pair per agent, thousands of them
//! mostly idle).
use crate::metrics::{SegmentPackets, StreamMetrics};
use futures::Stream;
use spoke_proto::Packet;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use tokio::sync::Notify;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

const CONTROL_QUEUE: usize = 4096;
const DATA_QUEUE: usize = 64;
/// A drained queue whose buffer grew past this many packets frees it.
const KEEP: usize = 16;

/// Failure to queue a packet: the stream is gone (or was just failed for not reading).
#[derive(Debug, thiserror::Error)]
#[error("tunnel stream closed")]
pub struct StreamClosed;

#[derive(Debug, Default)]
struct Queues {
    control: VecDeque<Packet>,
    data: VecDeque<Packet>,
    /// The receiver, waiting for a packet.
    waker: Option<Waker>,
    /// The receiver was dropped.
    rx_gone: bool,
}

#[derive(Debug)]
struct Shared {
    queues: Mutex<Queues>,
    /// Live `Outbound` handles; none left (and nothing queued) ends the receiver.
    senders: AtomicUsize,
    /// A data slot was freed (or the receiver went away).
    space: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queues> {
        // A panic while holding this lock would be a bug elsewhere; the queues stay usable.
        self.queues.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn pop(q: &mut VecDeque<Packet>) -> Option<Packet> {
    let p = q.pop_front()?;
    if q.is_empty() && q.capacity() > KEEP {
        *q = VecDeque::new();
    }
    Some(p)
}

#[derive(Debug)]
pub struct Outbound {
    shared: Arc<Shared>,
    /// Cancelled when the stream ends for any reason: every connection on it closes.
    pub closed: CancellationToken,
}

impl Clone for Outbound {
    fn clone(&self) -> Self {
        self.shared.senders.fetch_add(1, Ordering::Relaxed);
        Self {
            shared: self.shared.clone(),
            closed: self.closed.clone(),
        }
    }
}

impl Drop for Outbound {
    fn drop(&mut self) {
        if self.shared.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            let waker = self.shared.lock().waker.take();
            if let Some(w) = waker {
                w.wake();
            }
        }
    }
}

pub struct OutboundRx {
    shared: Arc<Shared>,
    closed: Pin<Box<WaitForCancellationFutureOwned>>,
    metrics: Option<SegmentPackets>,
}

impl Drop for OutboundRx {
    fn drop(&mut self) {
        let (control, data) = {
            let mut q = self.shared.lock();
            q.rx_gone = true;
            (std::mem::take(&mut q.control), std::mem::take(&mut q.data))
        };
        // Dropped outside the lock: a packet may own a connection's last handle.
        drop((control, data));
        self.shared.space.notify_waiters();
    }
}

/// Creates the queues of a new stream. `metrics` counts packets as they leave, under the
/// given segment label (upstream's `to_agent`, `to_client`, `from_agent`, ...).
pub fn outbound(metrics: Option<(StreamMetrics, &'static str)>) -> (Outbound, OutboundRx) {
    let shared = Arc::new(Shared {
        queues: Mutex::new(Queues::default()),
        senders: AtomicUsize::new(1),
        space: Notify::new(),
    });
    let closed = CancellationToken::new();
    (
        Outbound {
            shared: shared.clone(),
            closed: closed.clone(),
        },
        OutboundRx {
            shared,
            closed: Box::pin(closed.cancelled_owned()),
            metrics: metrics.map(|(m, segment)| m.segment(segment)),
        },
    )
}

impl Outbound {
    /// Queues a control packet without waiting.
    pub fn control(&self, p: Packet) -> Result<(), StreamClosed> {
        let mut q = self.shared.lock();
        if q.rx_gone {
            return Err(StreamClosed);
        }
        if q.control.len() >= CONTROL_QUEUE {
            drop(q);
            tracing::warn!("peer is not reading the tunnel stream; failing it");
            self.closed.cancel();
            return Err(StreamClosed);
        }
        q.control.push_back(p);
        let waker = q.waker.take();
        drop(q);
        if let Some(w) = waker {
            w.wake();
        }
        Ok(())
    }

    /// Queues a data-ordered packet, waiting while the stream is full.
    pub async fn data(&self, p: Packet) -> Result<(), StreamClosed> {
        let mut p = Some(p);
        loop {
            if self.closed.is_cancelled() {
                return Err(StreamClosed);
            }
            let space = self.shared.space.notified();
            tokio::pin!(space);
            // Registered before looking, so a slot freed in between is not missed.
            space.as_mut().enable();
            {
                let mut q = self.shared.lock();
                if q.rx_gone {
                    return Err(StreamClosed);
                }
                if q.data.len() < DATA_QUEUE {
                    if let Some(p) = p.take() {
                        q.data.push_back(p);
                    }
                    let waker = q.waker.take();
                    drop(q);
                    if let Some(w) = waker {
                        w.wake();
                    }
                    return Ok(());
                }
            }
            tokio::select! {
                _ = &mut space => {}
                _ = self.closed.cancelled() => return Err(StreamClosed),
            }
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
        let mut q = self.shared.lock();
        let next = match pop(&mut q.control) {
            Some(p) => Some((p, false)),
            None => pop(&mut q.data).map(|p| (p, true)),
        };
        let Some((p, freed)) = next else {
            // Every sender gone and nothing left: the stream has nothing more to say.
            if self.shared.senders.load(Ordering::Acquire) == 0 {
                return Poll::Ready(None);
            }
            match &q.waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => q.waker = Some(cx.waker().clone()),
            }
            return Poll::Pending;
        };
        drop(q);
        if freed {
            self.shared.space.notify_one();
        }
        if let Some(m) = &self.metrics {
            m.inc(p.r#type);
        }
        Poll::Ready(Some(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use spoke_proto::PacketType;

    fn pkt(t: PacketType) -> Packet {
        Packet {
            r#type: t as i32,
            payload: None,
        }
    }

    #[tokio::test]
    async fn control_first_then_data_in_order_then_end() {
        let (out, mut rx) = outbound(None);
        out.data(pkt(PacketType::Data)).await.expect("data");
        out.data(pkt(PacketType::CloseReq)).await.expect("close");
        out.control(pkt(PacketType::DialRsp)).expect("control");
        let kinds: Vec<i32> = vec![
            rx.next().await.expect("1").r#type,
            rx.next().await.expect("2").r#type,
            rx.next().await.expect("3").r#type,
        ];
        assert_eq!(
            kinds,
            vec![
                PacketType::DialRsp as i32,
                PacketType::Data as i32,
                PacketType::CloseReq as i32
            ]
        );
        drop(out);
        assert!(rx.next().await.is_none(), "no sender left: the stream ends");
    }

    #[tokio::test]
    async fn a_full_data_queue_waits_for_the_receiver() {
        let (out, mut rx) = outbound(None);
        for _ in 0..DATA_QUEUE {
            out.data(pkt(PacketType::Data)).await.expect("room");
        }
        let more = out.data(pkt(PacketType::Data));
        tokio::pin!(more);
        assert!(
            futures::poll!(more.as_mut()).is_pending(),
            "the 65th packet waits"
        );
        rx.next().await.expect("one out");
        more.await.expect("then it goes in");
        let q = rx.shared.lock();
        assert_eq!(q.data.len(), DATA_QUEUE);
    }

    #[tokio::test]
    async fn drained_queues_give_their_buffers_back_and_idle_ones_hold_none() {
        let (out, mut rx) = outbound(None);
        assert_eq!(rx.shared.lock().data.capacity(), 0);
        for _ in 0..DATA_QUEUE {
            out.data(pkt(PacketType::Data)).await.expect("room");
        }
        for _ in 0..DATA_QUEUE {
            rx.next().await.expect("out");
        }
        let q = rx.shared.lock();
        assert_eq!((q.data.capacity(), q.control.capacity()), (0, 0));
    }

    #[tokio::test]
    async fn senders_fail_once_the_receiver_or_the_stream_is_gone() {
        let (out, rx) = outbound(None);
        let waiting = {
            let out = out.clone();
            tokio::spawn(async move {
                for _ in 0..=DATA_QUEUE {
                    out.data(pkt(PacketType::Data)).await?;
                }
                Ok::<_, StreamClosed>(())
            })
        };
        tokio::task::yield_now().await;
        drop(rx);
        assert!(waiting.await.expect("task").is_err());
        assert!(out.control(pkt(PacketType::DialRsp)).is_err());

        let (out, _rx) = outbound(None);
        out.closed.cancel();
        assert!(out.data(pkt(PacketType::Data)).await.is_err());
    }

    #[tokio::test]
    async fn a_control_queue_the_peer_never_reads_fails_the_stream() {
        let (out, _rx) = outbound(None);
        for _ in 0..CONTROL_QUEUE {
            out.control(pkt(PacketType::DialRsp)).expect("room");
        }
        assert!(out.control(pkt(PacketType::DialRsp)).is_err());
        assert!(out.is_closed());
    }
}
