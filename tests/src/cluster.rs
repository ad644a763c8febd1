//! Starting `spoke-server` / `spoke-agent` processes with per-test PKI and ports, and the common
//! readiness / cleanliness checks.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::net::{TcpStream, UnixStream};

use crate::certs::{CertKey, Pki};
use crate::connect::Frontend;
use crate::metrics::{names, Metrics};
use crate::ports::free_port;
use crate::process::Proc;
use crate::testdir::TestDir;

/// How long a process gets to come up (healthz) or become ready (readyz).
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

/// Per-test environment: scratch dir and PKI.
#[derive(Debug)]
pub struct Env {
    /// Scratch directory (logs, certificates, sockets).
    pub dir: TestDir,
    /// Certificates.
    pub pki: Pki,
}

/// Server frontend protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `--mode=grpc`.
    Grpc,
    /// `--mode=http-connect`.
    HttpConnect,
}

/// Server frontend transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `--uds-name`.
    Uds,
    /// mTLS TCP.
    Tls,
}

/// Options for [`Env::server`].
#[derive(Debug, Clone)]
pub struct ServerOpts {
    mode: Mode,
    transport: Transport,
    id: Option<String>,
    count: u32,
    cluster_cert: Option<CertKey>,
    /// Whether agents must present a certificate of the main CA (`--cluster-ca-cert`).
    agent_certs: bool,
    extra: Vec<String>,
}

impl ServerOpts {
    /// Defaults: one server, the main CA's server certificate on the agent port.
    pub fn new(mode: Mode, transport: Transport) -> Self {
        Self {
            mode,
            transport,
            id: None,
            count: 1,
            cluster_cert: None,
            agent_certs: true,
            extra: Vec::new(),
        }
    }
    /// `--server-id`.
    pub fn id(mut self, id: &str) -> Self {
        self.id = Some(id.to_string());
        self
    }
    /// `--server-count`.
    pub fn count(mut self, n: u32) -> Self {
        self.count = n;
        self
    }
    /// Certificate presented on the agent port (default: main CA's server cert).
    pub fn cluster_cert(mut self, ck: CertKey) -> Self {
        self.cluster_cert = Some(ck);
        self
    }
    /// No `--cluster-ca-cert`: agents authenticate with a token instead of a certificate.
    pub fn agent_tokens(mut self) -> Self {
        self.agent_certs = false;
        self
    }
    /// Extra `--flag=value`.
    pub fn arg(mut self, a: &str) -> Self {
        self.extra.push(a.to_string());
        self
    }
    /// kube-apiserver's usual set-up: HTTP CONNECT over the Unix socket.
    pub fn uds() -> Self {
        Self::new(Mode::HttpConnect, Transport::Uds)
    }
}

/// Options for [`Env::agent`].
#[derive(Debug, Clone)]
pub struct AgentOpts {
    server: SocketAddr,
    cert: Option<CertKey>,
    token: Option<PathBuf>,
    ca: Option<PathBuf>,
    id: String,
    extra: Vec<String>,
}

impl AgentOpts {
    /// An agent dialling the agent port at `server`.
    pub fn new(server: SocketAddr) -> Self {
        Self {
            server,
            cert: None,
            token: None,
            ca: None,
            id: "agent-1".into(),
            extra: Vec::new(),
        }
    }
    /// Client certificate (default: main CA's agent cert).
    pub fn cert(mut self, ck: CertKey) -> Self {
        self.cert = Some(ck);
        self
    }
    /// Authenticate with the service-account token in `path` and no client certificate.
    pub fn token(mut self, path: PathBuf) -> Self {
        self.token = Some(path);
        self
    }
    /// CA used to verify the server (default: main CA).
    pub fn ca(mut self, ca: PathBuf) -> Self {
        self.ca = Some(ca);
        self
    }
    /// `--agent-id`.
    pub fn id(mut self, id: &str) -> Self {
        self.id = id.to_string();
        self
    }
    /// Extra `--flag=value`.
    pub fn arg(mut self, a: &str) -> Self {
        self.extra.push(a.to_string());
        self
    }
}

fn flag(name: &str, value: impl std::fmt::Display) -> String {
    format!("--{name}={value}")
}

