//! `--proxy-strategies` end to end: which agent a dial goes to under `destHost`, `default` and
//! `defaultRoute` (alone and chained), what a dial nobody can take gets back, the server's
//! readiness (first strategy's store) and the `ready_backends{proxy_strategy}` gauge.
//!
//! Destinations are told apart by their loopback address (every 127.0.0.0/8 address is loopback on
//! Linux): echo servers listen on 127.0.0.1, 127.0.0.2 and 127.0.0.3 and agents claim some of those
//! addresses through `--agent-identifiers`. Which agent served a dial is read from each agent's
//! `stream_packets_total{segment="to_agent",packet_type="DIAL_REQ"}` counter.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use spoke_tests::backends;
use spoke_tests::cluster::{
    gauge, status, wait_status, wait_tables_empty, Agent, AgentOpts, Env, Mode, Server, ServerOpts,
    Transport,
};
use spoke_tests::connect::{self, Reply};
use spoke_tests::grpc;
use spoke_tests::http;
use spoke_tests::metrics::{names, Metrics};
use spoke_tests::wait::{holds_for, poll_until};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

/// Per-strategy gauge (upstream name; label `proxy_strategy`).
const READY_BACKENDS: &str = "konnectivity_network_proxy_server_ready_backends";
/// HTTP CONNECT body when no strategy finds an agent (upstream: `"currently no tunnels
/// available: %v"` with `ErrNotFound`'s "No agent available").
const NO_AGENT_BODY: &str = "currently no tunnels available: No agent available";
/// gRPC `DIAL_RSP.error` when no strategy finds an agent.
const NO_AGENT_ERROR: &str = "No agent available";
/// `/readyz` body while the first strategy has no agent.
const NOT_READY_BODY: &str = "no connection to any proxy agent";

const WAIT: Duration = Duration::from_secs(20);

const LO1: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const LO2: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const LO3: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);

// ---------------------------------------------------------------------------------------------
// harness

/// An echo server on a chosen loopback address; aborted on drop.
struct Echo {
    addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Echo {
    async fn on(ip: Ipv4Addr) -> Self {
        let listener = TcpListener::bind((ip, 0))
            .await
            .unwrap_or_else(|e| panic!("bind an echo server on {ip}: {e}"));
        let addr = listener.local_addr().expect("echo addr");
        let accepted = Arc::new(AtomicU64::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    a = listener.accept() => {
                        let Ok((mut sock, _)) = a else { continue };
                        count.fetch_add(1, Ordering::SeqCst);
                        conns.spawn(async move {
                            let (mut r, mut w) = sock.split();
                            let _ = tokio::io::copy(&mut r, &mut w).await;
                        });
                    }
                    Some(_) = conns.join_next() => {}
                }
            }
        });
        Self {
            addr,
            accepted,
            task,
        }
    }

    fn target(&self) -> String {
        self.addr.to_string()
    }

    fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// A 127.0.0.x port that refuses connections (bound, never listening) while the guard lives.
fn refusing_port_on(ip: Ipv4Addr) -> (tokio::net::TcpSocket, SocketAddr) {
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind(SocketAddr::from((ip, 0))).expect("bind");
    let addr = sock.local_addr().expect("local addr");
    (sock, addr)
}

fn server_opts(strategies: &str) -> ServerOpts {
    ServerOpts::new(Mode::HttpConnect, Transport::Uds)
        .arg(&format!("--proxy-strategies={strategies}"))
}

/// An agent with `--agent-identifiers=identifiers` whose tunnel is up.
async fn agent(env: &Env, server: &Server, id: &str, identifiers: &str) -> Agent {
    let mut a = env
        .agent(
            AgentOpts::new(server.agent_addr)
                .id(id)
                .arg(&format!("--agent-identifiers={identifiers}")),
        )
        .await;
    a.wait_ready().await;
    a
}

async fn server_metrics(server: &Server) -> Result<Metrics, String> {
    server.metrics().await.map_err(|e| format!("{e:#}"))
}

