//! spoke-server: the control-plane half of Spoke. Agents dial in on the agent port and each
//! of their streams joins the registry; kube-apiserver's egress frontends (gRPC or HTTP
//! CONNECT, over a Unix socket or mTLS TCP) dial through them.
pub mod agent_port;
pub mod auth;
pub mod frontend;
pub mod health;
pub mod metrics;
pub mod options;
pub mod registry;
mod run;

pub use run::run;

use std::sync::atomic::AtomicBool;

/// What every part of the server shares.
pub struct Server {
    pub opts: options::Options,
    pub registry: registry::Registry,
    pub metrics: metrics::ServerMetrics,
    /// Set on SIGTERM: no new dials, not ready, open connections may finish.
    pub shutting_down: AtomicBool,
    /// Agent token authentication (TokenReview), when configured.
    pub auth: Option<auth::TokenAuth>,
    /// `--count-server-leases`: the number of valid server leases.
    pub lease_count: Option<std::sync::Arc<spoke_k8s::leases::LeaseCounter>>,
    /// Cancelled once every listener is bound (the lease is published only then, so agents
    /// that count it find the server accepting).
    pub listening: tokio_util::sync::CancellationToken,
}

impl Server {
    /// The `serverCount` sent to agents: the lease count with --count-server-leases, else
    /// --server-count.
    pub fn server_count(&self) -> u32 {
        match &self.lease_count {
            Some(c) => c.count() as u32,
            None => self.opts.server_count,
        }
    }
}
