//! Operations (issue #5): upstream metric names/types/labels/HELP, readiness transitions, agent
//! SIGTERM drain, cluster certificate rotation, and server graceful shutdown.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use spoke_tests::backends;
use spoke_tests::certs::{Ca, CertKey};
use spoke_tests::cluster::{gauge, status, wait_tables_empty, AgentOpts, Env, Server, ServerOpts};
use spoke_tests::connect;
use spoke_tests::faultnet::signal;
use spoke_tests::http;
use spoke_tests::metrics::names;
use spoke_tests::rotation::{der, served_cert, wait_served, write_atomically};
use spoke_tests::wait::{holds_for, poll_until, within};
use tokio::io::AsyncReadExt;

// ---------------------------------------------------------------------------------------------
// 1. metrics

fn type_of(text: &str, name: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("# TYPE {name} ")))
        .map(|t| t.trim().to_string())
}

fn help_of(text: &str, name: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("# HELP {name} ")))
        .map(|t| t.trim().to_string())
}

/// Samples of exactly `name`: (labels, value).
fn samples(text: &str, name: &str) -> Vec<(Vec<(String, String)>, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (labels, value) = if let Some(r) = rest.strip_prefix('{') {
                let (inner, v) = r.rsplit_once('}')?;
                let labels = inner
                    .split("\",")
                    .filter(|kv| !kv.is_empty())
                    .filter_map(|kv| {
                        let (k, v) = kv.split_once('=')?;
                        Some((
                            k.trim().to_string(),
                            v.trim_matches(|c| c == '"' || c == ',').to_string(),
                        ))
                    })
                    .collect();
                (labels, v)
            } else if rest.starts_with(' ') {
                (Vec::new(), rest)
            } else {
                return None;
            };
            let v = value.split_whitespace().next()?;
            let v = match v {
                "+Inf" => f64::INFINITY,
                v => v.parse().ok()?,
            };
            Some((labels, v))
        })
        .collect()
}

fn label<'a>(labels: &'a [(String, String)], k: &str) -> Option<&'a str> {
    labels
        .iter()
        .find(|(key, _)| key == k)
        .map(|(_, v)| v.as_str())
}

struct Checker {
    problems: Vec<String>,
}

