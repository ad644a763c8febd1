//! Hostile input on every listening port: the offending connection is closed, everyone else keeps
//! being served, and the processes stay alive.

use std::time::Duration;

use futures::future::join_all;
use spoke_proto::packet::Payload;
use spoke_proto::PacketType;
use spoke_tests::backends;
use spoke_tests::cluster::{
    gauge, wait_tables_empty, Agent, Env, Mode, Server, ServerOpts, Transport,
};
use spoke_tests::connect;
use spoke_tests::garbage::{closed_within, expect_rejected, random_bytes};
use spoke_tests::grpc::{self, PacketStream};
use spoke_tests::metrics::names;
use spoke_tests::{tls, BoxIo};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpStream, UnixStream};

const JUNK: usize = 64 * 1024;
const REJECT_WITHIN: Duration = Duration::from_secs(10);
const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
const TLS_ERRORS: &str = "spoke_server_tls_connection_errors_total";

async fn tcp(addr: std::net::SocketAddr) -> BoxIo {
    Box::new(TcpStream::connect(addr).await.expect("connect"))
}

/// Sends junk on every stream concurrently with `probe` (a normal dial); all junk connections must
/// be closed by the peer and the probe must succeed.
async fn junk_while_serving(
    conns: Vec<(&str, BoxIo)>,
    probe: impl std::future::Future<Output = anyhow::Result<()>>,
) {
    let junk = random_bytes(JUNK);
    let rejections = join_all(conns.into_iter().map(|(what, io)| {
        let junk = junk.clone();
        async move { (what, expect_rejected(io, &junk, REJECT_WITHIN).await) }
    }));
    let (results, probed) = tokio::join!(rejections, probe);
    probed.expect("normal dial while junk was being sent");
    for (what, r) in results {
        r.unwrap_or_else(|e| panic!("junk on {what}: connection not closed: {e}"));
    }
}

