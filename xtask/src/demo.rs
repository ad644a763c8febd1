//! `cargo xtask demo`: the whole path on this machine, as a cluster would run it.
//! kube-apiserver's role is played here: HTTP CONNECT over mTLS to spoke-server, exactly
//! the bytes its HTTPConnect egress sends, then TLS to a kubelet-like backend through the
//! tunnel. Certificates are generated on the fly.
use anyhow::{bail, Context, Result};
use spoke_tests::certs::{CertKey, Pki};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BULK_BYTES: u64 = 256 << 20;

struct Proc {
    name: &'static str,
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SIGTERM first so both binaries show their shutdown path, then make sure.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        std::thread::sleep(Duration::from_millis(300));
        let _ = self.child.kill();
        let _ = self.child.wait();
        println!("  stopped {}", self.name);
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn spawn(name: &'static str, bin: &Path, args: &[String], log: &Path) -> Result<Proc> {
    let log_file = std::fs::File::create(log)?;
    let child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    Ok(Proc { name, child })
}

pub fn run(once: bool) -> Result<()> {
    // The agent runs with --ebpf=auto: it uses the fast path when it can.
    let bin = crate::build::release()?;
    let dir = std::env::temp_dir().join(format!("spoke-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    println!(
        "== certificates (CA, server, agent, kube-apiserver client) in {}",
        dir.display()
    );
    let pki = Pki::generate(&dir);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let result = rt.block_on(demo(&pki, &bin, &dir, once));
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn demo(pki: &Pki, bin: &Path, dir: &Path, once: bool) -> Result<()> {
    let ca = &pki.main;
    let kubelet = serve_kubelet(&ca.server).await?;
    println!("== kubelet-like HTTPS backend on {kubelet}");
    let [frontend, agent_port, s_health, s_admin, a_health, a_admin] = [
        free_port()?,
        free_port()?,
        free_port()?,
        free_port()?,
        free_port()?,
        free_port()?,
    ];
    let p = |x: &PathBuf| x.display().to_string();
    let server_args = vec![
        "--mode=http-connect".into(),
        "--server-bind-address=127.0.0.1".into(),
        format!("--server-port={frontend}"),
        format!("--server-cert={}", p(&ca.server.cert)),
        format!("--server-key={}", p(&ca.server.key)),
        format!("--server-ca-cert={}", p(&ca.ca)),
        "--agent-bind-address=127.0.0.1".into(),
        format!("--agent-port={agent_port}"),
        format!("--cluster-cert={}", p(&ca.server.cert)),
        format!("--cluster-key={}", p(&ca.server.key)),
        format!("--cluster-ca-cert={}", p(&ca.ca)),
        "--health-bind-address=127.0.0.1".into(),
        format!("--health-port={s_health}"),
        format!("--admin-port={s_admin}"),
        "--server-id=demo-server".into(),
        "--proxy-strategies=destHost,default".into(),
        "--log-format=text".into(),
    ];
    let agent_args = vec![
        format!("--ca-cert={}", p(&ca.ca)),
        format!("--agent-cert={}", p(&ca.agent.cert)),
        format!("--agent-key={}", p(&ca.agent.key)),
        "--proxy-server-host=127.0.0.1".into(),
        format!("--proxy-server-port={agent_port}"),
        "--agent-id=demo-node".into(),
        "--agent-identifiers=host=demo-node&ipv4=127.0.0.1".into(),
        "--health-server-host=127.0.0.1".into(),
        format!("--health-server-port={a_health}"),
        format!("--admin-server-port={a_admin}"),
        "--ebpf=auto".into(),
        "--log-format=text".into(),
    ];
    let _server = spawn(
        "spoke-server",
        &bin.join("spoke-server"),
        &server_args,
        &dir.join("server.log"),
    )?;
    println!("== spoke-server: frontend (HTTP CONNECT, mTLS) 127.0.0.1:{frontend}, agents :{agent_port}, health :{s_health}");
    let _agent = spawn(
        "spoke-agent",
        &bin.join("spoke-agent"),
        &agent_args,
        &dir.join("agent.log"),
    )?;
    println!("== spoke-agent: health :{a_health}");
    wait_ready(s_health, "spoke-server").await?;
    wait_ready(a_health, "spoke-agent").await?;
    if let Ok(line) = std::fs::read_to_string(dir.join("agent.log")) {
        if let Some(l) = line.lines().find(|l| l.contains("eBPF mode")) {
            println!(
                "   agent says: {}",
                l.split("spoke_agent::ebpf")
                    .last()
                    .unwrap_or(l)
                    .trim_start_matches([':', ' ', '\u{1b}', '[', '0', 'm', '2'])
            );
        }
    }

    let client = Client::new(pki, frontend)?;
    println!("\n== kube-apiserver → spoke-server → tunnel → spoke-agent → kubelet");
    let t = Instant::now();
    let logs = client
        .get(kubelet, "/containerLogs/default/demo/app")
        .await?;
    println!(
        "   GET /containerLogs/default/demo/app → {} in {:?}",
        logs.lines().next().unwrap_or(""),
        t.elapsed()
    );
    for l in logs.split("\r\n\r\n").nth(1).unwrap_or("").lines() {
        println!("   | {l}");
    }

    println!(
        "\n== bulk: {} MiB download, through the tunnel vs direct",
        BULK_BYTES >> 20
    );
    let tunnel = client.download(kubelet, BULK_BYTES, true).await?;
    let direct = client.download(kubelet, BULK_BYTES, false).await?;
    println!("   through the tunnel: {:>7.0} MiB/s", tunnel);
    println!(
        "   direct (TLS):       {:>7.0} MiB/s   ratio {:.2}",
        direct,
        tunnel / direct
    );

    print_figures(s_health, a_health).await;
    if once {
        return Ok(());
    }
    println!("\n== running; a logs request every 5 s. Ctrl-C stops everything.");
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tick.tick() => {
                let t = Instant::now();
                match client.get(kubelet, "/containerLogs/default/demo/app").await {
                    Ok(r) => println!("   {} in {:?}", r.lines().next().unwrap_or(""), t.elapsed()),
                    Err(e) => println!("   request failed: {e:#}"),
                }
            }
        }
    }
    println!("\n== stopping");
    print_figures(s_health, a_health).await;
    Ok(())
}

async fn wait_ready(port: u16, name: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok((code, _)) = http_get(port, "/readyz").await {
            if code == 200 {
                println!("   {name} ready");
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{name} not ready after 20 s (see its log)")
}

async fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    let code = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, out.split("\r\n\r\n").nth(1).unwrap_or("").to_string()))
}

