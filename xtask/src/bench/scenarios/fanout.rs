//! Fanout: many concurrent tunnelled connections through one agent, idle and then each
//! trickling data; RSS of agent and server per connection, total throughput.
use super::start;
use crate::bench::io::{self, Route};
use crate::bench::procs::{ClusterCfg, Mode, Transport};
use crate::bench::report::{num, Floor, Section};
use crate::bench::stats::{rss, CpuProbe};
use crate::bench::svg::{self, Bar};
use crate::bench::Ctx;
use anyhow::{Context, Result};
use serde_json::json;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{watch, Semaphore};

const TRICKLE: usize = 1024;
const TRICKLE_EVERY: Duration = Duration::from_millis(100);

struct Res {
    conns: usize,
    agent_idle: u64,
    server_idle: u64,
    agent_conns: u64,
    server_conns: u64,
    agent_trickle: u64,
    server_trickle: u64,
    open_s: f64,
    mib_s: f64,
    cpu: Vec<(String, f64)>,
    failed: usize,
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

fn kib_per(delta: u64, base: u64, n: usize) -> f64 {
    delta.saturating_sub(base) as f64 / 1024.0 / n as f64
}

async fn one(ctx: &Ctx, n: usize) -> Result<Res> {
    // The backend runs in its own process: this one holds the client ends, and neither may
    // need more descriptors than RLIMIT_NOFILE allows (it cannot be raised without
    // CAP_SYS_RESOURCE).
    let backend = io::ChildBackend::start()?;
    let target = backend.addr;
    let c = start(ctx, &ClusterCfg::new(Mode::HttpConnect, Transport::Uds))?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (agent_idle, server_idle) = (rss(c.agent.pid)?, rss(c.server.pid)?);
    let route = Arc::new(Route::through(&c));
    let tls = Arc::new(ctx.tls.clone());
    let (phase_tx, phase_rx) = watch::channel(0u8); // 0 idle, 1 trickle, 2 close
    let bytes = Arc::new(AtomicU64::new(0));
    let opened = Arc::new(AtomicU64::new(0));
    let sem = Arc::new(Semaphore::new(64));
    let t_open = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let (route, tls, sem, bytes, opened) = (
            route.clone(),
            tls.clone(),
            sem.clone(),
            bytes.clone(),
            opened.clone(),
        );
        let mut phase = phase_rx.clone();
        tasks.push(tokio::spawn(async move {
            let mut io = {
                let _permit = sem.acquire().await?;
                let mut io = io::dial(&route, &tls, target).await?;
                io.write_all(&io::command(b'E', 0)).await?;
                io
            };
            opened.fetch_add(1, Ordering::Relaxed);
            while *phase.borrow() == 0 {
                phase.changed().await?;
            }
            let msg = [1u8; TRICKLE];
            let mut back = [0u8; TRICKLE];
            // Spread the connections over the period so the trickle is steady.
            tokio::time::sleep(Duration::from_millis(rand_ms())).await;
            while *phase.borrow() == 1 {
                io.write_all(&msg).await?;
                io.read_exact(&mut back).await?;
                bytes.fetch_add(2 * TRICKLE as u64, Ordering::Relaxed);
                tokio::select! {
                    _ = tokio::time::sleep(TRICKLE_EVERY) => {}
                    _ = phase.changed() => {}
                }
            }
            anyhow::Ok(())
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(60 + n as u64 / 50);
    while (opened.load(Ordering::Relaxed) as usize) < n
        && Instant::now() < deadline
        && !tasks.iter().all(|t| t.is_finished())
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let open_s = t_open.elapsed().as_secs_f64();
    let open = opened.load(Ordering::Relaxed) as usize;
    if open < n {
        let _ = phase_tx.send(2);
        let mut why = String::from("timed out");
        for t in tasks {
            if t.is_finished() {
                if let Ok(Err(e)) = t.await {
                    why = format!("{e:#}");
                    break;
                }
            }
        }
        anyhow::bail!("only {open} of {n} connections opened: {why}");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (agent_conns, server_conns) = (rss(c.agent.pid)?, rss(c.server.pid)?);
    ctx.say(&format!(
        "   fanout {n}: opened in {open_s:.1} s; idle RSS agent {:.1} → {:.1} MiB, server {:.1} → {:.1} MiB",
        mib(agent_idle),
        mib(agent_conns),
        mib(server_idle),
        mib(server_conns)
    ));
    let probe = CpuProbe::start(&[
        ("spoke-server", c.server.pid, false),
        ("spoke-agent", c.agent.pid, false),
    ]);
    let _ = phase_tx.send(1);
    let t = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b0 = bytes.load(Ordering::Relaxed);
    let t1 = Instant::now();
    tokio::time::sleep(ctx.size.trickle).await;
    let moved = bytes.load(Ordering::Relaxed) - b0;
    let secs = t1.elapsed().as_secs_f64();
    let (agent_trickle, server_trickle) = (rss(c.agent.pid)?, rss(c.server.pid)?);
    let cpu = probe
        .stop()
        .into_iter()
        .map(|(p, s)| (p, s / t.elapsed().as_secs_f64()))
        .collect();
    let _ = phase_tx.send(2);
    let mut failed = 0;
    for t in tasks {
        if !matches!(
            tokio::time::timeout(Duration::from_secs(30), t).await,
            Ok(Ok(Ok(())))
        ) {
            failed += 1;
        }
    }
    let mib_s = mib(moved) / secs;
    ctx.say(&format!(
        "   fanout {n}: trickling {:.1} MiB/s total; RSS agent {:.1} MiB, server {:.1} MiB; {failed} connections failed",
        mib_s,
        mib(agent_trickle),
        mib(server_trickle)
    ));
    drop(c);
    Ok(Res {
        conns: n,
        agent_idle,
        server_idle,
        agent_conns,
        server_conns,
        agent_trickle,
        server_trickle,
        open_s,
        mib_s,
        cpu,
        failed,
    })
}

fn rand_ms() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(7);
    h.finish() % TRICKLE_EVERY.as_millis() as u64
}

pub async fn run(ctx: &Ctx) -> Result<Section> {
    let mut sec = Section::new("fanout", super::title("fanout"));
    let mut res = Vec::new();
    for &n in &ctx.size.fanout {
        match one(ctx, n)
            .await
            .with_context(|| format!("{n} connections"))
        {
            Ok(r) => res.push(r),
            Err(e) => sec.skipped.push(format!("{e:#}")),
        }
    }
    anyhow::ensure!(!res.is_empty(), "{}", sec.skipped.join("; "));
    let mut md = format!(
        "HTTP CONNECT over the UDS frontend, `--ebpf=off`; each connection is an echo stream to the backend. Idle: all connections \
         open, nothing sent, RSS read 2 s later. Trickle: every connection sends {TRICKLE} bytes and reads them back every {} ms \
         for {:.0} s. Per-connection figures are (RSS with connections − RSS before) / connections. CPU is cores used during the \
         trickle.\n\n\
         | connections | agent RSS before MiB | agent idle KiB/conn | server RSS before MiB | server idle KiB/conn | open time s | \
         trickle MiB/s (both ways) | agent RSS trickling MiB | server RSS trickling MiB | CPU cores | failed |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
        TRICKLE_EVERY.as_millis(),
        ctx.size.trickle.as_secs_f64()
    );
    for r in &res {
        let cpu: Vec<String> = r.cpu.iter().map(|(p, c)| format!("{p} {c:.2}")).collect();
        md.push_str(&format!(
            "| {} | {:.1} | {:.2} | {:.1} | {:.2} | {:.1} | {} | {:.1} | {:.1} | {} | {} |\n",
            r.conns,
            mib(r.agent_idle),
            kib_per(r.agent_conns, r.agent_idle, r.conns),
            mib(r.server_idle),
            kib_per(r.server_conns, r.server_idle, r.conns),
            r.open_s,
            num(r.mib_s),
            mib(r.agent_trickle),
            mib(r.server_trickle),
            cpu.join(", "),
            r.failed
        ));
    }
    if let Some(r) = res.first() {
        sec.floors.push(Floor::new(
            "agent idle RSS (no connections)",
            format!("{:.1} MiB", mib(r.agent_idle)),
            "≤ 10 MiB",
            Some(r.agent_idle <= 10 << 20),
        ));
    }
    for r in &res {
        let per = kib_per(r.agent_conns, r.agent_idle, r.conns);
        sec.floors.push(Floor::new(
            format!("agent RSS per idle connection ({})", r.conns),
            format!("{per:.2} KiB"),
            "≤ 5 KiB",
            Some(per <= 5.0),
        ));
        let sper = kib_per(r.server_conns, r.server_idle, r.conns);
        sec.floors.push(Floor::new(
            format!("server RSS per idle connection ({})", r.conns),
            format!("{sper:.2} KiB"),
            "(reported)",
            None,
        ));
        sec.floors.push(Floor::new(
            format!("trickle throughput ({})", r.conns),
            format!("{:.1} MiB/s, {} failed", r.mib_s, r.failed),
            "(reported)",
            None,
        ));
    }
    sec.md = md;
    let mut bars = Vec::new();
    for r in &res {
        bars.push(Bar::new(
            format!("agent, {} conns", r.conns),
            kib_per(r.agent_conns, r.agent_idle, r.conns),
            false,
        ));
        bars.push(Bar::new(
            format!("server, {} conns", r.conns),
            kib_per(r.server_conns, r.server_idle, r.conns),
            false,
        ));
    }
    sec.chart(
        "fanout_rss.svg",
        "RSS per idle connection",
        svg::bars(
            "RSS per idle tunnelled connection",
            "KiB per connection (lower is better)",
            &bars,
            Some((5.0, "agent floor 5 KiB")),
        ),
    );
    sec.json = json!({
        "trickle_bytes": TRICKLE, "trickle_every_ms": TRICKLE_EVERY.as_millis() as u64,
        "rows": res.iter().map(|r| json!({
            "connections": r.conns, "agent_rss_before": r.agent_idle, "server_rss_before": r.server_idle,
            "agent_rss_idle_conns": r.agent_conns, "server_rss_idle_conns": r.server_conns,
            "agent_kib_per_idle_conn": kib_per(r.agent_conns, r.agent_idle, r.conns),
            "server_kib_per_idle_conn": kib_per(r.server_conns, r.server_idle, r.conns),
            "agent_rss_trickle": r.agent_trickle, "server_rss_trickle": r.server_trickle,
            "open_seconds": r.open_s, "trickle_mib_per_s": r.mib_s, "failed": r.failed,
            "cpu_cores": r.cpu.iter().map(|(p, c)| (p.clone(), json!(c))).collect::<serde_json::Map<_, _>>(),
        })).collect::<Vec<_>>(),
        "skipped": sec.skipped,
    });
    Ok(sec)
}
