//! Server metrics with upstream's names (`konnectivity_network_proxy_server_*`) plus
//! Spoke's data-path metrics (`spoke_*`).
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use spoke_tunnel::metrics::{
    count, ReasonLabels, RelayMetrics, SegmentPackets, StreamMetrics, TlsMetrics,
};
use spoke_tunnel::session::SessionMetrics;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabel {
    pub service_method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StrategyLabel {
    pub proxy_strategy: &'static str,
}

const DIAL_BUCKETS: [f64; 9] = [1e-6, 1e-5, 1e-4, 0.005, 0.025, 0.1, 0.5, 2.5, 12.5];
const CONNECTION_BUCKETS: [f64; 12] = [
    1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 14400.0, 43200.0, 86400.0,
];

/// See [`ServerMetrics::established`].
pub struct Established<'a> {
    metrics: &'a ServerMetrics,
    since: std::time::Instant,
}

impl Drop for Established<'_> {
    fn drop(&mut self) {
        let m = self.metrics;
        m.connection_duration
            .observe(self.since.elapsed().as_secs_f64());
        m.established_connections.dec();
    }
}

#[derive(Clone, Debug)]
pub struct ServerMetrics {
    pub stream: StreamMetrics,
    /// `stream`'s counters for the gRPC frontend's packets, each way.
    pub to_client: SegmentPackets,
    pub from_client: SegmentPackets,
    pub relay: RelayMetrics,
    pub tls: TlsMetrics,
    pub dial_duration: Histogram,
    /// Writes to frontends (upstream: each packet sent to a frontend); shared with `relay`.
    pub frontend_write_duration: Histogram,
    /// Lifetime of established frontend connections, from the dial's answer to the close.
    pub connection_duration: Histogram,
    pub dial_failures: Family<ReasonLabels, Counter>,
    pub grpc_connections: Family<MethodLabel, Gauge>,
    pub http_connections: Gauge,
    pub ready_backend_connections: Gauge,
    pub ready_backends: Family<StrategyLabel, Gauge>,
    pub pending_backend_dials: Gauge,
    pub established_connections: Gauge,
    pub full_receive_channels: Family<MethodLabel, Gauge>,
    /// Spoke: connections refused or closed because of bad input, by reason.
    pub rejected: Family<ReasonLabels, Counter>,
    /// Spoke: agent registry operations (add, remove, pick) and the entries they visited.
    pub registry_ops: Counter,
    pub registry_steps: Counter,
    /// Upstream's lease garbage-collection metrics.
    pub leases: spoke_k8s::leases::ServerLeaseMetrics,
    /// Spoke: the agent CSR approver's decisions.
    pub csr: spoke_k8s::csr::ApproverMetrics,
}

impl Default for ServerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ServerMetrics {
    pub fn new() -> Self {
        let frontend_write_duration = Histogram::new(DIAL_BUCKETS);
        let stream = StreamMetrics::default();
        Self {
            to_client: stream.segment("to_client"),
            from_client: stream.segment("from_client"),
            stream,
            relay: RelayMetrics::timing_endpoint_writes(frontend_write_duration.clone()),
            tls: TlsMetrics::default(),
            dial_duration: Histogram::new(DIAL_BUCKETS),
            frontend_write_duration,
            connection_duration: Histogram::new(CONNECTION_BUCKETS),
            dial_failures: Family::default(),
            grpc_connections: Family::default(),
            http_connections: Gauge::default(),
            ready_backend_connections: Gauge::default(),
            ready_backends: Family::default(),
            pending_backend_dials: Gauge::default(),
            established_connections: Gauge::default(),
            full_receive_channels: Family::default(),
            rejected: Family::default(),
            registry_ops: Counter::default(),
            registry_steps: Counter::default(),
            leases: Default::default(),
            csr: Default::default(),
        }
    }

    pub fn dial_failure(&self, reason: &'static str) {
        count(&self.dial_failures, reason);
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

    /// Counts an established end-to-end connection until the guard drops, then records its
    /// lifetime (`established_connections`, `connection_duration_seconds`).
    pub fn established(&self) -> Established<'_> {
        self.established_connections.inc();
        Established {
            metrics: self,
            since: std::time::Instant::now(),
        }
    }

    pub fn registry(&self) -> Registry {
        let mut root = Registry::default();
        {
            let r = root.sub_registry_with_prefix("konnectivity_network_proxy_server");
            r.register(
                "dial_duration_seconds",
                "Latency of dial to the remote endpoint in seconds",
                self.dial_duration.clone(),
            );
            r.register(
                "frontend_write_duration_seconds",
                "Latency of write to the frontend in seconds",
                self.frontend_write_duration.clone(),
            );
            r.register(
                "connection_duration_seconds",
                "Lifetime of established end-to-end connections in seconds",
                self.connection_duration.clone(),
            );
            // Upstream's name has no _total; the text encoder appends it to counters.
            r.register("dial_failure_count", "Number of dial failures observed. Multiple failures can occur for a single dial request.", self.dial_failures.clone());
            r.register(
                "grpc_connections",
                "Number of current grpc connections, partitioned by service method.",
                self.grpc_connections.clone(),
            );
            r.register(
                "http_connections",
                "Number of current HTTP CONNECT connections",
                self.http_connections.clone(),
            );
            r.register(
                "ready_backend_connections",
                "Number of konnectivity agent connected to the proxy server",
                self.ready_backend_connections.clone(),
            );
            r.register(
                "ready_backends",
                "Number of konnectivity agents connected to the proxy server, by proxy strategy",
                self.ready_backends.clone(),
            );
            r.register(
                "pending_backend_dials",
                "Current number of pending backend dial requests",
                self.pending_backend_dials.clone(),
            );
            r.register(
                "established_connections",
                "Current number of established end-to-end connections (post-dial).",
                self.established_connections.clone(),
            );
            r.register("full_receive_channels", "Number of current connections blocked by a full receive channel, partitioned by service method.", self.full_receive_channels.clone());
            self.stream.register(r);
            self.leases.register(r);
        }
        {
            let s = root.sub_registry_with_prefix("spoke_server");
            self.relay.register(s);
            self.tls.register(s);
            s.register(
                "rejected_connections",
                "Connections refused or closed for bad input or limits, by reason",
                self.rejected.clone(),
            );
            s.register(
                "registry_operations",
                "Agent registry operations: agent streams added and removed, dials routed",
                self.registry_ops.clone(),
            );
            s.register(
                "registry_steps",
                "Entries the agent registry visited in its operations; per operation it stays flat as the fleet grows",
                self.registry_steps.clone(),
            );
            self.csr.register(s);
        }
        root
    }
}
