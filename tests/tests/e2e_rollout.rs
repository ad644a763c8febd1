//! Agent drain under load, as a DaemonSet rolling update with `maxSurge` does it on one node.
//!
//! Rollout: two agents serve the node's identity (`host=node-a&ipv4=127.0.0.1`, distinct agent
//! ids), the server routes by `--proxy-strategies=destHost,default`, and about 50 tunnelled HTTP
//! requests per second (each a fresh tunnel, as kube-apiserver opens one per request) plus a few
//! long-lived echo connections run while agent 1 is drained, its replacement (agent 3) starts
//! and agent 2 is drained. No request may fail, new dials must leave the draining agents while a
//! non-draining one is there, and every long-lived connection must finish its transfer intact.
//! Agent 2 leaves at its `--drain-timeout`, agent 1 at a second signal once the rollout is done.
//!
//! Single agent: the node's only agent is drained; requests, new dials included, keep
//! succeeding through it until its drain timeout (upstream's `TestProxyHandle_AfterDrain`).
//!
//! Each runs once per frontend (HTTP CONNECT and gRPC, each on its own server's Unix socket) and
//! prints the figures: requests sent and failed, p50/p99 latency before and during the drain.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use spoke_tests::backends::{self, http_get_pattern};
use spoke_tests::cluster::{status, Agent, AgentOpts, Env, Mode, Server, ServerOpts, Transport};
use spoke_tests::connect::{self, Frontend};
use spoke_tests::data::Pattern;
use spoke_tests::faultnet::signal;
use spoke_tests::grpc;
use spoke_tests::http;
use spoke_tests::metrics::names;
use spoke_tests::wait::{poll_until, within};
use spoke_tests::BoxIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

/// The identity every agent of the node advertises.
const NODE: &str = "host=node-a&ipv4=127.0.0.1";
/// One request every 20 ms: 50 per second.
const EVERY: Duration = Duration::from_millis(20);
/// Response body of each request.
const BODY: u64 = 4096;
/// A request that takes longer counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Long-lived connections per old agent.
const LONG_PER_AGENT: usize = 2;
/// Each long-lived connection echoes this much every `LONG_EVERY`.
const LONG_CHUNK: usize = 16 * 1024;
const LONG_EVERY: Duration = Duration::from_millis(50);
/// Agent 2's drain: long enough for the end of the rollout (50 requests, the long-lived
/// connections finishing) to happen inside it, with room for a loaded CI machine (that part
/// takes 2-3 s here).
const ROLLOUT_DRAIN: Duration = Duration::from_secs(8);
/// Agent 1's drain: longer than the test, so the second signal is what ends it.
const LONG_DRAIN: Duration = Duration::from_secs(120);
/// The single agent's drain.
const SINGLE_DRAIN: Duration = Duration::from_secs(4);
/// How late a process may exit after its deadline.
const SLACK: Duration = Duration::from_millis(1500);

/// The figures are latencies: the tests of this file run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---------------------------------------------------------------------------------------------
// Frontends

/// How a client reaches the backend through the server.
#[derive(Clone)]
enum Front {
    /// HTTP CONNECT, one frontend connection per tunnel.
    Connect(Frontend),
    /// gRPC over the Unix socket, one HTTP/2 connection and Proxy stream per tunnel (what
    /// kube-apiserver's single-use tunnel does).
    Grpc(PathBuf),
}

impl Front {
    fn of(server: &Server, mode: Mode) -> Self {
        match mode {
            Mode::HttpConnect => Front::Connect(server.frontend.clone()),
            Mode::Grpc => Front::Grpc(server.uds_path()),
        }
    }

    async fn tunnel(&self, target: &str) -> anyhow::Result<BoxIo> {
        match self {
            Front::Connect(f) => connect::tunnel(f, target).await,
            Front::Grpc(path) => grpc::tunnel(grpc::uds_channel(path).await?, target).await,
        }
    }
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::HttpConnect => "http-connect",
        Mode::Grpc => "grpc",
    }
}

fn server_opts(mode: Mode) -> ServerOpts {
    ServerOpts::new(mode, Transport::Uds).arg("--proxy-strategies=destHost,default")
}

