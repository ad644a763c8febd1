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
    round: usize,
    rows: Vec<Row>,
    lat: Lat,
    /// The same ping-pong with the bench, server and agent on one CPU (no cross-CPU wake-ups).
    lat1: Lat,
    redirected_bytes: f64,
    pairs: f64,
    /// Agent writes held back for the backend's reader, and their wait in seconds.
    holds: f64,
    held_s: f64,
    /// Of those waits, the ones the backend's reads ended (the rest ended by a timer).
    woken: f64,
    /// Context switches and system calls per round trip of the server and the agent.
    counts: Vec<PerRound>,
}

pub async fn run(ctx: &Ctx) -> Result<Section> {
    let mut sec = Section::new("ebpf", super::title("ebpf"));
    let backend = io::backend(TcpListener::bind("127.0.0.1:0").await?)?;
    let target = backend.addr;
    let mut legs: Vec<Leg> = Vec::new();
    let mut on_error = None;
    let rounds = ctx.size.ebpf_rounds;
    for (round, mode) in (1..=rounds).flat_map(|r| [(r, "off"), (r, "on")]) {
        if mode == "on" && on_error.is_some() {
            continue;
        }
        let mut cfg = ClusterCfg::new(Mode::HttpConnect, Transport::Uds);
        cfg.ebpf = mode.into();
        cfg.agent_extra = vec![format!("--ebpf-fast-path-ports={}", target.port())];
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
        let label = format!("spoke http-connect/uds --ebpf={mode} (round {round})");
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
        let holds = metric_sum(&m, "spoke_ebpf_backlog_holds", "");
        let held_s = metric_sum(&m, "spoke_ebpf_backlog_hold_seconds", "");
        let woken = metric_sum(&m, "spoke_ebpf_backlog_reader_wakeups", "");
        legs.push(Leg {
            mode,
            round,
            rows,
            lat,
            lat1,
            redirected_bytes,
            pairs,
            holds,
            held_s,
            woken,
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
         `--ebpf=on` (sock_ops on the cgroup2 root; sk_msg redirects what the agent writes into the backend's socket, what the \
         backend writes back stays on TCP), alternating for {} rounds; the floors compare each mode's mean.\n\n\
         Latency twice: as the scheduler places the processes, and with the bench, spoke-server and spoke-agent pinned to \
         one CPU (wake-ups become context switches instead of cross-CPU interrupts to a halted vCPU, which isolates what \
         the fast path changes).\n\n\
         | agent | download MiB/s | upload MiB/s | agent CPU s/GiB down | agent CPU s/GiB up | p50 µs | p99 µs | p99.9 µs | one CPU p50 µs | one CPU p99 µs | bytes redirected by sk_msg | socket pairs | writes held for the reader (s waited; woken by its reads) | context switches per round trip: server / agent | system calls per round trip: server / agent | wake-ups run on the other, idle vCPU per round trip: bench / server / agent |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        ctx.size.bulk >> 20,
        ctx.size.pings,
        rounds
    );
    let to_idle_other = |p: &PerRound| p.landing.map_or(f64::NAN, |l| l.to_idle_other);
    for l in &legs {
        let per = |name: &str, f: &dyn Fn(&PerRound) -> f64| {
            l.counts
                .iter()
                .find(|p| p.process == name)
                .map_or(f64::NAN, f)
        };
        md.push_str(&format!(
            "| --ebpf={} (round {}) | {} | {} | {:.2} | {:.2} | {} | {} | {} | {} | {} | {} | {} | {} ({:.3}; {}) | {:.2} / {:.2} | {:.1} / {:.1} | {:.2} / {:.2} / {:.2} |\n",
            l.mode,
            l.round,
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
            l.holds,
            l.held_s,
            l.woken,
            per("spoke-server", &|p| p.switches),
            per("spoke-agent", &|p| p.switches),
            per("spoke-server", &|p| p.syscalls),
            per("spoke-agent", &|p| p.syscalls),
            per("bench client+backend", &to_idle_other),
            per("spoke-server", &to_idle_other),
            per("spoke-agent", &to_idle_other),
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
    // Floors compare each mode's mean over its rounds. The fast path's point, agent CPU for
    // what the agent writes (upload), must be lower; every other figure must not be worse
    // than off by more than NOISE, the spread of one configuration's means between runs
    // (download is TCP in both modes).
    const NOISE: f64 = 0.05;
    let noise = format!("{:.0} %", NOISE * 100.0);
    let mean = |mode: &str, f: &dyn Fn(&Leg) -> f64| {
        let v: Vec<f64> = legs.iter().filter(|l| l.mode == mode).map(f).collect();
        v.iter().sum::<f64>() / v.len() as f64
    };
    let have = |mode: &str| legs.iter().any(|l| l.mode == mode);
    if have("off") && have("on") {
        let pair = |f: &dyn Fn(&Leg) -> f64| (mean("on", f), mean("off", f));
        let (a, b) = pair(&|l| agent_cpu(l, "upload"));
        sec.floors.push(Floor::new(
            "agent CPU/GiB upload (redirected), on vs off",
            format!("{a:.2} vs {b:.2} s/GiB"),
            "on < off",
            Some(a < b),
        ));
        let (a, b) = pair(&|l| agent_cpu(l, "download"));
        sec.floors.push(Floor::new(
            "agent CPU/GiB download (TCP both ways), on vs off",
            format!("{a:.2} vs {b:.2} s/GiB"),
            format!("on ≤ off + {noise}"),
            Some(a <= b * (1.0 + NOISE)),
        ));
        for dir in ["download", "upload"] {
            let (a, b) = pair(&|l| mibs(l, dir));
            sec.floors.push(Floor::new(
                format!("{dir} MiB/s, on vs off"),
                format!("{} vs {} MiB/s", num(a), num(b)),
                format!("on ≥ off − {noise}"),
                Some(a >= b * (1.0 - NOISE)),
            ));
        }
        type Figure = fn(&Leg) -> f64;
        let lats: [(&str, Figure); 4] = [
            ("64-byte p50, on vs off", |l| l.lat.p50),
            ("64-byte p99, on vs off", |l| l.lat.p99),
            ("64-byte p50 on one CPU, on vs off", |l| l.lat1.p50),
            ("64-byte p99 on one CPU, on vs off", |l| l.lat1.p99),
        ];
        for (what, f) in lats {
            let (on_us, off_us) = pair(&f);
            sec.floors.push(Floor::new(
                what,
                format!("{on_us:.1} vs {off_us:.1} µs"),
                format!("on ≤ off + {noise}"),
                Some(on_us <= off_us * (1.0 + NOISE)),
            ));
        }
        let redirected = mean("on", &|l| l.redirected_bytes);
        sec.floors.push(Floor::new(
            "bytes redirected by sk_msg per round (on)",
            format!("{redirected:.0}"),
            "> 0",
            Some(redirected > 0.0),
        ));
    } else {
        sec.floors.push(Floor::new(
            "eBPF on vs off",
            format!(
                "--ebpf=on not run: {}",
                on_error.as_deref().unwrap_or("no result")
            ),
            "on < off",
            None,
        ));
    }
    sec.md = md;
    let mut bars = Vec::new();
    for l in &legs {
        for dir in ["download", "upload"] {
            bars.push(Bar::new(
                format!("--ebpf={} #{} {dir}", l.mode, l.round),
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
            "ebpf": l.mode, "round": l.round, "download_mib_s": mibs(l, "download"), "upload_mib_s": mibs(l, "upload"),
            "agent_cpu_s_per_gib_download": agent_cpu(l, "download"), "agent_cpu_s_per_gib_upload": agent_cpu(l, "upload"),
            "p50_us": l.lat.p50, "p99_us": l.lat.p99, "p999_us": l.lat.p999,
            "one_cpu_p50_us": l.lat1.p50, "one_cpu_p99_us": l.lat1.p99, "one_cpu_p999_us": l.lat1.p999,
            "redirected_bytes": l.redirected_bytes, "socket_pairs": l.pairs,
            "backlog_holds": l.holds, "backlog_hold_seconds": l.held_s, "backlog_reader_wakeups": l.woken,
        })).collect::<Vec<_>>(),
        "ebpf_on_error": on_error,
    });
    Ok(sec)
}
