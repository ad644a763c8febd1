//! The agent's end of an agent stream: connecting to a server (mTLS, metadata, the server's
//! headers) and serving the stream through the shared engine until it ends.
use crate::Agent;
use anyhow::{anyhow, Result};
use rustls::client::UnbufferedClientConnection;
use spoke_tunnel::conns::FlowConfig;
use spoke_tunnel::http2::conn::Config;
use spoke_tunnel::http2::driver::{Driver, Ended, Options};
use spoke_tunnel::http2::grpc;
use spoke_tunnel::http2::headers::Headers;
use spoke_tunnel::http2::io::{Crypto, Io};
use spoke_tunnel::outbound::outbound;
use spoke_tunnel::packet;
use spoke_tunnel::session::{AgentEnd, Session, SessionEnd};
use spoke_tunnel::FLOW_CONTROL_HEADER;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;

/// How long connecting (TCP and the TLS handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a keepalive ping may go unanswered.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// One agent stream, from the agent's end.
pub type AgentStream = Session<AgentEnd>;

/// A connected stream not yet being served.
pub struct Connected {
    pub stream: Arc<AgentStream>,
    pub server_count: u32,
    driver: Driver<TcpStream>,
    /// How the stream ended, once it has.
    ended: Arc<Mutex<Option<Ended>>>,
}

/// The one value of header `key` the server must send.
fn header(h: &Headers, key: &str) -> Result<String> {
    let mut values = h.get_all(key);
    match (values.next(), values.next()) {
        (Some(v), None) => std::str::from_utf8(v)
            .map(str::to_string)
            .map_err(|_| anyhow!("{key} header is not text")),
        (None, _) => Err(anyhow!("expected one {key} header from the server, got 0")),
        (Some(_), Some(_)) => Err(anyhow!(
            "expected one {key} header from the server, got several"
        )),
    }
}

/// The HTTP/2 settings and limits of an agent stream's connection.
pub fn transport_options(o: &crate::options::Options) -> Options {
    Options {
        http2: Config::default(),
        max_message: o.max_grpc_message_size,
        keepalive: o.keepalive_time,
        keepalive_timeout: KEEPALIVE_TIMEOUT,
    }
}

/// Opens a new TCP+TLS connection to `host:port` (one of `--proxy-server-host`) and a
/// `Connect` stream on it.
pub async fn connect(agent: &Arc<Agent>, host: &str, port: u16) -> Result<Connected> {
    let o = &agent.opts;
    let unreachable =
        |e: &dyn std::fmt::Display| anyhow!("cannot reach proxy server {host}:{port}: {e}");
    let name = spoke_tunnel::tls::server_name(host)?;
    let tls =
        UnbufferedClientConnection::new(agent.tls.current(), name).map_err(|e| unreachable(&e))?;
    let io = tokio::time::timeout(CONNECT_TIMEOUT, async {
        let tcp = TcpStream::connect((host, port)).await?;
        tcp.set_nodelay(true)?;
        let mut io = Io::new(tcp, Crypto::Client(Box::new(tls)));
        io.count_errors(agent.metrics.tls.connection_errors());
        io.handshake().await?;
        Ok::<_, std::io::Error>(io)
    })
    .await
    .map_err(|_| unreachable(&format!("no connection within {CONNECT_TIMEOUT:?}")))?
    .map_err(|e| unreachable(&e))?;
    let mut driver = Driver::client(io, transport_options(o));

    let user_agent = concat!("spoke-agent/", env!("CARGO_PKG_VERSION"));
    let authority = match host.contains(':') {
        true => format!("[{host}]:{port}"),
        false => format!("{host}:{port}"),
    };
    let mut req = grpc::request("https", &authority, "/AgentService/Connect", user_agent);
    let meta = |h: &mut Headers, key: &'static str, value: &str| {
        grpc::metadata(h, key, value).map_err(|e| anyhow!(e))
    };
    meta(&mut req, "agentid", &o.agent_id)?;
    meta(&mut req, "agentidentifiers", &o.agent_identifiers)?;
    let window = spoke_tunnel::flow::initial_window(o.max_connection_buffer_bytes).to_string();
    meta(&mut req, FLOW_CONTROL_HEADER, &window)?;
    if !o.service_account_token_path.is_empty() {
        // Re-read on every connect so rotated projected tokens are picked up.
        let path = &o.service_account_token_path;
        let token = std::fs::read_to_string(path)
            .map_err(|e| anyhow!("--service-account-token-path {path}: {e}"))?;
        meta(
            &mut req,
            "authorization",
            &format!("Bearer {}", token.trim_end()),
        )?;
    }
    let (id, headers) = driver.open(&req).await.map_err(|e| match e {
        Ended::Status(code, m) => anyhow!("server refused the tunnel: {code:?}: {m}"),
        other => anyhow!("server refused the tunnel: {other}"),
    })?;
    let server_id = header(&headers, "serverid")?;
    let server_count: u32 = header(&headers, "servercount")?
        .parse()
        .map_err(|_| anyhow!("servercount header is not a number"))?;
    let peer_window = headers
        .get(FLOW_CONTROL_HEADER)
        .and_then(|v| v.parse().ok())
        .filter(|w| *w > 0);
    let flow = FlowConfig {
        buffer_cap: o.max_connection_buffer_bytes,
        peer_window,
    };
    let (out, out_rx) = outbound(Some((agent.metrics.stream.clone(), "from_agent")));
    let end = AgentEnd::new(server_id, agent.endpoints.clone());
    let stream = Session::new(end, out, flow, agent.metrics.session("to_agent"));
    let ended = Arc::new(Mutex::new(None));
    let record = ended.clone();
    let on_end: spoke_tunnel::session::OnEnd = Box::new(move |how| {
        *record.lock().unwrap_or_else(|e| e.into_inner()) = Some(how.clone());
    });
    let end = SessionEnd::new(stream.clone(), out_rx, Some(on_end));
    driver.bind(id, Box::new(end));
    Ok(Connected {
        stream,
        server_count,
        driver,
        ended,
    })
}

impl Connected {
    /// Serves the stream until it ends, then closes everything that rode on it.
    pub async fn serve(self, agent: Arc<Agent>) -> String {
        let Connected {
            stream,
            driver,
            ended,
            ..
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
        let lost = driver.run().await.err();
        let how = ended.lock().unwrap_or_else(|e| e.into_inner()).take();
        let reason = match (how, lost) {
            (Some(how), _) => how.to_string(),
            (None, Some(e)) => e.to_string(),
            (None, None) => "connection closed".to_string(),
        };
        let (conns, _) = stream.close();
        drain.abort();
        tracing::info!(server_id = %stream.end.server_id, conns, "tunnel to server closed: {reason}");
        reason
    }
}
