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
    /// The last serverCount header of a server.
    server_count: AtomicU32,
    /// `--count-server-leases`: the number of valid server leases.
    lease_count: Option<Arc<spoke_k8s::leases::LeaseCounter>>,
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

    /// How many servers to hold: upstream's aggregate counter. Without lease counting the
    /// last serverCount header; with it the lease count, or the larger of the two with
    /// `--server-count-source=max`. At least 1.
    fn wanted_servers(&self) -> usize {
        let header = (self.server_count.load(std::sync::atomic::Ordering::Relaxed) as usize).max(1);
        let n = match &self.lease_count {
            None => header,
            Some(l) if self.opts.server_count_source == "max" => l.count().max(header),
            Some(l) => l.count(),
        }
        .max(1);
        self.metrics.known_server_count.set(n as i64);
        n
    }

    fn draining(&self) -> bool {
        self.drain.is_cancelled()
    }

    fn start_drain(&self) {
        self.drain_started.get_or_init(Instant::now);
        self.drain.cancel();
    }
}
