//! Wiring: the listeners, the runtime, serving, and shutdown.
use crate::frontend::{grpc::ProxyPort, http_connect};
use crate::options::{Mode, Options};
use crate::{agent_port, auth, health, metrics, registry, Server};
use anyhow::{Context, Result};
use futures::StreamExt;
use spoke_k8s::{client, csr, leases};
use spoke_process::admin::bind_addr;
use spoke_tunnel::http2::conn::Config;
use spoke_tunnel::http2::driver;
use spoke_tunnel::listen::{self, tls_incoming, AcceptLimits};
use spoke_tunnel::tls::{CertFiles, Reloading, ServerTlsFiles, TlsPolicy};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;

/// Runs spoke-server with validated options until it is told to stop.
pub fn run(opts: Options) -> Result<()> {
    let rt = spoke_process::data_path_runtime()?;
    rt.block_on(async move {
        let metrics = metrics::ServerMetrics::new();
        let stop = CancellationToken::new();
        let kube = match opts.needs_kube() {
            true => Some(kube_client(&opts).await?),
            false => None,
        };
        let auth = match (&kube, opts.token_auth()) {
            (Some((config, client)), true) => Some(
                auth::TokenAuth::new(
                    client.clone(),
                    &config.cluster_url.to_string(),
                    &opts.agent_namespace,
                    &opts.agent_service_account,
                    &opts.authentication_audience,
                )
                .with_rate_limit(opts.kubeconfig_qps, opts.kubeconfig_burst),
            ),
            _ => None,
        };
        let lease_count = match (&kube, opts.count_server_leases) {
            (Some((config, _)), true) => Some(leases::LeaseCounter::spawn(
                config.clone(),
                &opts.lease_namespace,
                &opts.lease_label_selector,
                None,
                stop.clone(),
            )?),
            _ => None,
        };
        let mut controllers = Vec::new();
        let listening = CancellationToken::new();
        if let (Some((_, client)), true) = (&kube, opts.enable_lease_controller) {
            let labels = leases::parse_labels(&opts.lease_label)?;
            let controller = Arc::new(leases::Controller::new(
                client.clone(),
                &opts.lease_namespace,
                &opts.server_id,
                labels,
                leases::Timings {
                    duration: opts.lease_duration,
                    renew_interval: opts.lease_renew_interval,
                    gc_interval: opts.lease_gc_interval,
                },
                metrics.leases.clone(),
            ));
            tracing::info!(lease = controller.lease_name(), namespace = %opts.lease_namespace, "starting the lease controller once the listeners are bound");
            let (listening, stop) = (listening.clone(), stop.clone());
            controllers.push(tokio::spawn(async move {
                tokio::select! {
                    _ = listening.cancelled() => controller.run(stop).await,
                    _ = stop.cancelled() => {}
                }
            }));
        }
        if let (Some((_, client)), true) = (&kube, opts.approve_agent_csrs) {
            let approver = csr::Approver::new(
                client.clone(),
                csr::ApproverConfig {
                    signer: opts.agent_csr_signer_name.clone(),
                    namespace: opts.agent_csr_namespace.clone(),
                    service_account: opts.agent_csr_service_account.clone(),
                },
                metrics.csr.clone(),
            );
            controllers.push(tokio::spawn(approver.run(stop.clone())));
        }
        let server = Arc::new(Server {
            registry: registry::Registry::new(opts.proxy_strategies.clone(), metrics.clone()),
            metrics,
            opts,
            shutting_down: Default::default(),
            auth,
            lease_count,
            listening,
        });
        let served = serve(server).await;
        // The lease controller deletes this server's lease on the way out.
        stop.cancel();
        for c in controllers {
            let _ = tokio::time::timeout(Duration::from_secs(6), c).await;
        }
        served
    })
}

/// The Kubernetes client: `--kubeconfig`, else in-cluster.
async fn kube_client(opts: &Options) -> Result<(spoke_k8s::kube::Config, spoke_k8s::kube::Client)> {
    let config = client::load_config("--kubeconfig", &opts.kubeconfig).await?;
    tracing::info!(api_server = %config.cluster_url, "Kubernetes API client configured");
    let kube = client::build(config.clone(), None)?;
    Ok((config, kube))
}

