//! Child processes (spoke-server, spoke-agent, sshd, ssh, stunnel) with Drop guards, and the
//! server+agent pair the scenarios run through.
use super::netns;
use super::pki::Pki;
use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Every command line the bench ran, for the report.
pub static COMMANDS: Mutex<Vec<String>> = Mutex::new(Vec::new());

pub fn record(cmd: String) {
    if let Ok(mut v) = COMMANDS.lock() {
        if !v.contains(&cmd) {
            v.push(cmd);
        }
    }
}

pub struct Proc {
    pub pid: u32,
    pub log: PathBuf,
    child: Child,
}

impl Proc {
    /// Starts `prog args` (inside network namespace `ns` when given), output to `log`.
    pub fn spawn(
        name: &str,
        ns: Option<&str>,
        prog: &Path,
        args: &[String],
        log: &Path,
    ) -> Result<Proc> {
        let file =
            std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
        let mut cmd = Command::new(prog);
        let mut nsfile = None;
        if let Some(ns) = ns {
            // Join only the network namespace (unlike `ip netns exec`, which also remounts
            // /sys and would hide the cgroup2 mount the eBPF agent attaches to).
            let f = std::fs::File::open(format!("/run/netns/{ns}"))
                .with_context(|| format!("open netns {ns}"))?;
            use std::os::fd::AsRawFd;
            use std::os::unix::process::CommandExt;
            let fd = f.as_raw_fd();
            // SAFETY: setns is async-signal-safe; `f` outlives the spawn below.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            nsfile = Some(f);
        }
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        let shown = format!(
            "{}{} {}",
            ns.map(|n| format!("nsenter --net=/run/netns/{n} "))
                .unwrap_or_default(),
            prog.file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default(),
            args.join(" ")
        );
        record(shown);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name} ({})", prog.display()))?;
        drop(nsfile);
        Ok(Proc {
            pid: child.id(),
            log: log.into(),
            child,
        })
    }

    /// Whether it exited; with its status.
    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(st)) => Some(st.to_string()),
            _ => None,
        }
    }

    /// SIGKILL, and reap it.
    pub fn kill_now(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The last lines of its log that look like errors, or the last line.
    pub fn last_error(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
        lines
            .iter()
            .rev()
            .find(|l| {
                let l = l.to_ascii_lowercase();
                l.contains("error") || l.contains("fail") || l.contains("refus")
            })
            .or(lines.last())
            .map(|l| strip_ansi(l))
            .unwrap_or_else(|| "(empty log)".into())
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut esc = false;
    for c in s.chars() {
        if esc {
            if c.is_ascii_alphabetic() {
                esc = false;
            }
        } else if c == '\u{1b}' {
            esc = true;
        } else {
            out.push(c);
        }
    }
    out
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Two signals: a spoke-agent drains on the first (it keeps serving, as upstream's
        // does) and exits on the second; the other processes exit on the first.
        for _ in 0..2 {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(1);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP port that is free on loopback now, from below the ephemeral range so that no
/// outbound connection takes it before the process under test binds it.
pub use spoke_tests::ports::free_port;

/// Blocking HTTP/1.0 GET of `127.0.0.1:port` `path` (inside `ns` when given).
pub fn http_get(ns: Option<&str>, port: u16, path: &str) -> Result<(u16, String)> {
    let path = path.to_string();
    let get = move || -> Result<(u16, String)> {
        let mut s = std::net::TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(2),
        )?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        let code = out
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        Ok((
            code,
            out.split_once("\r\n\r\n")
                .map(|x| x.1)
                .unwrap_or("")
                .to_string(),
        ))
    };
    match ns {
        None => get(),
        Some(ns) => netns::in_ns(ns, get),
    }
}

/// [`http_get`] for async code, outside any namespace.
pub async fn http_get_async(port: u16, path: &str) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    let code = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, out.split("\r\n\r\n").nth(1).unwrap_or("").to_string()))
}

/// Sum of the samples of metric `name` (all label sets) in a Prometheus text body.
pub fn metric_sum(body: &str, name: &str, label_filter: &str) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .map(|r| r.strip_prefix("_total").unwrap_or(r))
                .map(|r| r.starts_with('{') || r.starts_with(' '))
                .unwrap_or(false)
                && l.contains(label_filter)
        })
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum::<f64>()
        + 0.0 // an empty f64 sum is -0.0
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    HttpConnect,
    Grpc,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Transport {
    Uds,
    Tls,
}

impl Mode {
    pub fn flag(self) -> &'static str {
        match self {
            Mode::HttpConnect => "http-connect",
            Mode::Grpc => "grpc",
        }
    }
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Uds => "uds",
            Transport::Tls => "mtls-tcp",
        }
    }
}

/// Where and how to run a server+agent pair.
pub struct ClusterCfg {
    pub mode: Mode,
    pub transport: Transport,
    pub ebpf: String,
    pub agent_extra: Vec<String>,
    /// Namespace of the server (None: root namespace, loopback).
    pub server_ns: Option<String>,
    /// Namespace of the agent.
    pub agent_ns: Option<String>,
    /// Address the server's agent port binds, and the agent dials.
    pub agent_addr: String,
}

impl ClusterCfg {
    pub fn new(mode: Mode, transport: Transport) -> Self {
        Self {
            mode,
            transport,
            ebpf: "off".into(),
            agent_extra: vec![],
            server_ns: None,
            agent_ns: None,
            agent_addr: "127.0.0.1".into(),
        }
    }
}

