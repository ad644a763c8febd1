//! Holding the agent back from an endpoint whose reader lags, while their leg is redirected.
//!
//! A redirect queues bytes in the endpoint's socket without charging its receive buffer, so
//! `spoke_msg` counts what the agent sent and what the endpoint read, and past
//! [`REDIRECT_BACKLOG_LIMIT`] unread bytes it sends the pair's messages by TCP instead. That
//! bounds the memory but leaves the endpoint two queues: the redirected bytes and the TCP ones
//! behind them. A read then returns only the first, and a reader that takes a short read for
//! a drained socket (tokio, nginx) waits for an edge that may never come.
//!
//! So the agent never lets it come to that: before a write it reads the same two counts
//! (`PEERS`, `CONSUMED`) and waits while the write would take the backlog past three quarters
//! of the limit. The maps are read only once the agent may be that far ahead by its own
//! count, so a reader that keeps up costs no system call. Its own flow control then holds the
//! peer back, as with a slow TCP reader. The kernel's fallback stays as the last resort.
//!
//! A wait ends as a TCP sender's does, on the reader's progress: the agent marks in `WAITING`
//! the count it waits for, and the read that reaches it sends the socket on the `WAKE` ring
//! ([`BacklogMaps::wake_from`]). A timer that grows from 1 to 32 ms stays behind it, for a
//! full ring. (Timers alone held a reader that keeps up but shares the agent's CPU for 2 ms
//! each time: it drained the backlog in a fraction of that and the pair idled the rest.)
use aya::maps::{HashMap, MapData, RingBuf};
use bytes::Bytes;
use spoke_agent_common::{Peer, SockKey, REDIRECT_BACKLOG_LIMIT};
use spoke_tunnel::relay::LocalWrite;
use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Writes wait while they would leave more than this unread.
const HOLD_AT: u64 = REDIRECT_BACKLOG_LIMIT / 4 * 3;
/// First and longest wait between two readings of a lagging reader's count, when no read
/// wakes the writer first.
const FIRST_PAUSE: Duration = Duration::from_millis(1);
const LONGEST_PAUSE: Duration = Duration::from_millis(32);

/// The kernel programs' counts of each pair: what the agent sent (`PEERS`, by the agent
/// socket's key) and what the endpoint read (`CONSUMED`, by the endpoint socket's address);
/// and the marks (`WAITING`) whose reads wake a held writer.
pub struct BacklogMaps {
    peers: HashMap<MapData, SockKey, Peer>,
    consumed: HashMap<MapData, u64, u64>,
    waiting: Mutex<HashMap<MapData, u64, u64>>,
    /// Held writers by their endpoint socket's address, woken from the `WAKE` ring.
    waiters: Mutex<std::collections::HashMap<u64, Arc<Notify>>>,
    /// Writes held back for a lagging reader (counted as the hold starts), the time they
    /// waited in all (µs, counted as each ends), and the waits a read's wake-up ended: an
    /// operator's view of how often endpoints stall the fast path.
    holds: AtomicU64,
    held_micros: AtomicU64,
    wakeups: AtomicU64,
}

/// What a pair's counts say: the endpoint socket's address, bytes sent, bytes read.
struct Counts {
    sock: u64,
    sent: u64,
    read: u64,
}

impl BacklogMaps {
    pub(super) fn new(
        peers: HashMap<MapData, SockKey, Peer>,
        consumed: HashMap<MapData, u64, u64>,
        waiting: HashMap<MapData, u64, u64>,
    ) -> BacklogMaps {
        BacklogMaps {
            peers,
            consumed,
            waiting: Mutex::new(waiting),
            waiters: Mutex::default(),
            holds: AtomicU64::new(0),
            held_micros: AtomicU64::new(0),
            wakeups: AtomicU64::new(0),
        }
    }

    /// (writes held, seconds the ended holds waited in all, waits ended by a read's wake-up).
    pub(super) fn holds(&self) -> (u64, f64, u64) {
        let micros = self.held_micros.load(Ordering::Relaxed);
        (
            self.holds.load(Ordering::Relaxed),
            micros as f64 / 1e6,
            self.wakeups.load(Ordering::Relaxed),
        )
    }

    /// The counts of the agent socket `key`; `None` if it is not paired, or its endpoint is
    /// closing.
    fn counts(&self, key: &SockKey) -> Option<Counts> {
        let peer = self.peers.get(key, 0).ok()?;
        let read = self.consumed.get(&peer.sock, 0).ok()?;
        Some(Counts {
            sock: peer.sock,
            sent: peer.sent,
            read,
        })
    }

