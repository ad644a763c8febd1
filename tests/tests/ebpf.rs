//! eBPF data plane tests: the real `spoke-server` and `spoke-agent`, real programs, real
//! kernel, real namespaces. Need root.
//!
//! Topology (all namespaces created here, nothing touches the root namespace):
//!
//! ```text
//!   pod ns  10.211.0.2 fdcc::2 ──veth── 10.211.0.1 fdcc::1  node ns  10.212.0.1 fdcd::1 ──veth── 10.212.0.2 fdcd::2  outside ns
//!   (pod endpoints)                (spoke-agent, endpoints, kubelet-like :10250)   n-out: XDP guard   (spoke-server, clients of :10250)
//! ```
//!
//! spoke-server runs in the outside ("control plane") namespace with its agent port on
//! 10.212.0.2:8091, so the agent's tunnel crosses the veth that carries the XDP guard. Its
//! frontend is HTTP CONNECT over a Unix socket, which the test process reaches from any
//! namespace: every "tunnelled" connection below is client → UDS CONNECT → spoke-server →
//! mTLS tunnel → spoke-agent → endpoint, and the agent-local leg (agent → endpoint) is what
//! the socket fast path redirects. Assertions use the agent's `/metrics` (health port), its
//! `/status` JSON (admin port) and bpftool.
//!
//! Both binaries come from `cargo build --workspace --bins` (same profile as the tests).
//! Tests run one at a time (they share bpftool views, fixed ports and measure CPU).
use std::{
    collections::HashMap,
    fs::File,
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::unix::net::UnixStream,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc, Arc, Mutex, MutexGuard,
    },
    thread,
    time::{Duration, Instant},
};

use rustix::event::{self, PollFd, PollFlags};
use spoke_tests::{
    bins::{agent_bin, server_bin},
    certs::{CaSet, Pki},
    cgroup::Cgroup,
    connect, http,
    netns::{self, veth, NetNs},
    testdir::TestDir,
};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// spoke-server's agent port, in the outside namespace (the certificate names this address).
const SERVER_ADDR: &str = "10.212.0.2";
const SERVER_AGENT_PORT: u16 = 8091;
/// Health and admin listeners, on loopback of their own namespace.
const SERVER_HEALTH: &str = "127.0.0.1:8092";
const AGENT_HEALTH: &str = "127.0.0.1:8093";
const AGENT_ADMIN: &str = "127.0.0.1:8094";
const SERVER_ADMIN: &str = "127.0.0.1:8095";
const STARTUP: Duration = Duration::from_secs(30);

/// Runs `f` on a thread inside namespace `ns` (owned by the test's [`Node`]).
fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    NetNs::named(ns).run(f)
}

/// Whether an eBPF test may run (see [`netns::require_root`]).
fn require_root(test: &str, what: &str) -> bool {
    netns::require_root(test, what, &["bpftool", "ip"])
}

// ---------------------------------------------------------------------------------------
// Processes under test
// ---------------------------------------------------------------------------------------

static NEXT_LOG: AtomicUsize = AtomicUsize::new(0);

/// A child process with stdout+stderr in a log file; SIGKILLed on drop, log printed when the
/// test fails.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, mut cmd: Command, dir: &TestDir) -> Proc {
        let n = NEXT_LOG.fetch_add(1, Ordering::Relaxed);
        let log = dir.join(&format!("{name}-{n}.log"));
        let out = File::create(&log).expect("create process log");
        let err = out.try_clone().expect("clone log handle");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Proc {
            name: name.to_string(),
            child,
            log,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics with the log if the process has exited.
    fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "{} exited unexpectedly ({status}); log:\n{}",
                self.name,
                self.log()
            );
        }
    }

    /// Waits for the process to exit by itself; SIGKILLs it and panics after `timeout`.
    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            if Instant::now() > deadline {
                self.kill9();
                panic!(
                    "{} still running after {timeout:?}; log:\n{}",
                    self.name,
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
        if thread::panicking() {
            eprintln!(
                "----- {} log ({}) -----\n{}\n----- end of {} log -----",
                self.name,
                self.log.display(),
                self.log(),
                self.name
            );
        }
    }
}

/// A minimal HTTP/1.1 GET from inside namespace `ns`: (status, body).
fn http_get(ns: &str, addr: &str, path: &str) -> Result<(u16, String), String> {
    let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let path = path.to_string();
    in_ns(ns, move || {
        let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        c.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        let req = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
        c.write_all(req.as_bytes())
            .map_err(|e| format!("write {addr}: {e}"))?;
        let mut raw = Vec::new();
        c.read_to_end(&mut raw)
            .map_err(|e| format!("read {addr}: {e}"))?;
        let r = http::parse_response(&raw).map_err(|e| format!("{addr}{path}: {e:#}"))?;
        Ok((r.status, r.body))
    })
}

