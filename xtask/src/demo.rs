//! `cargo xtask demo`: the whole path on this machine, as a cluster would run it.
//! kube-apiserver's role is played here: HTTP CONNECT over mTLS to spoke-server, exactly
//! the bytes its HTTPConnect egress sends, then TLS to a kubelet-like backend through the
//! tunnel. Certificates are generated on the fly.
//!
//! The agent runs with its eBPF fast path (set up by the light xtask before the release
//! build, see `build::demo_release`), which is checked on the agent's `/status`; the same
//! bulk transfers then run through an agent restarted with `--ebpf=off`, and the agent's
//! CPU per GiB (utime+stime from /proc/PID/stat, as the bench measures it) is compared.
//! Ctrl-C at any point stops every process this started (their kernel programs are links
//! owned by the agent, so they go with it).
use crate::bench::procs::{free_port, http_get_async as http_get, metric_sum};
use crate::bench::stats::cpu_secs;
use anyhow::{bail, Context, Result};
use spoke_tests::certs::{CertKey, Pki};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Bytes of each bulk transfer (one download, one upload per agent): enough for CPU
/// readings in clock ticks to mean something, small enough to keep the demo quick.
const BULK_BYTES: u64 = 512 << 20;
const GIB: f64 = (1u64 << 30) as f64;
const MIB: f64 = (1u64 << 20) as f64;
/// How long a stopped process gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

struct Proc {
    name: &'static str,
    child: Child,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SIGTERM so both binaries take their shutdown path; a spoke-agent drains on the first
        // (it keeps serving, as upstream's does) and exits on the second. Then make sure.
        let mut how = " (killed after 5 s)";
        'stop: for grace in [Duration::from_secs(1), STOP_GRACE] {
            // SAFETY: kill has no memory preconditions; the pid is our unreaped child.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    how = "";
                    break 'stop;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if !how.is_empty() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        println!("   stopped {} (pid {}){how}", self.name, self.child.id());
    }
}

/// Starts `bin` in its own process group (a Ctrl-C in the terminal reaches only this
/// process, which then stops the children in order) that dies with this process.
fn spawn(name: &'static str, bin: &Path, args: &[String], log: &Path) -> Result<Proc> {
    use std::os::unix::process::CommandExt;
    let log_file =
        std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let parent = std::process::id() as i32;
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .process_group(0);
    // SAFETY: prctl, getppid and _exit are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    Ok(Proc { name, child })
}

/// Ctrl-C before the demo reached its serving loop.
#[derive(Debug)]
struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

pub fn run(once: bool) -> Result<()> {
    let (bin, ebpf_off) = crate::build::demo_release()?;
    let dir = std::env::temp_dir().join(format!("spoke-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        // From here on Ctrl-C is ours: it stops the demo, which stops what it started.
        let stop = CancellationToken::new();
        let on_signal = stop.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                on_signal.cancel();
            }
        });
        demo(&bin, &dir, once, ebpf_off.as_deref(), &stop).await
    });
    drop(rt);
    let _ = std::fs::remove_dir_all(&dir);
    match result {
        Err(e) if e.is::<Interrupted>() => {
            println!("   stopped cleanly");
            Ok(())
        }
        r => r,
    }
}

/// What runs: the server stays, the agent is restarted with another `--ebpf` mode.
/// Field order is drop order: the agent stops before the server.
#[derive(Default)]
struct Cluster {
    agent: Option<Agent>,
    server: Option<Proc>,
}

struct Agent {
    proc: Proc,
    health: u16,
    admin: u16,
}

impl Agent {
    async fn metrics(&self) -> String {
        http_get(self.health, "/metrics")
            .await
            .map(|(_, m)| m)
            .unwrap_or_default()
    }
}

/// Everything the agent needs but its ports and `--ebpf`.
struct Setup {
    bin: PathBuf,
    dir: PathBuf,
    agent_args: Vec<String>,
    s_health: u16,
    kubelet: SocketAddr,
}

