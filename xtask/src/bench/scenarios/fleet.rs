//! Fleet: one server and N simulated agents (one process, see `spoke_tests::fleet`), each its
//! own mTLS connection and Connect stream with its own `agentid` and identifiers, as upstream's
//! agents send them. Per N: server RSS per idle agent, time and server CPU to connect them all,
//! idle CPU (keepalives), dial latency through the loaded server (to one agent by `destHost`,
//! to any by `default`), and a reconnect storm: SIGKILL, restart at once, time until all N are
//! back with upstream's sync loop (retry at the next 1 s tick, then 1 s × 1.5 backoff with
//! 10 % jitter, capped at 10 s), the server's peak memory meanwhile. The same run measures any
//! upstream-compatible server binary given with `--server-bin`. Last, three Spoke servers
//! behind one address (least-connections balancer) with serverCount 3 under a steady dial
//! load: one is SIGKILLed, then restarted.
use crate::bench::procs::{free_port, http_get, http_get_async, Proc};
use crate::bench::report::{num, Floor, Section};
use crate::bench::stats::{cpu_secs, pct, rss, run_ns, sorted};
use crate::bench::svg::{self, Bar};
use crate::bench::Ctx;
use anyhow::{bail, Context, Result};
use rustls::ClientConfig;
use serde_json::json;
use spoke_tests::fleet::{agent_host, connect_dial, Balancer, Fleet, FleetConfig};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Storm memory bound: the settled RSS with all agents connected plus what the accept limits
/// admit (Spoke's defaults: 128 handshakes × 64 KiB, 4096 pending accepts × 2 KiB).
const STORM_BOUND_EXTRA: u64 = 128 * (64 << 10) + 4096 * (2 << 10);
/// Upstream's reconnect storm at 10k agents measured earlier on these machines (anchors.md D).
const UPSTREAM_STORM_10K_EARLIER: f64 = 8.0;

/// A server implementation under test.
#[derive(Clone)]
struct Impl {
    name: String,
    bin: PathBuf,
    spoke: bool,
}

struct ServerProc {
    proc: Proc,
    args: Vec<String>,
    uds: PathBuf,
    agent_addr: SocketAddr,
    health: u16,
    log_n: usize,
    name: String,
    bin: PathBuf,
    work: PathBuf,
}

impl ServerProc {
    fn start(ctx: &Ctx, imp: &Impl, id: &str, count: usize) -> Result<ServerProc> {
        let p = |x: &Path| x.display().to_string();
        let (agent_port, health, admin) = (free_port(), free_port(), free_port());
        let uds = ctx.work.join(format!("fleet-{id}.sock"));
        let _ = std::fs::remove_file(&uds);
        // Upstream's flags only, so any upstream-compatible binary takes them.
        let args = vec![
            "--mode=http-connect".to_string(),
            format!("--uds-name={}", p(&uds)),
            "--server-port=0".into(),
            "--agent-bind-address=127.0.0.1".into(),
            format!("--agent-port={agent_port}"),
            format!("--cluster-cert={}", p(&ctx.pki.server.cert)),
            format!("--cluster-key={}", p(&ctx.pki.server.key)),
            format!("--cluster-ca-cert={}", p(&ctx.pki.ca)),
            "--health-bind-address=127.0.0.1".into(),
            format!("--health-port={health}"),
            "--admin-bind-address=127.0.0.1".into(),
            format!("--admin-port={admin}"),
            format!("--server-id={id}"),
            format!("--server-count={count}"),
            "--proxy-strategies=destHost,default".into(),
        ];
        let mut s = ServerProc {
            proc: Proc::spawn(
                &imp.name,
                None,
                &imp.bin,
                &args,
                &ctx.work.join(format!("{id}-0.log")),
            )?,
            args,
            uds,
            agent_addr: SocketAddr::from(([127, 0, 0, 1], agent_port)),
            health,
            log_n: 0,
            name: imp.name.clone(),
            bin: imp.bin.clone(),
            work: ctx.work.clone(),
        };
        s.wait_up()?;
        Ok(s)
    }

    fn wait_up(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.proc.exited() {
                bail!("{} exited ({st}): {}", self.name, self.proc.last_error());
            }
            if self.uds.exists() && matches!(http_get(None, self.health, "/healthz"), Ok((200, _)))
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} not up after 30 s: {}",
                    self.name,
                    self.proc.last_error()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGKILL, and start it again at once with the same flags.
    fn kill(&mut self) {
        self.proc.kill_now();
    }

    fn restart(&mut self) -> Result<()> {
        self.log_n += 1;
        let log = self
            .work
            .join(format!("{}-{}.log", self.args_id(), self.log_n));
        self.proc = Proc::spawn(&self.name, None, &self.bin, &self.args, &log)?;
        Ok(())
    }