fn assert_alive(server: &mut Server, agent: &mut Agent) {
    server.proc.assert_running();
    agent.proc.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_on_agent_health_and_admin_ports_is_dropped() {
    let env = Env::new("junk_agent_port");
    let (mut server, mut agent) = env
        .pair(ServerOpts::new(Mode::Grpc, Transport::Uds), |a| a)
        .await;
    let echo = backends::echo().await;
    let uds = server.uds_path();
    let agent_tls = tls::connect(
        server.agent_addr,
        env.tls_client(Some(&env.pki.main.agent), &[b"h2"]),
    )
    .await
    .expect("TLS to agent port");
    // Junk under TLS: a valid handshake, then bytes that are no TLS record at all.
    let under_tls = tls::connect(
        server.agent_addr,
        env.tls_client(Some(&env.pki.main.agent), &[b"h2"]),
    )
    .await
    .expect("TLS to agent port")
    .into_inner()
    .0;
    // A half-sent request on the health port stays open meanwhile (its timeout is long).
    let mut held = TcpStream::connect(server.health_addr).await.unwrap();
    held.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let conns = vec![
        ("agent port, raw TCP", tcp(server.agent_addr).await),
        ("server admin port", tcp(server.admin_addr).await),
        ("agent admin port", tcp(agent.admin_addr).await),
        (
            "agent port, after a valid mTLS handshake",
            Box::new(agent_tls) as BoxIo,
        ),
        (
            "agent port, junk records after a valid mTLS handshake",
            Box::new(under_tls) as BoxIo,
        ),
        ("server health port", tcp(server.health_addr).await),
        ("agent health port", tcp(agent.health_addr).await),
    ];
    junk_while_serving(conns, grpc::uds_echo_roundtrip(&uds, &echo.target())).await;
    grpc::uds_echo_roundtrip(&uds, &echo.target())
        .await
        .expect("normal dial after the junk");
    let errors = server.metrics().await.unwrap().counter(TLS_ERRORS, &[]);
    assert!(errors >= 1.0, "{TLS_ERRORS} = {errors} after junk records");
    let m = agent.metrics().await.unwrap();
    assert_eq!(
        gauge(&m, names::AGENT_OPEN_SERVERS),
        Ok(1.0),
        "the agent's real tunnel must be unaffected"
    );
    drop(held);
    assert_alive(&mut server, &mut agent);
    wait_tables_empty(&server, &[&agent]).await;
}

async fn http_connect_frontend_junk(transport: Transport, name: &str) {
    let env = Env::new(name);
    let opts = ServerOpts::new(Mode::HttpConnect, transport).arg(&format!(
        "--frontend-header-timeout={}s",
        HEADER_TIMEOUT.as_secs()
    ));
    let (mut server, mut agent) = env.pair(opts, |a| a).await;
    let echo = backends::echo().await;
    let frontend = server.frontend.clone();

    let mut conns = vec![("frontend", frontend.open().await.unwrap())];
    if let Some(addr) = server.tcp {
        conns.push(("TLS frontend, raw TCP without TLS", tcp(addr).await));
    }
    junk_while_serving(conns, connect::echo_roundtrip(&frontend, &echo.target())).await;

    // A request header that never completes is cut off by --frontend-header-timeout, and does not
    // stop others from being served meanwhile.
    let mut slow = frontend.open().await.unwrap();
    let target = echo.target();
    slow.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n").as_bytes())
        .await
        .unwrap();
    let (closed, probe) = tokio::join!(
        closed_within(&mut slow, HEADER_TIMEOUT * 4),
        connect::echo_roundtrip(&frontend, &target)
    );
    probe.expect("normal dial while a half-sent request is held open");
    let closed =
        closed.expect("half-sent request header must be closed after --frontend-header-timeout");
    assert!(
        closed >= HEADER_TIMEOUT - Duration::from_millis(500),
        "closed after {closed:?}: before the header timeout {HEADER_TIMEOUT:?}"
    );

    connect::echo_roundtrip(&frontend, &target)
        .await
        .expect("normal dial after the junk");
    assert_eq!(
        echo.stats.snapshot().0,
        3,
        "only the three good dials reach the destination"
    );
    assert_alive(&mut server, &mut agent);
    wait_tables_empty(&server, &[&agent]).await;
}

#[tokio::test]
async fn junk_and_slow_headers_on_tls_http_connect_frontend() {
    http_connect_frontend_junk(Transport::Tls, "junk_tls_front").await;
}

#[tokio::test]
async fn junk_and_slow_headers_on_uds_http_connect_frontend() {
    http_connect_frontend_junk(Transport::Uds, "junk_uds_front").await;
}

/// Receives until CLOSE_RSP, a clean end or an error status; anything else (or silence) fails.
async fn expect_closed_stream(stream: &mut PacketStream, what: &str) {
    loop {
        match stream.recv(REJECT_WITHIN).await {
            Ok(None) => return,
            Ok(Some(p)) if grpc::kind(&p) == Ok(PacketType::CloseRsp) => return,
            Ok(Some(p)) => println!("{what}: ignoring {:?}", grpc::kind(&p)),
            Err(e) if e.to_string().starts_with("no packet within") => {
                panic!("{what}: stream neither closed nor answered: {e}")
            }
            Err(e) => {
                println!("{what}: stream ended: {e:#}");
                return;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_frontend_survives_junk_oversize_messages_and_unknown_ids() {
    let env = Env::new("junk_grpc_front");
    let opts = ServerOpts::new(Mode::Grpc, Transport::Uds).arg("--max-grpc-message-size=1048576");
    let (mut server, mut agent) = env.pair(opts, |a| a).await;
    let echo = backends::echo().await;
    let uds = server.uds_path();
    let target = echo.target();

    let raw: BoxIo = Box::new(UnixStream::connect(&uds).await.unwrap());
    junk_while_serving(
        vec![("gRPC UDS frontend", raw)],
        grpc::uds_echo_roundtrip(&uds, &target),
    )
    .await;

    // 2 MiB DATA > --max-grpc-message-size: that stream (and its tunnel) is closed.
    let (mut big, rsp) = grpc::dial(
        grpc::uds_channel(&uds).await.unwrap(),
        &target,
        grpc::random_id(),
    )
    .await
    .expect("dial");
    assert!(rsp.error.is_empty(), "{rsp:?}");
    big.send(grpc::data(rsp.connect_id, vec![7u8; 2 << 20]))
        .await
        .unwrap();
    let (_, probe) = tokio::join!(
        expect_closed_stream(&mut big, "oversize DATA"),
        grpc::uds_echo_roundtrip(&uds, &target)
    );
    probe.expect("normal dial while an oversize message is rejected");
    wait_tables_empty(&server, &[&agent]).await;

    // DATA for a connection id nobody dialled.
    match PacketStream::proxy(
        grpc::uds_channel(&uds).await.unwrap(),
        vec![grpc::data(987_654, &b"stray"[..])],
    )
    .await
    {
        Ok(mut stray) => expect_closed_stream(&mut stray, "DATA for unknown connectID").await,
        Err(e) => println!("stream with stray DATA refused outright: {e:#}"),
    }

    grpc::uds_echo_roundtrip(&uds, &target)
        .await
        .expect("normal dial after the junk");
    assert_alive(&mut server, &mut agent);
    wait_tables_empty(&server, &[&agent]).await;
}

/// A server (gRPC over UDS, `extra` flags), the real agent claiming 127.0.0.1 (destHost first,
/// so dials there never go to the fake one), an echo backend, and a second agent stream
/// opened by the test itself with the real agent certificate.
async fn with_fake_agent(
    env: &Env,
    extra: &[&str],
) -> (Server, Agent, backends::Backend, PacketStream) {
    let mut opts =
        ServerOpts::new(Mode::Grpc, Transport::Uds).arg("--proxy-strategies=destHost,default");
    for a in extra {
        opts = opts.arg(a);
    }
    let (server, agent) = env
        .pair(opts, |a| a.arg("--agent-identifiers=ipv4=127.0.0.1"))
        .await;
    let echo = backends::echo().await;
    let channel = grpc::tls_channel(
        server.agent_addr,
        env.tls_client(Some(&env.pki.main.agent), &[b"h2"]),
    )
    .await
    .expect("agent channel");
    let fake = PacketStream::agent(channel, "fake-agent", "")
        .await
        .expect("Connect as a fake agent");
    (server, agent, echo, fake)
}

#[tokio::test]
async fn fake_agent_data_for_unknown_connection_gets_close_req() {
    let env = Env::new("fake_agent");
    let (mut server, mut agent, echo, mut fake) = with_fake_agent(&env, &[]).await;
    let (uds, target) = (server.uds_path(), echo.target());
    let server_id = fake
        .headers
        .get("serverid")
        .map(|v| v.to_str().unwrap_or_default().to_string());
    assert_eq!(
        server_id.as_deref(),
        Some(server.id.as_str()),
        "serverID response header"
    );

    const STRAY: i64 = 424_242;
    fake.send(grpc::data(STRAY, &b"stray"[..])).await.unwrap();
    let (close, probe) = tokio::join!(
        fake.recv_until(PacketType::CloseReq, REJECT_WITHIN, |p| println!(
            "fake agent ignoring {:?}",
            grpc::kind(p)
        )),
        grpc::uds_echo_roundtrip(&uds, &target)
    );
    probe.expect("normal dial while the fake agent misbehaves");
    match close
        .expect("server must answer DATA for an unknown connection with CLOSE_REQ")
        .payload
    {
        Some(Payload::CloseRequest(c)) => {
            assert_eq!(c.connect_id, STRAY, "CLOSE_REQ for the wrong id")
        }
        other => panic!("CLOSE_REQ without closeRequest payload: {other:?}"),
    }
    drop(fake);
    grpc::uds_echo_roundtrip(&uds, &echo.target())
        .await
        .expect("normal dial after the fake agent left");
    assert_alive(&mut server, &mut agent);
    wait_tables_empty(&server, &[&agent]).await;
}

#[tokio::test]
async fn oversize_message_from_an_agent_closes_only_that_agent_stream() {
    let env = Env::new("fake_agent_big");
    let (mut server, mut agent, echo, mut fake) =
        with_fake_agent(&env, &["--max-grpc-message-size=1048576"]).await;
    let (uds, target) = (server.uds_path(), echo.target());
    // 2 MiB in one message, over the server's 1 MiB limit.
    fake.send(grpc::data(7, vec![0u8; 2 << 20])).await.unwrap();
    let (ended, probe) = tokio::join!(
        async {
            loop {
                match fake.recv(REJECT_WITHIN).await {
                    Ok(Some(p)) => println!("fake agent ignoring {:?}", grpc::kind(&p)),
                    Ok(None) => return Ok("stream ended".to_string()),
                    Err(e) => return Err(format!("{e:#}")),
                }
            }
        },
        grpc::uds_echo_roundtrip(&uds, &target)
    );
    probe.expect("normal dial while the oversize message is refused");
    // Either a clean end or a gRPC error status; a timeout means the server kept the stream.
    match ended {
        Ok(how) => println!("oversize agent stream: {how}"),
        Err(e) => assert!(
            !e.contains("no packet within"),
            "server kept the stream of an agent that sent an oversize message: {e}"
        ),
    }
    grpc::uds_echo_roundtrip(&uds, &target)
        .await
        .expect("normal dial after the oversize message");
    assert_alive(&mut server, &mut agent);
    wait_tables_empty(&server, &[&agent]).await;
}
