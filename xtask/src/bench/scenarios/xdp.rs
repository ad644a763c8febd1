//! XDP guard: a SYN flood at a protected port (kubelet's 10250) of a "node" namespace: the
//! agent's XDP guard vs an equivalent nftables drop rule (netdev ingress, the earliest
//! nftables hook) vs no filter. Two ways in: a TAP device, which the kernel receives as a NIC
//! driver does (XDP before any skb), and a veth pair from an "attacker" namespace, whose skbs
//! veth must copy for XDP. CPU per SYN where it is received, and drops per second.
use super::start;
use crate::bench::netns::{in_ns, tap, veth, Ns};
use crate::bench::procs::{metric_sum, ClusterCfg, Mode, Transport};
use crate::bench::report::{num, Floor, Section};
use crate::bench::stats::{net_rx_softirqs, system_cpu};
use crate::bench::svg::{self, Bar};
use crate::bench::Ctx;
use anyhow::{bail, Result};
use serde_json::json;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

const PORT: u16 = 10250;
/// Locally administered MACs of the TAP device and of the flood's frames.
const TAP_MAC: [u8; 6] = [0x02, 0x5b, 0, 0, 0, 1];
const ATTACKER_MAC: [u8; 6] = [0x02, 0x5b, 0, 0, 0, 2];

fn csum(data: &[u8], mut sum: u32) -> u16 {
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// TCP SYNs from `src` to `dst:PORT`, each from a new pseudo-random source port and sequence
/// number, with valid checksums: an IPv4 packet, behind an Ethernet header when framed.
struct Syns {
    /// Ethernet header (for a TAP device), then the 40-byte IPv4 + TCP packet.
    frame: [u8; 14 + 40],
    pseudo: u32,
    x: u32,
}

impl Syns {
    fn new(src: Ipv4Addr, dst: Ipv4Addr, macs: ([u8; 6], [u8; 6])) -> Syns {
        let mut f = [0u8; 54];
        f[0..6].copy_from_slice(&macs.1);
        f[6..12].copy_from_slice(&macs.0);
        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        let pkt = &mut f[14..];
        pkt[0] = 0x45;
        pkt[2..4].copy_from_slice(&40u16.to_be_bytes());
        pkt[6] = 0x40; // DF
        pkt[8] = 64;
        pkt[9] = 6;
        pkt[12..16].copy_from_slice(&src.octets());
        pkt[16..20].copy_from_slice(&dst.octets());
        let ip_sum = csum(&pkt[..20], 0);
        pkt[10..12].copy_from_slice(&ip_sum.to_be_bytes());
        pkt[22..24].copy_from_slice(&PORT.to_be_bytes());
        pkt[32] = 5 << 4;
        pkt[33] = 0x02; // SYN
        pkt[34..36].copy_from_slice(&64240u16.to_be_bytes());
        let mut pseudo = 6 + 20;
        for w in [src.octets(), dst.octets()] {
            pseudo += u32::from(u16::from_be_bytes([w[0], w[1]]))
                + u32::from(u16::from_be_bytes([w[2], w[3]]));
        }
        Syns {
            frame: f,
            pseudo,
            x: 0x9e37_79b9,
        }
    }

    /// The next SYN as an Ethernet frame; its last 40 bytes are the IPv4 packet.
    fn next(&mut self) -> &[u8] {
        let x = &mut self.x;
        *x ^= *x << 13;
        *x ^= *x >> 17;
        *x ^= *x << 5;
        let sport = 1024 + (*x % 60000) as u16;
        let tcp = &mut self.frame[34..];
        tcp[0..2].copy_from_slice(&sport.to_be_bytes());
        tcp[4..8].copy_from_slice(&x.to_be_bytes());
        tcp[16..18].copy_from_slice(&[0, 0]);
        let c = csum(tcp, self.pseudo);
        tcp[16..18].copy_from_slice(&c.to_be_bytes());
        &self.frame
    }
}

/// What one flood cost: packets sent, and the CPU time of the sending thread.
struct Sent {
    packets: u64,
    thread_cpu: Duration,
}

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Sends SYNs with `send` until `dur` has passed (in whole batches of 256).
fn flood_with(dur: Duration, mut send: impl FnMut() -> bool) -> Sent {
    let end = Instant::now() + dur;
    let cpu0 = thread_cpu();
    let mut packets = 0u64;
    let mut tries = 0u64;
    while !tries.is_multiple_of(256) || Instant::now() < end {
        tries += 1;
        if send() {
            packets += 1;
        }
    }
    Sent {
        packets,
        thread_cpu: thread_cpu() - cpu0,
    }
}

/// Where the flood enters the node namespace.
#[derive(Clone, Copy, PartialEq)]
enum Link {
    /// Frames written to a TAP device: received as a NIC driver receives its RX ring, so
    /// native XDP judges each frame before the kernel builds an skb. The whole receive
    /// path runs inside the sending thread's write().
    Tap,
    /// A raw socket in the attacker namespace through a veth pair: each SYN reaches the
    /// node as an skb, which veth must copy into a fresh page for native XDP (a locally
    /// built skb has neither the headroom nor a page-backed head), so here the guard pays
    /// a copy nftables does not. The receive path runs in softirq on the sending CPU.
    Veth,
}

const LINKS: [Link; 2] = [Link::Tap, Link::Veth];

impl Link {
    /// The node's interface.
    fn dev(self) -> &'static str {
        match self {
            Link::Tap => "sbt0",
            Link::Veth => "sbx0",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Link::Tap => "TAP (as from a NIC)",
            Link::Veth => "veth (skbs from a raw socket)",
        }
    }
}