/// An agent of node-a with `--drain-timeout=drain`, its tunnel up.
async fn node_agent(env: &Env, server: &Server, id: &str, drain: Duration) -> Agent {
    let mut a = env
        .agent(
            AgentOpts::new(server.agent_addr)
                .id(id)
                .arg(&format!("--agent-identifiers={NODE}"))
                .arg(&format!("--drain-timeout={}s", drain.as_secs())),
        )
        .await;
    a.wait_ready().await;
    a
}

/// DIAL_REQs agent `a` has received.
async fn dial_reqs(a: &Agent) -> u64 {
    let m = a.metrics().await.expect("agent metrics");
    m.counter(
        names::AGENT_PACKETS,
        &[("segment", "to_agent"), ("packet_type", "DIAL_REQ")],
    ) as u64
}

async fn open_endpoints(a: &Agent) -> u64 {
    let m = a.metrics().await.expect("agent metrics");
    m.get(names::AGENT_OPEN_ENDPOINTS).unwrap_or(0.0) as u64
}

// ---------------------------------------------------------------------------------------------
// Request stream

/// One finished request.
#[derive(Debug, Clone)]
struct Sample {
    start: Instant,
    latency: Duration,
    error: Option<String>,
}

#[derive(Default)]
struct Record {
    /// Started and not finished: sequence number → start.
    in_flight: BTreeMap<u64, Instant>,
    done: Vec<Sample>,
}

/// A steady stream of requests (one every [`EVERY`], each in its own task so a slow one does
/// not hold back the next), each a fresh tunnel carrying a verified HTTP exchange.
struct Load {
    record: Arc<Mutex<Record>>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
    started: Instant,
}

async fn one_request(front: &Front, target: &str, seed: u64) -> anyhow::Result<()> {
    let mut io = front.tunnel(target).await?;
    http_get_pattern(&mut io, BODY, seed).await
}

impl Load {
    fn start(front: Front, target: String) -> Self {
        let record = Arc::new(Mutex::new(Record::default()));
        let (stop, mut stopped) = oneshot::channel();
        let rec = record.clone();
        let started = Instant::now();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut running = JoinSet::new();
            for seq in 0u64.. {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = &mut stopped => break,
                }
                while running.try_join_next().is_some() {}
                let start = Instant::now();
                rec.lock().unwrap().in_flight.insert(seq, start);
                let (front, target, rec) = (front.clone(), target.clone(), rec.clone());
                running.spawn(async move {
                    let result =
                        tokio::time::timeout(REQUEST_TIMEOUT, one_request(&front, &target, seq))
                            .await
                            .unwrap_or_else(|_| {
                                Err(anyhow::anyhow!("no answer within {REQUEST_TIMEOUT:?}"))
                            });
                    let sample = Sample {
                        start,
                        latency: start.elapsed(),
                        error: result.err().map(|e| format!("request {seq}: {e:#}")),
                    };
                    let mut r = rec.lock().unwrap();
                    r.in_flight.remove(&seq);
                    r.done.push(sample);
                });
            }
            while running.join_next().await.is_some() {}
        });
        Self {
            record,
            stop,
            task,
            started,
        }
    }

    /// Finished requests that started at or after `since`: (succeeded, failures).
    fn finished_since(&self, since: Instant) -> (usize, Vec<String>) {
        let r = self.record.lock().unwrap();
        let mine = r.done.iter().filter(|s| s.start >= since);
        let failures: Vec<String> = mine.clone().filter_map(|s| s.error.clone()).collect();
        (mine.count() - failures.len(), failures)
    }

    /// Waits until `n` requests started at or after `since` have succeeded; fails at once on
    /// a failed one.
    async fn wait_succeeded_since(&self, since: Instant, n: usize, what: &str) {
        poll_until(
            &format!("{n} requests to succeed {what}"),
            Duration::from_secs(15),
            || async {
                let (ok, failures) = self.finished_since(since);
                assert!(failures.is_empty(), "requests failed {what}: {failures:#?}");
                if ok >= n {
                    Ok(())
                } else {
                    Err(format!("{ok} succeeded"))
                }
            },
        )
        .await;
    }

    /// Waits until every request started before `before` has finished, so the dials of all
    /// later ones were routed after `before`.
    async fn wait_settled(&self, before: Instant) {
        poll_until(
            "the requests started before the mark to finish",
            REQUEST_TIMEOUT + Duration::from_secs(1),
            || async {
                let r = self.record.lock().unwrap();
                match r.in_flight.values().filter(|s| **s < before).count() {
                    0 => Ok(()),
                    n => Err(format!("{n} still running")),
                }
            },
        )
        .await;
    }

    /// Stops sending, waits for the requests in flight and returns every sample.
    async fn stop(self) -> Vec<Sample> {
        let _ = self.stop.send(());
        tokio::time::timeout(REQUEST_TIMEOUT + Duration::from_secs(5), self.task)
            .await
            .expect("the load to stop")
            .expect("the load task");
        let r = self.record.lock().unwrap();
        assert!(r.in_flight.is_empty(), "requests left in flight");
        r.done.clone()
    }
}

