//! Conformance against clients Spoke did not write: their bytes, replayed exactly, against a real
//! spoke-server (and spoke-agent), plus a real grpc-go client run end to end.
//!
//! [`ROWS`] is the table. Each row names the client and its version, where its bytes come from,
//! the port it talks to and the script. Client bytes live in `tests/fixtures/real-clients/`
//! (provenance in `tests/real-clients/README.md`): first flights encoded by the real encoder
//! (golang.org/x/net/http2 + hpack, what grpc-go uses) and captures of a real grpc-go client. The
//! next client quirk found is one more row (and, for HTTP/2, one more fixture).
//!
//! Replay rules for HTTP/2 scripts: every unit of the fixture is sent as it is, except
//! - a SETTINGS ACK marks where the client waited for the server's SETTINGS (the connection
//!   driver sends that same ACK when they arrive), and PING ACKs are answered live, because
//!   their timing and payloads belong to the server;
//! - a gRPC message keeps its bytes except the values only a live run knows (dial address,
//!   connectID), after checking that prost re-encodes the client's message byte for byte.
//!
//! After each message the script waits for what the client waits for: DIAL_REQ → DIAL_RSP,
//! DATA → the echo, CLOSE_REQ → CLOSE_RSP.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use prost::Message;
use spoke_proto::packet::Payload;
use spoke_proto::{CloseResponse, Data, DialResponse, Packet, PacketType};
use spoke_tests::cluster::{wait_tables_empty, Env, Mode, ServerOpts, Transport};
use spoke_tests::h2wire::{
    self, decode_blocks, flag, grpc_message, kind, load_fixture, packet_of, values, Event, Frame,
    H2Conn, Unit,
};
use spoke_tests::{backends, connect, goclient, grpc, BoxIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use Source::{Captured, Encoded, Literal};

/// Where a row's client bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// Captured from a real run of the client (`goclient capture`).
    Captured,
    /// The client's header list encoded by the real encoder (`goclient first-flights`).
    Encoded,
    /// Written by the client's source code literally (a format string), copied as text.
    Literal,
}

/// The port a row's client talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Port {
    /// The frontend kube-apiserver uses.
    Frontend(Mode, Transport),
    /// The agent port (always mTLS gRPC).
    Agent,
}

/// What the client does.
#[derive(Debug, Clone, Copy)]
enum Script {
    /// `/ProxyService/Proxy`: the fixture's units, then (unless the fixture has its own)
    /// konnectivity-client's DIAL_REQ, DATA and CLOSE_REQ. `authority` is what the fixture's
    /// header block must carry (`None`: no `:authority` at all).
    Proxy {
        fixture: &'static str,
        authority: Option<&'static str>,
    },
    /// `/AgentService/Connect` from an upstream proxy-agent, which then serves one dial.
    AgentConnect {
        fixture: &'static str,
        authority: &'static str,
    },
    /// An HTTP CONNECT head (`{target}` replaced), then TLS to a kubelet-like backend.
    HttpConnect { head: fn(&str) -> String },
}

#[derive(Debug, Clone, Copy)]
struct Row {
    client: &'static str,
    version: &'static str,
    source: Source,
    port: Port,
    script: Script,
}

const KUBE_SOCKET: &str = "/etc/kubernetes/konnectivity-server/konnectivity-server.socket";
const ENCODED_KUBE_SOCKET: &str =
    "%2Fetc%2Fkubernetes%2Fkonnectivity-server%2Fkonnectivity-server.socket";
const UDS: Port = Port::Frontend(Mode::Grpc, Transport::Uds);
const TLS: Port = Port::Frontend(Mode::Grpc, Transport::Tls);

const fn proxy(
    client: &'static str,
    version: &'static str,
    source: Source,
    port: Port,
    fixture: &'static str,
    authority: Option<&'static str>,
) -> Row {
    Row {
        client,
        version,
        source,
        port,
        script: Script::Proxy { fixture, authority },
    }
}

