//! Per-connection flow control over one shared tunnel stream.
//!
//! HTTP/2 can only slow the whole agent stream, so each tunnelled connection gets:
//! - an [`Inbox`]: bytes received from the peer waiting for the local endpoint, bounded by a
//!   byte cap; the shared dispatch loop pushes without ever waiting;
//! - a [`SendWindow`]: with a Spoke peer, credit granted by the peer's inbox as it drains,
//!   so we read our local endpoint only while the peer has room (no overflow, no stall);
//! - with an upstream peer (no credits) the window is unlimited and an inbox that overflows
//!   closes that one connection, never the stream.
//!
//! A Spoke receiver's window starts at [`INITIAL_WINDOW`] and doubles, up to its cap, each time
//! the sender reports it is blocked on credit while the inbox is nearly empty: the local end
//! keeps up, so what limits the connection is a window smaller than the link's
//! bandwidth-delay product (QUIC's STREAM_DATA_BLOCKED, used the same way). A sender reports
//! only a stall that outlasts a scheduling delay (5 ms, in `relay`), so windows grow over long
//! round trips and not on a fast link, where they already suffice. A reader that falls behind
//! fills its inbox and never grows the window: one stalled from the start holds the initial
//! window, one that stalls after growing it at most the cap.
use bytes::Bytes;
use prometheus_client::metrics::gauge::Gauge;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::Notify;

/// Why a push into an inbox was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum PushError {
    /// The local endpoint is not draining fast enough and the cap is reached.
    Overflow,
    /// The connection's relay has ended.
    Closed,
}

/// A receiver's first window (and the credit it advertises), unless its cap is smaller.
pub const INITIAL_WINDOW: usize = 4 << 20;

/// What producer and consumer of one inbox share. A plain queue under a lock rather than a
/// channel: an idle connection then holds no queue allocation at all (a tokio channel
/// allocates a block of slots up front, about 1 KiB per connection).
#[derive(Debug)]
struct Shared {
    queue: Mutex<Queue>,
    /// Wakes the consumer; a notification sent while nobody waits is kept as a permit.
    ready: Notify,
    buffered: AtomicUsize,
    /// The window granted to the peer: what may be in flight or buffered at once. Grows
    /// toward `Inbox::cap` (see [`Inbox::grow`]); only the stream's dispatch writes it.
    window: AtomicUsize,
    /// Sums of buffered bytes this inbox adds to: the process's and its agent stream's.
    totals: [Gauge; 2],
}

#[derive(Debug, Default)]
struct Queue {
    chunks: VecDeque<Bytes>,
    producer_gone: bool,
    consumer_gone: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Nothing panics while holding this lock; stay usable if something ever does.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn release(&self, n: usize) {
        self.buffered.fetch_sub(n, Ordering::AcqRel);
        for t in &self.totals {
            t.dec_by(n as i64);
        }
    }
}

/// Producer side of a connection's receive buffer.
#[derive(Debug)]
pub struct Inbox {
    shared: Arc<Shared>,
    /// The most the window may grow to.
    cap: usize,
}

/// Consumer side, owned by the connection's relay.
#[derive(Debug)]
pub struct InboxRx {
    shared: Arc<Shared>,
}

/// A connection's receive buffer holding at most about its window, which starts at `window`
/// and may grow to `cap`; `totals` sum the buffered bytes of many connections (the process's
/// gauge, the agent stream's load).
pub fn inbox(window: usize, cap: usize, totals: [Gauge; 2]) -> (Inbox, InboxRx) {
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue::default()),
        ready: Notify::new(),
        buffered: AtomicUsize::new(0),
        window: AtomicUsize::new(window.min(cap)),
        totals,
    });
    (
        Inbox {
            shared: shared.clone(),
            cap,
        },
        InboxRx { shared },
    )
}

/// The window a receiver with this cap starts with, and advertises.
pub fn initial_window(cap: usize) -> usize {
    cap.min(INITIAL_WINDOW)
}

