//! Server- and agent-side limits: `--max-connections` and `--max-pending-dials` on the server,
//! `--max-pending-dials` on the agent, the server's `--max-buffered-bytes`, the HTTP CONNECT
//! `--frontend-header-timeout` (slowloris guard), and a second SIGTERM cutting an agent's drain
//! short. Real processes on loopback; dials are held pending with a loopback listener whose
//! accept queue is full (the kernel drops further SYNs), so no root is needed.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use spoke_tests::backends::{self, recv_pattern, PatternRequest};
use spoke_tests::cluster::{wait_tables_empty, Agent, Env, Server, ServerOpts};
use spoke_tests::connect::{self, Frontend, Reply};
use spoke_tests::faultnet::signal;
use spoke_tests::http;
use spoke_tests::metrics::names;
use spoke_tests::wait::{holds_for, poll_until, within};
use spoke_tests::BoxIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Server: connections refused or closed for bad input or limits, by reason.
const SERVER_REJECTED: &str = "spoke_server_rejected_connections_total";
/// Server: bytes from agents waiting for their frontend client.
const SERVER_BUFFERED: &str = "spoke_server_buffered_bytes";
/// Server: HTTP CONNECT frontend connections currently open (upstream name).
const SERVER_HTTP_CONNECTIONS: &str = "konnectivity_network_proxy_server_http_connections";
/// Agent: dials refused by a limit or by --allowed-destinations, by reason.
const AGENT_REFUSED: &str = "spoke_agent_refused_dials_total";
/// Agent: dials to local endpoints in progress.
const AGENT_PENDING: &str = "spoke_agent_pending_dials";

async fn server_counter(server: &Server, name: &str, reason: &str) -> f64 {
    server
        .metrics()
        .await
        .unwrap()
        .counter(name, &[("reason", reason)])
}

async fn agent_counter(agent: &Agent, name: &str, reason: &str) -> f64 {
    agent
        .metrics()
        .await
        .unwrap()
        .counter(name, &[("reason", reason)])
}

/// Polls until gauge `name` of `server` (and, if given, of `agent`) read the wanted values.
async fn wait_gauges(what: &str, server: (&Server, &str, f64), agent: Option<(&Agent, &str, f64)>) {
    poll_until(what, Duration::from_secs(10), || async {
        let (s, sn, sw) = server;
        let sv = s.gauge(sn).await?;
        let av = match agent {
            Some((a, an, _)) => Some(a.gauge(an).await?),
            None => None,
        };
        let agent_ok = match (agent, av) {
            (Some((_, _, aw)), Some(v)) => v == aw,
            _ => true,
        };
        if sv == sw && agent_ok {
            Ok(())
        } else {
            Err(format!(
                "server {sn}={sv} (want {sw}); agent {av:?} (want {:?})",
                agent.map(|a| a.2)
            ))
        }
    })
    .await
}

/// One echo round trip of `len` bytes on an open tunnel (client → destination → client).
async fn echo_on(io: &mut BoxIo, tag: u8, len: usize) -> anyhow::Result<()> {
    let msg: Vec<u8> = (0..len).map(|i| tag ^ (i % 251) as u8).collect();
    let (mut r, mut w) = tokio::io::split(io);
    let write = async {
        w.write_all(&msg).await?;
        w.flush().await?;
        anyhow::Ok(())
    };
    let read = async {
        let mut back = vec![0u8; len];
        r.read_exact(&mut back).await?;
        anyhow::ensure!(back == msg, "echo returned different bytes");
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(10), async {
        tokio::try_join!(write, read)
    })
    .await
    .map_err(|_| anyhow::anyhow!("echo of {len} bytes timed out"))??;
    Ok(())
}

/// Asserts `reply` is the server's 503 naming `flag`.
fn assert_503(what: &str, reply: &Reply, wants: &[&str]) {
    assert_eq!(reply.status, 503, "{what}: {reply:?}");
    assert!(
        reply.head.starts_with("HTTP/1.1 503 Service Unavailable"),
        "{what}: status line {:?}",
        reply.head
    );
    for w in wants {
        assert!(
            reply.body.contains(w),
            "{what}: body {:?} does not mention {w:?}",
            reply.body
        );
    }
}

/// `CONNECT target` on the server's frontend; returns the reply (the connection is dropped).
async fn connect_reply(server: &Server, target: &str) -> Reply {
    let (reply, _) = connect::connect(&server.frontend, target).await.unwrap();
    reply
}