/// Polls `GET path` until it answers `want` (or `proc` exits, or `timeout` passes).
fn wait_status(proc: &mut Proc, ns: &str, addr: &str, path: &str, want: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        proc.assert_running();
        let last = match http_get(ns, addr, path) {
            Ok((status, _)) if status == want => return,
            Ok((status, body)) => format!("status {status} body {body:?}"),
            Err(e) => e,
        };
        assert!(
            Instant::now() < deadline,
            "{}: GET {addr}{path} did not answer {want} within {timeout:?}; last: {last}",
            proc.name
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// spoke-server in the outside namespace: `--mode=http-connect` over a Unix socket.
struct SpokeServer {
    proc: Proc,
    ns: String,
    uds: PathBuf,
}

impl SpokeServer {
    fn start(n: &Node) -> SpokeServer {
        let uds = n.dir.join("server.sock");
        let main = &n.pki;
        let flag = |name: &str, value: &dyn std::fmt::Display| format!("--{name}={value}");
        let (health, admin): (SocketAddr, SocketAddr) = (
            SERVER_HEALTH.parse().expect("addr"),
            SERVER_ADMIN.parse().expect("addr"),
        );
        let mut cmd = n.outside.command(server_bin()).expect("netns command");
        cmd.args([
            flag("mode", &"http-connect"),
            flag("uds-name", &uds.display()),
            flag("server-port", &0),
            flag("agent-bind-address", &SERVER_ADDR),
            flag("agent-port", &SERVER_AGENT_PORT),
            flag("cluster-cert", &main.server.cert.display()),
            flag("cluster-key", &main.server.key.display()),
            flag("cluster-ca-cert", &main.ca.display()),
            flag("health-bind-address", &health.ip()),
            flag("health-port", &health.port()),
            flag("admin-bind-address", &admin.ip()),
            flag("admin-port", &admin.port()),
            flag("server-id", &"server-ebpf"),
            flag("server-count", &1),
        ]);
        let mut server = SpokeServer {
            proc: Proc::spawn("spoke-server", cmd, &n.dir),
            ns: n.outside.name().to_string(),
            uds,
        };
        wait_status(
            &mut server.proc,
            &server.ns,
            SERVER_HEALTH,
            "/healthz",
            200,
            STARTUP,
        );
        let agent_port = SocketAddr::new(SERVER_ADDR.parse().expect("addr"), SERVER_AGENT_PORT);
        wait_for("the server's agent port and Unix socket", || {
            in_ns(&server.ns, move || {
                TcpStream::connect_timeout(&agent_port, Duration::from_secs(1)).is_ok()
            }) && UnixStream::connect(&server.uds).is_ok()
        });
        server
    }

    /// Starts an agent (with every capability) once the previous one is gone, and waits until
    /// both ends see the tunnel.
    fn start_agent(&mut self, n: &Node, extra: &[&str]) -> Agent {
        self.start_agent_as(n, false, extra)
    }

    /// Like [`SpokeServer::start_agent`]; `unprivileged` drops every capability first.
    fn start_agent_as(&mut self, n: &Node, unprivileged: bool, extra: &[&str]) -> Agent {
        self.wait_no_agent();
        let mut agent = Agent::spawn(n, unprivileged, extra);
        agent.wait_ready();
        wait_status(
            &mut self.proc,
            &self.ns,
            SERVER_HEALTH,
            "/readyz",
            200,
            STARTUP,
        );
        agent
    }

    /// Waits until the server has dropped every agent (readyz no longer 200), so the next
    /// CONNECT cannot be routed to a dead tunnel.
    fn wait_no_agent(&mut self) {
        let deadline = Instant::now() + STARTUP;
        loop {
            self.proc.assert_running();
            match http_get(&self.ns, SERVER_HEALTH, "/readyz") {
                Ok((200, _)) => {}
                Ok(_) => return,
                Err(e) => panic!("server health: {e}"),
            }
            assert!(
                Instant::now() < deadline,
                "server still reports a connected agent"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Opens a tunnel: `CONNECT target` on the Unix socket, `200` expected, then the stream
    /// carries the connection's bytes.
    fn tunnel(&self, target: &str) -> UnixStream {
        let mut s = UnixStream::connect(&self.uds)
            .unwrap_or_else(|e| panic!("connect {}: {e}", self.uds.display()));
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("read timeout");
        s.write_all(connect::head(target).as_bytes())
            .expect("write CONNECT");
        // Byte by byte, so no tunnel byte is consumed with the head.
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match s.read(&mut byte) {
                Ok(1) => head.push(byte[0]),
                other => panic!(
                    "CONNECT {target}: answer cut short ({other:?}) after {:?}",
                    String::from_utf8_lossy(&head)
                ),
            }
            assert!(head.len() < 64 * 1024, "CONNECT {target}: header too long");
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        if !head.starts_with("HTTP/1.1 200") {
            let mut body = String::new();
            let _ = s.read_to_string(&mut body);
            panic!("CONNECT {target} refused: {head}{body}");
        }
        s
    }

    fn cpu_seconds(&self) -> f64 {
        proc_cpu_seconds(self.proc.pid())
    }
}

/// The real spoke-agent in the node namespace, tunnelled to [`SpokeServer`].
struct Agent {
    proc: Proc,
    ns: String,
}

impl Agent {
    /// Spawns the agent; `unprivileged` runs it through `setpriv` without any capability.
    fn spawn(n: &Node, unprivileged: bool, extra: &[&str]) -> Agent {
        let main = &n.pki;
        let (health, admin): (SocketAddr, SocketAddr) = (
            AGENT_HEALTH.parse().expect("addr"),
            AGENT_ADMIN.parse().expect("addr"),
        );
        let mut cmd = if unprivileged {
            let mut c = n.node.command("setpriv").expect("netns command");
            c.args(["--inh-caps=-all", "--bounding-set=-all", "--"])
                .arg(agent_bin());
            c
        } else {
            n.node.command(agent_bin()).expect("netns command")
        };
        cmd.args([
            format!("--proxy-server-host={SERVER_ADDR}"),
            format!("--proxy-server-port={SERVER_AGENT_PORT}"),
            format!("--ca-cert={}", main.ca.display()),
            format!("--agent-cert={}", main.agent.cert.display()),
            format!("--agent-key={}", main.agent.key.display()),
            "--agent-id=node-1".into(),
            format!("--health-server-host={}", health.ip()),
            format!("--health-server-port={}", health.port()),
            format!("--admin-bind-address={}", admin.ip()),
            format!("--admin-server-port={}", admin.port()),
            "--sync-interval=100ms".into(),
            "--sync-interval-cap=1s".into(),
            // The test endpoints' ports (7300 is left out on purpose: see
            // `fast_path_leaves_unlisted_ports_to_tcp`).
            "--ebpf-fast-path-ports=7000,7001,7005,7010,7011,7012,7100,7200,10250".into(),
        ])
        .args(extra);
        Agent {
            proc: Proc::spawn("spoke-agent", cmd, &n.dir),
            ns: n.node.name().to_string(),
        }
    }

    /// Waits for /readyz 200: a tunnel to the server is up.
    fn wait_ready(&mut self) {
        wait_status(
            &mut self.proc,
            &self.ns,
            AGENT_HEALTH,
            "/readyz",
            200,
            STARTUP,
        );
    }

    fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Counters and gauges from the health port's /metrics, keyed by the sample's name with
    /// labels.
    fn metrics(&self) -> HashMap<String, f64> {
        let (status, body) =
            http_get(&self.ns, AGENT_HEALTH, "/metrics").expect("scrape agent /metrics");
        assert_eq!(status, 200, "agent /metrics: {body}");
        body.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                Some((name.to_string(), value.parse().ok()?))
            })
            .collect()
    }

    /// The `ebpf` object of the admin port's /status JSON.
    fn ebpf_status(&self) -> serde_json::Value {
        let (status, body) =
            http_get(&self.ns, AGENT_ADMIN, "/status").expect("agent admin /status");
        assert_eq!(status, 200, "agent /status: {body}");
        let json: serde_json::Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("agent /status is not JSON ({e}): {body}"));
        let ebpf = json["ebpf"].clone();
        assert!(ebpf.is_object(), "/status has no ebpf object: {body}");
        ebpf
    }

    fn kill9(&mut self) {
        self.proc.kill9();
    }

    fn cpu_seconds(&self) -> f64 {
        proc_cpu_seconds(self.pid())
    }
}

/// `ebpf[part]["state"]`, e.g. `state(&ebpf, "fast_path") == "on"`.
fn state(ebpf: &serde_json::Value, part: &str) -> String {
    ebpf[part]["state"].as_str().unwrap_or("").to_string()
}

fn detail(ebpf: &serde_json::Value, part: &str) -> String {
    ebpf[part]["detail"].as_str().unwrap_or("").to_string()
}

fn counter(m: &HashMap<String, f64>, name: &str) -> f64 {
    m.get(name).copied().unwrap_or(0.0)
}

fn delta(before: &HashMap<String, f64>, after: &HashMap<String, f64>, name: &str) -> f64 {
    counter(after, name) - counter(before, name)
}

const TRACKED: &str = "spoke_ebpf_sockets_tracked_total";
const PAIRS: &str = "spoke_ebpf_socket_pairs_total";
const CLOSED: &str = "spoke_ebpf_sockets_closed_total";
const PAIRS_REFUSED: &str = "spoke_ebpf_pairs_refused_total";
const REDIR_BYTES: &str = "spoke_ebpf_redirected_bytes_total";
const REDIR_MSGS: &str = "spoke_ebpf_redirected_messages_total";
const FALLBACKS: &str = "spoke_ebpf_backlog_fallbacks_total";
const HOLDS: &str = "spoke_ebpf_backlog_holds_total";
const HELD_SECONDS: &str = "spoke_ebpf_backlog_hold_seconds_total";
const READER_WAKEUPS: &str = "spoke_ebpf_backlog_reader_wakeups_total";
const WAKEUPS_SENT: &str = "spoke_ebpf_backlog_wakeups_sent_total";
const XDP_DENIED: &str = "spoke_ebpf_xdp_packets_total{action=\"drop\",reason=\"denied_source\"}";
const XDP_ALLOWED: &str = "spoke_ebpf_xdp_packets_total{action=\"pass\",reason=\"allowed_source\"}";

// ---------------------------------------------------------------------------------------
// Endpoints
// ---------------------------------------------------------------------------------------

/// A TCP server on a thread inside a namespace; stops on drop.
struct Backend {
    addr: SocketAddr,
    ns: String,
    stop: Arc<AtomicBool>,
}

#[derive(Clone, Copy)]
enum Behaviour {
    Echo,
    /// Reads an 8-byte little-endian length, then that many bytes; replies with one byte.
    /// (A tunnel has no half-close, so the end of the transfer cannot be an EOF.)
    Sink,
    /// Accepts and holds.
    Hold,
    /// Accepts and never reads, for 15 s (a stalled reader).
    Stall,
    /// Writes as fast as it can for 15 s, counting into [`FLOODED`], and never reads.
    Flood,
    /// Echoes, but reads 64 KiB at a time with a pause: a reader slower than the agent.
    SlowEcho,
    /// Writes [`WRITTEN_WHILE_READING`] bytes on one thread while another waits for one byte
    /// in a plain blocking read (no retry on EAGAIN), as a thread-per-connection server does.
    /// Puts what that read returned into [`READ_OUTCOMES`], then echoes the byte.
    WriteWhileReading,
}

const WRITTEN_WHILE_READING: usize = 32 << 20;
static READ_OUTCOMES: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Bytes the `Flood` backend managed to write.
static FLOODED: AtomicUsize = AtomicUsize::new(0);

impl Backend {
    fn start(ns: &NetNs, addr: &str, behaviour: Behaviour) -> Backend {
        let addr: SocketAddr = addr.parse().expect("backend addr");
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let flag = stop.clone();
        let _ = ns.spawn(move || {
            let listener = match TcpListener::bind(addr) {
                Ok(l) => l,
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return;
                }
            };
            let _ = tx.send(Ok(()));
            for conn in listener.incoming() {
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_nodelay(true);
                thread::spawn(move || serve(&mut conn, behaviour));
            }
        });
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => {}
            other => panic!("backend {addr} did not start: {other:?}"),
        }
        Backend {
            addr,
            ns: ns.name().to_string(),
            stop,
        }
    }
}

