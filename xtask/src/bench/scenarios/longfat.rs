//! Long fat links: the agent (and its backend) in a "node" namespace whose only link to the
//! "control plane" namespace (spoke-server) adds a fixed delay each way. Single-connection
//! download through the tunnel vs a direct TCP connection over the same link, on lossless
//! links of 25 and 50 ms each way (the goal: ≥ 0.9× direct, i.e. the HTTP/2 windows track the
//! bandwidth-delay product), plus a reported 25 ms link losing 0.1% of TCP packets each way.
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

const LOSS_TAG: &str = "spoke-bench-loss";
const PORT: u16 = 19000;
/// Spoke over a lossless link must reach this fraction of direct TCP over the same link.
const FLOOR: f64 = 0.9;

/// One emulated link: the delay each way, and whether 0.1% of TCP packets are dropped.
#[derive(Clone, Copy)]
struct Link {
    delay: Duration,
    loss: bool,
}

impl Link {
    /// "25 ms each way (50 ms RTT)", plus ", 0.1% loss" on the lossy one.
    fn name(&self) -> String {
        format!(
            "{} ms each way ({} ms RTT){}",
            self.delay.as_millis(),
            2 * self.delay.as_millis(),
            if self.loss { ", 0.1% loss" } else { "" }
        )
    }
}

/// Measured in this order; each link gets its own namespaces, link and cluster, so one link's
/// queues or TCP state never carry over to the next. Lossless links carry the floor; the lossy
/// one is reported only (random loss caps any single TCP connection below the link's capacity,
/// so its ratio says more about two congestion controls than about Spoke's windows).
const LINKS: [Link; 3] = [
    Link {
        delay: Duration::from_millis(25),
        loss: false,
    },
    Link {
        delay: Duration::from_millis(50),
        loss: false,
    },
    Link {
        delay: Duration::from_millis(25),
        loss: true,
    },
];

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

/// What one link measured.
struct LinkResult {
    link: Link,
    /// MiB/s per trial.
    direct: Vec<f64>,
    tunnel: Vec<f64>,
    /// Duration of the last direct TCP connect over the link (≈ one RTT).
    connect_ms: f64,
    relayed: u64,
    dropped: u64,
}

impl LinkResult {
    fn means(&self) -> (f64, f64) {
        let avg = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        (avg(&self.direct), avg(&self.tunnel))
    }
}

