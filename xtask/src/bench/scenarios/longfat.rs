//! Long fat link: the agent (and its backend) in a "node" namespace whose only link to the
//! "control plane" namespace (spoke-server) adds 25 ms each way and loses 0.1% of TCP packets
//! each way. Single-connection download through the tunnel vs a direct TCP connection over the
//! same link.
use super::start;
use crate::bench::io::{self, Route, Tls};
use crate::bench::netns::{enter, DelayLink, Ns};
use crate::bench::procs::{ClusterCfg, Mode, Transport};
use crate::bench::report::{Floor, Section};
use crate::bench::svg::{self, Bar};
use crate::bench::Ctx;
use anyhow::{Context, Result};
use serde_json::json;
use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const DELAY: Duration = Duration::from_millis(25);
const LOSS_TAG: &str = "spoke-bench-loss";
const PORT: u16 = 19000;

/// Runs a future on a new thread with its own runtime, inside namespace `ns` when given.
pub fn block_in<T, F>(ns: Option<String>, make: impl FnOnce() -> F + Send + 'static) -> Result<T>
where
    T: Send + 'static,
    F: Future<Output = Result<T>> + 'static,
{
    std::thread::spawn(move || {
        if let Some(ns) = ns {
            enter(&format!("/run/netns/{ns}"))?;
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(make())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread panicked"))?
}

/// The backend, served from a thread inside a namespace until dropped.
pub struct NsBackend {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NsBackend {
    pub fn start(ns: &str, addr: SocketAddr) -> Result<NsBackend> {
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let path = format!("/run/netns/{ns}");
        let thread = std::thread::spawn(move || {
            let r = (|| -> Result<(tokio::runtime::Runtime, std::net::TcpListener)> {
                enter(&path)?;
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let l = std::net::TcpListener::bind(addr)?;
                l.set_nonblocking(true)?;
                Ok((rt, l))
            })();
            match r {
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
                Ok((rt, l)) => rt.block_on(async move {
                    let b = tokio::net::TcpListener::from_std(l)
                        .map_err(anyhow::Error::from)
                        .and_then(io::backend);
                    let ok = b.is_ok();
                    let _ =
                        ready_tx.send(b.as_ref().map(|_| ()).map_err(|e| anyhow::anyhow!("{e:#}")));
                    if ok {
                        let _ = stop_rx.await;
                    }
                    drop(b);
                }),
            }
        });
        ready_rx.recv().context("backend thread ended")??;
        Ok(NsBackend {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for NsBackend {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn download_for(
    route: Route,
    tls: Tls,
    target: SocketAddr,
    dur: Duration,
) -> Result<(f64, f64)> {
    let t = Instant::now();
    let mut c = io::dial(&route, &tls, target).await?;
    let dial_ms = t.elapsed().as_secs_f64() * 1e3;
    let bytes = io::timed_download(&mut c, dur).await?;
    Ok((bytes as f64 / (1 << 20) as f64 / dur.as_secs_f64(), dial_ms))
}

pub fn run(ctx: &Ctx) -> Result<Section> {
    let mut sec = Section::new("longfat", "Long fat link (25 ms each way, 0.1% loss)");
    let net = &ctx.nets[0];
    let (cp_ip, node_ip) = (format!("{net}.1"), format!("{net}.2"));
    let cp = Ns::new("cp")?;
    let node = Ns::new("node")?;
    let link = DelayLink::new(&cp, &cp_ip, &node, &node_ip, "sbt0", DELAY)?;
    let loss = format!(
        "table inet spokebench {{\n  chain input {{\n    type filter hook input priority 0; policy accept;\n    \
         iifname \"sbt0\" meta l4proto tcp numgen random mod 1000 < 1 counter drop comment \"{LOSS_TAG}\"\n  }}\n}}\n"
    );
    cp.nft(&loss)?;
    node.nft(&loss)?;
    ctx.say(&format!("   longfat: namespaces {} ({cp_ip}) and {} ({node_ip}), TUN link +{} ms each way, 0.1% TCP loss each way", cp.name, node.name, DELAY.as_millis()));
    let _backend = NsBackend::start(&node.name, SocketAddr::from(([0, 0, 0, 0], PORT)))?;
    let mut cfg = ClusterCfg::new(Mode::HttpConnect, Transport::Uds);
    cfg.server_ns = Some(cp.name.clone());
    cfg.agent_ns = Some(node.name.clone());
    cfg.agent_addr = cp_ip.clone();
    let c = start(ctx, &cfg)?;
    let direct_target: SocketAddr = format!("{node_ip}:{PORT}").parse()?;
    let tunnel_target = SocketAddr::from(([127, 0, 0, 1], PORT));
    let dur = ctx.size.longfat;
    let (mut direct, mut tunnel) = (Vec::new(), Vec::new());
    let mut rtt_ms = f64::NAN;
    for trial in 0..ctx.size.longfat_trials {
        let tls = ctx.tls.clone();
        let (d, dial) = block_in(Some(cp.name.clone()), move || {
            download_for(Route::Direct, tls, direct_target, dur)
        })?;
        rtt_ms = dial;
        ctx.say(&format!(
            "   longfat trial {}: direct TCP {d:>7.2} MiB/s (connect {dial:.1} ms)",
            trial + 1
        ));
        direct.push(d);
        let (tls, route) = (ctx.tls.clone(), Route::through(&c));
        let (t, dial) = block_in(None, move || download_for(route, tls, tunnel_target, dur))?;
        ctx.say(&format!(
            "   longfat trial {}: spoke       {t:>7.2} MiB/s (dial {dial:.1} ms)",
            trial + 1
        ));
        tunnel.push(t);
    }
    let dropped = cp.nft_counter(LOSS_TAG) + node.nft_counter(LOSS_TAG);
    let relayed: u64 = link
        .relayed
        .iter()
        .map(|c| c.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    drop(c);
    let avg = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let (d, t) = (avg(&direct), avg(&tunnel));
    let ratio = t / d;
    sec.md = format!(
        "Two namespaces joined by a point-to-point TUN link whose userspace relay holds every packet {} ms before passing it on \
         (RTT {} ms; one end-to-end TCP connection, unlike a TCP relay that would split it), and an nftables rule in each namespace \
         dropping 0.1% of incoming TCP packets (`numgen random mod 1000 < 1`). spoke-server (UDS frontend, HTTP CONNECT) in the \
         control-plane namespace, spoke-agent and the backend in the node namespace; the download flows node → control plane \
         for {:.0} s per trial, {} trial(s) alternating. Direct = TCP from the control-plane namespace to the backend over the \
         same link. TCP connect over the link took {rtt_ms:.1} ms; {relayed} packets relayed, {dropped} dropped by the loss rule.\n\n\
         | route | MiB/s per trial | mean MiB/s | × direct |\n|---|---|---|---|\n\
         | direct TCP over the link | {} | {d:.2} | 1.00 |\n| spoke http-connect/uds | {} | {t:.2} | {ratio:.2} |\n",
        DELAY.as_millis(),
        2 * DELAY.as_millis(),
        dur.as_secs_f64(),
        ctx.size.longfat_trials,
        direct.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>().join(", "),
        tunnel.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>().join(", "),
    );
    sec.floors.push(Floor::new(
        "single connection vs direct TCP over the link",
        format!("{ratio:.2}× ({t:.2} vs {d:.2} MiB/s)"),
        "≥ 0.5×",
        Some(ratio >= 0.5),
    ));
    sec.chart(
        "longfat.svg",
        "long fat link throughput",
        svg::bars(
            "Single connection, 50 ms RTT, 0.1% loss",
            "MiB/s (higher is better)",
            &[
                Bar::new("direct TCP", d, true),
                Bar::new("spoke http-connect/uds", t, false),
            ],
            None,
        ),
    );
    sec.json = json!({
        "delay_ms_each_way": DELAY.as_millis() as u64, "loss_per_mille_each_way": 1, "seconds_per_trial": dur.as_secs_f64(),
        "direct_mib_s": direct, "spoke_mib_s": tunnel, "ratio": ratio, "connect_ms": rtt_ms,
        "packets_relayed": relayed, "packets_dropped": dropped,
    });
    drop(link);
    Ok(sec)
}
