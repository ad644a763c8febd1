//! The scenarios. Each returns a [`Section`]; an error becomes a "not run" section with the
//! reason, so one broken leg never hides the others.
mod bulk;
mod churn;
mod ebpf;
mod fanout;
mod fleet;
mod latency;
mod longfat;
mod xdp;

use super::io::{self, Route};
use super::placement::Tracing;
use super::procs::{Cluster, ClusterCfg, Mode, Transport};
use super::report::Section;
use super::stats;
use super::wakeups::{Counting, PerRound, Watched};
use super::Ctx;
use anyhow::Result;
use spoke_tests::BoxIo;
use std::net::SocketAddr;
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub async fn run(ctx: &Ctx, name: &str) -> Section {
    let r = match name {
        "bulk" => bulk::run(ctx).await,
        "latency" => latency::run(ctx).await,
        "churn" => churn::run(ctx).await,
        "fanout" => fanout::run(ctx).await,
        "fleet" => fleet::run(ctx).await,
        "longfat" => longfat::run(ctx),
        "ebpf" => ebpf::run(ctx).await,
        "xdp" => xdp::run(ctx),
        _ => Err(anyhow::anyhow!("unknown scenario")),
    };
    r.unwrap_or_else(|e| {
        let key: &'static str = super::ALL
            .iter()
            .find(|k| **k == name)
            .copied()
            .unwrap_or("unknown");
        Section::not_run(key, title(key), format!("failed: {e:#}"))
    })
}

/// Each scenario's heading in the report, also when it failed to run.
pub fn title(key: &str) -> &'static str {
    match key {
        "bulk" => "Bulk transfer",
        "latency" => "Latency (64-byte ping-pong)",
        "churn" => "Connection churn",
        "fanout" => "Fanout (many connections through one agent)",
        "fleet" => "Fleet (many agents on one server)",
        "longfat" => "Long fat links (25 and 50 ms each way; 0.1% loss reported)",
        "ebpf" => "eBPF fast path on the node-local legs",
        "xdp" => "XDP guard under a SYN flood",
        _ => "Unknown scenario",
    }
}

/// The four frontend combinations kube-apiserver can use.
pub const FRONTENDS: [(Mode, Transport); 4] = [
    (Mode::HttpConnect, Transport::Uds),
    (Mode::HttpConnect, Transport::Tls),
    (Mode::Grpc, Transport::Uds),
    (Mode::Grpc, Transport::Tls),
];

pub fn start(ctx: &Ctx, cfg: &ClusterCfg) -> Result<Cluster> {
    Cluster::start(&ctx.bin, &ctx.work, &ctx.pki, cfg)
}

/// Round trips of the counting run (wake-ups and system calls), apart from the timed one.
pub const COUNTED: usize = 2_000;

/// Per-round-trip counts of a route's processes (and the bench's own client and backend), in
/// a ping-pong of its own right after the timed one.
pub async fn count(
    ctx: &Ctx,
    route: &Route,
    target: std::net::SocketAddr,
    procs: &[Watched<'_>],
) -> Result<Vec<PerRound>> {
    let mut all: Vec<Watched<'_>> = vec![("bench client+backend", std::process::id(), false)];
    all.extend_from_slice(procs);
    let n = COUNTED.min(ctx.size.pings);
    let made = rounds(n);
    let tracing = Tracing::start(&ctx.work);
    let counting = Counting::start(&ctx.work, &all)?;
    let groups = counting.groups();
    pingpong(ctx, route, target, n).await?;
    let mut per = counting.stop(made)?;
    // Without the trace the table says so; the counts stand on their own.
    if let Ok(landed) = tracing.and_then(|t| t.stop(&groups)) {
        for (p, l) in per.iter_mut().zip(landed) {
            p.landing = Some(l.per(made as f64));
        }
    }
    Ok(per)
}

/// Round trips [`pingpong`] makes for `n` timed ones (a warm-up first).
pub fn rounds(n: usize) -> usize {
    n + n / 10 + 50
}

/// Runs a client on a thread of its own under a single-threaded runtime: its reads, writes
/// and (gRPC) HTTP/2 driver share that thread, as they would in one process's event loop. On
/// the bench's two-worker runtime a gRPC client's driver and reader could sit on different
/// threads and wake each other across CPUs, which the gRPC rows paid and the others did not.
pub fn on_client_thread<T: Send, F: std::future::Future<Output = Result<T>>>(
    client: impl FnOnce() -> F + Send,
) -> Result<T> {
    tokio::task::block_in_place(|| {
        std::thread::scope(|s| {
            s.spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?
                    .block_on(client())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the client thread panicked"))?
        })
    })
}

/// 64-byte ping-pong over an echo connection: round-trip times in µs (after a warm-up), from
/// a client on its own thread ([`on_client_thread`]).
pub async fn pingpong(ctx: &Ctx, route: &Route, target: SocketAddr, n: usize) -> Result<Vec<f64>> {
    on_client_thread(|| pingpong_client(ctx, route, target, n))
}

async fn pingpong_client(
    ctx: &Ctx,
    route: &Route,
    target: SocketAddr,
    n: usize,
) -> Result<Vec<f64>> {
    let mut io: BoxIo = io::dial(route, &ctx.tls, target).await?;
    io.write_all(&io::command(b'E', 0)).await?;
    let rtts = as_task(async move {
        let msg = [7u8; 64];
        let mut back = [0u8; 64];
        let mut rtts = Vec::with_capacity(n);
        for i in 0..rounds(n) {
            let t = Instant::now();
            io.write_all(&msg).await?;
            io.read_exact(&mut back).await?;
            if i >= n / 10 + 50 {
                rtts.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        let _ = io.shutdown().await;
        anyhow::Ok(rtts)
    })
    .await?;
    Ok(stats::sorted(rtts))
}

/// Runs a client's measured loop as a task of its runtime ([`on_client_thread`]), not as the
/// future its `block_on` polls: a gRPC client's HTTP/2 driver is a task too, and its waking
/// the `block_on` future cost one more turn of the event loop (an `epoll_wait` that returns
/// at once) per wake-up.
pub async fn as_task<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    tokio::spawn(work)
        .await
        .map_err(|e| anyhow::anyhow!("the client's task failed: {e}"))?
}