/// The table. Proxy rows: client, version, source, port, fixture, the `:authority` it carries.
#[rustfmt::skip]
const ROWS: &[Row] = &[
    // grpc-go 1.54 = kube-apiserver 1.28: :authority is the socket path as it is.
    proxy("kube-apiserver 1.28 (konnectivity-client)", "grpc-go 1.54.0", Encoded, UDS, "grpc-go-1.54-raw-path-h2c.h2", Some(KUBE_SOCKET)),
    proxy("kube-apiserver 1.28 (konnectivity-client)", "grpc-go 1.54.0", Encoded, TLS, "grpc-go-1.54-raw-path-tls.h2", Some(KUBE_SOCKET)),
    // The same calls from a real client (Debian's grpc-go), one whole tunnel captured.
    proxy("goclient (konnectivity-client calls), socket path target", "grpc-go 1.33.3", Captured, UDS, "grpc-go-1.33.3-raw-path-captured.h2", Some(KUBE_SOCKET)),
    // Newer grpc-go percent-encodes the path.
    proxy("ANP v0.36 test-client, --proxy-uds", "grpc-go 1.81.1", Encoded, UDS, "grpc-go-1.81-percent-path-h2c.h2", Some("%2Ftmp%2Fdbg%2Frec.sock")),
    proxy("ANP v0.36 test-client, --proxy-uds", "grpc-go 1.81.1", Encoded, TLS, "grpc-go-1.81-percent-path-tls.h2", Some("%2Ftmp%2Fdbg%2Frec.sock")),
    // konnectivity-client master reuses one connection, a stream per dial: the second request's
    // header block refers to the HPACK dynamic table the first one filled (authority included).
    proxy("konnectivity-client master CreateGRPCTunnel", "grpc-go 1.80.0", Encoded, UDS, "grpc-go-1.80-percent-path-two-streams-h2c.h2", Some(ENCODED_KUBE_SOCKET)),
    proxy("goclient -tunnels 2, socket path target", "grpc-go 1.33.3", Captured, UDS, "grpc-go-1.33.3-raw-path-two-streams-captured.h2", Some(KUBE_SOCKET)),
    // A unix: target gives localhost.
    proxy("grpc-go client, unix:///path target", "grpc-go 1.54.0", Encoded, UDS, "grpc-go-1.54-unix-localhost-h2c.h2", Some("localhost")),
    proxy("grpc-go client, unix:///path target", "grpc-go 1.54.0", Encoded, TLS, "grpc-go-1.54-unix-localhost-tls.h2", Some("localhost")),
    proxy("goclient, unix:///path target", "grpc-go 1.33.3", Captured, UDS, "grpc-go-1.33.3-unix-localhost-captured.h2", Some("localhost")),
    // An empty endpoint (passthrough:/// and a custom dialer) gives an empty :authority.
    proxy("grpc-go client, passthrough:/// target", "grpc-go 1.54.0", Encoded, UDS, "grpc-go-1.54-empty-authority-h2c.h2", Some("")),
    proxy("grpc-go client, passthrough:/// target", "grpc-go 1.54.0", Encoded, TLS, "grpc-go-1.54-empty-authority-tls.h2", Some("")),
    proxy("goclient, passthrough:/// target", "grpc-go 1.33.3", Captured, UDS, "grpc-go-1.33.3-empty-authority-captured.h2", Some("")),
    // :authority is optional in HTTP/2 (RFC 9113 8.3.1).
    proxy("grpc-go header list without :authority", "grpc-go 1.54.0", Encoded, UDS, "grpc-go-1.54-no-authority-h2c.h2", None),
    proxy("grpc-go header list without :authority", "grpc-go 1.54.0", Encoded, TLS, "grpc-go-1.54-no-authority-tls.h2", None),
    // kube-apiserver's HTTP CONNECT egress, then TLS to the kubelet through the tunnel.
    Row {
        client: "kube-apiserver (egress selector, HTTPConnect)", version: "1.28", source: Literal,
        port: Port::Frontend(Mode::HttpConnect, Transport::Uds),
        script: Script::HttpConnect { head: connect::kube_apiserver_head },
    },
    Row {
        client: "kube-apiserver (egress selector, HTTPConnect)", version: "1.28", source: Literal,
        port: Port::Frontend(Mode::HttpConnect, Transport::Tls),
        script: Script::HttpConnect { head: connect::kube_apiserver_head },
    },
    // Upstream's agent on the agent port; it then serves one dial.
    Row {
        client: "ANP v0.36.0 proxy-agent, --agent-cert", version: "grpc-go 1.81.1", source: Encoded,
        port: Port::Agent,
        script: Script::AgentConnect { fixture: "anp-0.36-agent-connect-cert.h2", authority: "127.0.0.1" },
    },
    Row {
        client: "ANP v0.36.0 proxy-agent, token mode", version: "grpc-go 1.81.1", source: Encoded,
        port: Port::Agent,
        script: Script::AgentConnect { fixture: "anp-0.36-agent-connect-token.h2", authority: "127.0.0.1:8091" },
    },
];

/// How long a row may wait for any one answer.
const ANSWER: Duration = Duration::from_secs(15);

/// What goes through the tunnels.
const PAYLOAD: &[u8] = b"spoke conformance payload";