    /// Waits until the endpoint socket `sock` has read `at` bytes in all, or `longest`; true
    /// if a read's wake-up ended the wait.
    async fn wait_for(&self, sock: u64, at: u64, notify: &Arc<Notify>, longest: Duration) -> bool {
        let _mark = Mark {
            maps: self,
            sock,
            at,
            notify,
        };
        lock(&self.waiters).insert(sock, notify.clone());
        if lock(&self.waiting).insert(sock, at, 0).is_err() {
            tokio::time::sleep(longest).await;
            return false;
        }
        // A read between the last look at the counts and the mark woke nobody. (The read
        // tracepoint adds to the count with a full barrier before it looks for a mark. Here
        // the mark and this lookup are two system calls, ordered by the fully ordered atomic
        // file reference the second takes: one of the two sides sees the other.)
        if self.consumed.get(&sock, 0).is_ok_and(|read| read < at) {
            return tokio::time::timeout(longest, notify.notified())
                .await
                .is_ok();
        }
        false
    }

    /// Wakes the writers whose readers' addresses `ring` brings, until it is empty.
    pub(super) fn wake_from(&self, ring: &mut RingBuf<MapData>) {
        while let Some(item) = ring.next() {
            let Ok(sock) = <[u8; 8]>::try_from(&*item).map(u64::from_ne_bytes) else {
                continue;
            };
            if let Some(waiter) = lock(&self.waiters).get(&sock) {
                waiter.notify_one();
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing panics while holding these; a poisoned map is still consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A writer's mark in `WAITING` and its entry among the waiters, removed however the wait
/// ends (woken, timed out, or the write dropped with its connection). Only its own: a freed
/// endpoint socket's address can come back as another pair's, whose writer may be waiting.
struct Mark<'a> {
    maps: &'a BacklogMaps,
    sock: u64,
    at: u64,
    notify: &'a Arc<Notify>,
}

impl Drop for Mark<'_> {
    fn drop(&mut self) {
        // Usually gone already: the read that reached it removed it.
        let mut waiting = lock(&self.maps.waiting);
        if waiting.get(&self.sock, 0).is_ok_and(|at| at == self.at) {
            let _ = waiting.remove(&self.sock);
        }
        drop(waiting);
        let mut waiters = lock(&self.maps.waiters);
        if waiters
            .get(&self.sock)
            .is_some_and(|w| Arc::ptr_eq(w, self.notify))
        {
            waiters.remove(&self.sock);
        }
    }
}

/// One agent socket's view of its redirect.
pub struct Backlog {
    maps: Arc<BacklogMaps>,
    key: SockKey,
    /// Bytes that may be unread: the backlog last read plus what was written since.
    ahead: u64,
    /// The socket is not paired (or no longer): TCP bounds it, nothing to watch.
    unpaired: bool,
    notify: Arc<Notify>,
}

impl Backlog {
    pub(super) fn new(maps: Arc<BacklogMaps>, key: SockKey) -> Backlog {
        Backlog {
            maps,
            key,
            ahead: 0,
            unpaired: false,
            notify: Arc::new(Notify::new()),
        }
    }

    /// Returns once `n` more bytes can be written without passing [`HOLD_AT`].
    pub async fn before_write(&mut self, n: usize) {
        let n = n as u64;
        if self.unpaired || self.ahead + n <= HOLD_AT {
            self.ahead += n;
            return;
        }
        let mut pause = FIRST_PAUSE;
        // Once held: since when, and the endpoint's read count that lets the write go.
        let mut held: Option<(Instant, u64)> = None;
        loop {
            let Some(c) = self.maps.counts(&self.key) else {
                self.unpaired = true;
                break;
            };
            let unread = c.sent.saturating_sub(c.read);
            // An unread backlog larger than the limit minus this write would be refused by
            // the kernel; a write larger than the margin goes when all is read.
            let go = match held {
                None => unread == 0 || unread + n <= HOLD_AT,
                Some((_, at)) => c.read >= at,
            };
            if go {
                self.ahead = unread + n;
                break;
            }
            // Counted as it starts, so that a reader that never reads shows too. The agent
            // sends nothing meanwhile, so `sent` stays put.
            let at = held
                .get_or_insert_with(|| {
                    self.maps.holds.fetch_add(1, Ordering::Relaxed);
                    (Instant::now(), release_at(c.sent, n))
                })
                .1;
            if self.maps.wait_for(c.sock, at, &self.notify, pause).await {
                self.maps.wakeups.fetch_add(1, Ordering::Relaxed);
            }
            pause = (pause * 2).min(LONGEST_PAUSE);
        }
        if let Some((since, _)) = held {
            let micros = u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX);
            self.maps.held_micros.fetch_add(micros, Ordering::Relaxed);
        }
    }
}

/// The endpoint's read count that releases a write of `n` bytes held after `sent`: the write
/// fits and half the margin is read. As a TCP sender is woken only once a good part of its
/// buffer is free, the reader still has bytes while the agent refills, and a run of small
/// reads wakes it once. A write larger than the margin waits for everything to be read.
fn release_at(sent: u64, n: u64) -> u64 {
    (sent + n)
        .saturating_sub(HOLD_AT)
        .max(sent.saturating_sub(HOLD_AT / 2))
        .min(sent)
}

/// The key `spoke_sockops` and `spoke_msg` give the agent's socket from `local` to `peer`
/// in the network namespace `netns`: addresses as network-order words, an IPv4-mapped pair
/// folded into IPv4, ports in host order.
pub fn sock_key(netns: u64, local: SocketAddr, peer: SocketAddr) -> SockKey {
    const AF_INET: u32 = 2;
    const AF_INET6: u32 = 10;
    let v4 = |ip: IpAddr| match ip {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(a) => a.to_ipv4_mapped(),
    };
    let words = |ip: IpAddr| -> [u32; 4] {
        match ip {
            IpAddr::V4(a) => [u32::from_ne_bytes(a.octets()), 0, 0, 0],
            IpAddr::V6(a) => {
                let o = a.octets();
                let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
                [w(0), w(4), w(8), w(12)]
            }
        }
    };
    let (family, local_ip, remote_ip) = match (v4(local.ip()), v4(peer.ip())) {
        (Some(l), Some(r)) => (AF_INET, words(l.into()), words(r.into())),
        _ => (AF_INET6, words(local.ip()), words(peer.ip())),
    };
    SockKey {
        netns,
        local_ip,
        remote_ip,
        local_port: local.port(),
        remote_port: peer.port(),
        family,
    }
}

/// A local end's writer that waits for a lagging reader first ([`Backlog`]).
pub struct HeldWriter<W> {
    pub inner: W,
    pub backlog: Backlog,
}

impl<W: LocalWrite> LocalWrite for HeldWriter<W> {
    async fn write_chunk(&mut self, bytes: Bytes) -> io::Result<()> {
        self.backlog.before_write(bytes.len()).await;
        self.inner.write_chunk(bytes).await
    }