impl Checker {
    fn ty(&mut self, text: &str, name: &str, want: &str) {
        match type_of(text, name) {
            Some(t) if t == want => {}
            other => self
                .problems
                .push(format!("# TYPE {name}: want {want}, got {other:?}")),
        }
    }
    /// Every sample carries exactly these label keys; at least one sample exists.
    fn labels(&mut self, text: &str, name: &str, keys: &[&str]) {
        let s = samples(text, name);
        if s.is_empty() {
            self.problems.push(format!("{name}: no samples"));
        }
        let want: BTreeSet<&str> = keys.iter().copied().collect();
        for (labels, _) in &s {
            let got: BTreeSet<&str> = labels.iter().map(|(k, _)| k.as_str()).collect();
            if got != want {
                self.problems
                    .push(format!("{name}: label keys {got:?}, want {want:?}"));
                break;
            }
        }
    }
    fn value(
        &mut self,
        text: &str,
        name: &str,
        want: &[(&str, &str)],
        check: impl Fn(f64) -> bool,
        what: &str,
    ) {
        let sum: Option<f64> = {
            let m: Vec<f64> = samples(text, name)
                .into_iter()
                .filter(|(l, _)| want.iter().all(|(k, v)| label(l, k) == Some(*v)))
                .map(|(_, v)| v)
                .collect();
            (!m.is_empty()).then(|| m.iter().sum())
        };
        match sum {
            Some(v) if check(v) => {}
            other => self
                .problems
                .push(format!("{name}{want:?}: want {what}, got {other:?}")),
        }
    }
    fn buckets(&mut self, text: &str, name: &str, want: &[f64]) {
        self.ty(text, name, "histogram");
        let les: Vec<f64> = samples(text, &format!("{name}_bucket"))
            .iter()
            .filter_map(|(l, _)| {
                label(l, "le").and_then(|v| {
                    if v == "+Inf" {
                        Some(f64::INFINITY)
                    } else {
                        v.parse().ok()
                    }
                })
            })
            .collect();
        let mut want = want.to_vec();
        want.push(f64::INFINITY);
        let same = les.len() == want.len()
            && les
                .iter()
                .zip(&want)
                .all(|(a, b)| a == b || (a - b).abs() <= b.abs() * 1e-9);
        if !same {
            self.problems
                .push(format!("{name}_bucket le values {les:?}, want {want:?}"));
        }
        self.value(
            text,
            &format!("{name}_count"),
            &[],
            |v| v >= 1.0,
            ">= 1 observation",
        );
    }
    fn help(&mut self, text: &str, name: &str, want: &str) {
        match help_of(text, name) {
            Some(h) if h == want => {}
            other => self
                .problems
                .push(format!("# HELP {name}: want {want:?}, got {other:?}")),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_have_upstream_names_types_labels_and_help() {
    let env = Env::new("o_metrics");
    let (server, agent) = env.pair(ServerOpts::uds(), |a| a).await;
    let echo = backends::echo().await;
    for _ in 0..3 {
        connect::echo_roundtrip(&server.frontend, &echo.target())
            .await
            .unwrap();
    }
    let (_guard, closed) = backends::refusing_port();
    let (reply, _) = connect::connect(&server.frontend, &closed.to_string())
        .await
        .unwrap();
    assert_eq!(reply.status, 502, "CONNECT to a refused port: {reply:?}");
    wait_tables_empty(&server, &[&agent]).await;
    let at = http::get(agent.health_addr, "/metrics").await.unwrap().body;
    let st = http::get(server.health_addr, "/metrics")
        .await
        .unwrap()
        .body;
    let mut c = Checker {
        problems: Vec::new(),
    };

    let a = |n: &str| format!("konnectivity_network_proxy_agent_{n}");
    let packets = a("stream_packets_total");
    c.ty(&at, &packets, "counter");
    c.labels(&at, &packets, &["segment", "packet_type"]);
    c.value(
        &at,
        &packets,
        &[("segment", "from_agent"), ("packet_type", "DIAL_RSP")],
        |v| v >= 4.0,
        ">= 4",
    );
    c.value(
        &at,
        &packets,
        &[("segment", "to_agent"), ("packet_type", "DIAL_REQ")],
        |v| v >= 4.0,
        ">= 4",
    );
    c.buckets(
        &at,
        &a("dial_duration_seconds"),
        &[0.005, 0.025, 0.1, 0.5, 2.5, 10.0, 30.0],
    );
    let fail = a("endpoint_dial_failure_total");
    c.ty(&at, &fail, "counter");
    c.labels(&at, &fail, &["reason"]);
    c.value(&at, &fail, &[], |v| v >= 1.0, ">= 1 (one refused dial)");
    c.help(
        &at,
        &fail,
        "Number of failures dialing the remote endpoint, by reason (example: timeout).",
    );
    for (n, want) in [
        ("open_server_connections", 1.0),
        ("known_server_count", 1.0),
        ("open_endpoint_connections", 0.0),
    ] {
        c.ty(&at, &a(n), "gauge");
        c.labels(&at, &a(n), &[]);
        c.value(&at, &a(n), &[], |v| v == want, &format!("{want}"));
    }
    c.help(
        &at,
        &a("open_endpoint_connections"),
        "Current number of open endpoint connections.",
    );

    let s = |n: &str| format!("konnectivity_network_proxy_server_{n}");
    let packets = s("stream_packets_total");
    c.ty(&st, &packets, "counter");
    c.labels(&st, &packets, &["segment", "packet_type"]);
    c.value(
        &st,
        &packets,
        &[("segment", "to_agent"), ("packet_type", "DIAL_REQ")],
        |v| v >= 4.0,
        ">= 4",
    );
    c.value(
        &st,
        &packets,
        &[("segment", "from_agent"), ("packet_type", "DIAL_RSP")],
        |v| v >= 4.0,
        ">= 4",
    );
    c.buckets(
        &st,
        &s("dial_duration_seconds"),
        &[1e-6, 1e-5, 1e-4, 0.005, 0.025, 0.1, 0.5, 2.5, 12.5],
    );
    let fail = s("dial_failure_count");
    c.ty(&st, &fail, "counter");
    c.labels(&st, &fail, &["reason"]);
    c.value(
        &st,
        &fail,
        &[("reason", "error_response")],
        |v| v >= 1.0,
        ">= 1",
    );
    c.ty(&st, &s("grpc_connections"), "gauge");
    c.labels(&st, &s("grpc_connections"), &["service_method"]);
    c.value(
        &st,
        &s("grpc_connections"),
        &[("service_method", "Connect")],
        |v| v == 1.0,
        "1",
    );
    c.ty(&st, &s("ready_backends"), "gauge");
    c.labels(&st, &s("ready_backends"), &["proxy_strategy"]);
    c.value(
        &st,
        &s("ready_backends"),
        &[("proxy_strategy", "default")],
        |v| v == 1.0,
        "1",
    );
    for (n, want) in [
        ("ready_backend_connections", 1.0),
        ("pending_backend_dials", 0.0),
        ("established_connections", 0.0),
    ] {
        c.ty(&st, &s(n), "gauge");
        c.labels(&st, &s(n), &[]);
        c.value(&st, &s(n), &[], |v| v == want, &format!("{want}"));
    }
    // The rest of upstream's server metrics that exist before any error. Labelled families
    // (stream_errors_total, full_receive_channels, ...) appear with their first sample, as Go's
    // vectors do; culled_leases_count and the lease_* families belong to --enable-lease-controller
    // (tests/kube_control_plane.rs and e2e_ha.rs check them).
    c.ty(&st, &s("http_connections"), "gauge");
    c.value(
        &st,
        &s("http_connections"),
        &[],
        |v| v == 0.0,
        "0 (all closed)",
    );
    c.buckets(
        &st,
        &s("frontend_write_duration_seconds"),
        &[1e-6, 1e-5, 1e-4, 0.005, 0.025, 0.1, 0.5, 2.5, 12.5],
    );
    c.buckets(
        &st,
        &s("connection_duration_seconds"),
        &[
            1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 14400.0, 43200.0, 86400.0,
        ],
    );
    // Spoke's own: the echo round trips moved bytes both ways through both processes.
    for (text, prefix) in [(&at, "spoke_agent"), (&st, "spoke_server")] {
        let bytes = format!("{prefix}_bytes_relayed_total");
        c.ty(text, &bytes, "counter");
        c.labels(text, &bytes, &["direction"]);
        for dir in ["to_endpoint", "to_tunnel"] {
            c.value(text, &bytes, &[("direction", dir)], |v| v > 0.0, "> 0");
        }
        c.ty(text, &format!("{prefix}_buffered_bytes"), "gauge");
        c.value(
            text,
            &format!("{prefix}_buffered_bytes"),
            &[],
            |v| v == 0.0,
            "0 (idle)",
        );
        c.ty(
            text,
            &format!("{prefix}_flow_control_stalls_total"),
            "counter",
        );
        c.ty(
            text,
            &format!("{prefix}_tls_certificate_expiry_timestamp_seconds"),
            "gauge",
        );
        c.value(
            text,
            &format!("{prefix}_tls_certificate_expiry_timestamp_seconds"),
            &[],
            |v| v > 1.7e9,
            "a Unix time",
        );
    }
    // Upstream serves the server's metrics on the admin port too (its e2e scrapes 8095).
    let admin = http::get(server.admin_addr, "/metrics").await.unwrap();
    if admin.status != 200 || type_of(&admin.body, &packets).is_none() {
        c.problems.push(format!(
            "server admin /metrics: status {}, {} bytes, no {packets}",
            admin.status,
            admin.body.len()
        ));
    }
    if !c.problems.is_empty() {
        println!("agent /metrics:\n{at}\nserver /metrics:\n{st}");
    }
    assert!(
        c.problems.is_empty(),
        "{} metric problems:\n  {}",
        c.problems.len(),
        c.problems.join("\n  ")
    );
}

// ---------------------------------------------------------------------------------------------
// 2. readiness transitions

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_agents_servers_and_drain() {
    let env = Env::new("o_ready");
    let mut server = env.server(ServerOpts::uds()).await;
    let body = http::wait_code(server.health_addr, "/readyz", 500, Duration::from_secs(2)).await;
    println!("server without agents: 500 {body:?}");
    let mut agent = env
        .agent(AgentOpts::new(server.agent_addr).arg("--drain-timeout=30s"))
        .await;
    agent.wait_ready().await;
    server.wait_ready().await;
    let verbose = http::wait_code(
        agent.health_addr,
        "/readyz?verbose",
        200,
        Duration::from_secs(2),
    )
    .await;
    println!("agent /readyz?verbose: {verbose:?}");
    assert!(
        verbose.contains("ping") && verbose.contains("server-connected"),
        "verbose readyz must list the checks: {verbose:?}"
    );

    server.proc.kill();
    let body = http::wait_code(agent.health_addr, "/readyz", 503, Duration::from_secs(10)).await;
    assert!(
        body.contains("server-connected"),
        "503 body names the failed check: {body:?}"
    );
    let verbose = http::wait_code(
        agent.health_addr,
        "/readyz?verbose",
        503,
        Duration::from_secs(2),
    )
    .await;
    assert!(
        verbose.contains("[-]server-connected"),
        "verbose 503 body: {verbose:?}"
    );
    server.proc.restart();
    server.wait_healthy().await;
    http::wait_code(agent.health_addr, "/readyz", 200, Duration::from_secs(10)).await;
    server.wait_ready().await;

    // Drain of the only agent: the server still counts it and still uses it as a fallback.
    let echo = backends::echo().await;
    let mut held = connect::tunnel(&server.frontend, &echo.target())
        .await
        .unwrap();
    signal(agent.proc.pid(), libc::SIGTERM);
    // The agent stays ready while it drains (upstream's agent does not change its readiness:
    // it still serves dials); the verbose form says it drains.
    let verbose = poll_until(
        "the agent's verbose readiness to say it drains",
        Duration::from_secs(2),
        || async {
            let r = http::get(agent.health_addr, "/readyz?verbose")
                .await
                .map_err(|e| format!("{e:#}"))?;
            if r.status == 200 && r.body.contains("draining") {
                Ok(r.body)
            } else {
                Err(format!("status {} body {:?}", r.status, r.body))
            }
        },
    )
    .await;
    println!("draining agent /readyz?verbose: {verbose:?}");
    let lines: Vec<&str> = verbose.lines().collect();
    assert!(
        lines.len() == 5
            && lines[3].starts_with("[+]draining ok (for ")
            && lines[3]
                .ends_with("dials still served until --drain-timeout=30s or a second signal)")
            && lines[4] == "readyz check passed",
        "draining agent's verbose readyz: {verbose:?}"
    );
    assert_eq!(
        http::get(agent.health_addr, "/readyz").await.unwrap().body,
        "ok"
    );
    server.wait_agent_draining("agent-1").await;
    holds_for(
        "server to keep counting the draining agent",
        Duration::from_secs(1),
        || async {
            let r = status(server.health_addr, "/readyz").await?;
            let n = server.gauge(names::SERVER_READY_BACKENDS).await?;
            if r == 200 && n == 1.0 {
                Ok(())
            } else {
                Err(format!("readyz {r}, ready_backend_connections {n}"))
            }
        },
    )
    .await;
    connect::echo_roundtrip(&server.frontend, &echo.target())
        .await
        .expect("a draining agent is still the fallback when it is the only one");
    connect::echo_once(&mut held, b"held").await.unwrap();
    agent.proc.assert_running();
}

// ---------------------------------------------------------------------------------------------
// 3. SIGTERM drain with two agents

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drain_keeps_the_open_connection_and_new_dials_go_to_the_other_agent() {
    const NEW: usize = 8;
    let env = Env::new("o_drain");
    let (server, mut a) = env
        .pair(ServerOpts::uds(), |o| {
            o.id("agent-a").arg("--drain-timeout=60s")
        })
        .await;
    let echo = backends::echo().await;
    let mut long = connect::tunnel(&server.frontend, &echo.target())
        .await
        .unwrap();
    connect::echo_once(&mut long, b"before drain")
        .await
        .unwrap();
    let mut b = env
        .agent(AgentOpts::new(server.agent_addr).id("agent-b"))
        .await;
    b.wait_ready().await;
    server.wait_agent_streams(2).await;

    signal(a.proc.pid(), libc::SIGTERM);
    let termed = Instant::now();
    server.wait_agent_draining("agent-a").await;
    let mut fresh = Vec::new();
    for _ in 0..NEW {
        let mut io = connect::tunnel(&server.frontend, &echo.target())
            .await
            .unwrap();
        connect::echo_once(&mut io, b"new").await.unwrap();
        fresh.push(io);
    }
    let on_a = a.gauge(names::AGENT_OPEN_ENDPOINTS).await;
    let on_b = b.gauge(names::AGENT_OPEN_ENDPOINTS).await;
    println!("after SIGTERM of agent-a: open endpoints a={on_a:?} b={on_b:?}");
    assert_eq!(
        (on_a, on_b),
        (Ok(1.0), Ok(NEW as f64)),
        "new dials must go to the non-draining agent-b; agent-a keeps only the old connection"
    );
    for i in 0..10 {
        connect::echo_once(&mut long, format!("during drain {i}").as_bytes())
            .await
            .expect("the connection through the draining agent keeps working");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(long);
    // Its last connection gone, agent-a still drains (upstream: until a second signal; here also
    // until --drain-timeout): idle is no reason to leave, a new dial may still need it.
    poll_until(
        "agent-a to close its last endpoint connection",
        Duration::from_secs(5),
        || async {
            match a.gauge(names::AGENT_OPEN_ENDPOINTS).await? {
                0.0 => Ok(()),
                v => Err(format!("open endpoint connections {v}")),
            }
        },
    )
    .await;
    holds_for(
        "idle agent-a to keep draining",
        Duration::from_secs(1),
        || {
            let running = a.proc.is_running();
            async move {
                running
                    .then_some(())
                    .ok_or_else(|| "agent-a exited when idle".to_string())
            }
        },
    )
    .await;
    signal(a.proc.pid(), libc::SIGTERM);
    let (exit, took) = a
        .proc
        .wait_exit(
            Instant::now(),
            Duration::from_secs(1),
            "agent-a after a second SIGTERM",
        )
        .await;
    println!(
        "agent-a exited {took:?} after its second SIGTERM ({:?} after the first): {exit}",
        termed.elapsed()
    );
    drop(fresh);
    wait_tables_empty(&server, &[&b]).await;
}

// ---------------------------------------------------------------------------------------------
// 4. certificate rotation

/// Client certificates presented to [`recording_server`], in handshake order.
type Presented = Arc<std::sync::Mutex<Vec<Vec<u8>>>>;

/// A TLS listener standing in for the proxy server: it requires a client certificate issued
/// by `ca_pem`, records the leaf each handshake presents, and hangs up, so the agent redials
/// every sync interval and every redial is a fresh handshake.
async fn recording_server(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> (std::net::SocketAddr, Presented, tokio::task::JoinHandle<()>) {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let presented: Presented = Arc::default();
    let seen = presented.clone();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            if let Ok(tls) = acceptor.accept(tcp).await {
                if let Some(leaf) = tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
                    seen.lock().unwrap().push(leaf.to_vec());
                }
            }
        }
    });
    (addr, presented, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_cert_rotation_applies_to_new_handshakes_and_a_broken_file_is_refused() {
    let env = Env::new("o_rotate");
    let rot = Ca::new("spoke e2e rotation CA");
    let ca_path = rot.write(env.dir.path(), "rot-ca");
    let (c1, k1) = rot.server_leaf("spoke cluster one");
    let (c2, k2) = rot.server_leaf("spoke cluster two");
    let ck = CertKey::write(env.dir.path(), "cluster", &c1, &k1);
    let (cert, key) = (ck.cert.clone(), ck.key.clone());
    let mut server = env.server(ServerOpts::uds().cluster_cert(ck)).await;
    let mut a = env
        .agent(
            AgentOpts::new(server.agent_addr)
                .id("agent-a")
                .ca(ca_path.clone()),
        )
        .await;
    a.wait_ready().await;
    server.wait_ready().await;
    let client = env.pki.main.agent.clone();
    assert_eq!(
        served_cert(server.agent_addr, &rot.cert_pem, &client, &[b"h2"]).await,
        Ok(der(&c1))
    );
    let echo = backends::echo().await;
    let mut held = connect::tunnel(&server.frontend, &echo.target())
        .await
        .unwrap();
    connect::echo_once(&mut held, b"before rotation")
        .await
        .unwrap();

    write_atomically(&key, &k2);
    write_atomically(&cert, &c2);
    let took = wait_served(
        server.agent_addr,
        &rot.cert_pem,
        &client,
        &[b"h2"],
        &c2,
        "new handshakes to present the rotated certificate",
    )
    .await;
    println!("rotated certificate served {took:?} after the write");
    connect::echo_once(&mut held, b"after rotation")
        .await
        .expect("open tunnel survives rotation");
    assert_eq!(a.gauge(names::AGENT_OPEN_SERVERS).await, Ok(1.0));
    let mut b = env
        .agent(
            AgentOpts::new(server.agent_addr)
                .id("agent-b")
                .ca(ca_path.clone()),
        )
        .await;
    b.wait_ready().await;
    server.wait_agent_streams(2).await;

    const FAILURES: &str = "spoke_server_tls_reload_failures_total";
    let before = server.metrics().await.unwrap().counter(FAILURES, &[]);
    write_atomically(
        &cert,
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
    );
    poll_until(
        "the broken certificate file to be counted as a reload failure",
        Duration::from_secs(15),
        || async {
            let m = server.metrics().await.map_err(|e| format!("{e:#}"))?;
            let now = m.counter(FAILURES, &[]);
            if now > before {
                Ok(())
            } else {
                Err(format!(
                    "{FAILURES} = {now} (before {before}); present: {:?}",
                    m.names()
                ))
            }
        },
    )
    .await;
    assert!(
        server.proc.log().contains("cannot be used"),
        "server log must say the new file cannot be used"
    );
    assert_eq!(
        served_cert(server.agent_addr, &rot.cert_pem, &client, &[b"h2"]).await,
        Ok(der(&c2)),
        "after a broken file the last good certificate stays"
    );
    connect::echo_once(&mut held, b"after broken file")
        .await
        .unwrap();
    connect::echo_roundtrip(&server.frontend, &echo.target())
        .await
        .unwrap();
    server.proc.assert_running();
    drop(held);
    wait_tables_empty(&server, &[&a, &b]).await;
}

// ---------------------------------------------------------------------------------------------
// 5. graceful shutdown

async fn wait_exit(server: &mut Server, limit: Duration) -> Duration {
    let t = Instant::now();
    while server.proc.is_running() {
        assert!(t.elapsed() < limit, "server still running {limit:?} later");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    t.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_refuses_new_dials_and_lets_the_open_connection_finish() {
    let env = Env::new("o_graceful");
    let (mut server, _agent) = env
        .pair(
            ServerOpts::uds().arg("--graceful-shutdown-timeout=5s"),
            |a| a,
        )
        .await;
    let echo = backends::echo().await;
    let mut held = connect::tunnel(&server.frontend, &echo.target())
        .await
        .unwrap();
    connect::echo_once(&mut held, b"before").await.unwrap();
    signal(server.proc.pid(), libc::SIGTERM);
    let termed = Instant::now();
    let reply = poll_until(
        "new CONNECT to get 503 during shutdown",
        Duration::from_secs(2),
        || async {
            match connect::connect(&server.frontend, &echo.target()).await {
                Ok((r, _)) if r.status == 503 => Ok(r),
                Ok((r, _)) => Err(format!("{} {}", r.head, r.body)),
                Err(e) => Err(format!("{e:#}")),
            }
        },
    )
    .await;
    println!("CONNECT during shutdown: {} / {}", reply.head, reply.body);
    let body = http::wait_code(server.health_addr, "/readyz", 500, Duration::from_secs(2)).await;
    assert!(
        body.contains("shutting down"),
        "readyz body during shutdown: {body:?}"
    );
    for i in 0..5 {
        connect::echo_once(&mut held, format!("during shutdown {i}").as_bytes())
            .await
            .expect("the open connection keeps working during graceful shutdown");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        server.proc.is_running(),
        "server exited while a connection was open"
    );
    drop(held);
    let after_close = wait_exit(&mut server, Duration::from_secs(3)).await;
    println!(
        "server exited {after_close:?} after the last connection closed ({:?} after SIGTERM)",
        termed.elapsed()
    );
    assert!(
        termed.elapsed() < Duration::from_millis(4900),
        "exit came from the timeout, not the close"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_timeout_bounds_the_wait_for_a_connection_that_never_ends() {
    let env = Env::new("o_gracefultm");
    let (mut server, _agent) = env
        .pair(
            ServerOpts::uds().arg("--graceful-shutdown-timeout=5s"),
            |a| a,
        )
        .await;
    let echo = backends::echo().await;
    let mut held = connect::tunnel(&server.frontend, &echo.target())
        .await
        .unwrap();
    connect::echo_once(&mut held, b"x").await.unwrap();
    signal(server.proc.pid(), libc::SIGTERM);
    let took = wait_exit(&mut server, Duration::from_secs(9)).await;
    println!("server with a never-ending connection exited {took:?} after SIGTERM");
    assert!(
        took >= Duration::from_millis(4500),
        "exited after {took:?}, before the 5 s timeout"
    );
    let mut buf = [0u8; 1];
    let n = within(
        "held tunnel to close",
        Duration::from_secs(2),
        held.read(&mut buf),
    )
    .await;
    assert!(
        matches!(n, Ok(0) | Err(_)),
        "tunnel still open after the server exited: {n:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Runtime log level on the admin port

async fn log_filter(addr: std::net::SocketAddr, method: &str, body: &str) -> (u16, String) {
    let r = http::request(addr, method, "/debug/flags/v", body)
        .await
        .expect("admin port answers");
    (r.status, r.body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_level_changes_at_run_time_through_the_admin_port() {
    let env = Env::new("o_loglevel");
    let mut server = env.server(ServerOpts::uds()).await;
    let mut agent = env.agent(AgentOpts::new(server.agent_addr)).await;
    agent.wait_ready().await;
    server.wait_ready().await;
    let echo = backends::echo().await;

    // Default --v=4: info, so per-connection lifecycle lines (debug) are not logged.
    let (code, body) = log_filter(agent.admin_addr, "GET", "").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("info"), "default filter: {body:?}");
    connect::echo_roundtrip(&server.frontend, &echo.target())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !agent.proc.log().contains("endpoint connected"),
        "debug lines must be off at --v=4"
    );

    // klog style: a verbosity number, as `PUT /debug/flags/v` on Kubernetes components.
    let (code, body) = log_filter(agent.admin_addr, "PUT", "5").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("debug"), "{body:?}");
    connect::echo_roundtrip(&server.frontend, &echo.target())
        .await
        .unwrap();
    poll_until(
        "agent to log the connection at debug",
        Duration::from_secs(5),
        || async {
            agent
                .proc
                .log()
                .contains("endpoint connected")
                .then_some(())
                .ok_or_else(|| "no 'endpoint connected' line yet".to_string())
        },
    )
    .await;

    // A tracing directive on the server; a bad one is refused and changes nothing.
    let (code, body) = log_filter(server.admin_addr, "PUT", "info,spoke_server=debug").await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = log_filter(server.admin_addr, "PUT", "info,spoke_server=[[").await;
    assert_eq!(code, 400, "a bad filter is refused: {body}");
    assert!(body.contains("invalid log filter"), "{body:?}");
    let (code, body) = log_filter(server.admin_addr, "GET", "").await;
    assert_eq!((code, body.trim()), (200, "info,spoke_server=debug"));
    connect::echo_roundtrip(&server.frontend, &echo.target())
        .await
        .unwrap();
    poll_until(
        "server to log the tunnel at debug",
        Duration::from_secs(5),
        || async {
            server
                .proc
                .log()
                .contains("tunnel established")
                .then_some(())
                .ok_or_else(|| "no 'tunnel established' line yet".to_string())
        },
    )
    .await;

    // Back to quiet: no new debug lines after `PUT 0`.
    let (code, _) = log_filter(agent.admin_addr, "PUT", "0").await;
    assert_eq!(code, 200);
    let before = agent.proc.log().matches("endpoint connected").count();
    connect::echo_roundtrip(&server.frontend, &echo.target())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        agent.proc.log().matches("endpoint connected").count(),
        before,
        "PUT 0 turns debug lines off again"
    );
    agent.proc.assert_running();
    server.proc.assert_running();
}

// ---------------------------------------------------------------------------------------------
// 6. logs

/// Every line of a log written to a file (not a terminal) is one JSON object with a timestamp,
/// a level and a message; `--v=5` adds one debug line per connection lifecycle event; the
/// text format is plain text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_json_lines_with_connection_events_at_debug() {
    let env = Env::new("o_logs");
    let (server, agent) = env
        .pair(ServerOpts::uds().arg("--v=5"), |a| a.arg("--v=5"))
        .await;
    let echo = backends::echo().await;
    connect::echo_roundtrip(&server.frontend, &echo.target())
        .await
        .unwrap();
    wait_tables_empty(&server, &[&agent]).await;
    for (name, log, events) in [
        (
            "server",
            server.proc.log(),
            &["tunnel established", "tunnel closed"][..],
        ),
        (
            "agent",
            agent.proc.log(),
            &["endpoint connected", "endpoint connection closed"][..],
        ),
    ] {
        let mut levels = BTreeSet::new();
        for line in log.lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{name} log line is not JSON ({e}): {line}"));
            for key in ["timestamp", "level", "message"] {
                assert!(v[key].is_string(), "{name} log line has no {key}: {line}");
            }
            levels.insert(v["level"].as_str().unwrap_or_default().to_string());
        }
        assert!(
            levels.contains("DEBUG"),
            "{name} with --v=5 logged no debug line (levels {levels:?}):\n{log}"
        );
        for event in events {
            assert!(
                log.lines().any(|l| l.contains("\"DEBUG\"")
                    && l.contains(event)
                    && l.contains("connection_id")),
                "{name}: no debug line about {event:?} with a connection_id:\n{log}"
            );
        }
    }

    // --log-format=text on a file: plain text lines, no JSON.
    let text = env.server(ServerOpts::uds().arg("--log-format=text")).await;
    let log = poll_until(
        "the text-format server to log",
        Duration::from_secs(5),
        || {
            let log = text.proc.log();
            async move {
                if log.lines().any(|l| l.contains("listening")) {
                    Ok(log)
                } else {
                    Err(format!("log so far: {log:?}"))
                }
            }
        },
    )
    .await;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_err(),
            "--log-format=text wrote JSON: {line}"
        );
        assert!(
            line.contains("INFO") || line.contains("WARN") || line.contains("DEBUG"),
            "--log-format=text line without a level: {line}"
        );
    }
}

/// The agent's own certificate rotates like the server's: new handshakes present the new
/// certificate without a restart, and a broken file keeps the last good one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_cert_rotation_applies_to_new_handshakes_and_a_broken_file_is_refused() {
    let env = Env::new("o_agent_rotate");
    let rot = Ca::new("spoke e2e rotation CA");
    let ca_path = rot.write(env.dir.path(), "rot-ca");
    let (server_cert, server_key) = rot.server_leaf("stand-in proxy server");
    let (addr, presented, _server) =
        recording_server(&rot.cert_pem, &server_cert, &server_key).await;
    let (c1, k1) = rot.client_leaf("agent cert one");
    let (c2, k2) = rot.client_leaf("agent cert two");
    let ck = CertKey::write(env.dir.path(), "agent", &c1, &k1);
    let (cert, key) = (ck.cert.clone(), ck.key.clone());
    let agent = env
        .agent(AgentOpts::new(addr).cert(ck).ca(ca_path.clone()))
        .await;
    let last_presented = || {
        let presented = presented.clone();
        move || {
            let last = presented.lock().unwrap().last().cloned();
            async move { last.ok_or_else(|| "no handshake yet".to_string()) }
        }
    };
    let first = poll_until(
        "the agent's first handshake",
        Duration::from_secs(10),
        last_presented(),
    )
    .await;
    assert_eq!(first, der(&c1), "the agent presented another certificate");

    write_atomically(&key, &k2);
    write_atomically(&cert, &c2);
    let written = Instant::now();
    poll_until(
        "new handshakes to present the rotated agent certificate",
        Duration::from_secs(15),
        || {
            let last = presented.lock().unwrap().last().cloned();
            let want = der(&c2);
            async move {
                match last {
                    Some(l) if l == want => Ok(()),
                    _ => Err("still the old certificate".to_string()),
                }
            }
        },
    )
    .await;
    println!(
        "rotated agent certificate presented {:?} after the write",
        written.elapsed()
    );

    // A broken certificate file: the reload fails, is counted, and handshakes keep the last
    // good certificate.
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nnot base64\n").unwrap();
    poll_until(
        "the agent to count the failed reload",
        Duration::from_secs(15),
        || async {
            match gauge(
                &agent.metrics().await.map_err(|e| format!("{e:#}"))?,
                "spoke_agent_tls_reload_failures_total",
            )? {
                v if v >= 1.0 => Ok(()),
                v => Err(format!("tls_reload_failures_total={v}")),
            }
        },
    )
    .await;
    let before = presented.lock().unwrap().len();
    poll_until(
        "a handshake after the failed reload",
        Duration::from_secs(10),
        || {
            let n = presented.lock().unwrap().len();
            async move {
                if n > before {
                    Ok(())
                } else {
                    Err("no new handshake".to_string())
                }
            }
        },
    )
    .await;
    let last = presented.lock().unwrap().last().cloned();
    assert_eq!(
        last,
        Some(der(&c2)),
        "after a broken file the agent must keep presenting the last good certificate"
    );
}