impl Row {
    fn describe(&self) -> String {
        let port = match self.port {
            Port::Frontend(Mode::Grpc, t) => format!("gRPC frontend over {t:?}"),
            Port::Frontend(Mode::HttpConnect, t) => format!("CONNECT frontend over {t:?}"),
            Port::Agent => "agent port (mTLS)".to_string(),
        };
        let script = match self.script {
            Script::Proxy { fixture, .. } | Script::AgentConnect { fixture, .. } => fixture,
            Script::HttpConnect { .. } => "CONNECT head",
        };
        format!(
            "{} [{}] {:?} | {port} | {script}",
            self.client, self.version, self.source
        )
    }
}

/// Runs every row (a few at a time), prints the outcome table and fails with the rows that
/// failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_client_bytes_are_served() {
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(3));
    let mut tasks = Vec::new();
    for (i, row) in ROWS.iter().copied().enumerate() {
        let permits = permits.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = permits.acquire_owned().await.expect("semaphore");
            run_row(i, row).await;
        }));
    }
    let mut failed = Vec::new();
    let mut table = String::from("\nconformance rows:\n");
    for (i, task) in tasks.into_iter().enumerate() {
        let outcome = match task.await {
            Ok(()) => "pass".to_string(),
            Err(e) => {
                let why = panic_text(e);
                failed.push(format!("row {i}: {}: {why}", ROWS[i].describe()));
                format!("FAIL: {why}")
            }
        };
        table.push_str(&format!("  {i:2} {} => {outcome}\n", ROWS[i].describe()));
    }
    println!("{table}");
    assert!(
        failed.is_empty(),
        "{} of {} rows failed:\n{}",
        failed.len(),
        ROWS.len(),
        failed.join("\n")
    );
}

fn panic_text(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(p) => p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panicked".into()),
        Err(e) => format!("task failed: {e}"),
    }
}

/// One row; panics (while its processes are alive, so their logs are printed) on failure.
async fn run_row(i: usize, row: Row) {
    let env = Env::new(&format!("conformance{i}"));
    match (row.script, row.port) {
        (Script::Proxy { fixture, authority }, Port::Frontend(Mode::Grpc, transport)) => {
            proxy_row(&env, fixture, authority, transport).await
        }
        (Script::HttpConnect { head }, Port::Frontend(Mode::HttpConnect, transport)) => {
            http_connect_row(&env, head, transport).await
        }
        (Script::AgentConnect { fixture, authority }, Port::Agent) => {
            agent_connect_row(&env, fixture, authority).await
        }
        (script, port) => panic!("row {i}: script {script:?} does not go with port {port:?}"),
    }
}

fn fail_on(outcome: anyhow::Result<()>) {
    if let Err(e) = outcome {
        panic!("{e:#}");
    }
}

/// Loads a fixture and checks that its header blocks are the requests the row says they are:
/// HEADERS with END_HEADERS only, `path`, and `authority` (`None`: no `:authority`).
fn fixture_for(name: &str, path: &str, authority: Option<&str>) -> Vec<Unit> {
    let units = load_fixture(name).expect("fixture");
    let headers: Vec<&Frame> = units
        .iter()
        .filter_map(|u| match u {
            Unit::Frame(f) if f.kind == kind::HEADERS => Some(f),
            _ => None,
        })
        .collect();
    assert!(!headers.is_empty(), "{name}: no HEADERS frame");
    for h in &headers {
        assert_eq!(
            h.flags & (flag::END_HEADERS | flag::END_STREAM | flag::PADDED | flag::PRIORITY),
            flag::END_HEADERS,
            "{name}: a gRPC client's request HEADERS carry END_HEADERS only"
        );
    }
    let blocks = decode_blocks(headers.iter().map(|h| &h.payload[..]))
        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
    let want: Vec<&str> = authority.into_iter().collect();
    for fields in &blocks {
        assert_eq!(values(fields, ":path"), [path], "{name}: {fields:?}");
        assert_eq!(
            values(fields, ":authority"),
            want,
            "{name}: the fixture's :authority is not the row's"
        );
    }
    units
}

async fn frontend_io(env: &Env, server: &spoke_tests::cluster::Server, t: Transport) -> BoxIo {
    match t {
        Transport::Uds => Box::new(
            tokio::net::UnixStream::connect(server.uds_path())
                .await
                .expect("connect to the frontend socket"),
        ),
        Transport::Tls => {
            let config = env.tls_client(Some(&env.pki.main.frontend), &[b"h2"]);
            let addr = server.tcp.expect("TLS frontend address");
            let tls = spoke_tests::tls::connect(addr, config)
                .await
                .expect("TLS to the frontend");
            assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]), "ALPN h2");
            Box::new(tls)
        }
    }
}

