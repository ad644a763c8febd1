//! Process lifecycle end to end: the agent's `--drain-timeout` running out with a connection
//! still open, the server's `--graceful-shutdown-timeout` running out with a connection that
//! never ends, the exact `/readyz` / `/ready` (and `?verbose`) answers of both health ports
//! before and after an agent connects, and certificate rotation on the server's mTLS TCP
//! frontend (`--server-cert` / `--server-key`), including a broken file.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use spoke_tests::backends;
use spoke_tests::certs::Ca;
use spoke_tests::cluster::{gauge, AgentOpts, Env, Mode, Server, ServerOpts, Transport};
use spoke_tests::connect::{self, Frontend};
use spoke_tests::faultnet::signal;
use spoke_tests::http;
use spoke_tests::metrics::names;
use spoke_tests::process::Proc;
use spoke_tests::rotation::{der, served_cert, wait_served, write_atomically};
use spoke_tests::wait::{poll_until, within};
use spoke_tests::BoxIo;
use tokio::io::AsyncReadExt;

/// Requires the far end to close `io` (EOF or an error such as a TLS stream cut without
/// close_notify) within `limit`.
async fn assert_closed(io: &mut BoxIo, limit: Duration, what: &str) {
    let mut buf = [0u8; 64];
    let n = within(what, limit, io.read(&mut buf)).await;
    assert!(
        matches!(n, Ok(0) | Err(_)),
        "{what}: the connection is still open, read {n:?} ({:?})",
        n.as_ref()
            .ok()
            .map(|n| String::from_utf8_lossy(&buf[..*n]).into_owned())
    );
}

/// `GET path`: status and body (panics if the port does not answer).
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let r = http::get(addr, path)
        .await
        .unwrap_or_else(|e| panic!("GET http://{addr}{path}: {e:#}"));
    (r.status, r.body)
}

/// Keeps `held` relaying echo round trips through the shutdown window: from now until
/// `until` after `since`, `proc` must stay up and every round trip must succeed. Returns how
/// many round trips were made.
async fn relay_until(
    held: &mut BoxIo,
    proc: &mut Proc,
    since: Instant,
    until: Duration,
    what: &str,
) -> usize {
    let mut rounds = 0;
    while since.elapsed() < until {
        proc.assert_running();
        connect::echo_once(held, format!("{what} round {rounds}").as_bytes())
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "{what}: round trip {rounds} failed {:?} after the signal: {e:#}",
                    since.elapsed()
                )
            });
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    proc.assert_running();
    rounds
}

// ---------------------------------------------------------------------------------------------
// 1. agent --drain-timeout expiry

