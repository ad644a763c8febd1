//! eBPF: the agent's node-local legs with `--ebpf=on` (sockmap fast path) against
//! `--ebpf=off` (userspace relay): throughput, 64-byte latency and agent CPU per GiB.
use super::bulk::{measure, Row};
use super::latency::{summarize, Lat};
use super::{count, pingpong, start};
use crate::bench::affinity::OneCpu;
use crate::bench::io::{self, Route};
use crate::bench::procs::{metric_sum, ClusterCfg, Mode, Transport};
use crate::bench::report::{num, Floor, Section};
use crate::bench::svg::{self, Bar};
use crate::bench::wakeups::PerRound;
use crate::bench::Ctx;
use anyhow::Result;
use serde_json::json;
use tokio::net::TcpListener;

struct Leg {
    mode: &'static str,
    rows: Vec<Row>,
    lat: Lat,
    /// The same ping-pong with the bench, server and agent on one CPU (no cross-CPU wake-ups).
    lat1: Lat,
    redirected_bytes: f64,
    pairs: f64,
    /// Context switches and system calls per round trip of the server and the agent.
    counts: Vec<PerRound>,
}

pub async fn run(ctx: &Ctx) -> Result<Section> {
    let mut sec = Section::new("ebpf", super::title("ebpf"));
    let backend = io::backend(TcpListener::bind("127.0.0.1:0").await?)?;
    let target = backend.addr;
    let mut legs: Vec<Leg> = Vec::new();
    let mut on_error = None;
    for mode in ["off", "on"] {
        let mut cfg = ClusterCfg::new(Mode::HttpConnect, Transport::Uds);
        cfg.ebpf = mode.into();
        let c = match start(ctx, &cfg) {
            Ok(c) => c,
            Err(e) => {
                ctx.say(&format!("   ebpf={mode}: agent did not start: {e:#}"));
                if mode == "on" {
                    on_error = Some(format!("{e:#}"));
                    continue;
                }
                return Err(e);
            }
        };
        let label = format!("spoke http-connect/uds --ebpf={mode}");
        let route = Route::through(&c);
        let rows = measure(
            ctx,
            &label,
            &route,
            target,
            &[
                ("spoke-server", c.server.pid, false),
                ("spoke-agent", c.agent.pid, false),
            ],
            false,
        )
        .await?;
        let lat = summarize(
            &label,
            &pingpong(ctx, &route, target, ctx.size.pings).await?,
            false,
        );
        let lat1 = {
            let _one = OneCpu::pin(0, &[c.server.pid, c.agent.pid])?;
            summarize(
                &label,
                &pingpong(ctx, &route, target, ctx.size.pings).await?,
                false,
            )
        };
        let procs = [
            ("spoke-server", c.server.pid, false),
            ("spoke-agent", c.agent.pid, false),
        ];
        // Counting needs perf; without it the table says so and the rest stands.
        let counts = match count(ctx, &route, target, &procs).await {
            Ok(c) => c,
            Err(e) => {
                sec.skipped.push(format!("counting ebpf={mode}: {e:#}"));
                Vec::new()
            }
        };
        ctx.say(&format!(
            "   ebpf={mode}: 64-byte p50 {:.1} µs p99 {:.1} µs; on one CPU p50 {:.1} µs p99 {:.1} µs",
            lat.p50, lat.p99, lat1.p50, lat1.p99
        ));
        let m = c.agent_metrics();
        let redirected_bytes = metric_sum(&m, "spoke_ebpf_redirected_bytes", "");
        let pairs = metric_sum(&m, "spoke_ebpf_socket_pairs", "");
        legs.push(Leg {
            mode,
            rows,
            lat,
            lat1,
            redirected_bytes,
            pairs,
            counts,
        });
    }
    let agent_cpu = |l: &Leg, dir: &str| {
        l.rows
            .iter()
            .find(|r| r.dir == dir)
            .and_then(|r| {
                r.cpu
                    .iter()
                    .find(|(p, _)| p == "spoke-agent")
                    .map(|(_, c)| *c)
            })
            .unwrap_or(f64::NAN)
    };
    let mibs = |l: &Leg, dir: &str| {
        l.rows
            .iter()
            .find(|r| r.dir == dir)
            .map(|r| r.mibs)
            .unwrap_or(f64::NAN)
    };
    let mut md = format!(
        "HTTP CONNECT over the UDS frontend; {} MiB each way and {} 64-byte round trips; the agent with `--ebpf=off` and then \
         `--ebpf=on` (sock_ops on the cgroup2 root, sk_msg redirect between the agent's backend socket and the backend's).\n\n\
         Latency twice: as the scheduler places the processes, and with the bench, spoke-server and spoke-agent pinned to \
         one CPU (wake-ups become context switches instead of cross-CPU interrupts to a halted vCPU, which isolates what \
         the fast path changes).\n\n\
         | agent | download MiB/s | upload MiB/s | agent CPU s/GiB down | agent CPU s/GiB up | p50 µs | p99 µs | p99.9 µs | one CPU p50 µs | one CPU p99 µs | bytes redirected by sk_msg | socket pairs | context switches per round trip: server / agent | system calls per round trip: server / agent |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        ctx.size.bulk >> 20,
        ctx.size.pings
    );
    for l in &legs {
        let per = |name: &str, f: fn(&PerRound) -> f64| {
            l.counts
                .iter()
                .find(|p| p.process == name)
                .map_or(f64::NAN, f)
        };
        md.push_str(&format!(
            "| --ebpf={} | {} | {} | {:.2} | {:.2} | {} | {} | {} | {} | {} | {} | {} | {:.2} / {:.2} | {:.1} / {:.1} |\n",
            l.mode,
            num(mibs(l, "download")),
            num(mibs(l, "upload")),
            agent_cpu(l, "download"),
            agent_cpu(l, "upload"),
            num(l.lat.p50),
            num(l.lat.p99),
            num(l.lat.p999),
            num(l.lat1.p50),
            num(l.lat1.p99),
            l.redirected_bytes,
            l.pairs,
            per("spoke-server", |p| p.switches),
            per("spoke-agent", |p| p.switches),
            per("spoke-server", |p| p.syscalls),
            per("spoke-agent", |p| p.syscalls),
        ));
    }
    if let Some(e) = &on_error {
        sec.skipped.push(format!(
            "--ebpf=on: the agent did not start: `{}`",
            e.replace('`', "'")
        ));
        md.push_str(&format!(
            "\n**--ebpf=on not run**: the agent refused to start: `{}`\n",
            e.replace('`', "'")
        ));
    }
    let off = legs.iter().find(|l| l.mode == "off");
    let on = legs.iter().find(|l| l.mode == "on");
    match (off, on) {
        (Some(off), Some(on)) => {
            for dir in ["download", "upload"] {
                let (a, b) = (agent_cpu(on, dir), agent_cpu(off, dir));
                sec.floors.push(Floor::new(
                    format!("agent CPU/GiB {dir}, on vs off"),
                    format!("{a:.2} vs {b:.2} s/GiB"),
                    "on < off",
                    Some(a < b),
                ));
            }
            for (what, on_us, off_us) in [
                ("64-byte p50, on vs off", on.lat.p50, off.lat.p50),
                ("64-byte p99, on vs off", on.lat.p99, off.lat.p99),
                (
                    "64-byte p50 on one CPU, on vs off",
                    on.lat1.p50,
                    off.lat1.p50,
                ),
                (
                    "64-byte p99 on one CPU, on vs off",
                    on.lat1.p99,
                    off.lat1.p99,
                ),
            ] {
                sec.floors.push(Floor::new(
                    what,
                    format!("{on_us:.1} vs {off_us:.1} µs"),
                    "on < off",
                    Some(on_us < off_us),
                ));
            }
            sec.floors.push(Floor::new(
                "bytes redirected by sk_msg (on)",
                format!("{}", on.redirected_bytes),
                "> 0",
                Some(on.redirected_bytes > 0.0),
            ));
        }
        _ => sec.floors.push(Floor::new(
            "eBPF on vs off",
            format!(
                "--ebpf=on not run: {}",
                on_error.as_deref().unwrap_or("no result")
            ),
            "on < off",
            None,
        )),
    }
    sec.md = md;
    let mut bars = Vec::new();
    for l in &legs {
        for dir in ["download", "upload"] {
            bars.push(Bar::new(
                format!("--ebpf={} {dir}", l.mode),
                agent_cpu(l, dir),
                l.mode == "off",
            ));
        }
    }
    sec.chart(
        "ebpf_cpu.svg",
        "agent CPU per GiB, eBPF on vs off",
        svg::bars(
            "Agent CPU per GiB",
            "CPU seconds per GiB (lower is better)",
            &bars,
            None,
        ),
    );
    sec.json = json!({
        "legs": legs.iter().map(|l| json!({
            "ebpf": l.mode, "download_mib_s": mibs(l, "download"), "upload_mib_s": mibs(l, "upload"),
            "agent_cpu_s_per_gib_download": agent_cpu(l, "download"), "agent_cpu_s_per_gib_upload": agent_cpu(l, "upload"),
            "p50_us": l.lat.p50, "p99_us": l.lat.p99, "p999_us": l.lat.p999,
            "one_cpu_p50_us": l.lat1.p50, "one_cpu_p99_us": l.lat1.p99, "one_cpu_p999_us": l.lat1.p999,
            "redirected_bytes": l.redirected_bytes, "socket_pairs": l.pairs,
        })).collect::<Vec<_>>(),
        "ebpf_on_error": on_error,
    });
    Ok(sec)
}