// ---------------------------------------------------------------------------------------------
// Long-lived connections

/// A connection that echoes [`LONG_CHUNK`] bytes of `Pattern(seed)` every [`LONG_EVERY`] until
/// stopped, verifying every byte that comes back against the generator.
struct Long {
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<u64>>,
}

impl Long {
    fn start(mut io: BoxIo, seed: u64) -> Self {
        let (stop, mut stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let (mut up, mut down) = (Pattern::new(seed), Pattern::new(seed));
            let mut chunk = vec![0u8; LONG_CHUNK];
            let mut back = vec![0u8; LONG_CHUNK];
            let mut tick = tokio::time::interval(LONG_EVERY);
            loop {
                tick.tick().await;
                up.fill(&mut chunk);
                io.write_all(&chunk).await?;
                tokio::time::timeout(Duration::from_secs(10), io.read_exact(&mut back))
                    .await
                    .map_err(|_| anyhow::anyhow!("echo stalled at byte {}", down.position()))??;
                down.verify(&back)
                    .map_err(|at| anyhow::anyhow!("echo corrupted at byte {at}"))?;
                if stopped.try_recv().is_ok() {
                    break;
                }
            }
            io.shutdown().await?;
            Ok(down.position())
        });
        Self { stop, task }
    }

    /// Ends the transfer after its current chunk; the bytes echoed and verified.
    async fn finish(self) -> anyhow::Result<u64> {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .map_err(|_| anyhow::anyhow!("did not finish"))??
    }
}

/// Opens long-lived connections until each of `agents` carries [`LONG_PER_AGENT`] (which agent
/// a dial reaches is random).
async fn open_long_lived(front: &Front, echo: &str, agents: &[&Agent]) -> Vec<Long> {
    let mut longs = Vec::new();
    for seed in 1..=40u64 {
        let mut counts = Vec::new();
        for a in agents {
            counts.push(open_endpoints(a).await);
        }
        if counts.iter().all(|c| *c >= LONG_PER_AGENT as u64) {
            println!("long-lived connections per agent: {counts:?}");
            return longs;
        }
        let mut io = front.tunnel(echo).await.expect("long-lived tunnel");
        // One round trip: the agent has dialled and counts the connection.
        let mut probe = [0u8; 4];
        io.write_all(b"ping").await.unwrap();
        within(
            "the first echo",
            Duration::from_secs(10),
            io.read_exact(&mut probe),
        )
        .await
        .unwrap();
        longs.push(Long::start(io, seed));
    }
    panic!("40 long-lived connections did not reach every agent {LONG_PER_AGENT} times");
}

// ---------------------------------------------------------------------------------------------
// Figures

/// Nearest-rank percentile.
fn percentile(sorted: &[Duration], p: usize) -> Duration {
    match sorted.len() {
        0 => Duration::ZERO,
        n => sorted[(n * p).div_ceil(100).max(1) - 1],
    }
}

fn phase(samples: &[Sample], from: Instant, to: Instant) -> String {
    let mut l: Vec<Duration> = samples
        .iter()
        .filter(|s| s.start >= from && s.start < to && s.error.is_none())
        .map(|s| s.latency)
        .collect();
    l.sort();
    format!(
        "{} ok, p50 {:.1} ms, p99 {:.1} ms",
        l.len(),
        percentile(&l, 50).as_secs_f64() * 1e3,
        percentile(&l, 99).as_secs_f64() * 1e3
    )
}