/// The two ways in: the TAP device's fd (in the node namespace) and the attacker namespace,
/// each with the flood's source and destination address.
struct Sources<'a> {
    tap: (&'a OwnedFd, Ipv4Addr, Ipv4Addr),
    veth: (&'a Ns, Ipv4Addr, Ipv4Addr),
}

impl Sources<'_> {
    fn flood(&self, link: Link, dur: Duration) -> Result<Sent> {
        match link {
            Link::Tap => {
                let (fd, src, dst) = self.tap;
                let fd = fd.as_raw_fd();
                let mut syns = Syns::new(src, dst, (ATTACKER_MAC, TAP_MAC));
                Ok(flood_with(dur, || {
                    let f = syns.next();
                    // SAFETY: f is valid for its length; fd is the open TAP device.
                    unsafe { libc::write(fd, f.as_ptr().cast(), f.len()) > 0 }
                }))
            }
            Link::Veth => {
                let (atk, src, dst) = self.veth;
                in_ns(&atk.name, move || {
                    // SAFETY: plain socket creation.
                    let fd =
                        unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
                    if fd < 0 {
                        bail!("raw socket: {}", std::io::Error::last_os_error());
                    }
                    // SAFETY: fd was just created and is owned here.
                    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                    let addr = libc::sockaddr_in {
                        sin_family: libc::AF_INET as libc::sa_family_t,
                        sin_port: 0,
                        sin_addr: libc::in_addr {
                            s_addr: u32::from_ne_bytes(dst.octets()),
                        },
                        sin_zero: [0; 8],
                    };
                    let mut syns = Syns::new(src, dst, ([0; 6], [0; 6]));
                    Ok(flood_with(dur, || {
                        let pkt = &syns.next()[14..];
                        // SAFETY: pkt and addr are valid for the given lengths.
                        let r = unsafe {
                            libc::sendto(
                                fd.as_raw_fd(),
                                pkt.as_ptr().cast(),
                                pkt.len(),
                                0,
                                (&addr as *const libc::sockaddr_in).cast(),
                                std::mem::size_of::<libc::sockaddr_in>() as u32,
                            )
                        };
                        r > 0
                    }))
                })
            }
        }
    }
}

struct Res {
    link: Link,
    filter: String,
    sent_pps: f64,
    dropped_pps: f64,
    softirq_cores: f64,
    busy_cores: f64,
    softirq_ns_per_pkt: f64,
    /// CPU of the sending thread per SYN: its system call plus, for the TAP, the receive path.
    sender_ns_per_pkt: f64,
    net_rx_per_s: f64,
}

