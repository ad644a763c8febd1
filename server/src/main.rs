//! spoke-server: the control-plane half of Spoke. Agents dial in on the agent port;
//! kube-apiserver's egress frontends (gRPC or HTTP CONNECT, over a Unix socket or mTLS
//! TCP) are routed through them.
mod agent_service;
mod auth;
mod backends;
mod frontend_grpc;
mod frontend_http;
mod metrics;
mod options;
mod state;

use anyhow::{Context, Result};
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use clap::Parser;
use futures::StreamExt;
use options::{Mode, Options};
use spoke_process::admin::{self, bind_addr};
use spoke_proto::agent_service_server::AgentServiceServer;
use spoke_proto::proxy_service_server::ProxyServiceServer;
use spoke_tunnel::h2_authority::AuthorityFilter;
use spoke_tunnel::listen::{tls_incoming, TlsIo};
use spoke_tunnel::tls::{CertFiles, Reloading, ServerTlsFiles, TlsPolicy};
use state::State;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, UnixListener};
use tonic::transport::Server;

/// HTTP/2 windows sized for bulk transfer over long links (8 MiB per stream, 16 MiB per
/// connection): the default 64 KiB window caps a 50 ms link at about 1 MiB/s.
const STREAM_WINDOW: u32 = 8 << 20;
const CONN_WINDOW: u32 = 16 << 20;
const TLS_RELOAD_EVERY: Duration = Duration::from_secs(5);

fn main() {
    let mut opts = Options::parse();
    opts.klog.init_logging();
    spoke_process::memory::spawn_trimmer();
    if let Err(e) = opts.validate().and_then(|()| run(opts)) {
        eprintln!("spoke-server: {e:#}");
        std::process::exit(1);
    }
}

fn run(opts: Options) -> Result<()> {
    let auth = if opts.token_auth() {
        Some(
            auth::TokenAuth::new(
                &opts.kubeconfig,
                &opts.agent_namespace,
                &opts.agent_service_account,
                &opts.authentication_audience,
            )?
            .with_rate_limit(opts.kubeconfig_qps, opts.kubeconfig_burst),
        )
    } else {
        None
    };
    let metrics = metrics::ServerMetrics::new();
    let state = Arc::new(State {
        backends: backends::Backends::new(opts.proxy_strategies.clone(), metrics.clone()),
        metrics,
        opts,
        shutting_down: Default::default(),
        auth,
    });
    // One single-threaded runtime for the data path: on a 2-vCPU node it beats a work-
    // stealing pool (fewer cross-thread wakeups per packet) and leaves a core for the agent.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    rt.block_on(serve(state))
}

/// The health and admin HTTP servers (their own thread; see `admin::serve`).
fn start_http(state: &Arc<State>) -> Result<()> {
    let registry = Arc::new(state.metrics.registry());
    start_health(state, registry.clone())?;
    let o = &state.opts;
    admin::serve(
        "admin",
        bind_addr(&o.admin_bind_address, o.admin_port)?,
        admin::metrics_route(registry)
            .route("/status", get(status_page(state.clone())))
            .merge(admin::log_level_route()),
    )?;
    Ok(())
}

/// `/status` on the admin port: agents, their streams and connections, as JSON.
fn status_page(
    state: Arc<State>,
) -> impl Fn() -> std::future::Ready<axum::response::Response> + Clone {
    move || {
        let agents: Vec<_> = state
            .backends
            .snapshot()
            .iter()
            .map(|b| {
                serde_json::json!({
                    "agent_id": b.agent_id,
                    "stream": b.stream_id,
                    "identifiers": {
                        "host": b.identifiers.host, "ipv4": b.identifiers.ipv4,
                        "ipv6": b.identifiers.ipv6, "default_route": b.identifiers.default_route,
                    },
                    "draining": b.is_draining(),
                    "credit_flow_control": b.flow.credits(),
                    "connections": b.conns.len(),
                })
            })
            .collect();
        let body = serde_json::json!({
            "server_id": state.opts.server_id,
            "server_count": state.opts.server_count,
            "mode": format!("{:?}", state.opts.mode),
            "shutting_down": state.shutting_down.load(std::sync::atomic::Ordering::Relaxed),
            "established_connections": state.metrics.established_connections.get(),
            "pending_dials": state.metrics.pending_backend_dials.get(),
            "agents": agents,
        });
        std::future::ready(axum::response::IntoResponse::into_response((
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )))
    }
}

fn start_health(
    state: &Arc<State>,
    registry: Arc<prometheus_client::registry::Registry>,
) -> Result<()> {
    let ready = {
        let state = state.clone();
        move || {
            let state = state.clone();
            async move {
                if state
                    .shutting_down
                    .load(std::sync::atomic::Ordering::Relaxed)
                {
                    admin::text(StatusCode::INTERNAL_SERVER_ERROR, "shutting down")
                } else if state.backends.ready() {
                    admin::text(StatusCode::OK, "ok")
                } else {
                    admin::text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "no connection to any proxy agent",
                    )
                }
            }
        }
    };
    let router = Router::new()
        .route("/readyz", get(ready.clone()))
        .route("/ready", get(ready))
        .merge(admin::healthz())
        .merge(admin::metrics_route(registry));
    let o = &state.opts;
    admin::serve(
        "health",
        bind_addr(&o.health_bind_address, o.health_port)?,
        router,
    )?;
    Ok(())
}

fn server_tls(
    state: &State,
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
            policy: TlsPolicy::new(&state.opts.tls_min_version, &state.opts.cipher_suites)?,
        },
        state.metrics.tls.clone(),
    )?;
    tls.watch(TLS_RELOAD_EVERY);
    Ok(tls)
}

