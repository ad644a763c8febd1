//! Spoke agent kernel programs.
//!
//! * `spoke_sockops` (sock_ops, cgroup v2): puts the agent's backend sockets (marked by
//!   userspace through their socket cookie) into `SOCKS` and the local endpoint socket each
//!   connects to into `ENDPOINTS`, and records each agent socket's endpoint in `PEERS`.
//! * `spoke_msg` (sk_msg, attached to `SOCKS`): redirects what the agent writes straight into
//!   the endpoint socket's receive queue, skipping the TCP/IP stack, while the endpoint's
//!   reader keeps up (see [`Peer`]); after that the pair stays on the TCP path. The other
//!   direction, endpoint to agent, is plain TCP: its writer is the endpoint (a pod, untrusted
//!   and often faster than the agent forwards), whose redirect would only fall back soon and
//!   meanwhile costs its every send the sk_msg path (measured in BENCHMARKS.md).
//! * `spoke_recv` (raw tracepoint `sock_recv_length`, every socket read on the node): counts
//!   what each paired socket's reader consumed, in `CONSUMED`, and wakes an agent writer
//!   waiting for that reader (`WAITING`, `WAKE`).
//! * `spoke_xdp_guard` (XDP): drops TCP to protected local ports unless the source is allowed.
#![no_std]
#![no_main]
#![allow(internal_features)]
#![feature(core_intrinsics)]

use core::{
    ffi::c_void,
    intrinsics::{atomic_xadd, AtomicOrdering},
    mem,
};

use aya_ebpf::{
    bindings::{
        sk_action::SK_PASS, xdp_action, BPF_ANY, BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
    },
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{map, raw_tracepoint, sk_msg, sock_ops, xdp},
    maps::{lpm_trie::Key, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, SockHash},
    programs::{RawTracePointContext, SkMsgContext, SockOpsContext, XdpContext},
};
use aya_log_ebpf::warn;
use spoke_agent_common::{counter, Peer, PendingPeer, SockKey, REDIRECT_BACKLOG_LIMIT};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const TCP_CLOSE: u32 = 7;
const MSG_PEEK: i32 = 2;

/// The agent's backend sockets; `spoke_msg` runs on their sends.
#[map]
static SOCKS: SockHash<SockKey> = SockHash::with_max_entries(65536, 0);

/// The local endpoints' sockets paired with them: redirect targets only. No program is
/// attached to this map, so an endpoint's own sends stay plain TCP (see `spoke_msg`).
#[map]
static ENDPOINTS: SockHash<SockKey> = SockHash::with_max_entries(65536, 0);

/// Socket key -> the socket its payload is redirected to, and how far ahead it is.
#[map]
static PEERS: LruHashMap<SockKey, Peer> = LruHashMap::with_max_entries(65536, 0);

/// Kernel address of a paired socket -> bytes its reader has read.
#[map]
static CONSUMED: LruHashMap<u64, u64> = LruHashMap::with_max_entries(65536, 0);

/// Kernel address of a paired endpoint socket -> its agent socket's key, so that the pair's
/// `PEERS` entry ends with the endpoint: a freed socket's address can come back as another
/// pair's endpoint, whose counts the old agent socket must not read.
#[map]
static PAIRED: LruHashMap<u64, SockKey> = LruHashMap::with_max_entries(65536, 0);

/// Kernel address of a paired socket -> the `CONSUMED` count its agent writer waits for.
/// Written by the agent, removed by the read that reaches it (which then sends the address
/// on `WAKE`), by the agent when it stops waiting, or at close. Only writes held right now
/// have one; past this many the oldest marks go, and their writers wake by timer.
#[map]
static WAITING: LruHashMap<u64, u64> = LruHashMap::with_max_entries(4096, 0);

/// Addresses of sockets whose reader reached the count the agent waited for.
#[map]
static WAKE: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);

/// Tuple the endpoint's socket will have (netns 0) -> key of the agent socket waiting for it.
/// The agent's side is established first, so the endpoint's passive callback finds it here.
#[map]
static PENDING: LruHashMap<SockKey, PendingPeer> = LruHashMap::with_max_entries(16384, 0);