    async fn write_chunks(&mut self, chunks: &mut VecDeque<Bytes>) -> io::Result<()> {
        let n = chunks.iter().map(Bytes::len).sum();
        self.backlog.before_write(n).await;
        self.inner.write_chunks(chunks).await
    }

    async fn finish(&mut self) {
        self.inner.finish().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_writes_go_once_they_fit_and_half_the_margin_is_read() {
        let sent = 100 << 20;
        // A small write: half the margin read.
        assert_eq!(release_at(sent, 16 << 10), sent - HOLD_AT / 2);
        // A write larger than half the margin: read until it fits.
        let n = HOLD_AT / 4 * 3;
        assert_eq!(release_at(sent, n), sent + n - HOLD_AT);
        assert!(sent - release_at(sent, n) + n <= HOLD_AT);
        // Larger than the margin: everything read.
        assert_eq!(release_at(sent, HOLD_AT + 1), sent);
        // Early in a connection, nothing below zero.
        assert_eq!(release_at(1 << 20, 16 << 10), 0);
    }

    #[test]
    fn keys_as_the_kernel_programs_build_them() {
        let k = sock_key(
            9,
            "127.0.0.1:40000".parse().unwrap(),
            "127.0.0.2:10250".parse().unwrap(),
        );
        assert_eq!(k.family, 2);
        assert_eq!(k.local_ip, [u32::from_ne_bytes([127, 0, 0, 1]), 0, 0, 0]);
        assert_eq!(k.remote_ip, [u32::from_ne_bytes([127, 0, 0, 2]), 0, 0, 0]);
        assert_eq!((k.local_port, k.remote_port, k.netns), (40000, 10250, 9));
        // A dual-stack socket's IPv4-mapped pair is the IPv4 key.
        let mapped = sock_key(
            9,
            "[::ffff:127.0.0.1]:40000".parse().unwrap(),
            "[::ffff:127.0.0.2]:10250".parse().unwrap(),
        );
        assert_eq!(mapped, k);
        let v6 = sock_key(
            1,
            "[::1]:5".parse().unwrap(),
            "[fd00::2]:6".parse().unwrap(),
        );
        assert_eq!(v6.family, 10);
        assert_eq!(v6.local_ip, [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])]);
        assert_eq!(v6.remote_ip[0], u32::from_ne_bytes([0xfd, 0, 0, 0]));
    }
}
