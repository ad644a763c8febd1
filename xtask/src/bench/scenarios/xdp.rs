//! XDP guard: a SYN flood from an "attacker" namespace at a protected port (kubelet's 10250)
//! of the "node" namespace: the agent's XDP guard vs an equivalent nftables drop rule (netdev
//! ingress, the earliest nftables hook) vs no filter. System softirq CPU and drops per second.
use super::start;
use crate::bench::netns::{in_ns, veth, Ns};
use crate::bench::procs::{metric_sum, ClusterCfg, Mode, Transport};
use crate::bench::report::{num, Floor, Section};
use crate::bench::stats::{net_rx_softirqs, system_cpu};
use crate::bench::svg::{self, Bar};
use crate::bench::Ctx;
use anyhow::{bail, Result};
use serde_json::json;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

const PORT: u16 = 10250;

fn csum(data: &[u8], mut sum: u32) -> u16 {
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends TCP SYNs from `src` to `dst:PORT` with a raw socket for `dur`; returns packets sent.
fn flood(src: Ipv4Addr, dst: Ipv4Addr, dur: Duration) -> Result<u64> {
    // SAFETY: plain socket creation.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        bail!("raw socket: {}", std::io::Error::last_os_error());
    }
    let mut pkt = [0u8; 40];
    pkt[0] = 0x45;
    pkt[2..4].copy_from_slice(&40u16.to_be_bytes());
    pkt[6] = 0x40; // DF
    pkt[8] = 64;
    pkt[9] = 6;
    pkt[12..16].copy_from_slice(&src.octets());
    pkt[16..20].copy_from_slice(&dst.octets());
    pkt[22..24].copy_from_slice(&PORT.to_be_bytes());
    pkt[32] = 5 << 4;
    pkt[33] = 0x02; // SYN
    pkt[34..36].copy_from_slice(&64240u16.to_be_bytes());
    let mut pseudo = 0u32;
    for w in [&src.octets()[..], &dst.octets()[..]] {
        pseudo += u32::from(u16::from_be_bytes([w[0], w[1]]))
            + u32::from(u16::from_be_bytes([w[2], w[3]]));
    }
    pseudo += 6 + 20;
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(dst.octets()),
        },
        sin_zero: [0; 8],
    };
    let end = Instant::now() + dur;
    let mut sent = 0u64;
    let mut x: u32 = 0x9e37_79b9;
    while !sent.is_multiple_of(256) || Instant::now() < end {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let sport = 1024 + (x % 60000) as u16;
        pkt[20..22].copy_from_slice(&sport.to_be_bytes());
        pkt[24..28].copy_from_slice(&x.to_be_bytes());
        pkt[36..38].copy_from_slice(&[0, 0]);
        let c = csum(&pkt[20..40], pseudo);
        pkt[36..38].copy_from_slice(&c.to_be_bytes());
        // SAFETY: pkt and addr are valid for the given lengths.
        let r = unsafe {
            libc::sendto(
                fd,
                pkt.as_ptr().cast(),
                pkt.len(),
                0,
                (&addr as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        };
        if r > 0 {
            sent += 1;
        }
    }
    // SAFETY: closing our own socket.
    unsafe { libc::close(fd) };
    Ok(sent)
}

struct Res {
    filter: String,
    sent_pps: f64,
    dropped_pps: f64,
    softirq_cores: f64,
    busy_cores: f64,
    softirq_ns_per_pkt: f64,
    net_rx_per_s: f64,
}

fn measure(
    ctx: &Ctx,
    filter: &str,
    atk: &Ns,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    dropped: &dyn Fn() -> f64,
) -> Result<Res> {
    let dur = ctx.size.xdp;
    // Short warm-up so ARP and the filter's first packets are out of the way.
    in_ns(&atk.name, move || {
        flood(src, dst, Duration::from_millis(200))
    })?;
    std::thread::sleep(Duration::from_millis(200));
    let (s0, b0) = system_cpu()?;
    let rx0 = net_rx_softirqs();
    let d0 = dropped();
    let t = Instant::now();
    let sent = in_ns(&atk.name, move || flood(src, dst, dur))?;
    let secs = t.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(50));
    let (s1, b1) = system_cpu()?;
    let rx1 = net_rx_softirqs();
    let d1 = dropped();
    let r = Res {
        filter: filter.into(),
        sent_pps: sent as f64 / secs,
        dropped_pps: (d1 - d0) / secs,
        softirq_cores: (s1 - s0) / secs,
        busy_cores: (b1 - b0) / secs,
        softirq_ns_per_pkt: (s1 - s0) * 1e9 / sent.max(1) as f64,
        net_rx_per_s: (rx1 - rx0) as f64 / secs,
    };
    ctx.say(&format!(
        "   xdp {:<22} sent {:>6.3} Mpps, dropped {:>6.3} Mpps, softirq {:.2} cores ({:.0} ns/pkt), busy {:.2} cores",
        r.filter,
        r.sent_pps / 1e6,
        r.dropped_pps / 1e6,
        r.softirq_cores,
        r.softirq_ns_per_pkt,
        r.busy_cores
    ));
    Ok(r)
}