/// Prints the figures and requires that no request failed.
fn report(what: &str, samples: &[Sample], phases: &[(&str, Instant, Instant)]) {
    let failures: Vec<&String> = samples.iter().filter_map(|s| s.error.as_ref()).collect();
    println!(
        "== {what}: {} requests sent, {} failed",
        samples.len(),
        failures.len()
    );
    for (name, from, to) in phases {
        println!("   {name:<7} {}", phase(samples, *from, *to));
    }
    assert!(
        failures.is_empty(),
        "{what}: {} of {} requests failed: {failures:#?}",
        failures.len(),
        samples.len()
    );
}

// ---------------------------------------------------------------------------------------------
// 1. rolling update

async fn rolling_update(mode: Mode) {
    let name = mode_name(mode);
    let env = Env::new(&format!("r_rollout_{name}"));
    let server = env.server(server_opts(mode)).await;
    let (backend, echo) = (backends::http().await, backends::echo().await);
    let mut a1 = node_agent(&env, &server, "agent-1", LONG_DRAIN).await;
    let mut a2 = node_agent(&env, &server, "agent-2", ROLLOUT_DRAIN).await;
    server.wait_agent_streams(2).await;
    let front = Front::of(&server, mode);

    let longs = open_long_lived(&front, &echo.target(), &[&a1, &a2]).await;
    let load = Load::start(front.clone(), backend.target());
    load.wait_succeeded_since(load.started, 100, "before the rollout")
        .await;

    // Agent 1 drains: new dials go to agent 2, none to agent 1.
    let t1 = Instant::now();
    signal(a1.proc.pid(), libc::SIGTERM);
    server.wait_agent_draining("agent-1").await;
    let marked = Instant::now();
    load.wait_settled(marked).await;
    let a1_frozen = dial_reqs(&a1).await;

    // Its replacement comes up.
    let mut a3 = node_agent(&env, &server, "agent-3", LONG_DRAIN).await;
    server.wait_agent_streams(3).await;
    load.wait_succeeded_since(marked, 50, "while agent 1 drains")
        .await;

    // Agent 2 drains: new dials go to agent 3 only.
    let t2 = Instant::now();
    signal(a2.proc.pid(), libc::SIGTERM);
    server.wait_agent_draining("agent-2").await;
    let marked = Instant::now();
    load.wait_settled(marked).await;
    let a2_frozen = dial_reqs(&a2).await;
    let a3_before = dial_reqs(&a3).await;
    // Every request started from here on dials after that reading.
    let counted_from = Instant::now();
    load.wait_succeeded_since(counted_from, 50, "while agents 1 and 2 drain")
        .await;
    let (a1_now, a2_now, a3_now) = (
        dial_reqs(&a1).await,
        dial_reqs(&a2).await,
        dial_reqs(&a3).await,
    );
    println!(
        "DIAL_REQs: agent-1 {a1_now} (frozen at {a1_frozen}), agent-2 {a2_now} (frozen at {a2_frozen}), agent-3 {a3_now} (+{} since agent 2 drains)",
        a3_now - a3_before
    );
    assert_eq!(
        (a1_now, a2_now),
        (a1_frozen, a2_frozen),
        "a draining agent got new dials while a non-draining one served the node"
    );
    assert!(
        a3_now - a3_before >= 50,
        "agent 3 got {} dials of the 50+ requests since its reading",
        a3_now - a3_before
    );

    // The long-lived connections, open on agents 1 and 2 throughout, finish intact.
    for (i, long) in longs.into_iter().enumerate() {
        let bytes = long
            .finish()
            .await
            .unwrap_or_else(|e| panic!("long-lived connection {i}: {e:#}"));
        println!("long-lived connection {i}: {bytes} bytes echoed and verified");
    }

    // Agent 2 leaves at its drain timeout, not before, with status 0.
    let (exit, took) = a2
        .proc
        .wait_exit(t2, ROLLOUT_DRAIN + SLACK, "agent 2 after SIGTERM")
        .await;
    assert!(
        took >= ROLLOUT_DRAIN - Duration::from_millis(50) && exit.code() == Some(0),
        "agent 2 exited {took:?} after SIGTERM ({exit}); its drain timeout is {ROLLOUT_DRAIN:?}"
    );
    // The rollout is done: a second signal ends agent 1's drain at once.
    a1.proc.assert_running();
    signal(a1.proc.pid(), libc::SIGTERM);
    let (exit, second) = a1
        .proc
        .wait_exit(
            Instant::now(),
            Duration::from_secs(1),
            "agent 1 after a second SIGTERM",
        )
        .await;
    assert_eq!(exit.code(), Some(0), "agent 1: {exit}");
    println!(
        "agent 2 exited {took:?} after SIGTERM (its drain timeout); agent 1 {second:?} after its second signal ({:?} after the first)",
        t1.elapsed()
    );
    let done = Instant::now();
    server.wait_agent_streams(1).await;
    load.wait_succeeded_since(done, 50, "after the rollout")
        .await;
    a3.proc.assert_running();

    let samples = load.stop().await;
    let end = Instant::now();
    report(
        &format!("rolling update, {name} frontend"),
        &samples,
        &[
            ("before", load_start(&samples), t1),
            ("during", t1, done),
            ("after", done, end),
        ],
    );
}

