//! The connected agents and how a dial picks one (`--proxy-strategies`).
//!
//! Upstream's rules: each agent's dials ride its first stream; `default` picks a random agent,
//! `destHost` one whose identifiers name the dial's host, `defaultRoute` one that advertised
//! `default-route`; draining agents only when nothing else is left; strategies are tried in
//! order. Spoke adds `leastLoaded`: the agent with the fewest connections.
//!
//! Every per-agent operation is O(1) in the size of the fleet: each strategy keeps its own
//! pool of candidates, updated as streams come and go, so registering, removing, picking and
//! the `ready_backends` gauges never walk all agents.
use crate::metrics::{ServerMetrics, StrategyLabel};
use crate::options::Strategy;
use prometheus_client::metrics::counter::Counter;
use rand::Rng;
use spoke_tunnel::identifiers::dial_host;
use spoke_tunnel::session::{Load, ServerEnd, Session};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// One agent stream, from the server's end.
pub type AgentStream = Session<ServerEnd>;

/// Candidates for random picks: add, remove and pick in O(1) (removal swaps the last in).
/// Streams found draining move (once, at pick time) to a second list that is only drawn
/// from when no other candidate is left, so a pick never scans.
#[derive(Default)]
struct Pool {
    items: Vec<Arc<AgentStream>>,
    draining: Vec<Arc<AgentStream>>,
    /// Where each stream is: (in `draining`, index), by stream id.
    at: HashMap<u64, (bool, usize)>,
}

impl Pool {
    fn list(&mut self, draining: bool) -> &mut Vec<Arc<AgentStream>> {
        if draining {
            &mut self.draining
        } else {
            &mut self.items
        }
    }

    fn insert(&mut self, s: &Arc<AgentStream>) {
        let d = s.end.is_draining();
        let i = self.list(d).len();
        self.at.insert(s.end.stream_id, (d, i));
        self.list(d).push(s.clone());
    }

    fn remove(&mut self, stream_id: u64) -> Option<Arc<AgentStream>> {
        let (d, i) = self.at.remove(&stream_id)?;
        let list = self.list(d);
        let s = list.swap_remove(i);
        if let Some(moved) = list.get(i).map(|m| m.end.stream_id) {
            self.at.insert(moved, (d, i));
        }
        Some(s)
    }

    fn len(&self) -> usize {
        self.items.len() + self.draining.len()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Upstream's pick: a random agent not draining; a draining one only if all are. A pick
    /// that lands on a stream that started draining moves it aside (each stream moves once).
    fn random(&mut self, steps: &Counter) -> Option<Arc<AgentStream>> {
        let mut rng = rand::rng();
        while !self.items.is_empty() {
            steps.inc();
            let i = rng.random_range(0..self.items.len());
            let s = &self.items[i];
            if !s.end.is_draining() {
                return Some(s.clone());
            }
            let id = s.end.stream_id;
            if let Some(s) = self.remove(id) {
                self.insert(&s);
            }
        }
        steps.inc();
        let n = self.draining.len();
        (n > 0).then(|| self.draining[rng.random_range(0..n)].clone())
    }

    /// The least-loaded agent not draining (a draining one only if all are); ties broken at
    /// random. Up to [`EXACT_LEAST_LOADED`] candidates every one is compared; past that the
    /// less loaded of two random picks (power of two choices, O(1), as Envoy's least-request
    /// balancer), which keeps a large fleet close to balanced without a scan per dial.
    fn least_loaded(&self, steps: &Counter) -> Option<Arc<AgentStream>> {
        let all = || self.items.iter().chain(self.draining.iter());
        let n = self.len();
        if n == 0 {
            return None;
        }
        let mut rng = rand::rng();
        // Draining last, then by load, then a random tie-break.
        let key = |s: &AgentStream, rng: &mut rand::rngs::ThreadRng| -> (bool, Load, u32) {
            (s.end.is_draining(), s.load(), rng.random())
        };
        let candidates: Vec<&Arc<AgentStream>> = if n <= EXACT_LEAST_LOADED {
            all().collect()
        } else {
            let a = rng.random_range(0..n);
            let b = (a + rng.random_range(1..n)) % n;
            let get = |i: usize| {
                self.items
                    .get(i)
                    .unwrap_or_else(|| &self.draining[i - self.items.len()])
            };
            vec![get(a), get(b)]
        };
        steps.inc_by(candidates.len() as u64);
        candidates
            .into_iter()
            .map(|s| (key(s, &mut rng), s))
            .min_by(|x, y| x.0.cmp(&y.0))
            .map(|(_, s)| s.clone())
    }
}

/// Up to this many candidates, `leastLoaded` compares them all.
const EXACT_LEAST_LOADED: usize = 64;

/// The indexes, under one lock.
#[derive(Default)]
struct Index {
    /// Every stream, by stream id (`ready_backend_connections`).
    streams: HashMap<u64, Arc<AgentStream>>,
    /// Each agent's streams in the order they came; the first carries its dials.
    by_agent: HashMap<String, Vec<Arc<AgentStream>>>,
    /// Each agent's first stream (`default`, `leastLoaded`).
    agents: Pool,
    /// Agents that advertised `default-route` (`defaultRoute`).
    default_route: Pool,
    /// Agents by every identifier value: host, ipv4, ipv6 (`destHost`).
    by_host: HashMap<String, Pool>,
}

impl Index {
    /// Makes `s` its agent's dialing stream in every pool it qualifies for.
    fn enlist(&mut self, s: &Arc<AgentStream>) {
        self.agents.insert(s);
        if s.end.identifiers.default_route {
            self.default_route.insert(s);
        }
        for h in s.end.identifiers.hosts() {
            self.by_host.entry(h.to_string()).or_default().insert(s);
        }
    }