async fn demo(
    bin: &Path,
    dir: &Path,
    once: bool,
    ebpf_off: Option<&str>,
    stop: &CancellationToken,
) -> Result<()> {
    let mut cl = Cluster::default();
    let r = tokio::select! {
        r = show(&mut cl, bin, dir, once, ebpf_off) => r,
        _ = stop.cancelled() => {
            println!("\n== Ctrl-C: stopping");
            Err(Interrupted.into())
        }
    };
    let (client, setup) = r?;
    if !once {
        println!("\n== running; a logs request every 5 s. Ctrl-C stops everything.");
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        tick.tick().await;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {
                    let t = Instant::now();
                    match client.get(setup.kubelet, "/containerLogs/default/demo/app").await {
                        Ok(r) => println!("   {} in {}", r.lines().next().unwrap_or(""), ms(t.elapsed())),
                        Err(e) => println!("   request failed: {e:#}"),
                    }
                }
            }
        }
        println!("\n== Ctrl-C: stopping");
        if let Some(agent) = &cl.agent {
            print_figures(setup.s_health, agent).await;
        }
    }
    drop(cl);
    Ok(())
}

/// Everything up to the serving loop; cancelled as a whole by Ctrl-C (`cl` keeps what
/// runs, so it is stopped either way).
async fn show(
    cl: &mut Cluster,
    bin: &Path,
    dir: &Path,
    once: bool,
    ebpf_off: Option<&str>,
) -> Result<(Client, Setup)> {
    println!(
        "== certificates (CA, server, agent, kube-apiserver client) in {}",
        dir.display()
    );
    let pki = Pki::generate(dir);
    let ca = &pki.main;
    let kubelet = serve_kubelet(&ca.server).await?;
    println!("== kubelet-like HTTPS backend on {kubelet}");
    let [frontend, agent_port, s_health, s_admin] =
        [free_port(), free_port(), free_port(), free_port()];
    let p = |x: &PathBuf| x.display().to_string();
    let server_args = vec![
        "--mode=http-connect".into(),
        "--server-bind-address=127.0.0.1".into(),
        format!("--server-port={frontend}"),
        format!("--server-cert={}", p(&ca.server.cert)),
        format!("--server-key={}", p(&ca.server.key)),
        format!("--server-ca-cert={}", p(&ca.ca)),
        "--agent-bind-address=127.0.0.1".into(),
        format!("--agent-port={agent_port}"),
        format!("--cluster-cert={}", p(&ca.server.cert)),
        format!("--cluster-key={}", p(&ca.server.key)),
        format!("--cluster-ca-cert={}", p(&ca.ca)),
        "--health-bind-address=127.0.0.1".into(),
        format!("--health-port={s_health}"),
        format!("--admin-port={s_admin}"),
        "--server-id=demo-server".into(),
        "--proxy-strategies=destHost,default".into(),
        "--log-format=text".into(),
    ];
    let agent_args = vec![
        format!("--ca-cert={}", p(&ca.ca)),
        format!("--agent-cert={}", p(&ca.agent.cert)),
        format!("--agent-key={}", p(&ca.agent.key)),
        "--proxy-server-host=127.0.0.1".into(),
        format!("--proxy-server-port={agent_port}"),
        "--agent-id=demo-node".into(),
        "--agent-identifiers=host=demo-node&ipv4=127.0.0.1".into(),
        "--health-server-host=127.0.0.1".into(),
        "--log-format=text".into(),
    ];
    let setup = Setup {
        bin: bin.to_path_buf(),
        dir: dir.to_path_buf(),
        agent_args,
        s_health,
        kubelet,
    };
    cl.server = Some(spawn(
        "spoke-server",
        &bin.join("spoke-server"),
        &server_args,
        &dir.join("server.log"),
    )?);
    println!("== spoke-server: frontend (HTTP CONNECT, mTLS) 127.0.0.1:{frontend}, agents :{agent_port}, health :{s_health}");
    let agent = cl.agent.insert(start_agent(&setup, "auto").await?);
    wait_ready(s_health, "spoke-server", &dir.join("server.log")).await?;
    let fast = fast_path(agent).await?;
    match (&fast, ebpf_off) {
        (FastPath::On(detail), _) => println!("   eBPF fast path ON: {detail} (agent /status)"),
        (FastPath::Off(why), setup_why) => {
            println!("   eBPF fast path OFF (agent /status): {why}");
            if let Some(s) = setup_why {
                println!("   set-up: {s}");
            }
            println!("   the agent relays in userspace: the tunnel works the same, without the sockmap shortcut");
        }
    }

    let client = Client::new(&pki, frontend)?;
    println!("\n== kube-apiserver → spoke-server → tunnel → spoke-agent → kubelet");
    let t = Instant::now();
    let logs = client
        .get(kubelet, "/containerLogs/default/demo/app")
        .await?;
    println!(
        "   GET /containerLogs/default/demo/app → {} in {}",
        logs.lines().next().unwrap_or(""),
        ms(t.elapsed())
    );
    for l in logs.split("\r\n\r\n").nth(1).unwrap_or("").lines() {
        println!("   | {l}");
    }

    let on = matches!(fast, FastPath::On(_));
    let label = if on {
        "fast path on"
    } else {
        "userspace relay"
    };
    println!(
        "\n== bulk: {} MiB each way through the tunnel, {label}",
        BULK_BYTES >> 20
    );
    let first = bulk(&client, kubelet, agent).await?;
    let direct = client.direct_download(kubelet, BULK_BYTES).await?;
    if !on {
        print_table(&[(label, &first)], direct, None);
        return Ok((client, setup));
    }

    println!("\n== the same with the agent restarted with --ebpf=off (userspace relay)");
    cl.agent = None;
    let agent = cl.agent.insert(start_agent(&setup, "off").await?);
    let off = bulk(&client, kubelet, agent).await?;
    print_table(
        &[("fast path on", &first), ("--ebpf=off", &off)],
        direct,
        Some(&first),
    );

    if once {
        return Ok((client, setup));
    }
    // The interactive part runs with the fast path again.
    println!("\n== back to the fast path for the rest of the run");
    cl.agent = None;
    let agent = cl.agent.insert(start_agent(&setup, "auto").await?);
    if let FastPath::Off(why) = fast_path(agent).await? {
        println!("   eBPF fast path OFF after the restart: {why}");
    }
    Ok((client, setup))
}

