//! The agent honours DIAL_CLS (upstream's agent ignores it): a dial that hangs (SYNs dropped by
//! nftables inside a private network namespace) and is cancelled by the frontend leaves no
//! pending state on the server or the agent, the kernel's connecting socket goes away, no
//! DIAL_RSP is ever sent for it, and the agent keeps serving dials. A control without DIAL_CLS
//! shows the same dial stays pending until the agent's dial timeout.
//!
//! Everything (server, agent, destinations, test client) lives in a network namespace the test
//! creates; the gRPC frontend is a Unix socket in the test's scratch directory.

use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use spoke_proto::packet::Payload;
use spoke_proto::{CloseDial, Packet, PacketType};
use spoke_tests::backends;
use spoke_tests::cluster::{
    gauge, wait_tables_empty, Agent, Env, Mode, Server, ServerOpts, Transport,
};
use spoke_tests::grpc::{self, PacketStream};
use spoke_tests::metrics::{names, Metrics};
use spoke_tests::netns::{require_root, NetNs};
use spoke_tests::wait::{holds_for, poll_until};

/// Port inside the namespace whose SYNs are dropped: a dial to it hangs.
const FILTERED_PORT: u16 = 9;
/// The agent's `--dial-timeout`.
const DIAL_TIMEOUT: Duration = Duration::from_secs(4);
/// How soon after DIAL_CLS the pending state must be gone ("well before the dial timeout").
const CANCEL_DRAIN: Duration = Duration::from_millis(1500);

/// Agent: dials to local endpoints in progress.
const AGENT_PENDING: &str = "spoke_agent_pending_dials";
/// Agent/server: packets by segment and type.
const AGENT_PACKETS: &str = "konnectivity_network_proxy_agent_stream_packets_total";

fn filtered_target() -> String {
    format!("127.0.0.1:{FILTERED_PORT}")
}

/// `DIAL_CLS` for `random`.
fn dial_close(random: i64) -> Packet {
    Packet {
        r#type: PacketType::DialCls as i32,
        payload: Some(Payload::CloseDial(CloseDial { random })),
    }
}

/// Creates a namespace whose loopback drops SYNs to [`FILTERED_PORT`] and runs `test` on a
/// single-threaded runtime on a thread inside it (children inherit the namespace).
fn in_filtered_netns<F, Fut>(test: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let ns = NetNs::create("filtered").expect("create network namespace");
    ns.drop_syns_to(FILTERED_PORT)
        .expect("nft rule dropping SYNs");
    ns.block_on(test);
}

/// A server (gRPC over UDS) and one agent with `--dial-timeout` [`DIAL_TIMEOUT`] and debug logs.
async fn cluster(env: &Env) -> (Server, Agent) {
    let timeout = format!("--dial-timeout={}s", DIAL_TIMEOUT.as_secs());
    env.pair(ServerOpts::new(Mode::Grpc, Transport::Uds), |a| {
        a.arg(&timeout).arg("--v=5")
    })
    .await
}

/// Connecting (SYN_SENT) IPv4 sockets to the filtered destination in the calling thread's
/// network namespace.
fn syn_sent_to_filtered() -> Result<usize, String> {
    // /proc/thread-self: this thread's namespace (it entered one; the process did not).
    let table = std::fs::read_to_string("/proc/thread-self/net/tcp")
        .map_err(|e| format!("read /proc/thread-self/net/tcp: {e}"))?;
    let remote = format!("0100007F:{FILTERED_PORT:04X}");
    Ok(table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(2) == Some(&remote.as_str()) && f.get(3) == Some(&"02")
        })
        .count())
}

/// The pending-dial figures of both sides and the kernel.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Pending {
    server: f64,
    agent: f64,
    syn_sent: usize,
}

async fn pending(server: &Server, agent: &Agent) -> Result<Pending, String> {
    let sm = server.metrics().await.map_err(|e| format!("{e:#}"))?;
    let am = agent.metrics().await.map_err(|e| format!("{e:#}"))?;
    Ok(Pending {
        server: gauge(&sm, names::SERVER_PENDING)?,
        agent: gauge(&am, AGENT_PENDING)?,
        syn_sent: syn_sent_to_filtered()?,
    })
}

/// Polls until the figures are `want`; panics after `timeout` with the last observation.
async fn wait_pending(
    server: &Server,
    agent: &Agent,
    want: Pending,
    what: &str,
    timeout: Duration,
) {
    poll_until(&format!("{what} (want {want:?})"), timeout, || async {
        match pending(server, agent).await? {
            p if p == want => Ok(()),
            p => Err(format!("{p:?}")),
        }
    })
    .await
}

const ONE: Pending = Pending {
    server: 1.0,
    agent: 1.0,
    syn_sent: 1,
};
const NONE: Pending = Pending {
    server: 0.0,
    agent: 0.0,
    syn_sent: 0,
};

async fn agent_metrics(agent: &Agent) -> Metrics {
    agent.metrics().await.expect("agent metrics")
}

