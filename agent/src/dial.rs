//! Opening local endpoints for the server's dials: the agent's limits, `--allowed-destinations`,
//! the eBPF fast path, and error texts as Go's net package words them (upstream servers map
//! them to HTTP statuses and clients match phrases like "connection refused").
use crate::ebpf::{Ebpf, HeldWriter};
use crate::metrics::AgentMetrics;
use crate::policy::Destinations;
use spoke_proto::DialRequest;
use spoke_tunnel::relay::SplitIo;
use spoke_tunnel::session::{AgentEnd, DialTicket, EndpointDialer, Session};
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpSocket, TcpStream};

/// The agent's limits on endpoint connections (`--max-*` flags).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub connections: usize,
    pub pending_dials: usize,
    pub buffered_bytes: usize,
}

/// What opening an endpoint needs; every agent stream dials through it.
pub struct Endpoints {
    pub ebpf: Ebpf,
    pub destinations: Destinations,
    pub metrics: AgentMetrics,
    pub limits: Limits,
    pub dial_timeout: Duration,
}

impl EndpointDialer for Endpoints {
    /// The flag of the limit a new dial would pass, if any (existing connections go on).
    fn refuse(&self) -> Option<String> {
        let m = &self.metrics;
        let l = &self.limits;
        let (reason, flag) = if m.open_endpoint_connections.get() as usize >= l.connections {
            ("limit_connections", "--max-connections")
        } else if m.pending_dials.get() as usize >= l.pending_dials {
            ("limit_pending_dials", "--max-pending-dials")
        } else if m.relay.buffered_bytes.get() as usize >= l.buffered_bytes {
            ("limit_buffered_bytes", "--max-buffered-bytes")
        } else {
            return None;
        };
        spoke_tunnel::metrics::count(&m.refused_dials, reason);
        tracing::warn!(limit = flag, "refusing a dial: limit reached");
        Some(format!("agent limit reached: {flag}"))
    }

    /// Dials in its own task (a slow endpoint never holds up the stream), then relays.
    fn start(
        self: Arc<Self>,
        session: Arc<Session<AgentEnd>>,
        req: DialRequest,
        ticket: DialTicket,
    ) {
        self.metrics.pending_dials.inc();
        tokio::spawn(async move {
            let m = &self.metrics;
            let started = Instant::now();
            let result = tokio::select! {
                r = dial(&req.address, self.dial_timeout, &self.ebpf, &self.destinations) => Some(r),
                _ = ticket.cancel.cancelled() => None,
            };
            m.pending_dials.dec();
            let tcp = match result {
                None => return,
                Some(Err(f)) => {
                    m.dial_failure(f.reason);
                    tracing::info!(address = %req.address, error = %f.text, "dial failed");
                    session.dial_failed(&ticket, f.text);
                    return;
                }
                Some(Ok(tcp)) => tcp,
            };
            // None: cancelled while finishing; the socket is dropped.
            let Some((id, parts)) = session.dial_succeeded(&ticket) else {
                return;
            };
            m.dial_duration.observe(started.elapsed().as_secs_f64());
            tracing::debug!(address = %req.address, connection_id = id, "endpoint connected");
            m.open_endpoint_connections.inc();
            // The held relay and its backlog are boxed: they are larger, and every endpoint
            // connection's task (it lives as long as the connection) would otherwise be that
            // large too, fast path or not.
            let backlog = self.ebpf.backlog(&tcp).map(Box::new);
            let (reader, writer) = tcp.split_io();
            let relay = session.relay(id, parts);
            match backlog {
                Some(backlog) => {
                    let writer = HeldWriter {
                        inner: writer,
                        backlog: *backlog,
                    };
                    Box::pin(relay.run(reader, writer)).await
                }
                None => relay.run(reader, writer).await,
            }
            m.open_endpoint_connections.dec();
            tracing::debug!(connection_id = id, "endpoint connection closed");
        });
    }
}

/// A failed dial: Go-style text and the metric reason (`timeout` or `unknown`).
#[derive(Debug)]
pub struct DialFailure {
    pub text: String,
    pub reason: &'static str,
}

