//! Bulk: one large transfer per route and direction, MiB/s and CPU seconds per GiB of every
//! process on the path.
use super::{start, FRONTENDS};
use crate::bench::baselines;
use crate::bench::io::{self, Route};
use crate::bench::procs::{Cluster, ClusterCfg};
use crate::bench::report::{num, Floor, Section};
use crate::bench::stats::{machine_work, CpuProbe};
use crate::bench::svg::{self, Bar};
use crate::bench::wakeups::{Counting, PerRound};
use crate::bench::Ctx;
use anyhow::Result;
use serde_json::json;
use std::net::SocketAddr;
use tokio::net::TcpListener;

/// Server+agent CPU seconds per GiB moved, at most (the goal: one CPU-second per GiB).
const CPU_FLOOR: f64 = 1.0;

pub struct Row {
    pub route: String,
    pub dir: &'static str,
    pub mibs: f64,
    /// (process, CPU seconds per GiB)
    pub cpu: Vec<(String, f64)>,
    /// System calls and context switches per MiB, per process; empty without perf.
    pub per_mib: Vec<PerRound>,
    pub baseline: bool,
    /// MiB/s of every round, in order (the row's figures are those of the median one).
    pub rounds: Vec<f64>,
    /// The machine's CPUs at work during the transfer, in cores (`None`: /proc/stat unread).
    pub busy: Option<f64>,
}

impl Row {
    /// CPU s/GiB of the tunnel's own processes (all but the bench's client+backend).
    pub fn tunnel_cpu(&self) -> f64 {
        self.cpu
            .iter()
            .filter(|(n, _)| n != "bench client+backend")
            .map(|(_, c)| c)
            .sum()
    }
}

/// Downloads then uploads `bytes` along `route`, measuring `procs` (label, pid, whole tree).
pub async fn measure(
    ctx: &Ctx,
    label: &str,
    route: &Route,
    target: SocketAddr,
    procs: &[(&str, u32, bool)],
    baseline: bool,
) -> Result<Vec<Row>> {
    let n = ctx.size.bulk;
    let gib = n as f64 / (1u64 << 30) as f64;
    let me = std::process::id();
    let mut all: Vec<(&str, u32, bool)> = procs.to_vec();
    all.push(("bench client+backend", me, false));
    let mut rows = Vec::new();
    for dir in ["download", "upload"] {
        // The client on a thread of its own, as in the latency scenario; the backend stays on
        // the bench's runtime.
        let (secs, cpu, per_mib, busy) = super::on_client_thread(|| async {
            let mut conn = io::dial(route, &ctx.tls, target).await?;
            // Warm up the connection (windows, allocations) before measuring.
            let warm = (n / 16).min(16 << 20);
            io::download(&mut conn, warm).await?;
            // perf's tracepoint counts cost each system call a little; CPU is read alike
            // for every route.
            let counting = Counting::start(&ctx.work, &all).ok();
            let probe = CpuProbe::start(&all);
            let work = machine_work().ok();
            let secs = super::as_task(async move {
                let secs = if dir == "download" {
                    io::download(&mut conn, n).await?
                } else {
                    io::upload(&mut conn, n).await?
                };
                anyhow::Ok(secs)
            })
            .await?;
            let busy = work
                .zip(machine_work().ok())
                .map(|(before, after)| (after - before) / secs);
            let cpu = probe.stop();
            let per_mib = counting
                .and_then(|c| c.stop((n >> 20) as usize).ok())
                .unwrap_or_default();
            anyhow::Ok((secs, cpu, per_mib, busy))
        })?;
        let mibs = n as f64 / (1 << 20) as f64 / secs;
        ctx.say(&format!(
            "   bulk {label:<24} {dir:<8} {:>5} MiB in {secs:>6.2} s = {:>7.0} MiB/s",
            n >> 20,
            mibs
        ));
        rows.push(Row {
            route: label.to_string(),
            dir,
            mibs,
            cpu: cpu.into_iter().map(|(p, c)| (p, c / gib)).collect(),
            per_mib,
            baseline,
            rounds: vec![mibs],
            busy,
        });
    }
    Ok(rows)
}

