//! The bench's own endpoints: a backend with a tiny command protocol, and clients that reach
//! it directly, through a forwarding port (ssh -L, stunnel), or through Spoke's frontends
//! (HTTP CONNECT and gRPC `/ProxyService/Proxy`, over a Unix socket or mTLS TCP).
//!
//! Backend protocol: the client sends one command byte and a big-endian u64:
//! `D n` the backend sends n bytes; `U n` the client sends n bytes and the backend
//! answers `K`; `E 0` echo until EOF; `C n` the backend sends n bytes and closes (churn).
//! Commands repeat on one connection until EOF, `E` or `C`.
use super::pki::Pki;
use anyhow::{bail, Context, Result};
use bytes::Bytes;
use rustls::ClientConfig;
use spoke_proto::packet::Payload;
use spoke_proto::{Packet, PacketType};
use spoke_tunnel::http2::conn::Config;
use spoke_tunnel::http2::driver::{self, Driver, Ended, StreamEnd};
use spoke_tunnel::http2::grpc;
use spoke_tunnel::http2::io::{Crypto, Io as Http2Io};
use spoke_tunnel::tls_bytes::TlsBytes;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context as TaskCx, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::mpsc;
use tokio_util::sync::PollSender;

pub const CHUNK: usize = 256 << 10;
static ZEROS: [u8; CHUNK] = [0u8; CHUNK];

/// Aborts the backend's accept loop on drop.
pub struct Backend {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves the backend protocol on `listener` (on the current runtime).
pub fn backend(listener: TcpListener) -> Result<Backend> {
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = serve(s).await;
            });
        }
    });
    Ok(Backend { addr, task })
}

/// A TCP stream read the way Go's netpoller reads: it waits for readiness only after a read
/// returns EAGAIN. tokio's own `AsyncRead` also takes a short read as "drained" and waits for
/// the next epoll edge. On a socket the eBPF fast path redirects into, a read can be short
/// while more is queued: after a backlog fallback the kernel's `tcp_bpf_recvmsg` returns the
/// redirected bytes without the TCP bytes queued behind them, and no edge may follow, so such
/// a reader waits forever (a bench run hung so, 684,352 bytes readable and unread). The
/// bench's and the demo's endpoints stand in for the kubelet, a Go server, so they read as it
/// does; see the README on `--ebpf-fast-path-ports`.
pub struct GoLikeStream(pub TcpStream);

impl AsyncRead for GoLikeStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskCx<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let s = &self.get_mut().0;
        loop {
            ready!(s.poll_read_ready(cx))?;
            // try_read clears readiness on EAGAIN only, never on a short read.
            match s.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for GoLikeStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskCx<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskCx<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskCx<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

async fn serve(s: TcpStream) -> Result<()> {
    s.set_nodelay(true)?;
    let mut s = GoLikeStream(s);
    loop {
        let mut head = [0u8; 9];
        match s.read_exact(&mut head).await {
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
            Ok(_) => {}
        }
        let mut n = u64::from_be_bytes(head[1..9].try_into()?);
        match head[0] {
            b'D' | b'C' => {
                while n > 0 {
                    let k = n.min(CHUNK as u64) as usize;
                    s.write_all(&ZEROS[..k]).await?;
                    n -= k as u64;
                }
                if head[0] == b'C' {
                    s.shutdown().await?;
                    return Ok(());
                }
            }
            b'U' => {
                let mut buf = vec![0u8; CHUNK];
                while n > 0 {
                    let k = s.read(&mut buf).await?;
                    if k == 0 {
                        bail!("upload ended early");
                    }
                    n = n.saturating_sub(k as u64);
                }
                s.write_all(b"K").await?;
            }
            b'E' => {
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let k = s.read(&mut buf).await?;
                    if k == 0 {
                        return Ok(());
                    }
                    s.write_all(&buf[..k]).await?;
                }
            }
            c => bail!("unknown command {c}"),
        }
    }
}

/// `xtask bench --serve-backend ADDR`: prints `LISTENING <addr>`, serves until stdin closes.
pub fn serve_backend_process(addr: &str) -> Result<()> {
    spoke_tests::ports::raise_nofile_limit();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let b = backend(TcpListener::bind(addr).await?)?;
        println!("LISTENING {}", b.addr);
        std::thread::spawn(|| {
            use std::io::Read;
            let mut buf = [0u8; 64];
            while std::io::stdin().read(&mut buf).unwrap_or(0) > 0 {}
            std::process::exit(0);
        });
        std::future::pending::<Result<()>>().await
    })
}

