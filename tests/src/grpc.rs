//! gRPC clients built on the generated stubs: frontend `ProxyService/Proxy` streams and fake
//! agents on `AgentService/Connect`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use spoke_proto::agent_service_client::AgentServiceClient;
use spoke_proto::packet::Payload;
use spoke_proto::proxy_service_client::ProxyServiceClient;
use spoke_proto::{CloseRequest, Data, DialRequest, DialResponse, Packet, PacketType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::BoxIo;

/// Decoding limit of the test clients (generous: they must see what the server sends).
const CLIENT_MAX_MESSAGE: usize = 256 * 1024 * 1024;

/// h2c channel over the Unix socket at `path`.
pub async fn uds_channel(path: &Path) -> anyhow::Result<Channel> {
    let path: PathBuf = path.to_path_buf();
    let connector = tower::service_fn(move |_| {
        let path = path.clone();
        async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
    });
    Endpoint::from_static("http://localhost")
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(connector)
        .await
        .context("gRPC connect over UDS")
}

/// mTLS channel to `addr` (`config` should offer ALPN `h2`).
pub async fn tls_channel(addr: SocketAddr, config: Arc<ClientConfig>) -> anyhow::Result<Channel> {
    let connector = tower::service_fn(move |_| {
        let config = config.clone();
        async move { Ok::<_, std::io::Error>(TokioIo::new(crate::tls::connect(addr, config).await?)) }
    });
    Endpoint::from_static("https://localhost")
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(connector)
        .await
        .context("gRPC connect over TLS")
}

/// `DIAL_REQ` for a TCP `address`.
pub fn dial_request(address: &str, random: i64) -> Packet {
    Packet {
        r#type: PacketType::DialReq as i32,
        payload: Some(Payload::DialRequest(DialRequest {
            protocol: "tcp".into(),
            address: address.into(),
            random,
        })),
    }
}

/// `DATA` for `connect_id`.
pub fn data(connect_id: i64, bytes: impl Into<bytes::Bytes>) -> Packet {
    Packet {
        r#type: PacketType::Data as i32,
        payload: Some(Payload::Data(Data {
            connect_id,
            error: String::new(),
            data: bytes.into(),
        })),
    }
}

/// `CLOSE_REQ` for `connect_id`.
pub fn close_request(connect_id: i64) -> Packet {
    Packet {
        r#type: PacketType::CloseReq as i32,
        payload: Some(Payload::CloseRequest(CloseRequest { connect_id })),
    }
}

/// The packet's type (unknown values map to an error string).
pub fn kind(p: &Packet) -> Result<PacketType, String> {
    PacketType::try_from(p.r#type).map_err(|_| format!("unknown packet type {}", p.r#type))
}

/// A bidirectional `Packet` stream (either service).
#[derive(Debug)]
pub struct PacketStream {
    tx: mpsc::Sender<Packet>,
    rx: tonic::Streaming<Packet>,
    /// Response metadata (headers) the server sent.
    pub headers: tonic::metadata::MetadataMap,
}

impl PacketStream {
    fn new_call(initial: Vec<Packet>) -> (mpsc::Sender<Packet>, ReceiverStream<Packet>) {
        let (tx, rx) = mpsc::channel(64 + initial.len());
        for p in initial {
            tx.try_send(p).expect("queue initial packet");
        }
        (tx, ReceiverStream::new(rx))
    }

    /// Opens a `/ProxyService/Proxy` stream with `initial` packets queued before the call starts
    /// (a server may hold its response headers until it has something to answer).
    pub async fn proxy(channel: Channel, initial: Vec<Packet>) -> anyhow::Result<Self> {
        let (tx, outbound) = Self::new_call(initial);
        let mut client =
            ProxyServiceClient::new(channel).max_decoding_message_size(CLIENT_MAX_MESSAGE);
        let resp = tokio::time::timeout(Duration::from_secs(10), client.proxy(outbound))
            .await
            .context("Proxy call: no response headers within 10 s")?
            .context("Proxy call")?;
        let headers = resp.metadata().clone();
        Ok(Self {
            tx,
            rx: resp.into_inner(),
            headers,
        })
    }

    /// Opens `/AgentService/Connect` as agent `agent_id` with `identifiers`.
    pub async fn agent(
        channel: Channel,
        agent_id: &str,
        identifiers: &str,
    ) -> anyhow::Result<Self> {
        Self::agent_with(channel, agent_id, identifiers, &[]).await
    }

    /// [`PacketStream::agent`] with more request metadata (`spoke-flow-control`, say).
    pub async fn agent_with(
        channel: Channel,
        agent_id: &str,
        identifiers: &str,
        metadata: &[(&'static str, &str)],
    ) -> anyhow::Result<Self> {
        let (tx, outbound) = Self::new_call(Vec::new());
        let mut req = tonic::Request::new(outbound);
        req.metadata_mut().insert("agentid", agent_id.parse()?);
        req.metadata_mut()
            .insert("agentidentifiers", identifiers.parse()?);
        for (key, value) in metadata {
            req.metadata_mut().insert(*key, value.parse()?);
        }
        let mut client =
            AgentServiceClient::new(channel).max_decoding_message_size(CLIENT_MAX_MESSAGE);
        let resp = tokio::time::timeout(Duration::from_secs(10), client.connect(req))
            .await
            .context("Connect call: no response headers within 10 s")?
            .context("Connect call")?;
        let headers = resp.metadata().clone();
        Ok(Self {
            tx,
            rx: resp.into_inner(),
            headers,
        })
    }

    /// Queues a packet for sending.
    pub async fn send(&self, p: Packet) -> anyhow::Result<()> {
        self.tx
            .send(p)
            .await
            .map_err(|_| anyhow::anyhow!("request stream already closed"))
    }

    /// Next packet; `Ok(None)` when the server ended the stream cleanly, `Err` on a gRPC error
    /// status or when nothing arrives within `timeout`.
    pub async fn recv(&mut self, timeout: Duration) -> anyhow::Result<Option<Packet>> {
        match tokio::time::timeout(timeout, self.rx.message()).await {
            Err(_) => anyhow::bail!("no packet within {timeout:?}"),
            Ok(r) => r.map_err(|s| {
                anyhow::anyhow!("stream ended with status {:?}: {}", s.code(), s.message())
            }),
        }
    }

    /// Receives until a packet of type `want` arrives, passing the others to `other`.
    pub async fn recv_until(
        &mut self,
        want: PacketType,
        timeout: Duration,
        mut other: impl FnMut(&Packet),
    ) -> anyhow::Result<Packet> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let p = self
                .recv(left)
                .await?
                .with_context(|| format!("stream ended while waiting for {want:?}"))?;
            if kind(&p) == Ok(want) {
                return Ok(p);
            }
            other(&p);
        }
    }

    /// Sends `DIAL_REQ` (if not already queued via `initial`) and waits for the `DIAL_RSP`.
    pub async fn await_dial_response(&mut self) -> anyhow::Result<DialResponse> {
        let p = self
            .recv_until(PacketType::DialRsp, Duration::from_secs(15), |_| {})
            .await?;
        match p.payload {
            Some(Payload::DialResponse(r)) => Ok(r),
            other => anyhow::bail!("DIAL_RSP without dialResponse payload: {other:?}"),
        }
    }
}

/// Opens a Proxy stream and dials `address`; returns the stream and the `DIAL_RSP`.
pub async fn dial(
    channel: Channel,
    address: &str,
    random: i64,
) -> anyhow::Result<(PacketStream, DialResponse)> {
    let mut stream = PacketStream::proxy(channel, vec![dial_request(address, random)]).await?;
    let rsp = stream.await_dial_response().await?;
    Ok((stream, rsp))
}

/// A random positive dial id (`random` of DIAL_REQ).
pub fn random_id() -> i64 {
    (rand::random::<i64>() & i64::MAX) | 1
}

/// One short dial + echo + close through a Proxy stream on `channel` to the echo server `echo`.
pub async fn echo_roundtrip(channel: Channel, echo: &str) -> anyhow::Result<()> {
    let (mut stream, rsp) = dial(channel, echo, random_id()).await?;
    anyhow::ensure!(
        rsp.error.is_empty() && rsp.connect_id != 0,
        "dial failed: {rsp:?}"
    );
    let msg = b"spoke grpc probe";
    stream.send(data(rsp.connect_id, &msg[..])).await?;
    let mut got = Vec::new();
    while got.len() < msg.len() {
        let p = stream
            .recv(Duration::from_secs(10))
            .await?
            .context("stream ended before the echo")?;
        match p.payload {
            Some(Payload::Data(d)) => got.extend_from_slice(&d.data),
            other => anyhow::bail!("expected DATA, got {other:?}"),
        }
    }
    anyhow::ensure!(
        got == msg,
        "echo returned {:?}",
        String::from_utf8_lossy(&got)
    );
    stream.send(close_request(rsp.connect_id)).await?;
    stream
        .recv_until(PacketType::CloseRsp, Duration::from_secs(10), |_| {})
        .await?;
    Ok(())
}

/// [`echo_roundtrip`] over a fresh connection to the Unix socket at `path`.
pub async fn uds_echo_roundtrip(path: &Path, echo: &str) -> anyhow::Result<()> {
    echo_roundtrip(uds_channel(path).await?, echo).await
}

/// Dials `address` through a Proxy stream on `channel` and hands the tunnel back as a byte
/// stream, as konnectivity-client gives kube-apiserver a `net.Conn`, so the same client code
/// runs over either frontend. Written bytes go out as DATA; received DATA is read back; reads
/// see EOF when the server sends CLOSE_RSP or ends the stream (anything else, an error status
/// included, is printed and also ends it: a caller that expects more bytes then fails). Closing
/// or dropping the stream sends CLOSE_REQ (the protocol has no half-close).
pub async fn tunnel(channel: Channel, address: &str) -> anyhow::Result<BoxIo> {
    let (stream, rsp) = dial(channel, address, random_id()).await?;
    anyhow::ensure!(
        rsp.error.is_empty() && rsp.connect_id != 0,
        "dial {address} failed: {rsp:?}"
    );
    let id = rsp.connect_id;
    let PacketStream { tx, mut rx, .. } = stream;
    let (mine, theirs) = tokio::io::duplex(crate::backends::CHUNK);
    let (mut from_client, mut to_client) = tokio::io::split(mine);
    // Up and down are separate tasks, so a client that writes without reading cannot stall
    // the packets coming back.
    tokio::spawn(async move {
        let mut buf = vec![0u8; crate::backends::CHUNK];
        loop {
            match from_client.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send(data(id, buf[..n].to_vec())).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = tx.send(close_request(id)).await;
    });
    tokio::spawn(async move {
        let end = loop {
            match rx.message().await {
                Ok(Some(Packet {
                    payload: Some(Payload::Data(d)),
                    ..
                })) if d.connect_id == id => {
                    if to_client.write_all(&d.data).await.is_err() {
                        // The client is gone; keep reading until the server confirms.
                        continue;
                    }
                }
                Ok(Some(p)) if kind(&p) == Ok(PacketType::CloseRsp) => break None,
                Ok(Some(p)) => break Some(format!("unexpected packet {p:?}")),
                Ok(None) => break Some("stream ended without CLOSE_RSP".to_string()),
                Err(s) => break Some(format!("stream error {:?}: {}", s.code(), s.message())),
            }
        };
        if let Some(why) = end {
            eprintln!("gRPC tunnel to connection {id}: {why}");
        }
        let _ = to_client.shutdown().await;
    });
    Ok(Box::new(theirs))
}