/// Every route once, in order; routes that cannot run add why to `skipped`.
async fn one_round(ctx: &Ctx, target: SocketAddr, skipped: &mut Vec<String>) -> Vec<Row> {
    let mut rows: Vec<Row> = Vec::new();
    match measure(ctx, "direct loopback", &Route::Direct, target, &[], true).await {
        Ok(r) => rows.extend(r),
        Err(e) => skipped.push(format!("direct loopback: {e:#}")),
    }
    match baselines::ssh(&ctx.work, target) {
        Ok(t) => match measure(
            ctx,
            "ssh -L (aes128-gcm)",
            &Route::Forward(t.port),
            target,
            &[("ssh", t.ssh.pid, false), ("sshd", t.sshd.pid, true)],
            true,
        )
        .await
        {
            Ok(r) => rows.extend(r),
            Err(e) => skipped.push(format!("ssh -L: {e:#}")),
        },
        Err(e) => skipped.push(format!("ssh -L: {e:#}")),
    }
    match baselines::stunnel(&ctx.work, &ctx.pki, target) {
        Ok(t) => match measure(
            ctx,
            "stunnel TLS hop",
            &Route::Forward(t.port),
            target,
            &[
                ("stunnel client", t.client.pid, false),
                ("stunnel server", t.server.pid, false),
            ],
            true,
        )
        .await
        {
            Ok(r) => rows.extend(r),
            Err(e) => skipped.push(format!("stunnel: {e:#}")),
        },
        Err(e) => skipped.push(format!("stunnel: {e:#}")),
    }
    for (mode, t) in FRONTENDS {
        let label = format!("spoke {}", Cluster::label(mode, t));
        let r = async {
            let c = start(ctx, &ClusterCfg::new(mode, t))?;
            measure(
                ctx,
                &label,
                &Route::through(&c),
                target,
                &[
                    ("spoke-server", c.server.pid, false),
                    ("spoke-agent", c.agent.pid, false),
                ],
                false,
            )
            .await
        }
        .await;
        match r {
            Ok(r) => rows.extend(r),
            Err(e) => skipped.push(format!("{label}: {e:#}")),
        }
    }
    rows
}

