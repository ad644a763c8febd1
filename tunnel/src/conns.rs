//! The established connections of one agent stream, by connectID, and the two halves each
//! connection is made of: the entry the stream's dispatch holds (to deliver data, credit and
//! the peer's close) and the parts its relay holds.
//!
//! Closing rule: whoever removes a connection from its table owns the close. The relay
//! removes it when its local side ends and tells the peer; the stream's dispatch removes it
//! on the peer's close and hands the relay the reply to send (if any), which the relay
//! queues after the DATA it already queued, so a close never overtakes data.
use crate::flow::{inbox, initial_window, Inbox, InboxRx, PushError, SendWindow};
use bytes::Bytes;
use prometheus_client::metrics::gauge::Gauge;
use spoke_proto::Packet;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::oneshot;

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
    /// Our per-connection receive cap: with a Spoke peer, what the window may grow to.
    pub buffer_cap: usize,
    /// The peer's advertised per-connection window, if it speaks Spoke credits.
    pub peer_window: Option<usize>,
}

impl FlowConfig {
    /// Whether we owe the peer credit returns (it only sends what we granted).
    pub fn credits(&self) -> bool {
        self.peer_window.is_some()
    }

    /// The window we advertise to the peer (the `spoke-flow-control` value).
    pub fn advertised_window(&self) -> usize {
        initial_window(self.buffer_cap)
    }
}

/// A new connection's two halves: the entry for the table, the parts for its relay. Its
/// buffered bytes count in `totals` (the process's gauge and its agent stream's).
pub fn new_conn(flow: FlowConfig, totals: [Gauge; 2]) -> (ConnEntry, ConnParts) {
    // A peer without credits cannot be told of a larger window: it gets the cap at once.
    let start = if flow.credits() {
        flow.advertised_window()
    } else {
        flow.buffer_cap
    };
    let (tx, rx) = inbox(start, flow.buffer_cap, totals);
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

    /// The peer is blocked on our credit: the extra credit to grant if the connection's
    /// window grew (see [`Inbox::grow`]); `None` if it did not, or the id is unknown.
    pub fn peer_blocked(&self, id: i64) -> Option<usize> {
        self.lock().get(&id).and_then(|e| e.inbox.grow())
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
    pub(crate) fn remove(&self, id: i64, generation: u64) -> bool {
        let mut conns = self.lock();
        if conns.get(&id).is_some_and(|e| e.generation == generation) {
            conns.remove(&id);
            true
        } else {
            false
        }
    }
}
