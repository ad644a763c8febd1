//! Agent token authentication end to end (upstream `--agent-namespace`/`--agent-service-account`/
//! `--authentication-audience`): the kube-apiserver stand-in (HTTPS, in this process) answers
//! TokenReviews from a table; a real `spoke-server` checks every agent connect against it through
//! a kubeconfig, and real `spoke-agent`s authenticate with `--service-account-token-path` and no
//! client certificate.

use std::path::{Path, PathBuf};
use std::time::Duration;

use spoke_tests::apiserver::ApiServer;
use spoke_tests::backends;
use spoke_tests::cluster::{status, Agent, AgentOpts, Env, Server, ServerOpts, STARTUP_TIMEOUT};
use spoke_tests::connect;
use spoke_tests::rotation::write_atomically;
use spoke_tests::wait::{holds_for, poll_until};

const NAMESPACE: &str = "kube-system";
const SERVICE_ACCOUNT: &str = "konnectivity-agent";
const AUDIENCE: &str = "system:konnectivity-server";
const AGENT_USER: &str = "system:serviceaccount:kube-system:konnectivity-agent";
/// spoke-server's own credential in the kubeconfig; anything else gets 401.
const SERVER_CREDENTIAL: &str = "spoke-server-credential";
/// How long a refusal must keep the server and the agent unready.
const REFUSED_FOR: Duration = Duration::from_secs(3);

// ---------------------------------------------------------------------------------------------
// The API server stand-in (tests/src/apiserver.rs), seen through what these cases check.

/// spoke-server's user at the stand-in.
const SERVER_USER: &str = "spoke-server";

/// One TokenReview the stand-in answered.
#[derive(Debug, Clone)]
struct Review {
    token: String,
    audiences: Vec<String>,
    /// The request carried spoke-server's kubeconfig credential.
    server_authorized: bool,
    authenticated: bool,
}

struct FakeApiServer(ApiServer);

impl FakeApiServer {
    async fn start(env: &Env) -> Self {
        let api = ApiServer::start(&env.pki.main.server, &env.pki.main.ca).await;
        // spoke-server may create TokenReviews (system:auth-delegator), nothing else.
        api.user(SERVER_CREDENTIAL, SERVER_USER, &["create tokenreviews"]);
        Self(api)
    }

    fn token(&self, token: &str, username: &str, audiences: &[&str]) {
        self.0.token(token, username, audiences);
    }

    fn revoke(&self, token: &str) {
        self.0.revoke(token);
    }

    fn log(&self) -> Vec<Review> {
        self.0
            .reviews()
            .into_iter()
            .map(|r| Review {
                server_authorized: r.reviewer == SERVER_USER,
                token: r.token,
                audiences: r.audiences,
                authenticated: r.authenticated,
            })
            .collect()
    }

    fn down(&mut self) {
        self.0.down();
    }

    async fn up(&mut self) {
        self.0.up().await;
    }

    /// A kubeconfig for spoke-server pointing here, trusting the main CA, with its own token.
    fn kubeconfig(&self, env: &Env) -> PathBuf {
        self.0
            .kubeconfig(env.dir.path(), "kubeconfig", SERVER_CREDENTIAL)
    }
}

// ---------------------------------------------------------------------------------------------
// Processes.

/// spoke-server with token authentication (no `--cluster-ca-cert`), HTTP CONNECT over a Unix socket.
async fn token_server(env: &Env, kubeconfig: &Path) -> Server {
    let opts = ServerOpts::uds()
        .id("token-server")
        .agent_tokens()
        .arg(&format!("--agent-namespace={NAMESPACE}"))
        .arg(&format!("--agent-service-account={SERVICE_ACCOUNT}"))
        .arg(&format!("--authentication-audience={AUDIENCE}"))
        .arg(&format!("--kubeconfig={}", kubeconfig.display()));
    env.server(opts).await
}

/// spoke-agent authenticating with the token in `token_file` only (no client certificate).
async fn token_agent(env: &Env, server: &Server, token_file: &Path) -> Agent {
    let opts = AgentOpts::new(server.agent_addr)
        .id("token-agent")
        .token(token_file.to_path_buf());
    env.agent(opts).await
}