fn load_start(samples: &[Sample]) -> Instant {
    samples
        .iter()
        .map(|s| s.start)
        .min()
        .expect("at least one request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_update_of_a_nodes_agents_loses_no_request_and_no_byte() {
    let _serial = SERIAL.lock().await;
    rolling_update(Mode::HttpConnect).await;
    rolling_update(Mode::Grpc).await;
}

// ---------------------------------------------------------------------------------------------
// 2. the only agent drains

async fn single_agent_drain(mode: Mode) {
    let name = mode_name(mode);
    let env = Env::new(&format!("r_single_{name}"));
    let mut server = env.server(server_opts(mode)).await;
    let backend = backends::http().await;
    let mut agent = node_agent(&env, &server, "agent-1", SINGLE_DRAIN).await;
    server.wait_ready().await;
    let load = Load::start(Front::of(&server, mode), backend.target());
    load.wait_succeeded_since(load.started, 50, "before the drain")
        .await;

    let termed = Instant::now();
    signal(agent.proc.pid(), libc::SIGTERM);
    server.wait_agent_draining("agent-1").await;
    let marked = Instant::now();
    let dials_at_mark = dial_reqs(&agent).await;
    // Every request started from here on dials after that reading.
    let counted_from = Instant::now();
    // Still ready on both sides: the agent serves, the server routes to it.
    let verbose = http::get(agent.health_addr, "/readyz?verbose")
        .await
        .expect("agent /readyz?verbose");
    assert!(
        verbose.status == 200 && verbose.body.contains("[+]draining ok ("),
        "draining agent /readyz?verbose: {} {:?}",
        verbose.status,
        verbose.body
    );
    assert_eq!(status(server.health_addr, "/readyz").await, Ok(200));

    // Requests run until shortly before the drain timeout, then the agent must still be there.
    tokio::time::sleep_until((termed + SINGLE_DRAIN - Duration::from_millis(500)).into()).await;
    agent.proc.assert_running();
    let samples = load.stop().await;
    let stopped = Instant::now();
    let after_mark = samples.iter().filter(|s| s.start >= marked).count();
    let counted = samples.iter().filter(|s| s.start >= counted_from).count() as u64;
    let new_dials = dial_reqs(&agent).await - dials_at_mark;
    println!("{after_mark} requests started after the server marked the agent draining; it got {new_dials} DIAL_REQs since");
    assert!(
        after_mark >= 50 && new_dials >= counted,
        "the draining agent must take the new dials: {after_mark} requests after the mark, \
         {counted} after the DIAL_REQ reading, {new_dials} DIAL_REQs since"
    );
    report(
        &format!("single agent drain, {name} frontend"),
        &samples,
        &[
            ("before", load_start(&samples), termed),
            ("during", termed, stopped),
        ],
    );

    let (exit, took) = agent
        .proc
        .wait_exit(termed, SINGLE_DRAIN + SLACK, "the agent after SIGTERM")
        .await;
    assert!(
        took >= SINGLE_DRAIN - Duration::from_millis(50) && exit.code() == Some(0),
        "the agent exited {took:?} after SIGTERM ({exit}); its drain timeout is {SINGLE_DRAIN:?}"
    );
    println!("the agent exited {took:?} after SIGTERM");
    server.wait_agent_streams(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_only_agent_keeps_serving_new_dials_until_its_drain_timeout() {
    let _serial = SERIAL.lock().await;
    single_agent_drain(Mode::HttpConnect).await;
    single_agent_drain(Mode::Grpc).await;
}
