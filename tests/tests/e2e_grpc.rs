//! gRPC frontend end to end with the generated ProxyService stub: dial, DATA both ways, close.

use std::time::Duration;

use spoke_proto::packet::Payload;
use spoke_proto::PacketType;
use spoke_tests::backends;
use spoke_tests::cluster::{wait_tables_empty, Env, Mode, Server, ServerOpts, Transport};
use spoke_tests::data::Pattern;
use spoke_tests::grpc;
use spoke_tests::metrics::names;
use tonic::transport::Channel;

/// Chunk sizes sent as separate DATA packets (the last one is above gRPC's 4 MiB default limit on
/// purpose: the reference asks servers and agents to accept larger messages).
const CHUNKS: [usize; 5] = [1, 4096, 65_537, 1 << 20, (4 << 20) + 1];

/// Dials the echo backend, sends `CHUNKS`, checks the echo byte for byte, checks the server
/// counts the connection as established, closes, and expects CLOSE_RSP for it.
async fn dial_echo_close(server: &Server, channel: Channel) {
    let echo = backends::echo().await;
    let random = grpc::random_id();
    let (mut stream, rsp) = grpc::dial(channel, &echo.target(), random)
        .await
        .expect("dial");
    assert!(rsp.error.is_empty(), "dial failed: {rsp:?}");
    assert_eq!(rsp.random, random, "DIAL_RSP must echo the dial's random");
    assert_ne!(rsp.connect_id, 0, "DIAL_RSP without connectID");
    let id = rsp.connect_id;

    let mut sent = Vec::new();
    let mut pattern = Pattern::new(random as u64);
    for n in CHUNKS {
        let mut chunk = vec![0u8; n];
        pattern.fill(&mut chunk);
        sent.extend_from_slice(&chunk);
        stream.send(grpc::data(id, chunk)).await.expect("send DATA");
    }
    let mut got = Vec::with_capacity(sent.len());
    while got.len() < sent.len() {
        let p = stream
            .recv(Duration::from_secs(20))
            .await
            .expect("echo DATA")
            .expect("stream ended before the echo");
        match p.payload {
            Some(Payload::Data(d)) => {
                assert_eq!(d.connect_id, id, "DATA for a foreign connectID");
                got.extend_from_slice(&d.data);
            }
            other => panic!("expected DATA, got type {} {other:?}", p.r#type),
        }
    }
    assert!(
        got == sent,
        "echo differs from what was sent ({} bytes)",
        sent.len()
    );

    let m = server.metrics().await.expect("server metrics");
    assert_eq!(
        m.get(names::SERVER_ESTABLISHED),
        Some(1.0),
        "open connection must be in the server's table"
    );

    stream
        .send(grpc::close_request(id))
        .await
        .expect("send CLOSE_REQ");
    let close = stream
        .recv_until(PacketType::CloseRsp, Duration::from_secs(10), |p| {
            assert_eq!(grpc::kind(p), Ok(PacketType::Data), "unexpected {p:?}")
        })
        .await
        .expect("CLOSE_RSP");
    match close.payload {
        Some(Payload::CloseResponse(c)) => {
            assert_eq!(c.connect_id, id, "CLOSE_RSP for the wrong connection");
            assert!(c.error.is_empty(), "CLOSE_RSP error: {}", c.error);
        }
        other => panic!("CLOSE_RSP without closeResponse: {other:?}"),
    }
    spoke_tests::wait::poll_until(
        "echo backend to see its socket closed by the agent",
        Duration::from_secs(10),
        || async {
            let (accepted, completed, failed) = echo.stats.snapshot();
            if (accepted, completed + failed) == (1, 1) {
                Ok(())
            } else {
                Err(format!(
                    "(accepted, completed, failed)={:?}",
                    echo.stats.snapshot()
                ))
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_uds_dial_data_close_leaves_tables_empty() {
    let env = Env::new("grpc_uds");
    let (server, agent) = env
        .pair(ServerOpts::new(Mode::Grpc, Transport::Uds), |a| a)
        .await;
    let channel = grpc::uds_channel(&server.uds_path())
        .await
        .expect("channel");
    dial_echo_close(&server, channel).await;
    wait_tables_empty(&server, &[&agent]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_mtls_tcp_dial_data_close_leaves_tables_empty() {
    let env = Env::new("grpc_tls");
    let (server, agent) = env
        .pair(ServerOpts::new(Mode::Grpc, Transport::Tls), |a| a)
        .await;
    let config = env.tls_client(Some(&env.pki.main.frontend), &[b"h2"]);
    let channel = grpc::tls_channel(server.tcp.unwrap(), config)
        .await
        .expect("channel");
    dial_echo_close(&server, channel).await;
    wait_tables_empty(&server, &[&agent]).await;
}

#[tokio::test]
async fn grpc_dial_to_closed_port_reports_connection_refused() {
    let env = Env::new("grpc_refused");
    let (server, agent) = env
        .pair(ServerOpts::new(Mode::Grpc, Transport::Uds), |a| a)
        .await;
    let (_reserved, closed) = backends::refusing_port();
    let channel = grpc::uds_channel(&server.uds_path())
        .await
        .expect("channel");
    let random = grpc::random_id();
    let (_stream, rsp) = grpc::dial(channel, &closed.to_string(), random)
        .await
        .expect("DIAL_RSP");
    assert!(
        rsp.error.contains("connection refused"),
        "DIAL_RSP error must contain \"connection refused\": {rsp:?}"
    );
    assert_eq!(rsp.connect_id, 0, "failed dial must not carry a connectID");
    assert_eq!(rsp.random, random);
    wait_tables_empty(&server, &[&agent]).await;
    let m = server.metrics().await.expect("metrics");
    assert!(
        m.counter(names::SERVER_DIAL_FAILURES, &[("reason", "error_response")]) >= 1.0,
        "dial_failure_count{{reason=error_response}} not counted; present: {:?}",
        m.names()
    );
}
