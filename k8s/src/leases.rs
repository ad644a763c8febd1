//! Upstream's lease-based HA.
//!
//! - [`Controller`] (spoke-server `--enable-lease-controller`): keeps the Lease
//!   `konnectivity-proxy-server-<serverID>` in `--lease-namespace`, labelled with `--lease-label`,
//!   holder = server ID, 30 s duration, renewed every 15 s (component-helpers' lease controller:
//!   get or create, update with the last seen `resourceVersion`, a conflict re-reads, an API
//!   server that is down is retried with a doubling backoff up to 7 s), and every 15 s deletes
//!   expired leases with the same labels (with a `resourceVersion` precondition, so a lease
//!   renewed meanwhile stays). Its own lease is deleted on shutdown.
//! - [`LeaseCounter`] (`--count-server-leases`): a watch (kube's watcher and reflector) of the
//!   leases matching `--lease-label-selector`; the count is the number of valid ones (renew or
//!   acquire time + duration in the future), at least 1. It changes when a lease is created,
//!   deleted, or expires (a timer wakes at the next expiry), not at a polling period. While the
//!   watch is broken the last count is kept; the watcher retries with a backoff and every
//!   failure is logged.
use crate::client::{self, Call, Observer};
use anyhow::{anyhow, bail, Result};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, PostParams, Preconditions};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Upstream's lease name prefix; the server ID follows.
pub const LEASE_NAME_PREFIX: &str = "konnectivity-proxy-server-";
/// component-helpers: update retries before a fresh read, and the backoff cap.
const MAX_UPDATE_RETRIES: usize = 5;
const MAX_BACKOFF: Duration = Duration::from_secs(7);
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// Longest the counter waits before recounting when no lease expires sooner.
const RECOUNT_AT_LEAST_EVERY: Duration = Duration::from_secs(5);

/// Durations of the server's lease (upstream's constants; Spoke's hidden flags shorten them for
/// tests).
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    pub duration: Duration,
    pub renew_interval: Duration,
    pub gc_interval: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(30),
            renew_interval: Duration::from_secs(15),
            gc_interval: Duration::from_secs(15),
        }
    }
}

/// upstream `util.ParseLabels`: `k=v` pairs separated by commas; keys and values non-empty.
pub fn parse_labels(s: &str) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            bail!("label {pair:?} is not of the form key=value");
        };
        let (k, v) = (k.trim(), v.trim());
        if k.is_empty() || v.is_empty() || v.contains('=') {
            bail!("label {pair:?} is not of the form key=value");
        }
        out.insert(k.to_string(), v.to_string());
    }
    if out.is_empty() {
        bail!("no labels given");
    }
    Ok(out)
}

/// Labels as a label selector (`k=v,k2=v2`).
pub fn format_labels(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// [`check_selector`] for `--lease-label-selector` (both binaries take it).
pub fn check_selector_flag(s: &str) -> Result<()> {
    check_selector(s).map_err(|e| anyhow!("--lease-label-selector {s:?}: {e}"))
}

/// Checks a label selector's syntax as the API server would read it (equality, inequality,
/// existence and set-based terms); the API server has the last word.
pub fn check_selector(s: &str) -> Result<()> {
    if s.trim().is_empty() {
        bail!("empty label selector");
    }
    let mut depth = 0i32;
    for c in s.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            _ => {}
        }
        if depth < 0 {
            bail!("unbalanced parentheses in label selector {s:?}");
        }
    }
    if depth != 0 {
        bail!("unbalanced parentheses in label selector {s:?}");
    }
    Ok(())
}

/// upstream `util.IsLeaseValid`: renew time (else acquire time) plus the duration is after now.
pub fn is_valid(lease: &Lease, now: Timestamp) -> bool {
    expiry(lease).is_some_and(|e| e > now)
}