fn write_token(env: &Env, token: &str) -> PathBuf {
    let path = env.dir.join("sa-token");
    // Rewritten through a rename, as the kubelet does for projected tokens.
    write_atomically(&path, token);
    path
}

/// Both sides ready: the server has the agent, the agent has a tunnel.
async fn wait_ready(server: &mut Server, agent: &mut Agent) {
    agent.wait_ready().await;
    server.wait_ready().await;
}

/// The refused agent never becomes ready and the server never counts it, for [`REFUSED_FOR`].
async fn assert_refused(
    server: &mut Server,
    agent: &mut Agent,
    api: &FakeApiServer,
    min_reviews: usize,
) {
    poll_until(
        "the agent's connects to reach the fake apiserver",
        STARTUP_TIMEOUT,
        move || async move {
            let n = api.log().len();
            if n >= min_reviews {
                Ok(())
            } else {
                Err(format!("{n} TokenReviews so far, want ≥ {min_reviews}"))
            }
        },
    )
    .await;
    stays_unready(
        server,
        agent,
        "server /readyz 500 and agent /readyz not 200 (connect refused)",
    )
    .await;
    server.proc.assert_running();
    agent.proc.assert_running();
}

/// For [`REFUSED_FOR`]: server /readyz 500 and agent /readyz anything but 200.
async fn stays_unready(server: &Server, agent: &Agent, what: &str) {
    let (s, a) = (server.health_addr, agent.health_addr);
    holds_for(what, REFUSED_FOR, || async move {
        match (status(s, "/readyz").await, status(a, "/readyz").await) {
            (Ok(500), Ok(sa)) if sa != 200 => Ok(()),
            other => Err(format!("(server, agent) /readyz = {other:?}")),
        }
    })
    .await;
}