/// DIAL_RSP packets the agent has sent.
fn agent_dial_rsps_sent(m: &Metrics) -> f64 {
    m.counter(
        AGENT_PACKETS,
        &[("segment", "from_agent"), ("packet_type", "DIAL_RSP")],
    )
}

fn agent_timeouts(m: &Metrics) -> f64 {
    m.counter(names::AGENT_DIAL_FAILURES, &[("reason", "timeout")])
}

/// [`cluster`], then waits for nothing to be pending anywhere.
async fn idle_cluster(env: &Env) -> (Server, Agent) {
    let (server, agent) = cluster(env).await;
    wait_pending(
        &server,
        &agent,
        NONE,
        "an idle start",
        Duration::from_secs(5),
    )
    .await;
    (server, agent)
}

/// Opens a frontend Proxy stream on `uds` dialling the filtered destination with `random`, and
/// waits (up to half the dial timeout) until that dial is pending on server, agent and kernel.
/// Returns the stream and when it was opened.
async fn open_filtered_dial(
    server: &Server,
    agent: &Agent,
    uds: &Path,
    random: i64,
    what: &str,
) -> (PacketStream, Instant) {
    let channel = grpc::uds_channel(uds).await.expect("frontend channel");
    let sent = Instant::now();
    let stream = PacketStream::proxy(
        channel,
        vec![grpc::dial_request(&filtered_target(), random)],
    )
    .await
    .expect("Proxy stream");
    wait_pending(server, agent, ONE, what, DIAL_TIMEOUT / 2).await;
    (stream, sent)
}

/// [`open_filtered_dial`] with a fresh random ID; returns the ID too.
async fn pending_filtered_dial(
    server: &Server,
    agent: &Agent,
    uds: &Path,
) -> (i64, PacketStream, Instant) {
    let random = grpc::random_id();
    let (stream, sent) = open_filtered_dial(
        server,
        agent,
        uds,
        random,
        "the filtered dial to be pending on server, agent and kernel",
    )
    .await;
    (random, stream, sent)
}

/// A normal dial through the agent still works, and leaves both tables empty.
async fn normal_dial_works(server: &Server, agent: &Agent, uds: &Path, what: &str) {
    let echo = backends::echo().await;
    grpc::uds_echo_roundtrip(uds, &echo.target())
        .await
        .expect(what);
    wait_tables_empty(server, &[agent]).await;
}

/// After DIAL_CLS the frontend stream may only end; any packet (a DIAL_RSP above all) is a bug.
async fn expect_no_packet_within(stream: &mut PacketStream, window: Duration) {
    match stream.recv(window).await {
        // The server ended the cancelled stream: nothing more can come.
        Ok(None) => println!("frontend stream after DIAL_CLS: ended by the server"),
        Ok(Some(p)) => panic!(
            "packet {:?} arrived on the frontend stream after DIAL_CLS: {p:?}",
            grpc::kind(&p)
        ),
        // A timeout ("no packet within") or an error status: no packet either way.
        Err(e) => println!("frontend stream after DIAL_CLS: {e:#}"),
    }
}

