//! Metrics shared by agent and server: upstream's stream counters and Spoke's own.
//! Each binary owns one [`Registry`]; nothing is global.
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use spoke_proto::PacketType;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

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
    /// [`StreamMetrics::segment`]'s handles, one per segment, shared by every stream.
    segments: Arc<Mutex<Vec<SegmentPackets>>>,
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

    /// The packet counters of one segment, for a path that counts every packet.
    pub fn segment(&self, segment: &'static str) -> SegmentPackets {
        let mut all = self.segments.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = all.iter().find(|s| s.0.segment == segment) {
            return s.clone();
        }
        let s = SegmentPackets(Arc::new(SegmentInner {
            family: self.packets.clone(),
            segment,
            by_kind: Default::default(),
        }));
        all.push(s.clone());
        s
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

/// One segment's `stream_packets` counters. Each packet type's series is looked up in the
/// family once, on its first packet (so only types seen are exported, as before), and then
/// counted directly: a family lookup hashes the labels under a lock, on every packet of
/// every round trip. Clones share the counters.
#[derive(Clone, Debug)]
pub struct SegmentPackets(Arc<SegmentInner>);

#[derive(Debug)]
struct SegmentInner {
    family: Family<PacketLabels, Counter>,
    segment: &'static str,
    /// Upstream's types 0..=6, then SPOKE_CREDIT, then every unknown type ("Unknown").
    by_kind: [OnceLock<Counter>; 9],
}

impl SegmentPackets {
    pub fn inc(&self, kind: i32) {
        let slot = match kind {
            0..=6 => kind as usize,
            k if k == PacketType::SpokeCredit as i32 => 7,
            _ => 8,
        };
        let inner = &self.0;
        inner.by_kind[slot]
            .get_or_init(|| {
                inner
                    .family
                    .get_or_create(&PacketLabels {
                        segment: inner.segment,
                        packet_type: crate::packet::type_name(kind),
                    })
                    .clone()
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

/// A `reason` label, used by counters across the binaries.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// Counts one event under `reason`.
pub fn count(family: &Family<ReasonLabels, Counter>, reason: &'static str) {
    family.get_or_create(&ReasonLabels { reason }).inc();
}

/// Spoke's own data-path metrics (prefix `spoke_`).
#[derive(Clone, Debug)]
pub struct RelayMetrics {
    bytes: Family<DirectionLabels, Counter>,
    /// `bytes`' two series, kept: every relayed chunk counts into one.
    to_endpoint: Counter,
    to_tunnel: Counter,
    closed: Family<ReasonLabels, Counter>,
    /// Bytes received from the peer and not yet written to the local endpoint.
    pub buffered_bytes: Gauge,
    /// Times a connection waited for credit from the peer (its reader was slower).
    pub flow_control_stalls: Counter,
    /// How long each write to the local endpoint took, where the owner exports it (the
    /// server's upstream `frontend_write_duration_seconds`); registered by that owner.
    endpoint_write_duration: Option<Histogram>,
}

/// Direction labels: toward the local endpoint, or toward the tunnel peer.
pub const TO_ENDPOINT: &str = "to_endpoint";
pub const TO_TUNNEL: &str = "to_tunnel";

impl Default for RelayMetrics {
    fn default() -> Self {
        let bytes = Family::<DirectionLabels, Counter>::default();
        let series = |direction| bytes.get_or_create(&DirectionLabels { direction }).clone();
        Self {
            to_endpoint: series(TO_ENDPOINT),
            to_tunnel: series(TO_TUNNEL),
            bytes,
            closed: Family::default(),
            buffered_bytes: Gauge::default(),
            flow_control_stalls: Counter::default(),
            endpoint_write_duration: None,
        }
    }
}

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

    pub fn relayed_to_endpoint(&self, n: usize) {
        self.to_endpoint.inc_by(n as u64);
    }

    pub fn relayed_to_tunnel(&self, n: usize) {
        self.to_tunnel.inc_by(n as u64);
    }

    pub fn closed(&self, reason: &'static str) {
        self.closed.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// Metrics that also time every write to the local endpoint into `h`.
    pub fn timing_endpoint_writes(h: Histogram) -> Self {
        Self {
            endpoint_write_duration: Some(h),
            ..Self::default()
        }
    }

    /// Starts timing a write to the local endpoint (`None` when nobody exports it).
    pub fn write_started(&self) -> Option<Instant> {
        self.endpoint_write_duration
            .as_ref()
            .map(|_| Instant::now())
    }

    /// Records a write that began at `started`.
    pub fn write_done(&self, started: Option<Instant>) {
        if let (Some(h), Some(t)) = (&self.endpoint_write_duration, started) {
            h.observe(t.elapsed().as_secs_f64());
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertLabels {
    certificate: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: &'static str,
}

/// TLS health: when certificates expire, why handshakes were refused; and each TLS
/// listener's work in progress against its limits.
#[derive(Clone, Debug, Default)]
pub struct TlsMetrics {
    expiry: Family<CertLabels, Gauge>,
    refused: Family<ReasonLabels, Counter>,
    errors: Family<ReasonLabels, Counter>,
    pub reload_failures: Counter,
    handshaking: Family<ListenerLabels, Gauge>,
    pending: Family<ListenerLabels, Gauge>,
    paused: Family<ListenerLabels, Counter>,
}

/// One listener's gauges (see [`TlsMetrics::listener`]).
#[derive(Clone, Debug)]
pub struct ListenerGauges {
    /// TLS handshakes running now.
    pub handshaking: Gauge,
    /// Accepted connections waiting for a handshake slot.
    pub pending: Gauge,
    /// Times the listener stopped accepting because its pending limit was reached.
    pub paused: Counter,
}

impl TlsMetrics {
    pub fn register(&self, reg: &mut Registry) {
        reg.register(
            "tls_certificate_expiry_timestamp_seconds",
            "notAfter of the certificate given by each flag, as Unix time",
            self.expiry.clone(),
        );
        reg.register(
            "tls_handshakes_refused",
            "TLS handshakes refused on our listeners, by reason",
            self.refused.clone(),
        );
        reg.register(
            "tls_connection_errors",
            "TLS connections ended by an error after the handshake, by reason (bad_record_mac, record_overflow, protocol, alert_received, truncated)",
            self.errors.clone(),
        );
        reg.register(
            "tls_handshakes_in_progress",
            "TLS handshakes running now, by listener (at most --max-concurrent-tls-handshakes)",
            self.handshaking.clone(),
        );
        reg.register(
            "accepts_pending",
            "Accepted connections waiting for a TLS handshake slot, by listener (at most --max-pending-accepts)",
            self.pending.clone(),
        );
        reg.register(
            "accept_pauses",
            "Times a listener stopped accepting at --max-pending-accepts (the kernel's accept queue holds the rest)",
            self.paused.clone(),
        );
        reg.register(
            "tls_reload_failures",
            "Certificate files that changed but could not be loaded (the old ones stay in use)",
            self.reload_failures.clone(),
        );
    }

    pub fn expiry(&self, certificate: &'static str, unix: i64) {
        self.expiry
            .get_or_create(&CertLabels { certificate })
            .set(unix);
    }

    pub fn refused(&self, reason: &'static str) {
        self.refused.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// The counter of errors on established connections, for their `Io` to count in.
    pub fn connection_errors(&self) -> Family<ReasonLabels, Counter> {
        self.errors.clone()
    }

    /// The gauges of listener `listener` (`agent`, `frontend`).
    pub fn listener(&self, listener: &'static str) -> ListenerGauges {
        let l = ListenerLabels { listener };
        ListenerGauges {
            handshaking: self.handshaking.get_or_create(&l).clone(),
            pending: self.pending.get_or_create(&l).clone(),
            paused: self.paused.get_or_create(&l).clone(),
        }
    }
}