async fn proxy_row(env: &Env, fixture: &str, authority: Option<&str>, transport: Transport) {
    let units = fixture_for(fixture, "/ProxyService/Proxy", authority);
    let (server, agent) = env
        .pair(ServerOpts::new(Mode::Grpc, transport), |a| a)
        .await;
    let echo = backends::echo().await;
    let io = frontend_io(env, &server, transport).await;
    fail_on(replay_proxy(H2Conn::new(io), &units, &echo.target()).await);
    wait_tables_empty(&server, &[&agent]).await;
}

/// Replays a Proxy client (see the module comment) against the echo server `echo`. A first
/// flight (a fixture without gRPC messages) gets konnectivity-client's DIAL_REQ, DATA and
/// CLOSE_REQ on each stream right after that stream's HEADERS.
async fn replay_proxy(mut conn: H2Conn, units: &[Unit], echo: &str) -> anyhow::Result<()> {
    let is_message =
        |u: &Unit| matches!(u, Unit::Frame(f) if f.kind == kind::DATA && !f.payload.is_empty());
    let first_flight = !units.iter().any(is_message);
    let mut tunnels: HashMap<u32, Tunnel> = HashMap::new();
    let mut acks = 0;
    for unit in units {
        match unit {
            Unit::Frame(f) if f.kind == kind::SETTINGS && f.is_ack() => {
                acks += 1;
                conn.await_settings(acks, ANSWER).await?;
            }
            Unit::Frame(f) if f.kind == kind::PING && f.is_ack() => {}
            Unit::Frame(f) if is_message(unit) => {
                let tunnel = tunnels.entry(f.stream).or_default();
                tunnel.message(&mut conn, f, echo).await?;
            }
            Unit::Frame(f) if f.kind == kind::HEADERS => {
                conn.send_unit(unit).await?;
                let tunnel = tunnels.entry(f.stream).or_default();
                if first_flight {
                    for packet in [
                        grpc::dial_request(echo, grpc::random_id()),
                        grpc::data(0, Bytes::from_static(PAYLOAD)),
                        grpc::close_request(0),
                    ] {
                        let frame = data_frame(f.stream, &packet);
                        tunnel.message(&mut conn, &frame, echo).await?;
                    }
                }
            }
            _ => conn.send_unit(unit).await?,
        }
    }
    anyhow::ensure!(!tunnels.is_empty(), "the fixture opens no stream");
    for (stream, tunnel) in &tunnels {
        anyhow::ensure!(
            tunnel.closed,
            "the script never closed its tunnel on stream {stream}"
        );
    }
    Ok(())
}

fn data_frame(stream: u32, packet: &Packet) -> Frame {
    Frame {
        kind: kind::DATA,
        flags: 0,
        stream,
        payload: grpc_message(packet),
    }
}

/// The client's side of one tunnel.
#[derive(Debug, Default)]
struct Tunnel {
    messages: usize,
    connect_id: Option<i64>,
    closed: bool,
}

impl Tunnel {
    /// Sends the client's message in `frame` (live values filled in) and waits for its answer.
    async fn message(
        &mut self,
        conn: &mut H2Conn,
        frame: &Frame,
        echo: &str,
    ) -> anyhow::Result<()> {
        self.messages += 1;
        let mut packet = packet_of(&frame.payload).context("a client message")?;
        anyhow::ensure!(
            grpc_message(&packet) == frame.payload,
            "prost does not re-encode the client's message byte for byte: {packet:?}"
        );
        let stream = frame.stream;
        let what = grpc::kind(&packet).map_err(anyhow::Error::msg)?;
        let live_id = || {
            self.connect_id
                .context("no connectID yet (DIAL_RSP missing)")
        };
        match packet.payload.as_mut() {
            Some(Payload::DialRequest(d)) => d.address = echo.to_string(),
            Some(Payload::Data(d)) => d.connect_id = live_id()?,
            Some(Payload::CloseRequest(c)) => c.connect_id = live_id()?,
            _ => {}
        }
        let out = Frame {
            payload: grpc_message(&packet),
            ..frame.clone()
        };
        conn.send(&out.encode()).await?;
        match packet.payload {
            Some(Payload::DialRequest(d)) => {
                let p = expect_packet(conn, stream, PacketType::DialRsp).await?;
                let Some(Payload::DialResponse(r)) = p.payload else {
                    anyhow::bail!("DIAL_RSP without a dialResponse: {p:?}");
                };
                anyhow::ensure!(
                    r.error.is_empty() && r.connect_id != 0 && r.random == d.random,
                    "dial failed: {r:?} (random sent {})",
                    d.random
                );
                self.connect_id = Some(r.connect_id);
            }
            Some(Payload::Data(d)) => {
                let mut got = Vec::new();
                while got.len() < d.data.len() {
                    let p = expect_packet(conn, stream, PacketType::Data)
                        .await
                        .with_context(|| {
                            format!("after {} of {} echoed bytes", got.len(), d.data.len())
                        })?;
                    let Some(Payload::Data(back)) = p.payload else {
                        anyhow::bail!("DATA without data: {p:?}");
                    };
                    anyhow::ensure!(back.connect_id == d.connect_id, "echo on {back:?}");
                    got.extend_from_slice(&back.data);
                }
                anyhow::ensure!(got == d.data, "echo returned {got:?}");
            }
            Some(Payload::CloseRequest(c)) => {
                let p = expect_packet(conn, stream, PacketType::CloseRsp).await?;
                let Some(Payload::CloseResponse(r)) = p.payload else {
                    anyhow::bail!("CLOSE_RSP without a closeResponse: {p:?}");
                };
                anyhow::ensure!(
                    r.error.is_empty() && r.connect_id == c.connect_id,
                    "close failed: {r:?}"
                );
                self.closed = true;
            }
            _ => anyhow::bail!("the script sends {what:?}, which has no expected answer"),
        }
        Ok(())
    }
}