async fn print_figures(s_health: u16, a_health: u16) {
    println!("\n== tunnel figures (from /metrics)");
    let pick = |body: &str, keys: &[&str]| {
        for l in body.lines().filter(|l| !l.starts_with('#')) {
            if keys.iter().any(|k| l.starts_with(k)) {
                println!("   {l}");
            }
        }
    };
    if let Ok((_, m)) = http_get(s_health, "/metrics").await {
        pick(
            &m,
            &[
                "konnectivity_network_proxy_server_ready_backend_connections",
                "konnectivity_network_proxy_server_established_connections",
                "konnectivity_network_proxy_server_dial_duration_seconds_count",
                "konnectivity_network_proxy_server_dial_duration_seconds_sum",
                "spoke_server_bytes_relayed",
            ],
        );
    }
    if let Ok((_, m)) = http_get(a_health, "/metrics").await {
        pick(
            &m,
            &[
                "konnectivity_network_proxy_agent_open_server_connections",
                "konnectivity_network_proxy_agent_open_endpoint_connections",
                "spoke_agent_bytes_relayed",
                "spoke_agent_flow_control_stalls",
                "spoke_ebpf_program_attached",
            ],
        );
    }
}

/// kube-apiserver's side: mTLS to the proxy, CONNECT, then TLS to the kubelet.
struct Client {
    proxy: tokio_rustls::TlsConnector,
    kubelet: tokio_rustls::TlsConnector,
    frontend: u16,
}

fn tls_client(ca: &Path, id: Option<&CertKey>) -> Result<Arc<rustls::ClientConfig>> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(ca)? {
        roots.add(c?)?;
    }
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots);
    Ok(Arc::new(match id {
        Some(ck) => b.with_client_auth_cert(
            rustls_pki_types::CertificateDer::pem_file_iter(&ck.cert)?.collect::<Result<_, _>>()?,
            rustls_pki_types::PrivateKeyDer::from_pem_file(&ck.key)?,
        )?,
        None => b.with_no_client_auth(),
    }))
}

