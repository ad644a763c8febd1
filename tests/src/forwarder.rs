//! TCP forwarders run by the harness: a round-robin "load balancer" in front of several servers'
//! agent ports, and a TCP→Unix-socket relay (curl cannot speak to a proxy over a Unix socket:
//! with `--unix-socket` it silently ignores `-x`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::task::{JoinHandle, JoinSet};

/// Where a forwarder sends connections.
#[derive(Debug, Clone)]
pub enum Target {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix socket path.
    Uds(PathBuf),
}

/// A running forwarder on 127.0.0.1; stopped (with its connections) on drop.
#[derive(Debug)]
pub struct Forwarder {
    /// Listening address.
    pub addr: SocketAddr,
    /// Connections accepted so far.
    pub accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pipe(client: TcpStream, target: Target) -> std::io::Result<()> {
    let mut client = client;
    match target {
        Target::Tcp(addr) => {
            let mut up = TcpStream::connect(addr).await?;
            up.set_nodelay(true)?;
            tokio::io::copy_bidirectional(&mut client, &mut up).await?;
        }
        Target::Uds(path) => {
            let mut up = UnixStream::connect(path).await?;
            tokio::io::copy_bidirectional(&mut client, &mut up).await?;
        }
    }
    Ok(())
}

impl Forwarder {
    /// Forwards the i-th accepted connection to `targets[i % len]`.
    pub async fn round_robin(targets: Vec<Target>) -> Self {
        assert!(!targets.is_empty());
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind forwarder");
        let addr = listener.local_addr().expect("forwarder addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    Ok((sock, _)) = listener.accept() => {
                        let _ = sock.set_nodelay(true);
                        let i = count.fetch_add(1, Ordering::SeqCst);
                        conns.spawn(pipe(sock, targets[i % targets.len()].clone()));
                    }
                    Some(_) = conns.join_next() => {}
                }
            }
        });
        Self {
            addr,
            accepted,
            task,
        }
    }

    /// Relays TCP connections to the Unix socket at `path`.
    pub async fn to_uds(path: PathBuf) -> Self {
        Self::round_robin(vec![Target::Uds(path)]).await
    }
}
