//! eBPF data plane tests: real programs, real kernel, real namespaces. Need root.
//!
//! Topology (all namespaces created here, nothing touches the root namespace):
//!
//! ```text
//!   pod ns  10.211.0.2 fdcc::2 ──veth── 10.211.0.1 fdcc::1  node ns  10.212.0.1 fdcd::1 ──veth── 10.212.0.2 fdcd::2  outside ns
//!   (endpoint)                           (agent, endpoints, kubelet-like :10250)                       (clients of :10250)
//! ```
//!
//! The agent is played by `agent/examples/ebpf_relay.rs`, which loads `Ebpf` exactly like
//! spoke-agent and relays `--route LISTEN=BACKEND`, marking its backend socket before
//! connect(). To move these tests to the real agent, replace [`Agent::start`] (spawn the
//! server and the agent, dial through the tunnel) and keep the assertions: they only use
//! `/metrics`, the status JSON and bpftool.
//!
//! Tests run one at a time (they share bpftool views and measure CPU).
#[path = "../src/netns.rs"]
#[allow(dead_code)]
mod netns;

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc, Mutex, MutexGuard,
    },
    thread,
    time::{Duration, Instant},
};

use netns::{require_root, veth, Cgroup, Netns};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------
// The agent stand-in
// ---------------------------------------------------------------------------------------

/// The relay example next to the test executable (`target/<profile>/examples`). Not built
/// from here: a nested cargo would wait on the shared target-dir lock.
fn relay_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executable lives in target/<profile>/deps")
        .join("examples/ebpf_relay");
    assert!(
        bin.is_file(),
        "{} missing: run `cargo build -p spoke-agent --example ebpf_relay` (same profile) first",
        bin.display()
    );
    bin
}

struct Agent {
    child: Child,
    ns: String,
    admin: SocketAddr,
    status: String,
    stderr: PathBuf,
}

impl Agent {
    /// Starts the relay in `ns` and waits for READY.
    fn start(ns: &Netns, args: &[&str]) -> Agent {
        Self::try_start(ns, args).unwrap_or_else(|(status, err)| {
            panic!("agent failed to start (status {status:?}):\n{err}")
        })
    }

    fn try_start(ns: &Netns, args: &[&str]) -> Result<Agent, (Option<i32>, String)> {
        let admin: SocketAddr = "127.0.0.1:9990".parse().expect("addr");
        let stderr = std::env::temp_dir().join(format!(
            "{}-{}-agent.log",
            netns::PREFIX,
            std::process::id()
        ));
        let log = std::fs::File::create(&stderr).expect("agent log");
        let mut child = ns
            .command(relay_bin())
            .expect("netns command")
            .args(["--admin", &admin.to_string()])
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn ebpf_relay");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut status = String::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) if line == "READY" => break,
                Ok(line) => {
                    if let Some(s) = line.strip_prefix("STATUS ") {
                        status = s.to_string();
                    }
                }
                Err(_) => {
                    if let Ok(Some(exit)) = child.try_wait() {
                        let err = std::fs::read_to_string(&stderr).unwrap_or_default();
                        return Err((exit.code(), err));
                    }
                    assert!(Instant::now() < deadline, "agent not ready after 60 s");
                }
            }
        }
        Ok(Agent {
            child,
            ns: ns.name.clone(),
            admin,
            status,
            stderr,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Counters and gauges from /metrics, keyed by the sample's name with labels.
    fn metrics(&self) -> HashMap<String, f64> {
        let body = self.get("/metrics");
        body.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                Some((name.to_string(), value.parse().ok()?))
            })
            .collect()
    }

    fn get(&self, path: &str) -> String {
        let (admin, path) = (self.admin, path.to_string());
        let ns = Netns {
            name: self.ns.clone(),
        };
        let h = ns.spawn(move || {
            let mut c = TcpStream::connect(admin).expect("admin connect");
            let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n");
            c.write_all(req.as_bytes()).expect("admin write");
            let mut body = String::new();
            c.read_to_string(&mut body).expect("admin read");
            body.split_once("\r\n\r\n")
                .map(|(_, b)| b.to_string())
                .unwrap_or_default()
        });
        std::mem::forget(ns); // owned by the test, not by this handle
        h.join().expect("admin thread").expect("enter netns")
    }

    fn kill9(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid() as i32, libc::SIGKILL) };
        let _ = self.child.wait();
    }

    fn cpu_seconds(&self) -> f64 {
        proc_cpu_seconds(self.pid())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            let log = std::fs::read_to_string(&self.stderr).unwrap_or_default();
            eprintln!(
                "---- agent stderr ----\n{log}\n---- status ----\n{}",
                self.status
            );
        }
    }
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
const REDIR_BYTES: &str = "spoke_ebpf_redirected_bytes_total";
const REDIR_MSGS: &str = "spoke_ebpf_redirected_messages_total";
const XDP_DENIED: &str = "spoke_ebpf_xdp_packets_total{action=\"drop\",reason=\"denied_source\"}";
const XDP_ALLOWED: &str = "spoke_ebpf_xdp_packets_total{action=\"pass\",reason=\"allowed_source\"}";

