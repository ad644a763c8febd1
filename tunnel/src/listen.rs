//! Accepting connections: TLS handshakes run in their own tasks (a slow or hostile client
//! never holds up the accept loop) and finished streams are handed over in a channel.
//!
//! A reconnect storm (every agent of a large cluster dialing a restarted server within a
//! second) is bounded twice: at most `handshakes` TLS handshakes run at once, and at most
//! `pending` accepted connections wait for one. Past that the listener stops accepting and
//! the kernel's accept queue (listen backlog: the system's `somaxconn`, as Go listens) holds
//! the rest, which costs the server no memory. Open streams keep being served meanwhile.
use crate::tls::{Reloading, ServerTlsFiles};
use std::io;
use std::sync::Arc;

use crate::tls_bytes::TlsBytes;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;

/// How long a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Bounds on a TLS listener's work in progress.
#[derive(Clone, Copy, Debug)]
pub struct AcceptLimits {
    /// TLS handshakes running at once.
    pub handshakes: usize,
    /// Accepted connections waiting for a handshake slot.
    pub pending: usize,
}

impl Default for AcceptLimits {
    fn default() -> Self {
        Self {
            handshakes: 128,
            pending: 4096,
        }
    }
}

/// The listen backlog Go uses: the system's `net.core.somaxconn` (4096 on current kernels).
pub fn backlog() -> u32 {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(4096)
        .min(65535)
}

/// A TCP listener on `addr` with the system's largest accept queue ([`backlog`]).
pub fn listen(addr: std::net::SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog())
}

/// The right to run a TLS handshake now: one of `limits.handshakes`. Drop it when the
/// handshake is over.
pub struct HandshakeSlot {
    _slot: tokio::sync::OwnedSemaphorePermit,
    _admission: tokio::sync::OwnedSemaphorePermit,
    gauges: crate::metrics::ListenerGauges,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.gauges.handshaking.dec();
    }
}

/// Accepts TCP connections within `limits` and hands each, in its own task, to `handle`
/// with a [`HandshakeSlot`] once one is free.
pub fn accept_limited<F, Fut>(
    name: &'static str,
    listener: TcpListener,
    metrics: &crate::metrics::TlsMetrics,
    limits: AcceptLimits,
    handle: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn(TcpStream, std::net::SocketAddr, HandshakeSlot) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    // Each accepted connection holds an admission permit until its handshake ends; the
    // handshake itself also needs one of `handshakes` permits.
    let admitted = Arc::new(Semaphore::new(
        limits.pending.saturating_add(limits.handshakes).max(1),
    ));
    let handshakes = Arc::new(Semaphore::new(limits.handshakes.max(1)));
    let gauges = metrics.listener(name);
    let handle = Arc::new(handle);
    tokio::spawn(async move {
        loop {
            let admission = match admitted.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    gauges.paused.inc();
                    match admitted.clone().acquire_owned().await {
                        Ok(p) => p,
                        Err(_) => return,
                    }
                }
            };
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let (handshakes, gauges, handle) = (handshakes.clone(), gauges.clone(), handle.clone());
            gauges.pending.inc();
            tokio::spawn(async move {
                let slot = handshakes.acquire_owned().await;
                gauges.pending.dec();
                let Ok(slot) = slot else { return };
                gauges.handshaking.inc();
                let slot = HandshakeSlot {
                    _slot: slot,
                    _admission: admission,
                    gauges,
                };
                handle(tcp, peer, slot).await;
            });
        }
    })
}

/// Counts a refused handshake and says why.
pub fn handshake_failed(
    name: &str,
    peer: std::net::SocketAddr,
    metrics: &crate::metrics::TlsMetrics,
    e: Option<&io::Error>,
) {
    match e {
        Some(e) => {
            metrics.refused(crate::tls::handshake_failure_reason(e));
            tracing::info!(listener = name, %peer, error = %e, "TLS handshake refused");
        }
        None => {
            metrics.refused("timeout");
            tracing::info!(listener = name, %peer, "TLS handshake timed out");
        }
    }
}

/// A rustls server session on the current config (`None`, logged, if rustls refuses it).
fn server_session(
    name: &'static str,
    config: Arc<rustls::ServerConfig>,
) -> Option<rustls::server::UnbufferedServerConnection> {
    rustls::server::UnbufferedServerConnection::new(config)
        .inspect_err(|e| tracing::warn!(listener = name, error = %e, "cannot start a TLS session"))
        .ok()
}

