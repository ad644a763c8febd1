//! Wiring and the agent's life: start-up, one tunnel per server (the sync loop), and the
//! drain on SIGTERM.
use crate::backoff::{jitter, Backoff};
use crate::dial::{Endpoints, Limits};
use crate::ebpf::Ebpf;
use crate::metrics::{self, AgentMetrics};
use crate::options::Options;
use crate::{health, policy, stream, Agent};
use anyhow::Result;
use spoke_k8s::csr::{CertConfig, CertManager, Validity};
use spoke_tunnel::tls::{CertFiles, ClientTlsFiles, Reloading};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Runs spoke-agent with validated options until it is told to stop.
pub fn run(opts: Options) -> Result<()> {
    let rt = spoke_process::data_path_runtime()?;
    let metrics = AgentMetrics::new();
    let stop = CancellationToken::new();
    let certs = match opts.cert_dir.is_empty() {
        true => None,
        false => rt.block_on(bootstrap_certificate(&opts, &metrics, &stop))?,
    };
    let mut alpn = vec![b"h2".to_vec()];
    alpn.extend(opts.alpn_proto.iter().map(|p| p.as_bytes().to_vec()));
    let identity = match &certs {
        Some((_, _, current)) => Some(CertFiles {
            cert_flag: "--cert-dir",
            cert: current.clone(),
            key_flag: "--cert-dir",
            key: current.clone(),
        }),
        None => (!opts.agent_cert.is_empty()).then(|| CertFiles {
            cert_flag: "--agent-cert",
            cert: PathBuf::from(&opts.agent_cert),
            key_flag: "--agent-key",
            key: PathBuf::from(&opts.agent_key),
        }),
    };
    let tls_files = ClientTlsFiles {
        ca: Some(("--ca-cert", PathBuf::from(&opts.ca_cert))),
        identity,
        alpn,
    };
    let tls = Reloading::new(tls_files, metrics.tls.clone())?;
    let lease_count = match opts.count_server_leases {
        true => Some(rt.block_on(async {
            let config = spoke_k8s::client::load_config("--kubeconfig", &opts.kubeconfig).await?;
            spoke_k8s::leases::LeaseCounter::spawn(
                config,
                &opts.lease_namespace,
                &opts.lease_label_selector,
                Some(metrics.leases.clone()),
                stop.clone(),
            )
        })?),
        false => None,
    };
    let destinations = policy::Destinations::parse(&opts.allowed_destinations)?;
    // In the runtime: the loader spawns the tasks that read the programs' rings.
    let ebpf = {
        let _in_runtime = rt.enter();
        Ebpf::load(&opts.ebpf.config()?)?
    };
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
        lease_count,
        drain: CancellationToken::new(),
        drain_started: OnceLock::new(),
        streams_changed: Notify::new(),
    });
    let health = health::start_health(&agent, Arc::new(registry))?;
    health::start_admin(&agent, health)?;

    rt.block_on(async move {
        agent.tls.watch(spoke_process::TLS_RELOAD_EVERY);
        if let Some((manager, validity, _)) = certs {
            let stop = stop.clone();
            tokio::spawn(async move { manager.renew_forever(validity, stop).await });
        }
        let o = &agent.opts;
        tracing::info!(agent_id = %o.agent_id, servers = %o.proxy_server_host.join(","), port = o.proxy_server_port, "spoke-agent starting");
        tokio::select! {
            _ = sync_loop(agent.clone()) => {}
            _ = signals(agent.clone()) => {}
        }
        stop.cancel();
    });
    Ok(())
}