async fn start_agent(setup: &Setup, mode: &str) -> Result<Agent> {
    let (health, admin) = (free_port(), free_port());
    let mut args = setup.agent_args.clone();
    args.extend([
        format!("--health-server-port={health}"),
        format!("--admin-server-port={admin}"),
        format!("--ebpf={mode}"),
        // The kubelet stand-in listens on a free port, not 10250.
        format!("--ebpf-fast-path-ports={}", setup.kubelet.port()),
    ]);
    let log = setup.dir.join(format!("agent-ebpf-{mode}.log"));
    let proc = spawn("spoke-agent", &setup.bin.join("spoke-agent"), &args, &log)?;
    println!(
        "== spoke-agent --ebpf={mode} (pid {}): health :{health}, admin :{admin}",
        proc.pid()
    );
    let agent = Agent {
        proc,
        health,
        admin,
    };
    wait_ready(health, "spoke-agent", &log).await?;
    Ok(agent)
}

enum FastPath {
    On(String),
    Off(String),
}

/// The agent's own word on its fast path (`/status` on its admin port).
async fn fast_path(agent: &Agent) -> Result<FastPath> {
    let (code, body) = http_get(agent.admin, "/status").await?;
    if code != 200 {
        bail!("agent /status answered {code}");
    }
    let v: serde_json::Value = serde_json::from_str(&body).context("agent /status is not JSON")?;
    let fp = &v["ebpf"]["fast_path"];
    let detail = fp["detail"].as_str().unwrap_or("no detail").to_string();
    Ok(match fp["state"].as_str() {
        Some("on") => FastPath::On(detail),
        Some("off") => FastPath::Off(detail),
        Some(state) => FastPath::Off(format!("{state}: {detail}")),
        None => FastPath::Off("agent /status has no eBPF fast-path state".into()),
    })
}

/// One bulk download and one upload through the tunnel, with the agent's CPU around each.
struct Bulk {
    down_mibs: f64,
    up_mibs: f64,
    /// Agent utime+stime per GiB moved.
    down_cpu: f64,
    up_cpu: f64,
    /// sk_msg counters over both transfers.
    redirected: f64,
    pairs: f64,
}

