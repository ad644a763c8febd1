//! TLS hygiene on spoke-server's listeners: `--tls-min-version` and `--cipher-suites` (upstream's
//! Go names) on the agent port and on the mTLS frontend, the refused-handshake counter and its
//! reasons, the certificate-expiry gauges of server and agent, and start-up errors for bad TLS
//! flags. Every TLS client here is a real rustls client on loopback.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::ExtendedKeyUsagePurpose;
use rustls::crypto::ring::cipher_suite as cs;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{
    AlertDescription, ClientConfig, ProtocolVersion, SupportedCipherSuite, SupportedProtocolVersion,
};
use spoke_tests::backends;
use spoke_tests::certs::{Ca, CaSet, CertKey};
use spoke_tests::cluster::{Agent, Env, Mode, Server, ServerOpts, Transport};
use spoke_tests::connect;
use spoke_tests::metrics::Metrics;
use spoke_tests::ports::free_port;
use spoke_tests::process::Proc;
use spoke_tests::tls;
use spoke_tests::wait::{poll_until, within};
use spoke_tests::BoxIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// Refused TLS handshakes on the server's listeners, by `reason` (tunnel/src/metrics.rs).
const REFUSED: &str = "spoke_server_tls_handshakes_refused_total";
/// notAfter of the certificate given by each flag (label `certificate="--cluster-cert"` etc.).
const SERVER_EXPIRY: &str = "spoke_server_tls_certificate_expiry_timestamp_seconds";
const AGENT_EXPIRY: &str = "spoke_agent_tls_certificate_expiry_timestamp_seconds";
/// Reasons `tls::handshake_failure_reason` can give for a handshake that reached rustls; the
/// harness's own readiness probes (plain TCP connect + close) count as `eof` and are left out.
const REASONS: [&str; 7] = [
    "no_client_certificate",
    "unknown_ca",
    "expired_certificate",
    "bad_certificate",
    "incompatible",
    "malformed",
    "peer_alert",
];

static TLS12: &[&SupportedProtocolVersion] = &[&rustls::version::TLS12];
static TLS13: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];

// ---------------------------------------------------------------------------------------------
// helpers

