//! `/AgentService/Connect`: agents attach here; each stream becomes a [`Backend`].
use crate::backends::{Backend, DialOutcome};
use crate::state::State;
use futures::StreamExt;
use spoke_proto::agent_service_server::AgentService;
use spoke_proto::packet::Payload;
use spoke_proto::{Packet, PacketType};
use spoke_tunnel::identifiers::AgentIdentifiers;
use spoke_tunnel::outbound::outbound;
use spoke_tunnel::packet;
use spoke_tunnel::relay::{new_conn, Delivery, FlowConfig};
use spoke_tunnel::FLOW_CONTROL_HEADER;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Request, Response, Status, Streaming};

pub struct AgentSvc {
    pub state: Arc<State>,
}

type PacketStream = Pin<Box<dyn futures::Stream<Item = Result<Packet, Status>> + Send>>;

fn one_value(md: &MetadataMap, key: &str, required: bool) -> Result<Option<String>, Status> {
    let values: Vec<_> = md.get_all(key).iter().collect();
    match values.as_slice() {
        [] if required => Err(Status::invalid_argument(format!(
            "expected one {key} value, got none"
        ))),
        [] => Ok(None),
        [v] => v
            .to_str()
            .map(|s| Some(s.to_string()))
            .map_err(|_| Status::invalid_argument(format!("{key} is not valid ASCII"))),
        more => Err(Status::invalid_argument(format!(
            "expected one {key} value, got {}",
            more.len()
        ))),
    }
}

#[tonic::async_trait]
impl AgentService for AgentSvc {
    type ConnectStream = PacketStream;

    async fn connect(
        &self,
        req: Request<Streaming<Packet>>,
    ) -> Result<Response<PacketStream>, Status> {
        if let Some(auth) = &self.state.auth {
            auth.authenticate(req.metadata()).await?;
        }
        let state = self.state.clone();
        let md = req.metadata();
        let agent_id = one_value(md, "agentid", true)?.unwrap_or_default();
        let identifiers = one_value(md, "agentidentifiers", false)?.unwrap_or_default();
        let identifiers = AgentIdentifiers::parse(&identifiers, false).unwrap_or_default();
        let peer_window = one_value(md, FLOW_CONTROL_HEADER, false)?
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|w| *w > 0);
        let flow = FlowConfig {
            buffer_cap: state.opts.max_connection_buffer_bytes,
            peer_window,
        };
        let (out, out_rx) = outbound(Some((state.metrics.stream.clone(), "to_agent")));
        let backend = Backend::new(agent_id.clone(), identifiers, out, flow);
        tracing::info!(
            agent_id,
            stream = backend.stream_id,
            credits = flow.credits(),
            "agent connected"
        );
        state.backends.add(backend.clone());
        state
            .metrics
            .grpc_connections
            .get_or_create(&crate::metrics::MethodLabel {
                service_method: "Connect",
            })
            .inc();
        tokio::spawn(serve_backend(state.clone(), backend, req.into_inner()));

        let mut rsp = Response::new(Box::pin(out_rx.map(Ok::<_, Status>)) as PacketStream);
        let headers = rsp.metadata_mut();
        insert(headers, "serverid", &state.opts.server_id)?;
        insert(headers, "servercount", &state.opts.server_count.to_string())?;
        if flow.credits() {
            insert(headers, FLOW_CONTROL_HEADER, &flow.buffer_cap.to_string())?;
        }
        Ok(rsp)
    }
}

fn insert(md: &mut MetadataMap, key: &'static str, value: &str) -> Result<(), Status> {
    let v =
        MetadataValue::try_from(value).map_err(|_| Status::internal(format!("bad {key} value")))?;
    md.insert(key, v);
    Ok(())
}

