//! gRPC frontend (`/ProxyService/Proxy`): one stream per tunnelled connection, served by
//! Spoke's HTTP/2 (so any `:authority` a gRPC client sends is fine: Spoke never reads it).
//! The stream starts with DIAL_REQ; once the agent answers, the stream is the connection's
//! local end and the shared relay runs over it through [`ClientReader`] and
//! [`ClientWriter`]. Each direction has its own bound: the client stream's HTTP/2 window (the
//! client's packets are taken only while the agent has credit, and the window opens only as
//! they are taken) and the connection's inbox toward the client.
use super::frontend_gone;
use crate::metrics::MethodLabel;
use crate::Server;
use bytes::Bytes;
use futures::future::BoxFuture;
use spoke_proto::packet::Payload;
use spoke_proto::{Packet, PacketType};
use spoke_tunnel::http2::driver::{Accepted, Acceptor, Ended, StreamEnd};
use spoke_tunnel::http2::grpc;
use spoke_tunnel::http2::headers::Headers;
use spoke_tunnel::packet;
use spoke_tunnel::relay::{LocalRead, LocalWrite, Read};
use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use tokio::sync::mpsc;
use tonic::Code;

/// Packets to the client wait here for the stream's window (a few: the inbox bounds the rest).
const TO_CLIENT_QUEUE: usize = 4;

const PROXY: MethodLabel = MethodLabel {
    service_method: "Proxy",
};

/// Takes `/ProxyService/Proxy` streams.
pub struct ProxyPort {
    pub server: Arc<Server>,
}

impl Acceptor for ProxyPort {
    fn accept(&mut self, path: &str, _: Headers) -> BoxFuture<'static, Accepted> {
        let reply = if path == "/ProxyService/Proxy" {
            let (tx, rx) = mpsc::channel(TO_CLIENT_QUEUE);
            let queue = Arc::new(Queue::default());
            let server = self.server.clone();
            let inbound = ClientPackets {
                queue: queue.clone(),
            };
            tokio::spawn(async move {
                server.metrics.grpc_connections.get_or_create(&PROXY).inc();
                serve(&server, inbound, tx).await;
                server.metrics.grpc_connections.get_or_create(&PROXY).dec();
            });
            let end = ProxyEnd {
                server: self.server.clone(),
                queue,
                out: rx,
            };
            Ok((grpc::response(), Box::new(end) as Box<dyn StreamEnd>))
        } else {
            Err((Code::Unimplemented, format!("unknown method {path}")))
        };
        Box::pin(std::future::ready(reply))
    }
}

/// Packets from the client on their way to the frontend's task.
#[derive(Default)]
struct Queue(Mutex<QueueState>);

#[derive(Default)]
struct QueueState {
    packets: VecDeque<(Packet, usize)>,
    /// The stream is over: no more packets come.
    closed: bool,
    /// Bytes of packets taken since the driver last asked.
    consumed: usize,
    reader: Option<Waker>,
    driver: Option<Waker>,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The driver's side of a Proxy stream.
struct ProxyEnd {
    server: Arc<Server>,
    queue: Arc<Queue>,
    out: mpsc::Receiver<Packet>,
}

impl StreamEnd for ProxyEnd {
    fn packet(&mut self, p: Packet, size: usize) -> Result<(), (Code, String)> {
        let mut q = self.queue.lock();
        q.packets.push_back((p, size));
        if let Some(w) = q.reader.take() {
            w.wake();
        }
        Ok(())
    }

    fn poll_packet(&mut self, cx: &mut Context<'_>) -> Poll<Option<Packet>> {
        self.out.poll_recv(cx)
    }

    fn ended(&mut self, how: &Ended) {
        if let Ended::Status(code, _) = how {
            if *code != Code::Ok {
                self.server.metrics.stream.error("from_client", *code, None);
            }
        }
        self.out.close();
        let mut q = self.queue.lock();
        q.closed = true;
        if let Some(w) = q.reader.take() {
            w.wake();
        }
    }

    fn defers_window(&self) -> bool {
        true
    }

    fn poll_consumed(&mut self, cx: &mut Context<'_>) -> usize {
        let mut q = self.queue.lock();
        let n = std::mem::take(&mut q.consumed);
        if n == 0 {
            q.driver = Some(cx.waker().clone());
        }
        n
    }
}

/// The frontend task's view of the packets its client sends.
struct ClientPackets {
    queue: Arc<Queue>,
}

impl ClientPackets {
    /// The next packet; `None` once the stream is over.
    async fn next(&mut self) -> Option<Packet> {
        std::future::poll_fn(|cx| {
            let mut q = self.queue.lock();
            if let Some((p, size)) = q.packets.pop_front() {
                q.consumed += size;
                if let Some(w) = q.driver.take() {
                    w.wake();
                }
                return Poll::Ready(Some(p));
            }
            if q.closed {
                return Poll::Ready(None);
            }
            q.reader = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }
}

type ToClient = mpsc::Sender<Packet>;

async fn send(server: &Server, tx: &ToClient, p: Packet) -> bool {
    server.metrics.to_client.inc(p.r#type);
    tx.send(p).await.is_ok()
}

async fn next(server: &Server, inbound: &mut ClientPackets) -> Option<Packet> {
    let p = inbound.next().await?;
    server.metrics.from_client.inc(p.r#type);
    Some(p)
}

async fn serve(server: &Arc<Server>, mut inbound: ClientPackets, tx: ToClient) {
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
    inbound: ClientPackets,
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
                    let _ = send(&self.server, &self.tx, reply).await;
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