fn io_phrase(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "connect: connection refused".into(),
        Some(libc::ENETUNREACH) => "connect: network is unreachable".into(),
        Some(libc::EHOSTUNREACH) => "connect: no route to host".into(),
        Some(libc::ECONNRESET) => "connect: connection reset by peer".into(),
        Some(libc::EMFILE) | Some(libc::ENFILE) => "socket: too many open files".into(),
        Some(libc::EADDRNOTAVAIL) => "connect: cannot assign requested address".into(),
        Some(libc::ETIMEDOUT) => "i/o timeout".into(),
        _ => {
            // Rust appends " (os error N)"; Go does not.
            let s = e.to_string();
            let s = s.split(" (os error").next().unwrap_or(&s);
            format!("connect: {}", s.to_lowercase())
        }
    }
}

async fn connect_one(addr: SocketAddr, ebpf: &Ebpf) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_nodelay(true)?;
    // The fast path must know this socket before connect() fires its sock_ops callback.
    if let Err(e) = ebpf.prepare_socket(socket.as_fd(), addr.port()) {
        tracing::debug!(error = %e, "could not mark socket for the eBPF fast path");
    }
    socket.connect(addr).await
}

/// Dials `address` (`host:port`) over TCP within `timeout`, trying each resolved address.
pub async fn dial(
    address: &str,
    timeout: Duration,
    ebpf: &Ebpf,
    policy: &Destinations,
) -> Result<TcpStream, DialFailure> {
    let attempt = async {
        let addrs: Vec<SocketAddr> = match tokio::net::lookup_host(address).await {
            Ok(a) => a.collect(),
            Err(_) => {
                let host = spoke_tunnel::identifiers::dial_host(address);
                return Err(DialFailure {
                    text: format!("dial tcp: lookup {host}: no such host"),
                    reason: "unknown",
                });
            }
        };
        // Every resolved address must be allowed: DNS must not widen the policy.
        if let Some(denied) = addrs.iter().find(|a| !policy.allows(**a)) {
            return Err(DialFailure {
                text: format!(
                    "dial tcp {denied}: destination not allowed by --allowed-destinations"
                ),
                reason: "denied",
            });
        }
        let mut last = None;
        for addr in addrs {
            match connect_one(addr, ebpf).await {
                Ok(s) => return Ok(s),
                Err(e) => last = Some((addr, e)),
            }
        }
        Err(match last {
            Some((addr, e)) => DialFailure {
                text: format!("dial tcp {addr}: {}", io_phrase(&e)),
                reason: if e.raw_os_error() == Some(libc::ETIMEDOUT) {
                    "timeout"
                } else {
                    "unknown"
                },
            },
            None => DialFailure {
                text: format!("dial tcp: lookup {address}: no such host"),
                reason: "unknown",
            },
        })
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(DialFailure {
            text: format!("dial tcp {address}: i/o timeout"),
            reason: "timeout",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_phrases() {
        let refused = io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert_eq!(io_phrase(&refused), "connect: connection refused");
        let other = io::Error::from_raw_os_error(libc::EPERM);
        assert!(!io_phrase(&other).contains("os error"));
    }

    #[tokio::test]
    async fn refused_and_denied() {
        let ebpf = Ebpf::load(&crate::ebpf::EbpfConfig {
            mode: crate::ebpf::EbpfMode::Off,
            ..Default::default()
        })
        .unwrap();
        // Bind then drop a listener to get a port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let all = Destinations::default();
        let e = dial(
            &format!("127.0.0.1:{port}"),
            Duration::from_secs(2),
            &ebpf,
            &all,
        )
        .await
        .unwrap_err();
        assert_eq!(
            e.text,
            format!("dial tcp 127.0.0.1:{port}: connect: connection refused")
        );
        // Policy is checked before connecting (no DNS here: tests stay off the network).
        let only_ten = Destinations::parse(&["10.0.0.0/8".to_string()]).unwrap();
        let e = dial(
            &format!("127.0.0.1:{port}"),
            Duration::from_secs(2),
            &ebpf,
            &only_ten,
        )
        .await
        .unwrap_err();
        assert_eq!(e.reason, "denied");
        assert!(e.text.contains("not allowed"), "{}", e.text);
    }
}