impl Inbox {
    /// Queues `data` unless that would pass the window. Never waits. A chunk larger than the
    /// whole window is still accepted into an empty inbox so a peer's large write cannot wedge.
    pub fn push(&self, data: Bytes) -> Result<(), PushError> {
        let len = data.len();
        let mut q = self.shared.lock();
        if q.consumer_gone {
            return Err(PushError::Closed);
        }
        if len == 0 {
            // Nothing to deliver; queueing it would let empty DATA grow the queue unbounded.
            return Ok(());
        }
        let before = self.shared.buffered.load(Ordering::Acquire);
        if before > 0 && before + len > self.shared.window.load(Ordering::Acquire) {
            return Err(PushError::Overflow);
        }
        self.shared.buffered.fetch_add(len, Ordering::AcqRel);
        for t in &self.shared.totals {
            t.inc_by(len as i64);
        }
        q.chunks.push_back(data);
        drop(q);
        self.shared.ready.notify_one();
        Ok(())
    }

    pub fn buffered(&self) -> usize {
        self.shared.buffered.load(Ordering::Acquire)
    }

    /// The peer is blocked on credit. If the local end keeps up (at most a quarter of the
    /// window is buffered) and the window is below the cap, doubles the window and returns
    /// the extra credit to grant. Called only from the stream's dispatch, so the window has
    /// one writer; the extra is room the inbox has before the grant leaves.
    pub fn grow(&self) -> Option<usize> {
        let window = self.shared.window.load(Ordering::Acquire);
        if window >= self.cap || self.buffered() > window / 4 {
            return None;
        }
        let grown = window.saturating_mul(2).min(self.cap);
        self.shared.window.store(grown, Ordering::Release);
        Some(grown - window)
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.shared.lock().producer_gone = true;
        self.shared.ready.notify_one();
    }
}

impl InboxRx {
    /// Next chunk; `None` once the producer is gone and everything was taken.
    pub async fn recv(&mut self) -> Option<Bytes> {
        loop {
            {
                let mut q = self.shared.lock();
                if let Some(b) = q.chunks.pop_front() {
                    return Some(b);
                }
                if q.producer_gone {
                    return None;
                }
            }
            self.shared.ready.notified().await;
        }
    }

    pub fn try_recv(&mut self) -> Option<Bytes> {
        self.shared.lock().chunks.pop_front()
    }

    /// Marks `n` bytes as written to the local endpoint, freeing room in the window.
    pub fn consumed(&self, n: usize) {
        self.shared.release(n);
    }

    /// The window granted to the peer so far.
    pub fn window(&self) -> usize {
        self.shared.window.load(Ordering::Acquire)
    }
}

impl Drop for InboxRx {
    fn drop(&mut self) {
        // Bytes still queued are dropped with us; keep the shared gauge honest.
        let left: usize = {
            let mut q = self.shared.lock();
            q.consumer_gone = true;
            q.chunks.drain(..).map(|b| b.len()).sum()
        };
        self.shared.release(left);
    }
}

/// Credit for sending toward the peer. `None` limit means the peer speaks no credits.
#[derive(Debug)]
pub struct SendWindow {
    avail: AtomicI64,
    limited: bool,
    notify: Notify,
}

impl SendWindow {
    pub fn unlimited() -> Arc<Self> {
        Arc::new(Self {
            avail: AtomicI64::new(i64::MAX / 2),
            limited: false,
            notify: Notify::new(),
        })
    }

    pub fn with_credit(initial: usize) -> Arc<Self> {
        Arc::new(Self {
            avail: AtomicI64::new(initial as i64),
            limited: true,
            notify: Notify::new(),
        })
    }

    pub fn is_limited(&self) -> bool {
        self.limited
    }

    /// Waits until there is credit and returns how many bytes may be sent now (≤ `max`).
    /// Cancel-safe: nothing is taken until [`SendWindow::spend`].
    pub async fn ready(&self, max: usize) -> usize {
        loop {
            let notified = self.notify.notified();
            let avail = self.avail.load(Ordering::Acquire);
            if avail > 0 {
                return (avail as usize).min(max);
            }
            notified.await;
        }
    }

    /// True when the window is exhausted (a flow-control stall is about to happen).
    pub fn exhausted(&self) -> bool {
        self.avail.load(Ordering::Acquire) <= 0
    }

    pub fn spend(&self, n: usize) {
        if self.limited {
            self.avail.fetch_sub(n as i64, Ordering::AcqRel);
        }
    }

    pub fn grant(&self, n: i64) {
        if self.limited && n > 0 {
            // A hostile peer may grant absurd amounts: saturate instead of wrapping negative.
            let _ = self
                .avail
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                    Some(v.saturating_add(n))
                });
            self.notify.notify_one();
        }
    }
}

