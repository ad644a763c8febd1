//! Destination servers the agent dials: echo, a duplex pattern server (verifies what it receives,
//! sends a requested pseudo-random stream) and a tiny HTTP/1.1 server. They run as tasks of the
//! test's runtime on 127.0.0.1 ephemeral ports and stop when dropped.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Context;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

use crate::certs::CertKey;
use crate::data::{Pattern, Verifier};

/// I/O chunk size used by backends and clients.
pub const CHUNK: usize = 64 * 1024;

/// Counters shared by a backend's connections.
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Bytes written to clients (counted per successful write).
    pub bytes_sent: AtomicU64,
    /// Connections whose handler finished without error.
    pub completed: AtomicU64,
    /// Connections whose handler failed (I/O error or corrupted upload).
    pub failed: AtomicU64,
}

impl Stats {
    fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::SeqCst)
    }
    /// Snapshot `(accepted, completed, failed)`.
    pub fn snapshot(&self) -> (u64, u64, u64) {
        (
            Self::get(&self.accepted),
            Self::get(&self.completed),
            Self::get(&self.failed),
        )
    }
    /// The snapshot once at least `handlers` handlers have ended (or after `within`). A handler
    /// is counted after it returns, which races with its client seeing the close it caused.
    pub async fn settled(&self, handlers: u64, within: std::time::Duration) -> (u64, u64, u64) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let (acc, done, failed) = self.snapshot();
            if done + failed >= handlers || tokio::time::Instant::now() >= deadline {
                return (acc, done, failed);
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    /// Bytes written so far.
    pub fn sent(&self) -> u64 {
        Self::get(&self.bytes_sent)
    }
}

/// A running backend; aborted (listener and all its connections) on drop.
#[derive(Debug)]
pub struct Backend {
    /// Listening address.
    pub addr: SocketAddr,
    /// Shared counters.
    pub stats: Arc<Stats>,
    task: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    /// `host:port` string of the listener.
    pub fn target(&self) -> String {
        self.addr.to_string()
    }
}

async fn serve<F, Fut>(handler: F) -> Backend
where
    F: Fn(TcpStream, Arc<Stats>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind backend");
    let addr = listener.local_addr().expect("backend addr");
    let stats = Arc::new(Stats::default());
    let st = stats.clone();
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((sock, _)) = accepted else { continue };
                    let _ = sock.set_nodelay(true);
                    st.accepted.fetch_add(1, Ordering::SeqCst);
                    let st = st.clone();
                    let fut = handler(sock, st.clone());
                    conns.spawn(async move {
                        let counter = if fut.await.is_ok() { &st.completed } else { &st.failed };
                        counter.fetch_add(1, Ordering::SeqCst);
                    });
                }
                Some(_) = conns.join_next() => {}
            }
        }
    });
    Backend { addr, stats, task }
}

/// Echoes every byte back until the client closes.
pub async fn echo() -> Backend {
    serve(|mut sock, _| async move {
        let (mut r, mut w) = sock.split();
        tokio::io::copy(&mut r, &mut w).await?;
        Ok(())
    })
    .await
}

/// Writes `len` bytes of `Pattern(seed)` to `w`, counting into `sent`.
pub async fn send_pattern<W: AsyncWrite + Unpin>(
    w: &mut W,
    seed: u64,
    len: u64,
    sent: Option<&AtomicU64>,
) -> std::io::Result<()> {
    let mut pattern = Pattern::new(seed);
    let mut buf = vec![0u8; CHUNK];
    let mut left = len;
    while left > 0 {
        let n = (left as usize).min(CHUNK);
        pattern.fill(&mut buf[..n]);
        w.write_all(&buf[..n]).await?;
        if let Some(sent) = sent {
            sent.fetch_add(n as u64, Ordering::SeqCst);
        }
        left -= n as u64;
    }
    w.flush().await
}