/// A backend in a child process (its own file-descriptor limit).
pub struct ChildBackend {
    pub addr: SocketAddr,
    child: std::process::Child,
}

impl ChildBackend {
    pub fn start() -> Result<ChildBackend> {
        use std::io::BufRead;
        // /proc/self/exe still works when cargo has replaced the binary on disk meanwhile.
        let mut child = std::process::Command::new("/proc/self/exe")
            .args(["bench", "--serve-backend", "127.0.0.1:0"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("start the backend process")?;
        let out = child.stdout.take().context("backend stdout")?;
        let mut line = String::new();
        std::io::BufReader::new(out).read_line(&mut line)?;
        let addr = line
            .trim()
            .strip_prefix("LISTENING ")
            .with_context(|| format!("backend process said {line:?}"))?
            .parse()?;
        Ok(ChildBackend { addr, child })
    }
}

impl Drop for ChildBackend {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn command(c: u8, n: u64) -> [u8; 9] {
    let mut h = [0u8; 9];
    h[0] = c;
    h[1..].copy_from_slice(&n.to_be_bytes());
    h
}

/// A bench client's connection to the backend.
pub trait BenchIo: spoke_tests::Io {
    /// Takes up to `scratch.len()` received bytes and drops them; 0 at the end. A stream that
    /// holds what it receives as `Bytes` (TLS records opened in place, gRPC packets) drops them
    /// there: a read would copy each byte once more, which a socket read does not, and the
    /// bench measures the tunnel, not its own client.
    fn poll_discard(&mut self, cx: &mut TaskCx<'_>, scratch: &mut [u8]) -> Poll<io::Result<usize>> {
        let mut b = ReadBuf::new(scratch);
        ready!(Pin::new(self).poll_read(cx, &mut b))?;
        Poll::Ready(Ok(b.filled().len()))
    }

    /// Writes some of `chunk` (not empty; see [`send`]), advancing it. Streams that send
    /// `Bytes` take it whole without copying it, as spoke-server's and spoke-agent's relays hand
    /// theirs over.
    fn poll_send(&mut self, cx: &mut TaskCx<'_>, chunk: &mut Bytes) -> Poll<io::Result<()>> {
        let k = ready!(Pin::new(self).poll_write(cx, chunk))?;
        if k == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        let _ = chunk.split_to(k);
        Poll::Ready(Ok(()))
    }
}

impl BenchIo for TcpStream {}
impl BenchIo for UnixStream {}

impl BenchIo for TlsBytes<TcpStream> {
    fn poll_discard(&mut self, cx: &mut TaskCx<'_>, scratch: &mut [u8]) -> Poll<io::Result<usize>> {
        let b = ready!(self.poll_read_bytes(cx, scratch.len()))?;
        Poll::Ready(Ok(b.map_or(0, |b| b.len())))
    }

    fn poll_send(&mut self, cx: &mut TaskCx<'_>, chunk: &mut Bytes) -> Poll<io::Result<()>> {
        self.poll_send_bytes(cx, chunk)
    }
}

/// A boxed [`BenchIo`]; it coerces to the tests' `BoxIo`.
pub type BenchBox = Box<dyn BenchIo>;

async fn discard(io: &mut BenchBox, scratch: &mut [u8]) -> io::Result<usize> {
    std::future::poll_fn(|cx| io.poll_discard(cx, scratch)).await
}

/// Writes all of `chunk`; an empty one writes nothing.
async fn send(io: &mut BenchBox, mut chunk: Bytes) -> io::Result<()> {
    while !chunk.is_empty() {
        std::future::poll_fn(|cx| io.poll_send(cx, &mut chunk)).await?;
    }
    Ok(())
}

/// Downloads `n` bytes on an open connection; returns the seconds it took.
pub async fn download(io: &mut BenchBox, n: u64) -> Result<f64> {
    let t = Instant::now();
    io.write_all(&command(b'D', n)).await?;
    io.flush().await?;
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    while got < n {
        let k = discard(io, &mut buf).await?;
        if k == 0 {
            bail!("download ended after {got} of {n} bytes");
        }
        got += k as u64;
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Uploads `n` bytes on an open connection and waits for the backend's `K`.
pub async fn upload(io: &mut BenchBox, n: u64) -> Result<f64> {
    let t = Instant::now();
    io.write_all(&command(b'U', n)).await?;
    let mut left = n;
    while left > 0 {
        let k = left.min(CHUNK as u64) as usize;
        send(io, Bytes::from_static(&ZEROS[..k])).await?;
        left -= k as u64;
    }
    io.flush().await?;
    let mut k = [0u8; 1];
    io.read_exact(&mut k)
        .await
        .context("waiting for the upload acknowledgement")?;
    Ok(t.elapsed().as_secs_f64())
}

/// Reads a download for `dur`; returns bytes received.
pub async fn timed_download(io: &mut BenchBox, dur: Duration) -> Result<u64> {
    io.write_all(&command(b'D', u64::MAX / 2)).await?;
    io.flush().await?;
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    let end = tokio::time::Instant::now() + dur;
    loop {
        match tokio::time::timeout_at(end, discard(io, &mut buf)).await {
            Err(_) => return Ok(got),
            Ok(Ok(0)) => bail!("download ended after {got} bytes"),
            Ok(Ok(k)) => got += k as u64,
            Ok(Err(e)) => return Err(e.into()),
        }
    }
}

/// How a client reaches the backend.
#[derive(Clone, Debug)]
pub enum Route {
    /// TCP straight to the backend.
    Direct,
    /// TCP to a local forwarding port (ssh -L, stunnel) that leads to the backend.
    Forward(SocketAddr),
    /// HTTP CONNECT through spoke-server.
    Http(Front),
    /// gRPC Proxy through spoke-server.
    Grpc(Front),
}

#[derive(Clone, Debug)]
pub enum Front {
    Uds(PathBuf),
    Tls(SocketAddr),
}

impl Front {
    pub fn of(f: &super::procs::Frontend) -> Front {
        match f {
            super::procs::Frontend::Uds(p) => Front::Uds(p.clone()),
            super::procs::Frontend::Tcp(a) => Front::Tls(*a),
        }
    }
}

impl Route {
    pub fn through(c: &super::procs::Cluster) -> Route {
        match c.mode {
            super::procs::Mode::HttpConnect => Route::Http(Front::of(&c.frontend)),
            super::procs::Mode::Grpc => Route::Grpc(Front::of(&c.frontend)),
        }
    }
}

/// Client TLS configs (kube-apiserver's role: the frontend client certificate).
#[derive(Clone)]
pub struct Tls {
    pub http: Arc<ClientConfig>,
    pub h2: Arc<ClientConfig>,
}

impl Tls {
    pub fn new(pki: &Pki) -> Result<Tls> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&pki.ca)? {
            roots.add(c?)?;
        }
        let make = |alpn: &[&[u8]]| -> Result<Arc<ClientConfig>> {
            let mut c = ClientConfig::builder_with_provider(super::pki::go_client_provider())
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots.clone())
                .with_client_auth_cert(
                    CertificateDer::pem_file_iter(&pki.frontend.cert)?.collect::<Result<_, _>>()?,
                    PrivateKeyDer::from_pem_file(&pki.frontend.key)?,
                )?;
            c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            // Its HTTP/2 client is Spoke's, which takes over the TLS 1.3 records.
            c.enable_secret_extraction = true;
            Ok(Arc::new(c))
        };
        Ok(Tls {
            http: make(&[])?,
            h2: make(&[b"h2"])?,
        })
    }
}

/// A TLS client on Spoke's own record layer, so that the bench's client costs what Spoke's
/// side costs per byte (its CPU is reported apart from the tunnel's).
async fn tls_connect(addr: SocketAddr, cfg: Arc<ClientConfig>) -> io::Result<TlsBytes<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = rustls_pki_types::ServerName::try_from("localhost").map_err(io::Error::other)?;
    let conn =
        rustls::client::UnbufferedClientConnection::new(cfg, name).map_err(io::Error::other)?;
    TlsBytes::connect(tcp, conn).await
}

/// Opens a connection to `target` along `route`.
pub async fn dial(route: &Route, tls: &Tls, target: SocketAddr) -> Result<BenchBox> {
    match route {
        Route::Direct => {
            let s = TcpStream::connect(target).await?;
            s.set_nodelay(true)?;
            Ok(Box::new(s))
        }
        Route::Forward(a) => {
            let s = TcpStream::connect(a).await?;
            s.set_nodelay(true)?;
            Ok(Box::new(s))
        }
        Route::Http(Front::Uds(p)) => {
            let mut s = UnixStream::connect(p)
                .await
                .with_context(|| format!("connect {}", p.display()))?;
            connect_head(&mut s, target).await?;
            Ok(Box::new(s))
        }
        Route::Http(Front::Tls(a)) => {
            let mut s = tls_connect(*a, tls.http.clone()).await?;
            connect_head(&mut s, target).await?;
            Ok(Box::new(s))
        }
        Route::Grpc(front) => Ok(Box::new(GrpcIo::dial(front, tls, target).await?)),
    }
}

/// Sends CONNECT as kube-apiserver's HTTPConnect egress does and reads the 200 head.
async fn connect_head<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    target: SocketAddr,
) -> Result<()> {
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await?;
    let mut head = Vec::with_capacity(128);
    let mut buf = [0u8; 256];
    // The server sends nothing after the head until we send, so reading chunks is safe.
    while !head.ends_with(b"\r\n\r\n") {
        let k = s.read(&mut buf).await?;
        if k == 0 {
            bail!("proxy closed: {}", String::from_utf8_lossy(&head));
        }
        head.extend_from_slice(&buf[..k]);
        if head.len() > 4096 {
            bail!("CONNECT answer head too long");
        }
    }
    let line = String::from_utf8_lossy(&head)
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    if !line.contains(" 200") {
        bail!("proxy answered {line}");
    }
    if !head.ends_with(b"\r\n\r\n")
        || head.windows(4).position(|w| w == b"\r\n\r\n") != Some(head.len() - 4)
    {
        bail!("bytes after the CONNECT answer head");
    }
    Ok(())
}