    fn delist(&mut self, s: &AgentStream) {
        let id = s.end.stream_id;
        self.agents.remove(id);
        if s.end.identifiers.default_route {
            self.default_route.remove(id);
        }
        for h in s.end.identifiers.hosts() {
            if let Some(pool) = self.by_host.get_mut(h) {
                pool.remove(id);
                if pool.is_empty() {
                    self.by_host.remove(h);
                }
            }
        }
    }

    fn pool(&mut self, s: Strategy, host: &str) -> Option<&mut Pool> {
        match s {
            Strategy::Default | Strategy::LeastLoaded => Some(&mut self.agents),
            Strategy::DestHost => self.by_host.get_mut(host),
            Strategy::DefaultRoute => Some(&mut self.default_route),
        }
    }

    /// What upstream's `ready_backends` reports: the size of the strategy's table, keyed by
    /// agent id (default, defaultRoute) or by identifier value (destHost).
    fn ready_count(&self, s: Strategy) -> usize {
        match s {
            Strategy::Default | Strategy::LeastLoaded => self.agents.len(),
            Strategy::DestHost => self.by_host.len(),
            Strategy::DefaultRoute => self.default_route.len(),
        }
    }
}

/// All connected agent streams.
pub struct Registry {
    index: RwLock<Index>,
    strategies: Vec<Strategy>,
    metrics: ServerMetrics,
    /// Operations (add, remove, pick) and the entries they visited: with every path O(1) in
    /// the fleet's size, steps per operation stay flat as the fleet grows (the fleet test
    /// checks this; `spoke_server_registry_*`).
    ops: Counter,
    steps: Counter,
}

/// [`Registry::work`]: operations and entries visited so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Work {
    pub ops: u64,
    pub steps: u64,
}

