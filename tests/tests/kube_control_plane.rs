//! spoke-k8s (the real kube-rs client) against the API server stand-in: configuration as kube
//! loads it (an `exec` credential plugin included), TokenReview and its failures, the server
//! lease controller (create, renew, conflicts, expired-lease collection, metrics), the lease
//! counter (selectors, expiry, watch restarts, bookmarks, 410 relists, an API server that goes
//! away), the agent's certificate manager and the approver.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use serde_json::json;
use spoke_k8s::csr::{
    self, ApproverConfig, ApproverMetrics, CertConfig, CertManager, CertMetrics, CsrError,
};
use spoke_k8s::leases::{self, AgentLeaseMetrics, LeaseCounter, ServerLeaseMetrics, Timings};
use spoke_k8s::token_review::{self, ReviewError};
use spoke_tests::apiserver::{self, ApiServer, Signer};
use spoke_tests::cluster::Env;
use spoke_tests::wait::{holds_for, poll_until};
use tokio_util::sync::CancellationToken;

const NS: &str = "kube-system";
const AGENT_SA: &str = "system:serviceaccount:kube-system:konnectivity-agent";
const SERVER_USER: &str = "spoke-server";

async fn standin(env: &Env) -> ApiServer {
    let api = ApiServer::start(&env.pki.main.server, &env.pki.main.ca).await;
    api.user(
        "server-token",
        SERVER_USER,
        &[
            "create tokenreviews",
            "* leases",
            "list certificatesigningrequests",
            "watch certificatesigningrequests",
            "update certificatesigningrequests/approval",
        ],
    );
    // The agent: list/watch leases; create/get/watch CSRs; nothing more (deploy/ RBAC).
    api.user(
        "agent-token",
        AGENT_SA,
        &[
            "list leases",
            "watch leases",
            "create certificatesigningrequests",
            "get certificatesigningrequests",
            "watch certificatesigningrequests",
        ],
    );
    api.user("nobody-token", "nobody", &[]);
    api
}

async fn config(api: &ApiServer, dir: &Path, token: &str) -> spoke_k8s::kube::Config {
    let path = api.kubeconfig(dir, &format!("kubeconfig-{token}"), token);
    spoke_k8s::client::load_config("--kubeconfig", &path.display().to_string())
        .await
        .expect("kubeconfig loads")
}

async fn client(api: &ApiServer, dir: &Path, token: &str) -> spoke_k8s::kube::Client {
    spoke_k8s::client::build(config(api, dir, token).await, None).expect("client")
}

fn scrape(register: impl FnOnce(&mut Registry)) -> String {
    let mut r = Registry::default();
    register(&mut r);
    spoke_process::exposition::encode(&r)
}