/// The bench's gRPC frontend client runs on Spoke's own HTTP/2 client (the framing the agent
/// uses), so that on the gRPC routes the client costs about what Spoke's framing does and the
/// figures are the tunnel's, not tonic's: one connection per dial, as konnectivity-client's
/// single-use gRPC tunnels, windows as large as Spoke's own.
fn grpc_options() -> driver::Options {
    driver::Options {
        http2: Config {
            stream_window: 8 << 20,
            connection_window: 16 << 20,
            ..Config::default()
        },
        max_message: 64 << 20,
        keepalive: Duration::ZERO,
        keepalive_timeout: Duration::from_secs(20),
    }
}

/// Opens the connection to the frontend and a `/ProxyService/Proxy` stream on it.
async fn grpc_stream(front: &Front, tls: &Tls) -> Result<GrpcHalf> {
    match front {
        Front::Uds(p) => {
            let s = UnixStream::connect(p)
                .await
                .context("gRPC connect over UDS")?;
            proxy_stream(Driver::client(
                Http2Io::new(s, Crypto::Plain),
                grpc_options(),
            ))
            .await
        }
        Front::Tls(a) => {
            let name = rustls_pki_types::ServerName::try_from("localhost")?;
            let conn = rustls::client::UnbufferedClientConnection::new(tls.h2.clone(), name)?;
            let tcp = TcpStream::connect(a)
                .await
                .context("gRPC connect over mTLS")?;
            tcp.set_nodelay(true)?;
            let mut io = Http2Io::new(tcp, Crypto::Client(Box::new(conn)));
            io.handshake().await.context("gRPC mTLS handshake")?;
            proxy_stream(Driver::client(io, grpc_options())).await
        }
    }
}

