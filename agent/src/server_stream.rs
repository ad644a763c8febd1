//! One tunnel to one proxy server: connecting (mTLS, metadata, headers) and serving the
//! packets the server sends on it.
use crate::dial::dial;
use crate::Agent;
use anyhow::{anyhow, Context, Result};
use futures::StreamExt;
use hyper_util::rt::TokioIo;
use spoke_proto::agent_service_client::AgentServiceClient;
use spoke_proto::packet::Payload;
use spoke_proto::{DialRequest, Packet, PacketType};
use spoke_tunnel::outbound::{outbound, Outbound};
use spoke_tunnel::packet;
use spoke_tunnel::relay::{new_conn, ConnTable, Delivery, FlowConfig, Relay, SplitIo};
use spoke_tunnel::FLOW_CONTROL_HEADER;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::Endpoint;
use tonic::Streaming;

/// HTTP/2 windows sized for bulk transfer over long links.
const STREAM_WINDOW: u32 = 8 << 20;
const CONN_WINDOW: u32 = 16 << 20;
const MAX_FRAME: u32 = 1 << 20;

/// A live tunnel to one server.
pub struct ServerStream {
    pub server_id: String,
    pub outbound: Outbound,
    pub conns: Arc<ConnTable>,
    pending: Mutex<HashMap<i64, CancellationToken>>,
    next_id: AtomicI64,
    flow: FlowConfig,
}

/// A connected stream not yet being served.
pub struct Connected {
    pub stream: Arc<ServerStream>,
    pub server_count: u32,
    inbound: Streaming<Packet>,
}

fn header(md: &MetadataMap, key: &str) -> Result<String> {
    let values: Vec<_> = md.get_all(key).iter().collect();
    match values.as_slice() {
        [v] => Ok(v
            .to_str()
            .map_err(|_| anyhow!("{key} header is not ASCII"))?
            .to_string()),
        other => Err(anyhow!(
            "expected one {key} header from the server, got {}",
            other.len()
        )),
    }
}

fn meta(md: &mut MetadataMap, key: &'static str, value: &str) -> Result<()> {
    md.insert(
        key,
        MetadataValue::try_from(value).with_context(|| format!("invalid {key} value"))?,
    );
    Ok(())
}

/// Opens a new TCP+TLS connection and a `Connect` stream on it.
pub async fn connect(agent: &Arc<Agent>) -> Result<Connected> {
    let o = &agent.opts;
    let tls = tokio_rustls::TlsConnector::from(agent.tls.current());
    let name = spoke_tunnel::tls::server_name(&o.proxy_server_host)?;
    let target = (o.proxy_server_host.clone(), o.proxy_server_port);
    let connector = tower::service_fn(move |_: http::Uri| {
        let (tls, name, target) = (tls.clone(), name.clone(), target.clone());
        async move {
            let tcp = tokio::net::TcpStream::connect((target.0.as_str(), target.1)).await?;
            tcp.set_nodelay(true)?;
            let s = tls.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(s))
        }
    });
    let channel = Endpoint::from_shared(format!(
        "https://{}:{}",
        o.proxy_server_host, o.proxy_server_port
    ))?
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
    .map_err(|e| {
        anyhow!(
            "cannot reach proxy server {}:{}: {}",
            o.proxy_server_host,
            o.proxy_server_port,
            error_chain(&e)
        )
    })?;
    let mut client = AgentServiceClient::new(channel)
        .max_decoding_message_size(o.max_grpc_message_size)
        .max_encoding_message_size(o.max_grpc_message_size);

    let (out, out_rx) = outbound(Some((agent.metrics.stream.clone(), "from_agent")));
    let mut req = tonic::Request::new(out_rx);
    let md = req.metadata_mut();
    meta(md, "agentid", &o.agent_id)?;
    meta(md, "agentidentifiers", &o.agent_identifiers)?;
    meta(
        md,
        FLOW_CONTROL_HEADER,
        &o.max_connection_buffer_bytes.to_string(),
    )?;
    if !o.service_account_token_path.is_empty() {
        // Re-read on every connect so rotated projected tokens are picked up.
        let token = std::fs::read_to_string(&o.service_account_token_path).with_context(|| {
            format!(
                "--service-account-token-path {}",
                o.service_account_token_path
            )
        })?;
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
    let peer_window = header(headers, FLOW_CONTROL_HEADER)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|w| *w > 0);
    let flow = FlowConfig {
        buffer_cap: o.max_connection_buffer_bytes,
        peer_window,
    };
    Ok(Connected {
        stream: Arc::new(ServerStream {
            server_id,
            outbound: out,
            conns: Arc::new(ConnTable::default()),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicI64::new(1),
            flow,
        }),
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
            stream,
            mut inbound,
            ..
        } = self;
        // DRAIN goes out as soon as the agent starts draining, whenever this stream came up
        // (also one that connected while the signal arrived), without waiting for a packet.
        let mut drain_sent = false;
        let reason = loop {
            let msg = tokio::select! {
                m = inbound.next() => m,
                _ = stream.outbound.closed.cancelled() => break "stream failed".to_string(),
                _ = agent.drain.cancelled(), if !drain_sent => {
                    drain_sent = true;
                    if stream.outbound.control(packet::drain()).is_ok() {
                        tracing::info!(server_id = %stream.server_id, "sent DRAIN");
                    }
                    continue;
                }
            };
            match msg {
                Some(Ok(p)) => {
                    agent.metrics.stream.packet("to_agent", p.r#type);
                    stream.handle(&agent, p);
                }
                None => break "server closed the stream".to_string(),
                Some(Err(status)) => {
                    agent.metrics.stream.error("to_agent", status.code(), None);
                    break format!("stream error: {:?}: {}", status.code(), status.message());
                }
            }
        };
        stream.outbound.closed.cancel();
        let conns = stream.conns.close_all();
        for (_, cancel) in stream.lock_pending().drain() {
            cancel.cancel();
        }
        tracing::info!(server_id = %stream.server_id, conns, "tunnel to server closed: {reason}");
        reason
    }
}