fn sample(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

// ---------------------------------------------------------------------------------------------
// Configuration and TokenReview.

#[tokio::test]
async fn token_review_answers_and_failures() {
    let env = Env::new("kube_tokenreview");
    let mut api = standin(&env).await;
    api.token("good", AGENT_SA, &["aud-1", "aud-2"]);
    let dir = env.dir.path();
    let server = client(&api, dir, "server-token").await;
    let auds = ["aud-1".to_string()];
    let t = Duration::from_secs(5);

    let ok = token_review::review(&server, "good", &auds, t)
        .await
        .expect("answer");
    assert_eq!(ok.authenticated, Some(true));
    assert_eq!(ok.user.and_then(|u| u.username).as_deref(), Some(AGENT_SA));
    assert_eq!(ok.audiences.as_deref(), Some(&auds[..]));

    let other_aud = token_review::review(&server, "good", &["aud-3".into()], t)
        .await
        .expect("answer");
    assert_ne!(other_aud.authenticated, Some(true));
    assert!(other_aud.error.unwrap_or_default().contains("audiences"));
    let unknown = token_review::review(&server, "nope", &auds, t)
        .await
        .expect("answer");
    assert_ne!(unknown.authenticated, Some(true));

    let anonymous = client(&api, dir, "wrong-credential").await;
    match token_review::review(&anonymous, "good", &auds, t).await {
        Err(ReviewError::Api { code: 401, .. }) => {}
        other => panic!("a client with a bad credential must get 401: {other:?}"),
    }
    let nobody = client(&api, dir, "nobody-token").await;
    match token_review::review(&nobody, "good", &auds, t).await {
        Err(ReviewError::Api { code: 403, message }) => {
            assert!(message.contains("tokenreviews"), "{message}")
        }
        other => panic!("a client without rights must get 403: {other:?}"),
    }

    api.set_delay(Duration::from_secs(3));
    match token_review::review(&server, "good", &auds, Duration::from_millis(500)).await {
        Err(ReviewError::Timeout(_)) => {}
        other => panic!("a slow API server must time out: {other:?}"),
    }
    api.set_delay(Duration::ZERO);
    api.down();
    match token_review::review(&server, "good", &auds, t).await {
        Err(ReviewError::Transport(why)) => assert!(!why.is_empty()),
        other => panic!("a stopped API server is a transport error: {other:?}"),
    }
    api.up().await;
    assert_eq!(
        token_review::review(&server, "good", &auds, t)
            .await
            .expect("back")
            .authenticated,
        Some(true)
    );
    assert!(
        api.reviews()
            .iter()
            .all(|r| r.token != "good" || r.audiences == auds || r.audiences == ["aud-3"]),
        "spec.audiences is what was asked"
    );
}

#[tokio::test]
async fn kubeconfig_with_an_exec_credential_plugin() {
    let env = Env::new("kube_exec");
    let mut api = standin(&env).await;
    api.token("good", AGENT_SA, &["a"]);
    let dir = env.dir.path();
    let plugin = dir.join("credential-plugin.sh");
    std::fs::write(
        &plugin,
        "#!/bin/sh\necho '{\"apiVersion\":\"client.authentication.k8s.io/v1\",\"kind\":\"ExecCredential\",\"status\":{\"token\":\"server-token\"}}'\n",
    )
    .expect("plugin");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let kubeconfig = dir.join("kubeconfig-exec");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: c\nclusters:\n- name: s\n  cluster:\n    server: https://localhost:{}\n    certificate-authority: {}\ncontexts:\n- name: c\n  context:\n    cluster: s\n    user: u\nusers:\n- name: u\n  user:\n    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      command: {}\n      interactiveMode: Never\n",
            api.addr.port(),
            api.ca.display(),
            plugin.display()
        ),
    )
    .expect("kubeconfig");
    let config = spoke_k8s::client::load_config("--kubeconfig", &kubeconfig.display().to_string())
        .await
        .expect("exec kubeconfig loads");
    let c = spoke_k8s::client::build(config, None).expect("client");
    let r = token_review::review(&c, "good", &["a".into()], Duration::from_secs(5))
        .await
        .expect("the plugin's token authenticates the reviewer");
    assert_eq!(r.authenticated, Some(true));
    assert!(api.reviews().iter().all(|r| r.reviewer == SERVER_USER));
    api.down();

    let missing = spoke_k8s::client::load_config("--kubeconfig", "/nonexistent/kubeconfig").await;
    let e = format!("{:#}", missing.expect_err("missing file"));
    assert!(e.contains("--kubeconfig /nonexistent/kubeconfig"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Leases.

fn timings() -> Timings {
    Timings {
        duration: Duration::from_secs(4),
        renew_interval: Duration::from_millis(700),
        gc_interval: Duration::from_millis(500),
    }
}

fn lease_json(
    name: &str,
    labels: serde_json::Value,
    renewed_secs_ago: i64,
    duration: i64,
) -> serde_json::Value {
    let t = k8s_openapi_time(renewed_secs_ago);
    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
           "metadata": {"name": name, "namespace": NS, "labels": labels},
           "spec": {"holderIdentity": name, "leaseDurationSeconds": duration, "renewTime": t}})
}

fn k8s_openapi_time(secs_ago: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_micros() as i64;
    let t = now - secs_ago * 1_000_000;
    format!(
        "{}",
        spoke_k8s::k8s_openapi::jiff::Timestamp::from_microsecond(t).expect("time")
    )
}