pub fn run(ctx: &Ctx) -> Result<Section> {
    let mut sec = Section::new("xdp", super::title("xdp"));
    let net = &ctx.nets[1];
    let (node_ip, atk_ip): (Ipv4Addr, Ipv4Addr) =
        (format!("{net}.1").parse()?, format!("{net}.2").parse()?);
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
    // kubelet stand-in: a listener on the protected port (never accepting: the flood never
    // completes a handshake anyway).
    let _kubelet = in_ns(&node.name, move || {
        Ok(std::net::TcpListener::bind((node_ip, PORT))?)
    })?;
    let mut res = Vec::new();
    res.push(measure(ctx, "no filter", &atk, atk_ip, node_ip, &|| 0.0)?);

    let tag = "spoke-bench-synflood";
    node.nft(&format!(
        "table netdev spokebench_xdp {{\n  chain ingress {{\n    type filter hook ingress device \"sbx0\" priority -500; policy accept;\n    \
         ip protocol tcp tcp dport {PORT} counter drop comment \"{tag}\"\n  }}\n}}\n"
    ))?;
    res.push(measure(
        ctx,
        "nftables netdev ingress",
        &atk,
        atk_ip,
        node_ip,
        &|| node.nft_counter(tag) as f64,
    )?);
    node.exec(&["nft", "delete", "table", "netdev", "spokebench_xdp"])?;

    let mut cfg = ClusterCfg::new(Mode::HttpConnect, Transport::Uds);
    cfg.server_ns = Some(node.name.clone());
    cfg.agent_ns = Some(node.name.clone());
    cfg.ebpf = "on".into();
    cfg.agent_extra = vec![
        "--xdp-guard-interfaces=sbx0".into(),
        format!("--xdp-protected-ports={PORT}"),
    ];
    let mut guard_error = None;
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
            let r = measure(ctx, "spoke XDP guard", &atk, atk_ip, node_ip, &drops)?;
            let mode = c
                .agent_metrics()
                .lines()
                .find(|l| l.contains("xdp") && l.contains("mode"))
                .map(str::to_string);
            if let Some(m) = mode {
                sec.md.push_str(&format!(
                    "XDP attachment reported by the agent: `{}`\n\n",
                    m.trim()
                ));
            }
            res.push(r);
        }
        Err(e) => {
            ctx.say(&format!("   xdp guard: agent did not start: {e:#}"));
            guard_error = Some(format!("{e:#}"));
        }
    }
    let mut md = format!(
        "A raw-socket SYN sender in an attacker namespace floods {node_ip}:{PORT} over a veth pair for {:.1} s per filter \
         (random source ports, one sending thread); a listener stands in for the kubelet. CPU from /proc/stat (whole machine, \
         softirq column and all busy time; the veth receive path runs in softirq on the sending CPU), drops from the filter's own \
         counter (nftables rule counter, the guard's `spoke_ebpf_xdp_packets{{action=\"drop\"}}`).\n\n\
         | filter | SYNs sent Mpps | dropped Mpps | softirq cores | softirq ns per SYN | busy cores | NET_RX softirqs/s |\n|---|---|---|---|---|---|---|\n",
        ctx.size.xdp.as_secs_f64()
    );
    for r in &res {
        md.push_str(&format!(
            "| {} | {:.3} | {:.3} | {:.2} | {} | {:.2} | {} |\n",
            r.filter,
            r.sent_pps / 1e6,
            r.dropped_pps / 1e6,
            r.softirq_cores,
            num(r.softirq_ns_per_pkt),
            r.busy_cores,
            num(r.net_rx_per_s)
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
            "guard ≤ nftables softirq ns/SYN",
            None,
        ));
    }
    if let (Some(x), Some(n)) = (
        res.iter().find(|r| r.filter.contains("XDP")),
        res.iter().find(|r| r.filter.contains("nftables")),
    ) {
        sec.floors.push(Floor::new(
            "softirq ns per SYN, XDP guard vs nftables ingress",
            format!(
                "{} vs {} ns",
                num(x.softirq_ns_per_pkt),
                num(n.softirq_ns_per_pkt)
            ),
            "guard < nftables (expected)",
            Some(x.softirq_ns_per_pkt < n.softirq_ns_per_pkt),
        ));
        sec.floors.push(Floor::new(
            "XDP guard drops",
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
                r.filter.clone(),
                r.softirq_ns_per_pkt,
                !r.filter.contains("XDP"),
            )
        })
        .collect();
    sec.chart(
        "xdp_softirq.svg",
        "softirq CPU per SYN",
        svg::bars(
            "SYN flood: softirq CPU per packet",
            "ns per SYN (lower is better)",
            &bars,
            None,
        ),
    );
    sec.json = json!({
        "seconds": ctx.size.xdp.as_secs_f64(),
        "rows": res.iter().map(|r| json!({"filter": r.filter, "sent_pps": r.sent_pps, "dropped_pps": r.dropped_pps,
            "softirq_cores": r.softirq_cores, "busy_cores": r.busy_cores, "softirq_ns_per_syn": r.softirq_ns_per_pkt, "net_rx_softirqs_per_s": r.net_rx_per_s})).collect::<Vec<_>>(),
        "guard_error": guard_error,
    });
    Ok(sec)
}
