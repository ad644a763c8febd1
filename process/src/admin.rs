//! The health/metrics/admin HTTP servers. They run on their own thread and runtime, so
//! scrapes and probes never take time from the data path (and vice versa: a busy data
//! path cannot make a liveness probe time out).
use anyhow::{Context, Result};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::Arc;

/// A listen address from upstream-style `--*-bind-address` and port flags: an empty host
/// means every interface (IPv6 and IPv4).
pub fn bind_addr(host: &str, port: u16) -> Result<SocketAddr> {
    let ip: std::net::IpAddr = if host.is_empty() {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    } else {
        host.parse()
            .with_context(|| format!("invalid bind address {host:?}"))?
    };
    Ok(SocketAddr::new(ip, port))
}

/// Binds now (so a taken port fails start-up with a clear error), serves on a thread.
pub fn serve(name: &'static str, addr: SocketAddr, router: Router) -> Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("{name} server: cannot listen on {addr}"))?;
    listener.set_nonblocking(true)?;
    let local = listener.local_addr()?;
    std::thread::Builder::new()
        .name(format!("spoke-{name}"))
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "{name} server: no runtime");
                    return;
                }
            };
            rt.block_on(async move {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => {
                        if let Err(e) = axum::serve(l, router).await {
                            tracing::error!(error = %e, "{name} server stopped");
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "{name} server: bad listener"),
                }
            });
        })?;
    tracing::info!(%local, "{name} server listening");
    Ok(local)
}

/// `/metrics` rendering the given registry.
pub fn metrics_route(registry: Arc<Registry>) -> Router {
    Router::new().route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    crate::exposition::encode(&registry),
                )
                    .into_response()
            }
        }),
    )
}

/// Serves the health port on its own thread: readiness at `/readyz` and `/ready` (upstream's
/// two spellings), liveness at `/healthz` and the metrics at `/metrics`.
pub fn serve_health<H, T>(addr: SocketAddr, ready: H, registry: Arc<Registry>) -> Result<SocketAddr>
where
    H: axum::handler::Handler<T, ()> + Clone,
    T: 'static,
{
    let router = Router::new()
        .route("/readyz", get(ready.clone()))
        .route("/ready", get(ready))
        .merge(healthz())
        .merge(metrics_route(registry));
    serve("health", addr, router)
}

/// `/healthz`: the process is alive and serving HTTP.
pub fn healthz() -> Router {
    Router::new().route("/healthz", get(|| async { "ok" }))
}

pub fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (status, body.into()).into_response()
}

/// `/debug/flags/v` on the admin port, as on Kubernetes components: `GET` shows the log
/// filter in force, `PUT` with a klog verbosity (`5`) or a tracing filter
/// (`info,spoke_tunnel=debug`) as the body changes it without a restart.
pub fn log_level_route() -> Router {
    use axum::routing::put;
    Router::new().route(
        "/debug/flags/v",
        get(|| async {
            match crate::logging::current() {
                Some(d) => text(StatusCode::OK, format!("{d}\n")),
                None => text(StatusCode::SERVICE_UNAVAILABLE, "logging not initialised\n"),
            }
        })
        .merge(put(|body: String| async move {
            match crate::logging::set(&body) {
                Ok(d) => text(StatusCode::OK, format!("log filter set to {d}\n")),
                Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
            }
        })),
    )
}