impl Registry {
    pub fn new(strategies: Vec<Strategy>, metrics: ServerMetrics) -> Self {
        let me = Self {
            index: RwLock::default(),
            strategies,
            ops: metrics.registry_ops.clone(),
            steps: metrics.registry_steps.clone(),
            metrics,
        };
        me.update_gauges(&Index::default());
        me
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Operations so far and the entries they visited.
    pub fn work(&self) -> Work {
        Work {
            ops: self.ops.get(),
            steps: self.steps.get(),
        }
    }

    fn op(&self, steps: u64) {
        self.ops.inc();
        self.steps.inc_by(steps);
    }

    pub fn add(&self, s: Arc<AgentStream>) {
        self.op(1);
        let mut ix = self.write();
        ix.streams.insert(s.end.stream_id, s.clone());
        let streams = ix.by_agent.entry(s.end.agent_id.clone()).or_default();
        streams.push(s.clone());
        if streams.len() == 1 {
            ix.enlist(&s);
        }
        self.update_gauges(&ix);
    }

    pub fn remove(&self, s: &AgentStream) {
        self.op(1);
        let mut ix = self.write();
        if ix.streams.remove(&s.end.stream_id).is_none() {
            return;
        }
        let agent = &s.end.agent_id;
        let (was_first, next) = match ix.by_agent.get_mut(agent) {
            Some(streams) => {
                // One stream per server the agent reaches: a handful, whatever the fleet.
                self.steps.inc_by(streams.len() as u64);
                let at = streams
                    .iter()
                    .position(|x| x.end.stream_id == s.end.stream_id);
                if let Some(i) = at {
                    streams.remove(i);
                }
                (at == Some(0), streams.first().cloned())
            }
            None => (false, None),
        };
        if was_first {
            ix.delist(s);
            // The agent's next stream takes over its dials, as upstream's does.
            if let Some(next) = &next {
                ix.enlist(next);
            }
        }
        if next.is_none() {
            ix.by_agent.remove(agent);
        }
        self.update_gauges(&ix);
    }

    /// Every stream (the admin port's `/status`).
    pub fn snapshot(&self) -> Vec<Arc<AgentStream>> {
        self.read().streams.values().cloned().collect()
    }

    fn update_gauges(&self, ix: &Index) {
        let m = &self.metrics;
        m.ready_backend_connections.set(ix.streams.len() as i64);
        for s in &self.strategies {
            m.ready_backends
                .get_or_create(&StrategyLabel {
                    proxy_strategy: s.label(),
                })
                .set(ix.ready_count(*s) as i64);
        }
    }

    /// Ready when the first strategy has at least one agent (upstream's rule).
    pub fn ready(&self) -> bool {
        let first = self
            .strategies
            .first()
            .copied()
            .unwrap_or(Strategy::Default);
        self.read().ready_count(first) > 0
    }

    /// Picks an agent stream for a dial to `address`, trying each strategy in order.
    pub fn pick(&self, address: &str) -> Option<Arc<AgentStream>> {
        self.op(0);
        let host = dial_host(address);
        // A write lock: a pick may move a draining stream aside (O(1), once per stream).
        let mut ix = self.write();
        let steps = &self.steps;
        self.strategies.iter().find_map(|s| {
            let pool = ix.pool(*s, host)?;
            match s {
                Strategy::LeastLoaded => pool.least_loaded(steps),
                _ => pool.random(steps),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spoke_tunnel::conns::FlowConfig;
    use spoke_tunnel::identifiers::AgentIdentifiers;
    use spoke_tunnel::outbound::outbound;

    fn stream(agent: &str, ids: &str, m: &ServerMetrics) -> Arc<AgentStream> {
        let end = ServerEnd::new(
            agent.into(),
            AgentIdentifiers::parse(ids, false).expect("identifiers"),
            m.dial_failures.clone(),
            m.dial_duration.clone(),
        );
        let (out, _rx) = outbound(None);
        let flow = FlowConfig {
            buffer_cap: 1 << 20,
            peer_window: None,
        };
        Session::new(end, out, flow, m.session("from_agent"))
    }

    fn ready(m: &ServerMetrics, s: &'static str) -> i64 {
        m.ready_backends
            .get_or_create(&StrategyLabel { proxy_strategy: s })
            .get()
    }

    #[test]
    fn pools_follow_streams_in_and_out() {
        let m = ServerMetrics::new();
        let all = vec![
            Strategy::DestHost,
            Strategy::DefaultRoute,
            Strategy::Default,
        ];
        let r = Registry::new(all, m.clone());
        let a1 = stream("a", "host=n1&ipv4=10.0.0.1", &m);
        let a2 = stream("a", "host=n1", &m);
        let b = stream("b", "host=n2&default-route=true", &m);
        for s in [&a1, &a2, &b] {
            r.add(s.clone());
        }
        assert_eq!(m.ready_backend_connections.get(), 3);
        assert_eq!(ready(&m, "default"), 2);
        assert_eq!(ready(&m, "destHost"), 3); // n1, 10.0.0.1, n2
        assert_eq!(ready(&m, "defaultRoute"), 1);
        // Agent a's dials ride its first stream.
        for _ in 0..20 {
            let s = r.pick("n1:10250").expect("n1");
            assert_eq!(s.end.stream_id, a1.end.stream_id);
        }
        // The first stream goes: the second takes over, with its own identifiers.
        r.remove(&a1);
        assert_eq!(r.pick("n1:1").expect("n1").end.stream_id, a2.end.stream_id);
        assert!(r.pick("10.0.0.1:1").is_some_and(|s| s.end.agent_id == "b"));
        assert_eq!(ready(&m, "destHost"), 2);
        r.remove(&a2);
        r.remove(&a2); // twice is harmless
        assert_eq!(ready(&m, "default"), 1);
        r.remove(&b);
        assert!(r.pick("n2:1").is_none());
        assert!(!r.ready());
        assert_eq!(m.ready_backend_connections.get(), 0);
    }

    #[test]
    fn least_loaded_prefers_the_idle_agent_and_spreads_ties() {
        let m = ServerMetrics::new();
        let r = Registry::new(vec![Strategy::LeastLoaded], m.clone());
        let busy = stream("busy", "", &m);
        let idle = stream("idle", "", &m);
        r.add(busy.clone());
        r.add(idle.clone());
        for i in 1..=3 {
            let (entry, _parts) = busy.new_conn();
            assert!(busy.conns.insert(i, entry));
        }
        for _ in 0..50 {
            assert_eq!(r.pick("x:1").expect("pick").end.agent_id, "idle");
        }
        let other = stream("other", "", &m);
        r.add(other);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            seen.insert(r.pick("x:1").expect("pick").end.agent_id.clone());
        }
        assert_eq!(
            seen.len(),
            2,
            "ties between idle agents go either way: {seen:?}"
        );
        assert!(!seen.contains("busy"));
    }

    /// The same skew under upstream's `default` (a random agent): the busy agent keeps getting
    /// about half the dials, which is what `leastLoaded` is for.
    #[test]
    fn default_ignores_the_skew_that_least_loaded_avoids() {
        let m = ServerMetrics::new();
        let r = Registry::new(vec![Strategy::Default], m.clone());
        let busy = stream("busy", "", &m);
        r.add(busy.clone());
        r.add(stream("idle", "", &m));
        for i in 1..=3 {
            let (entry, _parts) = busy.new_conn();
            assert!(busy.conns.insert(i, entry));
        }
        let to_busy = (0..400)
            .filter(|_| r.pick("x:1").expect("pick").end.agent_id == "busy")
            .count();
        // Binomial(400, 0.5): 200 ± 60 is beyond six standard deviations.
        assert!(
            (140..=260).contains(&to_busy),
            "default should pick at random, picked the busy agent {to_busy}/400 times"
        );
    }
}