/// Socket cookies of agent sockets, written by userspace before connect().
#[map]
static AGENT_SOCKS: LruHashMap<u64, u8> = LruHashMap::with_max_entries(65536, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Protected local TCP ports (host order).
#[map]
static PROTECTED_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(64, 0);

#[map]
static ALLOW_V4: LpmTrie<[u8; 4], u8> = LpmTrie::with_max_entries(1024, 0);

#[map]
static ALLOW_V6: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(1024, 0);

#[inline(always)]
fn count(index: u32, by: u64) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // Per-CPU slot: no other writer can race with this one.
        unsafe { *slot += by };
    }
}

/// sock_ops/sk_msg expose the remote port in network order in the upper 16 bits; accept the
/// unshifted form too so a kernel that changes this does not silently break pairing.
#[inline(always)]
fn remote_port(raw: u32) -> u16 {
    let port = if raw > 0xffff { raw >> 16 } else { raw };
    u16::from_be(port as u16)
}

#[inline(always)]
fn v4_mapped(a: &[u32; 4]) -> bool {
    a[0] == 0 && a[1] == 0 && a[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff])
}

/// Builds the key from the context's raw fields (identical layout in sock_ops and sk_msg).
#[inline(always)]
fn make_key(
    netns: u64,
    family: u32,
    ip4: (u32, u32),
    ip6: ([u32; 4], [u32; 4]),
    ports: (u32, u32),
) -> Option<SockKey> {
    let (family, local_ip, remote_ip) = match family {
        AF_INET => (AF_INET, [ip4.0, 0, 0, 0], [ip4.1, 0, 0, 0]),
        AF_INET6 if v4_mapped(&ip6.0) && v4_mapped(&ip6.1) => {
            (AF_INET, [ip6.0[3], 0, 0, 0], [ip6.1[3], 0, 0, 0])
        }
        AF_INET6 => (AF_INET6, ip6.0, ip6.1),
        _ => return None,
    };
    Some(SockKey {
        netns,
        local_ip,
        remote_ip,
        local_port: ports.0 as u16,
        remote_port: remote_port(ports.1),
        family,
    })
}

#[inline(always)]
fn sockops_key(ctx: &SockOpsContext) -> Option<SockKey> {
    let netns = unsafe { bpf_get_netns_cookie(ctx.ops as *mut c_void) };
    let family = ctx.family();
    // Only read the fields of the socket's family: the verifier is fine either way, but this
    // keeps the IPv4 path short.
    let (ip4, ip6) = if family == AF_INET {
        ((ctx.local_ip4(), ctx.remote_ip4()), ([0; 4], [0; 4]))
    } else {
        ((0, 0), (ctx.local_ip6(), ctx.remote_ip6()))
    };
    make_key(
        netns,
        family,
        ip4,
        ip6,
        (ctx.local_port(), ctx.remote_port()),
    )
}

#[sock_ops]
pub fn spoke_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_active_established(&ctx),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => on_passive_established(&ctx),
        BPF_SOCK_OPS_STATE_CB => on_state_change(&ctx),
        _ => {}
    }
    1
}

/// An agent socket finished its handshake: track it and wait for the endpoint's side.
#[inline(always)]
fn on_active_established(ctx: &SockOpsContext) {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut c_void) };
    if AGENT_SOCKS.get_ptr(cookie).is_none() {
        return;
    }
    // One-shot mark: the cookie is never reused, so drop it now to keep the map small.
    let _ = AGENT_SOCKS.remove(cookie);
    let Some(mut key) = sockops_key(ctx) else {
        return;
    };
    if let Err(e) = SOCKS.update(&mut key, unsafe { &mut *ctx.ops }, BPF_ANY as u64) {
        count(counter::SOCKHASH_ERRORS, 1);
        warn!(ctx, "sockhash insert (agent side) failed: {}", e);
        return;
    }
    count(counter::SOCKETS_TRACKED, 1);
    let (snd_nxt, rcv_nxt) = unsafe { ((*ctx.ops).snd_nxt, (*ctx.ops).rcv_nxt) };
    let pending = PendingPeer {
        agent: key,
        snd_nxt,
        rcv_nxt,
    };
    let _ = PENDING.insert(key.reversed(0), pending, BPF_ANY as u64);
    let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
}

