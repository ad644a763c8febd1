//! Agent metrics with upstream's names (`konnectivity_network_proxy_agent_*`) plus
//! Spoke's data-path metrics (`spoke_agent_*`).
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use spoke_tunnel::metrics::{count, ReasonLabels, RelayMetrics, StreamMetrics, TlsMetrics};
use spoke_tunnel::session::SessionMetrics;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    pub direction: &'static str,
}

#[derive(Clone, Debug)]
pub struct AgentMetrics {
    pub stream: StreamMetrics,
    pub relay: RelayMetrics,
    pub tls: TlsMetrics,
    pub dial_duration: Histogram,
    pub endpoint_dial_failures: Family<ReasonLabels, Counter>,
    pub server_connection_failures: Family<DirectionLabel, Counter>,
    pub open_server_connections: Gauge,
    pub known_server_count: Gauge,
    pub open_endpoint_connections: Gauge,
    /// Spoke: packets from a server refused as bad input, by reason.
    pub rejected: Family<ReasonLabels, Counter>,
    /// Spoke: dials in progress.
    pub pending_dials: Gauge,
    /// Spoke: dials refused by a limit or by --allowed-destinations, by reason.
    pub refused_dials: Family<ReasonLabels, Counter>,
    /// Upstream's lease list/watch metrics (--count-server-leases).
    pub leases: spoke_k8s::leases::AgentLeaseMetrics,
    /// Spoke: client certificates from the CSR API (--cert-dir).
    pub certs: spoke_k8s::csr::CertMetrics,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentMetrics {
    pub fn new() -> Self {
        Self {
            stream: StreamMetrics::default(),
            relay: RelayMetrics::default(),
            tls: TlsMetrics::default(),
            dial_duration: Histogram::new([0.005, 0.025, 0.1, 0.5, 2.5, 10.0, 30.0]),
            endpoint_dial_failures: Family::default(),
            server_connection_failures: Family::default(),
            open_server_connections: Gauge::default(),
            known_server_count: Gauge::default(),
            open_endpoint_connections: Gauge::default(),
            rejected: Family::default(),
            pending_dials: Gauge::default(),
            refused_dials: Family::default(),
            leases: Default::default(),
            certs: Default::default(),
        }
    }

    /// Counts a failed dial under upstream's reasons (`timeout`, `unknown`); policy denials
    /// are Spoke's own `refused_dials{reason="denied"}`.
    pub fn dial_failure(&self, reason: &'static str) {
        match reason {
            "denied" => count(&self.refused_dials, reason),
            _ => count(&self.endpoint_dial_failures, reason),
        }
    }

    pub fn reject(&self, reason: &'static str) {
        count(&self.rejected, reason);
    }

    /// What an agent stream's session counts (`received`: upstream's segment label).
    pub fn session(&self, received: &'static str) -> SessionMetrics {
        SessionMetrics {
            stream: self.stream.clone(),
            received,
            relay: self.relay.clone(),
            rejected: self.rejected.clone(),
        }
    }

    pub fn registry(&self) -> Registry {
        let mut root = Registry::default();
        {
            let r = root.sub_registry_with_prefix("konnectivity_network_proxy_agent");
            r.register(
                "dial_duration_seconds",
                "Latency of dial to the remote endpoint in seconds",
                self.dial_duration.clone(),
            );
            r.register(
                "endpoint_dial_failure",
                "Number of failures dialing the remote endpoint, by reason (example: timeout).",
                self.endpoint_dial_failures.clone(),
            );
            r.register("server_connection_failure_count", "Count of failures to send to or receive from the proxy server, labeled by the direction (from_server or to_server). DEPRECATED, please use stream_packets_total and stream_errors_total", self.server_connection_failures.clone());
            // Exported from start-up (as 0) so scrapers never race the first tunnel.
            r.register(
                "open_server_connections",
                "Current number of open server connections.",
                self.open_server_connections.clone(),
            );
            r.register(
                "known_server_count",
                "Current number of servers agent is trying to connect to.",
                self.known_server_count.clone(),
            );
            r.register(
                "open_endpoint_connections",
                "Current number of open endpoint connections.",
                self.open_endpoint_connections.clone(),
            );
            self.stream.register(r);
            self.leases.register(r);
        }
        {
            let s = root.sub_registry_with_prefix("spoke_agent");
            self.relay.register(s);
            self.tls.register(s);
            s.register(
                "rejected_packets",
                "Packets from a server refused as bad input, by reason",
                self.rejected.clone(),
            );
            s.register(
                "pending_dials",
                "Dials to local endpoints in progress",
                self.pending_dials.clone(),
            );
            s.register(
                "refused_dials",
                "Dials refused by a limit or by --allowed-destinations, by reason",
                self.refused_dials.clone(),
            );
            self.certs.register(s);
        }
        root
    }
}