/// A client with `main`'s frontend certificate, offering `http/1.1`.
fn frontend_client(
    main: &CaSet,
    versions: &[&'static SupportedProtocolVersion],
    suites: Option<Vec<SupportedCipherSuite>>,
) -> Arc<ClientConfig> {
    tls::restricted_client_config(
        &main.ca_pem,
        Some(&main.frontend),
        &[b"http/1.1"],
        versions,
        suites,
    )
}

/// A client with `main`'s agent certificate, offering `h2`.
fn agent_client(
    main: &CaSet,
    versions: &[&'static SupportedProtocolVersion],
    suites: Option<Vec<SupportedCipherSuite>>,
) -> Arc<ClientConfig> {
    tls::restricted_client_config(&main.ca_pem, Some(&main.agent), &[b"h2"], versions, suites)
}

/// The rustls error inside an I/O error from tokio-rustls, if any.
fn rustls_error(e: &std::io::Error) -> Option<&rustls::Error> {
    e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
}

/// Handshakes with `addr` and requires the server to refuse: either the client's handshake fails,
/// or (TLS 1.3, where the client finishes first) the server's alert arrives on the first read.
/// Returns the fatal alert the server sent.
async fn expect_refused(what: &str, addr: SocketAddr, config: Arc<ClientConfig>) -> String {
    let err = match within(
        &format!("{what}: TLS handshake with {addr}"),
        Duration::from_secs(10),
        tls::connect(addr, config),
    )
    .await
    {
        Err(e) => e,
        Ok(mut s) => {
            let mut buf = [0u8; 64];
            match within(
                &format!("{what}: server's verdict after the client's handshake"),
                Duration::from_secs(10),
                s.read(&mut buf),
            )
            .await
            {
                Ok(0) => return "closed without alert".into(),
                Ok(n) => panic!(
                    "{what}: the server accepted the handshake and sent {n} bytes: {:?}",
                    String::from_utf8_lossy(&buf[..n])
                ),
                Err(e) => e,
            }
        }
    };
    match rustls_error(&err) {
        Some(rustls::Error::AlertReceived(alert)) => format!("{alert:?}"),
        _ => panic!("{what}: expected a fatal alert from the server, got {err:?}"),
    }
}

/// Opens `addr` with `config`, checks the negotiated version/suite, then CONNECTs to the echo
/// server `echo` over it and runs one round trip: the server accepted this client for real.
async fn connect_echo_via(
    what: &str,
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    echo: &str,
) -> (ProtocolVersion, SupportedCipherSuite) {
    let s = within(
        &format!("{what}: TLS handshake"),
        Duration::from_secs(10),
        tls::connect(addr, config),
    )
    .await
    .unwrap_or_else(|e| panic!("{what}: handshake with the frontend {addr} failed: {e:?}"));
    let conn = s.get_ref().1;
    let negotiated = (
        conn.protocol_version().expect("version after handshake"),
        conn.negotiated_cipher_suite()
            .expect("suite after handshake"),
    );
    let io: BoxIo = Box::new(s);
    let (reply, mut io) = within(
        &format!("{what}: CONNECT {echo}"),
        Duration::from_secs(10),
        connect::connect_on(io, echo),
    )
    .await
    .unwrap_or_else(|e| panic!("{what}: CONNECT failed: {e:#}"));
    assert_eq!(reply.status, 200, "{what}: CONNECT {echo}: {reply:?}");
    let msg = format!("tls policy probe: {what}");
    io.write_all(msg.as_bytes()).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    within(
        &format!("{what}: echo"),
        Duration::from_secs(10),
        io.read_exact(&mut back),
    )
    .await
    .unwrap();
    assert_eq!(back, msg.as_bytes(), "{what}: echo mismatch");
    negotiated
}

/// Handshakes with the agent port and speaks HTTP/2 far enough to get the server's SETTINGS
/// frame: the server accepted this client (a TLS 1.3 server refusing a client certificate would
/// send an alert instead). Returns the negotiated version.
async fn agent_port_accepts(
    what: &str,
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> ProtocolVersion {
    let mut s: TlsStream<TcpStream> = within(
        &format!("{what}: TLS handshake"),
        Duration::from_secs(10),
        tls::connect(addr, config),
    )
    .await
    .unwrap_or_else(|e| panic!("{what}: handshake with the agent port {addr} failed: {e:?}"));
    let (version, alpn) = {
        let c = s.get_ref().1;
        (
            c.protocol_version().unwrap(),
            c.alpn_protocol().map(<[u8]>::to_vec),
        )
    };
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]), "{what}: ALPN");
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    s.flush().await.unwrap();
    let mut frame = [0u8; 9];
    within(
        &format!("{what}: server's HTTP/2 SETTINGS"),
        Duration::from_secs(10),
        s.read_exact(&mut frame),
    )
    .await
    .unwrap_or_else(|e| panic!("{what}: no HTTP/2 frame from the agent port: {e:?}"));
    assert_eq!(
        frame[3], 4,
        "{what}: first frame is not SETTINGS: {frame:?}"
    );
    version
}

fn refused_by_reason(m: &Metrics) -> Vec<(&'static str, f64)> {
    REASONS
        .iter()
        .map(|r| (*r, m.counter(REFUSED, &[("reason", r)])))
        .collect()
}

