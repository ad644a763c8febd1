//! Connected agents ("backends": one per agent stream) and how a dial picks one, following
//! upstream's `--proxy-strategies`.
use crate::metrics::{ServerMetrics, StrategyLabel};
use crate::options::Strategy;
use rand::Rng;
use spoke_proto::Packet;
use spoke_tunnel::identifiers::{dial_host, AgentIdentifiers};
use spoke_tunnel::outbound::Outbound;
use spoke_tunnel::relay::{ConnParts, ConnTable, FlowConfig};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;
use tokio::sync::oneshot;

/// What a frontend learns about its dial.
#[derive(Debug)]
pub enum DialOutcome {
    Established { connect_id: i64, parts: ConnParts },
    Failed(String),
}

#[derive(Debug)]
pub struct PendingDial {
    pub reply: oneshot::Sender<DialOutcome>,
    pub started: Instant,
}

/// One agent stream.
#[derive(Debug)]
pub struct Backend {
    pub stream_id: u64,
    pub agent_id: String,
    pub identifiers: AgentIdentifiers,
    pub outbound: Outbound,
    pub conns: Arc<ConnTable>,
    pub pending: Mutex<HashMap<i64, PendingDial>>,
    pub draining: AtomicBool,
    pub flow: FlowConfig,
}

impl Backend {
    pub fn new(
        agent_id: String,
        identifiers: AgentIdentifiers,
        outbound: Outbound,
        flow: FlowConfig,
    ) -> Arc<Self> {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Arc::new(Self {
            stream_id: NEXT.fetch_add(1, Ordering::Relaxed),
            agent_id,
            identifiers,
            outbound,
            conns: Arc::new(ConnTable::default()),
            pending: Mutex::new(HashMap::new()),
            draining: AtomicBool::new(false),
            flow,
        })
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<i64, PendingDial>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a dial and sends its DIAL_REQ; false if the id is taken or the stream is gone.
    pub fn start_dial(
        &self,
        random: i64,
        req: Packet,
        reply: oneshot::Sender<DialOutcome>,
    ) -> bool {
        {
            let mut pending = self.pending();
            if pending.contains_key(&random) {
                return false;
            }
            pending.insert(
                random,
                PendingDial {
                    reply,
                    started: Instant::now(),
                },
            );
        }
        if self.outbound.control(req).is_err() {
            self.pending().remove(&random);
            return false;
        }
        true
    }

    pub fn take_pending(&self, random: i64) -> Option<PendingDial> {
        self.pending().remove(&random)
    }

    /// Fails every pending dial (the stream is gone).
    pub fn fail_pending(&self, why: &str) -> usize {
        let all: Vec<_> = self.pending().drain().collect();
        let n = all.len();
        for (_, p) in all {
            let _ = p.reply.send(DialOutcome::Failed(why.to_string()));
        }
        n
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

/// All connected agent streams.
pub struct Backends {
    all: RwLock<Vec<Arc<Backend>>>,
    strategies: Vec<Strategy>,
    metrics: ServerMetrics,
}

impl Backends {
    pub fn new(strategies: Vec<Strategy>, metrics: ServerMetrics) -> Self {
        let me = Self {
            all: RwLock::new(Vec::new()),
            strategies,
            metrics,
        };
        me.update_gauges(&[]);
        me
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<Backend>>> {
        self.all.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn add(&self, b: Arc<Backend>) {
        let mut all = self.all.write().unwrap_or_else(|e| e.into_inner());
        all.push(b);
        self.update_gauges(&all);
    }

    pub fn remove(&self, stream_id: u64) {
        let mut all = self.all.write().unwrap_or_else(|e| e.into_inner());
        all.retain(|b| b.stream_id != stream_id);
        self.update_gauges(&all);
    }

    pub fn snapshot(&self) -> Vec<Arc<Backend>> {
        self.read().clone()
    }

    fn update_gauges(&self, all: &[Arc<Backend>]) {
        self.metrics.ready_backend_connections.set(all.len() as i64);
        for s in &self.strategies {
            let n = ready_count(*s, all);
            self.metrics
                .ready_backends
                .get_or_create(&StrategyLabel {
                    proxy_strategy: s.label(),
                })
                .set(n as i64);
        }
    }

    /// Ready when the first strategy has at least one backend (upstream's rule).
    pub fn ready(&self) -> bool {
        let first = self
            .strategies
            .first()
            .copied()
            .unwrap_or(Strategy::Default);
        self.read().iter().any(|b| serves(first, b))
    }

    /// Picks a backend for a dial to `address`, trying each strategy in order.
    pub fn pick(&self, address: &str) -> Option<Arc<Backend>> {
        let all = self.read();
        let host = dial_host(address);
        self.strategies.iter().find_map(|s| {
            let candidates: Vec<&Arc<Backend>> = match s {
                Strategy::Default => first_stream_per_agent(&all),
                Strategy::DestHost => first_stream_per_agent(&all)
                    .into_iter()
                    .filter(|b| b.identifiers.hosts().any(|h| h == host))
                    .collect(),
                Strategy::DefaultRoute => first_stream_per_agent(&all)
                    .into_iter()
                    .filter(|b| b.identifiers.default_route)
                    .collect(),
            };
            random_preferring_active(&candidates)
        })
    }
}

fn serves(s: Strategy, b: &Backend) -> bool {
    match s {
        Strategy::Default => true,
        Strategy::DestHost => b.identifiers.hosts().next().is_some(),
        Strategy::DefaultRoute => b.identifiers.default_route,
    }
}

/// What upstream's `ready_backends` reports per strategy: the size of its table, keyed by agent
/// id (default, defaultRoute) or by identifier value (destHost: an agent with `host` and `ipv4`
/// counts twice, a value two agents share once).
fn ready_count(s: Strategy, all: &[Arc<Backend>]) -> usize {
    match s {
        Strategy::Default => first_stream_per_agent(all).len(),
        Strategy::DestHost => all
            .iter()
            .flat_map(|b| b.identifiers.hosts())
            .collect::<std::collections::HashSet<_>>()
            .len(),
        Strategy::DefaultRoute => first_stream_per_agent(all)
            .iter()
            .filter(|b| b.identifiers.default_route)
            .count(),
    }
}

/// Upstream sends each agent's dials over its first stream.
fn first_stream_per_agent(all: &[Arc<Backend>]) -> Vec<&Arc<Backend>> {
    let mut seen = std::collections::HashSet::new();
    all.iter()
        .filter(|b| seen.insert(b.agent_id.as_str()))
        .collect()
}

/// Random choice among non-draining candidates; draining ones only if nothing else.
fn random_preferring_active(c: &[&Arc<Backend>]) -> Option<Arc<Backend>> {
    if c.is_empty() {
        return None;
    }
    let start = rand::rng().random_range(0..c.len());
    let rotated = c[start..].iter().chain(&c[..start]);
    rotated
        .clone()
        .find(|b| !b.is_draining())
        .or_else(|| rotated.clone().next())
        .map(|b| Arc::clone(b))
}