impl Res {
    /// What the filter costs per SYN where the receive path runs: the sending thread for the
    /// TAP, softirq for the veth.
    fn ns_per_syn(&self) -> f64 {
        match self.link {
            Link::Tap => self.sender_ns_per_pkt,
            Link::Veth => self.softirq_ns_per_pkt,
        }
    }
}

fn measure(
    ctx: &Ctx,
    link: Link,
    filter: &str,
    sources: &Sources,
    dropped: &dyn Fn() -> f64,
) -> Result<Res> {
    let dur = ctx.size.xdp;
    // Short warm-up so ARP and the filter's first packets are out of the way.
    sources.flood(link, Duration::from_millis(200))?;
    std::thread::sleep(Duration::from_millis(200));
    let (s0, b0) = system_cpu()?;
    let rx0 = net_rx_softirqs();
    let d0 = dropped();
    let t = Instant::now();
    let sent = sources.flood(link, dur)?;
    let secs = t.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(50));
    let (s1, b1) = system_cpu()?;
    let rx1 = net_rx_softirqs();
    let d1 = dropped();
    let n = sent.packets.max(1) as f64;
    let r = Res {
        link,
        filter: filter.into(),
        sent_pps: sent.packets as f64 / secs,
        dropped_pps: (d1 - d0) / secs,
        softirq_cores: (s1 - s0) / secs,
        busy_cores: (b1 - b0) / secs,
        softirq_ns_per_pkt: (s1 - s0) * 1e9 / n,
        sender_ns_per_pkt: sent.thread_cpu.as_secs_f64() * 1e9 / n,
        net_rx_per_s: (rx1 - rx0) as f64 / secs,
    };
    ctx.say(&format!(
        "   xdp {:<5} {:<24} sent {:>6.3} Mpps, dropped {:>6.3} Mpps, sender {:.0} ns/pkt, softirq {:.2} cores ({:.0} ns/pkt), busy {:.2} cores",
        if link == Link::Tap { "tap" } else { "veth" },
        r.filter,
        r.sent_pps / 1e6,
        r.dropped_pps / 1e6,
        r.sender_ns_per_pkt,
        r.softirq_cores,
        r.softirq_ns_per_pkt,
        r.busy_cores
    ));
    Ok(r)
}

