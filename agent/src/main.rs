//! spoke-agent: the node half of Spoke. Keeps mTLS tunnels to every proxy server and
//! dials local endpoints (kubelet, pods, services) for them; node-local legs can ride the
//! eBPF socket fast path, and an XDP guard can close protected ports to the network.
mod backoff;
mod dial;
pub mod ebpf;
mod metrics;
mod options;
mod policy;
mod server_stream;

use anyhow::{Context, Result};
use axum::extract::RawQuery;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use backoff::{jitter, Backoff};
use clap::Parser;
use ebpf::Ebpf;
use metrics::AgentMetrics;
use options::Options;
use server_stream::ServerStream;
use spoke_process::admin::{self, bind_addr};
use spoke_tunnel::tls::{CertFiles, ClientTlsFiles, Reloading};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

const TLS_RELOAD_EVERY: Duration = Duration::from_secs(5);

/// What every part of the agent shares.
pub struct Agent {
    pub opts: Options,
    pub tls: Arc<Reloading<ClientTlsFiles>>,
    pub metrics: AgentMetrics,
    pub ebpf: Ebpf,
    pub destinations: policy::Destinations,
    servers: Mutex<HashMap<String, Arc<ServerStream>>>,
    server_count: AtomicU32,
    /// Cancelled on the first SIGTERM/SIGINT; every server stream's task sends DRAIN on it.
    pub drain: CancellationToken,
    drain_started: OnceLock<Instant>,
    streams_changed: Notify,
}

impl Agent {
    fn servers(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<ServerStream>>> {
        self.servers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn connected(&self) -> usize {
        self.servers().len()
    }

    fn draining(&self) -> bool {
        self.drain.is_cancelled()
    }

    fn start_drain(&self) {
        self.drain_started.get_or_init(Instant::now);
        self.drain.cancel();
    }

    /// The flag of the limit a new dial would pass, if any (existing connections go on).
    pub fn over_limit(&self) -> Option<&'static str> {
        let m = &self.metrics;
        let o = &self.opts;
        let (reason, flag) = if m.open_endpoint_connections.get() as usize >= o.max_connections {
            ("limit_connections", "--max-connections")
        } else if m.pending_dials.get() as usize >= o.max_pending_dials {
            ("limit_pending_dials", "--max-pending-dials")
        } else if m.relay.buffered_bytes.get() as usize >= o.max_buffered_bytes {
            ("limit_buffered_bytes", "--max-buffered-bytes")
        } else {
            return None;
        };
        spoke_tunnel::metrics::count(&m.refused_dials, reason);
        tracing::warn!(limit = flag, "refusing a dial: limit reached");
        Some(flag)
    }
}

fn main() {
    let mut opts = Options::parse();
    opts.klog.init_logging();
    spoke_process::memory::spawn_trimmer();
    if let Err(e) = opts.validate().and_then(|_| run(opts)) {
        eprintln!("spoke-agent: {e:#}");
        std::process::exit(1);
    }
}

fn run(opts: Options) -> Result<()> {
    let mut alpn = vec![b"h2".to_vec()];
    alpn.extend(opts.alpn_proto.iter().map(|p| p.as_bytes().to_vec()));
    let tls_files = ClientTlsFiles {
        ca: Some(("--ca-cert", PathBuf::from(&opts.ca_cert))),
        identity: (!opts.agent_cert.is_empty()).then(|| CertFiles {
            cert_flag: "--agent-cert",
            cert: PathBuf::from(&opts.agent_cert),
            key_flag: "--agent-key",
            key: PathBuf::from(&opts.agent_key),
        }),
        alpn,
    };
    let metrics = AgentMetrics::new();
    let tls = Reloading::new(tls_files, metrics.tls.clone())?;
    let destinations = policy::Destinations::parse(&opts.allowed_destinations)?;
    let ebpf = Ebpf::load(&opts.ebpf.config()?)?;
    let mut registry = metrics.registry();
    ebpf.register_metrics(&mut registry);
    let agent = Arc::new(Agent {
        opts,
        tls,
        metrics,
        ebpf,
        destinations,
        servers: Mutex::new(HashMap::new()),
        server_count: AtomicU32::new(1),
        drain: CancellationToken::new(),
        drain_started: OnceLock::new(),
        streams_changed: Notify::new(),
    });
    let health = start_health(&agent, Arc::new(registry))?;
    start_admin(&agent, health)?;

    // One single-threaded runtime for the data path (see the server for why).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    rt.block_on(async move {
        agent.tls.watch(TLS_RELOAD_EVERY);
        tracing::info!(agent_id = %agent.opts.agent_id, server = %format!("{}:{}", agent.opts.proxy_server_host, agent.opts.proxy_server_port), "spoke-agent starting");
        tokio::select! {
            _ = sync_loop(agent.clone()) => {}
            _ = signals(agent.clone()) => {}
        }
    });
    Ok(())
}