/// `ready_backends{proxy_strategy=s}` for each of `strategies`; `None` where the series is absent.
fn ready_backends(m: &Metrics, strategies: &[&str]) -> Vec<Option<f64>> {
    strategies
        .iter()
        .map(|s| m.get_labeled(READY_BACKENDS, &[("proxy_strategy", s)]))
        .collect()
}

/// Waits until `ready_backends` for `strategies` reads `want` and `ready_backend_connections`
/// reads `streams`.
async fn wait_gauges(server: &Server, strategies: &[&str], want: &[f64], streams: usize) {
    let want: Vec<Option<f64>> = want.iter().copied().map(Some).collect();
    poll_until(
        &format!(
            "ready_backends{strategies:?} == {want:?}, ready_backend_connections == {streams}"
        ),
        WAIT,
        || async {
            let m = server_metrics(server).await?;
            let got = ready_backends(&m, strategies);
            let conns = gauge(&m, names::SERVER_READY_BACKENDS)?;
            if got == want && conns == streams as f64 {
                Ok(())
            } else {
                Err(format!(
                    "ready_backends{strategies:?} = {got:?}, ready_backend_connections = {conns}"
                ))
            }
        },
    )
    .await;
}

/// DIAL_REQs each agent has received so far.
async fn dial_reqs(agents: &[&Agent]) -> Vec<u64> {
    let mut out = Vec::new();
    for a in agents {
        let m = a.metrics().await.expect("agent metrics");
        let v = m.counter(
            names::AGENT_PACKETS,
            &[("segment", "to_agent"), ("packet_type", "DIAL_REQ")],
        );
        out.push(v as u64);
    }
    out
}

/// Runs `n` echo round trips to `target` through `server` (each must succeed) and returns how
/// many DIAL_REQs each of `agents` received meanwhile. The counts must add up to `n`: every dial
/// reached exactly one of them.
async fn dials(server: &Server, agents: &[&Agent], target: &str, n: u64) -> Vec<u64> {
    let before = dial_reqs(agents).await;
    for i in 1..=n {
        connect::echo_roundtrip(&server.frontend, target)
            .await
            .unwrap_or_else(|e| panic!("dial {i}/{n} to {target}: {e:#}"));
    }
    // An agent counts a DIAL_REQ as it reads it, before it answers, so after `n` answered dials
    // the counters are final; polling only absorbs a scrape that lags.
    let delta = poll_until(
        &format!("{n} DIAL_REQs for {target} to be counted by the agents"),
        Duration::from_secs(10),
        || {
            let before = before.clone();
            async move {
                let now = dial_reqs(agents).await;
                let delta: Vec<u64> = now.iter().zip(&before).map(|(a, b)| a - b).collect();
                if delta.iter().sum::<u64>() >= n {
                    Ok(delta)
                } else {
                    Err(format!("DIAL_REQ received since the dials: {delta:?}"))
                }
            }
        },
    )
    .await;
    assert_eq!(
        delta.iter().sum::<u64>(),
        n,
        "{n} dials to {target} produced DIAL_REQs {delta:?} at the agents"
    );
    delta
}

fn no_agent_failures(m: &Metrics) -> f64 {
    m.counter(names::SERVER_DIAL_FAILURES, &[("reason", "no_agent")])
}

/// CONNECTs to `target`, requires upstream's "no agent" answer (500, fixed body, closed) and that
/// no agent was asked and `no_agent` failures went up by one.
async fn assert_refused(server: &Server, agents: &[&Agent], target: &str) -> Reply {
    let before = dial_reqs(agents).await;
    let failures = no_agent_failures(&server_metrics(server).await.unwrap());
    let (reply, _io) = connect::connect(&server.frontend, target)
        .await
        .unwrap_or_else(|e| panic!("CONNECT {target}: {e:#}"));
    assert_eq!(
        reply.status, 500,
        "CONNECT {target} with no agent: {reply:?}"
    );
    assert!(
        reply.head.starts_with("HTTP/1.1 500 Internal Server Error"),
        "status line for CONNECT {target}: {:?}",
        reply.head
    );
    assert_eq!(
        reply.body, NO_AGENT_BODY,
        "body for CONNECT {target} with no agent"
    );
    assert_eq!(
        dial_reqs(agents).await,
        before,
        "a refused dial to {target} must not reach any agent"
    );
    let after = no_agent_failures(&server_metrics(server).await.unwrap());
    assert_eq!(
        after,
        failures + 1.0,
        "dial_failure_count{{reason=\"no_agent\"}} after refusing {target}"
    );
    reply
}