/// Sends `CONNECT target` and leaves the answer unread: the dial stays pending on the server for
/// as long as the agent's dial does.
async fn connect_and_hold(frontend: &Frontend, target: &str) -> BoxIo {
    let mut io = frontend.open().await.expect("open frontend");
    io.write_all(connect::head(target).as_bytes())
        .await
        .unwrap();
    io.flush().await.unwrap();
    io
}

/// A loopback address whose TCP handshakes never complete: a listener with backlog 0 that never
/// accepts, its one-slot accept queue taken by our own connection(s), so the kernel drops every
/// further SYN and a dial to it stays pending until the dialler gives up.
struct BlackHole {
    addr: SocketAddr,
    _listener: TcpListener,
    _fillers: Vec<TcpStream>,
}

impl BlackHole {
    async fn new() -> Self {
        let sock = TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = sock.local_addr().unwrap();
        let listener = sock.listen(0).unwrap();
        let mut fillers = Vec::new();
        loop {
            assert!(
                fillers.len() < 16,
                "the accept queue of a backlog-0 listener never filled up: cannot hold dials"
            );
            match tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr)).await {
                Ok(Ok(s)) => fillers.push(s),
                Ok(Err(e)) => panic!("connect to the black-hole listener failed: {e}"),
                Err(_) => break, // this SYN was dropped: the queue is full
            }
        }
        println!(
            "black hole at {addr}: accept queue full after {} connections",
            fillers.len()
        );
        Self {
            addr,
            _listener: listener,
            _fillers: fillers,
        }
    }

    fn target(&self) -> String {
        self.addr.to_string()
    }
}

// ---------------------------------------------------------------------------------------------
// (a) server --max-connections

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_max_connections_503_keeps_the_open_ones_and_frees_a_slot_on_close() {
    const N: usize = 3;
    let env = Env::new("l_srv_maxconn");
    let echo = backends::echo().await;
    let (server, agent) = env
        .pair(
            ServerOpts::uds().arg(&format!("--max-connections={N}")),
            |a| a,
        )
        .await;
    let mut live = Vec::new();
    for i in 0..N {
        let mut io = connect::tunnel(&server.frontend, &echo.target())
            .await
            .unwrap();
        echo_on(&mut io, i as u8, 100).await.unwrap();
        live.push(io);
    }
    let base = server_counter(&server, SERVER_REJECTED, "limit_connections").await;

    let reply = connect_reply(&server, &echo.target()).await;
    println!("CONNECT #{}: {} / {}", N + 1, reply.head, reply.body);
    assert_503(
        "CONNECT over --max-connections",
        &reply,
        &["server limit reached", "--max-connections"],
    );
    assert_eq!(
        server_counter(&server, SERVER_REJECTED, "limit_connections").await,
        base + 1.0,
        "{SERVER_REJECTED}{{reason=limit_connections}}"
    );
    assert_eq!(
        echo.stats.snapshot().0,
        N as u64,
        "the refused CONNECT reached the destination"
    );
    assert_eq!(
        agent.gauge(names::AGENT_OPEN_ENDPOINTS).await,
        Ok(N as f64),
        "the refused CONNECT was dialled by the agent"
    );

    // The open connections keep relaying, in both directions, with more than a packet's worth.
    for (i, io) in live.iter_mut().enumerate() {
        echo_on(io, 0x40 + i as u8, 256 * 1024)
            .await
            .unwrap_or_else(|e| panic!("open connection {i} after the 503: {e:#}"));
    }

    // Closing one frees its slot; the limit then holds again.
    drop(live.remove(0));
    wait_gauges(
        "the closed connection to leave the server's table",
        (&server, names::SERVER_ESTABLISHED, (N - 1) as f64),
        Some((&agent, names::AGENT_OPEN_ENDPOINTS, (N - 1) as f64)),
    )
    .await;
    let mut again = connect::tunnel(&server.frontend, &echo.target())
        .await
        .expect("a CONNECT after one connection closed must get through");
    echo_on(&mut again, 0x7f, 1000).await.unwrap();
    live.push(again);
    let reply = connect_reply(&server, &echo.target()).await;
    assert_503(
        "CONNECT over the limit again",
        &reply,
        &["--max-connections"],
    );
    assert_eq!(
        server_counter(&server, SERVER_REJECTED, "limit_connections").await,
        base + 2.0
    );
    for (i, io) in live.iter_mut().enumerate() {
        echo_on(io, i as u8, 100).await.unwrap();
    }
    drop(live);
    wait_tables_empty(&server, &[&agent]).await;
}

