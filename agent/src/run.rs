//! Wiring and the agent's life: start-up, one tunnel per server (the sync loop), and the
//! drain on SIGTERM.
use crate::backoff::{jitter, Backoff};
use crate::dial::{Endpoints, Limits};
use crate::ebpf::Ebpf;
use crate::metrics::{self, AgentMetrics};
use crate::options::Options;
use crate::{health, policy, stream, Agent};
use anyhow::{Context, Result};
use spoke_tunnel::tls::{CertFiles, ClientTlsFiles, Reloading};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

const TLS_RELOAD_EVERY: Duration = Duration::from_secs(5);

/// Runs spoke-agent with validated options until it is told to stop.
pub fn run(opts: Options) -> Result<()> {
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
    let endpoints = Arc::new(Endpoints {
        ebpf,
        destinations,
        metrics: metrics.clone(),
        limits: Limits {
            connections: opts.max_connections,
            pending_dials: opts.max_pending_dials,
            buffered_bytes: opts.max_buffered_bytes,
        },
        dial_timeout: opts.dial_timeout,
    });
    let agent = Arc::new(Agent {
        opts,
        tls,
        metrics,
        endpoints,
        servers: Mutex::new(HashMap::new()),
        server_count: AtomicU32::new(1),
        drain: CancellationToken::new(),
        drain_started: OnceLock::new(),
        streams_changed: Notify::new(),
    });
    let health = health::start_health(&agent, Arc::new(registry))?;
    health::start_admin(&agent, health)?;

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
        match stream::connect(&agent).await {
            Ok(c) => {
                backoff.reset();
                agent.server_count.store(c.server_count, Ordering::Relaxed);
                agent.metrics.known_server_count.set(c.server_count as i64);
                let id = c.stream.end.server_id.clone();
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
                        agent.servers().remove(&stream.end.server_id);
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