    fn args_id(&self) -> String {
        self.args
            .iter()
            .find_map(|a| a.strip_prefix("--server-id=").map(str::to_string))
            .unwrap_or_default()
    }

    fn pid(&self) -> u32 {
        self.proc.pid
    }
}

fn agent_tls(ctx: &Ctx) -> Result<Arc<ClientConfig>> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&ctx.pki.ca)? {
        roots.add(c?)?;
    }
    // Suites in Go's order, as an upstream agent offers them.
    let mut c = ClientConfig::builder_with_provider(crate::bench::pki::go_client_provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(
            CertificateDer::pem_file_iter(&ctx.pki.agent.cert)?.collect::<Result<_, _>>()?,
            PrivateKeyDer::from_pem_file(&ctx.pki.agent.key)?,
        )?;
    c.alpn_protocols = vec![b"h2".to_vec()];
    // As grpc-go: no session resumption.
    c.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(c))
}

/// `TcpExt: ListenOverflows` from /proc/net/netstat (accept queue full).
fn listen_overflows() -> u64 {
    let s = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut lines = s.lines();
    while let (Some(h), Some(v)) = (lines.next(), lines.next()) {
        if h.starts_with("TcpExt:") {
            let names = h.split_whitespace();
            let vals = v.split_whitespace();
            for (n, v) in names.zip(vals) {
                if n == "ListenOverflows" {
                    return v.parse().unwrap_or(0);
                }
            }
        }
    }
    0
}

fn vm_hwm(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map(|k| k * 1024)
        .unwrap_or(0)
}

/// Samples VmRSS of `pid` until dropped; keeps the peak.
struct PeakRss {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
}