impl ServerStream {
    fn lock_pending(&self) -> std::sync::MutexGuard<'_, HashMap<i64, CancellationToken>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn handle(self: &Arc<Self>, agent: &Arc<Agent>, p: Packet) {
        let out = &self.outbound;
        match (PacketType::try_from(p.r#type), p.payload) {
            (Ok(PacketType::DialReq), Some(Payload::DialRequest(req))) => {
                self.start_dial(agent, req)
            }
            (Ok(PacketType::DialCls), Some(Payload::CloseDial(c))) => {
                // Upstream agents ignore this; we cancel the dial so nothing is left behind.
                if let Some(cancel) = self.lock_pending().remove(&c.random) {
                    tracing::debug!(random = c.random, "dial cancelled by server");
                    cancel.cancel();
                }
            }
            (Ok(PacketType::Data), Some(Payload::Data(d))) => {
                let id = d.connect_id;
                match self.conns.deliver(
                    id,
                    d.data,
                    Some(packet::close_rsp(id, "receive buffer overflow")),
                ) {
                    Delivery::Queued => {}
                    Delivery::Unknown => {
                        agent.metrics.reject("unknown_connection");
                        let _ = out.control(packet::close_rsp(id, "unrecognized connectID"));
                    }
                    Delivery::Overflow => {
                        agent.metrics.relay.closed("buffer_overflow");
                        tracing::warn!(
                            connection_id = id,
                            "server sent past the connection's buffer; closed it"
                        );
                    }
                }
            }
            (Ok(PacketType::CloseReq), Some(Payload::CloseRequest(c))) => {
                let id = c.connect_id;
                if !self.conns.close(id, Some(packet::close_rsp(id, ""))) {
                    let _ = out.control(packet::close_rsp(id, "Unknown connectID"));
                }
            }
            (Ok(PacketType::SpokeCredit), Some(Payload::Credit(c))) => {
                self.conns.grant(c.connect_id, c.bytes);
            }
            (kind, _) => {
                agent.metrics.reject("unexpected_packet");
                tracing::debug!(?kind, "ignoring unexpected packet from server");
            }
        }
    }

    /// Dials in its own task: a slow endpoint never holds up the stream.
    fn start_dial(self: &Arc<Self>, agent: &Arc<Agent>, req: DialRequest) {
        let random = req.random;
        if req.protocol != "tcp" {
            let _ = self.outbound.control(packet::dial_err(
                random,
                format!("protocol {:?} is not supported", req.protocol),
            ));
            return;
        }
        if let Some(limit) = agent.over_limit() {
            let _ = self.outbound.control(packet::dial_err(
                random,
                format!("agent limit reached: {limit}"),
            ));
            return;
        }
        let cancel = CancellationToken::new();
        {
            let mut pending = self.lock_pending();
            if pending.contains_key(&random) {
                agent.metrics.reject("duplicate_dial");
                let _ = self
                    .outbound
                    .control(packet::dial_err(random, "duplicate dial id".into()));
                return;
            }
            pending.insert(random, cancel.clone());
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (me, agent) = (self.clone(), agent.clone());
        agent.metrics.pending_dials.inc();
        tokio::spawn(async move {
            let started = Instant::now();
            let result = tokio::select! {
                r = dial(&req.address, agent.opts.dial_timeout, &agent.ebpf, &agent.destinations) => Some(r),
                _ = cancel.cancelled() => None,
            };
            agent.metrics.pending_dials.dec();
            let Some(result) = result else { return };
            if me.lock_pending().remove(&random).is_none() {
                return; // cancelled while finishing; the socket is dropped
            }
            let tcp = match result {
                Ok(tcp) => tcp,
                Err(f) => {
                    agent.metrics.dial_failure(f.reason);
                    tracing::info!(address = %req.address, error = %f.text, "dial failed");
                    let _ = me.outbound.control(packet::dial_err(random, f.text));
                    return;
                }
            };
            agent
                .metrics
                .dial_duration
                .observe(started.elapsed().as_secs_f64());
            let (entry, parts) = new_conn(me.flow, &agent.metrics.relay);
            me.conns.insert(id, entry);
            if me.outbound.control(packet::dial_ok(random, id)).is_err() {
                me.conns.close(id, None);
                return;
            }
            tracing::debug!(address = %req.address, connection_id = id, "endpoint connected");
            agent.metrics.open_endpoint_connections.inc();
            let (reader, writer) = tcp.split_io();
            Relay {
                id,
                table: me.conns.clone(),
                outbound: me.outbound.clone(),
                parts,
                flow: me.flow,
                local_close: packet::close_rsp(id, ""),
                metrics: agent.metrics.relay.clone(),
            }
            .run(reader, writer)
            .await;
            agent.metrics.open_endpoint_connections.dec();
            tracing::debug!(connection_id = id, "endpoint connection closed");
        });
    }
}
