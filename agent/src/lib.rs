//! spoke-agent: the node half of Spoke. Keeps an mTLS agent stream to every proxy server and
//! dials local endpoints (kubelet, pods, services) for them; node-local legs can ride the
//! eBPF socket fast path, and an XDP guard can close protected ports to the network.
mod backoff;
pub mod dial;
pub mod ebpf;
pub mod health;
pub mod metrics;
pub mod options;
pub mod policy;
mod run;
pub mod stream;

pub use run::run;

use options::Options;
use spoke_tunnel::tls::{ClientTlsFiles, Reloading};
use std::collections::HashMap;
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Instant;
use stream::AgentStream;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// What every part of the agent shares.
pub struct Agent {
    pub opts: Options,
    pub tls: Arc<Reloading<ClientTlsFiles>>,
    pub metrics: metrics::AgentMetrics,
    /// Opening endpoints: limits, policy, the eBPF fast path.
    pub endpoints: Arc<dial::Endpoints>,
    /// One agent stream per server, by server id.
    servers: Mutex<HashMap<String, Arc<AgentStream>>>,
    server_count: AtomicU32,
    /// Cancelled on the first SIGTERM/SIGINT; every agent stream sends DRAIN on it.
    pub drain: CancellationToken,
    drain_started: OnceLock<Instant>,
    streams_changed: Notify,
}

impl Agent {
    fn servers(&self) -> MutexGuard<'_, HashMap<String, Arc<AgentStream>>> {
        self.servers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn connected(&self) -> usize {
        self.servers().len()
    }

    fn draining(&self) -> bool {
        self.drain.is_cancelled()
    }

    fn start_drain(&self) {
        self.drain_started.get_or_init(Instant::now);
        self.drain.cancel();
    }
}