async fn bulk(client: &Client, kubelet: SocketAddr, agent: &Agent) -> Result<Bulk> {
    let pid = agent.proc.pid();
    // Warm up (the agent's first dial, allocations), retried once in case the server still
    // holds the previous agent's stream.
    if client.transfer(kubelet, Dir::Down, 8 << 20).await.is_err() {
        tokio::time::sleep(Duration::from_millis(500)).await;
        client
            .transfer(kubelet, Dir::Down, 8 << 20)
            .await
            .context("warm-up download through the tunnel")?;
    }
    let before = agent.metrics().await;
    let mut figures = [(0.0, 0.0); 2];
    for (i, dir) in [Dir::Down, Dir::Up].into_iter().enumerate() {
        let cpu0 = cpu_secs(pid)?;
        let secs = client.transfer(kubelet, dir, BULK_BYTES).await?;
        let cpu = cpu_secs(pid)? - cpu0;
        let mibs = BULK_BYTES as f64 / MIB / secs;
        let per_gib = cpu / (BULK_BYTES as f64 / GIB);
        println!(
            "   {:<8} {:>4} MiB in {secs:.2} s = {mibs:>5.0} MiB/s; agent CPU {cpu:.2} s",
            dir.name(),
            BULK_BYTES >> 20
        );
        figures[i] = (mibs, per_gib);
    }
    let after = agent.metrics().await;
    let delta = |name: &str| metric_sum(&after, name, "") - metric_sum(&before, name, "");
    Ok(Bulk {
        down_mibs: figures[0].0,
        down_cpu: figures[0].1,
        up_mibs: figures[1].0,
        up_cpu: figures[1].1,
        redirected: delta("spoke_ebpf_redirected_bytes"),
        pairs: delta("spoke_ebpf_socket_pairs"),
    })
}

/// The summary: throughput and agent CPU per GiB for each agent, what sk_msg moved.
fn print_table(rows: &[(&str, &Bulk)], direct: f64, on: Option<&Bulk>) {
    let title = match on {
        Some(_) => "what the fast path did",
        None => "the agent in userspace (fast path off: no on/off comparison)",
    };
    println!(
        "\n== {title} ({} MiB each way through the tunnel, one run each; {})",
        BULK_BYTES >> 20,
        machine_load()
    );
    println!("   {:<16} {:>24}   {:>24}", "", "download", "upload");
    println!(
        "   {:<16} {:>7} {:>16}   {:>7} {:>16}",
        "agent", "MiB/s", "agent CPU s/GiB", "MiB/s", "agent CPU s/GiB"
    );
    for (name, b) in rows {
        println!(
            "   {name:<16} {:>7.0} {:>16.2}   {:>7.0} {:>16.2}",
            b.down_mibs, b.down_cpu, b.up_mibs, b.up_cpu
        );
    }
    if let [(_, a), (_, b)] = rows {
        let change = |on: f64, off: f64| {
            if off > 0.0 {
                format!("{:+.0}%", (on - off) / off * 100.0)
            } else {
                "n/a".into()
            }
        };
        println!(
            "   {:<16} {:>7} {:>16}   {:>7} {:>16}",
            "on vs off",
            change(a.down_mibs, b.down_mibs),
            change(a.down_cpu, b.down_cpu),
            change(a.up_mibs, b.up_mibs),
            change(a.up_cpu, b.up_cpu)
        );
    }
    match on {
        Some(b) if b.redirected > 0.0 => {
            println!(
                "   sk_msg redirected {:.2} GiB ({} bytes: what the agent wrote to the kubelet, the \
                 upload and its TLS framing; the kubelet's side stays on TCP)",
                b.redirected / GIB,
                b.redirected
            );
            println!(
                "   socket to socket between the agent and the kubelet, {} connection pair(s), \
                 without loopback TCP",
                b.pairs
            );
        }
        Some(_) => println!(
            "   sk_msg redirected nothing: the fast path was attached but paired no sockets \
             (see the agent log)"
        ),
        None => {}
    }
    println!("   for reference, a direct TLS download without the tunnel: {direct:.0} MiB/s");
}