/// Waits for the next packet on `stream`, which must be `want`. Response headers are checked on
/// the way; trailers, resets, GOAWAY and a closed connection are failures.
async fn expect_packet(conn: &mut H2Conn, stream: u32, want: PacketType) -> anyhow::Result<Packet> {
    loop {
        let event = conn
            .next(ANSWER)
            .await
            .with_context(|| format!("waiting for {}", want.as_str_name()))?;
        match event {
            Event::Message { stream: s, body } if s == stream => {
                let p = Packet::decode(body).context("the server's message")?;
                anyhow::ensure!(
                    grpc::kind(&p) == Ok(want),
                    "expected {}, got {p:?}",
                    want.as_str_name()
                );
                return Ok(p);
            }
            Event::Headers {
                stream: s,
                ref fields,
                end_stream: false,
            } if s == stream => {
                anyhow::ensure!(
                    values(fields, ":status") == ["200"],
                    "response headers {fields:?}"
                );
            }
            Event::Headers {
                stream: s,
                ref fields,
                end_stream: true,
            } if s == stream => anyhow::bail!(
                "stream {s} ended while waiting for {}: grpc-status {:?} grpc-message {:?}",
                want.as_str_name(),
                values(fields, "grpc-status"),
                values(fields, "grpc-message")
            ),
            // An earlier tunnel on this connection winding down (its trailers, END_STREAM or
            // reset) does not concern this one.
            Event::Headers { stream: s, .. }
            | Event::EndStream { stream: s }
            | Event::Reset { stream: s, .. }
                if s != stream => {}
            other => anyhow::bail!("{other} while waiting for {}", want.as_str_name()),
        }
    }
}

async fn http_connect_row(env: &Env, head: fn(&str) -> String, transport: Transport) {
    let (server, agent) = env
        .pair(ServerOpts::new(Mode::HttpConnect, transport), |a| a)
        .await;
    // The kubelet stand-in presents the test CA's server certificate (SAN localhost).
    let kubelet = backends::tls_echo(&env.pki.main.server).await;
    let outcome = async {
        let io = server
            .frontend
            .open()
            .await
            .context("opening the frontend")?;
        let mut io = kube_connect(io, &head(&kubelet.target())).await?;
        let kubelet_tls = env.tls_client(None, &[]);
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let mut tls = tokio::time::timeout(
            ANSWER,
            tokio_rustls::TlsConnector::from(kubelet_tls).connect(name, &mut io),
        )
        .await
        .context("TLS handshake with the kubelet through the tunnel timed out")?
        .context("TLS handshake with the kubelet through the tunnel")?;
        tls.write_all(PAYLOAD).await?;
        tls.flush().await?;
        let mut back = vec![0u8; PAYLOAD.len()];
        tokio::time::timeout(ANSWER, tls.read_exact(&mut back))
            .await
            .context("no echo through the tunnel")??;
        anyhow::ensure!(back == PAYLOAD, "echo returned {back:?}");
        Ok(())
    }
    .await;
    fail_on(outcome);
    wait_tables_empty(&server, &[&agent]).await;
}

/// Sends kube-apiserver's CONNECT `head` and checks the answer the way it does: status 200, and
/// no byte buffered behind the head before it speaks.
async fn kube_connect(io: BoxIo, head: &str) -> anyhow::Result<BoxIo> {
    let (reply, mut io) = tokio::time::timeout(ANSWER, connect::request_on(io, head))
        .await
        .context("no answer to CONNECT")??;
    anyhow::ensure!(
        reply.status == 200 && reply.head.starts_with("HTTP/1.1 200"),
        "CONNECT answered {:?} {:?}",
        reply.head,
        reply.body
    );
    connect::nothing_follows(&mut io, Duration::from_millis(300)).await?;
    Ok(io)
}