#[tokio::test]
async fn lease_controller_publishes_renews_and_collects() {
    let env = Env::new("kube_lease_controller");
    let api = standin(&env).await;
    let dir = env.dir.path();
    let labels = leases::parse_labels("k8s-app=konnectivity-server").expect("labels");
    let metrics = ServerLeaseMetrics::default();
    // Expired leases: one of ours (collected), one with other labels (left alone).
    api.put(
        "leases",
        NS,
        lease_json(
            "konnectivity-proxy-server-dead",
            json!({"k8s-app": "konnectivity-server"}),
            100,
            30,
        ),
    );
    api.put(
        "leases",
        NS,
        lease_json("someone-else", json!({"app": "other"}), 100, 30),
    );
    // Listing fails twice first: counted under the answer's code.
    api.fail_next("list", "leases", 500, 2);
    let controller = Arc::new(leases::Controller::new(
        client(&api, dir, "server-token").await,
        NS,
        "s1",
        labels,
        timings(),
        metrics.clone(),
    ));
    let stop = CancellationToken::new();
    let task = tokio::spawn(controller.clone().run(stop.clone()));
    let name = "konnectivity-proxy-server-s1";
    let first = poll_until(
        "the lease to be created",
        Duration::from_secs(10),
        || async {
            api.get("leases", NS, name)
                .ok_or_else(|| "no lease yet".to_string())
        },
    )
    .await;
    assert_eq!(first["spec"]["holderIdentity"], "s1");
    assert_eq!(first["spec"]["leaseDurationSeconds"], 4);
    assert_eq!(
        first["metadata"]["labels"]["k8s-app"],
        "konnectivity-server"
    );
    let rv0 = first["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    poll_until(
        "the lease to be renewed",
        Duration::from_secs(5),
        || async {
            let l = api.get("leases", NS, name).ok_or("gone")?;
            match l["metadata"]["resourceVersion"].as_str() {
                Some(rv) if rv != rv0 && l["spec"]["renewTime"] != first["spec"]["renewTime"] => {
                    Ok(())
                }
                _ => Err(format!("not renewed: {l}")),
            }
        },
    )
    .await;

    // Someone else writes the lease: the controller's next update conflicts, re-reads, renews.
    let mut foreign = api.get("leases", NS, name).expect("lease");
    foreign["metadata"]["annotations"] = json!({"touched": "yes"});
    api.put("leases", NS, foreign);
    let touched_rv =
        api.get("leases", NS, name).expect("lease")["metadata"]["resourceVersion"].clone();
    poll_until(
        "a renewal after the conflict",
        Duration::from_secs(5),
        || async {
            let l = api.get("leases", NS, name).ok_or("gone")?;
            if l["metadata"]["resourceVersion"] != touched_rv && l["spec"]["holderIdentity"] == "s1"
            {
                Ok(())
            } else {
                Err(format!("{l}"))
            }
        },
    )
    .await;
    assert!(
        api.log()
            .iter()
            .any(|l| l.verb == "update" && l.code == 409 && l.user == SERVER_USER),
        "the renewal must have met the conflict"
    );

    poll_until(
        "the expired lease to be collected",
        Duration::from_secs(10),
        || async {
            match api.get("leases", NS, "konnectivity-proxy-server-dead") {
                None => Ok(()),
                Some(_) => Err("still there".to_string()),
            }
        },
    )
    .await;
    assert!(
        api.get("leases", NS, "someone-else").is_some(),
        "other labels are not ours"
    );
    assert!(
        api.get("leases", NS, name).is_some(),
        "our own valid lease stays"
    );
    let text = scrape(|r| metrics.register(r));
    assert_eq!(sample(&text, "culled_leases_count"), 1.0, "{text}");
    assert!(
        sample(&text, "lease_delete_total{http_status_code=\"200\"") >= 1.0,
        "{text}"
    );
    assert!(
        sample(
            &text,
            "lease_list_total{http_status_code=\"500\",reason=\"InternalError\"}"
        ) == 2.0,
        "{text}"
    );
    assert!(
        sample(&text, "lease_list_total{http_status_code=\"200\"") >= 1.0,
        "{text}"
    );
    assert!(text.contains("lease_list_latency_seconds_bucket"), "{text}");

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("stops")
        .expect("joins");
    assert!(
        api.get("leases", NS, name).is_none(),
        "the lease is deleted on shutdown"
    );
}