/// "load 0.9 on 2 CPUs": other work on the machine moves these figures.
fn machine_load() -> String {
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("load {load} on {cpus} CPUs")
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

async fn wait_ready(port: u16, name: &str, log: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok((code, _)) = http_get(port, "/readyz").await {
            if code == 200 {
                println!("   {name} ready");
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The log goes with the demo's temporary directory: show its end now.
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(8)..].join("\n   | ");
    bail!("{name} not ready after 20 s; the end of its log:\n   | {tail}")
}

async fn print_figures(s_health: u16, agent: &Agent) {
    println!("\n== tunnel figures (from /metrics)");
    let pick = |body: &str, keys: &[&str]| {
        for l in body.lines().filter(|l| !l.starts_with('#')) {
            if keys.iter().any(|k| l.starts_with(k)) {
                println!("   {l}");
            }
        }
    };
    if let Ok((_, m)) = http_get(s_health, "/metrics").await {
        pick(
            &m,
            &[
                "konnectivity_network_proxy_server_ready_backend_connections",
                "konnectivity_network_proxy_server_established_connections",
                "konnectivity_network_proxy_server_dial_duration_seconds_count",
                "konnectivity_network_proxy_server_dial_duration_seconds_sum",
                "spoke_server_bytes_relayed",
            ],
        );
    }
    pick(
        &agent.metrics().await,
        &[
            "konnectivity_network_proxy_agent_open_server_connections",
            "konnectivity_network_proxy_agent_open_endpoint_connections",
            "spoke_agent_bytes_relayed",
            "spoke_agent_flow_control_stalls",
            "spoke_ebpf_program_attached",
            "spoke_ebpf_redirected_bytes",
            "spoke_ebpf_socket_pairs",
        ],
    );
}

#[derive(Clone, Copy)]
enum Dir {
    /// kubelet → kube-apiserver (logs, exec output).
    Down,
    /// kube-apiserver → kubelet (exec input, port-forward).
    Up,
}

impl Dir {
    fn name(self) -> &'static str {
        match self {
            Dir::Down => "download",
            Dir::Up => "upload",
        }
    }
}

/// kube-apiserver's side: mTLS to the proxy, CONNECT, then TLS to the kubelet.
struct Client {
    proxy: tokio_rustls::TlsConnector,
    kubelet: tokio_rustls::TlsConnector,
    frontend: u16,
}

fn tls_client(ca: &Path, id: Option<&CertKey>) -> Result<Arc<rustls::ClientConfig>> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(ca)? {
        roots.add(c?)?;
    }
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots);
    Ok(Arc::new(match id {
        Some(ck) => b.with_client_auth_cert(
            rustls_pki_types::CertificateDer::pem_file_iter(&ck.cert)?.collect::<Result<_, _>>()?,
            rustls_pki_types::PrivateKeyDer::from_pem_file(&ck.key)?,
        )?,
        None => b.with_no_client_auth(),
    }))
}

type Tls = tokio_rustls::client::TlsStream<tokio_rustls::client::TlsStream<TcpStream>>;

impl Client {
    fn new(pki: &Pki, frontend: u16) -> Result<Self> {
        Ok(Self {
            proxy: tls_client(&pki.main.ca, Some(&pki.main.frontend))?.into(),
            kubelet: tls_client(&pki.main.ca, None)?.into(),
            frontend,
        })
    }

    async fn tunnel(&self, target: SocketAddr) -> Result<Tls> {
        let tcp = TcpStream::connect(("127.0.0.1", self.frontend)).await?;
        let mut proxy = self.proxy.connect("localhost".try_into()?, tcp).await?;
        // Exactly what kube-apiserver's HTTPConnect egress dialer writes.
        proxy
            .write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
            .await?;
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            if proxy.read(&mut b).await? == 0 {
                bail!("proxy closed: {}", String::from_utf8_lossy(&head));
            }
            head.push(b[0]);
        }
        let status = String::from_utf8_lossy(&head)
            .lines()
            .next()
            .unwrap_or("")
            .to_string();
        if !status.contains(" 200 ") {
            bail!("proxy answered {status}");
        }
        Ok(self.kubelet.connect("localhost".try_into()?, proxy).await?)
    }

    async fn get(&self, target: SocketAddr, path: &str) -> Result<String> {
        let mut s = self.tunnel(target).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: kubelet\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// Seconds a `bytes`-long transfer through the tunnel takes, request to last byte.
    async fn transfer(&self, target: SocketAddr, dir: Dir, bytes: u64) -> Result<f64> {
        let t = Instant::now();
        let mut s = self.tunnel(target).await?;
        match dir {
            Dir::Down => {
                s.write_all(bulk_request(bytes).as_bytes()).await?;
                let n = drain(&mut s).await;
                if n < bytes {
                    bail!("download ended after {n} of {bytes} bytes");
                }
            }
            Dir::Up => {
                s.write_all(
                    format!(
                        "POST /upload HTTP/1.1\r\nHost: kubelet\r\nContent-Length: {bytes}\r\nConnection: close\r\n\r\n"
                    )
                    .as_bytes(),
                )
                .await?;
                let chunk = vec![b'u'; 256 << 10];
                let mut left = bytes;
                while left > 0 {
                    let k = left.min(chunk.len() as u64) as usize;
                    s.write_all(&chunk[..k]).await?;
                    left -= k as u64;
                }
                s.flush().await?;
                let mut answer = Vec::new();
                let _ = s.read_to_end(&mut answer).await;
                let answer = String::from_utf8_lossy(&answer);
                let status = answer.lines().next().unwrap_or("(nothing)");
                if !status.contains(" 200 ") {
                    bail!("upload answered {status}");
                }
            }
        }
        Ok(t.elapsed().as_secs_f64())
    }

    /// MiB/s of a `bytes`-long download straight from the backend (TLS, no tunnel).
    async fn direct_download(&self, target: SocketAddr, bytes: u64) -> Result<f64> {
        let t = Instant::now();
        let tcp = TcpStream::connect(target).await?;
        let mut s = self.kubelet.connect("localhost".try_into()?, tcp).await?;
        s.write_all(bulk_request(bytes).as_bytes()).await?;
        let n = drain(&mut s).await;
        if n < bytes {
            bail!("direct download ended after {n} of {bytes} bytes");
        }
        Ok(bytes as f64 / MIB / t.elapsed().as_secs_f64())
    }
}