fn assert_logged_refusal(server: &Server, needle: &str, secrets: &[&str]) {
    let log = server.proc.log();
    assert!(
        log.lines()
            .any(|l| l.contains("agent token authentication failed") && l.contains(needle)),
        "server log must name the refusal reason ({needle:?}):\n{}",
        server.proc.log_tail()
    );
    for secret in secrets.iter().chain(&[SERVER_CREDENTIAL]) {
        assert!(
            !log.contains(secret),
            "server log leaks a token ({secret:?}):\n{log}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Cases.

#[tokio::test]
async fn valid_token_is_accepted_and_dials_work() {
    let env = Env::new("token_ok");
    let api = FakeApiServer::start(&env).await;
    let token = "valid-agent-token-1";
    api.token(
        token,
        AGENT_USER,
        &[AUDIENCE, "https://kubernetes.default.svc"],
    );
    let mut server = token_server(&env, &api.kubeconfig(&env)).await;
    let mut agent = token_agent(&env, &server, &write_token(&env, token)).await;
    wait_ready(&mut server, &mut agent).await;

    let echo = backends::echo().await;
    connect::echo_roundtrip(&server.frontend, &echo.target())
        .await
        .expect("dial through the token-authenticated agent");

    let log = api.log();
    assert!(!log.is_empty(), "the server must have asked the apiserver");
    for r in &log {
        assert_eq!(r.token, token, "{r:?}");
        assert_eq!(
            r.audiences,
            [AUDIENCE],
            "spec.audiences must be exactly the --authentication-audience: {r:?}"
        );
        assert!(
            r.server_authorized,
            "spoke-server must send its kubeconfig token: {r:?}"
        );
    }
    assert!(
        !server.proc.log().contains(token),
        "server log leaks the agent token:\n{}",
        server.proc.log()
    );
}

#[tokio::test]
async fn token_for_another_audience_is_refused() {
    let env = Env::new("token_audience");
    let api = FakeApiServer::start(&env).await;
    let token = "token-for-the-apiserver-audience";
    api.token(token, AGENT_USER, &["https://kubernetes.default.svc"]);
    let mut server = token_server(&env, &api.kubeconfig(&env)).await;
    let mut agent = token_agent(&env, &server, &write_token(&env, token)).await;
    assert_refused(&mut server, &mut agent, &api, 2).await;
    assert!(api
        .log()
        .iter()
        .all(|r| r.audiences == [AUDIENCE] && !r.authenticated));
    assert_logged_refusal(&server, "audiences are invalid", &[token]);
}

#[tokio::test]
async fn token_of_another_service_account_is_refused() {
    let env = Env::new("token_sa");
    let api = FakeApiServer::start(&env).await;
    let token = "token-of-the-default-service-account";
    api.token(
        token,
        "system:serviceaccount:kube-system:default",
        &[AUDIENCE],
    );
    let mut server = token_server(&env, &api.kubeconfig(&env)).await;
    let mut agent = token_agent(&env, &server, &write_token(&env, token)).await;
    assert_refused(&mut server, &mut agent, &api, 2).await;
    assert!(
        api.log().iter().all(|r| r.authenticated),
        "the apiserver accepted the token; spoke-server must refuse the user"
    );
    assert_logged_refusal(&server, "token of service account", &[token]);
}

#[tokio::test]
async fn tokenreview_endpoint_down_refuses_until_it_is_back() {
    let env = Env::new("token_api_down");
    let mut api = FakeApiServer::start(&env).await;
    let token = "valid-agent-token-2";
    api.token(token, AGENT_USER, &[AUDIENCE]);
    let kubeconfig = api.kubeconfig(&env);
    api.down();
    let mut server = token_server(&env, &kubeconfig).await;
    let mut agent = token_agent(&env, &server, &write_token(&env, token)).await;
    // Give the agent a few attempts against the dead endpoint.
    let proc = &server.proc;
    poll_until(
        "the server to log an unreachable TokenReview endpoint",
        STARTUP_TIMEOUT,
        move || async move {
            let log = proc.log();
            let n = log
                .lines()
                .filter(|l| {
                    l.contains("agent token authentication failed")
                        && l.contains("TokenReview request")
                })
                .count();
            if n >= 2 {
                Ok(())
            } else {
                Err(format!("{n} refusals logged"))
            }
        },
    )
    .await;
    stays_unready(&server, &agent, "no readiness while the apiserver is down").await;
    assert!(api.log().is_empty());
    assert_logged_refusal(&server, "Unavailable", &[token]);

    api.up().await;
    wait_ready(&mut server, &mut agent).await;
    let echo = backends::echo().await;
    connect::echo_roundtrip(&server.frontend, &echo.target())
        .await
        .expect("dial after the apiserver came back");
    assert!(api
        .log()
        .iter()
        .any(|r| r.token == token && r.authenticated));
}

#[tokio::test]
async fn rotated_token_file_is_used_on_the_next_connect() {
    let env = Env::new("token_rotate");
    let api = FakeApiServer::start(&env).await;
    let (old, new) = (
        "projected-token-generation-1",
        "projected-token-generation-2",
    );
    api.token(old, AGENT_USER, &[AUDIENCE]);
    api.token(new, AGENT_USER, &[AUDIENCE]);
    let mut server = token_server(&env, &api.kubeconfig(&env)).await;
    let token_file = write_token(&env, old);
    let mut agent = token_agent(&env, &server, &token_file).await;
    wait_ready(&mut server, &mut agent).await;
    assert!(api.log().iter().all(|r| r.token == old));

    // The kubelet rotates the projected token; the old one stops being valid.
    write_token(&env, new);
    api.revoke(old);
    let before = api.log().len();
    // Force a reconnect: the server restarts, the agent re-reads the file.
    server.restart().await;
    wait_ready(&mut server, &mut agent).await;
    let after: Vec<Review> = api.log().split_off(before);
    assert!(
        !after.is_empty(),
        "the reconnect must be reviewed again (no caching)"
    );
    let last = after.last().cloned().expect("a review");
    assert_eq!(
        last.token, new,
        "the reconnect must use the rewritten token file; reviews since rotation: {after:?}"
    );
    assert!(last.authenticated);
    let echo = backends::echo().await;
    connect::echo_roundtrip(&server.frontend, &echo.target())
        .await
        .expect("dial after the reconnect");
}
