//! Metrics shared by agent and server: upstream's stream counters and Spoke's own.
//! Each binary owns one [`Registry`]; nothing is global.
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PacketLabels {
    segment: &'static str,
    packet_type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    segment: &'static str,
    code: &'static str,
    packet_type: &'static str,
}

/// Upstream's `<component>_stream_packets_total` and `_stream_errors_total`.
#[derive(Clone, Debug, Default)]
pub struct StreamMetrics {
    packets: Family<PacketLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
}

impl StreamMetrics {
    pub fn register(&self, reg: &mut Registry) {
        reg.register(
            "stream_packets",
            "Count of packets processed, by segment and packet type (example: from_client, DIAL_REQ)",
            self.packets.clone(),
        );
        reg.register(
            "stream_errors",
            "Count of gRPC stream errors, by segment, grpc Code, packet type. (example: from_agent, Code.Unavailable, DIAL_RSP)",
            self.errors.clone(),
        );
    }

    pub fn packet(&self, segment: &'static str, kind: i32) {
        self.packets
            .get_or_create(&PacketLabels {
                segment,
                packet_type: crate::packet::type_name(kind),
            })
            .inc();
    }

    pub fn error(&self, segment: &'static str, code: tonic::Code, kind: Option<i32>) {
        self.errors
            .get_or_create(&ErrorLabels {
                segment,
                code: grpc_code_name(code),
                packet_type: kind.map_or("Unknown", crate::packet::type_name),
            })
            .inc();
    }
}

fn grpc_code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "Canceled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// Spoke's own data-path metrics (prefix `spoke_`).
#[derive(Clone, Debug, Default)]
pub struct RelayMetrics {
    bytes: Family<DirectionLabels, Counter>,
    closed: Family<ReasonLabels, Counter>,
    /// Bytes received from the peer and not yet written to the local endpoint.
    pub buffered_bytes: Gauge,
    /// Times a connection waited for credit from the peer (its reader was slower).
    pub flow_control_stalls: Counter,
}

/// Direction labels: toward the local endpoint, or toward the tunnel peer.
pub const TO_ENDPOINT: &str = "to_endpoint";
pub const TO_TUNNEL: &str = "to_tunnel";

impl RelayMetrics {
    pub fn register(&self, reg: &mut Registry) {
        reg.register(
            "bytes_relayed",
            "Payload bytes relayed, by direction (to_endpoint, to_tunnel)",
            self.bytes.clone(),
        );
        reg.register(
            "connections_closed",
            "Tunnelled connections closed, by reason",
            self.closed.clone(),
        );
        reg.register(
            "buffered_bytes",
            "Bytes received from the tunnel peer waiting for the local endpoint",
            self.buffered_bytes.clone(),
        );
        reg.register(
            "flow_control_stalls",
            "Times a connection paused reading its endpoint until the peer granted credit",
            self.flow_control_stalls.clone(),
        );
    }

    pub fn relayed(&self, direction: &'static str, n: usize) {
        self.bytes
            .get_or_create(&DirectionLabels { direction })
            .inc_by(n as u64);
    }

    pub fn closed(&self, reason: &'static str) {
        self.closed.get_or_create(&ReasonLabels { reason }).inc();
    }
}

/// Renders a registry in the Prometheus text format.
pub fn encode(reg: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, reg);
    out
}