async fn assert_ready(server: &mut Server) {
    wait_status(&mut server.proc, server.health_addr, "/readyz", 200, WAIT).await;
}

/// /readyz is 500 with upstream's body, and stays so for a second.
async fn assert_not_ready(server: &Server) {
    let r = http::get(server.health_addr, "/readyz").await.unwrap();
    assert_eq!(
        (r.status, r.body.trim()),
        (500, NOT_READY_BODY),
        "/readyz while the first strategy has no agent"
    );
    holds_for("/readyz == 500", Duration::from_secs(1), || async {
        match status(server.health_addr, "/readyz").await {
            Ok(500) => Ok(()),
            other => Err(format!("/readyz answered {other:?}")),
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// destHost,default

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dest_host_then_default_routes_claimed_addresses_to_their_agent() {
    let env = Env::new("strat_dh_default");
    let mut server = env.server(server_opts("destHost,default")).await;
    let a = agent(&env, &server, "agent-a", "ipv4=127.0.0.2&host=localhost").await;
    let b = agent(&env, &server, "agent-b", "ipv4=127.0.0.3").await;
    server.wait_agent_streams_within(2, WAIT).await;
    assert_ready(&mut server).await;
    let (echo1, echo2, echo3) = (
        Echo::on(LO1).await,
        Echo::on(LO2).await,
        Echo::on(LO3).await,
    );
    let both = [&a, &b];

    // B claims 127.0.0.3: every dial there goes to B although A is connected too.
    assert_eq!(
        dials(&server, &both, &echo3.target(), 10).await,
        [0, 10],
        "dials to 127.0.0.3 (B's ipv4) by agent [A, B]"
    );
    assert_eq!(echo3.accepted(), 10, "connections at the 127.0.0.3 echo");
    // And A's address goes to A.
    assert_eq!(
        dials(&server, &both, &echo2.target(), 10).await,
        [10, 0],
        "dials to 127.0.0.2 (A's ipv4) by agent [A, B]"
    );
    assert_eq!(echo2.accepted(), 10, "connections at the 127.0.0.2 echo");
    // A `host` identifier is matched against the dial's host name (port removed).
    let by_name = format!("localhost:{}", echo1.addr.port());
    assert_eq!(
        dials(&server, &both, &by_name, 5).await,
        [5, 0],
        "dials to {by_name} (A's host) by agent [A, B]"
    );
    assert_eq!(echo1.accepted(), 5, "connections at the 127.0.0.1 echo");

    // destHost matches the host only: a port nothing listens on at B's address still goes to B,
    // and B's dial error comes back (502); it does not fall through to `default`.
    let (_guard, closed) = refusing_port_on(LO3);
    let before = dial_reqs(&both).await;
    let (reply, _) = connect::connect(&server.frontend, &closed.to_string())
        .await
        .unwrap();
    assert_eq!(
        reply.status, 502,
        "CONNECT to a refused port at B: {reply:?}"
    );
    assert!(
        reply.body.contains("connection refused"),
        "body names the agent's dial error: {reply:?}"
    );
    let after = dial_reqs(&both).await;
    assert_eq!(
        [after[0] - before[0], after[1] - before[1]],
        [0, 1],
        "the refused dial to {closed} by agent [A, B]"
    );

    // 127.0.0.1 is claimed by nobody: destHost misses, `default` picks a random agent and the
    // dial works. 30 dials: both agents get some (all on one: p = 2^-29).
    let before = echo1.accepted();
    let spread = dials(&server, &both, &echo1.target(), 30).await;
    assert!(
        spread.iter().all(|&n| n > 0),
        "`default` fallback must pick among all agents; DIAL_REQs by agent [A, B]: {spread:?}"
    );
    assert_eq!(echo1.accepted() - before, 30, "fallback dials at the echo");
    wait_tables_empty(&server, &both).await;
}

// ---------------------------------------------------------------------------------------------
// destHost alone

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dest_host_alone_refuses_addresses_no_agent_claims() {
    let env = Env::new("strat_dh_alone");
    let mut server = env.server(server_opts("destHost")).await;
    // Only the configured strategy has a series, exported as 0 before any agent.
    let m = server_metrics(&server).await.unwrap();
    assert_eq!(
        ready_backends(&m, &["destHost", "default", "defaultRoute"]),
        [Some(0.0), None, None],
        "ready_backends{{destHost, default, defaultRoute}} with --proxy-strategies=destHost"
    );

    // An agent without identifiers is connected but no use to destHost: not ready, refused.
    let plain = agent(&env, &server, "agent-plain", "").await;
    wait_gauges(&server, &["destHost"], &[0.0], 1).await;
    assert_not_ready(&server).await;
    let echo1 = Echo::on(LO1).await;
    assert_refused(&server, &[&plain], &echo1.target()).await;
    assert_eq!(echo1.accepted(), 0, "a refused dial reaches no destination");

    // B claims 127.0.0.3: ready; dials there work, dials elsewhere are still refused.
    let b = agent(&env, &server, "agent-b", "ipv4=127.0.0.3").await;
    wait_gauges(&server, &["destHost"], &[1.0], 2).await;
    assert_ready(&mut server).await;
    let echo3 = Echo::on(LO3).await;
    let both = [&plain, &b];
    assert_eq!(
        dials(&server, &both, &echo3.target(), 10).await,
        [0, 10],
        "dials to 127.0.0.3 by agent [plain, B]"
    );
    assert_refused(&server, &both, &echo1.target()).await;
    assert_refused(&server, &both, &format!("localhost:{}", echo1.addr.port())).await;
    assert_eq!(echo1.accepted(), 0, "refused dials reach no destination");
    wait_tables_empty(&server, &both).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dest_host_alone_refuses_unclaimed_addresses_over_grpc() {
    let env = Env::new("strat_dh_grpc");
    let server = env
        .server(ServerOpts::new(Mode::Grpc, Transport::Uds).arg("--proxy-strategies=destHost"))
        .await;
    let b = agent(&env, &server, "agent-b", "ipv4=127.0.0.3").await;
    wait_gauges(&server, &["destHost"], &[1.0], 1).await;
    let (echo1, echo3) = (Echo::on(LO1).await, Echo::on(LO3).await);

    grpc::uds_echo_roundtrip(&server.uds_path(), &echo3.target())
        .await
        .expect("gRPC dial to B's address");
    assert_eq!(echo3.accepted(), 1, "connections at the 127.0.0.3 echo");

    let before = dial_reqs(&[&b]).await;
    let random = grpc::random_id();
    let channel = grpc::uds_channel(&server.uds_path()).await.unwrap();
    let (_stream, rsp) = grpc::dial(channel, &echo1.target(), random)
        .await
        .expect("DIAL_RSP for an unclaimed address");
    assert_eq!(
        (rsp.error.as_str(), rsp.random, rsp.connect_id),
        (NO_AGENT_ERROR, random, 0),
        "DIAL_RSP for an address no agent claims: {rsp:?}"
    );
    assert_eq!(dial_reqs(&[&b]).await, before, "B must not be asked");
    assert_eq!(echo1.accepted(), 0, "a refused dial reaches no destination");
    let m = server_metrics(&server).await.unwrap();
    assert_eq!(no_agent_failures(&m), 1.0, "dial_failure_count{{no_agent}}");
    wait_tables_empty(&server, &[&b]).await;
}

// ---------------------------------------------------------------------------------------------
// defaultRoute

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_route_sends_dials_only_to_agents_advertising_it() {
    let env = Env::new("strat_droute");
    let mut server = env.server(server_opts("defaultRoute")).await;
    // N claims 127.0.0.2 and localhost but not the default route.
    let n = agent(
        &env,
        &server,
        "agent-n",
        "ipv4=127.0.0.2&host=localhost&default-route=false",
    )
    .await;
    wait_gauges(&server, &["defaultRoute"], &[0.0], 1).await;
    assert_not_ready(&server).await;
    let (echo1, echo2) = (Echo::on(LO1).await, Echo::on(LO2).await);
    assert_refused(&server, &[&n], &echo1.target()).await;
    // defaultRoute does not look at ipv4/host identifiers.
    assert_refused(&server, &[&n], &echo2.target()).await;
    assert_eq!(
        echo1.accepted() + echo2.accepted(),
        0,
        "refused dials reach no destination"
    );

    let mut r1 = agent(&env, &server, "agent-r1", "default-route=true").await;
    let mut r2 = agent(
        &env,
        &server,
        "agent-r2",
        "ipv4=127.0.0.3&default-route=true",
    )
    .await;
    wait_gauges(&server, &["defaultRoute"], &[2.0], 3).await;
    assert_ready(&mut server).await;
    // Even N's own address goes to a default-route agent; both of them get some (p = 2^-29).
    let all = [&n, &r1, &r2];
    let spread = dials(&server, &all, &echo2.target(), 30).await;
    assert_eq!(
        spread[0], 0,
        "N must get no dial; by agent [N, R1, R2]: {spread:?}"
    );
    assert!(
        spread[1] > 0 && spread[2] > 0,
        "dials are spread over the default-route agents; by agent [N, R1, R2]: {spread:?}"
    );
    assert_eq!(echo2.accepted(), 30, "connections at the 127.0.0.2 echo");
    wait_tables_empty(&server, &all).await;

    // With the default-route agents gone, dials are refused again.
    r1.proc.kill();
    r2.proc.kill();
    wait_gauges(&server, &["defaultRoute"], &[0.0], 1).await;
    assert_not_ready(&server).await;
    assert_refused(&server, &[&n], &echo1.target()).await;
}

// ---------------------------------------------------------------------------------------------
// destHost,defaultRoute,default

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strategies_are_tried_in_order() {
    let env = Env::new("strat_chain");
    let mut server = env
        .server(server_opts("destHost,defaultRoute,default"))
        .await;
    let plain = agent(&env, &server, "agent-plain", "").await;
    let h = agent(&env, &server, "agent-h", "ipv4=127.0.0.2").await;
    let mut d = agent(&env, &server, "agent-d", "default-route=true").await;
    server.wait_agent_streams_within(3, WAIT).await;
    assert_ready(&mut server).await;
    let (echo1, echo2) = (Echo::on(LO1).await, Echo::on(LO2).await);
    let all = [&plain, &h, &d];

    // destHost first: H's address goes to H (D advertises the default route, but destHost wins).
    assert_eq!(
        dials(&server, &all, &echo2.target(), 10).await,
        [0, 10, 0],
        "dials to 127.0.0.2 by agent [plain, H, D]"
    );
    // Unclaimed: destHost misses, defaultRoute takes it — only D, never `default`'s pick.
    assert_eq!(
        dials(&server, &all, &echo1.target(), 10).await,
        [0, 0, 10],
        "dials to 127.0.0.1 by agent [plain, H, D]"
    );
    wait_tables_empty(&server, &all).await;

    // Without a default-route agent, `default` is reached: any agent (H included).
    d.proc.kill();
    server.wait_agent_streams_within(2, WAIT).await;
    let rest = [&plain, &h];
    let spread = dials(&server, &rest, &echo1.target(), 30).await;
    assert!(
        spread.iter().all(|&n| n > 0),
        "`default` picks among all agents; by agent [plain, H]: {spread:?}"
    );
    assert_eq!(echo1.accepted(), 40, "connections at the 127.0.0.1 echo");
    wait_tables_empty(&server, &rest).await;
}

// ---------------------------------------------------------------------------------------------
// ready_backends{proxy_strategy}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_backends_gauge_follows_agents_per_strategy() {
    const ALL: [&str; 3] = ["default", "destHost", "defaultRoute"];
    let env = Env::new("strat_gauge");
    let server = env
        .server(server_opts("destHost,defaultRoute,default"))
        .await;
    // Every configured strategy exports 0 before the first agent (upstream sets it explicitly).
    wait_gauges(&server, &ALL, &[0.0, 0.0, 0.0], 0).await;

    // One identifier per agent, so "agents" and upstream's "distinct identifiers" agree here.
    let mut plain = agent(&env, &server, "agent-plain", "").await;
    wait_gauges(&server, &ALL, &[1.0, 0.0, 0.0], 1).await;
    let mut h = agent(&env, &server, "agent-h", "ipv4=127.0.0.2").await;
    wait_gauges(&server, &ALL, &[2.0, 1.0, 0.0], 2).await;
    let mut d = agent(&env, &server, "agent-d", "default-route=true").await;
    wait_gauges(&server, &ALL, &[3.0, 1.0, 1.0], 3).await;
    let mut hd = agent(&env, &server, "agent-hd", "host=node-hd&default-route=true").await;
    wait_gauges(&server, &ALL, &[4.0, 2.0, 2.0], 4).await;

    // Agents leaving take their share with them.
    h.proc.kill();
    wait_gauges(&server, &ALL, &[3.0, 1.0, 2.0], 3).await;
    d.proc.kill();
    wait_gauges(&server, &ALL, &[2.0, 1.0, 1.0], 2).await;
    hd.proc.kill();
    wait_gauges(&server, &ALL, &[1.0, 0.0, 0.0], 1).await;
    plain.proc.kill();
    wait_gauges(&server, &ALL, &[0.0, 0.0, 0.0], 0).await;
}

// ---------------------------------------------------------------------------------------------
// Upstream's exact readings (both differed here before; found by this file).

/// Upstream parses `default-route` with Go's `strconv.ParseBool`: `1`, `t`, `T`, `TRUE`, `true`,
/// `True` are true and anything else (e.g. `tRuE`) is false.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_route_value_is_parsed_like_go_parse_bool() {
    let env = Env::new("strat_droute_bool");
    let server = env.server(server_opts("defaultRoute")).await;
    let one = agent(&env, &server, "agent-one", "default-route=1").await;
    let odd = agent(&env, &server, "agent-odd", "default-route=tRuE").await;
    server.wait_agent_streams_within(2, WAIT).await;
    wait_gauges(&server, &["defaultRoute"], &[1.0], 2).await;
    let echo = backends::echo().await;
    assert_eq!(
        dials(&server, &[&one, &odd], &echo.target(), 5).await,
        [5, 0],
        "dials by agent [default-route=1, default-route=tRuE]"
    );
}

/// Upstream's destHost store is keyed by identifier, and `ready_backends{proxy_strategy="destHost"}`
/// is the number of keys (`len(backends)`), so an agent with `ipv4=127.0.0.2&host=node-a` counts 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_backends_dest_host_counts_identifiers_like_upstream() {
    let env = Env::new("strat_gauge_keys");
    let server = env.server(server_opts("destHost")).await;
    let _a = agent(&env, &server, "agent-a", "ipv4=127.0.0.2&host=node-a").await;
    server.wait_agent_streams_within(1, WAIT).await;
    wait_gauges(&server, &["destHost"], &[2.0], 1).await;
    // A second agent sharing one of those identifiers adds only its new ones.
    let _b = agent(&env, &server, "agent-b", "host=node-a&ipv4=127.0.0.3").await;
    wait_gauges(&server, &["destHost"], &[3.0], 2).await;
}