/// How the endpoints the fast path is meant for read: a Go server (the kubelet) or an epoll
/// loop answers EAGAIN by waiting for readiness and reading again. They need to: on a socket
/// in a sockmap the kernel's `tcp_bpf_recvmsg` returns EAGAIN even to a *blocking* read that
/// wakes without data (its own write space freeing up is enough), where plain TCP sleeps on;
/// see [`a_blocking_reader_of_a_listed_port_can_get_eagain`]. The test endpoints read through
/// this, as such a server would; a plain blocking read once cost a CI run its echo.
struct Polled<'a>(&'a mut TcpStream);

impl Read for Polled<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.0.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let mut fd = [PollFd::new(&*self.0, PollFlags::IN)];
                    event::poll(&mut fd, None)?;
                }
                other => return other,
            }
        }
    }
}

fn serve(conn: &mut TcpStream, behaviour: Behaviour) {
    let mut buf = vec![0u8; 256 * 1024];
    match behaviour {
        Behaviour::Echo => {
            while let Ok(n) = Polled(conn).read(&mut buf) {
                if n == 0 || conn.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = conn.shutdown(Shutdown::Write);
        }
        Behaviour::Sink => {
            let mut len = [0u8; 8];
            while Polled(conn).read_exact(&mut len).is_ok() {
                let mut left = u64::from_le_bytes(len) as usize;
                while left > 0 {
                    match Polled(conn).read(&mut buf[..left.min(256 * 1024)]) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => left -= n,
                    }
                }
                if conn.write_all(b"k").is_err() {
                    return;
                }
            }
        }
        Behaviour::Hold => {
            let _ = Polled(conn).read(&mut buf);
        }
        Behaviour::Stall => thread::sleep(Duration::from_secs(15)),
        Behaviour::Flood => {
            let _ = conn.set_write_timeout(Some(Duration::from_millis(200)));
            let end = Instant::now() + Duration::from_secs(15);
            while Instant::now() < end {
                match conn.write(&buf) {
                    Ok(n) => {
                        FLOODED.fetch_add(n, Ordering::Relaxed);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
                    Err(_) => return,
                }
            }
        }
        Behaviour::WriteWhileReading => {
            let mut w = conn.try_clone().expect("clone");
            let writer = thread::spawn(move || {
                let chunk = vec![5u8; 64 * 1024];
                let mut left = WRITTEN_WHILE_READING;
                while left > 0 {
                    let n = left.min(chunk.len());
                    if w.write_all(&chunk[..n]).is_err() {
                        return;
                    }
                    left -= n;
                }
            });
            let got = conn.read(&mut buf[..1]);
            let _ = writer.join();
            READ_OUTCOMES
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(format!("{got:?}"));
            if matches!(got, Ok(1)) {
                let _ = conn.write_all(&buf[..1]);
            }
        }
        Behaviour::SlowEcho => {
            while let Ok(n) = Polled(conn).read(&mut buf[..64 * 1024]) {
                if n == 0 || conn.write_all(&buf[..n]).is_err() {
                    break;
                }
                thread::sleep(Duration::from_millis(3));
            }
            let _ = conn.shutdown(Shutdown::Write);
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop.
        let addr = self.addr;
        let _ = NetNs::named(&self.ns)
            .spawn(move || TcpStream::connect_timeout(&addr, Duration::from_secs(1)))
            .join();
    }
}

/// Deterministic pseudo-random payload (xorshift), so corruption cannot go unnoticed.
fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Sends `data` to an echo service over `conn` and checks it comes back intact. Writes and
/// reads concurrently so neither side's buffers fill up; reads exactly `data.len()` bytes
/// (a tunnel cannot be half-closed). `conn` stays open.
fn echo_over(conn: &UnixStream, what: &str, data: &Arc<Vec<u8>>) {
    let mut w = conn.try_clone().expect("clone");
    let out = data.clone();
    let writer = thread::spawn(move || {
        for chunk in out.chunks(100_000) {
            w.write_all(chunk).expect("write into the tunnel");
        }
    });
    let mut back = vec![0u8; data.len()];
    let mut r = conn;
    r.read_exact(&mut back)
        .unwrap_or_else(|e| panic!("echo via {what}: reading back: {e}"));
    writer.join().expect("writer");
    assert_eq!(fnv1a(&back), fnv1a(data), "echo via {what}: checksum");
}

/// One tunnelled echo round trip to `target` (CONNECT, payload both ways, close).
fn tunnel_echo(server: &SpokeServer, target: &str, data: &Arc<Vec<u8>>) {
    let conn = server.tunnel(target);
    echo_over(&conn, &format!("tunnel to {target}"), data);
}

/// Sends `data` to an echo service at `addr` directly (from inside `ns`, no tunnel) and checks
/// it comes back intact.
fn echo_roundtrip(ns: &NetNs, addr: &str, data: Arc<Vec<u8>>) {
    let addr: SocketAddr = addr.parse().expect("addr");
    let h = ns.spawn(move || {
        let conn = TcpStream::connect(addr).expect("connect");
        conn.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let mut w = conn.try_clone().expect("clone");
        let out = data.clone();
        let writer = thread::spawn(move || {
            for chunk in out.chunks(100_000) {
                w.write_all(chunk).expect("write");
            }
            w.shutdown(Shutdown::Write).expect("shutdown");
        });
        let mut back = Vec::with_capacity(data.len());
        let mut r = conn;
        r.read_to_end(&mut back).expect("read echo");
        writer.join().expect("writer");
        assert_eq!(back.len(), data.len(), "echo via {addr}: length");
        assert_eq!(fnv1a(&back), fnv1a(&data), "echo via {addr}: checksum");
    });
    h.join().expect("client thread").expect("enter netns");
}

/// Entries in the loaded map called `name` (bpftool), which must be the only one by that name:
/// the tests run one agent at a time.
fn map_entries(name: &str) -> usize {
    let shown = netns::run(&["bpftool", "-j", "map", "show", "name", name]).expect("bpftool map");
    let maps: serde_json::Value = serde_json::from_str(&shown).expect("bpftool map show JSON");
    // One map comes as an object, several as a list.
    let found = maps.as_array().map_or(1, Vec::len);
    assert_eq!(found, 1, "maps called {name}: {shown}");
    let dump = netns::run(&["bpftool", "-j", "map", "dump", "name", name]).expect("bpftool dump");
    let entries: serde_json::Value = serde_json::from_str(&dump).expect("bpftool map dump JSON");
    entries
        .as_array()
        .map(Vec::len)
        .unwrap_or_else(|| panic!("{name}: not a list: {dump}"))
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------
// Setup shared by the tests
// ---------------------------------------------------------------------------------------

struct Node {
    // Drop order: processes are locals of the tests (dropped first); then the cgroup, the
    // namespaces and the scratch directory.
    cgroup: Cgroup,
    node: NetNs,
    pod: NetNs,
    outside: NetNs,
    /// Certificates, the server's Unix socket and the process logs.
    dir: TestDir,
    /// The PKI's trusted set; its server certificate also names 10.212.0.2.
    pki: CaSet,
}

impl Node {
    fn new(test: &str) -> Node {
        let cgroup = Cgroup::new().expect("cgroup");
        cgroup.enter().expect("enter cgroup");
        let node = NetNs::create("node").expect("node ns");
        let pod = NetNs::create("pod").expect("pod ns");
        let outside = NetNs::create("out").expect("outside ns");
        veth(
            &node,
            "n-pod",
            &["10.211.0.1/24", "fdcc::1/64"],
            &pod,
            "p-node",
            &["10.211.0.2/24", "fdcc::2/64"],
        )
        .expect("pod veth");
        veth(
            &node,
            "n-out",
            &["10.212.0.1/24", "fdcd::1/64"],
            &outside,
            "o-node",
            &["10.212.0.2/24", "fdcd::2/64"],
        )
        .expect("outside veth");
        let dir = TestDir::new(&format!("ebpf_{test}"));
        let pki = Pki::generate_with_server_sans(dir.path(), &[SERVER_ADDR]).main;
        Node {
            cgroup,
            node,
            pod,
            outside,
            dir,
            pki,
        }
    }

    fn cg(&self) -> String {
        self.cgroup.path.display().to_string()
    }
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

/// Agent-local legs of tunnelled connections (same netns over loopback, pod netns over veth,
/// IPv4 and IPv6) are redirected, payloads stay intact both ways, an unrelated pair on the
/// node is untouched, and entries leave the maps when sockets close. With `--ebpf=off` the
/// same traffic flows intact and nothing is redirected.
#[test]
fn fast_path_redirects_agent_legs_only() {
    if !require_root("fast_path_redirects_agent_legs_only", "root and eBPF") {
        return;
    }
    let _serial = serial();
    let n = Node::new("fast_path");
    let _local = Backend::start(&n.node, "127.0.0.1:7000", Behaviour::Echo);
    // A kubelet-like endpoint on the node's own (non-loopback) address.
    let _node_addr = Backend::start(&n.node, "10.212.0.1:7001", Behaviour::Echo);
    let _pod4 = Backend::start(&n.pod, "10.211.0.2:7000", Behaviour::Echo);
    let _pod6 = Backend::start(&n.pod, "[fdcc::2]:7000", Behaviour::Echo);
    let mut server = SpokeServer::start(&n);
    let mut agent = server.start_agent(&n, &["--ebpf=on", "--cgroup-path", &n.cg()]);
    let status = agent.ebpf_status();
    assert_eq!(state(&status, "fast_path"), "on", "{status}");
    // Readiness tells an operator the same.
    let (code, body) =
        http_get(&agent.ns, AGENT_HEALTH, "/readyz?verbose").expect("agent /readyz?verbose");
    assert_eq!(code, 200, "/readyz?verbose: {body}");
    assert!(
        body.contains("[+]ebpf ok (eBPF mode on: socket fast path on"),
        "/readyz?verbose does not report the fast path: {body}"
    );

    let data = Arc::new(payload(8 << 20, 7));
    let targets = [
        ("127.0.0.1:7000", "node-local endpoint"),
        ("10.212.0.1:7001", "endpoint on the node's address"),
        ("10.211.0.2:7000", "pod endpoint (IPv4, other netns)"),
        ("[fdcc::2]:7000", "pod endpoint (IPv6, other netns)"),
    ];
    for (target, what) in targets {
        let before = agent.metrics();
        tunnel_echo(&server, target, &data);
        let after = agent.metrics();
        assert_eq!(delta(&before, &after, PAIRS), 1.0, "{what}: one pair");
        assert_eq!(
            delta(&before, &after, TRACKED),
            2.0,
            "{what}: both sockets tracked"
        );
        let bytes = delta(&before, &after, REDIR_BYTES);
        // What the agent writes goes socket to socket (all of it unless the echo's reader
        // fell the backlog limit behind); what the endpoint writes back stays on TCP.
        let fell_back = delta(&before, &after, FALLBACKS);
        assert!(
            bytes > 0.0 && bytes <= data.len() as f64,
            "{what}: redirected {bytes} bytes, expected 1..={} (the agent's writes only)",
            data.len()
        );
        assert!(
            bytes == data.len() as f64 || fell_back >= 1.0,
            "{what}: {bytes} of {} bytes redirected without a backlog fallback",
            data.len()
        );
        wait_for("closed sockets to leave the maps", || {
            delta(&before, &agent.metrics(), CLOSED) >= 2.0
        });
    }
    // Every pair's entries went with its sockets: nothing is left for a later socket at a
    // freed address to inherit.
    for map in ["PEERS", "PAIRED", "CONSUMED", "WAITING", "PENDING"] {
        wait_for(&format!("{map} to empty once every pair closed"), || {
            map_entries(map) == 0
        });
    }

    // An unrelated client/server pair in the same cgroup and netns is never redirected.
    let before = agent.metrics();
    echo_roundtrip(&n.node, "127.0.0.1:7000", data.clone());
    echo_roundtrip(&n.pod, "10.211.0.2:7000", data.clone());
    let after = agent.metrics();
    for name in [TRACKED, PAIRS, REDIR_BYTES, REDIR_MSGS] {
        assert_eq!(
            delta(&before, &after, name),
            0.0,
            "unrelated traffic touched {name}"
        );
    }
    assert_eq!(
        counter(&after, "spoke_ebpf_program_attached{program=\"sock_ops\"}"),
        1.0
    );
    assert_eq!(
        counter(&after, "spoke_ebpf_program_attached{program=\"sk_msg\"}"),
        1.0
    );
    assert_eq!(
        counter(
            &after,
            "spoke_ebpf_program_attached{program=\"raw_tracepoint\"}"
        ),
        1.0
    );

    // The same tunnelled traffic with --ebpf=off: intact, and nothing redirected.
    agent.kill9();
    drop(agent);
    let agent = server.start_agent(&n, &["--ebpf=off", "--cgroup-path", &n.cg()]);
    let status = agent.ebpf_status();
    assert_eq!(state(&status, "fast_path"), "off", "{status}");
    assert_eq!(detail(&status, "fast_path"), "--ebpf=off", "{status}");
    let (_, body) =
        http_get(&agent.ns, AGENT_HEALTH, "/readyz?verbose").expect("agent /readyz?verbose");
    assert!(
        body.contains("socket fast path off: --ebpf=off"),
        "/readyz?verbose does not say the fast path is off: {body}"
    );
    for (target, _) in targets {
        tunnel_echo(&server, target, &data);
    }
    let m = agent.metrics();
    for name in [TRACKED, PAIRS, REDIR_BYTES, REDIR_MSGS] {
        assert_eq!(counter(&m, name), 0.0, "--ebpf=off: {name} moved");
    }
    assert_eq!(
        counter(&m, "spoke_ebpf_program_attached{program=\"sock_ops\"}"),
        0.0
    );
}

/// A redirect puts bytes into the reader's socket without charging its receive buffer, so a
/// reader that stops must not let the other side queue without bound (before the backlog
/// limit, 2 GiB piled up in 5 s and the writer then got ENOMEM). Both ways: the agent writing
/// to an endpoint that never reads, and an endpoint writing to a client that never reads.
/// The agent holds its writes back while the reader lags, so the kernel's fallback to TCP
/// (which leaves a reader two queues, and a short read with bytes still queued) never comes.
/// Then a reader slower than the agent: every byte arrives in order, still without a
/// fallback, and the next bytes are redirected.
#[test]
fn fast_path_memory_stays_bounded_when_a_reader_stalls() {
    if !require_root(
        "fast_path_memory_stays_bounded_when_a_reader_stalls",
        "root and eBPF",
    ) {
        return;
    }
    let _serial = serial();
    let n = Node::new("bounded");
    let _stall = Backend::start(&n.node, "127.0.0.1:7010", Behaviour::Stall);
    let _flood = Backend::start(&n.node, "127.0.0.1:7011", Behaviour::Flood);
    let _slow = Backend::start(&n.node, "127.0.0.1:7012", Behaviour::SlowEcho);
    let mut server = SpokeServer::start(&n);
    let agent = server.start_agent(&n, &["--ebpf=on", "--cgroup-path", &n.cg()]);
    let status = agent.ebpf_status();
    assert_eq!(state(&status, "fast_path"), "on", "{status}");
    // With TCP all the way, either stall holds about 10 MiB (socket buffers plus the
    // agent's and server's per-connection buffers); the redirect may add its 4 MiB limit.
    const BOUND: usize = 48 << 20;

    // The agent writes, the endpoint never reads.
    let before = agent.metrics();
    let mut conn = server.tunnel("127.0.0.1:7010");
    conn.set_write_timeout(Some(Duration::from_millis(200)))
        .expect("write timeout");
    let chunk = vec![7u8; 256 * 1024];
    let mut written = 0usize;
    let end = Instant::now() + Duration::from_secs(4);
    while Instant::now() < end && written < 4 * BOUND {
        match conn.write(&chunk) {
            Ok(n) => written += n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("write toward a stalled endpoint failed: {e}"),
        }
    }
    let after = agent.metrics();
    assert!(
        written < BOUND,
        "wrote {} MiB toward an endpoint that never reads (bound {} MiB)",
        written >> 20,
        BOUND >> 20
    );
    assert!(
        delta(&before, &after, REDIR_BYTES) > 0.0,
        "nothing was redirected before the stall"
    );
    assert_eq!(
        delta(&before, &after, FALLBACKS),
        0.0,
        "the agent did not hold back from a stalled reader: the pair fell back to TCP"
    );
    // Holds count as they start: the write still waiting shows.
    let stalled_holds = delta(&before, &after, HOLDS);
    assert!(
        stalled_holds >= 1.0,
        "no write held for a reader that never reads: {stalled_holds}"
    );
    drop(conn);

    // The endpoint writes, the client never reads.
    let conn = server.tunnel("127.0.0.1:7011");
    thread::sleep(Duration::from_secs(4));
    let flooded = FLOODED.load(Ordering::Relaxed);
    assert!(
        flooded < BOUND,
        "the endpoint wrote {} MiB toward a client that never reads (bound {} MiB)",
        flooded >> 20,
        BOUND >> 20
    );
    drop(conn);

    // A reader slower than the agent: the agent waits for it, every byte arrives in order,
    // and the next bytes are redirected too.
    let before = agent.metrics();
    let conn = server.tunnel("127.0.0.1:7012");
    echo_over(&conn, "a slow reader", &Arc::new(payload(24 << 20, 11)));
    let mid = agent.metrics();
    assert_eq!(
        delta(&before, &mid, FALLBACKS),
        0.0,
        "the agent did not wait for a slow reader: the pair fell back to TCP"
    );
    assert!(
        delta(&before, &mid, REDIR_BYTES) >= (24 << 20) as f64,
        "only {} of {} bytes to a slow reader were redirected",
        delta(&before, &mid, REDIR_BYTES),
        24 << 20
    );
    // The waits show in the agent's metrics, counted and timed, and the reader's reads
    // (not only timers) ended them.
    let (holds, held, woken) = (
        delta(&before, &mid, HOLDS),
        delta(&before, &mid, HELD_SECONDS),
        delta(&before, &mid, READER_WAKEUPS),
    );
    assert!(
        holds >= 1.0 && held > 0.0 && woken >= 1.0,
        "writes held for a slow reader: {holds} ({held} s in all, {woken} waits ended by its reads' \
         wake-ups, of {} wake-ups its reads sent)",
        delta(&before, &mid, WAKEUPS_SENT)
    );
    let burst = Arc::new(payload(1 << 20, 12));
    echo_over(&conn, "the caught-up reader", &burst);
    let after = agent.metrics();
    assert!(
        delta(&mid, &after, REDIR_BYTES) >= burst.len() as f64,
        "after the reader caught up, only {} of {} bytes were redirected",
        delta(&mid, &after, REDIR_BYTES),
        burst.len()
    );
}

/// One connection to a [`Behaviour::WriteWhileReading`] endpoint: takes everything it
/// writes (pausing now and then, so its writer blocks and is woken again), sends the byte its
/// reader waits for, and returns what that blocking read returned.
fn blocking_read_while_writing(server: &SpokeServer, target: &str) -> String {
    READ_OUTCOMES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clear();
    let mut conn = server.tunnel(target);
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0;
    while got < WRITTEN_WHILE_READING {
        let want = buf.len().min(WRITTEN_WHILE_READING - got);
        match conn.read(&mut buf[..want]) {
            Ok(0) => panic!("{target}: the tunnel closed after {got} bytes"),
            Ok(k) => got += k,
            Err(e) => panic!("{target}: reading after {got} bytes: {e}"),
        }
        if got % (4 << 20) < buf.len() {
            thread::sleep(Duration::from_millis(2));
        }
    }
    // The read has failed already if the endpoint closed; the tunnel may be gone then.
    if conn.write_all(b"x").is_ok() {
        let _ = conn.read(&mut buf[..1]);
    }
    let mut outcome = None;
    wait_for("the endpoint's read to return", || {
        outcome = READ_OUTCOMES
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop();
        outcome.is_some()
    });
    outcome.unwrap_or_default()
}

/// Why only endpoints that read as Go does belong in `--ebpf-fast-path-ports`. Once the
/// endpoint's socket is in a sockmap (a redirect target), its reads go through the kernel's
/// `tcp_bpf_recvmsg`, which sleeps once and, if woken with no data (its own writes' space
/// freeing up wakes it too), returns EAGAIN even to a blocking socket. Plain TCP sleeps on.
/// A Go server (the kubelet) or an epoll loop waits and reads again; a server that reads
/// with blocking calls on one thread while another writes fails its connection. Unlisted
/// ports keep TCP's semantics; this test also says when a kernel stops doing it.
#[test]
fn a_blocking_reader_of_a_listed_port_can_get_eagain() {
    if !require_root(
        "a_blocking_reader_of_a_listed_port_can_get_eagain",
        "root and eBPF",
    ) {
        return;
    }
    let _serial = serial();
    let n = Node::new("blocking");
    let _listed = Backend::start(&n.node, "127.0.0.1:7005", Behaviour::WriteWhileReading);
    let _unlisted = Backend::start(&n.node, "127.0.0.1:7301", Behaviour::WriteWhileReading);
    let mut server = SpokeServer::start(&n);
    let agent = server.start_agent(&n, &["--ebpf=on", "--cgroup-path", &n.cg()]);
    assert_eq!(state(&agent.ebpf_status(), "fast_path"), "on");

    for round in 0..5 {
        let outcome = blocking_read_while_writing(&server, "127.0.0.1:7301");
        assert_eq!(
            outcome, "Ok(1)",
            "round {round}: a blocking reader on an unlisted port (plain TCP) got {outcome}"
        );
    }
    let before = agent.metrics();
    let outcomes: Vec<String> = (0..10)
        .map(|_| blocking_read_while_writing(&server, "127.0.0.1:7005"))
        .collect();
    eprintln!("blocking reads on a listed port returned: {outcomes:?}");
    assert!(
        delta(&before, &agent.metrics(), PAIRS) >= 10.0,
        "the listed port's connections were not paired"
    );
    assert!(
        outcomes.iter().any(|o| o.contains("WouldBlock")),
        "in 10 connections to a listed port, the endpoint's blocking read never got EAGAIN \
         ({outcomes:?}). If this kernel's tcp_bpf_recvmsg now keeps sleeping, the warning on \
         --ebpf-fast-path-ports (README, flag help) can be relaxed."
    );
}

/// An echo backend that reads with splice(2), as Go's io.Copy between TCP connections does.
const PY_SPLICE_ECHO: &str = "import socket,sys,os,threading
s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)
s.bind((sys.argv[1],int(sys.argv[2])));s.listen(64)
def h(c):
    r,w=os.pipe()
    while True:
        n=os.splice(c.fileno(),w,65536)
        if not n:break
        c.sendall(os.read(r,n))
    c.close()
while True:
    c,_=s.accept();threading.Thread(target=h,args=(c,),daemon=True).start()
";

/// Bytes sk_msg redirects never reach a reader that uses splice(2) (it reads only the TCP
/// receive queue), so only `--ebpf-fast-path-ports` are paired: a splice reader on another
/// port gets every byte, over TCP.
#[test]
fn fast_path_leaves_unlisted_ports_to_tcp() {
    if !require_root("fast_path_leaves_unlisted_ports_to_tcp", "root and eBPF") {
        return;
    }
    let _serial = serial();
    let n = Node::new("unlisted");
    let mut cmd = n.node.command("python3").expect("command in node ns");
    cmd.args(["-c", PY_SPLICE_ECHO, "127.0.0.1", "7300"]);
    let _backend = Proc::spawn("py-splice-echo", cmd, &n.dir);
    wait_for("the splice echo backend to listen", || {
        n.node
            .exec(&["ss", "-Htln", "sport", "= :7300"])
            .is_ok_and(|o| o.contains("7300"))
    });
    let mut server = SpokeServer::start(&n);
    let agent = server.start_agent(&n, &["--ebpf=on", "--cgroup-path", &n.cg()]);
    assert_eq!(state(&agent.ebpf_status(), "fast_path"), "on");
    let before = agent.metrics();
    tunnel_echo(&server, "127.0.0.1:7300", &Arc::new(payload(2 << 20, 5)));
    let after = agent.metrics();
    for name in [PAIRS, REDIR_BYTES] {
        assert_eq!(
            delta(&before, &after, name),
            0.0,
            "an unlisted port moved {name}"
        );
    }
}

/// An empty `--ebpf-fast-path-ports` means nothing to redirect: `--ebpf=on` still starts, the
/// fast path reads "not configured", and none of its programs (the read counter included) load.
#[test]
fn an_empty_port_list_loads_no_fast_path() {
    if !require_root("an_empty_port_list_loads_no_fast_path", "root and eBPF") {
        return;
    }
    let _serial = serial();
    let n = Node::new("noports");
    let _backend = Backend::start(&n.node, "127.0.0.1:7000", Behaviour::Echo);
    let mut server = SpokeServer::start(&n);
    let agent = server.start_agent(
        &n,
        &[
            "--ebpf=on",
            "--cgroup-path",
            &n.cg(),
            "--ebpf-fast-path-ports=",
        ],
    );
    let ebpf = agent.ebpf_status();
    assert_eq!(state(&ebpf, "fast_path"), "not_configured", "{ebpf}");
    assert!(
        detail(&ebpf, "fast_path").contains("--ebpf-fast-path-ports"),
        "{ebpf}"
    );
    assert_eq!(our_prog_ids(), Vec::<u32>::new(), "programs loaded: {ebpf}");
    tunnel_echo(&server, "127.0.0.1:7000", &Arc::new(payload(1 << 20, 6)));
}

fn try_connect(ns: &NetNs, to: &str, timeout: Duration) -> (bool, u32) {
    let to: SocketAddr = to.parse().expect("addr");
    ns.spawn(move || {
        let family = if to.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        // SAFETY: plain socket syscalls on a descriptor owned by this function; every
        // struct passed is sized for what the kernel writes.
        unsafe {
            let fd = libc::socket(
                family,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            );
            assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
            let mut storage: libc::sockaddr_storage = std::mem::zeroed();
            let len = match to {
                SocketAddr::V4(a) => {
                    let sin = &mut *(&mut storage as *mut _ as *mut libc::sockaddr_in);
                    sin.sin_family = libc::AF_INET as libc::sa_family_t;
                    sin.sin_port = a.port().to_be();
                    sin.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
                    std::mem::size_of::<libc::sockaddr_in>()
                }
                SocketAddr::V6(a) => {
                    let sin6 = &mut *(&mut storage as *mut _ as *mut libc::sockaddr_in6);
                    sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                    sin6.sin6_port = a.port().to_be();
                    sin6.sin6_addr.s6_addr = a.ip().octets();
                    std::mem::size_of::<libc::sockaddr_in6>()
                }
            };
            let rc = libc::connect(
                fd,
                &storage as *const _ as *const libc::sockaddr,
                len as libc::socklen_t,
            );
            let mut connected = rc == 0;
            if !connected {
                let err = std::io::Error::last_os_error();
                assert_eq!(
                    err.raw_os_error(),
                    Some(libc::EINPROGRESS),
                    "connect: {err}"
                );
                let mut pfd = libc::pollfd {
                    fd,
                    events: libc::POLLOUT,
                    revents: 0,
                };
                if libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) == 1 {
                    let mut err: libc::c_int = 0;
                    let mut l = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
                    libc::getsockopt(
                        fd,
                        libc::SOL_SOCKET,
                        libc::SO_ERROR,
                        &mut err as *mut _ as *mut libc::c_void,
                        &mut l,
                    );
                    connected = err == 0;
                }
            }
            let mut info: libc::tcp_info = std::mem::zeroed();
            let mut l = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
            let rc = libc::getsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                &mut info as *mut _ as *mut libc::c_void,
                &mut l,
            );
            assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
            libc::close(fd);
            (connected, 1 + info.tcpi_total_retrans)
        }
    })
    .join()
    .expect("thread")
    .expect("netns")
}

/// Outside hosts cannot open TCP to protected port 10250 unless allowed; unprotected ports
/// and the agent's own tunnel (which crosses the guarded interface) are unaffected; drop
/// counters match the SYNs.
#[test]
fn xdp_guard_protects_kubelet_port() {
    if !require_root("xdp_guard_protects_kubelet_port", "root and eBPF") {
        return;
    }
    let _serial = serial();
    let n = Node::new("xdp_guard");
    // Kubelet-like: reached through the tunnel on loopback, and probed from outside.
    let _kubelet4 = Backend::start(&n.node, "0.0.0.0:10250", Behaviour::Echo);
    let _kubelet6 = Backend::start(&n.node, "[fdcd::1]:10250", Behaviour::Echo);
    let _other = Backend::start(&n.node, "0.0.0.0:8132", Behaviour::Hold);
    let mut server = SpokeServer::start(&n);
    let cg = n.cg();
    let guard = |server: &mut SpokeServer, allow: &str| {
        server.start_agent(
            &n,
            &[
                "--ebpf=on",
                "--cgroup-path",
                &cg,
                "--xdp-guard-interfaces=n-out",
                "--xdp-protected-ports=10250",
                &format!("--xdp-allow-cidrs={allow}"),
            ],
        )
    };
    let connect = |ns: &NetNs, to: &str| try_connect(ns, to, Duration::from_millis(1500)).0;
    let data = Arc::new(payload(1 << 20, 11));

    {
        let agent = guard(&mut server, "fdcd::2/128");
        let status = agent.ebpf_status();
        assert_eq!(state(&status, "xdp_guard"), "on", "{status}");
        let d = detail(&status, "xdp_guard");
        assert!(d.contains("native") || d.contains("generic"), "{status}");
        // The tunnel works with the guard on: kube-apiserver reaches the kubelet.
        tunnel_echo(&server, "127.0.0.1:10250", &data);

        let before = agent.metrics();
        let (reached, syns) =
            try_connect(&n.outside, "10.212.0.1:10250", Duration::from_millis(1500));
        let after = agent.metrics();
        assert!(!reached, "IPv4 outsider reached :10250");
        assert!(syns >= 1);
        assert_eq!(
            delta(&before, &after, XDP_DENIED),
            f64::from(syns),
            "one drop per SYN sent"
        );

        assert!(
            connect(&n.outside, "[fdcd::1]:10250"),
            "allowed IPv6 source blocked"
        );
        assert!(
            connect(&n.outside, "10.212.0.1:8132"),
            "unprotected port blocked"
        );
        // Outbound connections (replies come from the server's port) and the live tunnel.
        assert!(
            connect(&n.node, &format!("{SERVER_ADDR}:{SERVER_AGENT_PORT}")),
            "outbound connection blocked"
        );
        tunnel_echo(&server, "127.0.0.1:10250", &data);
        tunnel_echo(&server, "[fdcd::1]:10250", &data);
        let end = agent.metrics();
        assert!(
            delta(&after, &end, XDP_ALLOWED) >= 2.0,
            "allowed SYN+ACK counted"
        );
        assert_eq!(delta(&after, &end, XDP_DENIED), 0.0);
    }
    {
        let agent = guard(&mut server, "10.212.0.0/24");
        assert!(
            connect(&n.outside, "10.212.0.1:10250"),
            "allowed IPv4 source blocked"
        );
        let before = agent.metrics();
        let (reached, syns) =
            try_connect(&n.outside, "[fdcd::1]:10250", Duration::from_millis(1500));
        let after = agent.metrics();
        assert!(!reached, "IPv6 outsider reached :10250");
        assert_eq!(
            delta(&before, &after, XDP_DENIED),
            f64::from(syns),
            "one drop per SYN sent"
        );
        tunnel_echo(&server, "10.212.0.1:10250", &data);
        let m = agent.metrics();
        assert!(counter(&m, XDP_DENIED) >= 1.0);
        assert_eq!(
            counter(&m, "spoke_ebpf_program_attached{program=\"xdp\"}"),
            1.0
        );
    }
    // Guard gone with the agent: the port is reachable again.
    assert!(connect(&n.outside, "[fdcd::1]:10250"));
}

/// Without CAP_BPF/CAP_NET_ADMIN: `--ebpf=auto` falls back, says why and still relays
/// through the tunnel in userspace; `--ebpf=on` refuses to start.
#[test]
fn without_capabilities_auto_falls_back_and_on_fails() {
    if !require_root(
        "without_capabilities_auto_falls_back_and_on_fails",
        "root and eBPF",
    ) {
        return;
    }
    let _serial = serial();
    let n = Node::new("no_caps");
    let _local = Backend::start(&n.node, "127.0.0.1:7000", Behaviour::Echo);
    let _pod = Backend::start(&n.pod, "10.211.0.2:7000", Behaviour::Echo);
    let mut server = SpokeServer::start(&n);
    let cg = n.cg();
    let args = |mode: &'static str| {
        [
            format!("--ebpf={mode}"),
            "--cgroup-path".into(),
            cg.clone(),
            "--xdp-guard-interfaces=n-out".into(),
        ]
    };

    let auto = args("auto");
    let auto: Vec<&str> = auto.iter().map(String::as_str).collect();
    let mut agent = server.start_agent_as(&n, true, &auto);
    let data = Arc::new(payload(1 << 20, 5));
    tunnel_echo(&server, "127.0.0.1:7000", &data);
    tunnel_echo(&server, "10.211.0.2:7000", &data);
    let status = agent.ebpf_status();
    assert_eq!(state(&status, "fast_path"), "off", "{status}");
    assert_eq!(state(&status, "xdp_guard"), "off", "{status}");
    assert!(
        detail(&status, "fast_path").contains("missing CAP_BPF"),
        "reason names the capability: {status}"
    );
    let log = agent.proc.log();
    assert!(
        log.contains("socket fast path off") && log.contains("userspace relay"),
        "one clear log line: {log}"
    );
    let m = agent.metrics();
    assert_eq!(counter(&m, PAIRS), 0.0);
    assert_eq!(
        counter(&m, "spoke_ebpf_program_attached{program=\"sock_ops\"}"),
        0.0
    );
    agent.kill9();
    drop(agent);

    let on = args("on");
    let on: Vec<&str> = on.iter().map(String::as_str).collect();
    let mut agent = Agent::spawn(&n, true, &on);
    let exit = agent.proc.wait_exit(STARTUP);
    let log = agent.proc.log();
    assert!(
        !exit.success(),
        "--ebpf=on must fail without capabilities: {log}"
    );
    assert!(
        log.contains("--ebpf=on") && log.contains("missing CAP_BPF"),
        "clear error: {log}"
    );
}

