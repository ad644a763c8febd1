//! Types shared between the kernel programs (agent-ebpf) and the agent.
//!
//! Every map key and value is `#[repr(C)]`, `Copy` and laid out without implicit padding, so
//! the kernel and userspace agree on the bytes.
#![no_std]

/// Identifies one TCP socket: its network namespace plus its own view of the 4-tuple.
///
/// Addresses are kept exactly as the BPF contexts expose them (network byte order words);
/// IPv4 uses `ip[0]` with the other words zero, and IPv4-mapped IPv6 sockets are folded into
/// that IPv4 form so a dual-stack listener pairs with an IPv4 client. Ports are host order.
/// `netns` is the network namespace cookie: equal tuples in different namespaces never
/// collide. The pairing table (`PENDING`) uses `netns == 0` because the peer's namespace is
/// not known until it shows up.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockKey {
    pub netns: u64,
    pub local_ip: [u32; 4],
    pub remote_ip: [u32; 4],
    pub local_port: u16,
    pub remote_port: u16,
    pub family: u32,
}

impl SockKey {
    /// The same connection seen from the other end (namespace left to the caller).
    pub const fn reversed(&self, netns: u64) -> SockKey {
        SockKey {
            netns,
            local_ip: self.remote_ip,
            remote_ip: self.local_ip,
            local_port: self.remote_port,
            remote_port: self.local_port,
            family: self.family,
        }
    }
}

/// Value of `PENDING`: an established agent socket waiting for its local endpoint's side.
///
/// The endpoint's accepted socket must match the tuple *and* the handshake: its `rcv_nxt`
/// equals the agent's `snd_nxt` and its `snd_nxt` the agent's `rcv_nxt` (both initial
/// sequence numbers plus one). A socket in another network namespace that merely mirrors the
/// tuple cannot know the agent's random initial sequence number, so it is never paired.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PendingPeer {
    pub agent: SockKey,
    pub snd_nxt: u32,
    pub rcv_nxt: u32,
}

/// Value of `PEERS` (keyed by the agent's socket): the endpoint socket its payload is
/// redirected to, and how far the redirect may run ahead of the endpoint's reader.
///
/// A redirect puts bytes straight into the endpoint's receive queue, and the kernel charges
/// them to no receive buffer: a reader that stops would let the agent queue without bound
/// (until the node's whole TCP memory is gone). So `spoke_msg` counts every byte the agent
/// sends once paired, the endpoint's reads are counted in `CONSUMED`, and when the unread
/// difference would pass [`REDIRECT_BACKLOG_LIMIT`] the pair's messages take the TCP path,
/// where TCP's buffers and backpressure bound them. The redirect resumes only once the reader
/// has read every byte sent (both queues empty), so no redirected byte can overtake a TCP one.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Peer {
    /// The endpoint's socket.
    pub key: SockKey,
    /// Its kernel address (`struct sock *`): the key of its reads in `CONSUMED`, as the read
    /// tracepoint knows a socket only by that pointer.
    pub sock: u64,
    /// Bytes the agent sent since pairing, redirected or not (written only by the agent
    /// socket's sendmsg, under its socket lock).
    pub sent: u64,
    /// Nonzero while the pair is on the TCP path.
    pub on_tcp: u32,
    pub _pad: u32,
}

/// Most redirected bytes a reader may leave unread before its writer falls back to TCP: the
/// agent's default per-connection buffer, so a stalled reader holds no more kernel memory
/// than a userspace leg would.
pub const REDIRECT_BACKLOG_LIMIT: u64 = 4 << 20;

/// Value of `AGENT_SOCKS` (keyed by socket cookie): the socket belongs to the agent.
pub const AGENT_SOCK_MARK: u8 = 1;

/// Indices into the `COUNTERS` per-CPU array (u64 each). Keep `COUNTER_NAMES` in sync.
pub mod counter {
    /// Sockets put into the SockHash (agent sockets and their local peers).
    pub const SOCKETS_TRACKED: u32 = 0;
    /// Agent socket / endpoint socket pairs whose payload is redirected.
    pub const PAIRS: u32 = 1;
    /// sk_msg: messages redirected straight into the peer socket.
    pub const MSG_REDIRECTED: u32 = 2;
    /// sk_msg: bytes redirected.
    pub const BYTES_REDIRECTED: u32 = 3;
    /// sk_msg: messages left on the normal TCP path (peer not paired, or redirect refused).
    pub const MSG_PASSED: u32 = 4;
    /// sock_ops: SockHash insert failures.
    pub const SOCKHASH_ERRORS: u32 = 5;
    /// sock_ops: tracked sockets that closed (their entries were removed).
    pub const SOCKETS_CLOSED: u32 = 6;
    /// XDP: passed, not TCP to a protected port.
    pub const XDP_PASS_UNPROTECTED: u32 = 7;
    /// XDP: passed, source in an allowed CIDR.
    pub const XDP_PASS_ALLOWED: u32 = 8;
    /// XDP: passed, non-first IP fragment (no ports to judge; the kernel reassembles).
    pub const XDP_PASS_FRAGMENT: u32 = 9;
    /// XDP: dropped, TCP to a protected port from a source outside the allowed CIDRs.
    pub const XDP_DROP_DENIED: u32 = 10;
    /// XDP: dropped, TCP header truncated or too many IPv6 extension headers to judge.
    pub const XDP_DROP_MALFORMED: u32 = 11;
    /// sock_ops: accepted sockets that mirrored a waiting agent socket's tuple but not its
    /// handshake (another namespace), so were not paired.
    pub const PAIRS_REFUSED: u32 = 12;
    /// sk_msg: times a pair's reader fell [`super::REDIRECT_BACKLOG_LIMIT`] behind and the
    /// pair went to the TCP path (until the reader catches up).
    pub const BACKLOG_FALLBACKS: u32 = 13;
    /// Read counter: reads that reached the count an agent writer waited for, and sent it a
    /// wake-up on the `WAKE` ring.
    pub const READER_WAKEUPS: u32 = 14;
    /// Read counter: wake-ups lost to a full `WAKE` ring (the writer's timer takes over).
    pub const WAKE_RING_FULL: u32 = 15;
    /// Number of slots in the array.
    pub const COUNT: u32 = 16;
}

/// Value stored in the protected-port and allow-CIDR maps.
pub const PRESENT: u8 = 1;

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain `#[repr(C)]` integers without padding; every bit pattern is valid.
    unsafe impl aya::Pod for super::SockKey {}
    // SAFETY: as above (a SockKey and two u32, no padding).
    unsafe impl aya::Pod for super::PendingPeer {}
    // SAFETY: as above (a SockKey, two u64 and two u32, no padding).
    unsafe impl aya::Pod for super::Peer {}
}
