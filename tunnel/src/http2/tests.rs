//! The driver end to end on real sockets: our client and server with each other, in TLS and
//! in plain text, and with tonic/h2 (another HTTP/2 and gRPC implementation) on either side.
use super::conn::Config;
use super::driver::{Accepted, Acceptor, Driver, Ended, Options, StreamEnd};
use super::grpc;
use super::headers::Headers;
use super::io::{Crypto, Io};
use crate::packet;
use bytes::Bytes;
use futures::future::BoxFuture;
use spoke_proto::Packet;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::Code;

fn options() -> Options {
    Options {
        http2: Config::default(),
        max_message: 8 << 20,
        keepalive: Duration::ZERO,
        keepalive_timeout: Duration::from_secs(20),
    }
}

/// Sends back every packet it receives.
#[derive(Default)]
struct Echo {
    queue: VecDeque<Packet>,
    waker: Option<Waker>,
}

impl StreamEnd for Echo {
    fn packet(&mut self, p: Packet, _: usize) -> Result<(), (Code, String)> {
        if p.r#type == spoke_proto::PacketType::DialCls as i32 {
            return Err((Code::Aborted, "told to stop".into()));
        }
        self.queue.push_back(p);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
        Ok(())
    }
    fn poll_packet(&mut self, cx: &mut Context<'_>) -> Poll<Option<Packet>> {
        match self.queue.pop_front() {
            Some(p) => Poll::Ready(Some(p)),
            None => {
                self.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
    fn ended(&mut self, _: &Ended) {}
}

struct EchoAcceptor;

impl Acceptor for EchoAcceptor {
    fn accept(&mut self, path: &str, _: Headers) -> BoxFuture<'static, Accepted> {
        let ok = path == "/ProxyService/Proxy";
        Box::pin(async move {
            if !ok {
                return Err((Code::Unimplemented, "unknown method".into()));
            }
            let mut h = grpc::response();
            h.push("serverid", "s1");
            Ok((h, Box::new(Echo::default()) as Box<dyn StreamEnd>))
        })
    }
}

/// The test's side of a client stream: packets to send in, packets received out.
struct Pipe {
    to_send: mpsc::UnboundedReceiver<Packet>,
    received: mpsc::UnboundedSender<Packet>,
    ended: Arc<Mutex<Option<Ended>>>,
}

impl StreamEnd for Pipe {
    fn packet(&mut self, p: Packet, _: usize) -> Result<(), (Code, String)> {
        let _ = self.received.send(p);
        Ok(())
    }
    fn poll_packet(&mut self, cx: &mut Context<'_>) -> Poll<Option<Packet>> {
        self.to_send.poll_recv(cx)
    }
    fn ended(&mut self, how: &Ended) {
        *self.ended.lock().unwrap() = Some(how.clone());
    }
}

fn certs() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    tls_configs(2)
}

/// A self-signed `localhost` server (sending `tickets` TLS 1.3 session tickets) and a client
/// trusting it, both with ALPN h2 and secret extraction (Spoke's records take over).
pub(super) fn tls_configs(
    tickets: usize,
) -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let der = ck.cert.der().clone();
    let key = rustls_pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)
        .unwrap();
    server.alpn_protocols = vec![b"h2".to_vec()];
    server.send_tls13_tickets = tickets;
    server.enable_secret_extraction = true;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).unwrap();
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![b"h2".to_vec()];
    client.enable_secret_extraction = true;
    (Arc::new(server), Arc::new(client))
}

fn request() -> Headers {
    grpc::request("https", "localhost", "/ProxyService/Proxy", "spoke-test")
}

fn sample() -> Vec<Packet> {
    vec![
        packet::dial_req("127.0.0.1:1".into(), 7),
        packet::data(1, Bytes::from(vec![0xab; 3 << 20])),
        packet::data(1, Bytes::from_static(b"small")),
        packet::data(1, Bytes::new()),
        packet::close_req(1),
    ]
}

/// Opens a stream on `driver`, sends `sample()` and checks every packet comes back.
async fn echo_round<S: super::io::Socket>(mut driver: Driver<S>) {
    let (id, rsp) = driver.open(&request()).await.expect("stream opens");
    assert_eq!(rsp.get("serverid"), Some("s1"));
    let (send, to_send) = mpsc::unbounded_channel();
    let (received, mut got) = mpsc::unbounded_channel();
    let ended = Arc::new(Mutex::new(None));
    driver.bind(
        id,
        Box::new(Pipe {
            to_send,
            received,
            ended: ended.clone(),
        }),
    );
    let run = tokio::spawn(driver.run());
    for p in sample() {
        send.send(p).unwrap();
    }
    for want in sample() {
        let p = tokio::time::timeout(Duration::from_secs(10), got.recv())
            .await
            .expect("echo in time")
            .expect("stream open");
        assert_eq!(p, want);
    }
    drop(send);
    let r = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("connection ends")
        .expect("join");
    assert!(r.is_ok(), "{r:?}");
    assert!(ended.lock().unwrap().is_some());
}

