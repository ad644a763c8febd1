//! gRPC frontend (`/ProxyService/Proxy`): one stream per tunnelled connection. The stream
//! starts with DIAL_REQ; once the agent answers, the stream is the connection's local end and
//! the shared relay runs over it through [`ClientReader`] and [`ClientWriter`]. Each direction
//! has its own bound: the agent's credit (the client stream is read only while the agent has
//! room, so HTTP/2 pushes back on the client) and the connection's inbox toward the client.
use super::frontend_gone;
use crate::metrics::MethodLabel;
use crate::Server;
use bytes::Bytes;
use spoke_proto::packet::Payload;
use spoke_proto::proxy_service_server::ProxyService;
use spoke_proto::{Packet, PacketType};
use spoke_tunnel::packet;
use spoke_tunnel::relay::{LocalRead, LocalWrite, Read};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

pub struct ProxySvc {
    pub server: Arc<Server>,
}

type PacketStream = Pin<Box<dyn futures::Stream<Item = Result<Packet, Status>> + Send>>;
type ToClient = mpsc::Sender<Result<Packet, Status>>;

#[tonic::async_trait]
impl ProxyService for ProxySvc {
    type ProxyStream = PacketStream;

    async fn proxy(
        &self,
        req: Request<Streaming<Packet>>,
    ) -> Result<Response<PacketStream>, Status> {
        let (tx, rx) = mpsc::channel(4);
        let server = self.server.clone();
        let inbound = req.into_inner();
        tokio::spawn(async move {
            let label = MethodLabel {
                service_method: "Proxy",
            };
            server.metrics.grpc_connections.get_or_create(&label).inc();
            serve(&server, inbound, tx).await;
            server.metrics.grpc_connections.get_or_create(&label).dec();
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

async fn send(server: &Server, tx: &ToClient, p: Packet) -> bool {
    server.metrics.stream.packet("to_client", p.r#type);
    tx.send(Ok(p)).await.is_ok()
}

async fn next(server: &Server, inbound: &mut Streaming<Packet>) -> Option<Packet> {
    match inbound.message().await {
        Ok(Some(p)) => {
            server.metrics.stream.packet("from_client", p.r#type);
            Some(p)
        }
        Ok(None) => None,
        Err(status) => {
            server
                .metrics
                .stream
                .error("from_client", status.code(), None);
            tracing::debug!(error = %status.message(), "frontend stream error");
            None
        }
    }
}

async fn serve(server: &Arc<Server>, mut inbound: Streaming<Packet>, tx: ToClient) {
    let Some(first) = next(server, &mut inbound).await else {
        return;
    };
    let req = match (PacketType::try_from(first.r#type), first.payload) {
        (Ok(PacketType::DialReq), Some(Payload::DialRequest(r))) => r,
        (Ok(PacketType::Data), Some(Payload::Data(d))) => {
            server.metrics.reject("data_before_dial");
            let reply = packet::close_rsp(d.connect_id, "backend uninitialized");
            send(server, &tx, reply).await;
            return;
        }
        (Ok(PacketType::CloseReq), Some(Payload::CloseRequest(c))) => {
            let reply = packet::close_rsp(c.connect_id, "backend uninitialized");
            send(server, &tx, reply).await;
            return;
        }
        (kind, _) => {
            server.metrics.reject("unexpected_packet");
            tracing::debug!(?kind, "frontend stream did not start with DIAL_REQ");
            return;
        }
    };
    let random = req.random;
    if req.protocol != "tcp" {
        let why = format!("protocol {:?} is not supported", req.protocol);
        send(server, &tx, packet::dial_err(random, why)).await;
        return;
    }
    let mut dial = match server.dial(&req.address, random) {
        Ok(d) => d,
        Err(e) => {
            send(server, &tx, packet::dial_err(random, e.message())).await;
            return;
        }
    };
    // Wait for the agent, while the client may cancel with DIAL_CLS or go away.
    let (connect_id, parts) = loop {
        tokio::select! {
            o = dial.outcome() => match o {
                Ok(ok) => break ok,
                Err(e) => {
                    send(server, &tx, packet::dial_err(random, e.message())).await;
                    return;
                }
            },
            p = next(server, &mut inbound) => match p {
                Some(p) if p.r#type == PacketType::DialCls as i32 => return, // dropping `dial` cancels it
                Some(_) => continue,
                None => return,
            },
        }
    };
    let agent = dial.agent.clone();
    drop(dial);
    if !send(server, &tx, packet::dial_ok(random, connect_id)).await {
        frontend_gone(&agent, connect_id).await;
        return;
    }
    let _established = server.metrics.established();
    let closed = Arc::new(AtomicBool::new(false));
    let reader = ClientReader {
        server: server.clone(),
        inbound,
        id: connect_id,
        rest: Bytes::new(),
        tx: tx.clone(),
        closed: closed.clone(),
    };
    let writer = ClientWriter {
        server: server.clone(),
        tx,
        id: connect_id,
        closed,
    };
    agent.relay(connect_id, parts).run(reader, writer).await;
}

/// The client's half of the stream as the relay reads it: DATA payloads for this connection,
/// CLOSE_REQ as a close the agent must answer, the stream's end as the client gone.
struct ClientReader {
    server: Arc<Server>,
    inbound: Streaming<Packet>,
    id: i64,
    /// What is left of a DATA payload larger than the agent's credit allowed at once.
    rest: Bytes,
    tx: ToClient,
    closed: Arc<AtomicBool>,
}

impl LocalRead for ClientReader {
    async fn read_chunk(&mut self, max: usize) -> io::Result<Read> {
        loop {
            if !self.rest.is_empty() {
                let n = self.rest.len().min(max);
                return Ok(Read::Bytes(self.rest.split_to(n)));
            }
            let Some(p) = next(&self.server, &mut self.inbound).await else {
                return Ok(Read::Eof);
            };
            match (PacketType::try_from(p.r#type), p.payload) {
                (Ok(PacketType::Data), Some(Payload::Data(d))) if d.connect_id == self.id => {
                    self.rest = d.data;
                }
                (Ok(PacketType::Data), Some(Payload::Data(d))) => {
                    self.server.metrics.reject("connection_id_mismatch");
                    tracing::warn!(
                        expected = self.id,
                        got = d.connect_id,
                        "frontend sent DATA for another connection; closing both"
                    );
                    self.closed.store(true, Ordering::Relaxed);
                    let reply = packet::close_rsp(self.id, "connectID mismatch");
                    let _ = self.tx.send(Ok(reply)).await;
                    return Err(io::Error::other("connectID mismatch"));
                }
                (Ok(PacketType::CloseReq), _) => return Ok(Read::CloseRequested),
                _ => {}
            }
        }
    }
}

/// The client's half of the stream as the relay writes it: DATA packets, then CLOSE_RSP.
struct ClientWriter {
    server: Arc<Server>,
    tx: ToClient,
    id: i64,
    /// Set once the client got its CLOSE_RSP another way.
    closed: Arc<AtomicBool>,
}

impl LocalWrite for ClientWriter {
    async fn write_chunk(&mut self, bytes: Bytes) -> io::Result<()> {
        if !self.closed.load(Ordering::Relaxed)
            && send(&self.server, &self.tx, packet::data(self.id, bytes)).await
        {
            Ok(())
        } else {
            Err(io::ErrorKind::BrokenPipe.into())
        }
    }

    async fn finish(&mut self) {
        if !self.closed.swap(true, Ordering::Relaxed) {
            send(&self.server, &self.tx, packet::close_rsp(self.id, "")).await;
        }
    }
}