#[test]
fn dial_cls_cancels_a_hanging_dial_on_server_and_agent_in_netns() {
    if !require_root(
        "dial_cls_cancels_a_hanging_dial_on_server_and_agent_in_netns",
        "root (network namespaces, nftables)",
        &[],
    ) {
        return;
    }
    in_filtered_netns(|| async {
        let env = Env::new("dial_cls");
        let (server, mut agent) = idle_cluster(&env).await;
        let before = agent_metrics(&agent).await;
        let rsps_before = agent_dial_rsps_sent(&before);
        let uds = server.uds_path();

        // 1. Explicit DIAL_CLS from the frontend before the agent's dial timeout.
        let (random, mut stream, sent) = pending_filtered_dial(&server, &agent, &uds).await;
        let cls_at = Instant::now();
        stream
            .send(dial_close(random))
            .await
            .expect("send DIAL_CLS");
        wait_pending(
            &server,
            &agent,
            NONE,
            "DIAL_CLS to drain the server's and agent's pending dial and the SYN_SENT socket",
            CANCEL_DRAIN,
        )
        .await;
        let drained = cls_at.elapsed();
        println!(
            "DIAL_CLS drained everything {drained:?} after it was sent ({:?} after DIAL_REQ; dial timeout {DIAL_TIMEOUT:?})",
            sent.elapsed()
        );
        assert!(
            sent.elapsed() < DIAL_TIMEOUT / 2,
            "the cancel must finish well before the {DIAL_TIMEOUT:?} dial timeout, took {:?}",
            sent.elapsed()
        );
        let m = agent_metrics(&agent).await;
        assert!(
            m.counter(
                AGENT_PACKETS,
                &[("segment", "to_agent"), ("packet_type", "DIAL_CLS")]
            ) >= 1.0,
            "the agent never received the DIAL_CLS; present: {:?}",
            m.names()
        );
        let sm = server.metrics().await.expect("server metrics");
        assert!(
            sm.counter(names::SERVER_DIAL_FAILURES, &[("reason", "frontend_close")]) >= 1.0,
            "server did not count the cancelled dial as frontend_close; present: {:?}",
            sm.names()
        );

        // Nothing comes back for it, not even once the dial timeout has long passed: an agent that
        // ignored DIAL_CLS would time the dial out and send DIAL_RSP then.
        let past_timeout = sent + DIAL_TIMEOUT + Duration::from_secs(1);
        holds_for(
            "no pending dial, no agent timeout and no DIAL_RSP from the agent",
            past_timeout.saturating_duration_since(Instant::now()),
            || async {
                let p = pending(&server, &agent).await?;
                let m = agent.metrics().await.map_err(|e| format!("{e:#}"))?;
                let (rsps, timeouts) = (agent_dial_rsps_sent(&m), agent_timeouts(&m));
                if p != NONE {
                    Err(format!("pending came back: {p:?}"))
                } else if rsps != rsps_before {
                    Err(format!("agent sent a DIAL_RSP for the cancelled dial ({rsps_before} -> {rsps})"))
                } else if timeouts != 0.0 {
                    Err(format!("agent timed the cancelled dial out ({timeouts} timeouts): it kept dialling"))
                } else {
                    Ok(())
                }
            },
        )
        .await;
        // Anything sent on the frontend stream meanwhile is buffered there: read it now.
        expect_no_packet_within(&mut stream, Duration::from_millis(300)).await;
        let log = agent.proc.log();
        assert!(
            log.lines()
                .any(|l| l.contains("dial cancelled by server") && l.contains(&random.to_string())),
            "agent log does not show the cancel of random {random}"
        );
        agent.proc.assert_running();

        // 2. The frontend goes away mid-dial: the server cancels toward the agent itself.
        let (gone, _) = open_filtered_dial(
            &server,
            &agent,
            &uds,
            grpc::random_id(),
            "the second filtered dial to be pending",
        )
        .await;
        drop(gone);
        wait_pending(
            &server,
            &agent,
            NONE,
            "a vanished frontend to drain the pending dial everywhere",
            CANCEL_DRAIN,
        )
        .await;

        // 3. The same agent still dials normally.
        normal_dial_works(
            &server,
            &agent,
            &uds,
            "a normal dial through the same agent after the cancels",
        )
        .await;
        let m = agent_metrics(&agent).await;
        assert_eq!(
            agent_timeouts(&m),
            0.0,
            "no dial in this test may have reached the dial timeout"
        );
        assert_eq!(
            agent_dial_rsps_sent(&m),
            rsps_before + 1.0,
            "exactly one DIAL_RSP (the echo dial's) expected from the agent"
        );
    });
}

#[test]
fn without_dial_cls_a_hanging_dial_stays_pending_until_the_dial_timeout_in_netns() {
    if !require_root(
        "without_dial_cls_a_hanging_dial_stays_pending_until_the_dial_timeout_in_netns",
        "root (network namespaces, nftables)",
        &[],
    ) {
        return;
    }
    in_filtered_netns(|| async {
        let env = Env::new("no_dial_cls");
        let (server, agent) = idle_cluster(&env).await;
        let uds = server.uds_path();

        let (random, mut stream, sent) = pending_filtered_dial(&server, &agent, &uds).await;
        // Still pending just short of the timeout (the same window the cancel test drains in).
        let hold = (sent + DIAL_TIMEOUT - Duration::from_millis(500))
            .saturating_duration_since(Instant::now());
        holds_for(
            "the dial to stay pending without DIAL_CLS",
            hold,
            || async {
                let p = pending(&server, &agent).await?;
                if p == ONE {
                    Ok(())
                } else {
                    Err(format!("{p:?}, want {ONE:?}"))
                }
            },
        )
        .await;

        let rsp = stream.await_dial_response().await.expect("DIAL_RSP");
        let took = sent.elapsed();
        println!("DIAL_RSP after {took:?}: {rsp:?}");
        assert_eq!(rsp.random, random, "DIAL_RSP for another dial");
        assert_eq!(
            rsp.connect_id, 0,
            "a timed-out dial must not carry a connectID"
        );
        assert!(
            rsp.error.contains("i/o timeout"),
            "DIAL_RSP error must be the agent's dial timeout: {rsp:?}"
        );
        assert!(
            took >= DIAL_TIMEOUT - Duration::from_millis(100) && took < DIAL_TIMEOUT + Duration::from_secs(3),
            "the timeout answer must come after the {DIAL_TIMEOUT:?} dial timeout, came after {took:?}"
        );
        wait_pending(
            &server,
            &agent,
            NONE,
            "the timed-out dial to leave every table",
            Duration::from_secs(5),
        )
        .await;
        let m = agent_metrics(&agent).await;
        assert!(
            agent_timeouts(&m) >= 1.0,
            "endpoint_dial_failure_total{{reason=timeout}} not counted; present: {:?}",
            m.names()
        );
        // The agent still works after a timed-out dial too.
        normal_dial_works(
            &server,
            &agent,
            &uds,
            "a normal dial after the timed-out one",
        )
        .await;
    });
}