/// Accepts TCP connections and completes TLS handshakes (rustls, then Spoke's own TLS 1.3
/// records: [`TlsBytes`]) with the current config, within `limits`.
pub fn tls_incoming(
    name: &'static str,
    listener: TcpListener,
    tls: Arc<Reloading<ServerTlsFiles>>,
    metrics: crate::metrics::TlsMetrics,
    limits: AcceptLimits,
) -> ReceiverStream<io::Result<TlsBytes<TcpStream>>> {
    let (tx, rx) = mpsc::channel(64);
    let m = metrics.clone();
    accept_limited(name, listener, &metrics, limits, move |tcp, peer, slot| {
        let (tx, metrics, config) = (tx.clone(), m.clone(), tls.current());
        async move {
            let Some(conn) = server_session(name, config) else {
                return;
            };
            let r = tokio::time::timeout(HANDSHAKE_TIMEOUT, TlsBytes::accept(tcp, conn)).await;
            drop(slot);
            match r {
                Ok(Ok(mut s)) => {
                    s.io_mut().count_errors(metrics.connection_errors());
                    let _ = tx.send(Ok(s)).await;
                }
                Ok(Err(e)) => handshake_failed(name, peer, &metrics, Some(&e)),
                Err(_) => handshake_failed(name, peer, &metrics, None),
            }
        }
    });
    ReceiverStream::new(rx)
}

/// Serves Spoke's HTTP/2 over TLS on `listener`: connections are accepted within `limits`,
/// their handshakes done with rustls' unbuffered API, then each runs one driver whose streams
/// `acceptor()` takes.
pub async fn serve_http2_tls<A>(
    name: &'static str,
    listener: TcpListener,
    tls: Arc<Reloading<ServerTlsFiles>>,
    metrics: crate::metrics::TlsMetrics,
    limits: AcceptLimits,
    opts: crate::http2::driver::Options,
    acceptor: A,
) where
    A: Fn() -> Box<dyn crate::http2::driver::Acceptor> + Send + Sync + 'static,
{
    use crate::http2::driver::Driver;
    use crate::http2::io::{Crypto, Io};
    let m = metrics.clone();
    let accepting = accept_limited(name, listener, &metrics, limits, move |tcp, peer, slot| {
        let (config, metrics, acceptor) = (tls.current(), m.clone(), acceptor());
        async move {
            let Some(conn) = server_session(name, config) else {
                return;
            };
            let mut io = Io::new(tcp, Crypto::Server(Box::new(conn)));
            io.count_errors(metrics.connection_errors());
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, io.handshake()).await;
            drop(slot);
            match handshake {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return handshake_failed(name, peer, &metrics, Some(&e)),
                Err(_) => return handshake_failed(name, peer, &metrics, None),
            }
            if let Err(e) = Driver::server(io, opts, acceptor).run().await {
                tracing::debug!(listener = name, %peer, error = %e, "connection ended");
            }
        }
    });
    let _ = accepting.await;
}

/// Send buffer of an accepted frontend Unix socket. A Unix stream socket has no autotuning:
/// at the default (about 208 KiB) a fast download stalls each time the client has not read
/// yet, and `cargo xtask bench` measured HTTP CONNECT over UDS downloads 7-15 % faster with
/// 1 MiB (two sets of three alternating runs). TCP sockets tune themselves up to `tcp_wmem`.
const UDS_SEND_BUFFER: usize = 1 << 20;

/// Sizes an accepted frontend Unix socket's send buffer (see [`UDS_SEND_BUFFER`]; the kernel
/// caps it at `net.core.wmem_max`). Failing changes nothing but speed.
pub fn frontend_unix_socket(s: &tokio::net::UnixStream) {
    if let Err(e) = socket2::SockRef::from(s).set_send_buffer_size(UDS_SEND_BUFFER) {
        tracing::debug!(error = %e, "cannot size a frontend socket's send buffer");
    }
}

/// Serves Spoke's HTTP/2 in plain text (h2c, prior knowledge) on a Unix socket.
pub async fn serve_http2_unix<A>(
    listener: tokio::net::UnixListener,
    opts: crate::http2::driver::Options,
    acceptor: A,
) where
    A: Fn() -> Box<dyn crate::http2::driver::Acceptor>,
{
    use crate::http2::driver::Driver;
    use crate::http2::io::{Crypto, Io};
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
                frontend_unix_socket(&s);
                let driver = Driver::server(Io::new(s, Crypto::Plain), opts, acceptor());
                tokio::spawn(async move {
                    if let Err(e) = driver.run().await {
                        tracing::debug!(error = %e, "frontend connection ended");
                    }
                });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "frontend accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// An accepted frontend socket gets the larger send buffer, as far as the kernel's
    /// `net.core.wmem_max` allows (Linux reports twice the size set, for its bookkeeping).
    #[tokio::test]
    async fn frontend_unix_sockets_get_a_larger_send_buffer() {
        let (a, _b) = tokio::net::UnixStream::pair().unwrap();
        let before = socket2::SockRef::from(&a).send_buffer_size().unwrap();
        super::frontend_unix_socket(&a);
        let after = socket2::SockRef::from(&a).send_buffer_size().unwrap();
        let max: usize = std::fs::read_to_string("/proc/sys/net/core/wmem_max")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(after, 2 * super::UDS_SEND_BUFFER.min(max), "was {before}");
    }
}