/// Any accepted socket under the cgroup: pair it if an agent socket is waiting for it.
#[inline(always)]
fn on_passive_established(ctx: &SockOpsContext) {
    let Some(mut key) = sockops_key(ctx) else {
        return;
    };
    let tuple = SockKey { netns: 0, ..key };
    let Some(pending) = PENDING.get_ptr(tuple) else {
        return;
    };
    let pending = unsafe { *pending };
    // The same handshake seen from the other end, or someone else's connection that only
    // mirrors the tuple (another namespace): leave the entry for the real endpoint.
    let (snd_nxt, rcv_nxt) = unsafe { ((*ctx.ops).snd_nxt, (*ctx.ops).rcv_nxt) };
    if rcv_nxt != pending.snd_nxt || snd_nxt != pending.rcv_nxt {
        count(counter::PAIRS_REFUSED, 1);
        return;
    }
    let agent = pending.agent;
    let _ = PENDING.remove(tuple);
    if let Err(e) = ENDPOINTS.update(&mut key, unsafe { &mut *ctx.ops }, BPF_ANY as u64) {
        count(counter::SOCKHASH_ERRORS, 1);
        warn!(ctx, "sockhash insert (endpoint side) failed: {}", e);
        return;
    }
    count(counter::SOCKETS_TRACKED, 1);
    let sock = sock_addr(ctx);
    let peer = Peer {
        key,
        sock,
        ..Peer::default()
    };
    // The endpoint's reads are counted from zero before the agent can redirect to it.
    if CONSUMED.insert(sock, 0, BPF_ANY as u64).is_ok()
        && PAIRED.insert(sock, agent, BPF_ANY as u64).is_ok()
        && PEERS.insert(agent, peer, BPF_ANY as u64).is_ok()
    {
        count(counter::PAIRS, 1);
    }
    let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
}

/// Tracked socket closing: the kernel drops it from its SockHash by itself; clear our tables.
#[inline(always)]
fn on_state_change(ctx: &SockOpsContext) {
    if ctx.arg(1) != TCP_CLOSE {
        return;
    }
    let Some(key) = sockops_key(ctx) else {
        return;
    };
    let _ = PEERS.remove(key);
    let _ = PENDING.remove(key.reversed(0));
    let sock = sock_addr(ctx);
    // An endpoint closing ends its pair: the agent socket's sends go by TCP from here on.
    if let Some(agent) = unsafe { PAIRED.get(sock) }.copied() {
        let _ = PEERS.remove(&agent);
        let _ = PAIRED.remove(sock);
    }
    let _ = CONSUMED.remove(sock);
    let _ = WAITING.remove(sock);
    count(counter::SOCKETS_CLOSED, 1);
}

#[sk_msg]
pub fn spoke_msg(ctx: SkMsgContext) -> u32 {
    let md = ctx.msg;
    let netns = unsafe { bpf_get_netns_cookie(md as *mut c_void) };
    let key = unsafe {
        let family = (*md).family;
        let (ip4, ip6) = if family == AF_INET {
            (((*md).local_ip4, (*md).remote_ip4), ([0; 4], [0; 4]))
        } else {
            ((0, 0), ((*md).local_ip6, (*md).remote_ip6))
        };
        make_key(
            netns,
            family,
            ip4,
            ip6,
            ((*md).local_port, (*md).remote_port),
        )
    };
    let Some(key) = key else {
        return SK_PASS;
    };
    let Some(peer) = PEERS.get_ptr_mut(key) else {
        count(counter::MSG_PASSED, 1);
        return SK_PASS;
    };
    // Only this socket's sendmsg writes its entry, under the socket lock.
    let peer = unsafe { &mut *peer };
    let size = u64::from(ctx.size());
    // No entry: the endpoint is closing; the redirect below fails and TCP takes it.
    let consumed = unsafe { CONSUMED.get(peer.sock) }.copied().unwrap_or(0);
    let sent = peer.sent;
    peer.sent += size;
    if peer.on_tcp != 0 {
        // Back to redirecting only when everything sent has been read: then no TCP byte is
        // left for a redirected one to overtake.
        if consumed != sent {
            count(counter::MSG_PASSED, 1);
            return SK_PASS;
        }
        peer.on_tcp = 0;
    }
    if (sent + size).saturating_sub(consumed) > REDIRECT_BACKLOG_LIMIT {
        peer.on_tcp = 1;
        count(counter::BACKLOG_FALLBACKS, 1);
        count(counter::MSG_PASSED, 1);
        return SK_PASS;
    }
    let mut to = peer.key;
    // SK_PASS here means "redirect queued"; anything else means the peer is gone from
    // ENDPOINTS (closing), in which case the message takes the normal TCP path.
    if ENDPOINTS.redirect_msg(&ctx, &mut to, BPF_F_INGRESS as u64) == SK_PASS as i64 {
        count(counter::MSG_REDIRECTED, 1);
        count(counter::BYTES_REDIRECTED, size);
    } else {
        count(counter::MSG_PASSED, 1);
    }
    SK_PASS
}

