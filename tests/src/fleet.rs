//! A simulated fleet of agents in one process: each agent its own TCP + mTLS connection and its
//! own HTTP/2 `/AgentService/Connect` stream per server, with its own `agentid` and
//! `agentidentifiers`, speaking upstream's metadata and packets. It answers DIAL_REQ with a
//! DIAL_RSP (a fresh connectID, no endpoint dialed) and CLOSE_REQ with CLOSE_RSP, so dials
//! through a loaded server can be timed end to end without a backend per agent.
//!
//! Every agent runs upstream's sync loop (`pkg/agent/clientset.go`): try one Connect; on
//! success, or on a duplicate server id, wait `sync_interval` jittered by up to 10 %; on an
//! error, back off (`sync_interval` × 1.5 per failure, 10 % jitter, capped at
//! `sync_interval_cap`). It keeps connecting until it holds `serverCount` streams to distinct
//! server ids. The loop starts at once; a stream that ends is noticed at the next tick.
//! An agent that holds all its streams does not wake at ticks that would find nothing to do:
//! it sleeps until a stream ends, then until the tick after that, drawn from the same jittered
//! schedule. Reconnects come when upstream's would, and 10,000 idle agents in one process do
//! not cost the server under test 10,000 wake-ups a second of the machine's two cores.
//!
//! Connections leave from several loopback source addresses (127.0.1.x, with
//! `IP_BIND_ADDRESS_NO_PORT`), so tens of thousands fit in the ephemeral port range.
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;
use rand::Rng;
use rustls::ClientConfig;
use spoke_proto::packet::Payload;
use spoke_proto::{CloseResponse, DialResponse, Packet, PacketType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, UnixStream};
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinHandle;

/// How the fleet reaches its server(s) and behaves.
#[derive(Clone)]
pub struct FleetConfig {
    /// The agent port (one server, or a balancer in front of several).
    pub server: SocketAddr,
    /// Agent client config: CA, agent certificate, ALPN `h2`.
    pub tls: Arc<ClientConfig>,
    /// Upstream's `--sync-interval` (1 s).
    pub sync_interval: Duration,
    /// Upstream's `--sync-interval-cap` (10 s).
    pub sync_interval_cap: Duration,
    /// A Connect that has not answered (TCP, TLS, response headers) in this long failed.
    pub connect_timeout: Duration,
    /// Bound on first connects in flight across the fleet (a DaemonSet rolls out gradually);
    /// `None`: every agent starts at once. Reconnects are never held back.
    pub first_connects: Option<usize>,
    /// Source addresses to spread connections over (empty: the kernel's choice).
    pub sources: Vec<IpAddr>,
    /// Agent ids are `<prefix><index>`.
    pub id_prefix: String,
    /// Index of the first agent (a second fleet on the same servers starts past the first).
    pub first: usize,
}

impl FleetConfig {
    pub fn new(server: SocketAddr, tls: Arc<ClientConfig>) -> Self {
        Self {
            server,
            tls,
            sync_interval: Duration::from_secs(1),
            sync_interval_cap: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(20),
            first_connects: Some(500),
            sources: loopback_sources(64),
            id_prefix: "node-".into(),
            first: 0,
        }
    }
}

/// `n` loopback addresses 127.0.1.1 … for outgoing connections.
pub fn loopback_sources(n: u8) -> Vec<IpAddr> {
    (1..=n.max(1))
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 1, i)))
        .collect()
}

/// The host name agent `i` advertises (`host=` identifier) and destHost dials name.
pub fn agent_host(prefix: &str, i: usize) -> String {
    format!("{prefix}{i}.fleet")
}

/// The IPv4 address agent `i` advertises (`ipv4=`): in 10.64.0.0/10, never dialed for real.
pub fn agent_ipv4(i: usize) -> Ipv4Addr {
    let i = i as u32;
    Ipv4Addr::new(10, 64 + ((i >> 16) & 0x3f) as u8, (i >> 8) as u8, i as u8)
}

/// What the whole fleet has seen.
#[derive(Debug, Default)]
pub struct FleetStats {
    /// Streams open now (all agents, all servers).
    pub streams: AtomicUsize,
    /// Agents holding as many streams as the servers said exist.
    pub complete: AtomicUsize,
    /// Connects that got the server's headers.
    pub connects: AtomicU64,
    /// Connect attempts that failed (refused, TLS, timeout, error status).
    pub failures: AtomicU64,
    /// Connects closed at once because the agent already had that server.
    pub duplicates: AtomicU64,
    /// Streams that ended.
    pub lost: AtomicU64,
    /// DIAL_REQs answered.
    pub dials: AtomicU64,
    /// Agents whose first connect succeeded.
    pub started: AtomicUsize,
    /// The last few distinct failure texts (for reports).
    pub errors: Mutex<Vec<String>>,
}