async fn agent_connect_row(env: &Env, fixture: &str, authority: &str) {
    let units = fixture_for(fixture, "/AgentService/Connect", Some(authority));
    let mut server = env
        .server(ServerOpts::new(Mode::HttpConnect, Transport::Uds))
        .await;
    let config = env.tls_client(Some(&env.pki.main.agent), &[b"h2"]);
    let tls = spoke_tests::tls::connect(server.agent_addr, config)
        .await
        .expect("TLS to the agent port");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]), "ALPN h2");
    let mut conn = H2Conn::new(Box::new(tls));

    let connected = async {
        let mut acks = 0;
        for unit in &units {
            match unit {
                Unit::Frame(f) if f.kind == kind::SETTINGS && f.is_ack() => {
                    acks += 1;
                    conn.await_settings(acks, ANSWER).await?;
                }
                Unit::Frame(f) if f.kind == kind::PING && f.is_ack() => {}
                _ => conn.send_unit(unit).await?,
            }
        }
        // The agent blocks on the response headers: exactly one serverid and one servercount.
        let fields = match conn
            .next(ANSWER)
            .await
            .context("waiting for response headers")?
        {
            Event::Headers {
                stream: 1,
                fields,
                end_stream: false,
            } => fields,
            other => anyhow::bail!("{other} instead of the Connect response headers"),
        };
        anyhow::ensure!(
            values(&fields, ":status") == ["200"]
                && values(&fields, "serverid") == [server.id.as_str()]
                && values(&fields, "servercount") == ["1"],
            "Connect response headers {fields:?}: want one serverid {:?} and one servercount \"1\"",
            server.id
        );
        Ok(())
    }
    .await;
    fail_on(connected);
    server.wait_ready().await;

    // kube-apiserver dials through the server; the fake agent serves the dial as upstream's does.
    let target = "127.0.0.1:10250";
    let frontend = async {
        let io = server
            .frontend
            .open()
            .await
            .context("opening the frontend")?;
        let mut io = kube_connect(io, &connect::kube_apiserver_head(target)).await?;
        io.write_all(PAYLOAD).await?;
        io.flush().await?;
        let mut back = vec![0u8; PAYLOAD.len()];
        tokio::time::timeout(ANSWER, io.read_exact(&mut back))
            .await
            .context("no echo through the tunnel")??;
        anyhow::ensure!(back == PAYLOAD, "echo returned {back:?}");
        Ok(())
        // Dropping the tunnel makes the server send CLOSE_REQ to the agent.
    };
    let outcome = tokio::try_join!(frontend, serve_one_dial(&mut conn, target));
    fail_on(outcome.map(|_| ()));
    wait_tables_empty(&server, &[]).await;
}

/// Serves one dial on the agent stream (stream 1) like upstream's agent: DIAL_RSP with
/// connectID 1 (its per-stream counter), the endpoint's bytes back as DATA (here: an echo), and
/// CLOSE_RSP for the server's CLOSE_REQ.
async fn serve_one_dial(conn: &mut H2Conn, target: &str) -> anyhow::Result<()> {
    const ID: i64 = 1;
    let reply = |payload: Payload, kind: PacketType| Packet {
        r#type: kind as i32,
        payload: Some(payload),
    };
    let p = expect_packet(conn, 1, PacketType::DialReq).await?;
    let Some(Payload::DialRequest(d)) = p.payload else {
        anyhow::bail!("DIAL_REQ without a dialRequest: {p:?}");
    };
    anyhow::ensure!(d.protocol == "tcp" && d.address == target, "DIAL_REQ {d:?}");
    let rsp = DialResponse {
        error: String::new(),
        connect_id: ID,
        random: d.random,
    };
    let rsp = reply(Payload::DialResponse(rsp), PacketType::DialRsp);
    conn.send(&data_frame(1, &rsp).encode()).await?;
    let mut echoed = 0;
    while echoed < PAYLOAD.len() {
        let p = expect_packet(conn, 1, PacketType::Data).await?;
        let Some(Payload::Data(d)) = p.payload else {
            anyhow::bail!("DATA without data: {p:?}");
        };
        anyhow::ensure!(d.connect_id == ID, "DATA for connectID {}", d.connect_id);
        echoed += d.data.len();
        let back = Data {
            connect_id: ID,
            error: String::new(),
            data: d.data,
        };
        conn.send(&data_frame(1, &reply(Payload::Data(back), PacketType::Data)).encode())
            .await?;
    }
    let p = expect_packet(conn, 1, PacketType::CloseReq).await?;
    let Some(Payload::CloseRequest(c)) = p.payload else {
        anyhow::bail!("CLOSE_REQ without a closeRequest: {p:?}");
    };
    anyhow::ensure!(c.connect_id == ID, "CLOSE_REQ {c:?}");
    let rsp = CloseResponse {
        error: String::new(),
        connect_id: ID,
    };
    conn.send(&data_frame(1, &reply(Payload::CloseResponse(rsp), PacketType::CloseRsp)).encode())
        .await?;
    Ok(())
}