/// Counts what a paired socket's reader consumed. `sock_recv_length` fires after every
/// socket read on the node with the socket, the bytes read and the flags; only paired
/// sockets have a `CONSUMED` entry. (fexit on `tcp_bpf_recvmsg` would see only tracked
/// sockets, but needs the tracing program type, which not every kernel allows.)
#[raw_tracepoint(tracepoint = "sock_recv_length")]
pub fn spoke_recv(ctx: RawTracePointContext) -> i32 {
    let sock: u64 = ctx.arg(0);
    let copied: i64 = ctx.arg::<u64>(1) as i32 as i64;
    let flags = ctx.arg::<u64>(2) as i32;
    if copied <= 0 || flags & MSG_PEEK != 0 {
        return 0;
    }
    let Some(total) = CONSUMED.get_ptr_mut(sock) else {
        return 0;
    };
    // Atomic: two threads reading one socket at once lose no add. And a full barrier before
    // the `WAITING` lookup below: the agent sets its mark and then reads this count, so each
    // side's store must be seen before its own load, or both could miss the other.
    let added = copied as u64;
    // SAFETY: `total` points into a live map value; the BPF target's core has no atomic
    // methods (no compare-and-swap), the intrinsic is its `fetch_add`.
    let total =
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(total, added) } + added;
    // The remove decides which of two racing reads sends the wake-up. If the ring is full
    // the agent's own timeout reads the count instead.
    if let Some(at) = unsafe { WAITING.get(sock) } {
        if total >= *at && WAITING.remove(sock).is_ok() {
            match WAKE.output::<u64>(sock, 0) {
                Ok(()) => count(counter::READER_WAKEUPS, 1),
                Err(_) => count(counter::WAKE_RING_FULL, 1),
            }
        }
    }
    0
}

/// The socket's kernel address, as `sock_recv_length` passes it. Storing a pointer as a
/// number needs CAP_PERFMON (the verifier's pointer-leak rule), which the agent has.
#[inline(always)]
fn sock_addr(ctx: &SockOpsContext) -> u64 {
    unsafe { (*ctx.ops).__bindgen_anon_2.sk as u64 }
}

// ---------------------------------------------------------------------------------------
// XDP guard
// ---------------------------------------------------------------------------------------

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_TCP: u8 = 6;
const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AH: u8 = 51;
const IPV6_DSTOPTS: u8 = 60;

enum Verdict {
    Pass(u32),
    Drop(u32),
}

/// Pointer to a `T` at `offset` from the packet start, bounds-checked for the verifier.
#[inline(always)]
fn at<T>(ctx: &XdpContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    if start + offset + mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *const T)
}

#[inline(always)]
fn be16(ctx: &XdpContext, offset: usize) -> Option<u16> {
    at::<[u8; 2]>(ctx, offset).map(|p| u16::from_be_bytes(unsafe { *p }))
}

#[xdp]
pub fn spoke_xdp_guard(ctx: XdpContext) -> u32 {
    match judge(&ctx) {
        Verdict::Pass(reason) => {
            count(reason, 1);
            xdp_action::XDP_PASS
        }
        Verdict::Drop(reason) => {
            count(reason, 1);
            xdp_action::XDP_DROP
        }
    }
}

#[inline(always)]
fn judge(ctx: &XdpContext) -> Verdict {
    let unprotected = Verdict::Pass(counter::XDP_PASS_UNPROTECTED);
    let Some(mut proto) = be16(ctx, 12) else {
        return unprotected;
    };
    let mut l3 = ETH_HLEN;
    // Up to two VLAN tags (QinQ).
    for _ in 0..2 {
        if proto != ETH_P_8021Q && proto != ETH_P_8021AD {
            break;
        }
        let Some(inner) = be16(ctx, l3 + 2) else {
            return unprotected;
        };
        proto = inner;
        l3 += 4;
    }
    match proto {
        ETH_P_IP => judge_v4(ctx, l3),
        ETH_P_IPV6 => judge_v6(ctx, l3),
        _ => unprotected,
    }
}

