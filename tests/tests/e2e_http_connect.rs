//! HTTP CONNECT frontend end to end: curl over mTLS TCP and over the Unix socket, the exact
//! CONNECT answer, 405 for other methods, 500 without agents.

use std::time::Duration;

use spoke_tests::backends::{self, PatternRequest};
use spoke_tests::cluster::{wait_tables_empty, Env, Mode, ServerOpts, Transport};
use spoke_tests::connect;
use spoke_tests::curl::{self, CurlProxy};
use spoke_tests::forwarder::Forwarder;
use spoke_tests::metrics::names;
use spoke_tests::wait::within;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIG: u64 = 256 << 20;

fn bytes_url(backend: &backends::Backend, len: u64, seed: u64) -> String {
    format!("http://{}/bytes/{len}?seed={seed}", backend.addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_over_mtls_tcp_frontend_downloads_256_mib_intact() {
    let env = Env::new("curl_tls_256m");
    let (server, agent) = env
        .pair(ServerOpts::new(Mode::HttpConnect, Transport::Tls), |a| a)
        .await;
    let backend = backends::http().await;
    let proxy = CurlProxy::Tls(
        server.tcp.unwrap(),
        &env.pki.main,
        Some(&env.pki.main.frontend),
    );
    let seed = 0x50b3_2561;
    within(
        "curl download of 256 MiB",
        Duration::from_secs(150),
        curl::download_verified(&proxy, &bytes_url(&backend, BIG, seed), seed, BIG),
    )
    .await
    .expect("256 MiB through the mTLS HTTP CONNECT frontend");
    assert_eq!(
        backend.stats.settled(1, Duration::from_secs(10)).await,
        (1, 1, 0),
        "backend (accepted, completed, failed)"
    );
    wait_tables_empty(&server, &[&agent]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_over_uds_frontend_downloads_256_mib_intact() {
    let env = Env::new("curl_uds_256m");
    let (server, agent) = env
        .pair(ServerOpts::new(Mode::HttpConnect, Transport::Uds), |a| a)
        .await;
    let backend = backends::http().await;
    // curl ignores -x when --unix-socket is given (it would send a plain GET to the socket), so
    // it talks to a TCP relay whose only way out is the server's Unix socket.
    let relay = Forwarder::to_uds(server.uds_path()).await;
    let seed = 0xdead_beef;
    within(
        "curl download of 256 MiB",
        Duration::from_secs(150),
        curl::download_verified(
            &CurlProxy::Plain(relay.addr),
            &bytes_url(&backend, BIG, seed),
            seed,
            BIG,
        ),
    )
    .await
    .expect("256 MiB through the UDS HTTP CONNECT frontend");
    assert_eq!(
        relay.accepted.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "curl must have gone through the relay to the socket"
    );
    assert_eq!(
        backend.stats.settled(1, Duration::from_secs(10)).await,
        (1, 1, 0),
        "backend (accepted, completed, failed)"
    );
    wait_tables_empty(&server, &[&agent]).await;
}

#[tokio::test]
async fn raw_connect_over_uds_gets_exact_200_and_duplex_data() {
    let env = Env::new("raw_connect");
    let (server, agent) = env
        .pair(ServerOpts::new(Mode::HttpConnect, Transport::Uds), |a| a)
        .await;
    let backend = backends::pattern().await;
    let (reply, mut io) = connect::connect(&server.frontend, &backend.target())
        .await
        .expect("CONNECT");
    assert_eq!(
        reply.head, "HTTP/1.1 200 Connection Established",
        "CONNECT answer must be exactly the status line + blank line"
    );
    // The pattern backend speaks only after our header: anything readable now was sent by the proxy.
    let mut early = [0u8; 64];
    match tokio::time::timeout(Duration::from_millis(300), io.read(&mut early)).await {
        Err(_) => {}
        Ok(r) => panic!(
            "bytes/EOF right after the 200 before any tunnel traffic: {r:?} {:?}",
            &early[..8]
        ),
    }
    let req = PatternRequest {
        down_len: 3 << 20,
        down_seed: 11,
        up_len: 5 << 20,
        up_seed: 12,
    };
    within("duplex exchange", Duration::from_secs(30), req.run(io))
        .await
        .expect("duplex payloads intact");
    assert_eq!(
        backend.stats.snapshot(),
        (1, 1, 0),
        "backend verified the upload: (accepted, completed, failed)"
    );
    wait_tables_empty(&server, &[&agent]).await;
}

#[tokio::test]
async fn non_connect_method_is_405() {
    let env = Env::new("method_405");
    let server = env
        .server(ServerOpts::new(Mode::HttpConnect, Transport::Uds))
        .await;
    let mut io = server.frontend.open().await.expect("open UDS");
    io.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let head = within(
        "405 answer",
        Duration::from_secs(10),
        connect::read_head(&mut io),
    )
    .await
    .expect("response");
    assert!(
        head.starts_with("HTTP/1.1 405"),
        "expected 405, got {head:?}"
    );
}

#[tokio::test]
async fn connect_without_agent_is_500() {
    let env = Env::new("no_agent_500");
    let server = env
        .server(ServerOpts::new(Mode::HttpConnect, Transport::Uds))
        .await;
    let backend = backends::echo().await;
    let (reply, _) = connect::connect(&server.frontend, &backend.target())
        .await
        .expect("CONNECT");
    assert_eq!(
        reply.status, 500,
        "no agent connected: {} / {}",
        reply.head, reply.body
    );
    assert_eq!(
        backend.stats.snapshot().0,
        0,
        "nothing may reach the destination"
    );
    let m = server.metrics().await.expect("metrics");
    assert!(
        m.counter(names::SERVER_DIAL_FAILURES, &[("reason", "no_agent")]) >= 1.0,
        "dial_failure_count{{reason=no_agent}} not counted; present: {:?}",
        m.names()
    );
}