pub enum Frontend {
    Uds(PathBuf),
    Tcp(SocketAddr),
}

pub struct Cluster {
    pub agent: Proc,
    pub server: Proc,
    pub frontend: Frontend,
    pub mode: Mode,
    pub server_health: (Option<String>, u16),
    pub agent_health: (Option<String>, u16),
    pub agent_admin: (Option<String>, u16),
}

static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Cluster {
    pub fn start(bin: &Path, work: &Path, pki: &Pki, cfg: &ClusterCfg) -> Result<Cluster> {
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = |x: &Path| x.display().to_string();
        // Ports: the root namespace shares loopback with everything else, so draw free ones;
        // a fresh namespace has nothing bound.
        let port = |ns: &Option<String>, fixed: u16| {
            if ns.is_some() {
                fixed
            } else {
                free_port()
            }
        };
        let [s_front, s_agent, s_health, s_admin] = [
            port(&cfg.server_ns, 18090),
            port(&cfg.server_ns, 18091),
            port(&cfg.server_ns, 18092),
            port(&cfg.server_ns, 18095),
        ];
        let [a_health, a_admin] = [port(&cfg.agent_ns, 18093), port(&cfg.agent_ns, 18094)];
        let mut sargs = vec![format!("--mode={}", cfg.mode.flag())];
        let frontend = match cfg.transport {
            Transport::Uds => {
                let sock = work.join(format!("frontend-{n}.sock"));
                sargs.push(format!("--uds-name={}", p(&sock)));
                sargs.push("--server-port=0".into());
                Frontend::Uds(sock)
            }
            Transport::Tls => {
                sargs.extend([
                    "--server-bind-address=127.0.0.1".into(),
                    format!("--server-port={s_front}"),
                    format!("--server-cert={}", p(&pki.server.cert)),
                    format!("--server-key={}", p(&pki.server.key)),
                    format!("--server-ca-cert={}", p(&pki.ca)),
                ]);
                Frontend::Tcp(SocketAddr::from(([127, 0, 0, 1], s_front)))
            }
        };
        sargs.extend([
            format!("--agent-bind-address={}", cfg.agent_addr),
            format!("--agent-port={s_agent}"),
            format!("--cluster-cert={}", p(&pki.server.cert)),
            format!("--cluster-key={}", p(&pki.server.key)),
            format!("--cluster-ca-cert={}", p(&pki.ca)),
            "--health-bind-address=127.0.0.1".into(),
            format!("--health-port={s_health}"),
            format!("--admin-port={s_admin}"),
            format!("--server-id=bench-server-{n}"),
            "--log-format=text".into(),
        ]);
        let mut aargs = vec![
            format!("--ca-cert={}", p(&pki.ca)),
            format!("--agent-cert={}", p(&pki.agent.cert)),
            format!("--agent-key={}", p(&pki.agent.key)),
            format!("--proxy-server-host={}", cfg.agent_addr),
            format!("--proxy-server-port={s_agent}"),
            format!("--agent-id=bench-node-{n}"),
            "--health-server-host=127.0.0.1".into(),
            format!("--health-server-port={a_health}"),
            format!("--admin-server-port={a_admin}"),
            format!("--ebpf={}", cfg.ebpf),
            "--log-format=text".into(),
        ];
        aargs.extend(cfg.agent_extra.iter().cloned());
        let server = Proc::spawn(
            "spoke-server",
            cfg.server_ns.as_deref(),
            &bin.join("spoke-server"),
            &sargs,
            &work.join(format!("server-{n}.log")),
        )?;
        let agent = Proc::spawn(
            "spoke-agent",
            cfg.agent_ns.as_deref(),
            &bin.join("spoke-agent"),
            &aargs,
            &work.join(format!("agent-{n}.log")),
        )?;
        let mut c = Cluster {
            agent,
            server,
            frontend,
            mode: cfg.mode,
            server_health: (cfg.server_ns.clone(), s_health),
            agent_health: (cfg.agent_ns.clone(), a_health),
            agent_admin: (cfg.agent_ns.clone(), a_admin),
        };
        c.wait_ready()?;
        Ok(c)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.agent.exited() {
                bail!("spoke-agent exited ({st}): {}", self.agent.last_error());
            }
            if let Some(st) = self.server.exited() {
                bail!("spoke-server exited ({st}): {}", self.server.last_error());
            }
            let ok = |h: &(Option<String>, u16)| {
                matches!(http_get(h.0.as_deref(), h.1, "/readyz"), Ok((200, _)))
            };
            let front_ok = match &self.frontend {
                Frontend::Uds(p) => p.exists(),
                Frontend::Tcp(_) => true,
            };
            if front_ok && ok(&self.agent_health) && ok(&self.server_health) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "server/agent not ready after 30 s; agent: {}; server: {}",
                    self.agent.last_error(),
                    self.server.last_error()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn agent_metrics(&self) -> String {
        http_get(
            self.agent_health.0.as_deref(),
            self.agent_health.1,
            "/metrics",
        )
        .map(|x| x.1)
        .unwrap_or_default()
    }

    /// The agent's `/status` (JSON: eBPF programs, attach modes), empty if unreachable.
    pub fn agent_status(&self) -> String {
        http_get(self.agent_admin.0.as_deref(), self.agent_admin.1, "/status")
            .map(|x| x.1)
            .unwrap_or_default()
    }

    /// Label of the frontend, e.g. `http-connect/uds`.
    pub fn label(mode: Mode, t: Transport) -> String {
        format!("{}/{}", mode.flag(), t.name())
    }
}