/// Opens the Proxy stream on a connection and runs the connection in its own task.
async fn proxy_stream<S: spoke_tunnel::http2::io::Socket>(
    mut driver: Driver<S>,
) -> Result<GrpcHalf> {
    let req = grpc::request("https", "localhost", "/ProxyService/Proxy", "spoke-bench");
    let (id, _) = tokio::time::timeout(Duration::from_secs(10), driver.open(&req))
        .await
        .context("Proxy call: no answer in 10 s")?
        .map_err(|e| anyhow::anyhow!("Proxy call refused: {e}"))?;
    let (end, half) = grpc_pair();
    driver.bind(id, Box::new(end));
    tokio::spawn(driver.run());
    Ok(half)
}

/// Packets the server sent, with the window they still hold, and what the reader has taken.
#[derive(Default)]
struct Taken {
    bytes: AtomicUsize,
    driver: futures::task::AtomicWaker,
}

/// The driver's side of the bench's Proxy stream.
struct GrpcEnd {
    out: mpsc::Receiver<Packet>,
    inbound: Option<mpsc::UnboundedSender<(Packet, usize)>>,
    taken: Arc<Taken>,
}

/// The bench's side: packets to send, packets received.
type GrpcHalf = (
    mpsc::Sender<Packet>,
    mpsc::UnboundedReceiver<(Packet, usize)>,
    Arc<Taken>,
);

