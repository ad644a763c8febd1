//! The agent port: agents connect with mTLS and open `/AgentService/Connect`; each stream
//! becomes an [`AgentStream`] in the registry until it ends. Served by Spoke's own HTTP/2
//! (tunnel::http2): one task per connection, packets dispatched inline.
use crate::metrics::MethodLabel;
use crate::registry::AgentStream;
use crate::Server;
use futures::future::BoxFuture;
use spoke_tunnel::conns::FlowConfig;
use spoke_tunnel::http2::conn::Config;
use spoke_tunnel::http2::driver::{Accepted, Acceptor, Ended, Options, StreamEnd};
use spoke_tunnel::http2::grpc;
use spoke_tunnel::http2::headers::Headers;
use spoke_tunnel::identifiers::AgentIdentifiers;
use spoke_tunnel::listen::{self, AcceptLimits};
use spoke_tunnel::metadata::one_value;
use spoke_tunnel::outbound::outbound;
use spoke_tunnel::session::{ServerEnd, Session, SessionEnd};
use spoke_tunnel::tls::{Reloading, ServerTlsFiles};
use spoke_tunnel::FLOW_CONTROL_HEADER;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tonic::Code;

const CONNECT: MethodLabel = MethodLabel {
    service_method: "Connect",
};
/// How long a keepalive ping may go unanswered.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Accepts agents, within `limits` of handshakes and accepts in progress.
pub async fn serve(
    server: Arc<Server>,
    listener: TcpListener,
    tls: Arc<Reloading<ServerTlsFiles>>,
    limits: AcceptLimits,
) {
    let o = &server.opts;
    let opts = Options {
        http2: Config {
            max_concurrent_streams: 100,
            ..Config::default()
        },
        max_message: o.max_grpc_message_size,
        keepalive: o.keepalive_time,
        keepalive_timeout: KEEPALIVE_TIMEOUT,
    };
    let metrics = server.metrics.tls.clone();
    let make = move || -> Box<dyn Acceptor> {
        Box::new(AgentPort {
            server: server.clone(),
        })
    };
    listen::serve_http2_tls("agent", listener, tls, metrics, limits, opts, make).await;
}

/// Takes `/AgentService/Connect` streams.
struct AgentPort {
    server: Arc<Server>,
}

impl Acceptor for AgentPort {
    fn accept(&mut self, path: &str, headers: Headers) -> BoxFuture<'static, Accepted> {
        let server = self.server.clone();
        let known = path == "/AgentService/Connect";
        let path = path.to_string();
        Box::pin(async move {
            if !known {
                return Err((Code::Unimplemented, format!("unknown method {path}")));
            }
            connect(server, headers).await
        })
    }
}

/// Checks an agent's stream (metadata, token) and registers it.
async fn connect(server: Arc<Server>, headers: Headers) -> Accepted {
    let md = grpc::metadata_map(&headers);
    if let Some(auth) = &server.auth {
        auth.authenticate(&md)
            .await
            .map_err(|s| (s.code(), s.message().to_string()))?;
    }
    let invalid = |e: String| (Code::InvalidArgument, e);
    let agent_id = one_value(&md, "agentid")
        .map_err(invalid)?
        .ok_or_else(|| invalid("expected one agentid value, got none".into()))?;
    let identifiers = one_value(&md, "agentidentifiers").map_err(invalid)?;
    let identifiers =
        AgentIdentifiers::parse(&identifiers.unwrap_or_default(), false).unwrap_or_default();
    let peer_window = one_value(&md, FLOW_CONTROL_HEADER)
        .map_err(invalid)?
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|w| *w > 0);
    let flow = FlowConfig {
        buffer_cap: server.opts.max_connection_buffer_bytes,
        peer_window,
    };
    let m = &server.metrics;
    let (out, out_rx) = outbound(Some((m.stream.clone(), "to_agent")));
    let end = ServerEnd::new(
        agent_id,
        identifiers,
        m.dial_failures.clone(),
        m.dial_duration.clone(),
    );
    let stream = Session::new(end, out, flow, m.session("from_agent"));
    tracing::info!(
        agent_id = %stream.end.agent_id,
        stream = stream.end.stream_id,
        credits = flow.credits(),
        "agent connected"
    );
    let mut rsp = grpc::response();
    let internal = |e: String| (Code::Internal, e);
    grpc::metadata(&mut rsp, "serverid", &server.opts.server_id).map_err(internal)?;
    let count = server.server_count().to_string();
    grpc::metadata(&mut rsp, "servercount", &count).map_err(internal)?;
    if flow.credits() {
        let window = flow.advertised_window().to_string();
        grpc::metadata(&mut rsp, FLOW_CONTROL_HEADER, &window).map_err(internal)?;
    }
    server.registry.add(stream.clone());
    m.grpc_connections.get_or_create(&CONNECT).inc();
    let on_end = {
        let (server, stream) = (server.clone(), stream.clone());
        Box::new(move |how: &Ended| disconnected(&server, &stream, how))
    };
    let end: Box<dyn StreamEnd> = Box::new(SessionEnd::new(stream, out_rx, Some(on_end)));
    Ok((rsp, end))
}

/// An agent stream ended: out of the registry, everything on it closed.
fn disconnected(server: &Server, stream: &AgentStream, how: &Ended) {
    server.registry.remove(stream);
    let (conns, dials) = stream.close();
    server
        .metrics
        .grpc_connections
        .get_or_create(&CONNECT)
        .dec();
    let reason = how.to_string();
    tracing::info!(agent_id = %stream.end.agent_id, stream = stream.end.stream_id, reason, conns, dials, "agent disconnected");
}
