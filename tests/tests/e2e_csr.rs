//! Agent client certificates from the CSR API end to end: real spoke-server (with its opt-in
//! approver, trusting the signer's CA on the agent port) and spoke-agent (`--cert-dir`,
//! `--bootstrap-kubeconfig`, no `--agent-cert`) against the API server stand-in, whose signer
//! issues short-lived certificates: bootstrap, renewal before expiry without dropping the
//! tunnel, a restart on the stored certificate, a denied renewal, an unwritable `--cert-dir`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use spoke_tests::apiserver::{self, ApiServer, Signer};
use spoke_tests::backends;
use spoke_tests::cluster::{gauge, Agent, AgentOpts, Env, Mode, Server, ServerOpts, Transport};
use spoke_tests::connect;
use spoke_tests::metrics::names;
use spoke_tests::wait::poll_until;

const AGENT_SA: &str = "system:serviceaccount:kube-system:konnectivity-agent";
const SIGNER: &str = "kubernetes.io/kube-apiserver-client";
const EXPIRY: &str = "spoke_agent_client_certificate_expiration_timestamp_seconds";
const RENEWALS: &str = "spoke_agent_client_certificate_renewals_total";
const FAILURES: &str = "spoke_agent_client_certificate_failures_total";

struct Setup {
    env: Env,
    api: ApiServer,
    signer_ca: PathBuf,
    agent_kc: PathBuf,
    server_kc: PathBuf,
}

async fn setup(name: &str, lifetime: Duration) -> Setup {
    let env = Env::new(name);
    let api = ApiServer::start(&env.pki.main.server, &env.pki.main.ca).await;
    api.user(
        "server-token",
        "spoke-server",
        &[
            "list certificatesigningrequests",
            "watch certificatesigningrequests",
            "update certificatesigningrequests/approval",
        ],
    );
    api.user(
        "agent-token",
        AGENT_SA,
        &[
            "create certificatesigningrequests",
            "get certificatesigningrequests",
            "watch certificatesigningrequests",
        ],
    );
    let (issuer, ca_pem, signer_ca) = apiserver::signer_ca(env.dir.path(), "client-signer");
    api.set_signer(Signer {
        name: SIGNER.into(),
        issuer,
        ca_pem,
        lifetime,
        fail: false,
    });
    let agent_kc = api.kubeconfig(env.dir.path(), "bootstrap.kubeconfig", "agent-token");
    let server_kc = api.kubeconfig(env.dir.path(), "server.kubeconfig", "server-token");
    Setup {
        env,
        api,
        signer_ca,
        agent_kc,
        server_kc,
    }
}

/// A server whose agent port trusts the signer's CA; with the approver when `approve`.
async fn server(s: &Setup, approve: bool) -> Server {
    let mut opts = ServerOpts::new(Mode::HttpConnect, Transport::Uds)
        .id("csr-server")
        .arg(&format!("--cluster-ca-cert={}", s.signer_ca.display()))
        .arg(&format!("--kubeconfig={}", s.server_kc.display()));
    if approve {
        opts = opts.arg("--approve-agent-csrs");
    }
    s.env.server(opts).await
}

fn agent_opts(s: &Setup, server: &Server, cert_dir: &Path) -> AgentOpts {
    AgentOpts::new(server.agent_addr)
        .id("node-1")
        .arg("--agent-cert=")
        .arg("--agent-key=")
        .arg(&format!("--cert-dir={}", cert_dir.display()))
        .arg(&format!("--bootstrap-kubeconfig={}", s.agent_kc.display()))
        .arg("--csr-approval-timeout=5s")
}

fn cert_file(dir: &Path) -> PathBuf {
    dir.join("spoke-agent-client-current.pem")
}

async fn metric(a: &Agent, name: &str) -> f64 {
    let m = a.metrics().await.expect("agent metrics");
    m.get(name).unwrap_or(0.0)
}