fn bulk_request(bytes: u64) -> String {
    format!("GET /bulk?bytes={bytes} HTTP/1.1\r\nHost: kubelet\r\nConnection: close\r\n\r\n")
}

async fn drain<S: AsyncReadExt + Unpin>(s: &mut S) -> u64 {
    let mut buf = vec![0u8; 256 << 10];
    let mut n = 0u64;
    while let Ok(k) = s.read(&mut buf).await {
        if k == 0 {
            break;
        }
        n += k as u64;
    }
    n
}

/// A kubelet stand-in: HTTPS with `/containerLogs/...` and `/bulk?bytes=N`.
async fn serve_kubelet(id: &CertKey) -> Result<SocketAddr> {
    use rustls_pki_types::pem::PemObject;
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(
        rustls_pki_types::CertificateDer::pem_file_iter(&id.cert)?.collect::<Result<_, _>>()?,
        rustls_pki_types::PrivateKeyDer::from_pem_file(&id.key)?,
    )?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // Read as the kubelet (Go) does: see `GoLikeStream`.
                let Ok(mut s) = acceptor.accept(crate::bench::io::GoLikeStream(tcp)).await else {
                    return;
                };
                let mut head = Vec::new();
                let mut b = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => head.extend_from_slice(&b[..k]),
                    }
                }
                let line = String::from_utf8_lossy(&head)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string();
                let path = line.split(' ').nth(1).unwrap_or("/").to_string();
                if path == "/upload" {
                    // Read the body (what came with the head counts) and say how much arrived.
                    let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
                        return;
                    };
                    let want = content_length(&head[..end]);
                    let mut got = (head.len() - end - 4) as u64;
                    let mut buf = vec![0u8; 256 << 10];
                    while got < want {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(k) => got += k as u64,
                        }
                    }
                    let (status, body) = if got >= want {
                        ("200 OK", format!("received {got} bytes\n"))
                    } else {
                        (
                            "400 Bad Request",
                            format!("body ended after {got} of {want} bytes\n"),
                        )
                    };
                    let _ = s
                        .write_all(
                            format!(
                                "HTTP/1.1 {status}\r\nContent-Length: {}\r\n\r\n{body}",
                                body.len()
                            )
                            .as_bytes(),
                        )
                        .await;
                } else if let Some(n) = path
                    .strip_prefix("/bulk?bytes=")
                    .and_then(|n| n.parse::<u64>().ok())
                {
                    let _ = s
                        .write_all(
                            format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n").as_bytes(),
                        )
                        .await;
                    let chunk = vec![b'x'; 256 << 10];
                    let mut left = n;
                    while left > 0 {
                        let k = left.min(chunk.len() as u64) as usize;
                        if s.write_all(&chunk[..k]).await.is_err() {
                            return;
                        }
                        left -= k as u64;
                    }
                } else {
                    let mut body = Vec::new();
                    for i in 1..=3 {
                        let _ = writeln!(
                            body,
                            "2026-11-23T12:00:0{i}Z app[{i}]: serving request #{i}"
                        );
                    }
                    let _ = s.write_all(format!("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes()).await;
                    let _ = s.write_all(&body).await;
                }
                let _ = s.shutdown().await;
            });
        }
    });
    Ok(addr)
}

/// Content-Length of a request head (0 when absent or malformed).
fn content_length(head: &[u8]) -> u64 {
    String::from_utf8_lossy(head)
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}