/// A real grpc-go client (Debian's 1.33.3) behaving like konnectivity-client in kube-apiserver:
/// the socket path as the target, a Unix dialer, plaintext, blocking dial; one Proxy stream with
/// DIAL_REQ, DATA, the echo, CLOSE_REQ, CLOSE_RSP. Then two tunnels on one connection, a stream
/// each (konnectivity-client master's CreateGRPCTunnel). The same client with a `unix:` target
/// (its `:authority` is then `localhost`) runs too, so a failure of the others alone points at
/// the authority and not at the client.
#[tokio::test]
async fn grpc_go_client_tunnels_through_the_unix_socket() {
    let Some(bin) = goclient::built("grpc_go_client_tunnels_through_the_unix_socket").await else {
        return;
    };
    let env = Env::new("conformance_goclient");
    let (server, agent) = env
        .pair(ServerOpts::new(Mode::Grpc, Transport::Uds), |a| a)
        .await;
    let echo = backends::echo().await;
    let socket = server.uds_path();
    let path = socket.display().to_string();
    let runs = [
        (
            "the socket path (kube-apiserver), single-use",
            path.clone(),
            1,
        ),
        ("the socket path, two tunnels on one connection", path, 2),
        ("a unix: target", format!("unix://{}", socket.display()), 1),
    ];
    let mut failed = Vec::new();
    for (what, target, tunnels) in &runs {
        let run = goclient::tunnel(&bin, &socket, target, *tunnels, &echo.target())
            .await
            .expect("running the grpc-go client");
        if !run.ok() {
            failed.push(format!("target {what} ({target}): {}", run.describe()));
        }
    }
    assert!(
        failed.is_empty(),
        "the grpc-go 1.33.3 client's tunnel failed with:\n{}",
        failed.join("\n")
    );
    assert_eq!(
        echo.stats.snapshot().0,
        u64::from(runs.iter().map(|(_, _, n)| n).sum::<u32>()),
        "the echo server saw every dial"
    );
    wait_tables_empty(&server, &[&agent]).await;
}

/// The same real client over the mTLS TCP frontend: Go 1.19's crypto/tls (TLS 1.3) against
/// Spoke's own TLS records, with messages that fit one record and ones that span many (a
/// 300 KiB DATA packet each way), and two tunnels on one connection.
#[tokio::test]
async fn grpc_go_client_tunnels_over_mtls() {
    let Some(bin) = goclient::built("grpc_go_client_tunnels_over_mtls").await else {
        return;
    };
    let env = Env::new("conformance_goclient_tls");
    let (server, agent) = env
        .pair(ServerOpts::new(Mode::Grpc, Transport::Tls), |a| a)
        .await;
    let echo = backends::echo().await;
    let addr = server.tcp.expect("TLS frontend address");
    let mut failed = Vec::new();
    let runs = [(1, 64), (1, 300 * 1024), (2, 100 * 1024)];
    for (tunnels, size) in runs {
        let run = goclient::tunnel_tls(
            &bin,
            addr,
            &env.pki.main.ca,
            &env.pki.main.frontend,
            tunnels,
            size,
            &echo.target(),
        )
        .await
        .expect("running the grpc-go client");
        if !run.ok() {
            failed.push(format!(
                "{tunnels} tunnel(s) of {size} bytes: {}",
                run.describe()
            ));
        }
    }
    assert!(
        failed.is_empty(),
        "the grpc-go 1.33.3 client over mTLS failed with:\n{}",
        failed.join("\n")
    );
    assert_eq!(
        echo.stats.snapshot().0,
        runs.iter().map(|(n, _)| u64::from(*n)).sum::<u64>(),
        "the echo server saw every dial"
    );
    wait_tables_empty(&server, &[&agent]).await;
}