/// An HTTP CONNECT server with an mTLS frontend started with `flag`, and its agent (both
/// ready); also the frontend's address and the refused-handshake counts before any test client.
async fn tls_pair_with(
    env: &Env,
    flag: &str,
) -> (Server, Agent, SocketAddr, Vec<(&'static str, f64)>) {
    let (server, agent) = env
        .pair(
            ServerOpts::new(Mode::HttpConnect, Transport::Tls).arg(flag),
            |a| a,
        )
        .await;
    let frontend = server.tcp.unwrap();
    let base = refused_by_reason(&server.metrics().await.unwrap());
    (server, agent, frontend, base)
}

/// Polls until exactly `want` (reason → increase) has happened to the refused-handshake counter
/// since `base`, with every other listed reason unchanged.
async fn expect_refused_delta(
    server: &Server,
    base: &[(&'static str, f64)],
    want: &[(&str, f64)],
) -> Vec<(&'static str, f64)> {
    poll_until(
        &format!("{REFUSED} to grow by {want:?}"),
        Duration::from_secs(10),
        || async {
            let m = server.metrics().await.map_err(|e| format!("{e:#}"))?;
            let now = refused_by_reason(&m);
            let mut delta = Vec::new();
            for ((reason, b), (_, n)) in base.iter().zip(&now) {
                let expected = want
                    .iter()
                    .find(|(r, _)| r == reason)
                    .map_or(0.0, |(_, d)| *d);
                if n - b != expected {
                    delta.push(format!("{reason}: +{} (want +{expected})", n - b));
                }
            }
            if delta.is_empty() {
                Ok(now)
            } else {
                Err(delta.join(", "))
            }
        },
    )
    .await
}

// --- certificate notAfter, read independently of the binaries' x509 parser ---------------------

/// One DER TLV: (tag, contents, rest).
fn tlv(b: &[u8]) -> (u8, &[u8], &[u8]) {
    let tag = b[0];
    let (len, header) = if b[1] < 0x80 {
        (b[1] as usize, 2)
    } else {
        let n = (b[1] & 0x7f) as usize;
        let len = b[2..2 + n]
            .iter()
            .fold(0usize, |acc, byte| (acc << 8) | *byte as usize);
        (len, 2 + n)
    };
    (tag, &b[header..header + len], &b[header + len..])
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719_468
}

/// UTCTime (`YYMMDDHHMMSSZ`, tag 0x17) or GeneralizedTime (`YYYYMMDDHHMMSSZ`, tag 0x18).
fn asn1_time(tag: u8, v: &[u8]) -> i64 {
    let s = std::str::from_utf8(v).expect("ASCII time");
    let s = s.strip_suffix('Z').expect("time in UTC");
    let num = |r: std::ops::Range<usize>| s[r].parse::<i64>().expect("digits");
    let (year, rest) = match tag {
        0x17 => {
            let yy = num(0..2);
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, 2)
        }
        0x18 => (num(0..4), 4),
        other => panic!("not an ASN.1 time tag: {other:#x}"),
    };
    let f = |i: usize| num(rest + 2 * i..rest + 2 * i + 2);
    days_from_civil(year, f(0), f(1)) * 86_400 + f(2) * 3600 + f(3) * 60 + f(4)
}

/// notAfter of a DER certificate, as Unix seconds.
fn not_after_der(der: &[u8]) -> i64 {
    let (_, cert, _) = tlv(der);
    let (_, tbs, _) = tlv(cert);
    let (tag, _, after_version) = tlv(tbs);
    let fields = if tag == 0xa0 { after_version } else { tbs };
    let (_, _, rest) = tlv(fields); // serialNumber
    let (_, _, rest) = tlv(rest); // signature
    let (_, _, rest) = tlv(rest); // issuer
    let (tag, validity, _) = tlv(rest);
    assert_eq!(tag, 0x30, "validity is not a SEQUENCE");
    let (_, _, rest) = tlv(validity); // notBefore
    let (tag, not_after, _) = tlv(rest);
    asn1_time(tag, not_after)
}

fn not_after_pem(pem: &str) -> i64 {
    not_after_der(
        CertificateDer::from_pem_slice(pem.as_bytes())
            .expect("cert PEM")
            .as_ref(),
    )
}

/// A CA of the test's own with one server leaf (SANs `localhost`, `127.0.0.1`) whose notAfter
/// is exactly `not_after` (Unix seconds): unlike the harness's certificates (rcgen's default,
/// 4096-01-01) this one expires at a realistic, odd second.
fn ca_with_server_leaf(dir: &Path, not_after: i64) -> (std::path::PathBuf, CertKey) {
    let ca = Ca::new("spoke e2e expiry CA");
    let (cert, key) = ca.leaf(
        "spoke e2e expiring server",
        &["localhost", "127.0.0.1"],
        &[ExtendedKeyUsagePurpose::ServerAuth],
        Some(not_after),
    );
    (
        ca.write(dir, "expiry-ca"),
        CertKey::write(dir, "expiry-server", &cert, &key),
    )
}

// ---------------------------------------------------------------------------------------------
// (a) --tls-min-version=VersionTLS13

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls13_minimum_refuses_tls12_clients_on_agent_port_and_frontend() {
    let env = Env::new("tp_min13");
    let echo = backends::echo().await;
    // The real agent (TLS 1.3 capable) must still get through: `pair` waits for both /readyz.
    let (server, _agent, frontend, base) =
        tls_pair_with(&env, "--tls-min-version=VersionTLS13").await;
    let main = &env.pki.main;

    let alert = expect_refused(
        "TLS 1.2-only client on the frontend",
        frontend,
        frontend_client(main, TLS12, None),
    )
    .await;
    assert_eq!(alert, format!("{:?}", AlertDescription::ProtocolVersion));
    let alert = expect_refused(
        "TLS 1.2-only client on the agent port",
        server.agent_addr,
        agent_client(main, TLS12, None),
    )
    .await;
    assert_eq!(alert, format!("{:?}", AlertDescription::ProtocolVersion));
    expect_refused_delta(&server, &base, &[("incompatible", 2.0)]).await;

    // TLS 1.3 clients with valid certificates are served on both listeners.
    let (version, _) = connect_echo_via(
        "TLS 1.3 client on the frontend",
        frontend,
        frontend_client(main, TLS13, None),
        &echo.target(),
    )
    .await;
    assert_eq!(version, ProtocolVersion::TLSv1_3);
    let version = agent_port_accepts(
        "TLS 1.3 client on the agent port",
        server.agent_addr,
        agent_client(main, TLS13, None),
    )
    .await;
    assert_eq!(version, ProtocolVersion::TLSv1_3);
    expect_refused_delta(&server, &base, &[("incompatible", 2.0)]).await;

    // Control: without the flag the very same TLS 1.2-only clients are served (TLS 1.2 is the
    // default minimum), so the refusal above came from --tls-min-version.
    let (plain, _agent2) = env
        .pair(ServerOpts::new(Mode::HttpConnect, Transport::Tls), |a| {
            a.id("agent-control")
        })
        .await;
    let (version, _) = connect_echo_via(
        "TLS 1.2-only client on a default server's frontend",
        plain.tcp.unwrap(),
        frontend_client(main, TLS12, None),
        &echo.target(),
    )
    .await;
    assert_eq!(version, ProtocolVersion::TLSv1_2);
    let version = agent_port_accepts(
        "TLS 1.2-only client on a default server's agent port",
        plain.agent_addr,
        agent_client(main, TLS12, None),
    )
    .await;
    assert_eq!(version, ProtocolVersion::TLSv1_2);
}

// ---------------------------------------------------------------------------------------------
// (b) --cipher-suites

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cipher_suites_restrict_tls12_to_the_listed_suite_and_keep_tls13() {
    let env = Env::new("tp_suites");
    let echo = backends::echo().await;
    // The harness's keys are ECDSA P-256, so the TLS 1.2 suites that can work are ECDHE_ECDSA.
    let (server, _agent, frontend, base) = tls_pair_with(
        &env,
        "--cipher-suites=TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    )
    .await;
    let main = &env.pki.main;

    for (name, suite) in [
        (
            "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
            cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        ),
        (
            "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
            cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        ),
    ] {
        let alert = expect_refused(
            &format!("TLS 1.2 client offering only {name} on the frontend"),
            frontend,
            frontend_client(main, TLS12, Some(vec![suite])),
        )
        .await;
        assert_eq!(alert, format!("{:?}", AlertDescription::HandshakeFailure));
    }
    let alert = expect_refused(
        "TLS 1.2 client offering only CHACHA20 on the agent port",
        server.agent_addr,
        agent_client(
            main,
            TLS12,
            Some(vec![cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256]),
        ),
    )
    .await;
    assert_eq!(alert, format!("{:?}", AlertDescription::HandshakeFailure));
    expect_refused_delta(&server, &base, &[("incompatible", 3.0)]).await;

    // The listed suite works, and is what a TLS 1.2 client preferring the others ends up with.
    let (version, suite) = connect_echo_via(
        "TLS 1.2 client offering only the listed suite",
        frontend,
        frontend_client(
            main,
            TLS12,
            Some(vec![cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256]),
        ),
        &echo.target(),
    )
    .await;
    assert_eq!(version, ProtocolVersion::TLSv1_2);
    assert_eq!(
        suite.suite(),
        cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256.suite()
    );
    let (_, suite) = connect_echo_via(
        "TLS 1.2 client preferring unlisted suites",
        frontend,
        frontend_client(
            main,
            TLS12,
            Some(vec![
                cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
                cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
                cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            ]),
        ),
        &echo.target(),
    )
    .await;
    assert_eq!(
        suite.suite(),
        cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256.suite(),
        "the server picked a suite outside --cipher-suites"
    );
    // As in Go, --cipher-suites selects TLS 1.2 suites; TLS 1.3 (all of its suites) stays on.
    for (name, suite) in [
        ("TLS_AES_128_GCM_SHA256", cs::TLS13_AES_128_GCM_SHA256),
        (
            "TLS_CHACHA20_POLY1305_SHA256",
            cs::TLS13_CHACHA20_POLY1305_SHA256,
        ),
    ] {
        let (version, got) = connect_echo_via(
            &format!("TLS 1.3 client offering only {name}"),
            frontend,
            frontend_client(main, TLS13, Some(vec![suite])),
            &echo.target(),
        )
        .await;
        assert_eq!(
            (version, got.suite()),
            (ProtocolVersion::TLSv1_3, suite.suite())
        );
    }
    expect_refused_delta(&server, &base, &[("incompatible", 3.0)]).await;
}

// ---------------------------------------------------------------------------------------------
// (c) refused handshakes by reason

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_handshakes_are_counted_by_reason() {
    let env = Env::new("tp_reasons");
    let echo = backends::echo().await;
    let (server, _agent, frontend, mut base) =
        tls_pair_with(&env, "--tls-min-version=VersionTLS13").await;
    let (main, rogue) = (&env.pki.main, &env.pki.rogue);
    println!("refused handshakes before: {base:?}");

    type Case<'a> = (
        &'a str,
        SocketAddr,
        Arc<ClientConfig>,
        AlertDescription,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        (
            "frontend client without a certificate",
            frontend,
            tls::restricted_client_config(&main.ca_pem, None, &[b"http/1.1"], TLS13, None),
            AlertDescription::CertificateRequired,
            "no_client_certificate",
        ),
        (
            "frontend client with a certificate from a foreign CA",
            frontend,
            tls::restricted_client_config(
                &main.ca_pem,
                Some(&rogue.frontend),
                &[b"http/1.1"],
                TLS13,
                None,
            ),
            AlertDescription::UnknownCA,
            "unknown_ca",
        ),
        (
            "frontend client offering only TLS 1.2",
            frontend,
            frontend_client(main, TLS12, None),
            AlertDescription::ProtocolVersion,
            "incompatible",
        ),
        (
            "agent-port client without a certificate",
            server.agent_addr,
            tls::restricted_client_config(&main.ca_pem, None, &[b"h2"], TLS13, None),
            AlertDescription::CertificateRequired,
            "no_client_certificate",
        ),
        (
            "agent-port client with a certificate from a foreign CA",
            server.agent_addr,
            tls::restricted_client_config(&main.ca_pem, Some(&rogue.agent), &[b"h2"], TLS13, None),
            AlertDescription::UnknownCA,
            "unknown_ca",
        ),
    ];
    for (what, addr, config, alert, reason) in cases {
        let got = expect_refused(what, addr, config).await;
        assert_eq!(got, format!("{alert:?}"), "{what}: alert");
        base = expect_refused_delta(&server, &base, &[(reason, 1.0)]).await;
        println!("{what}: alert {got}, counted as reason={reason}");
    }
    // A valid client is not counted, and the server still serves it.
    connect_echo_via(
        "valid TLS 1.3 frontend client",
        frontend,
        frontend_client(main, TLS13, None),
        &echo.target(),
    )
    .await;
    let after = expect_refused_delta(&server, &base, &[]).await;
    println!("refused handshakes after: {after:?}");
}

// ---------------------------------------------------------------------------------------------
// (d) certificate expiry gauges

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_expiry_gauges_carry_the_real_not_after() {
    let env = Env::new("tp_expiry");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    // 97 days, 1 h 2 min 3 s from now: an arbitrary second, not a round default.
    let cluster_not_after = now + 97 * 86_400 + 3723;
    let (expiry_ca, cluster_cert) = ca_with_server_leaf(env.dir.path(), cluster_not_after);
    assert_eq!(
        not_after_pem(&cluster_cert.cert_pem),
        cluster_not_after,
        "the test's own DER reader disagrees with the notAfter it asked rcgen for"
    );
    let (server, agent) = env
        .pair(
            ServerOpts::new(Mode::HttpConnect, Transport::Tls).cluster_cert(cluster_cert.clone()),
            |a| a.ca(expiry_ca.clone()),
        )
        .await;
    let main = &env.pki.main;

    // What each listener really serves.
    let served = |addr: SocketAddr, ca_pem: String, cert: CertKey, alpn: &'static [u8]| async move {
        let s = tls::connect(
            addr,
            tls::restricted_client_config(&ca_pem, Some(&cert), &[alpn], TLS13, None),
        )
        .await
        .unwrap_or_else(|e| panic!("handshake with {addr}: {e:?}"));
        let leaf = s
            .get_ref()
            .1
            .peer_certificates()
            .expect("server certificate")[0]
            .clone();
        not_after_der(leaf.as_ref())
    };
    let served_cluster = served(
        server.agent_addr,
        std::fs::read_to_string(&expiry_ca).unwrap(),
        main.agent.clone(),
        b"h2",
    )
    .await;
    let served_frontend = served(
        server.tcp.unwrap(),
        main.ca_pem.clone(),
        main.frontend.clone(),
        b"http/1.1",
    )
    .await;
    assert_eq!(
        served_cluster, cluster_not_after,
        "agent port serves another certificate"
    );
    assert_eq!(
        served_frontend,
        not_after_pem(&main.server.cert_pem),
        "frontend serves another certificate"
    );

    let sm = server.metrics().await.unwrap();
    let am = agent.metrics().await.unwrap();
    let checks = [
        (&sm, SERVER_EXPIRY, "--cluster-cert", served_cluster),
        (&sm, SERVER_EXPIRY, "--server-cert", served_frontend),
        (
            &am,
            AGENT_EXPIRY,
            "--agent-cert",
            not_after_pem(&main.agent.cert_pem),
        ),
    ];
    for (m, name, flag, want) in checks {
        let got = m
            .get_labeled(name, &[("certificate", flag)])
            .unwrap_or_else(|| {
                panic!(
                    "{name}{{certificate={flag:?}}} absent; present: {:?}",
                    m.names()
                )
            });
        println!("{name}{{certificate={flag:?}}} = {got}, certificate notAfter = {want}");
        assert!(
            (got - want as f64).abs() <= 2.0,
            "{name}{{certificate={flag:?}}} = {got}, but the certificate's notAfter is {want}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// (e) bad TLS flags stop the server at start-up

/// Arguments for a complete, valid server on free loopback ports (UDS frontend).
fn server_args(env: &Env, tag: &str) -> Vec<String> {
    let main = &env.pki.main;
    vec![
        "--mode=http-connect".into(),
        format!(
            "--uds-name={}",
            env.dir.join(&format!("{tag}.sock")).display()
        ),
        "--server-port=0".into(),
        format!("--cluster-cert={}", main.server.cert.display()),
        format!("--cluster-key={}", main.server.key.display()),
        format!("--cluster-ca-cert={}", main.ca.display()),
        "--agent-bind-address=127.0.0.1".into(),
        format!("--agent-port={}", free_port()),
        "--health-bind-address=127.0.0.1".into(),
        format!("--health-port={}", free_port()),
        "--admin-bind-address=127.0.0.1".into(),
        format!("--admin-port={}", free_port()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_tls_flags_make_the_server_exit_with_a_clear_error() {
    let env = Env::new("tp_badflags");
    let cases: [(&str, &[&str]); 6] = [
        (
            "--tls-min-version=VersionTLS99",
            &[
                "--tls-min-version",
                "VersionTLS99",
                "expected VersionTLS12 or VersionTLS13",
            ],
        ),
        (
            "--tls-min-version=VersionTLS10",
            &["--tls-min-version", "VersionTLS10", "not supported"],
        ),
        (
            "--cipher-suites=NOT_A_CIPHER",
            &[
                "--cipher-suites",
                "NOT_A_CIPHER",
                "unknown cipher suite name",
            ],
        ),
        (
            "--cipher-suites=TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,bogus",
            &["--cipher-suites", "bogus", "unknown cipher suite name"],
        ),
        (
            "--cipher-suites=TLS_RSA_WITH_AES_128_CBC_SHA",
            &[
                "--cipher-suites",
                "TLS_RSA_WITH_AES_128_CBC_SHA",
                "not supported",
            ],
        ),
        (
            "--cipher-suites=TLS_ECDHE_ECDSA_WITH_AES_999_GCM_SHA256",
            &["--cipher-suites", "TLS_ECDHE_ECDSA_WITH_AES_999_GCM_SHA256"],
        ),
    ];
    for (i, (flag, want)) in cases.iter().enumerate() {
        let mut args = server_args(&env, &format!("bad{i}"));
        args.push(flag.to_string());
        let mut cmd = tokio::process::Command::new(spoke_tests::bins::server_bin());
        cmd.args(&args).kill_on_drop(true);
        let out = within(
            &format!("spoke-server {flag} to exit"),
            Duration::from_secs(10),
            cmd.output(),
        )
        .await
        .expect("run spoke-server");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        println!("{flag}: {} / {last}", out.status);
        assert!(
            !out.status.success() && out.status.code().is_some(),
            "spoke-server {flag} must exit non-zero by itself, got {}; stderr:\n{stderr}",
            out.status
        );
        assert!(
            last.starts_with("spoke-server: "),
            "{flag}: the error is not the last stderr line: {stderr}"
        );
        for w in *want {
            assert!(
                last.contains(w),
                "{flag}: error {last:?} does not mention {w:?}"
            );
        }
    }

    // Control: the same arguments with good TLS flags start and serve /healthz.
    let mut args = server_args(&env, "good");
    let health: SocketAddr = args
        .iter()
        .find_map(|a| a.strip_prefix("--health-port="))
        .map(|p| SocketAddr::from(([127, 0, 0, 1], p.parse().unwrap())))
        .unwrap();
    args.push("--tls-min-version=VersionTLS13".into());
    args.push(
        "--cipher-suites=TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,TLS_AES_128_GCM_SHA256".into(),
    );
    let mut good = Proc::spawn(
        "spoke-server good-tls-flags",
        &spoke_tests::bins::server_bin(),
        args,
        env.dir.join("good.log"),
    );
    spoke_tests::cluster::wait_status(
        &mut good,
        health,
        "/healthz",
        200,
        spoke_tests::cluster::STARTUP_TIMEOUT,
    )
    .await;
    good.assert_running();
}