/// Keeps one tunnel per distinct server, up to the servers' advertised count.
async fn sync_loop(agent: Arc<Agent>) {
    let o = &agent.opts;
    let mut backoff = Backoff::new(o.sync_interval, o.sync_interval_cap);
    loop {
        let want = agent.server_count.load(Ordering::Relaxed).max(1) as usize;
        if agent.draining() || (agent.connected() >= want && !o.sync_forever) {
            tokio::select! {
                _ = agent.streams_changed.notified() => {}
                _ = tokio::time::sleep(jitter(o.sync_interval)) => {}
            }
            continue;
        }
        match server_stream::connect(&agent).await {
            Ok(c) => {
                backoff.reset();
                agent.server_count.store(c.server_count, Ordering::Relaxed);
                agent.metrics.known_server_count.set(c.server_count as i64);
                let id = c.stream.server_id.clone();
                let fresh = {
                    let mut servers = agent.servers();
                    !servers.contains_key(&id)
                        && servers.insert(id.clone(), c.stream.clone()).is_none()
                };
                if fresh {
                    tracing::info!(server_id = %id, server_count = c.server_count, "tunnel to server established");
                    agent.metrics.open_server_connections.inc();
                    let agent = agent.clone();
                    tokio::spawn(async move {
                        let stream = c.stream.clone();
                        c.serve(agent.clone()).await;
                        agent.servers().remove(&stream.server_id);
                        agent.metrics.open_server_connections.dec();
                        agent.streams_changed.notify_one();
                    });
                } else {
                    tracing::debug!(server_id = %id, "already connected to this server; closing the duplicate");
                }
                tokio::time::sleep(jitter(o.sync_interval)).await;
            }
            Err(e) => {
                agent
                    .metrics
                    .server_connection_failures
                    .get_or_create(&metrics::DirectionLabel {
                        direction: "to_server",
                    })
                    .inc();
                let delay = backoff.next_delay();
                tracing::warn!(retry_in = ?delay, "cannot connect to proxy server: {e:#}");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// First SIGTERM/SIGINT: drain as upstream's agent does. Every server stream sends DRAIN (from
/// its own task, so an idle stream sends it at once), the sync loop opens no new tunnels, and
/// open and new dials are still served: a server whose agents all drain keeps routing to them,
/// so a node is not cut off while its replacement agent starts. The drain ends at
/// `--drain-timeout` (when set) or at a second signal; it does not end when the agent is idle,
/// since new dials may still come.
async fn signals(agent: Arc<Agent>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    agent.start_drain();
    let timeout = agent.opts.drain_timeout;
    tracing::info!(
        servers = agent.connected(),
        drain_timeout = ?timeout,
        "draining: telling the servers, opening no new tunnels, still serving dials until the drain timeout or a second signal"
    );
    let deadline = async {
        match timeout {
            d if d.is_zero() => std::future::pending().await,
            d => tokio::time::sleep(d).await,
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("second signal: exiting"),
        _ = int.recv() => tracing::info!("second signal: exiting"),
        _ = deadline => tracing::info!(open = agent.metrics.open_endpoint_connections.get(), "drain timeout reached: exiting"),
    }
}

/// The verbose readiness line of a draining agent. Readiness itself stays as upstream has it
/// (a draining agent with a tunnel is still ready: it still serves dials).
fn drain_line(agent: &Agent) -> Option<String> {
    let since = agent.drain_started.get()?.elapsed();
    let until = match agent.opts.drain_timeout {
        d if d.is_zero() => "a second signal".to_string(),
        d => format!("--drain-timeout={d:?} or a second signal"),
    };
    Some(format!(
        "[+]draining ok (for {:.1}s: servers told, no new tunnels, dials still served until {until})\n",
        since.as_secs_f64()
    ))
}

fn start_health(
    agent: &Arc<Agent>,
    registry: Arc<prometheus_client::registry::Registry>,
) -> Result<SocketAddr> {
    let ready = {
        let agent = agent.clone();
        move |RawQuery(q): RawQuery| {
            let agent = agent.clone();
            async move {
                let verbose = q.is_some_and(|q| {
                    q.split('&')
                        .any(|kv| kv == "verbose" || kv.starts_with("verbose="))
                });
                let connected = agent.connected();
                let ebpf = agent.ebpf.status().summary();
                let draining = drain_line(&agent).unwrap_or_default();
                if connected == 0 {
                    return admin::text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("[+]ping ok\n[-]server-connected failed: no servers connected\n{draining}readyz check failed\n"),
                    );
                }
                if verbose {
                    admin::text(StatusCode::OK, format!("[+]ping ok\n[+]server-connected ok ({connected} servers)\n[+]ebpf ok ({ebpf})\n{draining}readyz check passed\n"))
                } else {
                    admin::text(StatusCode::OK, "ok")
                }
            }
        }
    };
    let router = Router::new()
        .route("/readyz", get(ready.clone()))
        .route("/ready", get(ready))
        .merge(admin::healthz())
        .merge(admin::metrics_route(registry));
    let o = &agent.opts;
    admin::serve(
        "health",
        bind_addr(&o.health_server_host, o.health_server_port)?,
        router,
    )
}

fn start_admin(agent: &Arc<Agent>, health: SocketAddr) -> Result<()> {
    let port = health.port();
    let status = {
        let agent = agent.clone();
        move || {
            let agent = agent.clone();
            async move {
                let servers: Vec<_> = agent
                    .servers()
                    .values()
                    .map(|s| serde_json::json!({"server_id": s.server_id, "connections": s.conns.len()}))
                    .collect();
                let body = serde_json::json!({
                    "agent_id": agent.opts.agent_id,
                    "draining": agent.draining(),
                    "server_count": agent.server_count.load(Ordering::Relaxed),
                    "servers": servers,
                    "open_endpoint_connections": agent.metrics.open_endpoint_connections.get(),
                    "ebpf": agent.ebpf.status(),
                });
                (
                    [(header::CONTENT_TYPE, "application/json")],
                    body.to_string(),
                )
                    .into_response()
            }
        }
    };
    let router = Router::new()
        .route(
            "/metrics",
            get(move || async move {
                (
                    StatusCode::MOVED_PERMANENTLY,
                    [(header::LOCATION, format!("http://127.0.0.1:{port}/metrics"))],
                )
                    .into_response()
            }),
        )
        .route("/status", get(status))
        .merge(admin::log_level_route());
    let o = &agent.opts;
    admin::serve(
        "admin",
        bind_addr(&o.admin_bind_address, o.admin_server_port)?,
        router,
    )?;
    Ok(())
}