// ---------------------------------------------------------------------------------------------
// (b) pending-dial caps

/// The agent's dial timeout in the pending-dial tests: long enough to make the extra dial while
/// the held ones are still pending, short enough to end them within the test.
const HELD_DIAL_TIMEOUT: Duration = Duration::from_secs(4);

/// Reads the proxy's answer to a CONNECT sent by [`connect_and_hold`].
async fn answer_of(mut io: BoxIo, within_: Duration) -> Reply {
    within("the answer to a held CONNECT", within_, async move {
        let head = connect::read_head(&mut io).await.expect("response head");
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad response {head:?}"));
        let mut body = Vec::new();
        let _ = io.read_to_end(&mut body).await;
        Reply {
            status,
            head,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    })
    .await
}

/// The held dials end when the agent's dial times out: each client gets upstream's 504 with
/// Go's `i/o timeout` text, both tables empty, and a new dial gets through.
async fn held_dials_time_out_and_free_their_slots(
    server: &Server,
    agent: &Agent,
    held: Vec<BoxIo>,
    echo: &str,
) {
    for io in held {
        let reply = answer_of(io, HELD_DIAL_TIMEOUT + Duration::from_secs(5)).await;
        println!(
            "held CONNECT: {} / {}",
            reply.head.lines().next().unwrap_or(""),
            reply.body
        );
        assert_eq!(
            reply.status, 504,
            "held dial after the agent's --dial-timeout: {reply:?}"
        );
        assert!(reply.body.contains("i/o timeout"), "{reply:?}");
    }
    wait_gauges(
        "the timed-out dials to leave server and agent",
        (server, names::SERVER_PENDING, 0.0),
        Some((agent, AGENT_PENDING, 0.0)),
    )
    .await;
    connect::echo_roundtrip(&server.frontend, echo)
        .await
        .expect("a dial after the pending ones ended must get through");
    wait_tables_empty(server, &[agent]).await;
}

/// A server with `server_opts` and an agent with `agent_arg` (if any) and `--dial-timeout`
/// [`HELD_DIAL_TIMEOUT`], with two CONNECTs held pending on both of them toward a [`BlackHole`]
/// (returned: it must outlive the held dials).
async fn two_held_dials(
    env: &Env,
    server_opts: ServerOpts,
    agent_arg: Option<&str>,
) -> (Server, Agent, BlackHole, Vec<BoxIo>) {
    let hole = BlackHole::new().await;
    let dial_timeout = format!("--dial-timeout={}s", HELD_DIAL_TIMEOUT.as_secs());
    let (server, agent) = env
        .pair(server_opts, |a| match agent_arg {
            Some(arg) => a.arg(arg).arg(&dial_timeout),
            None => a.arg(&dial_timeout),
        })
        .await;
    let held = vec![
        connect_and_hold(&server.frontend, &hole.target()).await,
        connect_and_hold(&server.frontend, &hole.target()).await,
    ];
    wait_gauges(
        "two dials pending on server and agent",
        (&server, names::SERVER_PENDING, 2.0),
        Some((&agent, AGENT_PENDING, 2.0)),
    )
    .await;
    (server, agent, hole, held)
}

/// A third CONNECT (to `echo`, which would answer) while two dials are held: a 503 naming
/// `wants`, and nothing reaches the destination.
async fn third_connect_refused(
    server: &Server,
    echo: &backends::Backend,
    what: &str,
    wants: &[&str],
) {
    let reply = connect_reply(server, &echo.target()).await;
    println!("third CONNECT: {} / {}", reply.head, reply.body);
    assert_503(what, &reply, wants);
    assert_eq!(
        echo.stats.snapshot().0,
        0,
        "the refused dial reached its destination"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_max_pending_dials_refuses_the_extra_dial_with_503() {
    let env = Env::new("l_srv_pending");
    let echo = backends::echo().await;
    let (server, agent, _hole, held) =
        two_held_dials(&env, ServerOpts::uds().arg("--max-pending-dials=2"), None).await;
    let base = server_counter(&server, SERVER_REJECTED, "limit_pending_dials").await;

    // A third dial, even to a destination that would answer, is refused by the server.
    third_connect_refused(
        &server,
        &echo,
        "CONNECT over the server's --max-pending-dials",
        &["server limit reached", "--max-pending-dials"],
    )
    .await;
    assert_eq!(
        server_counter(&server, SERVER_REJECTED, "limit_pending_dials").await,
        base + 1.0,
        "{SERVER_REJECTED}{{reason=limit_pending_dials}}"
    );
    assert_eq!(
        (
            server.gauge(names::SERVER_PENDING).await,
            agent.gauge(AGENT_PENDING).await
        ),
        (Ok(2.0), Ok(2.0)),
        "the held dials must still be pending and the refused one never sent to the agent"
    );
    held_dials_time_out_and_free_their_slots(&server, &agent, held, &echo.target()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_max_pending_dials_refuses_the_extra_dial_and_the_server_answers_503() {
    let env = Env::new("l_agent_pending");
    let echo = backends::echo().await;
    let (server, agent, _hole, held) =
        two_held_dials(&env, ServerOpts::uds(), Some("--max-pending-dials=2")).await;
    let base = agent_counter(&agent, AGENT_REFUSED, "limit_pending_dials").await;

    third_connect_refused(
        &server,
        &echo,
        "CONNECT over the agent's --max-pending-dials",
        &["agent limit reached", "--max-pending-dials"],
    )
    .await;
    assert_eq!(
        agent_counter(&agent, AGENT_REFUSED, "limit_pending_dials").await,
        base + 1.0,
        "{AGENT_REFUSED}{{reason=limit_pending_dials}}"
    );
    assert_eq!(
        agent.gauge(AGENT_PENDING).await,
        Ok(2.0),
        "the held dials must still be pending"
    );
    held_dials_time_out_and_free_their_slots(&server, &agent, held, &echo.target()).await;
}

/// A CONNECT client that gives up while its dial is pending frees its pending-dial slot at once
/// (the server sends DIAL_CLS, as the gRPC frontend does), instead of holding it until the
/// agent's dial ends: otherwise, with `--max-pending-dials`, a few abandoned CONNECTs to a
/// filtered address would lock every new dial out for up to the agent's `--dial-timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_connect_frees_its_pending_dial_slot_at_once() {
    let env = Env::new("l_abandoned");
    let echo = backends::echo().await;
    let hole = BlackHole::new().await;
    let (server, agent) = env
        .pair(ServerOpts::uds().arg("--max-pending-dials=1"), |a| {
            a.arg("--dial-timeout=60s")
        })
        .await;
    let held = connect_and_hold(&server.frontend, &hole.target()).await;
    wait_gauges(
        "one dial pending on server and agent",
        (&server, names::SERVER_PENDING, 1.0),
        Some((&agent, AGENT_PENDING, 1.0)),
    )
    .await;
    let reply = connect_reply(&server, &echo.target()).await;
    assert_503(
        "CONNECT while the slot is taken",
        &reply,
        &["--max-pending-dials"],
    );
    drop(held);
    poll_until(
        "the abandoned dial to leave server and agent (agent --dial-timeout is 60 s)",
        Duration::from_secs(3),
        || async {
            let s = server.gauge(names::SERVER_PENDING).await?;
            let a = agent.gauge(AGENT_PENDING).await?;
            if (s, a) == (0.0, 0.0) {
                Ok(())
            } else {
                Err(format!("server pending={s}, agent pending={a}"))
            }
        },
    )
    .await;
    connect::echo_roundtrip(&server.frontend, &echo.target())
        .await
        .expect("the freed slot takes a new dial");
}

// ---------------------------------------------------------------------------------------------
// (b') server --max-buffered-bytes

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_max_buffered_bytes_refuses_new_dials_until_the_slow_reader_catches_up() {
    const LIMIT: f64 = (1 << 20) as f64;
    const DOWNLOAD: u64 = 16 << 20;
    let env = Env::new("l_srv_buffered");
    let pattern = backends::pattern().await;
    let echo = backends::echo().await;
    let (server, agent) = env
        .pair(ServerOpts::uds().arg("--max-buffered-bytes=1Mi"), |a| a)
        .await;
    // A client that asks for 16 MiB and does not read: the server holds what the agent sent.
    let mut slow = connect::tunnel(&server.frontend, &pattern.target())
        .await
        .unwrap();
    let req = PatternRequest::download(DOWNLOAD, 7);
    req.send_header(&mut slow).await.unwrap();
    let buffered = poll_until(
        "the server to buffer more than --max-buffered-bytes",
        Duration::from_secs(10),
        || async {
            match server.gauge(SERVER_BUFFERED).await? {
                v if v >= LIMIT => Ok(v),
                v => Err(format!("{SERVER_BUFFERED}={v}")),
            }
        },
    )
    .await;
    println!("server buffers {buffered} bytes for the stalled reader");
    let base = server_counter(&server, SERVER_REJECTED, "limit_buffered_bytes").await;
    let reply = connect_reply(&server, &echo.target()).await;
    println!(
        "CONNECT while over the limit: {} / {}",
        reply.head, reply.body
    );
    assert_503(
        "CONNECT over --max-buffered-bytes",
        &reply,
        &["server limit reached", "--max-buffered-bytes"],
    );
    assert_eq!(
        server_counter(&server, SERVER_REJECTED, "limit_buffered_bytes").await,
        base + 1.0
    );
    assert_eq!(echo.stats.snapshot().0, 0);

    // The reader catches up: every byte arrives intact, the buffer empties, dials work again.
    within(
        "the stalled download to complete",
        Duration::from_secs(30),
        recv_pattern(&mut slow, req.down_seed, DOWNLOAD),
    )
    .await
    .expect("the stalled connection's data must arrive intact");
    poll_until(
        "the server's buffer to empty",
        Duration::from_secs(10),
        || async {
            match server.gauge(SERVER_BUFFERED).await? {
                0.0 => Ok(()),
                v => Err(format!("{SERVER_BUFFERED}={v}")),
            }
        },
    )
    .await;
    connect::echo_roundtrip(&server.frontend, &echo.target())
        .await
        .expect("dials work again once the buffer drained");
    drop(slow);
    wait_tables_empty(&server, &[&agent]).await;
}

// ---------------------------------------------------------------------------------------------
// (c) --frontend-header-timeout

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frontend_header_timeout_closes_half_sent_heads_and_other_clients_are_served() {
    const TIMEOUT: Duration = Duration::from_secs(2);
    let env = Env::new("l_hdr_timeout");
    let echo = backends::echo().await;
    let (server, agent) = env
        .pair(ServerOpts::uds().arg("--frontend-header-timeout=2s"), |a| a)
        .await;
    let base = server_counter(&server, SERVER_REJECTED, "header_timeout").await;
    let target = echo.target();

    // Half a CONNECT head, then silence.
    let mut half = server.frontend.open().await.unwrap();
    half.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: ").as_bytes())
        .await
        .unwrap();
    half.flush().await.unwrap();
    let opened = Instant::now();
    // A slowloris: a complete head, one byte every 300 ms (16 s in all); it makes progress, but
    // the timeout bounds the whole head, so it is closed too.
    let trickle = {
        let mut io = server.frontend.open().await.unwrap();
        let head = connect::head(&target);
        tokio::spawn(async move {
            let start = Instant::now();
            let mut sent = 0;
            let mut buf = [0u8; 256];
            for b in head.as_bytes() {
                if io.write_all(&[*b]).await.is_err() {
                    return (start.elapsed(), sent, "write failed".to_string());
                }
                sent += 1;
                tokio::select! {
                    r = io.read(&mut buf) => {
                        let how = match r {
                            Ok(0) => "EOF".to_string(),
                            Ok(n) => format!("{n} bytes: {:?}", String::from_utf8_lossy(&buf[..n])),
                            Err(e) => format!("error: {e}"),
                        };
                        return (start.elapsed(), sent, how);
                    }
                    _ = tokio::time::sleep(Duration::from_millis(300)) => {}
                }
            }
            (start.elapsed(), sent, "whole head sent".to_string())
        })
    };

    // Meanwhile a normal client is served at once.
    let mut normal = connect::tunnel(&server.frontend, &target).await.unwrap();
    echo_on(&mut normal, 1, 4096).await.unwrap();
    assert!(
        opened.elapsed() < TIMEOUT,
        "the normal CONNECT took {:?}; it must not wait for the stalled clients",
        opened.elapsed()
    );

    let mut buf = [0u8; 256];
    let n = within(
        "the server to close the half-sent head",
        TIMEOUT + Duration::from_secs(5),
        half.read(&mut buf),
    )
    .await;
    let closed_after = opened.elapsed();
    println!("half head closed after {closed_after:?}: {n:?}");
    assert!(
        matches!(n, Ok(0) | Err(_)),
        "the server answered a half-sent head instead of closing it: {:?}",
        n.map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
    );
    assert!(
        closed_after >= TIMEOUT - Duration::from_millis(200),
        "closed after {closed_after:?}, before --frontend-header-timeout={TIMEOUT:?}"
    );
    let (took, sent, how) = within(
        "the slowloris client to be closed",
        TIMEOUT + Duration::from_secs(5),
        trickle,
    )
    .await
    .unwrap();
    println!("slowloris closed after {took:?} and {sent} bytes: {how}");
    assert_eq!(
        how, "EOF",
        "the slowloris client must be closed without an answer"
    );
    assert!(
        took >= TIMEOUT - Duration::from_millis(200) && took < TIMEOUT + Duration::from_secs(3),
        "slowloris closed after {took:?}; --frontend-header-timeout={TIMEOUT:?}"
    );

    poll_until(
        "header_timeout to be counted twice",
        Duration::from_secs(5),
        || async {
            let m = server.metrics().await.map_err(|e| format!("{e:#}"))?;
            match m.counter(SERVER_REJECTED, &[("reason", "header_timeout")]) - base {
                2.0 => Ok(()),
                d => Err(format!("{SERVER_REJECTED}{{reason=header_timeout}} +{d}")),
            }
        },
    )
    .await;
    // The normal connection outlived the timeout: it only bounds the request head.
    echo_on(&mut normal, 2, 4096).await.unwrap();
    assert_eq!(
        echo.stats.snapshot().0,
        1,
        "only the normal client may reach the destination"
    );
    poll_until(
        "only the normal client to be left on the frontend",
        Duration::from_secs(5),
        || async {
            match server.gauge(SERVER_HTTP_CONNECTIONS).await? {
                1.0 => Ok(()),
                v => Err(format!("{SERVER_HTTP_CONNECTIONS}={v}")),
            }
        },
    )
    .await;
    drop(normal);
    wait_tables_empty(&server, &[&agent]).await;
}

// ---------------------------------------------------------------------------------------------
// (d) a second SIGTERM ends the drain at once

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_sigterm_makes_a_draining_agent_exit_at_once() {
    let env = Env::new("l_second_term");
    let echo = backends::echo().await;
    let (server, mut agent) = env
        .pair(ServerOpts::uds(), |a| a.arg("--drain-timeout=120s"))
        .await;
    let mut long = connect::tunnel(&server.frontend, &echo.target())
        .await
        .unwrap();
    echo_on(&mut long, 1, 1000).await.unwrap();

    signal(agent.proc.pid(), libc::SIGTERM);
    // The first signal was taken (the agent says it is draining) ...
    poll_until(
        "the agent to report draining",
        Duration::from_secs(5),
        || async {
            let r = http::get(agent.admin_addr, "/status")
                .await
                .map_err(|e| format!("{e:#}"))?;
            let v: serde_json::Value =
                serde_json::from_str(&r.body).map_err(|e| format!("{e}: {:?}", r.body))?;
            match v["draining"].as_bool() {
                Some(true) => Ok(()),
                other => Err(format!("draining={other:?}")),
            }
        },
    )
    .await;
    // ... and with a connection open and 120 s of drain left, it keeps running and relaying.
    holds_for(
        "the draining agent to keep running",
        Duration::from_secs(1),
        || {
            let running = agent.proc.is_running();
            async move {
                if running {
                    Ok(())
                } else {
                    Err("the agent exited after the first SIGTERM".to_string())
                }
            }
        },
    )
    .await;
    echo_on(&mut long, 2, 64 * 1024)
        .await
        .expect("the open connection keeps working during the drain");
    assert!(agent.proc.is_running(), "the agent exited during the drain");

    signal(agent.proc.pid(), libc::SIGTERM);
    let second = Instant::now();
    while agent.proc.is_running() {
        assert!(
            second.elapsed() < Duration::from_secs(1),
            "the agent still runs 1 s after the second SIGTERM (drain-timeout 120 s, 1 open connection)"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "agent exited {:?} after the second SIGTERM",
        second.elapsed()
    );
    let mut buf = [0u8; 16];
    let n = within(
        "the tunnel through the exited agent to close",
        Duration::from_secs(5),
        long.read(&mut buf),
    )
    .await;
    assert!(
        matches!(n, Ok(0) | Err(_)),
        "tunnel still open after the agent exited: {n:?}"
    );
    wait_gauges(
        "the server to drop the agent's connection",
        (&server, names::SERVER_ESTABLISHED, 0.0),
        None,
    )
    .await;
}
