//! The health port (`/healthz`, `/readyz`, `/ready`, `/metrics`) and the admin port
//! (`/status`, the live log level, `/metrics` redirected), on their own thread.
use crate::Agent;
use anyhow::Result;
use axum::extract::RawQuery;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use spoke_process::admin::{self, bind_addr};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

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

pub fn start_health(
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
                let ebpf = agent.endpoints.ebpf.status().summary();
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
    let o = &agent.opts;
    admin::serve_health(
        bind_addr(&o.health_server_host, o.health_server_port)?,
        ready,
        registry,
    )
}

pub fn start_admin(agent: &Arc<Agent>, health: SocketAddr) -> Result<()> {
    let port = health.port();
    let status = {
        let agent = agent.clone();
        move || {
            let agent = agent.clone();
            async move {
                let servers: Vec<_> = agent
                    .servers()
                    .values()
                    .map(|s| serde_json::json!({"server_id": s.end.server_id, "connections": s.conns.len()}))
                    .collect();
                let body = serde_json::json!({
                    "agent_id": agent.opts.agent_id,
                    "draining": agent.draining(),
                    "server_count": agent.server_count.load(Ordering::Relaxed),
                    "servers": servers,
                    "open_endpoint_connections": agent.metrics.open_endpoint_connections.get(),
                    "ebpf": agent.endpoints.ebpf.status(),
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