/// When `lease` expires; `None` when it has no renew or acquire time or no duration.
pub fn expiry(lease: &Lease) -> Option<Timestamp> {
    let spec = lease.spec.as_ref()?;
    let base = spec.renew_time.as_ref().or(spec.acquire_time.as_ref())?.0;
    let secs = i64::from(spec.lease_duration_seconds?);
    base.checked_add(k8s_openapi::jiff::SignedDuration::from_secs(secs))
        .ok()
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusReasonLabels {
    pub http_status_code: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub http_status_code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResponseReasonLabels {
    pub http_response_code: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResponseLabel {
    pub http_response_code: String,
}

#[derive(Clone, Debug)]
pub struct Buckets(&'static [f64]);

impl MetricConstructor<Histogram> for Buckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(self.0.iter().copied())
    }
}

/// Prometheus' default buckets (upstream's server lease histograms set none).
const DEFAULT_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// upstream agent's `latencyBuckets`.
const AGENT_BUCKETS: &[f64] = &[0.005, 0.025, 0.1, 0.5, 2.5, 10.0, 30.0];

/// The server's lease metrics (`konnectivity_network_proxy_server_*`), upstream's names, HELP
/// texts and labels. All are about the garbage collector's calls, as upstream's.
#[derive(Clone, Debug)]
pub struct ServerLeaseMetrics {
    pub culled: Counter,
    pub delete_latency: Family<StatusLabel, Histogram, Buckets>,
    pub deletes: Family<StatusReasonLabels, Counter>,
    pub list_latency: Family<StatusLabel, Histogram, Buckets>,
    pub lists: Family<StatusReasonLabels, Counter>,
}

impl Default for ServerLeaseMetrics {
    fn default() -> Self {
        Self {
            culled: Counter::default(),
            delete_latency: Family::new_with_constructor(Buckets(DEFAULT_BUCKETS)),
            deletes: Family::default(),
            list_latency: Family::new_with_constructor(Buckets(DEFAULT_BUCKETS)),
            lists: Family::default(),
        }
    }
}

impl ServerLeaseMetrics {
    /// Registers under the caller's `konnectivity_network_proxy_server` prefix.
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "culled_leases_count",
            "Count of expired leases that the lease garbage collection controller has culled.",
            self.culled.clone(),
        );
        r.register(
            "lease_delete_latency_seconds",
            "Latency of lease deletion calls by the garbage collection controller in seconds.",
            self.delete_latency.clone(),
        );
        r.register(
            "lease_delete",
            "Count of lease delection calls by the garbage collection controller. Labeled by HTTP status code and reason.",
            self.deletes.clone(),
        );
        r.register(
            "lease_list_latency_seconds",
            "Latency of lease list calls by the garbage collection controller in seconds.",
            self.list_latency.clone(),
        );
        r.register(
            "lease_list",
            "Count of lease deletion calls by the garbage collection controller. Labeled by HTTP status code and reason.",
            self.lists.clone(),
        );
    }

    fn observe(
        count: &Family<StatusReasonLabels, Counter>,
        latency: &Family<StatusLabel, Histogram, Buckets>,
        status: Option<(u16, String)>,
        took: Duration,
    ) {
        let Some((code, reason)) = status else {
            return;
        };
        count
            .get_or_create(&StatusReasonLabels {
                http_status_code: code.to_string(),
                reason,
            })
            .inc();
        latency
            .get_or_create(&StatusLabel {
                http_status_code: code.to_string(),
            })
            .observe(took.as_secs_f64());
    }
}

/// The agent's lease metrics (`konnectivity_network_proxy_agent_*`), upstream's names, HELP
/// texts and labels. (Upstream records watch calls into `lease_lists_total` by mistake; Spoke
/// counts them in `lease_watches_total`.)
#[derive(Clone, Debug)]
pub struct AgentLeaseMetrics {
    pub lists: Family<ResponseReasonLabels, Counter>,
    pub watches: Family<ResponseReasonLabels, Counter>,
    pub list_latency: Family<ResponseLabel, Histogram, Buckets>,
}

impl Default for AgentLeaseMetrics {
    fn default() -> Self {
        Self {
            lists: Family::default(),
            watches: Family::default(),
            list_latency: Family::new_with_constructor(Buckets(AGENT_BUCKETS)),
        }
    }
}