fn csrs_of_agent(api: &ApiServer) -> usize {
    api.list("certificatesigningrequests", "")
        .iter()
        .filter(|c| c["spec"]["username"] == AGENT_SA)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_renewal_and_restart_on_the_stored_certificate() {
    // Renewal comes at 70-90 % of 12 s.
    let s = setup("csr_bootstrap", Duration::from_secs(12)).await;
    let mut srv = server(&s, true).await;
    let dir = s.env.dir.join("certs");
    let started = Instant::now();
    let mut agent = s.env.agent(agent_opts(&s, &srv, &dir)).await;
    agent.wait_ready().await;
    srv.wait_ready().await;
    let bootstrap = started.elapsed();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(cert_file(&dir))
        .expect("stored")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "key and certificate are private");
    let echo = backends::echo().await;
    connect::echo_roundtrip(&srv.frontend, &echo.target())
        .await
        .expect("dial through the agent on its CSR certificate");
    let first_expiry = metric(&agent, EXPIRY).await;
    assert!(first_expiry > 0.0, "the expiry gauge is set");
    let first = std::fs::read(cert_file(&dir)).expect("cert");
    assert_eq!(csrs_of_agent(&s.api), 1);

    // Renewal before expiry; the tunnel stays up all along (one agent stream, never 0).
    let renewed = poll_until("a renewed certificate", Duration::from_secs(20), || async {
        let m = srv.metrics().await.map_err(|e| format!("{e:#}"))?;
        let streams = gauge(&m, names::SERVER_READY_BACKENDS)?;
        assert_eq!(streams, 1.0, "the tunnel must not drop during renewal");
        let now = std::fs::read(cert_file(&dir)).map_err(|e| e.to_string())?;
        if now != first {
            Ok(started.elapsed())
        } else {
            Err("same certificate".into())
        }
    })
    .await;
    let second_expiry = poll_until(
        "the expiry gauge to move",
        Duration::from_secs(5),
        || async {
            match metric(&agent, EXPIRY).await {
                e if e > first_expiry => Ok(e),
                e => Err(format!("{e}")),
            }
        },
    )
    .await;
    assert!(
        second_expiry - first_expiry >= 5.0,
        "renewed at 70-90 % of the lifetime ({first_expiry} -> {second_expiry})"
    );
    assert!(metric(&agent, RENEWALS).await >= 2.0);
    let m = agent.metrics().await.expect("metrics");
    assert_eq!(gauge(&m, names::AGENT_OPEN_SERVERS).expect("gauge"), 1.0);
    assert_eq!(csrs_of_agent(&s.api), 2, "one CSR per certificate");

    // The agent restarts: the stored certificate is still valid, so no new CSR. Right after
    // the renewal, while the next one is 7-10 s away: later, the restarted agent could find
    // its renewal point passed and rightly ask again.
    let csrs = csrs_of_agent(&s.api);
    agent.proc.restart();
    agent.wait_ready().await;
    assert_eq!(
        csrs_of_agent(&s.api),
        csrs,
        "a restart uses the stored certificate"
    );
    let log = agent.proc.log();
    assert!(
        log.contains("using the stored client certificate"),
        "{}",
        agent.proc.log_tail()
    );

    // The server restarts: the agent's new handshake uses the renewed certificate (the first
    // has expired by the time of this check or will soon; the server accepts only valid ones).
    tokio::time::sleep(Duration::from_secs(6)).await;
    srv.proc.restart();
    srv.wait_healthy().await;
    srv.wait_ready().await;
    connect::echo_roundtrip(&srv.frontend, &echo.target())
        .await
        .expect("dial after reconnecting with the renewed certificate");
    println!(
        "CSR: bootstrap to ready {bootstrap:?}; renewed {renewed:?} after start (lifetime 12 s); expiry {first_expiry} -> {second_expiry}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_renewal_keeps_the_certificate_and_is_retried() {
    let s = setup("csr_denied", Duration::from_secs(14)).await;
    // No approver: the test approves and denies, as an administrator would.
    let mut srv = server(&s, false).await;
    let dir = s.env.dir.join("certs");
    let csr_names = |api: &ApiServer| -> Vec<String> {
        api.pending_csrs()
            .iter()
            .filter(|c| c["spec"]["username"] == AGENT_SA)
            .filter_map(|c| c["metadata"]["name"].as_str().map(String::from))
            .collect()
    };
    let approver = {
        let dir = dir.clone();
        let s = &s;
        async move {
            let name = poll_until("the agent's first CSR", Duration::from_secs(20), || async {
                csr_names(&s.api)
                    .pop()
                    .ok_or_else(|| "none pending".to_string())
            })
            .await;
            assert!(s.api.decide_csr(&name, true, "AdminApproved"));
            poll_until(
                "the first certificate stored",
                Duration::from_secs(10),
                || async {
                    cert_file(&dir)
                        .exists()
                        .then_some(())
                        .ok_or("not yet".to_string())
                },
            )
            .await;
        }
    };
    let (mut agent, ()) = tokio::join!(s.env.agent(agent_opts(&s, &srv, &dir)), approver);
    agent.wait_ready().await;
    srv.wait_ready().await;
    let first = std::fs::read(cert_file(&dir)).expect("cert");

    let renewal = poll_until("the renewal CSR", Duration::from_secs(20), || async {
        csr_names(&s.api)
            .pop()
            .ok_or_else(|| "none pending".to_string())
    })
    .await;
    assert!(s.api.decide_csr(&renewal, false, "AdminSaysNo"));
    poll_until(
        "the denial to be counted",
        Duration::from_secs(10),
        || async {
            let m = agent.metrics().await.map_err(|e| format!("{e:#}"))?;
            match m.counter(FAILURES, &[("reason", "denied")]) {
                n if n >= 1.0 => Ok(()),
                n => Err(format!("failures{{denied}} = {n}")),
            }
        },
    )
    .await;
    assert_eq!(
        std::fs::read(cert_file(&dir)).expect("cert"),
        first,
        "the valid certificate stays"
    );
    let log = agent.proc.log();
    assert!(
        log.contains("the CSR was denied")
            && log.contains("AdminSaysNo")
            && log.contains("stays in use"),
        "a clear error: {}",
        agent.proc.log_tail()
    );
    let m = agent.metrics().await.expect("metrics");
    assert_eq!(
        gauge(&m, names::AGENT_OPEN_SERVERS).expect("gauge"),
        1.0,
        "the tunnel stays"
    );

    // The retry is a new CSR (new key); approving it renews.
    let retry = poll_until(
        "a new CSR after the denial",
        Duration::from_secs(15),
        || async {
            csr_names(&s.api)
                .into_iter()
                .find(|n| *n != renewal)
                .ok_or_else(|| "none pending".to_string())
        },
    )
    .await;
    assert!(s.api.decide_csr(&retry, true, "AdminApproved"));
    poll_until(
        "the renewed certificate",
        Duration::from_secs(10),
        || async {
            match std::fs::read(cert_file(&dir)) {
                Ok(now) if now != first => Ok(()),
                _ => Err("not renewed".to_string()),
            }
        },
    )
    .await;
    assert!(csr_names(&s.api).is_empty(), "no CSR left pending");
}

#[tokio::test]
async fn an_unwritable_cert_dir_is_a_clear_start_up_error() {
    let s = setup("csr_unwritable", Duration::from_secs(60)).await;
    let srv = server(&s, true).await;
    let blocker = s.env.dir.join("not-a-dir");
    std::fs::write(&blocker, "x").expect("file");
    let mut args = vec![
        format!("--proxy-server-host={}", srv.agent_addr.ip()),
        format!("--proxy-server-port={}", srv.agent_addr.port()),
        format!("--ca-cert={}", s.env.pki.main.ca.display()),
        "--agent-id=node-1".to_string(),
        "--ebpf=off".to_string(),
        "--health-server-port=0".to_string(),
    ];
    args.push(format!("--cert-dir={}", blocker.join("certs").display()));
    args.push(format!("--bootstrap-kubeconfig={}", s.agent_kc.display()));
    let mut proc = spoke_tests::process::Proc::spawn(
        "spoke-agent unwritable",
        &spoke_tests::bins::agent_bin(),
        args,
        s.env.dir.join("unwritable.log"),
    );
    let (status, _) = proc
        .wait_exit(
            Instant::now(),
            Duration::from_secs(20),
            "agent with an unwritable --cert-dir",
        )
        .await;
    assert!(!status.success());
    let log = proc.log();
    assert!(
        log.contains("--cert-dir") && log.contains("not-a-dir"),
        "{log}"
    );
    assert_eq!(
        csrs_of_agent(&s.api),
        0,
        "no CSR without a place to keep the key"
    );
}
