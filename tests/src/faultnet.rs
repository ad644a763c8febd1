//! Fault-injection plumbing for e2e_faults / e2e_ops: running code and creating sockets inside a
//! network namespace (per thread, so the test process itself never leaves the root namespace),
//! a TCP relay that can hold every chunk for a fixed delay (a userspace "long link"), two
//! namespaces joined by a veth pair, and signals for processes under test.
//!
//! Nothing is added to the root namespace: addresses and links live only in namespaces created
//! here (deleted on drop by [`crate::nsguard::NetNs`]).

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

use crate::nsguard::NetNs;

fn setns(name: &str) -> anyhow::Result<()> {
    let path = format!("/var/run/netns/{name}");
    let file = std::fs::File::open(&path).with_context(|| format!("open {path}"))?;
    // SAFETY: setns on a valid namespace fd only changes the calling thread's network namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    anyhow::ensure!(
        rc == 0,
        "setns({path}): {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// Runs `f` on a scoped thread that joined namespace `ns` (borrows allowed). Processes spawned
/// and sockets created by `f` live in the namespace. Panics propagate.
pub fn in_ns<T: Send>(ns: &NetNs, f: impl FnOnce() -> T + Send) -> T {
    let name = ns.name().to_string();
    std::thread::scope(|s| {
        s.spawn(move || {
            setns(&name).expect("enter namespace");
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

/// Like [`in_ns`] with a fresh current-thread tokio runtime around `fut`.
pub fn block_in_ns<T: Send>(ns: &NetNs, fut: impl std::future::Future<Output = T> + Send) -> T {
    in_ns(ns, move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(fut)
    })
}

/// Binds a TCP listener at `addr` inside `ns` (root namespace if `None`).
pub fn listen_in(ns: Option<&NetNs>, addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let bind = move || -> anyhow::Result<std::net::TcpListener> {
        let l = std::net::TcpListener::bind(addr).with_context(|| format!("bind {addr}"))?;
        l.set_nonblocking(true)?;
        Ok(l)
    };
    match ns {
        Some(ns) => in_ns(ns, bind),
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
            std::thread::spawn(move || {
                setns(&name).map_err(std::io::Error::other)?;
                std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            })
            .join()
            .map_err(|_| std::io::Error::other("connect thread panicked"))?
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

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("ip").args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

impl Link {
    /// Creates both namespaces and the veth pair (created inside `left`, so the root namespace
    /// never sees it).
    pub fn create() -> anyhow::Result<Self> {
        let left = NetNs::create()?;
        let right = NetNs::create()?;
        ip(&[
            "-n",
            left.name(),
            "link",
            "add",
            "vl",
            "type",
            "veth",
            "peer",
            "name",
            "vr",
            "netns",
            right.name(),
        ])?;
        ip(&[
            "-n",
            left.name(),
            "addr",
            "add",
            "10.213.7.1/30",
            "dev",
            "vl",
        ])?;
        ip(&[
            "-n",
            right.name(),
            "addr",
            "add",
            "10.213.7.2/30",
            "dev",
            "vr",
        ])?;
        ip(&["-n", left.name(), "link", "set", "vl", "up"])?;
        ip(&["-n", right.name(), "link", "set", "vr", "up"])?;
        Ok(Self { left, right })
    }

    /// `ip link set vl up|down` in the left namespace (silently cuts or restores the path).
    pub fn set_up(&self, up: bool) -> anyhow::Result<()> {
        ip(&[
            "-n",
            self.left.name(),
            "link",
            "set",
            "vl",
            if up { "up" } else { "down" },
        ])
    }
}

/// Whether `ip` and `nft` exist (for namespace tests).
pub fn have_tools() -> bool {
    ["ip", "nft"].iter().all(|t| {
        std::process::Command::new(t)
            .arg("-V")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    })
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