// ---------------------------------------------------------------------------------------
// Endpoints
// ---------------------------------------------------------------------------------------

/// A TCP server on a thread inside a namespace; stops on drop.
struct Server {
    addr: SocketAddr,
    ns: String,
    stop: Arc<AtomicBool>,
}

#[derive(Clone, Copy)]
enum Behaviour {
    Echo,
    /// Reads and discards; replies with one byte at EOF.
    Sink,
    /// Accepts and holds.
    Hold,
}

impl Server {
    fn start(ns: &Netns, addr: &str, behaviour: Behaviour) -> Server {
        let addr: SocketAddr = addr.parse().expect("server addr");
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
            other => panic!("server {addr} did not start: {other:?}"),
        }
        Server {
            addr,
            ns: ns.name.clone(),
            stop,
        }
    }
}

fn serve(conn: &mut TcpStream, behaviour: Behaviour) {
    let mut buf = vec![0u8; 256 * 1024];
    match behaviour {
        Behaviour::Echo => {
            while let Ok(n) = conn.read(&mut buf) {
                if n == 0 || conn.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = conn.shutdown(Shutdown::Write);
        }
        Behaviour::Sink => {
            while let Ok(n) = conn.read(&mut buf) {
                if n == 0 {
                    break;
                }
            }
            let _ = conn.write_all(b"k");
        }
        Behaviour::Hold => {
            let _ = conn.read(&mut buf);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop.
        let (addr, ns) = (
            self.addr,
            Netns {
                name: self.ns.clone(),
            },
        );
        let _ = ns
            .spawn(move || TcpStream::connect_timeout(&addr, Duration::from_secs(1)))
            .join();
        std::mem::forget(ns);
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

/// Sends `data` to an echo service through `addr` (from inside `ns`) and checks it comes
/// back intact. Writes and reads concurrently so neither side's buffers fill up.
fn echo_roundtrip(ns: &Netns, addr: &str, data: Arc<Vec<u8>>) {
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
    // Drop order: agent first is handled by the tests; namespaces last.
    cgroup: Cgroup,
    node: Netns,
    pod: Netns,
    outside: Netns,
}

impl Node {
    fn new() -> Node {
        netns::remove_stale_namespaces();
        let cgroup = Cgroup::new().expect("cgroup");
        cgroup.enter().expect("enter cgroup");
        let node = Netns::new("node").expect("node ns");
        let pod = Netns::new("pod").expect("pod ns");
        let outside = Netns::new("out").expect("outside ns");
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
        Node {
            cgroup,
            node,
            pod,
            outside,
        }
    }

    fn cg(&self) -> String {
        self.cgroup.path.display().to_string()
    }
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

/// Agent-local legs (same netns over loopback, pod netns over veth, IPv4 and IPv6) are
/// redirected, payloads stay intact both ways, an unrelated pair on the node is untouched,
/// and entries leave the maps when sockets close.
#[test]
fn fast_path_redirects_agent_legs_only() {
    if !require_root("fast_path_redirects_agent_legs_only", "root and eBPF") {
        return;
    }
    let _serial = serial();
    let n = Node::new();
    let _local = Server::start(&n.node, "127.0.0.1:7000", Behaviour::Echo);
    let _pod4 = Server::start(&n.pod, "10.211.0.2:7000", Behaviour::Echo);
    let _pod6 = Server::start(&n.pod, "[fdcc::2]:7000", Behaviour::Echo);
    let agent = Agent::start(
        &n.node,
        &[
            "--ebpf=on",
            "--cgroup-path",
            &n.cg(),
            "--route=127.0.0.1:9001=127.0.0.1:7000",
            "--route=127.0.0.1:9002=10.211.0.2:7000",
            "--route=127.0.0.1:9003=[fdcc::2]:7000",
        ],
    );
    assert!(
        agent.status.contains(r#""fast_path":{"state":"on""#),
        "{}",
        agent.status
    );

    let data = Arc::new(payload(8 << 20, 7));
    for (route, what) in [
        ("127.0.0.1:9001", "node-local endpoint"),
        ("127.0.0.1:9002", "pod endpoint (IPv4, other netns)"),
        ("127.0.0.1:9003", "pod endpoint (IPv6, other netns)"),
    ] {
        let before = agent.metrics();
        echo_roundtrip(&n.node, route, data.clone());
        let after = agent.metrics();
        assert_eq!(delta(&before, &after, PAIRS), 1.0, "{what}: one pair");
        assert_eq!(
            delta(&before, &after, TRACKED),
            2.0,
            "{what}: both sockets tracked"
        );
        let bytes = delta(&before, &after, REDIR_BYTES);
        // Both directions of the backend leg go socket to socket.
        assert!(
            bytes >= 2.0 * data.len() as f64,
            "{what}: redirected {bytes} bytes, expected >= {}",
            2 * data.len()
        );
        wait_for("closed sockets to leave the maps", || {
            delta(&before, &agent.metrics(), CLOSED) >= 2.0
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
}

/// Outside hosts cannot open TCP to protected port 10250 unless allowed; unprotected ports
/// and the agent's own outbound connections are unaffected; drop counters match the SYNs.
#[test]
fn xdp_guard_protects_kubelet_port() {
    if !require_root("xdp_guard_protects_kubelet_port", "root and eBPF") {
        return;
    }
    let _serial = serial();
    let n = Node::new();
    let _kubelet4 = Server::start(&n.node, "0.0.0.0:10250", Behaviour::Hold);
    let _kubelet6 = Server::start(&n.node, "[fdcd::1]:10250", Behaviour::Hold);
    let _other = Server::start(&n.node, "0.0.0.0:8132", Behaviour::Hold);
    // Stands in for spoke-server: the agent dials out to it.
    let _server = Server::start(&n.outside, "10.212.0.2:8091", Behaviour::Echo);

    let guard = |allow: &str| {
        Agent::start(
            &n.node,
            &[
                "--ebpf=on",
                "--cgroup-path",
                &n.cg(),
                "--xdp-guard-interfaces=n-out",
                "--xdp-protected-ports=10250",
                &format!("--xdp-allow-cidrs={allow}"),
            ],
        )
    };
    let connect = |ns: &Netns, to: &str| -> bool {
        let to: SocketAddr = to.parse().expect("addr");
        ns.spawn(move || TcpStream::connect_timeout(&to, Duration::from_millis(1500)).is_ok())
            .join()
            .expect("thread")
            .expect("netns")
    };
    let syns_sent = |ns: &Netns| -> f64 {
        // Tcp OutSegs + RetransSegs, IPv4 and IPv6 (nstat -a prints absolute counters).
        let out = ns
            .exec(&["nstat", "-asz", "TcpOutSegs", "TcpRetransSegs"])
            .expect("nstat");
        out.lines()
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .sum()
    };

    {
        let agent = guard("fdcd::2/128");
        assert!(
            agent.status.contains(r#""xdp_guard":{"state":"on""#),
            "{}",
            agent.status
        );
        assert!(agent.status.contains("native") || agent.status.contains("generic"));
        let before = agent.metrics();
        let segs = syns_sent(&n.outside);
        assert!(
            !connect(&n.outside, "10.212.0.1:10250"),
            "IPv4 outsider reached :10250"
        );
        let segs = syns_sent(&n.outside) - segs;
        let after = agent.metrics();
        assert!(segs >= 1.0);
        assert_eq!(
            delta(&before, &after, XDP_DENIED),
            segs,
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
        // The agent's own outbound connection (replies come from the server's port).
        assert!(
            connect(&n.node, "10.212.0.2:8091"),
            "outbound tunnel blocked"
        );
        let end = agent.metrics();
        assert!(
            delta(&after, &end, XDP_ALLOWED) >= 2.0,
            "allowed SYN+ACK counted"
        );
        assert_eq!(delta(&after, &end, XDP_DENIED), 0.0);
    }
    {
        let agent = guard("10.212.0.0/24");
        assert!(
            connect(&n.outside, "10.212.0.1:10250"),
            "allowed IPv4 source blocked"
        );
        assert!(
            !connect(&n.outside, "[fdcd::1]:10250"),
            "IPv6 outsider reached :10250"
        );
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

/// Without CAP_BPF/CAP_NET_ADMIN: auto falls back and says why; on refuses to start.
#[test]
fn without_capabilities_auto_falls_back_and_on_fails() {
    if !require_root(
        "without_capabilities_auto_falls_back_and_on_fails",
        "root and eBPF",
    ) {
        return;
    }
    let _serial = serial();
    let n = Node::new();
    let run = |mode: &str| {
        n.node
            .command("setpriv")
            .expect("netns command")
            .args(["--inh-caps=-all", "--bounding-set=-all", "--"])
            .arg(relay_bin())
            .args([
                &format!("--ebpf={mode}"),
                "--exit-after-load",
                "--cgroup-path",
                &n.cg(),
            ])
            .args(["--xdp-guard-interfaces=n-out"])
            .output()
            .expect("run setpriv")
    };
    let auto = run("auto");
    let stdout = String::from_utf8_lossy(&auto.stdout);
    let stderr = String::from_utf8_lossy(&auto.stderr);
    assert!(
        auto.status.success(),
        "auto must fall back, not fail: {stderr}"
    );
    assert!(stdout.contains(r#""fast_path":{"state":"off""#), "{stdout}");
    assert!(stdout.contains(r#""xdp_guard":{"state":"off""#), "{stdout}");
    assert!(
        stdout.contains("missing CAP_BPF"),
        "reason names the capability: {stdout}"
    );
    assert!(
        stderr.contains("socket fast path off") && stderr.contains("userspace relay"),
        "one clear log line: {stderr}"
    );

    let on = run("on");
    let stderr = String::from_utf8_lossy(&on.stderr);
    assert!(
        !on.status.success(),
        "--ebpf=on must fail without capabilities"
    );
    assert!(
        stderr.contains("--ebpf=on") && stderr.contains("missing CAP_BPF"),
        "clear error: {stderr}"
    );

    // --ebpf=off attaches nothing, even with every capability.
    let off = n
        .node
        .command(relay_bin())
        .expect("netns command")
        .args(["--ebpf=off", "--exit-after-load"])
        .output()
        .expect("run off");
    let stdout = String::from_utf8_lossy(&off.stdout);
    assert!(off.status.success());
    assert!(
        stdout.contains(r#""fast_path":{"state":"off","detail":"--ebpf=off"}"#),
        "{stdout}"
    );
}

fn our_prog_ids() -> Vec<u32> {
    let out = netns::run(&["bpftool", "prog", "show"]).expect("bpftool prog");
    out.lines()
        .filter(|l| {
            ["spoke_sockops", "spoke_msg", "spoke_xdp_guard"]
                .iter()
                .any(|p| l.contains(&format!("name {p} ")))
        })
        .filter_map(|l| l.split(':').next()?.trim().parse().ok())
        .collect()
}

/// After SIGKILL nothing of ours stays attached or loaded, and a restarted agent attaches
/// cleanly.
#[test]
fn sigkill_leaves_nothing_attached() {
    if !require_root("sigkill_leaves_nothing_attached", "root and eBPF") {
        return;
    }
    let _serial = serial();
    let n = Node::new();
    let _pod = Server::start(&n.pod, "10.211.0.2:7000", Behaviour::Echo);
    let existing = our_prog_ids();
    let args = [
        "--ebpf=on".to_string(),
        "--cgroup-path".into(),
        n.cg(),
        "--xdp-guard-interfaces=n-out".into(),
        "--route=127.0.0.1:9002=10.211.0.2:7000".into(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut agent = Agent::start(&n.node, &args);
    let ours: Vec<u32> = our_prog_ids()
        .into_iter()
        .filter(|id| !existing.contains(id))
        .collect();
    assert_eq!(ours.len(), 3, "sock_ops, sk_msg and xdp loaded: {ours:?}");
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
    echo_roundtrip(&n.node, "127.0.0.1:9002", data.clone());

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

    // Restart takes over cleanly.
    let agent = Agent::start(&n.node, &args);
    assert!(
        agent.status.contains(r#""xdp_guard":{"state":"on""#),
        "{}",
        agent.status
    );
    let before = agent.metrics();
    echo_roundtrip(&n.node, "127.0.0.1:9002", data);
    assert_eq!(delta(&before, &agent.metrics(), PAIRS), 1.0);
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

struct Figures {
    gbit: f64,
    relay_cpu_per_gib: f64,
    total_cpu_per_gib: f64,
    p50_us: f64,
    p99_us: f64,
    rr_relay_cpu_us: f64,
}

fn measure(n: &Node, mode: &str, sink: &str, echo: &str) -> Figures {
    let agent = Agent::start(
        &n.node,
        &[
            &format!("--ebpf={mode}"),
            "--cgroup-path",
            &n.cg(),
            &format!("--route=127.0.0.1:9101={sink}"),
            &format!("--route=127.0.0.1:9102={echo}"),
        ],
    );
    // Bulk: 1 GiB client -> relay -> sink.
    const BULK: usize = 1 << 30;
    let (cpu0, self0) = (agent.cpu_seconds(), self_cpu_seconds());
    let t = n
        .node
        .spawn(|| {
            let mut c = TcpStream::connect("127.0.0.1:9101").expect("connect");
            let chunk = vec![0x5au8; 256 * 1024];
            let start = Instant::now();
            let mut sent = 0;
            while sent < BULK {
                c.write_all(&chunk).expect("write");
                sent += chunk.len();
            }
            c.shutdown(Shutdown::Write).expect("shutdown");
            let mut ack = [0u8; 1];
            c.read_exact(&mut ack).expect("sink ack");
            start.elapsed()
        })
        .join()
        .expect("bulk thread")
        .expect("netns");
    let (cpu1, self1) = (agent.cpu_seconds(), self_cpu_seconds());
    let gib = BULK as f64 / (1u64 << 30) as f64;
    let gbit = BULK as f64 * 8.0 / t.as_secs_f64() / 1e9;

    // Latency: 64-byte request/response through the relay to the echo server.
    const ROUNDS: usize = 20_000;
    let cpu2 = agent.cpu_seconds();
    let mut lat = n
        .node
        .spawn(|| {
            let mut c = TcpStream::connect("127.0.0.1:9102").expect("connect");
            c.set_nodelay(true).expect("nodelay");
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
            lat
        })
        .join()
        .expect("rr thread")
        .expect("netns");
    let cpu3 = agent.cpu_seconds();
    lat.sort_by(f64::total_cmp);
    Figures {
        gbit,
        relay_cpu_per_gib: (cpu1 - cpu0) / gib,
        total_cpu_per_gib: (cpu1 - cpu0 + self1 - self0) / gib,
        p50_us: lat[lat.len() / 2],
        p99_us: lat[lat.len() * 99 / 100],
        rr_relay_cpu_us: (cpu3 - cpu2) / ROUNDS as f64 * 1e6,
    }
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture (root)"]
fn bench_fast_path_ab() {
    if !require_root("bench_fast_path_ab", "root and eBPF") {
        return;
    }
    let _serial = serial();
    let n = Node::new();
    // The sink takes the bulk runs (one byte back at EOF); the echo server the 64-byte rounds.
    let _sink_local = Server::start(&n.node, "127.0.0.1:7100", Behaviour::Sink);
    let _echo_local = Server::start(&n.node, "127.0.0.1:7200", Behaviour::Echo);
    let _sink_pod = Server::start(&n.pod, "10.211.0.2:7100", Behaviour::Sink);
    let _echo_pod = Server::start(&n.pod, "10.211.0.2:7200", Behaviour::Echo);
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
                let f = measure(&n, mode, sink, echo);
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