/// Reads exactly `len` bytes from `r`, verifying them against `Pattern(seed)`.
pub async fn recv_pattern<R: AsyncRead + Unpin>(
    r: &mut R,
    seed: u64,
    len: u64,
) -> anyhow::Result<()> {
    let mut verifier = Verifier::new(seed, len);
    let mut buf = vec![0u8; CHUNK];
    while verifier.remaining() > 0 {
        let want = (verifier.remaining() as usize).min(CHUNK);
        let n = r.read(&mut buf[..want]).await.context("reading payload")?;
        anyhow::ensure!(
            n > 0,
            "EOF after {} of {len} payload bytes",
            verifier.received()
        );
        verifier.feed(&buf[..n]);
    }
    verifier.finish()
}

/// What a client of [`pattern`] asks for: it uploads `up_len` bytes of `Pattern(up_seed)` and
/// downloads `down_len` bytes of `Pattern(down_seed)`.
#[derive(Debug, Clone, Copy)]
pub struct PatternRequest {
    /// Bytes the backend sends.
    pub down_len: u64,
    /// Seed of the downloaded stream.
    pub down_seed: u64,
    /// Bytes the client sends.
    pub up_len: u64,
    /// Seed of the uploaded stream.
    pub up_seed: u64,
}

impl PatternRequest {
    const HEADER: usize = 32;

    /// Download only.
    pub fn download(len: u64, seed: u64) -> Self {
        Self {
            down_len: len,
            down_seed: seed,
            up_len: 0,
            up_seed: 0,
        }
    }