fn our_prog_ids() -> Vec<u32> {
    let out = netns::run(&["bpftool", "prog", "show"]).expect("bpftool prog");
    out.lines()
        .filter(|l| {
            [
                "spoke_sockops",
                "spoke_msg",
                "spoke_recv",
                "spoke_xdp_guard",
            ]
            .iter()
            .any(|p| l.contains(&format!("name {p} ")))
        })
        .filter_map(|l| l.split(':').next()?.trim().parse().ok())
        .collect()
}

/// After SIGKILL nothing of ours stays attached or loaded, and a restarted agent attaches
/// cleanly and redirects again.
/// Echo server in Python, for a backend that must live outside the attached cgroup.
const PY_ECHO: &str = "import socket,sys,threading
s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)
s.bind((sys.argv[1],int(sys.argv[2])));s.listen(64)
def h(c):
    while True:
        d=c.recv(65536)
        if not d:break
        c.sendall(d)
    c.close()
while True:
    c,_=s.accept();threading.Thread(target=h,args=(c,),daemon=True).start()
";

/// An agent socket whose endpoint never pairs (the endpoint lives outside the attached cgroup,
/// as for any endpoint off the node) waits in the pairing table. Another network namespace
/// under the cgroup that later builds a connection with the mirror-image tuple must not be
/// paired with it: otherwise the agent's writes would be redirected into that namespace's
/// socket (a pod reading control-plane traffic meant for another endpoint).
#[test]
fn a_waiting_agent_socket_cannot_be_claimed_from_another_namespace() {
    if !require_root(
        "a_waiting_agent_socket_cannot_be_claimed_from_another_namespace",
        "root and eBPF",
    ) {
        return;
    }
    let _serial = serial();
    let n = Node::new("claim");
    // The real endpoint: node namespace, a cgroup beside (not under) the attached one.
    let beside = Cgroup::new().expect("sibling cgroup");
    let mut cmd = n.node.command("sh").expect("command in node ns");
    cmd.args([
        "-c",
        &format!(
            "echo $$ > {}/cgroup.procs && exec python3 -c \"$0\" 127.0.0.1 7005",
            beside.path.display()
        ),
        PY_ECHO,
    ]);
    let _backend = Proc::spawn("py-echo", cmd, &n.dir);
    wait_for("the outside-cgroup echo backend to listen", || {
        n.node
            .exec(&["ss", "-Htln", "sport", "= :7005"])
            .is_ok_and(|o| o.contains("7005"))
    });
    let mut server = SpokeServer::start(&n);
    let mut agent = server.start_agent(&n, &["--ebpf=on", "--cgroup-path", &n.cg()]);
    assert_eq!(state(&agent.ebpf_status(), "fast_path"), "on");

    let before = agent.metrics();
    let conn = server.tunnel("127.0.0.1:7005");
    let data = Arc::new(payload(1 << 20, 11));
    echo_over(&conn, "tunnel to the outside-cgroup endpoint", &data);
    let m = agent.metrics();
    assert_eq!(
        delta(&before, &m, TRACKED),
        1.0,
        "only the agent's side is tracked"
    );
    assert_eq!(
        delta(&before, &m, PAIRS),
        0.0,
        "the endpoint is outside the cgroup: no pair"
    );

    // The agent's leg, as `ss` shows it: 127.0.0.1:P -> 127.0.0.1:7005.
    let ss = n
        .node
        .exec(&[
            "ss",
            "-Htn",
            "state",
            "established",
            "dst",
            "127.0.0.1:7005",
        ])
        .expect("ss");
    let port: u16 = ss
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("127.0.0.1:"))
        .filter_map(|p| p.parse().ok())
        .find(|p| *p != 7005)
        .unwrap_or_else(|| panic!("agent's leg to 127.0.0.1:7005 not found in ss: {ss:?}"));
    // Later than any handshake: the agent socket has been waiting for a while.
    thread::sleep(Duration::from_millis(600));

    // The pod namespace builds the mirror image: listener 127.0.0.1:7005, client bound to
    // 127.0.0.1:P. Its accepted socket has exactly the tuple the agent socket waits for.
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let squatter = n.pod.spawn(move || {
        let l = std::net::TcpListener::bind("127.0.0.1:7005").expect("pod listener");
        let sock = socket2_bind_connect(port);
        let (accepted, _) = l.accept().expect("accept");
        accepted
            .set_read_timeout(Some(Duration::from_millis(1500)))
            .expect("timeout");
        let mut got = vec![0u8; 4096];
        let mut r = &accepted;
        let n = r.read(&mut got).unwrap_or(0);
        got.truncate(n);
        let _ = tx.send(got);
        drop(sock);
    });
    thread::sleep(Duration::from_millis(200));
    let after_squat = agent.metrics();
    assert_eq!(
        delta(&m, &after_squat, PAIRS),
        0.0,
        "a socket in another namespace was paired with the waiting agent socket"
    );
    assert_eq!(
        delta(&m, &after_squat, PAIRS_REFUSED),
        1.0,
        "the mirror-image socket was not seen and refused"
    );
    // Tunnel traffic must still reach the real endpoint, and nothing the squatter.
    echo_over(&conn, "tunnel after the mirror-image connection", &data);
    let leaked = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("squatter thread");
    squatter.join().expect("squatter").expect("pod ns");
    assert!(
        leaked.is_empty(),
        "the pod namespace's socket received {} bytes of tunnel traffic",
        leaked.len()
    );
    drop(conn);
    agent.kill9();
}