/// One SIGTERM to an agent with `--drain-timeout=2s` and a connection that never ends: the
/// agent tells the server it drains, keeps relaying on the open connection until the timeout,
/// then exits by itself with status 0 (`signals()` returns, `run` returns `Ok`), and the server
/// closes the frontend connection that rode on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_drain_timeout_expiry_relays_until_the_timeout_then_exits_and_closes_the_frontend() {
    const DRAIN: Duration = Duration::from_secs(2);
    const SLACK: Duration = Duration::from_millis(1500);
    let env = Env::new("l_drain_timeout");
    let (mut server, mut agent) = env
        .pair(ServerOpts::uds(), |a| {
            a.arg(&format!("--drain-timeout={}s", DRAIN.as_secs()))
        })
        .await;
    let echo = backends::echo().await;
    let mut held = connect::tunnel(&server.frontend, &echo.target())
        .await
        .unwrap();
    connect::echo_once(&mut held, b"before SIGTERM")
        .await
        .unwrap();
    assert_eq!(
        gauge(&agent.metrics().await.unwrap(), names::AGENT_OPEN_ENDPOINTS),
        Ok(1.0)
    );

    signal(agent.proc.pid(), libc::SIGTERM);
    let termed = Instant::now();

    // The DRAIN packet reaches the server, and the agent reports itself draining.
    poll_until(
        "server /status to show the agent as draining",
        Duration::from_millis(1500),
        || async {
            let s = server.status().await?;
            match s["agents"].as_array().map(|a| a.as_slice()) {
                Some([a]) if a["draining"] == true => Ok(()),
                _ => Err(format!("agents: {}", s["agents"])),
            }
        },
    )
    .await;
    let a = agent.status().await.unwrap();
    assert_eq!(a["draining"], true, "agent /status: {a}");
    assert_eq!(a["open_endpoint_connections"], 1, "agent /status: {a}");

    // Until shortly before the timeout the open connection keeps working.
    let rounds = relay_until(
        &mut held,
        &mut agent.proc,
        termed,
        DRAIN - Duration::from_millis(300),
        "agent draining",
    )
    .await;
    println!("{rounds} echo round trips through the draining agent");
    assert!(
        rounds >= 5,
        "only {rounds} round trips during a {DRAIN:?} drain"
    );

    let (exit, took) = agent
        .proc
        .wait_exit(termed, DRAIN + SLACK, "agent after SIGTERM")
        .await;
    println!("agent exited {took:?} after SIGTERM: {exit:?}");
    assert!(
        took >= DRAIN - Duration::from_millis(50),
        "agent exited {took:?} after SIGTERM, before its {DRAIN:?} drain timeout"
    );
    assert_eq!(
        exit.code(),
        Some(0),
        "an agent whose drain timed out exits by itself with status 0 ({exit})"
    );
    assert!(
        agent.proc.log().contains("drain timeout reached: exiting"),
        "agent log must say the drain timed out:\n{}",
        agent.proc.log_tail()
    );

    // The server lost the agent's stream: it closes the frontend connection and is no longer
    // ready.
    assert_closed(
        &mut held,
        Duration::from_secs(5),
        "frontend connection after the agent exited",
    )
    .await;
    let body = http::wait_code(server.health_addr, "/readyz", 500, Duration::from_secs(5)).await;
    assert_eq!(body, "no connection to any proxy agent");
    poll_until(
        "server connection table to empty",
        Duration::from_secs(5),
        || async {
            let m = server.metrics().await.map_err(|e| format!("{e:#}"))?;
            match (
                gauge(&m, names::SERVER_ESTABLISHED)?,
                gauge(&m, names::SERVER_PENDING)?,
                gauge(&m, names::SERVER_READY_BACKENDS)?,
            ) {
                (0.0, 0.0, 0.0) => Ok(()),
                v => Err(format!("established, pending, ready backends = {v:?}")),
            }
        },
    )
    .await;
    server.proc.assert_running();
}

// ---------------------------------------------------------------------------------------------
// 2. server --graceful-shutdown-timeout expiry