fn grpc_server(keepalive: Duration) -> Server {
    Server::builder()
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .max_frame_size(Some(1 << 20))
        .http2_keepalive_interval(Some(keepalive))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .tcp_nodelay(true)
}

async fn serve(state: Arc<State>) -> Result<()> {
    let o = &state.opts;
    let max_msg = o.max_grpc_message_size;

    // Agent listener: always TLS, mutual when --cluster-ca-cert is given.
    let agent_tls = server_tls(
        &state,
        "--cluster-cert",
        &o.cluster_cert,
        "--cluster-key",
        &o.cluster_key,
        Some(("--cluster-ca-cert", &o.cluster_ca_cert)),
        &[b"h2"],
    )?;
    let agent_addr = bind_addr(&o.agent_bind_address, o.agent_port)?;
    let agent_listener = TcpListener::bind(agent_addr)
        .await
        .with_context(|| format!("agent listener: cannot listen on {agent_addr}"))?;
    tracing::info!(%agent_addr, server_id = %o.server_id, server_count = o.server_count, "listening for agents");
    let agents = tls_incoming(
        "agent",
        agent_listener,
        agent_tls,
        state.metrics.tls.clone(),
    )
    .map(|r| r.map(TlsIo));
    let agent_svc = AgentServiceServer::new(agent_service::AgentSvc {
        state: state.clone(),
    })
    .max_decoding_message_size(max_msg)
    .max_encoding_message_size(max_msg);
    let agent_server = grpc_server(o.keepalive_time)
        .add_service(agent_svc)
        .serve_with_incoming(agents);

    let frontend_listener = bind_frontend(&state).await?;
    // Every listener is bound: now the health port may say so.
    start_http(&state)?;
    let frontend = serve_frontend(state.clone(), frontend_listener);
    let serving = async {
        tokio::select! {
            r = agent_server => r.context("agent server failed"),
            r = frontend => r,
        }
    };
    tokio::pin!(serving);
    tokio::select! {
        r = &mut serving => r?,
        _ = shutdown_signal() => {
            let grace = state.opts.graceful_shutdown_timeout;
            state.shutting_down.store(true, std::sync::atomic::Ordering::Relaxed);
            if !grace.is_zero() {
                tracing::info!(?grace, "SIGTERM: refusing new dials, letting open connections finish");
                tokio::select! {
                    r = &mut serving => r?,
                    _ = drained(&state, grace) => {}
                    _ = shutdown_signal() => tracing::info!("second signal: stopping now"),
                }
            }
            tracing::info!(open = state.metrics.established_connections.get(), "shutting down");
        }
    }
    if !state.opts.uds_name.is_empty() {
        let _ = std::fs::remove_file(&state.opts.uds_name);
    }
    Ok(())
}

/// The frontend's listener, bound before anything reports healthy.
enum FrontendListener {
    Uds(UnixListener),
    Tls(TcpListener, Arc<Reloading<ServerTlsFiles>>),
}

async fn bind_frontend(state: &State) -> Result<FrontendListener> {
    let o = &state.opts;
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
        state,
        "--server-cert",
        &o.server_cert,
        "--server-key",
        &o.server_key,
        Some(("--server-ca-cert", &o.server_ca_cert)),
        alpn,
    )?;
    let addr = bind_addr(&o.server_bind_address, o.server_port)?;
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("frontend: cannot listen on {addr}"))?;
    tracing::info!(%addr, mode = ?o.mode, "frontend listening (mTLS)");
    Ok(FrontendListener::Tls(listener, tls))
}

async fn serve_frontend(state: Arc<State>, listener: FrontendListener) -> Result<()> {
    let o = &state.opts;
    let max_msg = o.max_grpc_message_size;
    let proxy_svc = || {
        ProxyServiceServer::new(frontend_grpc::ProxySvc {
            state: state.clone(),
        })
        .max_decoding_message_size(max_msg)
        .max_encoding_message_size(max_msg)
    };
    // grpc-go clients may send an authority `h2` refuses; see h2_authority.
    let m = &state.metrics.h2_filter;
    match (listener, o.mode) {
        (FrontendListener::Uds(l), Mode::Grpc) => grpc_server(o.frontend_keepalive_time)
            .add_service(proxy_svc())
            .serve_with_incoming(
                tokio_stream::wrappers::UnixListenerStream::new(l)
                    .map(|r| r.map(|s| AuthorityFilter::new(s, m.clone()))),
            )
            .await
            .context("frontend server failed"),
        (FrontendListener::Uds(l), Mode::HttpConnect) => loop {
            match l.accept().await {
                Ok((s, _)) => {
                    tokio::spawn(frontend_http::serve(state.clone(), s));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "frontend accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        },
        (FrontendListener::Tls(l, tls), mode) => {
            let mut incoming = tls_incoming("frontend", l, tls, state.metrics.tls.clone());
            match mode {
                Mode::Grpc => grpc_server(o.frontend_keepalive_time)
                    .add_service(proxy_svc())
                    .serve_with_incoming(
                        incoming.map(|r| r.map(|s| AuthorityFilter::new(TlsIo(s), m.clone()))),
                    )
                    .await
                    .context("frontend server failed"),
                Mode::HttpConnect => {
                    while let Some(s) = incoming.next().await {
                        if let Ok(s) = s {
                            tokio::spawn(frontend_http::serve(state.clone(), s));
                        }
                    }
                    Ok(())
                }
            }
        }
    }
}

/// Resolves when no connection or dial is left, or after `grace`.
async fn drained(state: &State, grace: Duration) {
    let idle = async {
        while state.metrics.established_connections.get() > 0
            || state.metrics.pending_backend_dials.get() > 0
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    if tokio::time::timeout(grace, idle).await.is_err() {
        tracing::warn!(
            open = state.metrics.established_connections.get(),
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
