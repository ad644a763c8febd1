//! gRPC frontend (`/ProxyService/Proxy`): one stream per tunnelled connection, packets
//! forwarded between kube-apiserver and the agent. Each direction has its own bound: the
//! agent's credit (we read the client stream only while the agent has room, so HTTP/2
//! pushes back on the client) and this connection's inbox toward the client.
use crate::metrics::MethodLabel;
use crate::state::State;
use bytes::Bytes;
use spoke_proto::packet::Payload;
use spoke_proto::proxy_service_server::ProxyService;
use spoke_proto::{Packet, PacketType};
use spoke_tunnel::flow::CreditReturn;
use spoke_tunnel::packet;
use spoke_tunnel::relay::{ConnParts, PeerClose, CHUNK};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// How long we wait for the agent's CLOSE_RSP after forwarding the client's CLOSE_REQ.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a closing connection may take to hand its last bytes to a slow client.
const FLUSH_GRACE: Duration = Duration::from_secs(10);

pub struct ProxySvc {
    pub state: Arc<State>,
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
        let state = self.state.clone();
        let inbound = req.into_inner();
        tokio::spawn(async move {
            let label = MethodLabel {
                service_method: "Proxy",
            };
            state.metrics.grpc_connections.get_or_create(&label).inc();
            serve(&state, inbound, tx).await;
            state.metrics.grpc_connections.get_or_create(&label).dec();
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

async fn send(state: &State, tx: &ToClient, p: Packet) -> bool {
    state.metrics.stream.packet("to_client", p.r#type);
    tx.send(Ok(p)).await.is_ok()
}

async fn next(state: &State, inbound: &mut Streaming<Packet>) -> Option<Packet> {
    match inbound.message().await {
        Ok(Some(p)) => {
            state.metrics.stream.packet("from_client", p.r#type);
            Some(p)
        }
        Ok(None) => None,
        Err(status) => {
            state
                .metrics
                .stream
                .error("from_client", status.code(), None);
            tracing::debug!(error = %status.message(), "frontend stream error");
            None
        }
    }
}

async fn serve(state: &Arc<State>, mut inbound: Streaming<Packet>, tx: ToClient) {
    let Some(first) = next(state, &mut inbound).await else {
        return;
    };
    let req = match (PacketType::try_from(first.r#type), first.payload) {
        (Ok(PacketType::DialReq), Some(Payload::DialRequest(r))) => r,
        (Ok(PacketType::Data), Some(Payload::Data(d))) => {
            state.metrics.reject("data_before_dial");
            send(
                state,
                &tx,
                packet::close_rsp(d.connect_id, "backend uninitialized"),
            )
            .await;
            return;
        }
        (Ok(PacketType::CloseReq), Some(Payload::CloseRequest(c))) => {
            send(
                state,
                &tx,
                packet::close_rsp(c.connect_id, "backend uninitialized"),
            )
            .await;
            return;
        }
        (kind, _) => {
            state.metrics.reject("unexpected_packet");
            tracing::debug!(?kind, "frontend stream did not start with DIAL_REQ");
            return;
        }
    };
    let random = req.random;
    if req.protocol != "tcp" {
        send(
            state,
            &tx,
            packet::dial_err(
                random,
                format!("protocol {:?} is not supported", req.protocol),
            ),
        )
        .await;
        return;
    }
    let mut dial = match state.start_dial(&req.address, random) {
        Ok(d) => d,
        Err(e) => {
            send(state, &tx, packet::dial_err(random, e.message())).await;
            return;
        }
    };
    // Wait for the agent, while the client may cancel with DIAL_CLS or go away.
    let (connect_id, parts) = loop {
        tokio::select! {
            o = dial.outcome() => match o {
                Ok(ok) => break ok,
                Err(e) => {
                    send(state, &tx, packet::dial_err(random, e.message())).await;
                    return;
                }
            },
            p = next(state, &mut inbound) => match p {
                Some(p) if p.r#type == PacketType::DialCls as i32 => return, // dropping `dial` cancels it
                Some(_) => continue,
                None => return,
            },
        }
    };
    let backend = dial.backend.clone();
    drop(dial);
    if !send(state, &tx, packet::dial_ok(random, connect_id)).await {
        if backend.conns.close(connect_id, None) {
            let _ = backend.outbound.data(packet::close_req(connect_id)).await;
        }
        return;
    }
    let _established = state.metrics.established();
    relay(state, &backend, connect_id, parts, inbound, tx).await;
}

/// Moves packets between the client stream and the agent until the connection closes.
async fn relay(
    state: &State,
    backend: &crate::backends::Backend,
    id: i64,
    parts: ConnParts,
    mut inbound: Streaming<Packet>,
    tx: ToClient,
) {
    let ConnParts {
        mut inbox,
        window,
        mut closer,
        ..
    } = parts;
    let mut credit = backend
        .flow
        .credits()
        .then(|| CreditReturn::new(backend.flow.buffer_cap));
    let out = &backend.outbound;
    let mut to_client: Option<Bytes> = None;
    // When the chunk in `to_client` started waiting for the client stream (the write latency).
    let mut write_started = None;
    let mut to_agent: Option<Bytes> = None;
    let mut client_open = true;
    let mut inbox_open = true;
    let close_deadline = tokio::time::sleep(Duration::MAX);
    tokio::pin!(close_deadline);
    let mut closing = false;

    let peer_closed = loop {
        tokio::select! {
            biased;
            peer = &mut closer => break peer.ok(),
            b = inbox.recv(), if to_client.is_none() && inbox_open => match b {
                Some(b) => {
                    // Out of the buffer now, whatever happens to the client.
                    inbox.consumed(b.len());
                    to_client = Some(b);
                    write_started = state.metrics.relay.write_started();
                }
                None => inbox_open = false,
            },
            permit = tx.reserve(), if to_client.is_some() => {
                let Ok(permit) = permit else {
                    client_gone(backend, id).await;
                    return;
                };
                let b = to_client.take().unwrap_or_default();
                let n = b.len();
                state.metrics.stream.packet("to_client", PacketType::Data as i32);
                permit.send(Ok(packet::data(id, b)));
                state.metrics.relay.write_done(write_started.take());
                state.metrics.relay.relayed(spoke_tunnel::metrics::TO_ENDPOINT, n);
                if let Some(grant) = credit.as_mut().and_then(|c| c.drained(n)) {
                    let _ = out.control(packet::credit(id, grant as i64));
                }
            }
            n = window.ready(to_agent.as_ref().map_or(0, |b| b.len().min(CHUNK))), if to_agent.is_some() => {
                let mut rest = to_agent.take().unwrap_or_default();
                let piece = rest.split_to(n.min(rest.len()));
                if !rest.is_empty() {
                    to_agent = Some(rest);
                }
                window.spend(piece.len());
                state.metrics.relay.relayed(spoke_tunnel::metrics::TO_TUNNEL, piece.len());
                if out.data(packet::data(id, piece)).await.is_err() {
                    break None;
                }
            }
            p = next(state, &mut inbound), if client_open && to_agent.is_none() => match p {
                None => {
                    client_gone(backend, id).await;
                    return;
                }
                Some(p) => match (PacketType::try_from(p.r#type), p.payload) {
                    (Ok(PacketType::Data), Some(Payload::Data(d))) if d.connect_id == id && !d.data.is_empty() => {
                        to_agent = Some(d.data);
                    }
                    (Ok(PacketType::Data), Some(Payload::Data(d))) if d.connect_id == id => {}
                    (Ok(PacketType::Data), Some(Payload::Data(d))) => {
                        state.metrics.reject("connection_id_mismatch");
                        tracing::warn!(expected = id, got = d.connect_id, "frontend sent DATA for another connection; closing both");
                        if backend.conns.close(id, None) {
                            let _ = out.data(packet::close_req(id)).await;
                        }
                        let _ = tx.send(Ok(packet::close_rsp(id, "connectID mismatch"))).await;
                        return;
                    }
                    (Ok(PacketType::CloseReq), _) => {
                        // Forward after any data we already sent; the agent's CLOSE_RSP ends us.
                        let _ = out.data(packet::close_req(id)).await;
                        client_open = false;
                        closing = true;
                        close_deadline.as_mut().reset(tokio::time::Instant::now() + CLOSE_TIMEOUT);
                    }
                    _ => {}
                },
            },
            _ = &mut close_deadline, if closing => {
                tracing::debug!(connection_id = id, "agent did not answer CLOSE_REQ in time");
                backend.conns.close(id, None);
                break None;
            }
        }
    };
    // The agent closed (or went away): hand over what it sent, then CLOSE_RSP.
    let flush = async {
        if let Some(b) = to_client.take() {
            if tx.send(Ok(packet::data(id, b))).await.is_err() {
                return;
            }
        }
        while let Some(b) = inbox.try_recv() {
            inbox.consumed(b.len());
            if tx.send(Ok(packet::data(id, b))).await.is_err() {
                return;
            }
        }
        let _ = tx.send(Ok(packet::close_rsp(id, ""))).await;
    };
    let _ = tokio::time::timeout(FLUSH_GRACE, flush).await;
    if let Some(PeerClose { reply: Some(p) }) = peer_closed {
        let _ = out.data(p).await;
    }
}

/// The client went away: close toward the agent if we still own the connection.
async fn client_gone(backend: &crate::backends::Backend, id: i64) {
    if backend.conns.close(id, None) {
        let _ = backend.outbound.data(packet::close_req(id)).await;
    }
}