impl PeakRss {
    fn start(pid: u32) -> PeakRss {
        let (stop, peak) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let (s, p) = (stop.clone(), peak.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Ok(r) = rss(pid) {
                    p.fetch_max(r, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        PeakRss { stop, peak }
    }

    fn stop(&self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.peak.load(Ordering::Relaxed)
    }
}

#[derive(Default, Clone)]
struct Dials {
    ms: Vec<f64>,
    failed: usize,
    first_error: Option<String>,
    /// The server's CPU per dial, µs (0 where not measured).
    server_us: f64,
}

impl Dials {
    fn p(&self, q: f64) -> f64 {
        pct(&self.ms, q)
    }
}

/// `n` sequential dials to `target(i)` through the server `pid`.
async fn dial_series(uds: &Path, pid: u32, n: usize, target: impl Fn(usize) -> String) -> Dials {
    let mut d = Dials::default();
    let ns0 = run_ns(pid);
    for i in 0..n {
        match tokio::time::timeout(Duration::from_secs(10), connect_dial(uds, &target(i))).await {
            Ok(Ok(t)) => d.ms.push(t.as_secs_f64() * 1e3),
            Ok(Err(e)) => {
                d.failed += 1;
                d.first_error.get_or_insert(format!("{e:#}"));
            }
            Err(_) => {
                d.failed += 1;
                d.first_error.get_or_insert("timed out".into());
            }
        }
    }
    d.server_us = run_ns(pid).saturating_sub(ns0) as f64 / 1e3 / n.max(1) as f64;
    d.ms = sorted(std::mem::take(&mut d.ms));
    d
}

fn rnd(n: usize) -> usize {
    use rand::Rng;
    rand::rng().random_range(0..n.max(1))
}

struct Res {
    imp: String,
    spoke: bool,
    n: usize,
    rss_before: u64,
    rss_idle: u64,
    connect_s: f64,
    cpu_per_connect_ms: f64,
    connect_failures: u64,
    connect_overflows: u64,
    idle_cpu_s_per_min: f64,
    dest: Dials,
    default: Dials,
    one_agent: Dials,
    storm: Option<Storm>,
}

impl Res {
    fn kib_per_agent(&self) -> f64 {
        self.rss_idle.saturating_sub(self.rss_before) as f64 / 1024.0 / self.n.max(1) as f64
    }
}

struct Storm {
    back_s: f64,
    ready_s: f64,
    peak_rss: u64,
    settled_rss: u64,
    cpu_per_connect_ms: f64,
    failures: u64,
    overflows: u64,
    dials: Dials,
}

async fn one(ctx: &Ctx, imp: &Impl, n: usize, tls: &Arc<ClientConfig>) -> Result<Res> {
    let id = format!("fleet-{}-{n}", if imp.spoke { "spoke" } else { "upstream" });
    let mut server = ServerProc::start(ctx, imp, &id, 1)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = rss(server.pid())?;
    let cpu0 = cpu_secs(server.pid())?;
    let ovf0 = listen_overflows();
    let mut cfg = FleetConfig::new(server.agent_addr, tls.clone());
    cfg.first_connects = Some(ctx.size.fleet_first_connects);
    let fleet = Fleet::start(cfg, n);
    let connect = fleet
        .wait_complete(n as u64, Duration::from_secs(120 + n as u64 / 50))
        .await
        .context("connecting the fleet")?;
    let cpu1 = cpu_secs(server.pid())?;
    let connect_overflows = listen_overflows() - ovf0;
    let connect_failures = fleet.stats.failures.load(Ordering::Relaxed);
    ctx.say(&format!(
        "   {} × {n}: all connected in {:.2} s, server CPU {:.3} ms per connect, {connect_failures} failed attempts, {connect_overflows} listen overflows",
        imp.name,
        connect.as_secs_f64(),
        (cpu1 - cpu0) * 1e3 / n as f64
    ));
    tokio::time::sleep(ctx.size.fleet_idle.min(Duration::from_secs(3))).await;
    let rss_idle = rss(server.pid())?;
    let idle_cpu = if n > 1 {
        let c0 = cpu_secs(server.pid())?;
        let t = Instant::now();
        tokio::time::sleep(ctx.size.fleet_idle).await;
        (cpu_secs(server.pid())? - c0) / t.elapsed().as_secs_f64() * 60.0
    } else {
        f64::NAN
    };
    let dials = ctx.size.fleet_dials;
    let prefix = "node-";
    let pid = server.pid();
    let dest = dial_series(&server.uds, pid, dials, |_| {
        format!("{}:10250", agent_host(prefix, rnd(n)))
    })
    .await;
    let default = dial_series(&server.uds, pid, dials, |_| "unnamed.fleet:443".to_string()).await;
    // Every dial to one agent: its state stays in cache, unlike a random agent's.
    let one_agent = dial_series(&server.uds, pid, dials, |_| {
        format!("{}:10250", agent_host(prefix, 0))
    })
    .await;
    ctx.say(&format!(
        "   {} × {n}: {} kiB RSS per idle agent, idle CPU {:.3} s/min; dial p50/p99 destHost {:.3}/{:.3} ms, default {:.3}/{:.3} ms ({} + {} failed)",
        imp.name,
        num((rss_idle.saturating_sub(rss_before)) as f64 / 1024.0 / n as f64),
        idle_cpu,
        dest.p(50.0),
        dest.p(99.0),
        default.p(50.0),
        default.p(99.0),
        dest.failed,
        default.failed
    ));
    let storm_res = if n > 1 {
        Some(storm(ctx, &mut server, &fleet, n, rss_idle).await?)
    } else {
        None
    };
    drop(fleet);
    drop(server);
    tokio::time::sleep(Duration::from_secs(1)).await;
    Ok(Res {
        imp: imp.name.clone(),
        spoke: imp.spoke,
        n,
        rss_before,
        rss_idle,
        connect_s: connect.as_secs_f64(),
        cpu_per_connect_ms: (cpu1 - cpu0) * 1e3 / n as f64,
        connect_failures,
        connect_overflows,
        idle_cpu_s_per_min: idle_cpu,
        dest,
        default,
        one_agent,
        storm: storm_res,
    })
}

async fn storm(
    ctx: &Ctx,
    server: &mut ServerProc,
    fleet: &Fleet,
    n: usize,
    rss_idle: u64,
) -> Result<Storm> {
    let s = &fleet.stats;
    let connects0 = s.connects.load(Ordering::Relaxed);
    let failures0 = s.failures.load(Ordering::Relaxed);
    let ovf0 = listen_overflows();
    let t = Instant::now();
    server.kill();
    server.restart()?;
    let peak = PeakRss::start(server.pid());
    let pid = server.pid();
    // Dials through the restarting server, every 10 ms, to any agent.
    let uds = server.uds.clone();
    let done = Arc::new(AtomicBool::new(false));
    let probe = {
        let done = done.clone();
        tokio::spawn(async move {
            let mut d = Dials::default();
            let mut seen_ok = false;
            while !done.load(Ordering::Relaxed) {
                match tokio::time::timeout(
                    Duration::from_secs(5),
                    connect_dial(&uds, "unnamed.fleet:443"),
                )
                .await
                {
                    Ok(Ok(x)) => {
                        seen_ok = true;
                        d.ms.push(x.as_secs_f64() * 1e3);
                    }
                    Ok(Err(e)) if seen_ok => {
                        d.failed += 1;
                        d.first_error.get_or_insert(format!("{e:#}"));
                    }
                    Err(_) if seen_ok => d.failed += 1,
                    _ => {}
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            d.ms = sorted(std::mem::take(&mut d.ms));
            d
        })
    };
    let ready_s = {
        let mut up = None;
        let limit = Duration::from_secs(180);
        while t.elapsed() < limit {
            if server.uds.exists()
                && matches!(http_get(None, server.health, "/healthz"), Ok((200, _)))
            {
                up = Some(t.elapsed().as_secs_f64());
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        up.context("restarted server never came up")?
    };
    let back = fleet
        .wait_complete(connects0 + n as u64, Duration::from_secs(180))
        .await;
    let back_s = t.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let dials = probe.await.unwrap_or_default();
    let cpu = cpu_secs(pid)?;
    let overflows = listen_overflows() - ovf0;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let peak_rss = peak.stop().max(vm_hwm(pid));
    let settled_rss = rss(pid)?;
    back.context("reconnect storm")?;
    let st = Storm {
        back_s,
        ready_s,
        peak_rss,
        settled_rss,
        cpu_per_connect_ms: cpu * 1e3 / n as f64,
        failures: s.failures.load(Ordering::Relaxed) - failures0,
        overflows,
        dials,
    };
    ctx.say(&format!(
        "   {} × {n}: storm: all back {:.2} s after the kill (server up after {:.2} s), {} failed attempts, {} listen overflows, peak RSS {:.1} MiB (idle before {:.1}), {:.3} ms CPU per reconnect; dials meanwhile {} ok / {} failed",
        server.name,
        st.back_s,
        st.ready_s,
        st.failures,
        st.overflows,
        mib(st.peak_rss),
        mib(rss_idle),
        st.cpu_per_connect_ms,
        st.dials.ms.len(),
        st.dials.failed
    ));
    Ok(st)
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

struct Ha {
    n: usize,
    connect_s: f64,
    dials_before: usize,
    ok_after_kill: usize,
    /// Every failed dial after the kill: ms after the kill it started, the server it went to
    /// (2 is the one killed), and its error.
    failures: Vec<(f64, usize, String)>,
    back_after_restart_s: f64,
    ready_after_restart_s: f64,
    sync_interval_s: f64,
}

impl Ha {
    fn failed_after_kill(&self) -> usize {
        self.failures.len()
    }

    /// When the last failed dial started, ms after the kill (0 when none failed).
    fn fail_window_ms(&self) -> f64 {
        self.failures.iter().map(|f| f.0).fold(0.0_f64, f64::max)
    }
}

/// Three servers behind one address; SIGKILL one under load, then restart it.
async fn ha(ctx: &Ctx, spoke: &Impl, n: usize, tls: &Arc<ClientConfig>) -> Result<Ha> {
    let mut servers = Vec::new();
    for i in 0..3 {
        servers.push(ServerProc::start(ctx, spoke, &format!("fleet-ha-{i}"), 3)?);
    }
    let lb = Balancer::start(servers.iter().map(|s| s.agent_addr).collect()).await?;
    let mut cfg = FleetConfig::new(lb.addr, tls.clone());
    cfg.first_connects = Some(ctx.size.fleet_first_connects);
    let sync = cfg.sync_interval;
    let fleet = Fleet::start(cfg, n);
    let connect = fleet
        .wait_complete(3 * n as u64, Duration::from_secs(180))
        .await
        .context("HA fleet: connecting")?;
    ctx.say(&format!(
        "   HA: {n} agents × 3 servers connected in {:.2} s",
        connect.as_secs_f64()
    ));
    // The dial load: every 5 ms a dial to a random agent (destHost), through the next server
    // an active check says is ready: GET /readyz every 100 ms, as the deployed readiness probe
    // does. A TCP connect to the health port would pass a restarted server before any agent
    // is back on it, and every dial sent to it then fails.
    let up: Arc<Vec<AtomicBool>> = Arc::new((0..3).map(|_| AtomicBool::new(true)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let checker = {
        let (up, stop) = (up.clone(), stop.clone());
        let ports: Vec<u16> = servers.iter().map(|s| s.health).collect();
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                for (i, p) in ports.iter().enumerate() {
                    let ready = http_get_async(*p, "/readyz");
                    let ok = tokio::time::timeout(Duration::from_millis(100), ready)
                        .await
                        .is_ok_and(|r| matches!(r, Ok((200, _))));
                    up[i].store(ok, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    // (start time, server, error if it failed)
    type Log = Arc<Mutex<Vec<(Instant, usize, Option<String>)>>>;
    let log: Log = Arc::new(Mutex::new(Vec::new()));
    let load = {
        let (up, stop, log) = (up.clone(), stop.clone(), log.clone());
        let uds: Vec<PathBuf> = servers.iter().map(|s| s.uds.clone()).collect();
        tokio::spawn(async move {
            let mut next = 0usize;
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let Some(i) = (0..3)
                    .map(|k| (next + k) % 3)
                    .find(|&i| up[i].load(Ordering::Relaxed))
                else {
                    continue;
                };
                next = i + 1;
                let (uds, log) = (uds[i].clone(), log.clone());
                let target = format!("{}:10250", agent_host("node-", rnd(n)));
                tokio::spawn(async move {
                    let t = Instant::now();
                    let r =
                        tokio::time::timeout(Duration::from_secs(5), connect_dial(&uds, &target))
                            .await;
                    let e = match r {
                        Ok(Ok(_)) => None,
                        Ok(Err(e)) => Some(format!("{e:#}")),
                        Err(_) => Some("timed out".into()),
                    };
                    if let Ok(mut l) = log.lock() {
                        l.push((t, i, e));
                    }
                });
            }
        })
    };
    tokio::time::sleep(ctx.size.fleet_idle.min(Duration::from_secs(3))).await;
    let t_kill = Instant::now();
    servers[2].kill();
    tokio::time::sleep(ctx.size.fleet_idle.min(Duration::from_secs(5))).await;
    let connects0 = fleet.stats.connects.load(Ordering::Relaxed);
    let t_restart = Instant::now();
    servers[2].restart()?;
    servers[2].wait_up()?;
    let ready_after_restart_s = t_restart.elapsed().as_secs_f64();
    let back = fleet
        .wait_complete(connects0 + n as u64, Duration::from_secs(120))
        .await
        .context("HA: agents back on the restarted server")?;
    let back_after_restart_s = back.as_secs_f64() + ready_after_restart_s;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let _ = load.await;
    let _ = checker.await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let log = log.lock().map(|l| l.clone()).unwrap_or_default();
    let before = log.iter().filter(|(t, _, _)| *t < t_kill).count();
    let after: Vec<_> = log.iter().filter(|(t, _, _)| *t >= t_kill).collect();
    let failures: Vec<(f64, usize, String)> = after
        .iter()
        .filter_map(|(t, i, e)| {
            let ms = t.duration_since(t_kill).as_secs_f64() * 1e3;
            e.as_ref().map(|e| (ms, *i, e.clone()))
        })
        .collect();
    let failed_before = log
        .iter()
        .filter(|(t, _, e)| *t < t_kill && e.is_some())
        .count();
    if failed_before > 0 {
        bail!("{failed_before} dials failed before the kill");
    }
    let r = Ha {
        n,
        connect_s: connect.as_secs_f64(),
        dials_before: before,
        ok_after_kill: after.len() - failures.len(),
        back_after_restart_s,
        ready_after_restart_s,
        sync_interval_s: sync.as_secs_f64(),
        failures,
    };
    for (ms, i, e) in &r.failures {
        ctx.say(&format!(
            "   HA: dial through server {i} at {ms:.0} ms failed: {e}"
        ));
    }
    ctx.say(&format!(
        "   HA: after SIGKILL of one server {} dials failed (last {:.0} ms after the kill), {} succeeded; restarted server up in {:.2} s, all {n} agents back on it {:.2} s after the restart",
        r.failed_after_kill(), r.fail_window_ms(), r.ok_after_kill, r.ready_after_restart_s, r.back_after_restart_s
    ));
    drop(fleet);
    drop(lb);
    drop(servers);
    Ok(r)
}

pub async fn run(ctx: &Ctx) -> Result<Section> {
    let mut sec = Section::new("fleet", super::title("fleet"));
    let tls = agent_tls(ctx)?;
    let mut imps = vec![Impl {
        name: "spoke-server".into(),
        bin: ctx.bin.join("spoke-server"),
        spoke: true,
    }];
    if let Some(b) = &ctx.server_bin {
        imps.push(Impl {
            name: format!(
                "{} (--server-bin)",
                b.file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default()
            ),
            bin: b.clone(),
            spoke: false,
        });
    }
    let mut res: Vec<Res> = Vec::new();
    for imp in &imps {
        for &n in std::iter::once(&1).chain(ctx.size.fleet.iter()) {
            match one(ctx, imp, n, &tls).await {
                Ok(r) => res.push(r),
                Err(e) => sec.skipped.push(format!("{} × {n}: {e:#}", imp.name)),
            }
        }
    }
    let ha_res = match ha(ctx, &imps[0], ctx.size.fleet_ha, &tls).await {
        Ok(h) => Some(h),
        Err(e) => {
            sec.skipped.push(format!("HA: {e:#}"));
            None
        }
    };
    anyhow::ensure!(!res.is_empty(), "{}", sec.skipped.join("; "));
    report(ctx, &mut sec, &res, ha_res.as_ref(), imps.len() > 1);
    Ok(sec)
}

fn report(ctx: &Ctx, sec: &mut Section, res: &[Res], ha: Option<&Ha>, upstream_ran: bool) {
    let mut md = format!(
        "One server (`--mode=http-connect` over a Unix socket, `--proxy-strategies=destHost,default`, upstream's flags only) and N \
         simulated agents in the bench process (`tests/src/fleet.rs`): each its own TCP + mTLS connection from one of 64 loopback \
         source addresses and its own `/AgentService/Connect` stream with upstream's metadata (`agentid`, `agentidentifiers` \
         `host=node-i.fleet&ipv4=…`), answering DIAL_REQ and CLOSE_REQ. At most {} first connects in flight (a DaemonSet rolls out \
         gradually). Per-agent RSS = (server RSS with all N idle − RSS before) / N, 3 s after the last connect. Idle CPU over {:.0} s. \
         Dials: {} sequential HTTP CONNECTs each way, to a random agent by name (`destHost`) and to a name no agent has (`default`), \
         timed to the 200. Storm: SIGKILL, the server restarted at once; agents retry at their next 1 s sync tick, then back off \
         ×1.5 with 10 % jitter up to 10 s (upstream's agent); time from the kill until every agent is connected again; peak RSS \
         sampled every 20 ms and VmHWM; dials through the restarting server every 10 ms (failures counted once one succeeded).\n\n\
         | server | agents | connect all s | server CPU ms/connect | failed attempts | listen overflows | RSS before MiB | KiB/idle agent | idle CPU s/min | destHost p50/p99 ms | default p50/p99 ms | storm: all back s | storm: failed attempts | storm: overflows | storm: peak MiB | settled MiB | CPU ms/reconnect | dials during storm ok/failed, p99 ms |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        ctx.size.fleet_first_connects,
        ctx.size.fleet_idle.as_secs_f64(),
        ctx.size.fleet_dials
    );
    for r in res {
        let storm = match &r.storm {
            Some(s) => format!(
                "{:.2} | {} | {} | {:.1} | {:.1} | {:.3} | {}/{}, {:.2}",
                s.back_s,
                s.failures,
                s.overflows,
                mib(s.peak_rss),
                mib(s.settled_rss),
                s.cpu_per_connect_ms,
                s.dials.ms.len(),
                s.dials.failed,
                s.dials.p(99.0)
            ),
            None => "— | — | — | — | — | — | —".into(),
        };
        md.push_str(&format!(
            "| {} | {} | {:.2} | {:.3} | {} | {} | {:.1} | {} | {} | {:.3}/{:.3} | {:.3}/{:.3} | {} |\n",
            r.imp,
            r.n,
            r.connect_s,
            r.cpu_per_connect_ms,
            r.connect_failures,
            r.connect_overflows,
            mib(r.rss_before),
            if r.n > 1 { num(r.kib_per_agent()) } else { "—".into() },
            if r.idle_cpu_s_per_min.is_finite() { format!("{:.3}", r.idle_cpu_s_per_min) } else { "—".into() },
            r.dest.p(50.0),
            r.dest.p(99.0),
            r.default.p(50.0),
            r.default.p(99.0),
            storm
        ));
    }
    md.push_str(
        "\nWhere a dial's time goes: the server's CPU per dial (its threads' run time over each series, from \
         `/proc/<pid>/task/*/schedstat`), and a third series of dials that all go to one agent, whose state (the server's \
         and the simulated agent's) stays in cache.\n\n\
         | server | agents | server CPU µs/dial destHost | default | one agent | one agent p50/p99 ms |\n|---|---|---|---|---|---|\n",
    );
    for r in res {
        md.push_str(&format!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.3}/{:.3} |\n",
            r.imp,
            r.n,
            r.dest.server_us,
            r.default.server_us,
            r.one_agent.server_us,
            r.one_agent.p(50.0),
            r.one_agent.p(99.0)
        ));
    }
    if let Some(h) = ha {
        md.push_str(&format!(
            "\n**HA**: three spoke-servers (`--server-count=3`) behind one address (a least-connections TCP balancer that skips a \
             backend refusing connections), {} agents holding a stream to each; a dial every 5 ms to a random agent (`destHost`), \
             sent to the servers in turn, skipping one that an active check (`GET /readyz` every 100 ms, as the deployed readiness probe) finds not ready. {} dials \
             before the kill, none failed. After SIGKILL of one server: **{} dials failed, the last one started {:.0} ms after \
             the kill**, {} succeeded. Restarted: up in {:.2} s, every agent back on it {:.2} s after the restart (sync interval \
             {:.0} s, jittered up to 10 %).\n",
            h.n,
            h.dials_before,
            h.failed_after_kill(),
            h.fail_window_ms(),
            h.ok_after_kill,
            h.ready_after_restart_s,
            h.back_after_restart_s,
            h.sync_interval_s
        ));
        for (ms, i, e) in h.failures.iter().take(10) {
            md.push_str(&format!(
                "- failed: a dial through server {i}{} at {ms:.0} ms: `{}`\n",
                if *i == 2 { " (the one killed)" } else { "" },
                e.replace('`', "'")
            ));
        }
    }
    if !upstream_ran {
        md.push_str(&format!(
            "\nUpstream was not run here (no `--server-bin`). For comparison, measured earlier on these machines with upstream v0.36 \
             (anchors.md section D, **an earlier measurement, not this run**): server RSS per idle agent 86 / 81 / 80 KiB at 1k / \
             5k / 10k agents; server CPU per connect 0.71–0.75 ms, flat; reconnect storm at 10k {UPSTREAM_STORM_10K_EARLIER:.1}–9.0 s.\n"
        ));
    }
    let spoke: Vec<&Res> = res.iter().filter(|r| r.spoke).collect();
    let fleet_rows: Vec<&&Res> = spoke.iter().filter(|r| r.n > 1).collect();
    for r in &fleet_rows {
        let k = r.kib_per_agent();
        sec.floors.push(Floor::new(
            format!("server RSS per idle agent ({})", r.n),
            format!("{k:.1} KiB"),
            "≤ 32 KiB",
            Some(k <= 32.0),
        ));
    }
    for r in &fleet_rows {
        sec.floors.push(Floor::new(
            format!("server CPU per connect ({})", r.n),
            format!("{:.3} ms", r.cpu_per_connect_ms),
            "≤ 0.4 ms",
            Some(r.cpu_per_connect_ms <= 0.4),
        ));
        if let Some(s) = &r.storm {
            sec.floors.push(Floor::new(
                format!("server CPU per reconnect in the storm ({})", r.n),
                format!("{:.3} ms", s.cpu_per_connect_ms),
                "≤ 0.4 ms",
                Some(s.cpu_per_connect_ms <= 0.4),
            ));
            let bound = r.rss_idle + STORM_BOUND_EXTRA;
            sec.floors.push(Floor::new(
                format!("storm peak RSS ({})", r.n),
                format!("{:.1} MiB", mib(s.peak_rss)),
                format!(
                    "≤ {:.1} MiB (idle with all agents + accept limits)",
                    mib(bound)
                ),
                Some(s.peak_rss <= bound),
            ));
        }
    }
    let first = fleet_rows
        .iter()
        .find(|r| r.n >= 1000)
        .or(fleet_rows.first());
    let last = fleet_rows.last();
    if let (Some(a), Some(b)) = (first, last) {
        if a.n != b.n {
            let ratio = b.cpu_per_connect_ms / a.cpu_per_connect_ms;
            sec.floors.push(Floor::new(
                format!("connect cost {} vs {}", b.n, a.n),
                format!(
                    "{ratio:.2}× ({:.3} vs {:.3} ms)",
                    b.cpu_per_connect_ms, a.cpu_per_connect_ms
                ),
                "≤ 1.2×",
                Some(ratio <= 1.2),
            ));
        }
    }
    let one_agent = spoke.iter().find(|r| r.n == 1);
    if let (Some(o), Some(b)) = (one_agent, last) {
        for (what, x, y) in [
            ("destHost", &b.dest, &o.dest),
            ("default", &b.default, &o.default),
        ] {
            let ratio = x.p(99.0) / y.p(99.0);
            sec.floors.push(Floor::new(
                format!("dial p99 {what}, {} agents vs 1", b.n),
                format!("{ratio:.2}× ({:.3} vs {:.3} ms)", x.p(99.0), y.p(99.0)),
                "≤ 1.5×",
                Some(ratio <= 1.5 && x.failed == 0),
            ));
        }
    }
    // Storm against upstream: same run when given, else the earlier 10k figure.
    if let Some(b) = last {
        if let Some(s) = &b.storm {
            let up = res
                .iter()
                .find(|r| !r.spoke && r.n == b.n)
                .and_then(|r| r.storm.as_ref());
            match up {
                Some(u) => {
                    let ratio = s.back_s / u.back_s;
                    sec.floors.push(Floor::new(
                        format!("reconnect storm ({}) vs upstream, same run", b.n),
                        format!("{ratio:.2}× ({:.2} vs {:.2} s)", s.back_s, u.back_s),
                        "≤ 0.6×",
                        Some(ratio <= 0.6),
                    ));
                }
                None if b.n == 10_000 => {
                    let ratio = s.back_s / UPSTREAM_STORM_10K_EARLIER;
                    sec.floors.push(Floor::new(
                        "reconnect storm (10000) vs upstream's earlier 8.0 s (anchors D, not this run)",
                        format!("{ratio:.2}× ({:.2} s)", s.back_s),
                        "≤ 0.6×",
                        Some(ratio <= 0.6),
                    ));
                }
                None => sec.floors.push(Floor::new(
                    format!("reconnect storm ({})", b.n),
                    format!("{:.2} s", s.back_s),
                    "(reported; upstream not run)",
                    None,
                )),
            }
        }
    }
    if let Some(h) = ha {
        sec.floors.push(Floor::new(
            "HA: dials failing after SIGKILL of one of three servers",
            format!(
                "{} failed, last {:.0} ms after the kill",
                h.failed_after_kill(),
                h.fail_window_ms()
            ),
            "≤ 1000 ms",
            Some(h.fail_window_ms() <= 1000.0),
        ));
        let bound = h.sync_interval_s * 1.1 + 0.5;
        sec.floors.push(Floor::new(
            "HA: agents back on the restarted server",
            format!("{:.2} s after the restart", h.back_after_restart_s),
            format!("≤ {bound:.2} s (one jittered sync interval + 0.5 s)"),
            Some(h.back_after_restart_s <= bound),
        ));
    }
    sec.md = md;
    let bars: Vec<Bar> = res
        .iter()
        .filter(|r| r.n > 1)
        .map(|r| Bar::new(format!("{}, {}", r.imp, r.n), r.kib_per_agent(), !r.spoke))
        .collect();
    sec.chart(
        "fleet_rss.svg",
        "server RSS per idle agent",
        svg::bars(
            "Server RSS per idle agent",
            "KiB per agent (lower is better)",
            &bars,
            Some((32.0, "floor 32 KiB")),
        ),
    );
    let bars: Vec<Bar> = res
        .iter()
        .filter_map(|r| {
            r.storm
                .as_ref()
                .map(|s| Bar::new(format!("{}, {}", r.imp, r.n), s.back_s, !r.spoke))
        })
        .collect();
    sec.chart(
        "fleet_storm.svg",
        "reconnect storm",
        svg::bars(
            "Reconnect storm: kill to all agents back",
            "seconds (lower is better)",
            &bars,
            None,
        ),
    );
    let dials = |d: &Dials| json!({"p50_ms": d.p(50.0), "p99_ms": d.p(99.0), "ok": d.ms.len(), "failed": d.failed, "first_error": d.first_error, "server_cpu_us_per_dial": d.server_us});
    sec.json = json!({
        "first_connects_in_flight": ctx.size.fleet_first_connects,
        "rows": res.iter().map(|r| json!({
            "server": r.imp, "agents": r.n, "connect_s": r.connect_s, "cpu_ms_per_connect": r.cpu_per_connect_ms,
            "connect_failures": r.connect_failures, "listen_overflows": r.connect_overflows,
            "rss_before": r.rss_before, "rss_idle": r.rss_idle, "kib_per_idle_agent": r.kib_per_agent(),
            "idle_cpu_s_per_min": if r.idle_cpu_s_per_min.is_finite() { json!(r.idle_cpu_s_per_min) } else { json!(null) },
            "dial_desthost": dials(&r.dest), "dial_default": dials(&r.default), "dial_one_agent": dials(&r.one_agent),
            "storm": r.storm.as_ref().map(|s| json!({
                "all_back_s": s.back_s, "server_up_s": s.ready_s, "peak_rss": s.peak_rss, "settled_rss": s.settled_rss,
                "cpu_ms_per_reconnect": s.cpu_per_connect_ms, "failed_attempts": s.failures, "listen_overflows": s.overflows,
                "dials": dials(&s.dials),
            })),
        })).collect::<Vec<_>>(),
        "ha": ha.map(|h| json!({
            "agents": h.n, "connect_s": h.connect_s, "dials_before_kill": h.dials_before, "failed_after_kill": h.failed_after_kill(),
            "fail_window_ms": h.fail_window_ms(), "ok_after_kill": h.ok_after_kill,
            "failures": h.failures.iter().map(|(ms, i, e)| json!({"ms_after_kill": ms, "server": i, "error": e})).collect::<Vec<_>>(),
            "restart_up_s": h.ready_after_restart_s, "all_back_after_restart_s": h.back_after_restart_s,
        })),
        "skipped": sec.skipped,
    });
}