fn grpc_pair() -> (GrpcEnd, GrpcHalf) {
    let (tx, out) = mpsc::channel(32);
    let (inbound, rx) = mpsc::unbounded_channel();
    let taken = Arc::new(Taken::default());
    let end = GrpcEnd {
        out,
        inbound: Some(inbound),
        taken: taken.clone(),
    };
    (end, (tx, rx, taken))
}

impl StreamEnd for GrpcEnd {
    fn packet(&mut self, p: Packet, size: usize) -> Result<(), (tonic::Code, String)> {
        match &self.inbound {
            Some(tx) if tx.send((p, size)).is_ok() => Ok(()),
            _ => Err((tonic::Code::Cancelled, "the bench client is gone".into())),
        }
    }

    fn poll_packet(&mut self, cx: &mut TaskCx<'_>) -> Poll<Option<Packet>> {
        self.out.poll_recv(cx)
    }

    fn ended(&mut self, _: &Ended) {
        self.inbound = None;
        self.out.close();
    }

    // The window opens as the bench reads, so a slow reader bounds what is buffered.
    fn defers_window(&self) -> bool {
        true
    }

    fn poll_consumed(&mut self, cx: &mut TaskCx<'_>) -> usize {
        self.taken.driver.register(cx.waker());
        self.taken.bytes.swap(0, Ordering::AcqRel)
    }
}

/// The most data the bench puts in one DATA packet.
const PACKET_MAX: usize = 64 << 10;

/// One tunnelled connection over a `/ProxyService/Proxy` stream, as a byte stream.
pub struct GrpcIo {
    tx: PollSender<Packet>,
    rx: mpsc::UnboundedReceiver<(Packet, usize)>,
    taken: Arc<Taken>,
    id: i64,
    buf: Bytes,
    eof: bool,
}

impl GrpcIo {
    pub async fn dial(front: &Front, tls: &Tls, target: SocketAddr) -> Result<GrpcIo> {
        let (tx, mut rx, taken) = grpc_stream(front, tls).await?;
        let random = (rand_id() & i64::MAX) | 1;
        tx.send(spoke_tests::grpc::dial_request(&target.to_string(), random))
            .await
            .map_err(|_| anyhow::anyhow!("request stream closed"))?;
        loop {
            let (p, size) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .context("no DIAL_RSP in 10 s")?
                .context("stream ended before DIAL_RSP")?;
            taken.bytes.fetch_add(size, Ordering::AcqRel);
            taken.driver.wake();
            if let Some(Payload::DialResponse(r)) = p.payload {
                if !r.error.is_empty() {
                    bail!("dial failed: {}", r.error);
                }
                return Ok(GrpcIo {
                    tx: PollSender::new(tx),
                    rx,
                    taken,
                    id: r.connect_id,
                    buf: Bytes::new(),
                    eof: false,
                });
            }
        }
    }
}

fn rand_id() -> i64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish() as i64
}

impl GrpcIo {
    /// Sends one DATA packet of `piece()`, taken once the stream has room for it.
    fn poll_data(
        &mut self,
        cx: &mut TaskCx<'_>,
        piece: impl FnOnce() -> Bytes,
    ) -> Poll<io::Result<()>> {
        let gone = |_| io::Error::from(io::ErrorKind::BrokenPipe);
        ready!(self.tx.poll_reserve(cx)).map_err(gone)?;
        let p = spoke_tests::grpc::data(self.id, piece());
        self.tx.send_item(p).map_err(gone)?;
        Poll::Ready(Ok(()))
    }

    /// Until `buf` holds data or the stream has ended.
    fn poll_fill(&mut self, cx: &mut TaskCx<'_>) -> Poll<()> {
        while self.buf.is_empty() && !self.eof {
            match ready!(self.rx.poll_recv(cx)) {
                Some((p, size)) => {
                    self.taken.bytes.fetch_add(size, Ordering::AcqRel);
                    self.taken.driver.wake();
                    match p.payload {
                        Some(Payload::Data(d)) => self.buf = d.data,
                        Some(Payload::CloseResponse(_)) => self.eof = true,
                        _ if p.r#type == PacketType::CloseRsp as i32 => self.eof = true,
                        _ => {}
                    }
                }
                None => self.eof = true,
            }
        }
        Poll::Ready(())
    }
}

impl AsyncRead for GrpcIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskCx<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        ready!(self.poll_fill(cx));
        let k = self.buf.len().min(out.remaining());
        out.put_slice(&self.buf.split_to(k));
        Poll::Ready(Ok(()))
    }
}