/// Reads one agent stream until it ends, then closes everything that rode on it.
async fn serve_backend(state: Arc<State>, backend: Arc<Backend>, mut inbound: Streaming<Packet>) {
    let reason = loop {
        let msg = tokio::select! {
            m = inbound.message() => m,
            _ = backend.outbound.closed.cancelled() => break "stream failed".to_string(),
        };
        match msg {
            Ok(Some(p)) => {
                state.metrics.stream.packet("from_agent", p.r#type);
                handle_packet(&state, &backend, p);
            }
            Ok(None) => break "agent closed the stream".to_string(),
            Err(status) => {
                state
                    .metrics
                    .stream
                    .error("from_agent", status.code(), None);
                break format!("stream error: {}", status.message());
            }
        }
    };
    state.backends.remove(backend.stream_id);
    backend.outbound.closed.cancel();
    let conns = backend.conns.close_all();
    let dials = backend.fail_pending("Backend context error");
    for _ in 0..dials {
        state.metrics.dial_failure("backend_close");
    }
    state
        .metrics
        .grpc_connections
        .get_or_create(&crate::metrics::MethodLabel {
            service_method: "Connect",
        })
        .dec();
    tracing::info!(agent_id = %backend.agent_id, stream = backend.stream_id, reason, conns, dials, "agent disconnected");
}

fn handle_packet(state: &State, backend: &Backend, p: Packet) {
    let out = &backend.outbound;
    match (PacketType::try_from(p.r#type), p.payload) {
        (Ok(PacketType::DialRsp), Some(Payload::DialResponse(r))) => {
            let Some(pending) = backend.take_pending(r.random) else {
                state.metrics.dial_failure("unrecognized_response");
                tracing::debug!(
                    random = r.random,
                    connection_id = r.connect_id,
                    "DIAL_RSP for no pending dial"
                );
                if r.connect_id != 0 {
                    let _ = out.control(packet::close_req(r.connect_id));
                }
                return;
            };
            if !r.error.is_empty() {
                state.metrics.dial_failure("error_response");
                let _ = pending.reply.send(DialOutcome::Failed(r.error));
                return;
            }
            let (entry, parts) = new_conn(backend.flow, &state.metrics.relay);
            if r.connect_id == 0 || !backend.conns.insert(r.connect_id, entry) {
                state.metrics.reject("bad_connect_id");
                let _ = pending.reply.send(DialOutcome::Failed(format!(
                    "agent answered with unusable connectID {}",
                    r.connect_id
                )));
                return;
            }
            let established = DialOutcome::Established {
                connect_id: r.connect_id,
                parts,
            };
            if pending.reply.send(established).is_err() {
                // The frontend gave up in the meantime.
                backend.conns.close(r.connect_id, None);
                state.metrics.dial_failure("frontend_close");
                let _ = out.control(packet::close_req(r.connect_id));
                return;
            }
            state
                .metrics
                .dial_duration
                .observe(pending.started.elapsed().as_secs_f64());
        }
        (Ok(PacketType::Data), Some(Payload::Data(d))) => {
            let id = d.connect_id;
            match backend
                .conns
                .deliver(id, d.data, Some(packet::close_req(id)))
            {
                Delivery::Queued => {}
                Delivery::Unknown => {
                    state.metrics.reject("unknown_connection");
                    tracing::debug!(connection_id = id, agent_id = %backend.agent_id, "DATA for unknown connection");
                    let _ = out.control(packet::close_req(id));
                }
                Delivery::Overflow => {
                    state.metrics.relay.closed("buffer_overflow");
                    tracing::warn!(connection_id = id, agent_id = %backend.agent_id, "agent sent past the connection's buffer; closed it");
                }
            }
        }
        (Ok(PacketType::CloseRsp), Some(Payload::CloseResponse(c))) => {
            if !backend.conns.close(c.connect_id, None) {
                tracing::debug!(
                    connection_id = c.connect_id,
                    "CLOSE_RSP for a connection already closed"
                );
            }
        }
        (Ok(PacketType::DialCls), Some(Payload::CloseDial(c))) => {
            if let Some(pending) = backend.take_pending(c.random) {
                state.metrics.dial_failure("backend_close");
                let _ = pending
                    .reply
                    .send(DialOutcome::Failed("dial closed".into()));
            }
        }
        (Ok(PacketType::Drain), _) => {
            tracing::info!(agent_id = %backend.agent_id, "agent is draining");
            backend.draining.store(true, Ordering::Relaxed);
        }
        (Ok(PacketType::SpokeCredit), Some(Payload::Credit(c))) => {
            backend.conns.grant(c.connect_id, c.bytes);
        }
        (kind, _) => {
            state.metrics.reject("unexpected_packet");
            tracing::debug!(?kind, agent_id = %backend.agent_id, "ignoring unexpected packet from agent");
        }
    }
}
