//! The agent's end of an agent stream: connecting to a server (mTLS, metadata, the server's
//! headers) and serving the stream through the shared engine until it ends.
use crate::Agent;
use anyhow::{anyhow, Result};
use hyper_util::rt::TokioIo;
use spoke_proto::agent_service_client::AgentServiceClient;
use spoke_proto::Packet;
use spoke_tunnel::conns::FlowConfig;
use spoke_tunnel::metadata::{insert, one_value};
use spoke_tunnel::outbound::outbound;
use spoke_tunnel::packet;
use spoke_tunnel::session::{AgentEnd, Session};
use spoke_tunnel::FLOW_CONTROL_HEADER;
use std::sync::Arc;
use tonic::transport::Endpoint;
use tonic::Streaming;

/// HTTP/2 windows sized for bulk transfer over long links.
const STREAM_WINDOW: u32 = 8 << 20;
const CONN_WINDOW: u32 = 16 << 20;
const MAX_FRAME: u32 = 1 << 20;

/// One agent stream, from the agent's end.
pub type AgentStream = Session<AgentEnd>;

/// A connected stream not yet being served.
pub struct Connected {
    pub stream: Arc<AgentStream>,
    pub server_count: u32,
    inbound: Streaming<Packet>,
}

/// The one value of header `key` the server must send.
fn header(md: &tonic::metadata::MetadataMap, key: &str) -> Result<String> {
    one_value(md, key)
        .map_err(|e| anyhow!("server header: {e}"))?
        .ok_or_else(|| anyhow!("expected one {key} header from the server, got 0"))
}

/// Opens a new TCP+TLS connection to `host:port` (one of `--proxy-server-host`) and a
/// `Connect` stream on it.
pub async fn connect(agent: &Arc<Agent>, host: &str, port: u16) -> Result<Connected> {
    let o = &agent.opts;
    let tls = tokio_rustls::TlsConnector::from(agent.tls.current());
    let name = spoke_tunnel::tls::server_name(host)?;
    let target = (host.to_string(), port);
    let authority = match host.contains(':') {
        true => format!("[{host}]:{port}"),
        false => format!("{host}:{port}"),
    };
    let connector = tower::service_fn(move |_: http::Uri| {
        let (tls, name, target) = (tls.clone(), name.clone(), target.clone());
        async move {
            let tcp = tokio::net::TcpStream::connect((target.0.as_str(), target.1)).await?;
            tcp.set_nodelay(true)?;
            let s = tls.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(s))
        }
    });
    let channel = Endpoint::from_shared(format!("https://{authority}"))?
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        // Let the server send our 64 KiB DATA payloads in one HTTP/2 frame (default 16 KiB).
        .max_frame_size(MAX_FRAME)
        .http2_keep_alive_interval(o.keepalive_time)
        .keep_alive_while_idle(true)
        .connect_timeout(std::time::Duration::from_secs(10))
        .tcp_nodelay(true)
        .connect_with_connector(connector)
        .await
        .map_err(|e| anyhow!("cannot reach proxy server {authority}: {}", error_chain(&e)))?;
    let mut client = AgentServiceClient::new(channel)
        .max_decoding_message_size(o.max_grpc_message_size)
        .max_encoding_message_size(o.max_grpc_message_size);

    let (out, out_rx) = outbound(Some((agent.metrics.stream.clone(), "from_agent")));
    let mut req = tonic::Request::new(out_rx);
    let md = req.metadata_mut();
    let meta = |md: &mut _, key, value: &str| insert(md, key, value).map_err(|e| anyhow!(e));
    meta(md, "agentid", &o.agent_id)?;
    meta(md, "agentidentifiers", &o.agent_identifiers)?;
    let window = o.max_connection_buffer_bytes.to_string();
    meta(md, FLOW_CONTROL_HEADER, &window)?;
    if !o.service_account_token_path.is_empty() {
        // Re-read on every connect so rotated projected tokens are picked up.
        let path = &o.service_account_token_path;
        let token = std::fs::read_to_string(path)
            .map_err(|e| anyhow!("--service-account-token-path {path}: {e}"))?;
        meta(md, "authorization", &format!("Bearer {}", token.trim_end()))?;
    }
    let rsp = client
        .connect(req)
        .await
        .map_err(|s| anyhow!("server refused the tunnel: {:?}: {}", s.code(), s.message()))?;
    let headers = rsp.metadata();
    let server_id = header(headers, "serverid")?;
    let server_count: u32 = header(headers, "servercount")?
        .parse()
        .map_err(|_| anyhow!("servercount header is not a number"))?;
    let peer_window = one_value(headers, FLOW_CONTROL_HEADER)
        .ok()
        .flatten()
        .and_then(|v| v.parse().ok())
        .filter(|w| *w > 0);
    let flow = FlowConfig {
        buffer_cap: o.max_connection_buffer_bytes,
        peer_window,
    };
    let end = AgentEnd::new(server_id, agent.endpoints.clone());
    let m = &agent.metrics;
    let metrics = spoke_tunnel::session::SessionMetrics {
        stream: m.stream.clone(),
        received: "to_agent",
        relay: m.relay.clone(),
        rejected: m.rejected.clone(),
    };
    Ok(Connected {
        stream: Session::new(end, out, flow, metrics),
        server_count,
        inbound: rsp.into_inner(),
    })
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        // hyper and tonic often repeat their cause in their own text.
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = c.source();
    }
    s
}

impl Connected {
    /// Serves the stream until it ends, then closes everything that rode on it.
    pub async fn serve(self, agent: Arc<Agent>) -> String {
        let Connected {
            stream, inbound, ..
        } = self;
        // DRAIN goes out as soon as the agent starts draining, from its own task so an idle
        // stream sends it at once (also one that connected while the signal arrived).
        let drain = {
            let (agent, stream) = (agent.clone(), stream.clone());
            tokio::spawn(async move {
                tokio::select! {
                    _ = agent.drain.cancelled() => {
                        if stream.outbound.control(packet::drain()).is_ok() {
                            tracing::info!(server_id = %stream.end.server_id, "sent DRAIN");
                        }
                    }
                    _ = stream.outbound.closed.cancelled() => {}
                }
            })
        };
        let reason = stream.run(inbound).await;
        let (conns, _) = stream.close();
        drain.abort();
        tracing::info!(server_id = %stream.end.server_id, conns, "tunnel to server closed: {reason}");
        reason
    }
}