impl BenchIo for GrpcIo {
    fn poll_discard(&mut self, cx: &mut TaskCx<'_>, scratch: &mut [u8]) -> Poll<io::Result<usize>> {
        ready!(self.poll_fill(cx));
        let k = self.buf.len().min(scratch.len());
        let _ = self.buf.split_to(k);
        Poll::Ready(Ok(k))
    }

    fn poll_send(&mut self, cx: &mut TaskCx<'_>, chunk: &mut Bytes) -> Poll<io::Result<()>> {
        let k = chunk.len().min(PACKET_MAX);
        ready!(self.poll_data(cx, || chunk.split_to(k)))?;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for GrpcIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskCx<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let k = buf.len().min(PACKET_MAX);
        ready!(self.poll_data(cx, || Bytes::copy_from_slice(&buf[..k])))?;
        Poll::Ready(Ok(k))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut TaskCx<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskCx<'_>) -> Poll<io::Result<()>> {
        if self.tx.is_closed() {
            return Poll::Ready(Ok(()));
        }
        ready!(self.tx.poll_reserve(cx)).map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))?;
        let id = self.id;
        let _ = self.tx.send_item(spoke_tests::grpc::close_request(id));
        self.tx.close();
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spoke_proto::CloseResponse;

    /// A GrpcIo, the driver's ends of its channels, and its window accounting.
    struct Ends {
        io: BenchBox,
        inbound: mpsc::UnboundedSender<(Packet, usize)>,
        out: mpsc::Receiver<Packet>,
        taken: Arc<Taken>,
    }

    fn grpc_io() -> Ends {
        let (tx, out) = mpsc::channel(4);
        let (inbound, rx) = mpsc::unbounded_channel();
        let taken = Arc::new(Taken::default());
        let io = Box::new(GrpcIo {
            tx: PollSender::new(tx),
            rx,
            taken: taken.clone(),
            id: 7,
            buf: Bytes::new(),
            eof: false,
        });
        Ends {
            io,
            inbound,
            out,
            taken,
        }
    }

    /// Discarding takes every byte of every packet, in pieces no larger than asked for,
    /// returns the window each packet held, and reports the end after CLOSE_RSP (with its
    /// payload, or by its type alone).
    #[tokio::test]
    async fn grpc_discard_takes_packets_whole_and_ends_at_close() {
        let closes = [
            Packet {
                r#type: PacketType::CloseRsp as i32,
                payload: Some(Payload::CloseResponse(CloseResponse {
                    connect_id: 7,
                    error: String::new(),
                })),
            },
            Packet {
                r#type: PacketType::CloseRsp as i32,
                payload: None,
            },
        ];
        for close in closes {
            let Ends {
                mut io,
                inbound,
                taken,
                ..
            } = grpc_io();
            for (len, size) in [(10usize, 15usize), (0, 5), (25, 30)] {
                inbound
                    .send((spoke_tests::grpc::data(7, vec![1u8; len]), size))
                    .unwrap();
            }
            inbound.send((close, 9)).unwrap();
            let mut scratch = [0u8; 8];
            let mut pieces = vec![];
            loop {
                // The sender stays open: only CLOSE_RSP can end this, not a closed channel.
                let k =
                    tokio::time::timeout(Duration::from_secs(5), discard(&mut io, &mut scratch))
                        .await
                        .expect("CLOSE_RSP ends the stream")
                        .unwrap();
                if k == 0 {
                    break;
                }
                pieces.push(k);
            }
            assert_eq!(pieces, [8, 2, 8, 8, 8, 1]);
            assert_eq!(taken.bytes.load(Ordering::Acquire), 15 + 5 + 30 + 9);
        }
    }

    /// Sending hands the chunk over in packets of at most PACKET_MAX, the bytes themselves.
    #[tokio::test]
    async fn grpc_send_packets_the_chunk_without_copying() {
        let Ends {
            mut io, mut out, ..
        } = grpc_io();
        send(&mut io, Bytes::from_static(&ZEROS[..PACKET_MAX * 2 + 100]))
            .await
            .unwrap();
        let mut sizes = vec![];
        while let Ok(p) = out.try_recv() {
            let Some(Payload::Data(d)) = p.payload else {
                panic!("not DATA: {p:?}");
            };
            assert_eq!(d.connect_id, 7);
            // The static zeros themselves, not a copy of them.
            assert!(ZEROS.as_ptr_range().contains(&d.data.as_ptr()));
            sizes.push(d.data.len());
        }
        assert_eq!(sizes, [PACKET_MAX, PACKET_MAX, 100]);
    }
}
