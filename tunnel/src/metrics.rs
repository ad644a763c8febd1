//! Metrics shared by agent and server: upstream's stream counters and Spoke's own.
//! Each binary owns one [`Registry`]; nothing is global.
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
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
#[derive(Clone, Debug, Default)]
pub struct RelayMetrics {
    bytes: Family<DirectionLabels, Counter>,
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

/// TLS health: when certificates expire, why handshakes were refused.
#[derive(Clone, Debug, Default)]
pub struct TlsMetrics {
    expiry: Family<CertLabels, Gauge>,
    refused: Family<ReasonLabels, Counter>,
    pub reload_failures: Counter,
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
}

/// Renders a registry in the Prometheus text format (0.0.4), as upstream's Go binaries
/// expose it, so dashboards and tools built for upstream see the same HELP and TYPE lines.
///
/// prometheus-client writes OpenMetrics; the differences are fixed here in one place:
/// HELP texts lose the period it appends, counters are declared under their `_total`
/// sample name, `# UNIT`/`# EOF` go away, and counters registered with a name ending in
/// `_count` (upstream's `dial_failure_count` and friends) keep that exact name.
pub fn encode(reg: &Registry) -> String {
    let mut open = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut open, reg);
    to_prometheus_text(&open)
}

fn to_prometheus_text(open: &str) -> String {
    let mut out = String::with_capacity(open.len());
    let mut block: Vec<&str> = Vec::new();
    for line in open.lines() {
        if line.starts_with("# HELP ") && !block.is_empty() {
            flush_block(&block, &mut out);
            block.clear();
        }
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        block.push(line);
    }
    flush_block(&block, &mut out);
    out
}

fn flush_block(block: &[&str], out: &mut String) {
    let Some(name) = block
        .first()
        .and_then(|l| l.strip_prefix("# HELP "))
        .and_then(|l| l.split(' ').next())
    else {
        for l in block {
            out.push_str(l);
            out.push('\n');
        }
        return;
    };
    let is_counter = block.iter().any(|l| *l == format!("# TYPE {name} counter"));
    let keep_exact = is_counter && name.ends_with("_count");
    let declared = if is_counter && !keep_exact {
        format!("{name}_total")
    } else {
        name.to_string()
    };
    let total = format!("{name}_total");
    for l in block {
        if let Some(rest) = l.strip_prefix("# HELP ") {
            let help = rest[name.len()..].trim_start();
            out.push_str(&format!(
                "# HELP {declared} {}\n",
                help.strip_suffix('.').unwrap_or(help)
            ));
        } else if l.starts_with("# TYPE ") {
            let kind = l.rsplit(' ').next().unwrap_or("untyped");
            out.push_str(&format!("# TYPE {declared} {kind}\n"));
        } else if keep_exact && l.starts_with(&total) {
            out.push_str(name);
            out.push_str(&l[total.len()..]);
            out.push('\n');
        } else {
            out.push_str(l);
            out.push('\n');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::histogram::Histogram;

    #[test]
    fn upstream_names_and_help() {
        let mut reg = Registry::default();
        let sub = reg.sub_registry_with_prefix("konnectivity_network_proxy_agent");
        let failures: Family<ReasonLabels, Counter> = Family::default();
        failures
            .get_or_create(&ReasonLabels { reason: "timeout" })
            .inc();
        sub.register(
            "endpoint_dial_failure",
            "Number of failures dialing the remote endpoint, by reason (example: timeout).",
            failures,
        );
        let exact: Family<ReasonLabels, Counter> = Family::default();
        exact
            .get_or_create(&ReasonLabels { reason: "no_agent" })
            .inc_by(2);
        sub.register(
            "dial_failure_count",
            "Number of dial failures observed",
            exact,
        );
        let open: Gauge = Gauge::default();
        sub.register(
            "open_endpoint_connections",
            "Current number of open endpoint connections.",
            open,
        );
        let h = Histogram::new([0.5, 1.0]);
        h.observe(0.7);
        sub.register(
            "dial_duration_seconds",
            "Latency of dial to the remote endpoint in seconds",
            h,
        );
        let text = encode(&reg);
        let want = [
            "# HELP konnectivity_network_proxy_agent_endpoint_dial_failure_total Number of failures dialing the remote endpoint, by reason (example: timeout).",
            "# TYPE konnectivity_network_proxy_agent_endpoint_dial_failure_total counter",
            "konnectivity_network_proxy_agent_endpoint_dial_failure_total{reason=\"timeout\"} 1",
            "# HELP konnectivity_network_proxy_agent_dial_failure_count Number of dial failures observed",
            "# TYPE konnectivity_network_proxy_agent_dial_failure_count counter",
            "konnectivity_network_proxy_agent_dial_failure_count{reason=\"no_agent\"} 2",
            "# HELP konnectivity_network_proxy_agent_open_endpoint_connections Current number of open endpoint connections.",
            "konnectivity_network_proxy_agent_open_endpoint_connections 0",
            "# TYPE konnectivity_network_proxy_agent_dial_duration_seconds histogram",
            "konnectivity_network_proxy_agent_dial_duration_seconds_count 1",
        ];
        for w in want {
            assert!(text.lines().any(|l| l == w), "missing {w:?} in\n{text}");
        }
        assert!(!text.contains("# EOF"));
        assert!(!text.contains("_count_total"));
    }
}