/// Each capture holds a whole tunnel, and prost encodes its messages exactly as grpc-go's
/// encoder (golang/protobuf) did, so messages built by the replay are the client's bytes.
#[test]
fn captured_grpc_go_messages_reencode_byte_for_byte() {
    let captures: Vec<&str> = ROWS
        .iter()
        .filter_map(|r| match (r.source, r.script) {
            (Source::Captured, Script::Proxy { fixture, .. }) => Some(fixture),
            _ => None,
        })
        .collect();
    assert!(!captures.is_empty(), "no captured rows");
    for name in captures {
        let units = load_fixture(name).expect("capture");
        let mut per_stream: HashMap<u32, Vec<PacketType>> = HashMap::new();
        for unit in &units {
            if let Unit::Frame(f) = unit {
                if f.kind == kind::DATA && !f.payload.is_empty() {
                    let p = packet_of(&f.payload).expect("one gRPC message per DATA frame");
                    assert_eq!(grpc_message(&p), f.payload, "{name}: re-encoding {p:?}");
                    let kind = grpc::kind(&p).expect("known packet type");
                    per_stream.entry(f.stream).or_default().push(kind);
                }
            }
        }
        assert!(!per_stream.is_empty(), "{name}: no messages");
        for (stream, kinds) in per_stream {
            assert_eq!(
                kinds,
                [PacketType::DialReq, PacketType::Data, PacketType::CloseReq],
                "{name}: stream {stream} is not one whole tunnel"
            );
        }
    }
}

/// The fixture files (`*.h2`), sorted.
fn fixture_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(h2wire::fixtures_dir())
        .expect("fixtures dir")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|n| n.ends_with(".h2"))
        .collect();
    names.sort();
    names
}

/// Every fixture is some row's script, and every row's fixture exists.
#[test]
fn every_fixture_has_a_row() {
    let on_disk = fixture_names();
    let mut in_rows: Vec<String> = ROWS
        .iter()
        .filter_map(|r| match r.script {
            Script::Proxy { fixture, .. } | Script::AgentConnect { fixture, .. } => {
                Some(fixture.to_string())
            }
            Script::HttpConnect { .. } => None,
        })
        .collect();
    in_rows.sort();
    assert_eq!(on_disk, in_rows);
}

/// Spoke's HPACK decoder (ours since loona-hpack's Huffman decoding cost ~40% of a reconnect
/// storm) reads every real client's header blocks as loona-hpack does, and as the fixture's
/// comments list them (written from the Go encoder's input).
#[test]
fn spokes_hpack_decoder_reads_every_real_clients_headers() {
    let names = fixture_names();
    let mut huffman_strings = 0;
    for name in &names {
        let units = load_fixture(name).expect("fixture");
        let blocks: Vec<&[u8]> = units
            .iter()
            .filter_map(|u| match u {
                Unit::Frame(f) if f.kind == kind::HEADERS => Some(&f.payload[..]),
                _ => None,
            })
            .collect();
        let reference = decode_blocks(blocks.iter().copied()).expect("loona decodes");
        let mut ours = spoke_tunnel::http2::hpack::Decoder::new(4096);
        for (i, block) in blocks.iter().enumerate() {
            huffman_strings += count_huffman_literals(block);
            let mut fields = Vec::new();
            ours.decode(block, |n, v| {
                fields.push((
                    String::from_utf8_lossy(&n).into_owned(),
                    String::from_utf8_lossy(&v).into_owned(),
                ))
            })
            .unwrap_or_else(|e| panic!("{name}: block {i}: {e}"));
            assert_eq!(fields, reference[i], "{name}: block {i}");
        }
        // The fixture's comments list the fields under each `# c: HEADERS` line as
        // `#     name: "value"` (`# s:` lines are the server's frames).
        let text = std::fs::read_to_string(h2wire::fixtures_dir().join(name)).expect("read");
        let mut client_headers = false;
        let mut listed: Vec<(String, String)> = Vec::new();
        for line in text.lines() {
            if let Some(field) = line.strip_prefix("#     ") {
                let pair = field
                    .rsplit_once(": \"")
                    .and_then(|(n, v)| Some((n.to_string(), v.strip_suffix('"')?.to_string())));
                if let (true, Some(pair)) = (client_headers, pair) {
                    listed.push(pair);
                }
            } else if line.starts_with("# ") {
                client_headers = line.starts_with("# c: HEADERS");
            }
        }
        let decoded: Vec<(String, String)> = reference.into_iter().flatten().collect();
        assert_eq!(
            decoded, listed,
            "{name}: decoded fields vs the fixture's list"
        );
    }
    assert!(
        huffman_strings > 20,
        "the fixtures exercise Huffman decoding ({huffman_strings} strings)"
    );
}

/// How many literal strings in a block are Huffman-coded (a rough scan, enough to show the
/// fixtures exercise that path: literal representations with the H bit on a string).
fn count_huffman_literals(block: &[u8]) -> usize {
    block
        .windows(2)
        .filter(|w| w[0] & 0xf0 == 0x00 || w[0] & 0xc0 == 0x40)
        .filter(|w| w[1] & 0x80 != 0)
        .count()
}