/// One SIGTERM to a server with `--graceful-shutdown-timeout=3s` and a connection on its mTLS
/// TCP frontend that never ends: new dials are refused (503), readiness says "shutting down",
/// the open connection keeps relaying, and after the timeout the server exits by itself
/// (status 0) and the frontend sees its connection closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_graceful_shutdown_timeout_expiry_closes_a_never_ending_tls_frontend_connection() {
    const GRACE: Duration = Duration::from_secs(3);
    const SLACK: Duration = Duration::from_millis(1500);
    let env = Env::new("l_grace_timeout");
    let (mut server, _agent) = env
        .pair(
            ServerOpts::new(Mode::HttpConnect, Transport::Tls)
                .arg(&format!("--graceful-shutdown-timeout={}s", GRACE.as_secs())),
            |a| a,
        )
        .await;
    let frontend_addr = server.tcp.expect("TLS frontend");
    let echo = backends::echo().await;
    let mut held = connect::tunnel(&server.frontend, &echo.target())
        .await
        .unwrap();
    connect::echo_once(&mut held, b"before SIGTERM")
        .await
        .unwrap();

    signal(server.proc.pid(), libc::SIGTERM);
    let termed = Instant::now();

    let body = http::wait_code(server.health_addr, "/readyz", 500, Duration::from_secs(1)).await;
    assert_eq!(
        body, "shutting down",
        "/readyz body during graceful shutdown"
    );
    let (code, body) = get(server.health_addr, "/ready").await;
    assert_eq!((code, body.as_str()), (500, "shutting down"), "/ready");
    let (reply, _) = connect::connect(&server.frontend, &echo.target())
        .await
        .expect("the TLS frontend still answers during graceful shutdown");
    println!(
        "new CONNECT during shutdown: {} / {:?}",
        reply.head, reply.body
    );
    assert_eq!(
        reply.status, 503,
        "a new dial during graceful shutdown: {reply:?}"
    );
    assert!(
        reply.body.contains("server is shutting down"),
        "503 body: {:?}",
        reply.body
    );

    let rounds = relay_until(
        &mut held,
        &mut server.proc,
        termed,
        GRACE - Duration::from_millis(300),
        "server in graceful shutdown",
    )
    .await;
    println!("{rounds} echo round trips during the graceful shutdown");
    assert!(rounds >= 8, "only {rounds} round trips during {GRACE:?}");

    let (exit, took) = server
        .proc
        .wait_exit(termed, GRACE + SLACK, "server after SIGTERM")
        .await;
    println!("server exited {took:?} after SIGTERM: {exit:?}");
    assert!(
        took >= GRACE - Duration::from_millis(50),
        "server exited {took:?} after SIGTERM, before its {GRACE:?} graceful shutdown timeout \
         although a connection was still open"
    );
    assert_eq!(
        exit.code(),
        Some(0),
        "graceful shutdown ends with status 0 ({exit})"
    );
    let log = server.proc.log();
    assert!(
        log.contains("graceful shutdown timeout reached"),
        "server log must say the timeout ran out:\n{}",
        server.proc.log_tail()
    );

    assert_closed(
        &mut held,
        Duration::from_secs(2),
        "frontend connection after the server exited",
    )
    .await;
    let refused = tokio::net::TcpStream::connect(frontend_addr).await;
    assert!(
        refused.is_err(),
        "the frontend port still accepts connections after the server exited"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. /readyz, /ready and ?verbose bodies

const READY_PATHS: [&str; 4] = ["/readyz", "/ready", "/readyz?verbose", "/ready?verbose"];
const AGENT_NOT_READY: &str =
    "[+]ping ok\n[-]server-connected failed: no servers connected\nreadyz check failed\n";

/// Checks every readiness path of an agent that has no tunnel: 503 and the check lines.
async fn assert_agent_not_ready(addr: SocketAddr) {
    for path in READY_PATHS.iter().copied().chain(["/readyz?verbose=1"]) {
        let (code, body) = get(addr, path).await;
        assert_eq!(
            (code, body.as_str()),
            (503, AGENT_NOT_READY),
            "agent GET {path} without a tunnel"
        );
    }
}

/// Server: 500 "no connection to any proxy agent" on /readyz and /ready (with or without
/// `?verbose`: the server has one check and no verbose form) until an agent connects, then
/// 200 "ok". Agent: 503 with `[+]ping ok` / `[-]server-connected failed: ...` until a tunnel
/// is up, then 200 "ok", and with `?verbose` the passed checks, eBPF's state included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_and_verbose_bodies_on_server_and_agent_before_and_after_an_agent_connects() {
    let env = Env::new("l_ready_bodies");
    let mut server = env.server(ServerOpts::uds()).await;
    for path in ["/healthz", "/healthz?verbose"] {
        assert_eq!(
            get(server.health_addr, path).await,
            (200, "ok".to_string()),
            "server {path}"
        );
    }
    for path in READY_PATHS {
        let (code, body) = get(server.health_addr, path).await;
        assert_eq!(
            (code, body.as_str()),
            (500, "no connection to any proxy agent"),
            "server GET {path} without agents"
        );
    }

    // An agent whose server is not there yet: alive, not ready.
    server.proc.kill();
    let mut agent = env.agent(AgentOpts::new(server.agent_addr)).await;
    for path in ["/healthz", "/healthz?verbose"] {
        assert_eq!(
            get(agent.health_addr, path).await,
            (200, "ok".to_string()),
            "agent {path}"
        );
    }
    assert_agent_not_ready(agent.health_addr).await;
    // It keeps saying so while it retries (several sync attempts at 100 ms).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_agent_not_ready(agent.health_addr).await;

    // The server comes up; the agent connects.
    server.proc.restart();
    server.wait_healthy().await;
    agent.wait_ready().await;
    server.wait_ready().await;

    for path in READY_PATHS {
        let (code, body) = get(server.health_addr, path).await;
        assert_eq!(
            (code, body.as_str()),
            (200, "ok"),
            "server GET {path} with an agent"
        );
    }
    for path in ["/readyz", "/ready"] {
        let (code, body) = get(agent.health_addr, path).await;
        assert_eq!(
            (code, body.as_str()),
            (200, "ok"),
            "agent GET {path} with a tunnel"
        );
    }
    for path in [
        "/readyz?verbose",
        "/ready?verbose",
        "/readyz?verbose=1",
        "/ready?x=y&verbose",
    ] {
        let (code, body) = get(agent.health_addr, path).await;
        println!("agent GET {path}: {code} {body:?}");
        assert_eq!(code, 200, "agent GET {path}: {body:?}");
        let lines: Vec<&str> = body.lines().collect();
        assert!(body.ends_with('\n'), "agent GET {path}: {body:?}");
        assert_eq!(lines.len(), 4, "agent GET {path}: {body:?}");
        assert_eq!(lines[0], "[+]ping ok", "agent GET {path}");
        assert_eq!(
            lines[1], "[+]server-connected ok (1 servers)",
            "agent GET {path}"
        );
        // --ebpf=off (the harness's default): the summary names the mode and both parts.
        assert!(
            lines[2].starts_with("[+]ebpf ok (eBPF mode off: socket fast path ")
                && lines[2].contains("; XDP guard ")
                && lines[2].ends_with(')'),
            "agent GET {path}: ebpf line {:?}",
            lines[2]
        );
        assert_eq!(lines[3], "readyz check passed", "agent GET {path}");
    }

    // The server goes away again: the agent falls back to 503 with the same lines.
    server.proc.kill();
    http::wait_code(agent.health_addr, "/ready", 503, Duration::from_secs(10)).await;
    assert_agent_not_ready(agent.health_addr).await;
    agent.proc.assert_running();
}