impl AgentLeaseMetrics {
    /// Registers under the caller's `konnectivity_network_proxy_agent` prefix.
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "lease_lists",
            "Count of server lease list calls made by the agent to the k8s apiserver, labeled by HTTP response code and reason",
            self.lists.clone(),
        );
        r.register(
            "lease_watches",
            "Count of server lease watch calls made by the agent to the k8s apiserver, labeled by HTTP response code and reason",
            self.watches.clone(),
        );
        r.register(
            "lease_list_latency_seconds",
            "Latency of server lease listing in seconds",
            self.list_latency.clone(),
        );
    }

    /// Records one lease list or watch request (upstream records API answers only).
    fn observe(&self, call: &Call<'_>) {
        let Some(code) = call.code else { return };
        let labels = ResponseReasonLabels {
            http_response_code: code.to_string(),
            reason: if code < 300 {
                String::new()
            } else {
                client::reason_for_code(code).to_string()
            },
        };
        if client::is_watch(call.uri) {
            self.watches.get_or_create(&labels).inc();
        } else {
            self.lists.get_or_create(&labels).inc();
            self.list_latency
                .get_or_create(&ResponseLabel {
                    http_response_code: code.to_string(),
                })
                .observe(call.latency.as_secs_f64());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The server's lease.

/// Publishes this server's Lease and garbage-collects expired ones.
pub struct Controller {
    api: Api<Lease>,
    name: String,
    holder: String,
    labels: BTreeMap<String, String>,
    selector: String,
    timings: Timings,
    metrics: ServerLeaseMetrics,
}

impl Controller {
    pub fn new(
        client: kube::Client,
        namespace: &str,
        server_id: &str,
        labels: BTreeMap<String, String>,
        timings: Timings,
        metrics: ServerLeaseMetrics,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: format!("{LEASE_NAME_PREFIX}{server_id}"),
            holder: server_id.to_string(),
            selector: format_labels(&labels),
            labels,
            timings,
            metrics,
        }
    }

    pub fn lease_name(&self) -> &str {
        &self.name
    }

    /// Renews and collects until `stop`, then deletes this server's lease.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let renew = {
            let (me, stop) = (self.clone(), stop.clone());
            async move {
                let mut latest: Option<Lease> = None;
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = me.sync(&mut latest) => {}
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(me.timings.renew_interval) => {}
                    }
                }
            }
        };
        let gc = {
            let (me, stop) = (self.clone(), stop.clone());
            async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = me.collect() => {}
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(me.timings.gc_interval) => {}
                    }
                }
            }
        };
        tokio::join!(renew, gc);
        self.delete_own().await;
    }

    fn fresh(&self, base: Option<&Lease>) -> Lease {
        let mut lease = base.cloned().unwrap_or_else(|| Lease {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                ..Default::default()
            },
            spec: None,
        });
        let labels = lease.metadata.labels.get_or_insert_with(BTreeMap::new);
        labels.extend(self.labels.clone());
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        spec.holder_identity = Some(self.holder.clone());
        spec.lease_duration_seconds = Some(self.timings.duration.as_secs().max(1) as i32);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        lease
    }

    /// component-helpers' `sync`: renew the lease we know, else get or create it, then renew.
    async fn sync(&self, latest: &mut Option<Lease>) {
        if let Some(lease) = latest.take() {
            match self.retry_update(lease).await {
                Ok(l) => {
                    *latest = Some(l);
                    return;
                }
                Err(e) => {
                    tracing::warn!(lease = %self.name, "cannot renew the server lease: {e:#}")
                }
            }
        }
        let (lease, created) = self.backoff_ensure().await;
        if created {
            tracing::info!(lease = %self.name, "server lease created");
            *latest = Some(lease);
            return;
        }
        match self.retry_update(lease).await {
            Ok(l) => *latest = Some(l),
            Err(e) => tracing::warn!(lease = %self.name, "cannot renew the server lease: {e:#}"),
        }
    }

    /// Gets the lease, creating it when it does not exist; retried with a doubling backoff
    /// (200 ms to 7 s) until it works.
    async fn backoff_ensure(&self) -> (Lease, bool) {
        let mut backoff = FIRST_BACKOFF;
        loop {
            match self.ensure().await {
                Ok(r) => return r,
                Err(e) => {
                    tracing::warn!(lease = %self.name, retry_in = ?backoff, "cannot read or create the server lease: {e:#}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    async fn ensure(&self) -> Result<(Lease, bool)> {
        match self.api.get(&self.name).await {
            Ok(l) => Ok((l, false)),
            Err(e) if crate::is_status(&e, 404) => {
                let lease = self
                    .api
                    .create(&PostParams::default(), &self.fresh(None))
                    .await
                    .map_err(|e| anyhow!("create: {}", crate::error_chain(&e)))?;
                Ok((lease, true))
            }
            Err(e) => Err(anyhow!("get: {}", crate::error_chain(&e))),
        }
    }

    /// Updates with the last seen resourceVersion; a conflict re-reads the lease first.
    async fn retry_update(&self, mut base: Lease) -> Result<Lease> {
        for attempt in 1..=MAX_UPDATE_RETRIES {
            let lease = self.fresh(Some(&base));
            match self
                .api
                .replace(&self.name, &PostParams::default(), &lease)
                .await
            {
                Ok(l) => return Ok(l),
                Err(e) if crate::is_status(&e, 409) => {
                    tracing::info!(lease = %self.name, attempt, "lease renewal conflict (resourceVersion changed): reading it again");
                    base = self.backoff_ensure().await.0;
                }
                Err(e) if crate::is_status(&e, 404) => {
                    tracing::info!(lease = %self.name, "the server lease was deleted (expired and collected?): creating it again");
                    let (l, created) = self.backoff_ensure().await;
                    if created {
                        return Ok(l);
                    }
                    base = l;
                }
                Err(e) => {
                    tracing::warn!(lease = %self.name, attempt, "cannot renew the server lease: {}", crate::error_chain(&e));
                }
            }
        }
        bail!("failed {MAX_UPDATE_RETRIES} attempts to update the lease")
    }

    /// One garbage collection round: deletes every expired lease with our labels.
    async fn collect(&self) {
        let m = &self.metrics;
        let start = Instant::now();
        let listed = self
            .api
            .list(&ListParams::default().labels(&self.selector))
            .await;
        let took = start.elapsed();
        let leases = match listed {
            Ok(l) => {
                ServerLeaseMetrics::observe(
                    &m.lists,
                    &m.list_latency,
                    Some((200, String::new())),
                    took,
                );
                l.items
            }
            Err(e) => {
                ServerLeaseMetrics::observe(&m.lists, &m.list_latency, crate::api_status(&e), took);
                tracing::warn!(
                    "cannot list leases to garbage-collect: {}",
                    crate::error_chain(&e)
                );
                return;
            }
        };
        let now = Timestamp::now();
        for lease in leases.iter().filter(|l| !is_valid(l, now)) {
            let Some(name) = lease.metadata.name.as_deref() else {
                continue;
            };
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    resource_version: lease.metadata.resource_version.clone(),
                    uid: None,
                }),
                ..Default::default()
            };
            let start = Instant::now();
            let deleted = self.api.delete(name, &params).await;
            let took = start.elapsed();
            match deleted {
                Ok(_) => {
                    m.culled.inc();
                    ServerLeaseMetrics::observe(
                        &m.deletes,
                        &m.delete_latency,
                        Some((200, String::new())),
                        took,
                    );
                    tracing::info!(lease = name, "expired server lease collected");
                }
                Err(e) => {
                    ServerLeaseMetrics::observe(
                        &m.deletes,
                        &m.delete_latency,
                        crate::api_status(&e),
                        took,
                    );
                    if crate::is_status(&e, 404) {
                        tracing::debug!(lease = name, "expired lease already deleted");
                    } else if crate::is_status(&e, 409) {
                        tracing::debug!(lease = name, "expired lease was renewed meanwhile: kept");
                    } else {
                        tracing::warn!(
                            lease = name,
                            "cannot delete an expired lease: {}",
                            crate::error_chain(&e)
                        );
                    }
                }
            }
        }
    }

    async fn delete_own(&self) {
        let deleted = tokio::time::timeout(
            Duration::from_secs(5),
            self.api.delete(&self.name, &DeleteParams::default()),
        )
        .await;
        match deleted {
            Ok(Ok(_)) => tracing::info!(lease = %self.name, "server lease deleted"),
            Ok(Err(e)) => {
                tracing::warn!(lease = %self.name, "cannot delete the server lease: {}", crate::error_chain(&e))
            }
            Err(_) => {
                tracing::warn!(lease = %self.name, "cannot delete the server lease: timed out")
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Counting servers.

/// Counts valid server leases from a watch. See the module documentation.
pub struct LeaseCounter {
    count: watch::Sender<usize>,
}

impl LeaseCounter {
    /// Starts watching leases matching `selector` in `namespace` with a client built from
    /// `config`; `metrics`, when given, counts the list and watch calls (the agent's).
    /// Must be called within a tokio runtime; the watch lives until `stop`.
    pub fn spawn(
        config: kube::Config,
        namespace: &str,
        selector: &str,
        metrics: Option<AgentLeaseMetrics>,
        stop: CancellationToken,
    ) -> Result<Arc<Self>> {
        check_selector(selector)?;
        // A list or watch request that got an answer proves the API server is there (even when
        // no lease changes); one that did not marks the count stale until the next answer.
        let reachable = Arc::new(AtomicBool::new(false));
        let observer: Observer = {
            let reachable = reachable.clone();
            Arc::new(move |call: &Call<'_>| {
                if let Some(m) = &metrics {
                    m.observe(call);
                }
                let answered = call.code.is_some_and(|c| (200..300).contains(&c));
                reachable.store(answered, Ordering::Relaxed);
            })
        };
        let client = client::build(config, Some(observer))?;
        let api: Api<Lease> = Api::namespaced(client, namespace);
        let (count, _) = watch::channel(1usize);
        let me = Arc::new(Self { count });
        let (store, writer) = reflector::store();
        let events = watcher(api, watcher::Config::default().labels(selector))
            .default_backoff()
            .reflect(writer);
        let (namespace, selector) = (namespace.to_string(), selector.to_string());
        let task = {
            let me = me.clone();
            async move {
                tracing::info!(%namespace, %selector, "counting server leases (watch)");
                let mut events = std::pin::pin!(events);
                let mut synced = false;
                let mut last_error: Option<String> = None;
                loop {
                    let recount_in = match synced && reachable.load(Ordering::Relaxed) {
                        true => me.recount(&store),
                        false => RECOUNT_AT_LEAST_EVERY,
                    };
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(recount_in) => {}
                        ev = events.next() => match ev {
                            None => return,
                            Some(Ok(ev)) => {
                                reachable.store(true, Ordering::Relaxed);
                                if matches!(ev, watcher::Event::InitDone) {
                                    synced = true;
                                }
                                if last_error.take().is_some() {
                                    tracing::info!("lease watch restored");
                                }
                            }
                            Some(Err(e)) => {
                                reachable.store(false, Ordering::Relaxed);
                                let why = crate::error_chain(&e);
                                tracing::warn!(last_count = *me.count.borrow(), "lease watch failed (keeping the last server count, retrying with backoff): {why}");
                                last_error = Some(why);
                            }
                        }
                    }
                }
            }
        };
        tokio::spawn(task);
        Ok(me)
    }

    /// The current count of valid leases (at least 1).
    pub fn count(&self) -> usize {
        *self.count.borrow()
    }

    /// Changes of the count.
    pub fn subscribe(&self) -> watch::Receiver<usize> {
        self.count.subscribe()
    }

    /// Recounts from the store; returns how long until the next lease expires (capped).
    fn recount(&self, store: &reflector::Store<Lease>) -> Duration {
        let now = Timestamp::now();
        let leases = store.state();
        let valid = leases.iter().filter(|l| is_valid(l, now)).count();
        let next_expiry = leases
            .iter()
            .filter_map(|l| expiry(l))
            .filter(|e| *e > now)
            .min()
            .and_then(|e| Duration::try_from(e.duration_since(now)).ok());
        let count = if valid == 0 {
            tracing::debug!("no valid server leases found, assuming a server count of 1");
            1
        } else {
            valid
        };
        self.count.send_if_modified(|c| {
            if *c != count {
                tracing::info!(from = *c, to = count, "server count from leases changed");
                *c = count;
                true
            } else {
                false
            }
        });
        next_expiry
            .map(|d| d + Duration::from_millis(10))
            .unwrap_or(RECOUNT_AT_LEAST_EVERY)
            .min(RECOUNT_AT_LEAST_EVERY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(renew_secs_ago: i64, duration: i32) -> Lease {
        let now = Timestamp::now();
        Lease {
            spec: Some(LeaseSpec {
                renew_time: Some(MicroTime(
                    now.checked_sub(k8s_openapi::jiff::SignedDuration::from_secs(renew_secs_ago))
                        .expect("time"),
                )),
                lease_duration_seconds: Some(duration),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn validity_as_upstream() {
        let now = Timestamp::now();
        assert!(is_valid(&lease(10, 30), now));
        assert!(!is_valid(&lease(31, 30), now));
        assert!(
            !is_valid(&Lease::default(), now),
            "no renew/acquire time: expired"
        );
        let mut acquired = lease(0, 30);
        if let Some(s) = acquired.spec.as_mut() {
            s.acquire_time = s.renew_time.take();
        }
        assert!(
            is_valid(&acquired, now),
            "acquire time counts without renew time"
        );
    }

    #[test]
    fn labels_parse_like_upstream() {
        let l = parse_labels("k8s-app=konnectivity-server, tier=cp").expect("labels");
        assert_eq!(l.len(), 2);
        assert_eq!(format_labels(&l), "k8s-app=konnectivity-server,tier=cp");
        assert!(parse_labels("novalue").is_err());
        assert!(parse_labels("=v").is_err());
        assert!(parse_labels("").is_err());
        assert!(check_selector("a in (b,c)").is_ok());
        assert!(check_selector("a in (b").is_err());
    }
}