/// A TCP client bound to 127.0.0.1:`port`, connected to 127.0.0.1:7005 (in the calling
/// thread's namespace).
fn socket2_bind_connect(port: u16) -> TcpStream {
    // SAFETY: plain socket syscalls on a fresh fd that we own.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            &one as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as u32,
        );
        let addr = |p: u16| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: p.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes([127, 0, 0, 1]),
            },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
        let local = addr(port);
        let rc = libc::bind(fd, &local as *const _ as *const libc::sockaddr, len);
        assert_eq!(
            rc,
            0,
            "bind 127.0.0.1:{port}: {}",
            std::io::Error::last_os_error()
        );
        let remote = addr(7005);
        let rc = libc::connect(fd, &remote as *const _ as *const libc::sockaddr, len);
        assert_eq!(rc, 0, "connect: {}", std::io::Error::last_os_error());
        std::os::fd::FromRawFd::from_raw_fd(fd)
    }
}

#[test]
fn sigkill_leaves_nothing_attached() {
    if !require_root("sigkill_leaves_nothing_attached", "root and eBPF") {
        return;
    }
    let _serial = serial();
    let n = Node::new("sigkill");
    let _pod = Backend::start(&n.pod, "10.211.0.2:7000", Behaviour::Echo);
    let mut server = SpokeServer::start(&n);
    let existing = our_prog_ids();
    let args = [
        "--ebpf=on".to_string(),
        "--cgroup-path".into(),
        n.cg(),
        "--xdp-guard-interfaces=n-out".into(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut agent = server.start_agent(&n, &args);
    let ours: Vec<u32> = our_prog_ids()
        .into_iter()
        .filter(|id| !existing.contains(id))
        .collect();
    assert_eq!(
        ours.len(),
        4,
        "sock_ops, sk_msg, the read counter and xdp loaded: {ours:?}"
    );
    let cgroup_tree =
        || netns::run(&["bpftool", "cgroup", "show", &n.cg()]).expect("bpftool cgroup");
    assert!(cgroup_tree().contains("spoke_sockops"), "{}", cgroup_tree());
    let xdp = || {
        n.node
            .exec(&["bpftool", "net", "show", "dev", "n-out"])
            .expect("bpftool net")
    };
    // `bpftool net` names the program by id only.
    let xdp_attached = || ours.iter().any(|id| xdp().contains(&format!(" id {id}")));
    assert!(xdp_attached(), "{}", xdp());
    // Leave a live redirected connection behind as well.
    let data = Arc::new(payload(1 << 20, 3));
    let before = agent.metrics();
    let live = server.tunnel("10.211.0.2:7000");
    echo_over(&live, "live tunnel", &data);
    assert_eq!(
        delta(&before, &agent.metrics(), PAIRS),
        1.0,
        "live leg paired"
    );

    agent.kill9();
    wait_for("programs to be freed", || {
        let now = our_prog_ids();
        ours.iter().all(|id| !now.contains(id))
    });
    assert!(!cgroup_tree().contains("spoke_"), "{}", cgroup_tree());
    assert!(!xdp_attached() && !xdp().contains(" id "), "{}", xdp());
    let pinned = std::fs::read_dir("/sys/fs/bpf")
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().contains("spoke"))
                .count()
        })
        .unwrap_or(0);
    assert_eq!(pinned, 0, "nothing pinned");
    drop(live);
    drop(agent);

    // Restart takes over cleanly.
    let agent = server.start_agent(&n, &args);
    let status = agent.ebpf_status();
    assert_eq!(state(&status, "xdp_guard"), "on", "{status}");
    assert_eq!(state(&status, "fast_path"), "on", "{status}");
    let before = agent.metrics();
    tunnel_echo(&server, "10.211.0.2:7000", &data);
    let after = agent.metrics();
    assert_eq!(delta(&before, &after, PAIRS), 1.0);
    // The agent's writes (the endpoint's replies stay on TCP).
    assert!(delta(&before, &after, REDIR_BYTES) >= data.len() as f64);
}