#[tokio::test]
async fn lease_counter_follows_the_watch() {
    let env = Env::new("kube_lease_counter");
    let mut api = standin(&env).await;
    api.set_bookmark_every(Duration::from_millis(300));
    // Watches end every 2 s: the counter re-watches from its resourceVersion.
    api.set_max_watch(Duration::from_secs(2));
    let dir = env.dir.path();
    let ours = json!({"k8s-app": "konnectivity-server"});
    api.put(
        "leases",
        NS,
        lease_json("konnectivity-proxy-server-a", ours.clone(), 0, 60),
    );
    api.put(
        "leases",
        NS,
        lease_json("konnectivity-proxy-server-b", ours.clone(), 0, 60),
    );
    api.put(
        "leases",
        NS,
        lease_json("other", json!({"app": "x"}), 0, 60),
    );
    let metrics = AgentLeaseMetrics::default();
    let stop = CancellationToken::new();
    let counter = LeaseCounter::spawn(
        config(&api, dir, "agent-token").await,
        NS,
        "k8s-app=konnectivity-server",
        Some(metrics.clone()),
        stop.clone(),
    )
    .expect("counter");
    let want = |n: usize| {
        let counter = counter.clone();
        async move {
            poll_until(
                &format!("lease count {n}"),
                Duration::from_secs(10),
                || async {
                    match counter.count() {
                        c if c == n => Ok(()),
                        c => Err(format!("count {c}")),
                    }
                },
            )
            .await
        }
    };
    want(2).await;
    api.put(
        "leases",
        NS,
        lease_json("konnectivity-proxy-server-c", ours.clone(), 0, 60),
    );
    want(3).await;
    // A lease that expires without any event: the counter's timer notices.
    api.put(
        "leases",
        NS,
        lease_json("konnectivity-proxy-server-c", ours.clone(), 0, 2),
    );
    want(2).await;
    api.remove("leases", NS, "konnectivity-proxy-server-b");
    want(1).await;
    api.put(
        "leases",
        NS,
        lease_json("konnectivity-proxy-server-b", ours.clone(), 0, 60),
    );
    want(2).await;
    // The history is compacted while watches restart: 410 Expired, then a new list.
    api.compact();
    tokio::time::sleep(Duration::from_secs(3)).await;
    api.put(
        "leases",
        NS,
        lease_json("konnectivity-proxy-server-d", ours.clone(), 0, 60),
    );
    want(3).await;
    let lists_before = api.log().iter().filter(|l| l.verb == "list").count();
    assert!(
        lists_before >= 2,
        "a relist after 410: {lists_before} lists"
    );

    // The API server goes away: the last count stays; when it is back, the watch resumes.
    api.down();
    holds_for(
        "the count to stay while the API server is down",
        Duration::from_secs(3),
        || async {
            match counter.count() {
                3 => Ok(()),
                c => Err(format!("count {c}")),
            }
        },
    )
    .await;
    api.up().await;
    api.remove("leases", NS, "konnectivity-proxy-server-d");
    want(2).await;
    let log = api.log();
    assert!(log
        .iter()
        .all(|l| l.user == AGENT_SA || l.user == "system:admin" || l.user.is_empty()));
    assert!(
        log.iter()
            .filter(|l| l.user == AGENT_SA)
            .all(|l| l.verb == "list" || l.verb == "watch"),
        "the counter only lists and watches"
    );
    assert!(
        log.iter()
            .any(|l| l.verb == "watch" && l.query.contains("allowWatchBookmarks=true")),
        "watches ask for bookmarks"
    );
    assert!(
        log.iter()
            .all(|l| l.verb != "watch" || l.query.contains("labelSelector=k8s-app")),
        "the selector goes to the API server"
    );
    let text = scrape(|r| metrics.register(r));
    assert!(
        sample(&text, "lease_lists_total{http_response_code=\"200\"") >= 2.0,
        "{text}"
    );
    assert!(
        sample(&text, "lease_watches_total{http_response_code=\"200\"") >= 3.0,
        "{text}"
    );
    assert!(text.contains("lease_list_latency_seconds_bucket"), "{text}");
    stop.cancel();
}

// ---------------------------------------------------------------------------------------------
// Certificates.