type Tls = tokio_rustls::client::TlsStream<tokio_rustls::client::TlsStream<TcpStream>>;

impl Client {
    fn new(pki: &Pki, frontend: u16) -> Result<Self> {
        Ok(Self {
            proxy: tls_client(&pki.main.ca, Some(&pki.main.frontend))?.into(),
            kubelet: tls_client(&pki.main.ca, None)?.into(),
            frontend,
        })
    }

    async fn tunnel(&self, target: SocketAddr) -> Result<Tls> {
        let tcp = TcpStream::connect(("127.0.0.1", self.frontend)).await?;
        let mut proxy = self.proxy.connect("localhost".try_into()?, tcp).await?;
        // Exactly what kube-apiserver's HTTPConnect egress dialer writes.
        proxy
            .write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
            .await?;
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            if proxy.read(&mut b).await? == 0 {
                bail!("proxy closed: {}", String::from_utf8_lossy(&head));
            }
            head.push(b[0]);
        }
        let status = String::from_utf8_lossy(&head)
            .lines()
            .next()
            .unwrap_or("")
            .to_string();
        if !status.contains(" 200 ") {
            bail!("proxy answered {status}");
        }
        Ok(self.kubelet.connect("localhost".try_into()?, proxy).await?)
    }

    async fn get(&self, target: SocketAddr, path: &str) -> Result<String> {
        let mut s = self.tunnel(target).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: kubelet\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// MiB/s of a `bytes`-long download, through the tunnel or straight to the backend.
    async fn download(&self, target: SocketAddr, bytes: u64, tunnel: bool) -> Result<f64> {
        let req = format!(
            "GET /bulk?bytes={bytes} HTTP/1.1\r\nHost: kubelet\r\nConnection: close\r\n\r\n"
        );
        let t = Instant::now();
        let n = if tunnel {
            let mut s = self.tunnel(target).await?;
            s.write_all(req.as_bytes()).await?;
            drain(&mut s).await
        } else {
            let tcp = TcpStream::connect(target).await?;
            let mut s = self.kubelet.connect("localhost".try_into()?, tcp).await?;
            s.write_all(req.as_bytes()).await?;
            drain(&mut s).await
        };
        if n < bytes {
            bail!("download ended after {n} of {bytes} bytes");
        }
        Ok(bytes as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64())
    }
}

async fn drain<S: AsyncReadExt + Unpin>(s: &mut S) -> u64 {
    let mut buf = vec![0u8; 256 << 10];
    let mut n = 0u64;
    while let Ok(k) = s.read(&mut buf).await {
        if k == 0 {
            break;
        }
        n += k as u64;
    }
    n
}

/// A kubelet stand-in: HTTPS with `/containerLogs/...` and `/bulk?bytes=N`.
async fn serve_kubelet(id: &CertKey) -> Result<SocketAddr> {
    use rustls_pki_types::pem::PemObject;
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(
        rustls_pki_types::CertificateDer::pem_file_iter(&id.cert)?.collect::<Result<_, _>>()?,
        rustls_pki_types::PrivateKeyDer::from_pem_file(&id.key)?,
    )?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut head = Vec::new();
                let mut b = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => head.extend_from_slice(&b[..k]),
                    }
                }
                let line = String::from_utf8_lossy(&head)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string();
                let path = line.split(' ').nth(1).unwrap_or("/").to_string();
                if let Some(n) = path
                    .strip_prefix("/bulk?bytes=")
                    .and_then(|n| n.parse::<u64>().ok())
                {
                    let _ = s
                        .write_all(
                            format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n").as_bytes(),
                        )
                        .await;
                    let chunk = vec![b'x'; 256 << 10];
                    let mut left = n;
                    while left > 0 {
                        let k = left.min(chunk.len() as u64) as usize;
                        if s.write_all(&chunk[..k]).await.is_err() {
                            return;
                        }
                        left -= k as u64;
                    }
                } else {
                    let mut body = Vec::new();
                    for i in 1..=3 {
                        let _ = writeln!(
                            body,
                            "2026-11-23T12:00:0{i}Z app[{i}]: serving request #{i}"
                        );
                    }
                    let _ = s.write_all(format!("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes()).await;
                    let _ = s.write_all(&body).await;
                }
                let _ = s.shutdown().await;
            });
        }
    });
    Ok(addr)
}