// ---------------------------------------------------------------------------------------
// A/B benchmark: `cargo test -p spoke-tests --release --test ebpf -- --ignored --nocapture`
// ---------------------------------------------------------------------------------------

fn proc_cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised comm; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn self_cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// One measurement. "relay" is spoke-agent (the process that relays the tunnel to the
/// endpoint); "total" adds spoke-server and the test process (client and endpoints).
struct Figures {
    gbit: f64,
    relay_cpu_per_gib: f64,
    total_cpu_per_gib: f64,
    p50_us: f64,
    p99_us: f64,
    rr_relay_cpu_us: f64,
}

fn measure(n: &Node, server: &mut SpokeServer, mode: &str, sink: &str, echo: &str) -> Figures {
    let agent = server.start_agent(n, &[&format!("--ebpf={mode}"), "--cgroup-path", &n.cg()]);
    // Bulk: 1 GiB client -> UDS CONNECT -> server -> tunnel -> agent -> sink.
    const BULK: usize = 1 << 30;
    let mut c = server.tunnel(sink);
    let cpu = |server: &SpokeServer| {
        (
            agent.cpu_seconds(),
            server.cpu_seconds(),
            self_cpu_seconds(),
        )
    };
    let (cpu0, srv0, self0) = cpu(server);
    let start = Instant::now();
    let chunk = vec![0x5au8; 256 * 1024];
    c.write_all(&(BULK as u64).to_le_bytes())
        .expect("write length");
    let mut sent = 0;
    while sent < BULK {
        c.write_all(&chunk).expect("write");
        sent += chunk.len();
    }
    let mut ack = [0u8; 1];
    c.read_exact(&mut ack).expect("sink ack");
    let t = start.elapsed();
    let (cpu1, srv1, self1) = cpu(server);
    drop(c);
    let gib = BULK as f64 / (1u64 << 30) as f64;
    let gbit = BULK as f64 * 8.0 / t.as_secs_f64() / 1e9;

    // Latency: 64-byte request/response through the tunnel to the echo server.
    const ROUNDS: usize = 20_000;
    let mut c = server.tunnel(echo);
    let cpu2 = agent.cpu_seconds();
    let req = [7u8; 64];
    let mut resp = [0u8; 64];
    let mut lat = Vec::with_capacity(ROUNDS);
    for i in 0..ROUNDS + 1000 {
        let t = Instant::now();
        c.write_all(&req).expect("write");
        c.read_exact(&mut resp).expect("read");
        if i >= 1000 {
            lat.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    let cpu3 = agent.cpu_seconds();
    drop(c);
    lat.sort_by(f64::total_cmp);
    Figures {
        gbit,
        relay_cpu_per_gib: (cpu1 - cpu0) / gib,
        total_cpu_per_gib: (cpu1 - cpu0 + srv1 - srv0 + self1 - self0) / gib,
        p50_us: lat[lat.len() / 2],
        p99_us: lat[lat.len() * 99 / 100],
        rr_relay_cpu_us: (cpu3 - cpu2) / ROUNDS as f64 * 1e6,
    }
}

/// `--ebpf=on` vs `--ebpf=off`, interleaved, through the real tunnel: bulk 1 GiB (client →
/// UDS CONNECT → spoke-server → mTLS tunnel → spoke-agent → sink) and 64-byte ping-pong to an
/// echo endpoint, for a node-local and a pod endpoint. "relay" columns are spoke-agent's CPU
/// (/proc/PID/stat); "total" adds spoke-server and the test process. `SPOKE_BENCH_ROUNDS`
/// sets the rounds (default 3).
#[test]
#[ignore = "benchmark: run with --ignored --nocapture (root)"]
fn bench_fast_path_ab() {
    if !require_root("bench_fast_path_ab", "root and eBPF") {
        return;
    }
    let _serial = serial();
    let n = Node::new("bench");
    // The sink takes the bulk runs (one byte back at the end); the echo server the 64-byte
    // rounds.
    let _sink_local = Backend::start(&n.node, "127.0.0.1:7100", Behaviour::Sink);
    let _echo_local = Backend::start(&n.node, "127.0.0.1:7200", Behaviour::Echo);
    let _sink_pod = Backend::start(&n.pod, "10.211.0.2:7100", Behaviour::Sink);
    let _echo_pod = Backend::start(&n.pod, "10.211.0.2:7200", Behaviour::Echo);
    let mut server = SpokeServer::start(&n);
    let header = || {
        println!(
            "{:<26} {:>8} {:>16} {:>16} {:>8} {:>8} {:>16}",
            "leg / mode",
            "Gbit/s",
            "relay CPU s/GiB",
            "total CPU s/GiB",
            "p50 us",
            "p99 us",
            "relay CPU us/RR"
        )
    };
    let row = |label: &str, f: &Figures| {
        println!(
            "{:<26} {:>8.2} {:>16.3} {:>16.3} {:>8.1} {:>8.1} {:>16.1}",
            label,
            f.gbit,
            f.relay_cpu_per_gib,
            f.total_cpu_per_gib,
            f.p50_us,
            f.p99_us,
            f.rr_relay_cpu_us
        )
    };
    let median = |runs: &[Figures], get: fn(&Figures) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(get).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let rounds: usize = std::env::var("SPOKE_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let mut summary = Vec::new();
    println!();
    header();
    for (leg, sink, echo) in [
        ("node-local", "127.0.0.1:7100", "127.0.0.1:7200"),
        ("pod netns (veth)", "10.211.0.2:7100", "10.211.0.2:7200"),
    ] {
        let mut runs: HashMap<&str, Vec<Figures>> = HashMap::new();
        // Interleave off/on so background load hits both alike.
        for round in 0..rounds {
            for mode in ["off", "on"] {
                let f = measure(&n, &mut server, mode, sink, echo);
                row(&format!("{leg} {mode} #{round}"), &f);
                runs.entry(mode).or_default().push(f);
            }
        }
        for mode in ["off", "on"] {
            let r = &runs[mode];
            let m = Figures {
                gbit: median(r, |f| f.gbit),
                relay_cpu_per_gib: median(r, |f| f.relay_cpu_per_gib),
                total_cpu_per_gib: median(r, |f| f.total_cpu_per_gib),
                p50_us: median(r, |f| f.p50_us),
                p99_us: median(r, |f| f.p99_us),
                rr_relay_cpu_us: median(r, |f| f.rr_relay_cpu_us),
            };
            summary.push((format!("{leg} {mode} (median)"), m));
        }
    }
    println!("\nmedians of {rounds} interleaved rounds:");
    header();
    for (label, f) in &summary {
        row(label, f);
    }
}