// ---------------------------------------------------------------------------------------------
// 4. frontend certificate rotation

/// A server whose mTLS TCP frontend (`--mode=http-connect`) serves `frontend_cert`/`key` and
/// requires client certificates from the main CA; the agent port serves the main CA's server
/// certificate. Frontend clients trust `frontend_ca_pem`.
async fn server_with_frontend_cert(
    env: &Env,
    frontend_cert: &Path,
    frontend_key: &Path,
    frontend_ca_pem: &str,
) -> Server {
    let mut server = env
        .server(
            ServerOpts::new(Mode::HttpConnect, Transport::Tls)
                .arg(&format!("--server-cert={}", frontend_cert.display()))
                .arg(&format!("--server-key={}", frontend_key.display())),
        )
        .await;
    let addr = server.tcp.expect("TLS frontend");
    let config =
        spoke_tests::tls::client_config(frontend_ca_pem, Some(&env.pki.main.frontend), &[]);
    server.frontend = Frontend::Tls(addr, config);
    server
}

const SERVER_EXPIRY: &str = "spoke_server_tls_certificate_expiry_timestamp_seconds";
const RELOAD_FAILURES: &str = "spoke_server_tls_reload_failures_total";

async fn frontend_expiry(server: &Server) -> Result<f64, String> {
    let m = server.metrics().await.map_err(|e| format!("{e:#}"))?;
    m.get_labeled(SERVER_EXPIRY, &[("certificate", "--server-cert")])
        .ok_or_else(|| {
            format!(
                "{SERVER_EXPIRY}{{certificate=\"--server-cert\"}} absent; present: {:?}",
                m.names()
            )
        })
}