#[tokio::test]
async fn our_client_and_server_over_tls() {
    let (server_cfg, client_cfg) = certs();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let conn = rustls::server::UnbufferedServerConnection::new(server_cfg).unwrap();
        let mut io = Io::new(tcp, Crypto::Server(Box::new(conn)));
        io.handshake().await.unwrap();
        let _ = Driver::server(io, options(), Box::new(EchoAcceptor))
            .run()
            .await;
    });
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::client::UnbufferedClientConnection::new(client_cfg, name).unwrap();
    let mut io = Io::new(tcp, Crypto::Client(Box::new(conn)));
    io.handshake().await.unwrap();
    echo_round(Driver::client(io, options())).await;
}

#[tokio::test]
async fn our_client_and_server_in_plain_text_with_small_frames_and_windows() {
    let (a, b) = tokio::net::UnixStream::pair().unwrap();
    // The smallest settings HTTP/2 allows: every message spans frames and waits for windows.
    let small = Options {
        http2: Config {
            max_frame_size: 16_384,
            stream_window: 65_535,
            connection_window: 65_535,
            ..Config::default()
        },
        ..options()
    };
    tokio::spawn(Driver::server(Io::new(a, Crypto::Plain), small, Box::new(EchoAcceptor)).run());
    echo_round(Driver::client(Io::new(b, Crypto::Plain), small)).await;
}

#[tokio::test]
async fn unknown_methods_and_stream_errors_end_as_grpc_statuses() {
    let (a, b) = tokio::net::UnixStream::pair().unwrap();
    tokio::spawn(
        Driver::server(Io::new(a, Crypto::Plain), options(), Box::new(EchoAcceptor)).run(),
    );
    let mut d = Driver::client(Io::new(b, Crypto::Plain), options());
    let wrong = grpc::request("http", "x", "/Nope/Nope", "t");
    assert_eq!(
        d.open(&wrong).await.map(|_| ()),
        Err(Ended::Status(Code::Unimplemented, "unknown method".into()))
    );
    // The connection goes on: a good stream, then the echo refuses a packet.
    let (id, _) = d.open(&request()).await.expect("opens");
    let (send, to_send) = mpsc::unbounded_channel();
    let (received, _got) = mpsc::unbounded_channel();
    let ended = Arc::new(Mutex::new(None));
    d.bind(
        id,
        Box::new(Pipe {
            to_send,
            received,
            ended: ended.clone(),
        }),
    );
    send.send(packet::dial_cls(9)).unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), d.run())
        .await
        .expect("ends");
    assert_eq!(
        *ended.lock().unwrap(),
        Some(Ended::Status(Code::Aborted, "told to stop".into()))
    );
}

/// tonic's client (hyper/h2) against our server.
#[tokio::test]
async fn tonic_client_against_our_server() {
    let (a, b) = tokio::net::UnixStream::pair().unwrap();
    tokio::spawn(
        Driver::server(Io::new(a, Crypto::Plain), options(), Box::new(EchoAcceptor)).run(),
    );
    let mut b = Some(b);
    let connector = tower::service_fn(move |_| {
        let s = b.take();
        async move {
            s.map(hyper_util::rt::TokioIo::new)
                .ok_or_else(|| std::io::Error::other("one connection only"))
        }
    });
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(connector)
        .await
        .unwrap();
    let mut client = spoke_proto::proxy_service_client::ProxyServiceClient::new(channel)
        .max_decoding_message_size(8 << 20);
    let (tx, rx) = mpsc::channel(16);
    for p in sample() {
        tx.send(p).await.unwrap();
    }
    let rsp = client
        .proxy(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap();
    assert_eq!(
        rsp.metadata().get("serverid").map(|v| v.to_str().unwrap()),
        Some("s1")
    );
    let mut stream = rsp.into_inner();
    for want in sample() {
        assert_eq!(stream.message().await.unwrap(), Some(want));
    }
    drop(tx);
    let end = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .unwrap();
    assert!(matches!(end, Ok(None)), "{end:?}");
}

/// A tonic server (hyper/h2) that echoes, for our client to talk to.
struct TonicEcho;

#[tonic::async_trait]
impl spoke_proto::proxy_service_server::ProxyService for TonicEcho {
    type ProxyStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<Packet, tonic::Status>> + Send>>;
    async fn proxy(
        &self,
        req: tonic::Request<tonic::Streaming<Packet>>,
    ) -> Result<tonic::Response<Self::ProxyStream>, tonic::Status> {
        let mut rsp = tonic::Response::new(Box::pin(req.into_inner()) as Self::ProxyStream);
        rsp.metadata_mut().insert(
            "serverid",
            tonic::metadata::MetadataValue::from_static("s1"),
        );
        Ok(rsp)
    }
}

#[tokio::test]
async fn our_client_against_a_tonic_server() {
    let (a, b) = tokio::net::UnixStream::pair().unwrap();
    let svc = spoke_proto::proxy_service_server::ProxyServiceServer::new(TonicEcho)
        .max_decoding_message_size(8 << 20)
        .max_encoding_message_size(8 << 20);
    let incoming = futures::stream::iter([Ok::<_, std::io::Error>(a)]);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(incoming),
    );
    echo_round(Driver::client(Io::new(b, Crypto::Plain), options())).await;
}