    fn encode(&self) -> [u8; Self::HEADER] {
        let mut h = [0u8; Self::HEADER];
        for (i, v) in [self.down_len, self.down_seed, self.up_len, self.up_seed]
            .into_iter()
            .enumerate()
        {
            h[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        h
    }

    fn decode(h: &[u8; Self::HEADER]) -> Self {
        let f = |i: usize| u64::from_le_bytes(h[i * 8..i * 8 + 8].try_into().unwrap());
        Self {
            down_len: f(0),
            down_seed: f(1),
            up_len: f(2),
            up_seed: f(3),
        }
    }

    /// Sends only the request header (e.g. for a client that then stops reading).
    pub async fn send_header<W: AsyncWrite + Unpin>(&self, w: &mut W) -> std::io::Result<()> {
        w.write_all(&self.encode()).await?;
        w.flush().await
    }

    /// Runs the whole exchange over `io`: header, upload and verified download concurrently, then
    /// requires the tunnel to be closed by the far end (EOF).
    pub async fn run<S: AsyncRead + AsyncWrite + Unpin>(&self, io: S) -> anyhow::Result<()> {
        let (mut r, mut w) = tokio::io::split(io);
        self.send_header(&mut w)
            .await
            .context("sending request header")?;
        let upload = async {
            send_pattern(&mut w, self.up_seed, self.up_len, None)
                .await
                .context("uploading")?;
            anyhow::Ok(w)
        };
        let download = async {
            recv_pattern(&mut r, self.down_seed, self.down_len)
                .await
                .context("downloading")?;
            let mut extra = [0u8; 1];
            let n = r
                .read(&mut extra)
                .await
                .context("waiting for EOF after the payload")?;
            anyhow::ensure!(
                n == 0,
                "extra bytes after the {}-byte payload",
                self.down_len
            );
            anyhow::Ok(())
        };
        let (w, ()) = tokio::try_join!(upload, download)?;
        drop(w);
        Ok(())
    }
}

/// TLS echo server presenting `identity` (a kubelet stand-in: the client speaks first, with its
/// ClientHello): handshake, then echoes every byte until the client closes.
pub async fn tls_echo(identity: &CertKey) -> Backend {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_slice_iter(identity.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("backend certificate PEM");
    let key = PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes()).expect("backend key PEM");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .expect("backend certificate");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    serve(move |sock, _| {
        let acceptor = acceptor.clone();
        async move {
            let tls = acceptor.accept(sock).await.context("TLS handshake")?;
            let (mut r, mut w) = tokio::io::split(tls);
            tokio::io::copy(&mut r, &mut w).await?;
            w.shutdown().await?;
            Ok(())
        }
    })
    .await
}

/// Duplex pattern server: reads a [`PatternRequest`] header, then concurrently sends the requested
/// download and verifies the upload; closes once both are done. A corrupted upload counts as
/// `failed` in [`Stats`].
pub async fn pattern() -> Backend {
    serve(|sock, stats| async move {
        let (mut r, mut w) = sock.into_split();
        let mut header = [0u8; PatternRequest::HEADER];
        r.read_exact(&mut header).await?;
        let req = PatternRequest::decode(&header);
        let send = send_pattern(&mut w, req.down_seed, req.down_len, Some(&stats.bytes_sent));
        let recv = recv_pattern(&mut r, req.up_seed, req.up_len);
        let (sent, received) = tokio::join!(send, recv);
        sent?;
        received?;
        w.shutdown().await?;
        Ok(())
    })
    .await
}

/// HTTP/1.1 server answering `GET /bytes/<len>?seed=<seed>` with `len` bytes of `Pattern(seed)`
/// (Content-Length, then close), anything else with 404.
pub async fn http() -> Backend {
    serve(|mut sock, stats| async move {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            anyhow::ensure!(sock.read(&mut byte).await? == 1, "EOF in request header");
            head.push(byte[0]);
            anyhow::ensure!(head.len() < 16 * 1024, "request header too large");
        }
        let head = String::from_utf8_lossy(&head);
        let target = head.split_whitespace().nth(1).unwrap_or("");
        let parsed = target.strip_prefix("/bytes/").and_then(|rest| {
            let (len, seed) = rest.split_once("?seed=").unwrap_or((rest, "0"));
            Some((len.parse::<u64>().ok()?, seed.parse::<u64>().ok()?))
        });
        match parsed {
            Some((len, seed)) => {
                let header = format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n");
                sock.write_all(header.as_bytes()).await?;
                send_pattern(&mut sock, seed, len, Some(&stats.bytes_sent)).await?;
            }
            None => sock.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await?,
        }
        sock.shutdown().await?;
        Ok(())
    })
    .await
}

/// Client side of [`http`] over an open tunnel: `GET /bytes/<len>?seed=<seed>`, then requires a
/// 200 with `Content-Length: len`, exactly `len` bytes of `Pattern(seed)` and the server's close.
pub async fn http_get_pattern(io: &mut crate::BoxIo, len: u64, seed: u64) -> anyhow::Result<()> {
    io.write_all(
        format!("GET /bytes/{len}?seed={seed} HTTP/1.1\r\nHost: backend\r\n\r\n").as_bytes(),
    )
    .await
    .context("sending the request")?;
    io.flush().await?;
    let head = crate::connect::read_head(io).await?;
    anyhow::ensure!(
        head.starts_with("HTTP/1.1 200 ")
            && head
                .lines()
                .any(|l| l.eq_ignore_ascii_case(&format!("content-length: {len}"))),
        "unexpected response head {head:?}"
    );
    recv_pattern(io, seed, len).await.context("response body")?;
    let mut extra = [0u8; 1];
    let n = io
        .read(&mut extra)
        .await
        .context("waiting for the server's close")?;
    anyhow::ensure!(n == 0, "bytes after the {len}-byte body");
    Ok(())
}

/// Reserves a 127.0.0.1 port that refuses connections: the socket is bound but never listens, so
/// nothing else can take the port while the guard lives and every SYN gets a RST.
pub fn refusing_port() -> (tokio::net::TcpSocket, SocketAddr) {
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind("127.0.0.1:0".parse().unwrap()).expect("bind");
    let addr = sock.local_addr().expect("local addr");
    (sock, addr)
}
