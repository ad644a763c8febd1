//! HTTP CONNECT frontend, as kube-apiserver's HTTPConnect egress uses it:
//! `CONNECT host:port HTTP/1.1` → `200 Connection Established` (nothing after the header),
//! then raw bytes both ways until either side closes.
use super::{frontend_gone, Dial, DialError};
use crate::Server;
use bytes::BytesMut;
use rand::Rng;
use spoke_tunnel::connect_head::{self, Head};
use spoke_tunnel::conns::ConnParts;
use spoke_tunnel::packet;
use spoke_tunnel::relay::{SplitIo, CHUNK};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Reads until the CONNECT head is complete; `None` if the client closed first.
async fn read_head<S: AsyncReadExt + Unpin>(io: &mut S) -> std::io::Result<Option<Head>> {
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        if io.read_buf(&mut buf).await? == 0 {
            return Ok(None);
        }
        if let Some(head) = connect_head::parse(&mut buf) {
            return Ok(Some(head));
        }
    }
}

fn reason(code: u16) -> &'static str {
    match code {
        400 => "Bad Request",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

async fn respond<S: AsyncWriteExt + Unpin>(io: &mut S, code: u16, body: &str) {
    let msg = format!(
        "HTTP/1.1 {code} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        reason(code),
        body.len()
    );
    let _ = io.write_all(msg.as_bytes()).await;
    let _ = io.shutdown().await;
}

/// Counts a live frontend connection in a gauge until dropped.
struct Live<'a>(&'a prometheus_client::metrics::gauge::Gauge);
impl Drop for Live<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Waits for the agent's answer while watching the client: `None` if it hung up first (so
/// the abandoned dial can be cancelled instead of holding a pending slot). Bytes it sends
/// meanwhile join `rest`, up to one chunk; past that only the answer is awaited.
async fn wait_watching_client<S: AsyncReadExt + Unpin>(
    dial: &mut Dial,
    io: &mut S,
    rest: &mut BytesMut,
) -> Option<Result<(i64, ConnParts), DialError>> {
    let answer = dial.outcome();
    tokio::pin!(answer);
    loop {
        tokio::select! {
            a = &mut answer => return Some(a),
            r = io.read_buf(rest), if rest.len() < CHUNK => match r {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            },
        }
    }
}

/// Serves one accepted frontend connection (Unix socket or TLS).
pub async fn serve<S: SplitIo>(server: Arc<Server>, mut io: S) {
    server.metrics.http_connections.inc();
    let _live = Live(&server.metrics.http_connections);
    let head =
        match tokio::time::timeout(server.opts.frontend_header_timeout, read_head(&mut io)).await {
            Ok(Ok(Some(h))) => h,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "frontend read failed before the request head");
                return;
            }
            Err(_) => {
                server.metrics.reject("header_timeout");
                tracing::info!("frontend sent no complete request head in time; closing");
                return;
            }
        };
    let (address, mut rest) = match head {
        Head::Connect { address, rest } => (address, rest),
        Head::Refuse(code, why) => {
            server.metrics.reject("bad_request");
            tracing::info!(code, why, "refused frontend request");
            respond(&mut io, code, why).await;
            return;
        }
    };
    let random = rand::rng().random_range(1..i64::MAX);
    let outcome = match server.dial(&address, random) {
        Ok(mut dial) => {
            let agent = dial.agent.clone();
            match wait_watching_client(&mut dial, &mut io, &mut rest).await {
                Some(answer) => answer.map(|c| (agent, c)),
                None => {
                    // Dropping `dial` frees its slot and sends DIAL_CLS to the agent.
                    tracing::debug!(address, "frontend went away while its dial was pending");
                    return;
                }
            }
        }
        Err(e) => Err(e),
    };
    let (agent, (connect_id, parts)) = match outcome {
        Ok(ok) => ok,
        Err(e) => {
            let body = match &e {
                DialError::NoAgent => format!("currently no tunnels available: {}", e.message()),
                _ => e.message(),
            };
            tracing::info!(address, error = %body, "dial failed");
            respond(&mut io, e.http_status(), &body).await;
            return;
        }
    };
    tracing::debug!(address, connection_id = connect_id, agent_id = %agent.end.agent_id, "tunnel established");
    if io
        .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        .await
        .is_err()
    {
        frontend_gone(&agent, connect_id).await;
        return;
    }
    // Bytes the client sent right behind its request head belong to the tunnel.
    if !rest.is_empty() {
        parts.window.spend(rest.len());
        let _ = agent
            .outbound
            .data(packet::data(connect_id, rest.freeze()))
            .await;
    }
    let _established = server.metrics.established();
    let (reader, writer) = io.split_io();
    agent.relay(connect_id, parts).run(reader, writer).await;
    tracing::debug!(connection_id = connect_id, "tunnel closed");
}