fn file_flag(name: &str, p: &std::path::Path) -> String {
    flag(name, p.display())
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A running server.
#[derive(Debug)]
pub struct Server {
    /// The process.
    pub proc: Proc,
    /// `--server-id`.
    pub id: String,
    /// Agent listener.
    pub agent_addr: SocketAddr,
    /// Health listener (/healthz, /readyz, /metrics).
    pub health_addr: SocketAddr,
    /// Admin listener.
    pub admin_addr: SocketAddr,
    /// Unix socket path (UDS transport).
    pub uds: Option<PathBuf>,
    /// TCP frontend address (TLS transport).
    pub tcp: Option<SocketAddr>,
    /// Frontend for raw CONNECT clients (TLS: main CA + frontend client cert).
    pub frontend: Frontend,
}

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    /// The process.
    pub proc: Proc,
    /// Health listener (/healthz, /readyz, /metrics).
    pub health_addr: SocketAddr,
    /// Admin listener.
    pub admin_addr: SocketAddr,
}

/// Polls `GET path` on `addr` until it answers `want`, failing early if `proc` exits.
pub async fn wait_status(
    proc: &mut Proc,
    addr: SocketAddr,
    path: &str,
    want: u16,
    timeout: Duration,
) {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        proc.assert_running();
        let last = match crate::http::get(addr, path).await {
            Ok(r) if r.status == want => return,
            Ok(r) => format!("status {} body {:?}", r.status, r.body),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            std::time::Instant::now() < deadline,
            "GET http://{addr}{path} did not answer {want} within {timeout:?}; last: {last}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Status of `GET path` on `addr` (error text if unreachable).
pub async fn status(addr: SocketAddr, path: &str) -> Result<u16, String> {
    crate::http::get(addr, path)
        .await
        .map(|r| r.status)
        .map_err(|e| format!("{e:#}"))
}

impl Env {
    /// Scratch dir + PKI for test `name`.
    pub fn new(name: &str) -> Self {
        let dir = TestDir::new(name);
        let pki = Pki::generate(dir.path());
        Self { dir, pki }
    }

    /// Spawns a server and waits for its /healthz.
    pub async fn server(&self, opts: ServerOpts) -> Server {
        let main = &self.pki.main;
        let (agent_port, health_port, admin_port) = (free_port(), free_port(), free_port());
        let id = opts
            .id
            .clone()
            .unwrap_or_else(|| format!("server-{agent_port}"));
        let mode = match opts.mode {
            Mode::Grpc => "grpc",
            Mode::HttpConnect => "http-connect",
        };
        let mut args = vec![flag("mode", mode)];
        let (uds, tcp, frontend) = match opts.transport {
            Transport::Uds => {
                let path = self.dir.join(&format!("{id}.sock"));
                args.extend([file_flag("uds-name", &path), flag("server-port", 0)]);
                (Some(path.clone()), None, Frontend::Uds(path))
            }
            Transport::Tls => {
                let addr = local(free_port());
                args.extend([
                    flag("server-bind-address", "127.0.0.1"),
                    flag("server-port", addr.port()),
                    file_flag("server-cert", &main.server.cert),
                    file_flag("server-key", &main.server.key),
                    file_flag("server-ca-cert", &main.ca),
                ]);
                let config = crate::tls::client_config(&main.ca_pem, Some(&main.frontend), &[]);
                (None, Some(addr), Frontend::Tls(addr, config))
            }
        };
        let cluster = opts
            .cluster_cert
            .clone()
            .unwrap_or_else(|| main.server.clone());
        args.extend([
            flag("agent-bind-address", "127.0.0.1"),
            flag("agent-port", agent_port),
            file_flag("cluster-cert", &cluster.cert),
            file_flag("cluster-key", &cluster.key),
            flag("health-bind-address", "127.0.0.1"),
            flag("health-port", health_port),
            flag("admin-bind-address", "127.0.0.1"),
            flag("admin-port", admin_port),
            flag("server-id", &id),
            flag("server-count", opts.count),
        ]);
        if opts.agent_certs {
            args.push(file_flag("cluster-ca-cert", &main.ca));
        }
        args.extend(opts.extra);
        let proc = Proc::spawn(
            &format!("spoke-server {id}"),
            &crate::bins::server_bin(),
            args,
            self.dir.join(&format!("{id}.log")),
        );
        let mut server = Server {
            proc,
            id,
            agent_addr: local(agent_port),
            health_addr: local(health_port),
            admin_addr: local(admin_port),
            uds,
            tcp,
            frontend,
        };
        server.wait_healthy().await;
        server
    }

    /// Spawns an agent and waits for its /healthz.
    pub async fn agent(&self, opts: AgentOpts) -> Agent {
        let main = &self.pki.main;
        let cert = opts.cert.clone().unwrap_or_else(|| main.agent.clone());
        let (health_port, admin_port) = (free_port(), free_port());
        let mut args = vec![
            flag("proxy-server-host", opts.server.ip()),
            flag("proxy-server-port", opts.server.port()),
            file_flag("ca-cert", opts.ca.as_ref().unwrap_or(&main.ca)),
            flag("agent-id", &opts.id),
            flag("health-server-host", "127.0.0.1"),
            flag("health-server-port", health_port),
            flag("admin-bind-address", "127.0.0.1"),
            flag("admin-server-port", admin_port),
            flag("sync-interval", "100ms"),
            flag("sync-interval-cap", "1s"),
            flag("ebpf", "off"),
        ];
        match &opts.token {
            Some(path) => args.push(file_flag("service-account-token-path", path)),
            None => args.extend([
                file_flag("agent-cert", &cert.cert),
                file_flag("agent-key", &cert.key),
            ]),
        }
        args.extend(opts.extra);
        let log = self.dir.join(&format!("{}.log", opts.id));
        let proc = Proc::spawn(
            &format!("spoke-agent {}", opts.id),
            &crate::bins::agent_bin(),
            args,
            log,
        );
        let mut agent = Agent {
            proc,
            health_addr: local(health_port),
            admin_addr: local(admin_port),
        };
        wait_status(
            &mut agent.proc,
            agent.health_addr,
            "/healthz",
            200,
            STARTUP_TIMEOUT,
        )
        .await;
        agent
    }

    /// A server with one agent, both ready.
    pub async fn pair(
        &self,
        server: ServerOpts,
        agent: impl FnOnce(AgentOpts) -> AgentOpts,
    ) -> (Server, Agent) {
        let mut s = self.server(server).await;
        let mut a = self.agent(agent(AgentOpts::new(s.agent_addr))).await;
        a.wait_ready().await;
        s.wait_ready().await;
        (s, a)
    }

    /// Client TLS config for the main CA with `client` cert and ALPN `alpn`.
    pub fn tls_client(
        &self,
        client: Option<&CertKey>,
        alpn: &[&[u8]],
    ) -> std::sync::Arc<rustls::ClientConfig> {
        crate::tls::client_config(&self.pki.main.ca_pem, client, alpn)
    }
}

impl Server {
    /// Waits for /healthz 200.
    /// Waits for /healthz 200 and for the agent port and the frontend to accept connections
    /// (/healthz alone does not promise the other listeners are bound yet).
    pub async fn wait_healthy(&mut self) {
        wait_status(
            &mut self.proc,
            self.health_addr,
            "/healthz",
            200,
            STARTUP_TIMEOUT,
        )
        .await;
        let (agent_addr, tcp, uds) = (self.agent_addr, self.tcp, self.uds.clone());
        crate::wait::poll_until("agent port and frontend to accept", STARTUP_TIMEOUT, || {
            let uds = uds.clone();
            async move {
                let err = |e: std::io::Error| e.to_string();
                TcpStream::connect(agent_addr).await.map_err(err)?;
                if let Some(addr) = tcp {
                    TcpStream::connect(addr).await.map_err(err)?;
                }
                if let Some(path) = uds {
                    UnixStream::connect(path).await.map_err(err)?;
                }
                Ok(())
            }
        })
        .await;
    }
    /// Polls until the server holds exactly `n` agent streams (10 s).
    pub async fn wait_agent_streams(&self, n: usize) {
        self.wait_agent_streams_within(n, Duration::from_secs(10))
            .await
    }
    /// Polls until the server holds exactly `n` agent streams, for at most `limit`.
    pub async fn wait_agent_streams_within(&self, n: usize, limit: Duration) {
        crate::wait::poll_until(
            &format!("server to hold {n} agent streams"),
            limit,
            || async {
                match self.gauge(names::SERVER_READY_BACKENDS).await? {
                    v if v == n as f64 => Ok(()),
                    v => Err(format!("ready_backend_connections={v}")),
                }
            },
        )
        .await;
    }
    /// Polls `/status` until agent `id` shows as draining: its DRAIN arrived (5 s).
    pub async fn wait_agent_draining(&self, id: &str) {
        crate::wait::poll_until(
            &format!("the server to mark {id} draining"),
            Duration::from_secs(5),
            || async {
                let v = self.status().await?;
                let agents = v["agents"].as_array().cloned().unwrap_or_default();
                match agents.iter().find(|a| a["agent_id"] == id) {
                    Some(a) if a["draining"] == true => Ok(()),
                    _ => Err(format!("agents: {}", v["agents"])),
                }
            },
        )
        .await;
    }
    /// Restarts the process and waits until its agent port accepts again; returns when it did.
    pub async fn restart(&mut self) -> std::time::Instant {
        self.proc.restart();
        let agent_addr = self.agent_addr;
        crate::wait::poll_until(
            "restarted server's agent port to accept",
            STARTUP_TIMEOUT,
            || async move {
                TcpStream::connect(agent_addr)
                    .await
                    .map(|_| std::time::Instant::now())
                    .map_err(|e| e.to_string())
            },
        )
        .await
    }
    /// The Unix socket path (panics for a TLS frontend).
    pub fn uds_path(&self) -> PathBuf {
        self.uds.clone().expect("server has no UDS frontend")
    }
}

/// What a server and an agent both serve: readiness and metrics on the health port, `/status`
/// on the admin port.
macro_rules! health_and_admin {
    ($process:ty, $ready:literal) => {
        impl $process {
            #[doc = $ready]
            pub async fn wait_ready(&mut self) {
                wait_status(
                    &mut self.proc,
                    self.health_addr,
                    "/readyz",
                    200,
                    STARTUP_TIMEOUT,
                )
                .await;
            }
            /// Scrapes /metrics on the health port.
            pub async fn metrics(&self) -> anyhow::Result<Metrics> {
                crate::metrics::scrape(self.health_addr).await
            }
            /// Gauge `name` from a fresh scrape, as an error string if unreadable.
            pub async fn gauge(&self, name: &str) -> Result<f64, String> {
                gauge(&self.metrics().await.map_err(|e| format!("{e:#}"))?, name)
            }
            /// The admin port's `/status` JSON.
            pub async fn status(&self) -> Result<serde_json::Value, String> {
                crate::http::status_json(self.admin_addr).await
            }
        }
    };
}
health_and_admin!(Server, "Waits for /readyz 200 (≥1 agent connected).");
health_and_admin!(Agent, "Waits for /readyz 200 (a tunnel is up).");

/// Reads gauge `name` from a scrape, as an error string if absent.
pub fn gauge(m: &Metrics, name: &str) -> Result<f64, String> {
    m.get(name)
        .ok_or_else(|| format!("metric {name} absent; present: {:?}", m.names()))
}

/// Polls until the server has no established connections or pending dials and every agent has no
/// open endpoint connection (10 s).
pub async fn wait_tables_empty(server: &Server, agents: &[&Agent]) {
    crate::wait::poll_until("connection tables to drain (server established/pending, agent open endpoints = 0)", Duration::from_secs(10), || async {
        let sm = server.metrics().await.map_err(|e| format!("{e:#}"))?;
        let established = gauge(&sm, names::SERVER_ESTABLISHED)?;
        let pending = gauge(&sm, names::SERVER_PENDING)?;
        let mut open = Vec::new();
        for a in agents {
            let am = a.metrics().await.map_err(|e| format!("{e:#}"))?;
            open.push(gauge(&am, names::AGENT_OPEN_ENDPOINTS)?);
        }
        if established == 0.0 && pending == 0.0 && open.iter().all(|v| *v == 0.0) {
            Ok(())
        } else {
            Err(format!("server established={established} pending={pending}; agents open_endpoint_connections={open:?}"))
        }
    })
    .await
}
