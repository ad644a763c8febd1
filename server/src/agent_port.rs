//! `/AgentService/Connect` on the agent port: each stream an agent opens becomes an
//! [`AgentStream`] in the registry until it ends.
use crate::metrics::MethodLabel;
use crate::registry::AgentStream;
use crate::Server;
use futures::StreamExt;
use spoke_proto::agent_service_server::AgentService;
use spoke_proto::Packet;
use spoke_tunnel::conns::FlowConfig;
use spoke_tunnel::identifiers::AgentIdentifiers;
use spoke_tunnel::metadata::{insert, one_value};
use spoke_tunnel::outbound::outbound;
use spoke_tunnel::session::{ServerEnd, Session};
use spoke_tunnel::FLOW_CONTROL_HEADER;
use std::pin::Pin;
use std::sync::Arc;
use tonic::{Request, Response, Status, Streaming};

pub struct AgentSvc {
    pub server: Arc<Server>,
}

type PacketStream = Pin<Box<dyn futures::Stream<Item = Result<Packet, Status>> + Send>>;

const CONNECT: MethodLabel = MethodLabel {
    service_method: "Connect",
};

#[tonic::async_trait]
impl AgentService for AgentSvc {
    type ConnectStream = PacketStream;

    async fn connect(
        &self,
        req: Request<Streaming<Packet>>,
    ) -> Result<Response<PacketStream>, Status> {
        let server = &self.server;
        if let Some(auth) = &server.auth {
            auth.authenticate(req.metadata()).await?;
        }
        let md = req.metadata();
        let invalid = Status::invalid_argument;
        let agent_id = one_value(md, "agentid").map_err(invalid)?;
        let agent_id =
            agent_id.ok_or_else(|| invalid("expected one agentid value, got none".to_string()))?;
        let identifiers = one_value(md, "agentidentifiers").map_err(invalid)?;
        let identifiers =
            AgentIdentifiers::parse(&identifiers.unwrap_or_default(), false).unwrap_or_default();
        let peer_window = one_value(md, FLOW_CONTROL_HEADER)
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
        server.registry.add(stream.clone());
        m.grpc_connections.get_or_create(&CONNECT).inc();
        tokio::spawn(serve(server.clone(), stream, req.into_inner()));

        let mut rsp = Response::new(Box::pin(out_rx.map(Ok::<_, Status>)) as PacketStream);
        let headers = rsp.metadata_mut();
        let internal = Status::internal;
        insert(headers, "serverid", &server.opts.server_id).map_err(internal)?;
        insert(headers, "servercount", &server.server_count().to_string()).map_err(internal)?;
        if flow.credits() {
            insert(headers, FLOW_CONTROL_HEADER, &flow.buffer_cap.to_string()).map_err(internal)?;
        }
        Ok(rsp)
    }
}

/// Runs one agent stream until it ends, then takes it out of the registry.
async fn serve(server: Arc<Server>, stream: Arc<AgentStream>, inbound: Streaming<Packet>) {
    let reason = stream.run(inbound).await;
    server.registry.remove(&stream);
    let (conns, dials) = stream.close();
    server
        .metrics
        .grpc_connections
        .get_or_create(&CONNECT)
        .dec();
    tracing::info!(agent_id = %stream.end.agent_id, stream = stream.end.stream_id, reason, conns, dials, "agent disconnected");
}
