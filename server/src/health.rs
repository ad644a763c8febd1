//! The health port (`/healthz`, `/readyz`, `/ready`, `/metrics`) and the admin port
//! (`/metrics`, `/status`, the live log level), on their own thread.
use crate::Server;
use axum::http::StatusCode;
use axum::routing::get;
use spoke_process::admin::{self, bind_addr};
use std::sync::Arc;

/// The health and admin HTTP servers (their own thread; see `admin::serve`).
pub fn start(server: &Arc<Server>) -> anyhow::Result<()> {
    let registry = Arc::new(server.metrics.registry());
    start_health(server, registry.clone())?;
    let o = &server.opts;
    admin::serve(
        "admin",
        bind_addr(&o.admin_bind_address, o.admin_port)?,
        admin::metrics_route(registry)
            .route("/status", get(status_page(server.clone())))
            .merge(admin::log_level_route()),
    )?;
    Ok(())
}

/// `/status` on the admin port: agents, their streams and connections, as JSON.
fn status_page(
    server: Arc<Server>,
) -> impl Fn() -> std::future::Ready<axum::response::Response> + Clone {
    move || {
        let agents: Vec<_> = server
            .registry
            .snapshot()
            .iter()
            .map(|s| {
                let (end, load) = (&s.end, s.load());
                serde_json::json!({
                    "agent_id": end.agent_id,
                    "stream": end.stream_id,
                    "identifiers": {
                        "host": end.identifiers.host, "ipv4": end.identifiers.ipv4,
                        "ipv6": end.identifiers.ipv6, "default_route": end.identifiers.default_route,
                    },
                    "draining": end.is_draining(),
                    "credit_flow_control": s.flow.credits(),
                    "connections": s.conns.len(),
                    "load": {"connections": load.connections, "buffered_bytes": load.buffered_bytes},
                })
            })
            .collect();
        let body = serde_json::json!({
            "server_id": server.opts.server_id,
            "server_count": server.server_count(),
            "mode": format!("{:?}", server.opts.mode),
            "shutting_down": server.shutting_down.load(std::sync::atomic::Ordering::Relaxed),
            "established_connections": server.metrics.established_connections.get(),
            "pending_dials": server.metrics.pending_backend_dials.get(),
            "agents": agents,
        });
        std::future::ready(axum::response::IntoResponse::into_response((
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )))
    }
}

fn start_health(
    server: &Arc<Server>,
    registry: Arc<prometheus_client::registry::Registry>,
) -> anyhow::Result<()> {
    let ready = {
        let server = server.clone();
        move || {
            let server = server.clone();
            async move {
                if server
                    .shutting_down
                    .load(std::sync::atomic::Ordering::Relaxed)
                {
                    admin::text(StatusCode::INTERNAL_SERVER_ERROR, "shutting down")
                } else if server.registry.ready() {
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
    let o = &server.opts;
    admin::serve_health(
        bind_addr(&o.health_bind_address, o.health_port)?,
        ready,
        registry,
    )?;
    Ok(())
}
