//! Fault-injection plumbing for e2e_faults / e2e_ops: sockets inside a network namespace (made
//! by a thread that joined it, so the test process itself never leaves the root namespace), a
//! TCP relay that can hold every chunk for a fixed delay (a userspace "long link"), two
//! namespaces joined by a veth pair, and signals for processes under test.
//!
//! Nothing is added to the root namespace: addresses and links live only in namespaces of
//! [`crate::netns`].

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

use crate::netns::{veth, NetNs};

/// Binds a TCP listener at `addr` inside `ns` (root namespace if `None`).
pub fn listen_in(ns: Option<&NetNs>, addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let bind = move || -> anyhow::Result<std::net::TcpListener> {
        let l = std::net::TcpListener::bind(addr).with_context(|| format!("bind {addr}"))?;
        l.set_nonblocking(true)?;
        Ok(l)
    };
    match ns {
        Some(ns) => ns.run(bind),
        None => bind(),
    }
}

/// Connects to `addr` from inside namespace `ns` (root namespace if `None`); 5 s timeout.
pub async fn connect_in(ns: Option<String>, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let std_stream = match ns {
        None => {
            return tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
                .await
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect"))?
        }
        Some(name) => tokio::task::spawn_blocking(move || {
            NetNs::named(&name)
                .spawn(move || std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)))
                .join()
                .map_err(|_| std::io::Error::other("connect thread panicked"))?
                .map_err(std::io::Error::other)?
        })
        .await
        .map_err(std::io::Error::other)??,
    };
    std_stream.set_nonblocking(true)?;
    TcpStream::from_std(std_stream)
}

/// A TCP relay: accepts on a listener (in any namespace), connects to `upstream` (from any
/// namespace), and copies bytes both ways, optionally holding every chunk for `delay` before
/// forwarding it (unbounded queue: a long, fat link). Stops with all its connections on drop.
#[derive(Debug)]
pub struct Relay {
    /// Listening address.
    pub addr: SocketAddr,
    /// Bytes relayed (both directions).
    pub bytes: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn delayed_copy(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
    bytes: Arc<AtomicU64>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Option<Vec<u8>>)>();
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = tx.send((Instant::now() + delay, None));
                    return;
                }
                Ok(n) => {
                    if tx
                        .send((Instant::now() + delay, Some(buf[..n].to_vec())))
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due.into()).await;
            match chunk {
                Some(c) => {
                    if w.write_all(&c).await.is_err() {
                        return;
                    }
                    bytes.fetch_add(c.len() as u64, Ordering::Relaxed);
                }
                None => {
                    let _ = w.shutdown().await;
                    return;
                }
            }
        }
    };
    tokio::join!(reader, writer);
}

impl Relay {
    /// Starts a relay on `listener` to `upstream`, connecting from namespace `upstream_ns`.
    pub fn start(
        listener: std::net::TcpListener,
        upstream_ns: Option<String>,
        upstream: SocketAddr,
        delay: Duration,
    ) -> Self {
        let listener = TcpListener::from_std(listener).expect("tokio listener");
        let addr = listener.local_addr().expect("relay addr");
        let bytes = Arc::new(AtomicU64::new(0));
        let total = bytes.clone();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    Ok((down, _)) = listener.accept() => {
                        let (ns, total) = (upstream_ns.clone(), total.clone());
                        conns.spawn(async move {
                            let Ok(up) = connect_in(ns, upstream).await else { return };
                            let _ = (down.set_nodelay(true), up.set_nodelay(true));
                            let (dr, dw) = down.into_split();
                            let (ur, uw) = up.into_split();
                            tokio::join!(
                                delayed_copy(dr, uw, delay, total.clone()),
                                delayed_copy(ur, dw, delay, total)
                            );
                        });
                    }
                    Some(_) = conns.join_next() => {}
                }
            }
        });
        Self { addr, bytes, task }
    }

    /// Bytes relayed so far.
    pub fn relayed(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// Two namespaces joined by a veth pair: `left` (`vl`, `LEFT_IP`) and `right` (`vr`, `RIGHT_IP`).
#[derive(Debug)]
pub struct Link {
    /// Left namespace.
    pub left: NetNs,
    /// Right namespace.
    pub right: NetNs,
}

/// Address of the left end (a /30 not used anywhere on this machine's root namespace).
pub const LEFT_IP: [u8; 4] = [10, 213, 7, 1];
/// Address of the right end.
pub const RIGHT_IP: [u8; 4] = [10, 213, 7, 2];

impl Link {
    /// Makes both namespaces and the veth pair (inside `left`, so the root namespace never
    /// sees it).
    pub fn create() -> anyhow::Result<Self> {
        let left = NetNs::create("left")?;
        let right = NetNs::create("right")?;
        veth(
            &left,
            "vl",
            &["10.213.7.1/30"],
            &right,
            "vr",
            &["10.213.7.2/30"],
        )?;
        Ok(Self { left, right })
    }

    /// `ip link set vl up|down` in the left namespace (silently cuts or restores the path).
    pub fn set_up(&self, up: bool) -> anyhow::Result<()> {
        let state = if up { "up" } else { "down" };
        self.left.ip(&["link", "set", "vl", state]).map(drop)
    }
}

/// Sends `sig` to `pid`.
pub fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {sig}): {}",
        std::io::Error::last_os_error()
    );
}

/// Closes `sock` with SO_LINGER 0, so the peer gets a RST instead of a FIN.
pub fn reset(sock: TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt reads a valid linger struct of the given size on an open fd.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(sock);
}