/// One row per route and direction: the round of median throughput, with every round's.
fn median_rounds(rounds: Vec<Vec<Row>>) -> Vec<Row> {
    let keys: Vec<(String, &'static str)> = rounds
        .first()
        .map(|first| first.iter().map(|r| (r.route.clone(), r.dir)).collect())
        .unwrap_or_default();
    let mut left: Vec<Row> = rounds.into_iter().flatten().collect();
    let mut out = Vec::new();
    for (route, dir) in keys {
        let (mut runs, rest): (Vec<Row>, Vec<Row>) = left
            .into_iter()
            .partition(|r| r.route == route && r.dir == dir);
        left = rest;
        let each: Vec<f64> = runs.iter().map(|r| r.mibs).collect();
        runs.sort_by(|a, b| a.mibs.total_cmp(&b.mibs));
        let mut median = runs.swap_remove(runs.len() / 2);
        median.rounds = each;
        out.push(median);
    }
    out
}

pub async fn run(ctx: &Ctx) -> Result<Section> {
    let mut sec = Section::new("bulk", super::title("bulk"));
    let backend = io::backend(TcpListener::bind("127.0.0.1:0").await?)?;
    let target = backend.addr;
    let mut all = Vec::new();
    for round in 0..ctx.size.bulk_rounds {
        if ctx.size.bulk_rounds > 1 {
            ctx.say(&format!(
                "   bulk round {} of {}",
                round + 1,
                ctx.size.bulk_rounds
            ));
        }
        let mut skipped = Vec::new();
        all.push(one_round(ctx, target, &mut skipped).await);
        for why in skipped {
            if !sec.skipped.contains(&why) {
                sec.skipped.push(why);
            }
        }
    }
    let rows = median_rounds(all);

    // Table, ratios, floors.
    let find = |route: &str, dir: &str| {
        rows.iter()
            .find(|r| r.route.starts_with(route) && r.dir == dir)
            .map(|r| r.mibs)
    };
    let mut md = format!(
        "One {} MiB transfer per route and direction over an established connection (after a warm-up), backend and client in the bench \
         process, in each of {} rounds; every round runs all routes in turn. Each row gives the round of median throughput: its \
         MiB/s, CPU and counts (the MiB/s of every round in the last column). Spoke routes: frontend → spoke-server → mTLS gRPC \
         tunnel → spoke-agent → backend, all on loopback, `--ebpf=off`. CPU is utime+stime from /proc/PID/stat before/after, per \
         GiB moved. Busy cores: the whole machine's CPU time at work (user, system, irq, softirq; not idle, \
         not steal) during the transfer, over its duration: out of 2, what the route's pipeline kept busy.\n\n\
         | route | direction | MiB/s | × direct | × ssh -L | CPU s/GiB (per process) | tunnel CPU s/GiB | busy cores | MiB/s of each round |\n|---|---|---|---|---|---|---|---|---|\n",
        ctx.size.bulk >> 20,
        ctx.size.bulk_rounds
    );
    for r in &rows {
        let x = |b: Option<f64>| {
            b.map(|b| format!("{:.2}", r.mibs / b))
                .unwrap_or_else(|| "—".into())
        };
        let cpu: Vec<String> = r.cpu.iter().map(|(p, c)| format!("{p} {c:.2}")).collect();
        let each: Vec<String> = r.rounds.iter().map(|m| num(*m)).collect();
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.route,
            r.dir,
            num(r.mibs),
            x(find("direct", r.dir)),
            x(find("ssh", r.dir)),
            cpu.join(", "),
            if r.route.starts_with("direct") {
                "—".into()
            } else {
                format!("{:.2}", r.tunnel_cpu())
            },
            r.busy
                .map(|b| format!("{b:.2}"))
                .unwrap_or_else(|| "—".into()),
            each.join(", ")
        ));
    }
    md.push_str(
        "\n**System calls, context switches and page faults per MiB**, per process (`perf stat` counts of \
         `raw_syscalls:sys_enter`, `sched:sched_switch` and `page-faults` over the same transfer; every route pays perf's \
         small cost per system call alike):\n\n\
         | route | direction | system calls per MiB | context switches per MiB | page faults per MiB |\n|---|---|---|---|---|\n",
    );
    for r in rows.iter().filter(|r| !r.per_mib.is_empty()) {
        let each = |f: fn(&PerRound) -> f64| {
            r.per_mib
                .iter()
                .map(|p| format!("{} {:.1}", p.process, f(p)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            r.route,
            r.dir,
            each(|p| p.syscalls),
            each(|p| p.switches),
            each(|p| p.faults)
        ));
    }
    for r in rows.iter().filter(|r| !r.baseline) {
        // The goal: faster than `ssh -L` on the same machine. A UDS frontend skips one TLS
        // termination that ssh pays too, so it must beat ssh by 20%; an mTLS TCP frontend
        // adds a TLS hop of its own and must at least match it.
        let floor = if r.route.contains("uds") { 1.2 } else { 1.0 };
        let ratio = find("ssh", r.dir).map(|s| r.mibs / s);
        sec.floors.push(Floor::new(
            format!("{} {} vs ssh -L", r.route, r.dir),
            ratio
                .map(|x| format!("{x:.2}× ({} vs {} MiB/s)", num(r.mibs), num(r.mibs / x)))
                .unwrap_or_else(|| "ssh not run".into()),
            format!("≥ {floor:.1}×"),
            ratio.map(|x| x >= floor),
        ));
    }
    for r in rows.iter().filter(|r| !r.baseline) {
        let c = r.tunnel_cpu();
        sec.floors.push(Floor::new(
            format!("{} {} server+agent CPU", r.route, r.dir),
            format!("{c:.2} s/GiB"),
            format!("≤ {CPU_FLOOR:.1} s/GiB"),
            Some(c <= CPU_FLOOR),
        ));
    }
    sec.md = md;
    for dir in ["download", "upload"] {
        let bars: Vec<Bar> = rows
            .iter()
            .filter(|r| r.dir == dir)
            .map(|r| Bar::new(r.route.clone(), r.mibs, r.baseline))
            .collect();
        sec.chart(
            &format!("bulk_{dir}.svg"),
            &format!("bulk {dir}, MiB/s"),
            svg::bars(
                &format!("Bulk {dir} ({} MiB)", ctx.size.bulk >> 20),
                "MiB/s (higher is better)",
                &bars,
                None,
            ),
        );
    }
    let bars: Vec<Bar> = rows
        .iter()
        .filter(|r| !r.route.starts_with("direct"))
        .map(|r| Bar::new(format!("{} {}", r.route, r.dir), r.tunnel_cpu(), r.baseline))
        .collect();
    sec.chart(
        "bulk_cpu.svg",
        "tunnel CPU per GiB",
        svg::bars(
            "Tunnel processes' CPU per GiB",
            "CPU seconds per GiB (lower is better)",
            &bars,
            Some((CPU_FLOOR, &format!("floor {CPU_FLOOR:.1} s/GiB"))),
        ),
    );
    sec.json = json!({
        "bytes": ctx.size.bulk,
        "rounds": ctx.size.bulk_rounds,
        "rows": rows.iter().map(|r| json!({
            "route": r.route, "direction": r.dir, "mib_per_s": r.mibs, "baseline": r.baseline,
            "mib_per_s_each_round": r.rounds,
            "cpu_s_per_gib": r.cpu.iter().map(|(p, c)| (p.clone(), json!(c))).collect::<serde_json::Map<_, _>>(),
            "tunnel_cpu_s_per_gib": r.tunnel_cpu(),
            "busy_cores": r.busy,
            "per_mib": r.per_mib.iter().map(|p| json!({"process": p.process, "syscalls": p.syscalls, "context_switches": p.switches, "page_faults": p.faults})).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "skipped": sec.skipped,
    });
    Ok(sec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(route: &str, dir: &'static str, mibs: f64) -> Row {
        Row {
            route: route.into(),
            dir,
            mibs,
            cpu: vec![("p".into(), mibs / 1000.0)],
            per_mib: Vec::new(),
            baseline: false,
            rounds: vec![mibs],
            busy: None,
        }
    }

    /// Each route and direction keeps its median round whole (its CPU with its MiB/s), lists
    /// every round's MiB/s in order, and keeps the first round's order of rows.
    #[test]
    fn median_rounds_keep_the_median_round_and_all_rounds() {
        let rounds = vec![
            vec![row("a", "download", 3.0), row("a", "upload", 10.0)],
            vec![row("a", "download", 1.0), row("a", "upload", 30.0)],
            vec![row("a", "upload", 20.0), row("a", "download", 2.0)],
        ];
        let rows = median_rounds(rounds);
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].dir, rows[0].mibs), ("download", 2.0));
        assert_eq!(rows[0].cpu[0].1, 0.002);
        assert_eq!(rows[0].rounds, [3.0, 1.0, 2.0]);
        assert_eq!((rows[1].dir, rows[1].mibs), ("upload", 20.0));
        assert_eq!(rows[1].rounds, [10.0, 30.0, 20.0]);
    }
}