impl FleetStats {
    fn error(&self, e: &anyhow::Error) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let text = format!("{e:#}");
        if let Ok(mut v) = self.errors.lock() {
            if v.len() < 8 && !v.contains(&text) {
                v.push(text);
            }
        }
    }

    pub fn errors(&self) -> Vec<String> {
        self.errors.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

/// A running fleet; its agents stop when it is dropped.
pub struct Fleet {
    pub stats: Arc<FleetStats>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    n: usize,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Fleet {
    /// Starts agents `first..first + n` on the current runtime.
    pub fn start(cfg: FleetConfig, n: usize) -> Fleet {
        let cfg = Arc::new(cfg);
        let stats = Arc::new(FleetStats::default());
        let (stop, stop_rx) = watch::channel(false);
        let gate = cfg.first_connects.map(|k| Arc::new(Semaphore::new(k)));
        let tasks = (0..n)
            .map(|i| {
                let agent = Agent {
                    index: cfg.first + i,
                    cfg: cfg.clone(),
                    stats: stats.clone(),
                    live: Arc::new(Mutex::new(Live::default())),
                    lost: Arc::new(Notify::new()),
                    stop: stop_rx.clone(),
                };
                let (gate, stop) = (gate.clone(), stop_rx.clone());
                tokio::spawn(agent.sync(gate, stop))
            })
            .collect();
        Fleet {
            stats,
            stop,
            tasks,
            n,
        }
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Waits until every agent holds all its streams and `connects` reached `min_connects`;
    /// returns the time it took, or an error after `timeout`.
    pub async fn wait_complete(
        &self,
        min_connects: u64,
        timeout: Duration,
    ) -> anyhow::Result<Duration> {
        let t = Instant::now();
        loop {
            let s = &self.stats;
            if s.complete.load(Ordering::Relaxed) == self.n
                && s.connects.load(Ordering::Relaxed) >= min_connects
            {
                return Ok(t.elapsed());
            }
            if t.elapsed() > timeout {
                bail!(
                    "{} of {} agents complete after {timeout:?} ({} streams, {} connects, {} failures; {})",
                    s.complete.load(Ordering::Relaxed),
                    self.n,
                    s.streams.load(Ordering::Relaxed),
                    s.connects.load(Ordering::Relaxed),
                    s.failures.load(Ordering::Relaxed),
                    s.errors().join(" | ")
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The streams one agent holds now.
#[derive(Default)]
struct Live {
    /// Server ids it is connected to.
    servers: Vec<String>,
    /// The last `serverCount` heard.
    server_count: usize,
    complete: bool,
}

struct Agent {
    index: usize,
    cfg: Arc<FleetConfig>,
    stats: Arc<FleetStats>,
    live: Arc<Mutex<Live>>,
    /// A stream ended (a permit is kept if the sync loop is not waiting yet).
    lost: Arc<Notify>,
    /// Fires when the fleet is dropped: every stream ends.
    stop: watch::Receiver<bool>,
}

fn jitter(d: Duration, factor: f64) -> Duration {
    d.mul_f64(1.0 + rand::rng().random::<f64>() * factor)
}

impl Agent {
    fn live(&self) -> std::sync::MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Recounts whether this agent holds all its streams.
    fn recount(live: &mut Live, stats: &FleetStats) {
        let complete = !live.servers.is_empty() && live.servers.len() >= live.server_count.max(1);
        if complete != live.complete {
            live.complete = complete;
            if complete {
                stats.complete.fetch_add(1, Ordering::Relaxed);
            } else {
                stats.complete.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Upstream's sync loop.
    async fn sync(self, gate: Option<Arc<Semaphore>>, mut stop: watch::Receiver<bool>) {
        let cfg = self.cfg.clone();
        let mut backoff = cfg.sync_interval;
        let mut first = true;
        loop {
            let wanted = {
                let l = self.live();
                l.servers.is_empty() || l.servers.len() < l.server_count.max(1)
            };
            let wait = if !wanted {
                backoff = cfg.sync_interval;
                // Ticks until a stream ends would do nothing: skip them, then wait for the
                // first tick of the same schedule after the loss.
                let mut tick = Instant::now() + jitter(cfg.sync_interval, 0.1);
                tokio::select! {
                    _ = self.lost.notified() => {}
                    _ = stop.changed() => return,
                }
                let now = Instant::now();
                while tick <= now {
                    tick += jitter(cfg.sync_interval, 0.1);
                }
                tick - now
            } else {
                let permit = match (&gate, first) {
                    (Some(g), true) => g.clone().acquire_owned().await.ok(),
                    _ => None,
                };
                let r = self.connect_once().await;
                drop(permit);
                match r {
                    Ok(fresh) => {
                        if fresh && first {
                            first = false;
                            self.stats.started.fetch_add(1, Ordering::Relaxed);
                        }
                        backoff = cfg.sync_interval;
                        jitter(cfg.sync_interval, 0.1)
                    }
                    Err(e) => {
                        self.stats.error(&e);
                        // wait.Backoff.Step(): the jittered current duration, then ×1.5 (capped).
                        let d = jitter(backoff, 0.1);
                        backoff = backoff.mul_f64(1.5).min(cfg.sync_interval_cap);
                        d
                    }
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// One Connect: Ok(true) a new stream, Ok(false) a duplicate server (closed).
    async fn connect_once(&self) -> anyhow::Result<bool> {
        let cfg = &self.cfg;
        let (server_id, count, stream) = tokio::time::timeout(cfg.connect_timeout, self.open())
            .await
            .context("connect timed out")??;
        {
            let mut l = self.live();
            l.server_count = count;
            if l.servers.contains(&server_id) {
                self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                return Ok(false);
            }
            l.servers.push(server_id.clone());
            Self::recount(&mut l, &self.stats);
        }
        self.stats.connects.fetch_add(1, Ordering::Relaxed);
        self.stats.streams.fetch_add(1, Ordering::Relaxed);
        let (live, stats, lost) = (self.live.clone(), self.stats.clone(), self.lost.clone());
        let mut stop = self.stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = stream.serve(&stats) => {}
                _ = stop.changed() => return,
            }
            stats.streams.fetch_sub(1, Ordering::Relaxed);
            stats.lost.fetch_add(1, Ordering::Relaxed);
            let mut l = live.lock().unwrap_or_else(|e| e.into_inner());
            l.servers.retain(|s| *s != server_id);
            Agent::recount(&mut l, &stats);
            lost.notify_one();
        });
        Ok(true)
    }

    async fn open(&self) -> anyhow::Result<(String, usize, AgentStream)> {
        let cfg = &self.cfg;
        let sock = TcpSocket::new_v4()?;
        if !cfg.sources.is_empty() {
            let src = cfg.sources[self.index % cfg.sources.len()];
            bind_no_port(&sock);
            sock.bind(SocketAddr::new(src, 0))?;
        }
        let tcp = sock.connect(cfg.server).await.context("TCP connect")?;
        tcp.set_nodelay(true)?;
        let name = rustls_pki_types::ServerName::try_from("localhost")?;
        let tls = tokio_rustls::TlsConnector::from(cfg.tls.clone())
            .connect(name, tcp)
            .await
            .context("TLS handshake")?;
        let (client, conn) = h2::client::Builder::new()
            .initial_window_size(1 << 16)
            .handshake::<_, Bytes>(tls)
            .await
            .context("HTTP/2 handshake")?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let guard = AbortOnDrop(driver);
        let mut client = client.ready().await.context("HTTP/2 not ready")?;
        let i = self.index;
        let identifiers = format!(
            "host={}&ipv4={}",
            agent_host(&cfg.id_prefix, i),
            agent_ipv4(i)
        );
        let req = http::Request::builder()
            .method("POST")
            .uri("https://localhost/AgentService/Connect")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("user-agent", "spoke-fleet")
            .header("agentid", format!("{}{i}", cfg.id_prefix))
            .header("agentidentifiers", identifiers)
            .body(())?;
        let (rsp, send) = client.send_request(req, false)?;
        let rsp = rsp.await.context("Connect")?;
        let (parts, body) = rsp.into_parts();
        let header = |k: &str| {
            parts
                .headers
                .get(k)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        if parts.status != http::StatusCode::OK {
            bail!("Connect answered HTTP {}", parts.status);
        }
        if let Some(code) = header("grpc-status") {
            bail!(
                "Connect refused: grpc-status {code}: {}",
                header("grpc-message").unwrap_or_default()
            );
        }
        let server_id = header("serverid").context("no serverid header")?;
        let count = header("servercount")
            .and_then(|c| c.parse::<usize>().ok())
            .unwrap_or(1);
        Ok((
            server_id,
            count,
            AgentStream {
                send,
                body,
                _driver: guard,
                _client: client,
                next_id: 0,
            },
        ))
    }
}

/// Lets the kernel pick the source port at connect time, by the whole 4-tuple.
fn bind_no_port(sock: &TcpSocket) {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: a valid socket and a c_int option value of the right size.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One open Connect stream.
struct AgentStream {
    send: h2::SendStream<Bytes>,
    body: h2::RecvStream,
    _driver: AbortOnDrop,
    _client: h2::client::SendRequest<Bytes>,
    next_id: i64,
}

/// A gRPC message frame around `p`.
pub fn grpc_frame(p: &Packet) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + p.encoded_len());
    b.put_u8(0);
    b.put_u32(p.encoded_len() as u32);
    let _ = p.encode(&mut b);
    b.freeze()
}

impl AgentStream {
    /// Answers the server until the stream ends.
    async fn serve(mut self, stats: &FleetStats) -> anyhow::Result<()> {
        let mut buf = BytesMut::new();
        while let Some(chunk) = self.body.data().await {
            let chunk = chunk?;
            let _ = self.body.flow_control().release_capacity(chunk.len());
            buf.extend_from_slice(&chunk);
            while buf.len() >= 5 {
                let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
                if buf.len() < 5 + len {
                    break;
                }
                buf.advance(5);
                let msg = buf.split_to(len);
                let p = Packet::decode(msg.freeze())?;
                if let Some(reply) = self.answer(p) {
                    if reply.r#type == PacketType::DialRsp as i32 {
                        stats.dials.fetch_add(1, Ordering::Relaxed);
                    }
                    self.send.send_data(grpc_frame(&reply), false)?;
                }
            }
            if buf.is_empty() {
                // Give back what a burst grew.
                buf = BytesMut::new();
            }
        }
        Ok(())
    }

    fn answer(&mut self, p: Packet) -> Option<Packet> {
        match p.payload {
            Some(Payload::DialRequest(d)) => {
                self.next_id += 1;
                Some(Packet {
                    r#type: PacketType::DialRsp as i32,
                    payload: Some(Payload::DialResponse(DialResponse {
                        error: String::new(),
                        connect_id: self.next_id,
                        random: d.random,
                    })),
                })
            }
            Some(Payload::CloseRequest(c)) => Some(Packet {
                r#type: PacketType::CloseRsp as i32,
                payload: Some(Payload::CloseResponse(CloseResponse {
                    error: String::new(),
                    connect_id: c.connect_id,
                })),
            }),
            _ => None,
        }
    }
}

/// One dial as kube-apiserver's HTTP CONNECT egress makes it, over the server's Unix socket
/// frontend: connect, CONNECT `target`, read the answer head, close. Ok(elapsed) on 200.
pub async fn connect_dial(uds: &std::path::Path, target: &str) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let mut s = UnixStream::connect(uds).await.context("frontend connect")?;
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await?;
    let mut head = Vec::with_capacity(256);
    let mut b = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let k = s.read(&mut b).await?;
        if k == 0 {
            bail!("frontend closed: {}", String::from_utf8_lossy(&head));
        }
        head.extend_from_slice(&b[..k]);
        if head.len() > 8192 {
            bail!("answer head too long");
        }
    }
    let elapsed = t.elapsed();
    let line = String::from_utf8_lossy(&head)
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    if !line.contains(" 200") {
        bail!("{line}");
    }
    Ok(elapsed)
}

/// A TCP balancer on 127.0.0.1 in front of several agent ports, as a load balancer with
/// health checks: each connection goes to the live backend with the fewest forwarded
/// connections (least connections); a backend that refuses is skipped for the next one.
pub struct Balancer {
    pub addr: SocketAddr,
    /// Forwarded connections open now, per backend.
    pub open: Arc<Vec<AtomicUsize>>,
    task: JoinHandle<()>,
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Balancer {
    pub async fn start(backends: Vec<SocketAddr>) -> anyhow::Result<Balancer> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let open: Arc<Vec<AtomicUsize>> =
            Arc::new(backends.iter().map(|_| AtomicUsize::new(0)).collect());
        let counts = open.clone();
        let task = tokio::spawn(async move {
            let backends = Arc::new(backends);
            while let Ok((client, _)) = listener.accept().await {
                let (backends, counts) = (backends.clone(), counts.clone());
                tokio::spawn(async move {
                    let _ = client.set_nodelay(true);
                    let mut order: Vec<usize> = (0..backends.len()).collect();
                    order.sort_by_key(|&i| {
                        (
                            counts[i].load(Ordering::Relaxed),
                            rand::rng().random::<u32>(),
                        )
                    });
                    for i in order {
                        if let Ok(mut up) = tokio::net::TcpStream::connect(backends[i]).await {
                            let _ = up.set_nodelay(true);
                            counts[i].fetch_add(1, Ordering::Relaxed);
                            let mut client = client;
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
                            counts[i].fetch_sub(1, Ordering::Relaxed);
                            return;
                        }
                    }
                });
            }
        });
        Ok(Balancer { addr, open, task })
    }
}
