//! Churn: new connection, one small request, close (kubectl logs, API server proxy):
//! tunnels per second and dial-time percentiles, several clients in parallel.
use super::start;
use crate::bench::io::{self, Route};
use crate::bench::procs::{Cluster, ClusterCfg, Mode, Transport};
use crate::bench::report::{num, Floor, Section};
use crate::bench::stats::{pct, sorted, CpuProbe};
use crate::bench::svg::{self, Bar};
use crate::bench::Ctx;
use anyhow::Result;
use serde_json::json;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const WORKERS: usize = 8;
const RESPONSE: u64 = 512;

struct Res {
    route: String,
    per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
    first_error: Option<String>,
    cpu_ms_per_conn: Vec<(String, f64)>,
    baseline: bool,
}

async fn one(route: &Route, tls: &io::Tls, target: SocketAddr) -> Result<f64> {
    let t = Instant::now();
    let mut c = io::dial(route, tls, target).await?;
    let dial = t.elapsed().as_secs_f64() * 1e3;
    c.write_all(&io::command(b'C', RESPONSE)).await?;
    let mut buf = [0u8; 1024];
    let mut got = 0u64;
    while got < RESPONSE {
        let k = c.read(&mut buf).await?;
        if k == 0 {
            anyhow::bail!("response ended after {got} bytes");
        }
        got += k as u64;
    }
    let _ = c.shutdown().await;
    Ok(dial)
}

async fn churn(
    ctx: &Ctx,
    label: &str,
    route: Route,
    target: SocketAddr,
    procs: &[(&str, u32, bool)],
    baseline: bool,
) -> Res {
    let dur = ctx.size.churn;
    let end = Instant::now() + dur;
    let tls = Arc::new(ctx.tls.clone());
    let route = Arc::new(route);
    let probe = CpuProbe::start(procs);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..WORKERS {
        let (tls, route) = (tls.clone(), route.clone());
        tasks.push(tokio::spawn(async move {
            let mut dials = Vec::new();
            let mut errors = 0u64;
            let mut first_error = None;
            while Instant::now() < end {
                match tokio::time::timeout(Duration::from_secs(10), one(&route, &tls, target)).await
                {
                    Ok(Ok(ms)) => dials.push(ms),
                    Ok(Err(e)) => {
                        errors += 1;
                        first_error.get_or_insert(format!("{e:#}"));
                    }
                    Err(_) => {
                        errors += 1;
                        first_error.get_or_insert("timed out after 10 s".into());
                    }
                }
            }
            (dials, errors, first_error)
        }));
    }
    let mut dials = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    for t in tasks {
        if let Ok((d, e, f)) = t.await {
            dials.extend(d);
            errors += e;
            if first_error.is_none() {
                first_error = f;
            }
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = probe.stop();
    let n = dials.len().max(1) as f64;
    let dials = sorted(dials);
    let r = Res {
        route: label.into(),
        per_s: dials.len() as f64 / secs,
        p50_ms: pct(&dials, 50.0),
        p99_ms: pct(&dials, 99.0),
        errors,
        first_error,
        cpu_ms_per_conn: cpu.into_iter().map(|(p, c)| (p, c * 1e3 / n)).collect(),
        baseline,
    };
    ctx.say(&format!(
        "   churn {:<26} {:>7.0} conn/s  dial p50 {:.3} ms  p99 {:.3} ms  errors {}",
        r.route, r.per_s, r.p50_ms, r.p99_ms, r.errors
    ));
    r
}

pub async fn run(ctx: &Ctx) -> Result<Section> {
    let mut sec = Section::new("churn", super::title("churn"));
    let backend = io::backend(TcpListener::bind("127.0.0.1:0").await?)?;
    let target = backend.addr;
    let me = std::process::id();
    let mut res = vec![
        churn(
            ctx,
            "direct loopback",
            Route::Direct,
            target,
            &[("bench client+backend", me, false)],
            true,
        )
        .await,
    ];
    for (mode, t) in [
        (Mode::HttpConnect, Transport::Uds),
        (Mode::HttpConnect, Transport::Tls),
        (Mode::Grpc, Transport::Uds),
    ] {
        let label = format!("spoke {}", Cluster::label(mode, t));
        match start(ctx, &ClusterCfg::new(mode, t)) {
            Ok(c) => {
                let procs = [
                    ("spoke-server", c.server.pid, false),
                    ("spoke-agent", c.agent.pid, false),
                    ("bench client+backend", me, false),
                ];
                res.push(churn(ctx, &label, Route::through(&c), target, &procs, false).await);
            }
            Err(e) => sec.skipped.push(format!("{label}: {e:#}")),
        }
    }
    let mut md = format!(
        "{WORKERS} clients in parallel for {:.0} s each: dial (for Spoke: UDS or mTLS connect + CONNECT / a new gRPC channel and \
         Proxy stream, the agent's dial, the answer), send a 9-byte request, read a {RESPONSE}-byte answer, close. Dial time is \
         until the tunnel is usable. gRPC: one channel per dial, as konnectivity-client's single-use tunnels.\n\n\
         | route | tunnels/s | dial p50 ms | dial p99 ms | errors | CPU ms per connection |\n|---|---|---|---|---|---|\n",
        ctx.size.churn.as_secs_f64()
    );
    for r in &res {
        let cpu: Vec<String> = r
            .cpu_ms_per_conn
            .iter()
            .map(|(p, c)| format!("{p} {c:.3}"))
            .collect();
        md.push_str(&format!(
            "| {} | {} | {:.3} | {:.3} | {} | {} |\n",
            r.route,
            num(r.per_s),
            r.p50_ms,
            r.p99_ms,
            r.errors,
            cpu.join(", ")
        ));
    }
    for r in &res {
        if let Some(e) = &r.first_error {
            md.push_str(&format!(
                "\nFirst error on {}: `{}`\n",
                r.route,
                e.replace('`', "'")
            ));
        }
    }
    for r in res.iter().filter(|r| !r.baseline) {
        if r.route.contains("http-connect/uds") {
            sec.floors.push(Floor::new(
                format!("{} tunnels/s", r.route),
                format!("{:.0}/s", r.per_s),
                "≥ 3000/s",
                Some(r.per_s >= 3000.0),
            ));
        }
        sec.floors.push(Floor::new(
            format!("{} dial p99", r.route),
            format!("{:.3} ms", r.p99_ms),
            "(reported)",
            None,
        ));
    }
    sec.md = md;
    let bars: Vec<Bar> = res
        .iter()
        .map(|r| Bar::new(r.route.clone(), r.per_s, r.baseline))
        .collect();
    sec.chart(
        "churn.svg",
        "new tunnels per second",
        svg::bars(
            "New connection + request + close",
            "connections per second (higher is better)",
            &bars,
            Some((3000.0, "floor 3,000/s (UDS)")),
        ),
    );
    sec.json = json!({
        "workers": WORKERS, "seconds": ctx.size.churn.as_secs_f64(),
        "rows": res.iter().map(|r| json!({"route": r.route, "per_s": r.per_s, "dial_p50_ms": r.p50_ms, "dial_p99_ms": r.p99_ms,
            "errors": r.errors, "first_error": r.first_error,
            "cpu_ms_per_conn": r.cpu_ms_per_conn.iter().map(|(p, c)| (p.clone(), json!(c))).collect::<serde_json::Map<_, _>>()})).collect::<Vec<_>>(),
        "skipped": sec.skipped,
    });
    Ok(sec)
}