#[inline(always)]
fn judge_v4(ctx: &XdpContext, l3: usize) -> Verdict {
    let Some(hdr) = at::<[u8; 20]>(ctx, l3) else {
        return Verdict::Pass(counter::XDP_PASS_UNPROTECTED);
    };
    let hdr = unsafe { &*hdr };
    if hdr[9] != IPPROTO_TCP {
        return Verdict::Pass(counter::XDP_PASS_UNPROTECTED);
    }
    if u16::from_be_bytes([hdr[6], hdr[7]]) & 0x1fff != 0 {
        return Verdict::Pass(counter::XDP_PASS_FRAGMENT);
    }
    let ihl = usize::from(hdr[0] & 0x0f) * 4;
    if ihl < 20 {
        return Verdict::Drop(counter::XDP_DROP_MALFORMED);
    }
    let src = [hdr[12], hdr[13], hdr[14], hdr[15]];
    judge_tcp(ctx, l3 + ihl, || ALLOW_V4.get(Key::new(32, src)).is_some())
}

#[inline(always)]
fn judge_v6(ctx: &XdpContext, l3: usize) -> Verdict {
    let Some(hdr) = at::<[u8; 40]>(ctx, l3) else {
        return Verdict::Pass(counter::XDP_PASS_UNPROTECTED);
    };
    let hdr = unsafe { &*hdr };
    let mut next = hdr[6];
    let mut src = [0u8; 16];
    src.copy_from_slice(&hdr[8..24]);
    let mut off = l3 + 40;
    // Walk a bounded number of extension headers so they cannot hide a protected port.
    for _ in 0..6 {
        match next {
            IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS => {
                let Some(ext) = at::<[u8; 2]>(ctx, off) else {
                    return Verdict::Drop(counter::XDP_DROP_MALFORMED);
                };
                let ext = unsafe { *ext };
                next = ext[0];
                off += (usize::from(ext[1]) + 1) * 8;
            }
            IPV6_AH => {
                let Some(ext) = at::<[u8; 2]>(ctx, off) else {
                    return Verdict::Drop(counter::XDP_DROP_MALFORMED);
                };
                let ext = unsafe { *ext };
                next = ext[0];
                off += (usize::from(ext[1]) + 2) * 4;
            }
            IPV6_FRAGMENT => {
                let Some(ext) = at::<[u8; 4]>(ctx, off) else {
                    return Verdict::Drop(counter::XDP_DROP_MALFORMED);
                };
                let ext = unsafe { *ext };
                if u16::from_be_bytes([ext[2], ext[3]]) & 0xfff8 != 0 {
                    return Verdict::Pass(counter::XDP_PASS_FRAGMENT);
                }
                next = ext[0];
                off += 8;
            }
            _ => break,
        }
    }
    match next {
        IPPROTO_TCP => judge_tcp(ctx, off, || ALLOW_V6.get(Key::new(128, src)).is_some()),
        IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS | IPV6_AH | IPV6_FRAGMENT => {
            Verdict::Drop(counter::XDP_DROP_MALFORMED)
        }
        _ => Verdict::Pass(counter::XDP_PASS_UNPROTECTED),
    }
}

/// Only packets *to* a protected local port are judged: the agent's own outbound tunnel
/// (replies come from the server's port to an ephemeral local port) is never touched.
#[inline(always)]
fn judge_tcp(ctx: &XdpContext, l4: usize, allowed: impl Fn() -> bool) -> Verdict {
    // Offset bounded so the verifier can track it (IPv4 ihl <= 60, IPv6 ext headers).
    if l4 > 512 {
        return Verdict::Drop(counter::XDP_DROP_MALFORMED);
    }
    let Some(dport) = be16(ctx, l4 + 2) else {
        return Verdict::Drop(counter::XDP_DROP_MALFORMED);
    };
    if unsafe { PROTECTED_PORTS.get(dport) }.is_none() {
        return Verdict::Pass(counter::XDP_PASS_UNPROTECTED);
    }
    if allowed() {
        Verdict::Pass(counter::XDP_PASS_ALLOWED)
    } else {
        Verdict::Drop(counter::XDP_DROP_DENIED)
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
