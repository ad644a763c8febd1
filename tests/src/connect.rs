//! Raw HTTP CONNECT client (what kube-apiserver does) over the server's frontends.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rustls::ClientConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::BoxIo;

/// Where a server's frontend listens.
#[derive(Clone)]
pub enum Frontend {
    /// Plaintext over a Unix socket.
    Uds(PathBuf),
    /// mTLS over TCP with this client config.
    Tls(SocketAddr, Arc<ClientConfig>),
}

impl std::fmt::Debug for Frontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Frontend::Uds(p) => write!(f, "Uds({})", p.display()),
            Frontend::Tls(a, _) => write!(f, "Tls({a})"),
        }
    }
}

impl Frontend {
    /// Opens a raw stream (TLS handshake done for [`Frontend::Tls`]).
    pub async fn open(&self) -> std::io::Result<BoxIo> {
        Ok(match self {
            Frontend::Uds(path) => Box::new(UnixStream::connect(path).await?),
            Frontend::Tls(addr, config) => {
                Box::new(crate::tls::connect(*addr, config.clone()).await?)
            }
        })
    }
}

/// The proxy's answer to a CONNECT.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Response header block (without the final blank line).
    pub head: String,
    /// Body read until close (only for non-200 answers).
    pub body: String,
}

/// Sends `CONNECT target` on `io` and reads the response header byte by byte, so no tunnel byte
/// is consumed. For a non-200 answer the body is read until the proxy closes (5 s at most).
pub async fn connect_on(io: BoxIo, target: &str) -> anyhow::Result<(Reply, BoxIo)> {
    request_on(io, &head(target)).await
}

/// The request head of a CONNECT to `target`, as curl writes it.
pub fn head(target: &str) -> String {
    format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n")
}

/// The CONNECT head kube-apiserver's egress dialer writes (`proxyProtocol: HTTPConnect`, over
/// the Unix socket or mTLS): exactly this, no other header.
pub fn kube_apiserver_head(target: &str) -> String {
    format!("CONNECT {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
}

/// Like [`connect_on`] with the request head written as given.
pub async fn request_on(mut io: BoxIo, head: &str) -> anyhow::Result<(Reply, BoxIo)> {
    io.write_all(head.as_bytes()).await?;
    io.flush().await?;
    let head = read_head(&mut io).await?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad CONNECT response {head:?}"))?;
    let mut body = Vec::new();
    if status != 200 {
        let _ = tokio::time::timeout(Duration::from_secs(5), io.read_to_end(&mut body)).await;
    }
    Ok((
        Reply {
            status,
            head,
            body: String::from_utf8_lossy(&body).into_owned(),
        },
        io,
    ))
}

/// Reads up to and including `\r\n\r\n`, one byte at a time.
pub async fn read_head(io: &mut BoxIo) -> anyhow::Result<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = io
            .read(&mut byte)
            .await
            .context("reading CONNECT response")?;
        anyhow::ensure!(
            n == 1,
            "connection closed before a complete response header; got {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
        anyhow::ensure!(head.len() <= 64 * 1024, "response header too long");
    }
    head.truncate(head.len() - 4);
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// Opens `frontend` and CONNECTs to `target` (10 s timeout for the whole handshake).
pub async fn connect(frontend: &Frontend, target: &str) -> anyhow::Result<(Reply, BoxIo)> {
    tokio::time::timeout(Duration::from_secs(10), async {
        let io = frontend
            .open()
            .await
            .with_context(|| format!("opening frontend {frontend:?}"))?;
        connect_on(io, target).await
    })
    .await
    .with_context(|| format!("CONNECT {target} via {frontend:?} timed out"))?
}

/// Like [`connect`] but requires `200 Connection Established`; returns the tunnel.
pub async fn tunnel(frontend: &Frontend, target: &str) -> anyhow::Result<BoxIo> {
    let (reply, io) = connect(frontend, target).await?;
    anyhow::ensure!(
        reply.status == 200,
        "CONNECT {target} via {frontend:?}: {} {}",
        reply.head,
        reply.body
    );
    Ok(io)
}

/// One short echo round trip through a fresh tunnel to the echo server at `echo`.
pub async fn echo_roundtrip(frontend: &Frontend, echo: &str) -> anyhow::Result<()> {
    let mut io = tunnel(frontend, echo).await?;
    let msg = b"spoke echo probe";
    io.write_all(msg).await?;
    let mut back = [0u8; 16];
    tokio::time::timeout(Duration::from_secs(10), io.read_exact(&mut back))
        .await
        .context("echo timed out")??;
    anyhow::ensure!(
        &back == msg,
        "echo returned {:?}",
        String::from_utf8_lossy(&back)
    );
    Ok(())
}

/// One echo round trip of `msg` on an open tunnel to an echo server (5 s at most).
pub async fn echo_once(io: &mut BoxIo, msg: &[u8]) -> anyhow::Result<()> {
    io.write_all(msg).await?;
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), io.read_exact(&mut back)).await??;
    anyhow::ensure!(
        back == msg,
        "echo mismatch: sent {:?}, got {:?}",
        String::from_utf8_lossy(msg),
        String::from_utf8_lossy(&back)
    );
    Ok(())
}

/// Fails if the proxy sends anything (bytes or EOF) within `quiet` after its answer, before the
/// client has spoken: kube-apiserver refuses a tunnel with bytes buffered behind the 200 head.
pub async fn nothing_follows(io: &mut BoxIo, quiet: Duration) -> anyhow::Result<()> {
    let mut early = [0u8; 64];
    match tokio::time::timeout(quiet, io.read(&mut early)).await {
        Err(_) => Ok(()),
        Ok(Ok(0)) => anyhow::bail!("the proxy closed the tunnel right after its answer"),
        Ok(Ok(n)) => anyhow::bail!(
            "{n} byte(s) followed the answer before the client spoke: {:?}",
            String::from_utf8_lossy(&early[..n])
        ),
        Ok(Err(e)) => anyhow::bail!("reading after the answer failed: {e}"),
    }
}