/// The frontend's `--server-cert`/`--server-key` are replaced (atomic renames) by a new
/// certificate from the same CA: new handshakes present it after the periodic reload check,
/// a tunnel opened before keeps relaying and the expiry gauge follows. A broken certificate
/// file then is refused: the failure is counted, the last good certificate stays in use, and
/// a later good file is still picked up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frontend_cert_rotation_keeps_open_tunnels_and_a_broken_file_keeps_the_last_good_cert() {
    let env = Env::new("l_frontend_rotate");
    let rot = Ca::new("spoke e2e frontend rotation CA");
    let (c1, k1, exp1) = rot.server_leaf_until("spoke frontend one", 2040);
    let (c2, k2, exp2) = rot.server_leaf_until("spoke frontend two", 2041);
    let (c3, k3, exp3) = rot.server_leaf_until("spoke frontend three", 2042);
    let cert = env.dir.join("frontend.crt");
    let key = env.dir.join("frontend.key");
    std::fs::write(&cert, &c1).unwrap();
    std::fs::write(&key, &k1).unwrap();
    let mut server = server_with_frontend_cert(&env, &cert, &key, &rot.cert_pem).await;
    let addr = server.tcp.unwrap();
    let mut agent = env.agent(AgentOpts::new(server.agent_addr)).await;
    agent.wait_ready().await;
    server.wait_ready().await;
    let client = env.pki.main.frontend.clone();

    assert_eq!(
        served_cert(addr, &rot.cert_pem, &client, &[]).await,
        Ok(der(&c1)),
        "the frontend serves another certificate than --server-cert"
    );
    assert_eq!(frontend_expiry(&server).await, Ok(exp1 as f64));
    let echo = backends::echo().await;
    let mut held = connect::tunnel(&server.frontend, &echo.target())
        .await
        .unwrap();
    connect::echo_once(&mut held, b"before rotation")
        .await
        .unwrap();

    // Rotation: key first, then certificate, each by an atomic rename.
    write_atomically(&key, &k2);
    write_atomically(&cert, &c2);
    let took = wait_served(
        addr,
        &rot.cert_pem,
        &client,
        &[],
        &c2,
        "new frontend handshakes to present the rotated certificate",
    )
    .await;
    println!("rotated frontend certificate served {took:?} after the write");
    connect::echo_once(&mut held, b"after rotation")
        .await
        .expect("a tunnel opened before the rotation keeps relaying");
    connect::echo_roundtrip(&server.frontend, &echo.target())
        .await
        .expect("a new tunnel through the rotated certificate");
    poll_until(
        "the --server-cert expiry gauge to follow the rotation",
        Duration::from_secs(5),
        || async {
            match frontend_expiry(&server).await? {
                v if v == exp2 as f64 => Ok(()),
                v => Err(format!("{v}, want {exp2}")),
            }
        },
    )
    .await;
    let failures_before = server
        .metrics()
        .await
        .unwrap()
        .counter(RELOAD_FAILURES, &[]);
    let refusals_before = server.proc.log().matches("cannot be used").count();

    // A broken certificate file: counted, refused, the last good certificate stays.
    write_atomically(
        &cert,
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n",
    );
    poll_until(
        "the broken --server-cert to be counted as a reload failure",
        Duration::from_secs(15),
        || async {
            let m = server.metrics().await.map_err(|e| format!("{e:#}"))?;
            match m.counter(RELOAD_FAILURES, &[]) {
                v if v > failures_before => Ok(()),
                v => Err(format!(
                    "{RELOAD_FAILURES} = {v} (before {failures_before}); present: {:?}",
                    m.names()
                )),
            }
        },
    )
    .await;
    let log = server.proc.log();
    assert!(
        log.matches("cannot be used").count() > refusals_before && log.contains("--server-cert"),
        "server log must say the new --server-cert cannot be used:\n{}",
        server.proc.log_tail()
    );
    assert_eq!(
        served_cert(addr, &rot.cert_pem, &client, &[]).await,
        Ok(der(&c2)),
        "after a broken file the frontend must keep the last good certificate"
    );
    assert_eq!(frontend_expiry(&server).await, Ok(exp2 as f64));
    connect::echo_once(&mut held, b"after the broken file")
        .await
        .unwrap();
    connect::echo_roundtrip(&server.frontend, &echo.target())
        .await
        .expect("new tunnels after a broken certificate file");
    server.proc.assert_running();

    // The watcher goes on: a good file after the broken one is picked up.
    write_atomically(&key, &k3);
    write_atomically(&cert, &c3);
    let took = wait_served(
        addr,
        &rot.cert_pem,
        &client,
        &[],
        &c3,
        "new frontend handshakes to present the certificate written after the broken one",
    )
    .await;
    println!("third frontend certificate served {took:?} after the write");
    assert_eq!(frontend_expiry(&server).await, Ok(exp3 as f64));
    connect::echo_once(&mut held, b"after the third certificate")
        .await
        .unwrap();
    drop(held);
    poll_until(
        "the held connection to leave the tables",
        Duration::from_secs(10),
        || async {
            let m = server.metrics().await.map_err(|e| format!("{e:#}"))?;
            let am = agent.metrics().await.map_err(|e| format!("{e:#}"))?;
            match (
                gauge(&m, names::SERVER_ESTABLISHED)?,
                gauge(&am, names::AGENT_OPEN_ENDPOINTS)?,
            ) {
                (0.0, 0.0) => Ok(()),
                v => Err(format!("server established, agent open endpoints = {v:?}")),
            }
        },
    )
    .await;
    agent.proc.assert_running();
    server.proc.assert_running();
}
