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
use aya::maps::{HashMap, MapData};
use bytes::Bytes;
use spoke_agent_common::{Peer, SockKey, REDIRECT_BACKLOG_LIMIT};
use spoke_tunnel::relay::LocalWrite;
use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// Writes wait while they would leave more than this unread.
const HOLD_AT: u64 = REDIRECT_BACKLOG_LIMIT / 4 * 3;
/// First and longest pause between two readings of a lagging reader's count.
const FIRST_PAUSE: Duration = Duration::from_millis(1);
const LONGEST_PAUSE: Duration = Duration::from_millis(32);

/// The kernel programs' counts of each pair: what the agent sent (`PEERS`, by the agent
/// socket's key) and what the endpoint read (`CONSUMED`, by the endpoint socket's address).
pub struct BacklogMaps {
    pub(super) peers: HashMap<MapData, SockKey, Peer>,
    pub(super) consumed: HashMap<MapData, u64, u64>,
}

impl BacklogMaps {
    /// Bytes the agent socket `key` sent that its endpoint has not read; `None` if the
    /// socket is not paired, or its endpoint is closing.
    fn unread(&self, key: &SockKey) -> Option<u64> {
        let peer = self.peers.get(key, 0).ok()?;
        let consumed = self.consumed.get(&peer.sock, 0).ok()?;
        Some(peer.sent.saturating_sub(consumed))
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
}

impl Backlog {
    pub(super) fn new(maps: Arc<BacklogMaps>, key: SockKey) -> Backlog {
        Backlog {
            maps,
            key,
            ahead: 0,
            unpaired: false,
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
        loop {
            match self.maps.unread(&self.key) {
                // An unread backlog larger than the limit minus this write would be
                // refused by the kernel; a write larger than the margin goes when all is read.
                Some(unread) if unread + n > HOLD_AT && unread > 0 => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(LONGEST_PAUSE);
                }
                Some(unread) => {
                    self.ahead = unread + n;
                    return;
                }
                None => {
                    self.unpaired = true;
                    return;
                }
            }
        }
    }
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