/// `--cert-dir`: the stored certificate if still valid, else one from the CSR API (waiting
/// as long as it takes; a signal ends the wait and the agent). Returns the manager, the
/// certificate's validity and the file the TLS identity is read from.
async fn bootstrap_certificate(
    opts: &Options,
    metrics: &AgentMetrics,
    stop: &CancellationToken,
) -> Result<Option<(CertManager, Validity, PathBuf)>> {
    let dir = PathBuf::from(&opts.cert_dir);
    CertManager::prepare_dir(&dir)?;
    let flag = match opts.bootstrap_kubeconfig.is_empty() {
        true => "in-cluster service account (no --bootstrap-kubeconfig)",
        false => "--bootstrap-kubeconfig",
    };
    let config = spoke_k8s::client::load_config(flag, &opts.bootstrap_kubeconfig).await?;
    let client = spoke_k8s::client::build(config, None)?;
    let manager = CertManager::new(
        client,
        CertConfig {
            cert_dir: dir.clone(),
            agent_id: opts.agent_id.clone(),
            signer: opts.csr_signer_name.clone(),
            expiration: (!opts.csr_expiration.is_zero()).then_some(opts.csr_expiration),
            approval_timeout: opts.csr_approval_timeout,
        },
        metrics.certs.clone(),
    );
    let interrupted = async {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut t), Ok(mut i)) => tokio::select! { _ = t.recv() => {}, _ = i.recv() => {} },
            _ => std::future::pending().await,
        }
    };
    let validity = tokio::select! {
        v = manager.ensure(stop) => v,
        _ = interrupted => {
            tracing::info!("signal while waiting for a client certificate: exiting");
            std::process::exit(0);
        }
    };
    let Some(validity) = validity else {
        anyhow::bail!("stopped before a client certificate was obtained");
    };
    Ok(Some((manager, validity, CertManager::current_path(&dir))))
}

/// Keeps one tunnel per distinct server, up to the server count: one loop per
/// `--proxy-server-host`, each with its own backoff, so a dead address never delays the others.
async fn sync_loop(agent: Arc<Agent>) {
    let addresses = agent.opts.server_addresses();
    let several = addresses.len() > 1;
    let loops = addresses
        .into_iter()
        .map(|(host, port)| host_loop(agent.clone(), host, port, several));
    futures::future::join_all(loops).await;
}

/// Resolves when the lease count changes (never without lease counting).
async fn count_changed(rx: &mut Option<tokio::sync::watch::Receiver<usize>>) {
    match rx {
        Some(rx) => {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await
            }
        }
        None => std::future::pending().await,
    }
}

/// The sync loop of one address, as upstream's: connect while fewer than the server count are
/// held (or always with --sync-forever); success or duplicate waits a jittered sync interval,
/// an error backs off. With several addresses, one whose server is held waits too. A change
/// of the lease count wakes it at once.
async fn host_loop(agent: Arc<Agent>, host: String, port: u16, several: bool) {
    let o = &agent.opts;
    let mut backoff = Backoff::new(o.sync_interval, o.sync_interval_cap);
    let mut counted = agent.lease_count.as_ref().map(|l| l.subscribe());
    // The server this address gave us last.
    let mut mine: Option<String> = None;
    loop {
        let want = agent.wanted_servers();
        let holding_mine = several
            && mine
                .as_ref()
                .is_some_and(|id| agent.servers().contains_key(id));
        if agent.draining() || (!o.sync_forever && (agent.connected() >= want || holding_mine)) {
            tokio::select! {
                _ = agent.streams_changed.notified() => {}
                _ = count_changed(&mut counted) => {}
                _ = tokio::time::sleep(jitter(o.sync_interval)) => {}
            }
            continue;
        }
        match stream::connect(&agent, &host, port).await {
            Ok(c) => {
                backoff.reset();
                agent.server_count.store(c.server_count, Ordering::Relaxed);
                let id = c.stream.end.server_id.clone();
                mine = Some(id.clone());
                let fresh = {
                    let mut servers = agent.servers();
                    !servers.contains_key(&id)
                        && servers.insert(id.clone(), c.stream.clone()).is_none()
                };
                let want = agent.wanted_servers();
                if fresh {
                    tracing::info!(server_id = %id, %host, server_count = want, "tunnel to server established");
                    agent.metrics.open_server_connections.inc();
                    let agent = agent.clone();
                    tokio::spawn(async move {
                        let stream = c.stream.clone();
                        c.serve(agent.clone()).await;
                        agent.servers().remove(&stream.end.server_id);
                        agent.metrics.open_server_connections.dec();
                        agent.streams_changed.notify_waiters();
                    });
                } else {
                    tracing::debug!(server_id = %id, %host, "already connected to this server; closing the duplicate");
                }
                tokio::select! {
                    _ = tokio::time::sleep(jitter(o.sync_interval)) => {}
                    _ = count_changed(&mut counted) => {}
                }
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
                tracing::warn!(%host, retry_in = ?delay, "cannot connect to proxy server: {e:#}");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    // A new lease: the server may be back; try again now.
                    _ = count_changed(&mut counted) => backoff.reset(),
                }
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