fn signer(env: &Env, lifetime: Duration) -> (Signer, std::path::PathBuf) {
    let (issuer, ca_pem, path) = apiserver::signer_ca(env.dir.path(), "client-signer");
    (
        Signer {
            name: csr::DEFAULT_SIGNER.into(),
            issuer,
            ca_pem,
            lifetime,
            fail: false,
        },
        path,
    )
}

fn cert_config(dir: &Path, agent: &str, timeout: Duration) -> CertConfig {
    CertConfig {
        cert_dir: dir.join(format!("certs-{agent}")),
        agent_id: agent.into(),
        signer: csr::DEFAULT_SIGNER.into(),
        expiration: Some(Duration::from_secs(3600)),
        approval_timeout: timeout,
    }
}

#[tokio::test]
async fn certificates_from_the_csr_api_and_the_approver() {
    let env = Env::new("kube_csr");
    let api = standin(&env).await;
    let (s, _ca) = signer(&env, Duration::from_secs(3600));
    api.set_signer(s);
    let dir = env.dir.path();
    let agent_client = client(&api, dir, "agent-token").await;
    let stop = CancellationToken::new();
    let approver_metrics = ApproverMetrics::default();
    let approver = csr::Approver::new(
        client(&api, dir, "server-token").await,
        ApproverConfig {
            signer: csr::DEFAULT_SIGNER.into(),
            namespace: "kube-system".into(),
            service_account: "konnectivity-agent".into(),
        },
        approver_metrics.clone(),
    );
    let approving = tokio::spawn(approver.run(stop.clone()));

    // Approved and issued: key and certificate stored together, 0600, matching.
    let cfg = cert_config(dir, "node-1", Duration::from_secs(10));
    CertManager::prepare_dir(&cfg.cert_dir).expect("cert dir");
    let metrics = CertMetrics::default();
    let m = CertManager::new(agent_client.clone(), cfg.clone(), metrics.clone());
    let v = m.request().await.expect("certificate");
    let current = CertManager::current_path(&cfg.cert_dir);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&current)
            .expect("stored")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let stored = CertManager::stored(&cfg.cert_dir).expect("valid stored certificate");
    assert_eq!(stored.not_after, v.not_after);
    assert!(
        !cfg.cert_dir.join(csr::PENDING_KEY_FILE).exists(),
        "the pending key is gone"
    );
    let agent_calls: Vec<_> = api
        .log()
        .into_iter()
        .filter(|l| l.user == AGENT_SA)
        .collect();
    assert!(
        agent_calls
            .iter()
            .all(|l| ["create", "get", "watch"].contains(&l.verb.as_str())),
        "the agent needs create/get/watch only: {agent_calls:?}"
    );
    assert!(agent_calls.iter().all(|l| l.code < 400), "{agent_calls:?}");

    // The approver leaves other requesters' CSRs alone and denies ours when they are wrong.
    let bad_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut p = rcgen::CertificateParams::new(vec!["evil.example".to_string()]).expect("params");
    p.distinguished_name.push(
        rcgen::DnType::CommonName,
        "system:konnectivity-agent:node-9",
    );
    let with_san = p
        .serialize_request(&bad_key)
        .and_then(|r| r.pem())
        .expect("csr");
    let csr_body = |name: &str, pem: &str| {
        use base64::Engine;
        json!({"apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
               "metadata": {"name": name},
               "spec": {"request": base64::engine::general_purpose::STANDARD.encode(pem),
                        "signerName": csr::DEFAULT_SIGNER, "usages": ["digital signature", "client auth"]}})
    };
    let post = |token: &'static str, body: serde_json::Value| {
        let api = &api;
        async move {
            let c = client(api, dir, token).await;
            let csr: spoke_k8s::k8s_openapi::api::certificates::v1::CertificateSigningRequest =
                serde_json::from_value(body).expect("csr");
            spoke_k8s::kube::Api::all(c)
                .create(&Default::default(), &csr)
                .await
                .expect("created")
        }
    };
    post("agent-token", csr_body("bad-san", &with_san)).await;
    post("admin-token", csr_body("not-an-agent", &with_san)).await;
    poll_until(
        "the approver to deny the CSR with a SAN",
        Duration::from_secs(10),
        || async {
            let c = api
                .get("certificatesigningrequests", "", "bad-san")
                .ok_or("gone")?;
            let conds = c["status"]["conditions"].to_string();
            if conds.contains("Denied") && conds.contains("extensions") {
                Ok(())
            } else {
                Err(conds)
            }
        },
    )
    .await;
    holds_for(
        "another requester's CSR to stay pending",
        Duration::from_secs(1),
        || async {
            let c = api
                .get("certificatesigningrequests", "", "not-an-agent")
                .ok_or("gone")?;
            match c["status"]["conditions"].is_null() {
                true => Ok(()),
                false => Err(format!("decided: {c}")),
            }
        },
    )
    .await;

    // Denied (by an administrator before the approver sees it): a clear error, counted, and
    // the stored certificate is untouched.
    stop.cancel();
    approving.await.expect("approver stops");
    let before = std::fs::read(&current).expect("stored");
    let manager = Arc::new(CertManager::new(
        agent_client.clone(),
        cfg.clone(),
        metrics.clone(),
    ));
    let attempt = tokio::spawn({
        let m = manager.clone();
        async move { m.request().await }
    });
    let name = poll_until("the renewal CSR", Duration::from_secs(10), || async {
        api.pending_csrs()
            .iter()
            .find(|c| {
                c["spec"]["username"] == AGENT_SA
                    && c["metadata"]["name"]
                        .as_str()
                        .is_some_and(|n| n.contains("node-1"))
            })
            .and_then(|c| c["metadata"]["name"].as_str().map(String::from))
            .ok_or_else(|| "no pending CSR of node-1".to_string())
    })
    .await;
    api.decide_csr(&name, false, "NotToday");
    match attempt.await.expect("joins") {
        Err(e @ CsrError::Denied(_)) => {
            assert_eq!(e.reason(), "denied");
            assert!(e.to_string().contains("NotToday"), "{e}");
        }
        other => panic!("a denied CSR must be an error: {other:?}"),
    }
    assert_eq!(
        std::fs::read(&current).expect("stored"),
        before,
        "the last valid certificate stays"
    );

    // Never approved: the wait is bounded, and a retry finds the same CSR (one pending CSR).
    let short = CertManager::new(
        agent_client.clone(),
        cert_config(dir, "node-2", Duration::from_millis(1500)),
        metrics.clone(),
    );
    CertManager::prepare_dir(&dir.join("certs-node-2")).expect("dir");
    for _ in 0..2 {
        match short.request().await {
            Err(e @ CsrError::Timeout(_)) => assert!(e.to_string().contains("not approved"), "{e}"),
            other => panic!("an unapproved CSR must time out: {other:?}"),
        }
    }
    let node2: Vec<_> = api
        .pending_csrs()
        .into_iter()
        .filter(|c| {
            c["metadata"]["name"]
                .as_str()
                .is_some_and(|n| n.contains("node-2"))
        })
        .collect();
    assert_eq!(node2.len(), 1, "retries reuse the pending CSR: {node2:?}");

    let text = scrape(|r| approver_metrics.register(r));
    assert!(
        sample(&text, "agent_csr_decisions_total{result=\"approved\"}") >= 1.0,
        "{text}"
    );
    assert!(
        sample(&text, "agent_csr_decisions_total{result=\"denied\"}") >= 1.0,
        "{text}"
    );
}

#[tokio::test]
async fn cert_dir_that_cannot_be_written_is_refused() {
    let env = Env::new("kube_certdir");
    let dir = env.dir.path().join("ro");
    std::fs::create_dir_all(&dir).expect("dir");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o500)).expect("chmod");
    let blocked = dir.join("certs");
    let e = CertManager::prepare_dir(&blocked);
    // As root the directory is writable anyway; a file in the way is not.
    let file = env.dir.path().join("a-file");
    std::fs::write(&file, "x").expect("file");
    let e2 = CertManager::prepare_dir(&file.join("certs")).expect_err("a file is in the way");
    assert!(format!("{e2:#}").contains("--cert-dir"), "{e2:#}");
    if let Err(e) = e {
        assert!(format!("{e:#}").contains("--cert-dir"), "{e:#}");
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod back");
}