/// Batches credit returns so a window update goes out per quarter window, not per chunk.
#[derive(Debug, Default)]
pub struct CreditReturn {
    pending: usize,
}

impl CreditReturn {
    /// Records `n` drained bytes; returns the amount to grant now, if a quarter of the
    /// current `window` has drained since the last grant.
    pub fn drained(&mut self, n: usize, window: usize) -> Option<usize> {
        self.pending += n;
        (self.pending >= (window / 4).max(1)).then(|| std::mem::take(&mut self.pending))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn inbox_enforces_cap_and_frees_on_consume() {
        let (tx, mut rx) = inbox(10, 10, Default::default());
        tx.push(Bytes::from_static(b"123456")).unwrap();
        assert_eq!(
            tx.push(Bytes::from_static(b"123456")),
            Err(PushError::Overflow)
        );
        let got = rx.recv().await.unwrap();
        rx.consumed(got.len());
        tx.push(Bytes::from_static(b"123456")).unwrap();
        assert_eq!(tx.buffered(), 6);
    }

    #[tokio::test]
    async fn oversize_chunk_fits_into_empty_inbox_only() {
        let (tx, _rx) = inbox(4, 4, Default::default());
        tx.push(Bytes::from_static(b"123456")).unwrap();
        assert_eq!(tx.push(Bytes::from_static(b"1")), Err(PushError::Overflow));
    }

    #[tokio::test]
    async fn dropped_consumer_closes_and_releases() {
        let total = Gauge::default();
        let (tx, rx) = inbox(100, 100, [total.clone(), Gauge::default()]);
        tx.push(Bytes::from_static(b"abc")).unwrap();
        assert_eq!(total.get(), 3);
        drop(rx);
        assert_eq!(tx.buffered(), 0);
        assert_eq!(total.get(), 0);
        assert_eq!(tx.push(Bytes::from_static(b"x")), Err(PushError::Closed));
    }

    #[tokio::test]
    async fn window_waits_for_grant() {
        let w = SendWindow::with_credit(5);
        assert_eq!(w.ready(100).await, 5);
        w.spend(5);
        assert!(w.exhausted());
        let w2 = w.clone();
        let waiter = tokio::spawn(async move { w2.ready(100).await });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        w.grant(7);
        assert_eq!(waiter.await.unwrap(), 7);
    }

    #[tokio::test]
    async fn empty_chunks_are_not_queued_and_grants_saturate() {
        let (tx, mut rx) = inbox(10, 10, Default::default());
        for _ in 0..1000 {
            tx.push(Bytes::new()).unwrap();
        }
        drop(tx);
        assert!(rx.recv().await.is_none());
        let w = SendWindow::with_credit(1);
        w.grant(i64::MAX);
        w.grant(i64::MAX);
        assert!(!w.exhausted());
    }

    #[test]
    fn credit_batches_by_quarter_window() {
        let mut c = CreditReturn::default();
        assert_eq!(c.drained(10, 100), None);
        assert_eq!(c.drained(15, 100), Some(25));
        assert_eq!(c.drained(1, 100), None);
        // After the window grew, a batch is a quarter of the new one.
        assert_eq!(c.drained(30, 200), None);
        assert_eq!(c.drained(19, 200), Some(50));
    }

    #[test]
    fn window_grows_only_while_the_local_end_keeps_up() {
        let (tx, mut rx) = inbox(100, 350, Default::default());
        assert_eq!(rx.window(), 100);
        // Empty inbox: the window doubles, the extra is what to grant.
        assert_eq!(tx.grow(), Some(100));
        assert_eq!(rx.window(), 200);
        // The larger window holds more before an overflow.
        tx.push(Bytes::from(vec![0u8; 120])).unwrap();
        tx.push(Bytes::from(vec![0u8; 70])).unwrap();
        // More than a quarter buffered: the reader is behind, the window stays.
        assert_eq!(tx.grow(), None);
        assert_eq!(rx.window(), 200);
        while let Some(b) = rx.try_recv() {
            rx.consumed(b.len());
        }
        // Drained again: it grows, but never past the cap, and then no more.
        assert_eq!(tx.grow(), Some(150));
        assert_eq!(rx.window(), 350);
        assert_eq!(tx.grow(), None);
    }
}