fn server_tls(
    server: &Server,
    cert_flag: &'static str,
    cert: &str,
    key_flag: &'static str,
    key: &str,
    ca: Option<(&'static str, &str)>,
    alpn: &[&[u8]],
) -> Result<Arc<Reloading<ServerTlsFiles>>> {
    let tls = Reloading::new(
        ServerTlsFiles {
            identity: CertFiles {
                cert_flag,
                cert: PathBuf::from(cert),
                key_flag,
                key: PathBuf::from(key),
            },
            client_ca: ca
                .filter(|(_, p)| !p.is_empty())
                .map(|(f, p)| (f, PathBuf::from(p))),
            alpn: alpn.iter().map(|a| a.to_vec()).collect(),
            policy: TlsPolicy::new(&server.opts.tls_min_version, &server.opts.cipher_suites)?,
        },
        server.metrics.tls.clone(),
    )?;
    tls.watch(spoke_process::TLS_RELOAD_EVERY);
    Ok(tls)
}

async fn serve(server: Arc<Server>) -> Result<()> {
    let o = &server.opts;

    // Agent listener: always TLS, mutual when --cluster-ca-cert is given.
    let agent_tls = server_tls(
        &server,
        "--cluster-cert",
        &o.cluster_cert,
        "--cluster-key",
        &o.cluster_key,
        Some(("--cluster-ca-cert", &o.cluster_ca_cert)),
        &[b"h2"],
    )?;
    let agent_addr = bind_addr(&o.agent_bind_address, o.agent_port)?;
    let agent_listener = listen::listen(agent_addr)
        .with_context(|| format!("agent listener: cannot listen on {agent_addr}"))?;
    tracing::info!(%agent_addr, server_id = %o.server_id, server_count = server.server_count(), "listening for agents");
    let agent_server =
        agent_port::serve(server.clone(), agent_listener, agent_tls, accept_limits(o));

    let frontend_listener = bind_frontend(&server).await?;
    // Every listener is bound: now the health port may say so, and the lease may be published.
    health::start(&server)?;
    server.listening.cancel();
    let frontend = serve_frontend(server.clone(), frontend_listener);
    let serving = async {
        tokio::select! {
            _ = agent_server => Err(anyhow::anyhow!("agent port stopped")),
            r = frontend => r,
        }
    };
    tokio::pin!(serving);
    tokio::select! {
        r = &mut serving => r?,
        _ = shutdown_signal() => {
            let grace = server.opts.graceful_shutdown_timeout;
            server.shutting_down.store(true, std::sync::atomic::Ordering::Relaxed);
            if !grace.is_zero() {
                tracing::info!(?grace, "SIGTERM: refusing new dials, letting open connections finish");
                tokio::select! {
                    r = &mut serving => r?,
                    _ = drained(&server, grace) => {}
                    _ = shutdown_signal() => tracing::info!("second signal: stopping now"),
                }
            }
            tracing::info!(open = server.metrics.established_connections.get(), "shutting down");
        }
    }
    if !server.opts.uds_name.is_empty() {
        let _ = std::fs::remove_file(&server.opts.uds_name);
    }
    Ok(())
}

/// The frontend's listener, bound before anything reports healthy.
enum FrontendListener {
    Uds(UnixListener),
    Tls(TcpListener, Arc<Reloading<ServerTlsFiles>>),
}

async fn bind_frontend(server: &Server) -> Result<FrontendListener> {
    let o = &server.opts;
    if !o.uds_name.is_empty() {
        let listener = bind_uds(&o.uds_name, o.delete_existing_uds_file)?;
        tracing::info!(path = %o.uds_name, mode = ?o.mode, "frontend listening on Unix socket");
        return Ok(FrontendListener::Uds(listener));
    }
    let alpn: &[&[u8]] = match o.mode {
        Mode::Grpc => &[b"h2"],
        // kube-apiserver speaks HTTP/1.1 CONNECT over TLS; HTTP/2 is not offered.
        Mode::HttpConnect => &[b"http/1.1"],
    };
    let tls = server_tls(
        server,
        "--server-cert",
        &o.server_cert,
        "--server-key",
        &o.server_key,
        Some(("--server-ca-cert", &o.server_ca_cert)),
        alpn,
    )?;
    let addr = bind_addr(&o.server_bind_address, o.server_port)?;
    let listener =
        listen::listen(addr).with_context(|| format!("frontend: cannot listen on {addr}"))?;
    tracing::info!(%addr, mode = ?o.mode, "frontend listening (mTLS)");
    Ok(FrontendListener::Tls(listener, tls))
}

async fn serve_frontend(server: Arc<Server>, listener: FrontendListener) -> Result<()> {
    let o = &server.opts;
    let opts = driver::Options {
        // A stream's window is what its client may send ahead of the agent's credit.
        http2: Config {
            stream_window: 4 << 20,
            connection_window: 16 << 20,
            ..Config::default()
        },
        max_message: o.max_grpc_message_size,
        keepalive: o.frontend_keepalive_time,
        keepalive_timeout: Duration::from_secs(20),
    };
    let proxy = {
        let server = server.clone();
        move || -> Box<dyn driver::Acceptor> {
            Box::new(ProxyPort {
                server: server.clone(),
            })
        }
    };
    match (listener, o.mode) {
        (FrontendListener::Uds(l), Mode::Grpc) => {
            listen::serve_http2_unix(l, opts, proxy).await;
            Ok(())
        }
        (FrontendListener::Uds(l), Mode::HttpConnect) => loop {
            match l.accept().await {
                Ok((s, _)) => {
                    listen::frontend_unix_socket(&s);
                    tokio::spawn(http_connect::serve(server.clone(), s));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "frontend accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        },
        (FrontendListener::Tls(l, tls), Mode::Grpc) => {
            let (metrics, limits) = (server.metrics.tls.clone(), accept_limits(o));
            listen::serve_http2_tls("frontend", l, tls, metrics, limits, opts, proxy).await;
            Ok(())
        }
        (FrontendListener::Tls(l, tls), Mode::HttpConnect) => {
            let limits = accept_limits(o);
            let mut incoming = tls_incoming("frontend", l, tls, server.metrics.tls.clone(), limits);
            while let Some(s) = incoming.next().await {
                if let Ok(s) = s {
                    tokio::spawn(http_connect::serve(server.clone(), s));
                }
            }
            Ok(())
        }
    }
}

fn accept_limits(o: &Options) -> AcceptLimits {
    AcceptLimits {
        handshakes: o.max_concurrent_tls_handshakes as usize,
        pending: o.max_pending_accepts as usize,
    }
}

/// Resolves when no connection or dial is left, or after `grace`.
async fn drained(server: &Server, grace: Duration) {
    let idle = async {
        while server.metrics.established_connections.get() > 0
            || server.metrics.pending_backend_dials.get() > 0
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    if tokio::time::timeout(grace, idle).await.is_err() {
        tracing::warn!(
            open = server.metrics.established_connections.get(),
            "graceful shutdown timeout reached"
        );
    }
}

fn bind_uds(path: &str, delete_existing: bool) -> Result<UnixListener> {
    if delete_existing && std::path::Path::new(path).exists() {
        std::fs::remove_file(path)
            .with_context(|| format!("--uds-name {path}: cannot remove the old socket"))?;
    }
    if let Some(dir) = std::path::Path::new(path).parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("--uds-name {path}: cannot create its directory"))?;
        }
    }
    // Socket mode 0770, as upstream (umask 0007 while binding).
    let old = unsafe { libc::umask(0o007) };
    let listener = UnixListener::bind(path);
    unsafe { libc::umask(old) };
    listener.with_context(|| format!("--uds-name {path}: cannot listen"))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}