/// Builds namespaces, the delayed link (and the loss rule), the backend and a cluster for `link`,
/// runs the trials, and tears it all down before returning. Locals drop in reverse order of
/// declaration: cluster, backend, link relay, then the namespaces; the same on an early `?`.
fn measure(ctx: &Ctx, i: usize, link: Link) -> Result<LinkResult> {
    let net = &ctx.nets[0];
    let (cp_ip, node_ip) = (format!("{net}.1"), format!("{net}.2"));
    // Names distinct per link, so a namespace whose deletion is still in flight never clashes.
    let cp = Ns::new(&format!("cp{i}"))?;
    let node = Ns::new(&format!("node{i}"))?;
    let dl = DelayLink::new(&cp, &cp_ip, &node, &node_ip, "sbt0", link.delay)?;
    if link.loss {
        let loss = format!(
            "table inet spokebench {{\n  chain input {{\n    type filter hook input priority 0; policy accept;\n    \
             iifname \"sbt0\" meta l4proto tcp numgen random mod 1000 < 1 counter drop comment \"{LOSS_TAG}\"\n  }}\n}}\n"
        );
        cp.nft(&loss)?;
        node.nft(&loss)?;
    }
    ctx.say(&format!(
        "   longfat: namespaces {} ({cp_ip}) and {} ({node_ip}), TUN link {}",
        cp.name,
        node.name,
        link.name()
    ));
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
    let mut connect_ms = f64::NAN;
    for trial in 0..ctx.size.longfat_trials {
        let tls = ctx.tls.clone();
        let (d, dial) = block_in(Some(cp.name.clone()), move || {
            download_for(Route::Direct, tls, direct_target, dur)
        })?;
        connect_ms = dial;
        ctx.say(&format!(
            "   longfat +{} ms trial {}: direct TCP {d:>7.2} MiB/s (connect {dial:.1} ms)",
            link.delay.as_millis(),
            trial + 1
        ));
        direct.push(d);
        let (tls, route) = (ctx.tls.clone(), Route::through(&c));
        let (t, dial) = block_in(None, move || download_for(route, tls, tunnel_target, dur))?;
        ctx.say(&format!(
            "   longfat +{} ms trial {}: spoke       {t:>7.2} MiB/s (dial {dial:.1} ms)",
            link.delay.as_millis(),
            trial + 1
        ));
        tunnel.push(t);
    }
    let dropped = if link.loss {
        cp.nft_counter(LOSS_TAG) + node.nft_counter(LOSS_TAG)
    } else {
        0
    };
    let relayed: u64 = dl
        .relayed
        .iter()
        .map(|c| c.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    Ok(LinkResult {
        link,
        direct,
        tunnel,
        connect_ms,
        relayed,
        dropped,
    })
}

pub fn run(ctx: &Ctx) -> Result<Section> {
    let mut sec = Section::new("longfat", super::title("longfat"));
    let dur = ctx.size.longfat;
    let mut results = Vec::new();
    for (i, link) in LINKS.into_iter().enumerate() {
        let what = format!("single connection vs direct TCP, {}", link.name());
        let floor = if link.loss {
            "(reported)".to_string()
        } else {
            format!("≥ {FLOOR:.1}×")
        };
        match measure(ctx, i, link) {
            Ok(r) => {
                let (d, t) = r.means();
                let ratio = t / d;
                sec.floors.push(Floor::new(
                    what,
                    format!("{ratio:.2}× ({t:.2} vs {d:.2} MiB/s)"),
                    floor,
                    // The lossy link is reported, not judged (None keeps results.json honest too).
                    (!link.loss).then_some(ratio >= FLOOR),
                ));
                results.push(r);
            }
            // One link failing must not hide the others; its floor shows as not evaluated.
            Err(e) => {
                sec.skipped.push(format!("{}: {e:#}", link.name()));
                sec.floors
                    .push(Floor::new(what, format!("not run: {e:#}"), floor, None));
            }
        }
    }
    if results.is_empty() {
        anyhow::bail!("no link measured: {}", sec.skipped.join("; "));
    }
    let mut md = format!(
        "Two namespaces joined by a point-to-point TUN link whose userspace relay holds every packet a fixed delay before passing \
         it on (one end-to-end TCP connection, unlike a TCP relay that would split it); fresh namespaces, link and cluster per link. \
         spoke-server (UDS frontend, HTTP CONNECT) in the control-plane namespace, spoke-agent and the backend in the node \
         namespace; the download flows node → control plane for {:.0} s per trial, {} trial(s) per link alternating. Direct = TCP \
         from the control-plane namespace to the backend over the same link. Floor on the lossless links: one Spoke connection \
         ≥ {FLOOR:.1}× direct (HTTP/2 windows must track the bandwidth-delay product). The lossy link adds an nftables rule in \
         each namespace dropping 0.1% of incoming TCP packets (`numgen random mod 1000 < 1`); reported only.\n\n\
         | link | route | MiB/s per trial | mean MiB/s | × direct |\n|---|---|---|---|---|\n",
        dur.as_secs_f64(),
        ctx.size.longfat_trials,
    );
    let per_trial = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for r in &results {
        let (d, t) = r.means();
        md.push_str(&format!(
            "| {} | direct TCP over the link | {} | {d:.2} | 1.00 |\n| {} | spoke http-connect/uds | {} | {t:.2} | {:.2} |\n",
            r.link.name(),
            per_trial(&r.direct),
            r.link.name(),
            per_trial(&r.tunnel),
            t / d
        ));
    }
    md.push('\n');
    for r in &results {
        md.push_str(&format!(
            "- {}: TCP connect over the link took {:.1} ms; {} packets relayed{}.\n",
            r.link.name(),
            r.connect_ms,
            r.relayed,
            if r.link.loss {
                format!(", {} dropped by the loss rule", r.dropped)
            } else {
                String::new()
            }
        ));
    }
    sec.md = md;
    let bars: Vec<Bar> = results
        .iter()
        .flat_map(|r| {
            let (d, t) = r.means();
            [
                Bar::new(format!("direct TCP, {}", r.link.name()), d, true),
                Bar::new(format!("spoke, {}", r.link.name()), t, false),
            ]
        })
        .collect();
    sec.chart(
        "longfat.svg",
        "long fat link throughput",
        svg::bars(
            "Single connection over long fat links",
            "MiB/s (higher is better)",
            &bars,
            None,
        ),
    );
    sec.json = json!({
        "seconds_per_trial": dur.as_secs_f64(),
        "trials_per_link": ctx.size.longfat_trials,
        "links": results.iter().map(|r| {
            let (d, t) = r.means();
            json!({
                "delay_ms_each_way": r.link.delay.as_millis() as u64,
                "rtt_ms": 2 * r.link.delay.as_millis() as u64,
                "loss_per_mille_each_way": u64::from(r.link.loss),
                "direct_mib_s": r.direct, "spoke_mib_s": r.tunnel, "ratio": t / d,
                // None on the lossy link: reported, not judged.
                "floor_ratio": if r.link.loss { None } else { Some(FLOOR) },
                "connect_ms": r.connect_ms, "packets_relayed": r.relayed, "packets_dropped": r.dropped,
            })
        }).collect::<Vec<_>>(),
        "skipped": sec.skipped,
    });
    Ok(sec)
}
