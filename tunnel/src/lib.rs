//! Spoke's data plane, shared by spoke-agent and spoke-server: Konnectivity packets, the
//! per-stream send queues, per-connection flow control and relay, TLS, listeners, the
//! frontends' request parsers and the data-path metrics.
pub mod chunks;
pub mod connect_head;
pub mod conns;
pub mod flow;
pub mod http2;
pub mod identifiers;
pub mod listen;
pub mod metadata;
pub mod metrics;
pub mod outbound;
pub mod packet;
pub mod relay;
pub mod session;
pub mod tls;
pub mod tls_bytes;

/// Metadata key by which Spoke peers advertise their per-connection receive window
/// (bytes). Upstream peers never send it, so they never receive credit packets.
pub const FLOW_CONTROL_HEADER: &str = "spoke-flow-control";