pub fn run(ctx: &Ctx) -> Result<Section> {
    let mut sec = Section::new("xdp", super::title("xdp"));
    let addrs = |net: &str| -> Result<(Ipv4Addr, Ipv4Addr)> {
        Ok((format!("{net}.1").parse()?, format!("{net}.2").parse()?))
    };
    let (node_ip, atk_ip) = addrs(&ctx.nets[1])?;
    let (tap_ip, tap_peer) = addrs(&ctx.nets[0])?;
    let node = Ns::new("xnode")?;
    let atk = Ns::new("xatk")?;
    veth(
        &node,
        "sbx0",
        &format!("{node_ip}/24"),
        &atk,
        "sbx1",
        &format!("{atk_ip}/24"),
    )?;
    let tap_fd = tap(&node.name, "sbt0")?;
    let mac = |m: [u8; 6]| m.map(|b| format!("{b:02x}")).join(":");
    node.ip(&["link", "set", "sbt0", "address", &mac(TAP_MAC)])?;
    node.ip(&["addr", "add", &format!("{tap_ip}/24"), "dev", "sbt0"])?;
    node.ip(&["link", "set", "sbt0", "up"])?;
    // The flood's source has a fixed neighbour entry: the unfiltered run's SYN-ACKs go out
    // without ARP.
    node.ip(&[
        "neigh",
        "add",
        &tap_peer.to_string(),
        "lladdr",
        &mac(ATTACKER_MAC),
        "dev",
        "sbt0",
        "nud",
        "permanent",
    ])?;
    let sources = Sources {
        tap: (&tap_fd, tap_peer, tap_ip),
        veth: (&atk, atk_ip, node_ip),
    };
    // kubelet stand-in: a listener on the protected port (never accepting: the flood never
    // completes a handshake anyway).
    let _kubelet = in_ns(&node.name, move || {
        Ok(std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, PORT))?)
    })?;
    let mut res = Vec::new();
    for link in LINKS {
        res.push(measure(ctx, link, "no filter", &sources, &|| 0.0)?);
    }

    let tag = |link: Link| format!("spoke-bench-synflood-{}", link.dev());
    let chain = |link: Link| {
        format!(
            "  chain {dev} {{\n    type filter hook ingress device \"{dev}\" priority -500; policy accept;\n    \
             ip protocol tcp tcp dport {PORT} counter drop comment \"{tag}\"\n  }}\n",
            dev = link.dev(),
            tag = tag(link)
        )
    };
    node.nft(&format!(
        "table netdev spokebench_xdp {{\n{}{}}}\n",
        chain(Link::Tap),
        chain(Link::Veth)
    ))?;
    for link in LINKS {
        let t = tag(link);
        res.push(measure(
            ctx,
            link,
            "nftables netdev ingress",
            &sources,
            &|| node.nft_counter(&t) as f64,
        )?);
    }
    node.exec(&["nft", "delete", "table", "netdev", "spokebench_xdp"])?;

    let mut cfg = ClusterCfg::new(Mode::HttpConnect, Transport::Uds);
    cfg.server_ns = Some(node.name.clone());
    cfg.agent_ns = Some(node.name.clone());
    cfg.ebpf = "on".into();
    cfg.agent_extra = vec![
        format!(
            "--xdp-guard-interfaces={},{}",
            Link::Tap.dev(),
            Link::Veth.dev()
        ),
        format!("--xdp-protected-ports={PORT}"),
    ];
    let mut guard_error = None;
    let mut modes = String::new();
    match start(ctx, &cfg) {
        Ok(c) => {
            // A failed scrape (agent busy under the flood) must not read as zero drops.
            let drops = || {
                let m = c.agent_metrics();
                if m.contains("spoke_ebpf_xdp_packets") {
                    metric_sum(&m, "spoke_ebpf_xdp_packets", "action=\"drop\"")
                } else {
                    f64::NAN
                }
            };
            for link in LINKS {
                res.push(measure(ctx, link, "spoke XDP guard", &sources, &drops)?);
            }
            modes = xdp_modes(&c.agent_status());
        }
        Err(e) => {
            ctx.say(&format!("   xdp guard: agent did not start: {e:#}"));
            guard_error = Some(format!("{e:#}"));
        }
    }
    let mut md = format!(
        "A SYN flood at port {PORT} (the kubelet's; a listener stands in for it) of a node namespace, {:.1} s per filter and way in, \
         one sending thread, random source ports, valid checksums:\n\n\
         - **TAP (as from a NIC)**: frames written to a TAP device in the node namespace. The kernel receives them the way a NIC \
         driver receives its RX ring: each frame lands in a page-sized buffer and native XDP judges it before any skb exists \
         (`tun_build_skb`); nftables sees the skb built after. The whole receive path runs inside the sender's `write()`, so its \
         cost is the sending thread's CPU per SYN (`CLOCK_THREAD_CPUTIME_ID`, which includes the system call itself: the same \
         for every filter). This is the case the guard is for.\n\
         - **veth (skbs from a raw socket)**: a raw socket in an attacker namespace, through a veth pair. Each SYN reaches the \
         node as an skb already, and veth copies it into a fresh page for native XDP (`veth_convert_skb_to_xdp_buff`: a locally \
         built skb has neither the 256-byte headroom nor a page-backed head), so there the guard pays a copy that nftables does not. The receive path runs \
         in softirq on the sending CPU: the cost is softirq CPU per SYN (/proc/stat).\n\n\
         Drops come from the filter's own counter (the nftables rule counter, the guard's `spoke_ebpf_xdp_packets{{action=\"drop\"}}`). \
         Busy cores is the whole machine.\n\n\
         | way in | filter | SYNs sent Mpps | dropped Mpps | CPU ns per SYN where received | sender thread ns per SYN | softirq cores | busy cores | NET_RX softirqs/s |\n|---|---|---|---|---|---|---|---|---|\n",
        ctx.size.xdp.as_secs_f64()
    );
    for r in &res {
        md.push_str(&format!(
            "| {} | {} | {:.3} | {:.3} | {} | {} | {:.2} | {:.2} | {} |\n",
            r.link.name(),
            r.filter,
            r.sent_pps / 1e6,
            r.dropped_pps / 1e6,
            num(r.ns_per_syn()),
            num(r.sender_ns_per_pkt),
            r.softirq_cores,
            r.busy_cores,
            num(r.net_rx_per_s)
        ));
    }
    if !modes.is_empty() {
        md.push_str(&format!(
            "\nXDP attachment reported by the agent (`/status`): {modes}\n"
        ));
    }
    sec.md.push_str(&md);
    if let Some(e) = &guard_error {
        sec.md.push_str(&format!(
            "\n**XDP guard not run**: the agent did not start: `{}`\n",
            e.replace('`', "'")
        ));
        sec.floors.push(Floor::new(
            "XDP guard vs nftables",
            format!("guard not run: {e}"),
            "guard < nftables CPU per SYN (TAP)",
            None,
        ));
    }
    let find = |link: Link, what: &str| {
        res.iter()
            .find(|r| r.link == link && r.filter.contains(what))
    };
    for link in LINKS {
        let (Some(x), Some(n)) = (find(link, "XDP"), find(link, "nftables")) else {
            continue;
        };
        let (what, floor, met) = match link {
            Link::Tap => (
                "CPU ns per SYN through a TAP (as from a NIC), XDP guard vs nftables ingress",
                "guard < nftables",
                Some(x.ns_per_syn() < n.ns_per_syn()),
            ),
            Link::Veth => (
                "softirq ns per SYN through a veth (skbs), XDP guard vs nftables ingress",
                "(reported: veth copies each skb for XDP)",
                None,
            ),
        };
        sec.floors.push(Floor::new(
            what,
            format!("{} vs {} ns", num(x.ns_per_syn()), num(n.ns_per_syn())),
            floor,
            met,
        ));
        sec.floors.push(Floor::new(
            format!("XDP guard drops, {}", link.name()),
            format!(
                "{:.3} Mpps of {:.3} Mpps sent",
                x.dropped_pps / 1e6,
                x.sent_pps / 1e6
            ),
            "(reported)",
            None,
        ));
    }
    let bars: Vec<Bar> = res
        .iter()
        .map(|r| {
            Bar::new(
                format!("{}: {}", r.link.dev(), r.filter),
                r.ns_per_syn(),
                !r.filter.contains("XDP"),
            )
        })
        .collect();
    sec.chart(
        "xdp_softirq.svg",
        "CPU per SYN where it is received",
        svg::bars(
            "SYN flood: CPU per packet where it is received (TAP: sending thread; veth: softirq)",
            "ns per SYN (lower is better)",
            &bars,
            None,
        ),
    );
    sec.json = json!({
        "seconds": ctx.size.xdp.as_secs_f64(),
        "rows": res.iter().map(|r| json!({"link": r.link.dev(), "filter": r.filter, "sent_pps": r.sent_pps,
            "dropped_pps": r.dropped_pps, "softirq_cores": r.softirq_cores, "busy_cores": r.busy_cores,
            "softirq_ns_per_syn": r.softirq_ns_per_pkt, "sender_ns_per_syn": r.sender_ns_per_pkt,
            "ns_per_syn_where_received": r.ns_per_syn(), "net_rx_softirqs_per_s": r.net_rx_per_s})).collect::<Vec<_>>(),
        "xdp_modes": modes,
        "guard_error": guard_error,
    });
    Ok(sec)
}

/// `iface mode` for each XDP attachment in the agent's `/status` JSON.
fn xdp_modes(status: &str) -> String {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(status) else {
        return String::new();
    };
    let progs = v
        .pointer("/ebpf/programs")
        .or_else(|| v.pointer("/programs"))
        .and_then(|p| p.as_array())
        .cloned()
        .unwrap_or_default();
    progs
        .iter()
        .filter(|p| p["program"] == "xdp")
        .map(|p| {
            format!(
                "`{}` {}",
                p["target"].as_str().unwrap_or("?"),
                p["xdp_mode"].as_str().unwrap_or("not attached")
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}
