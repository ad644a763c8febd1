//! Agent token authentication end to end (upstream `--agent-namespace`/`--agent-service-account`/
//! `--authentication-audience`): a fake kube-apiserver (HTTPS, in this process) answers
//! TokenReviews from a table; a real `spoke-server` checks every agent connect against it through
//! a kubeconfig, and real `spoke-agent`s authenticate with `--service-account-token-path` and no
//! client certificate.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use spoke_tests::backends;
use spoke_tests::cluster::{status, Agent, AgentOpts, Env, Server, ServerOpts, STARTUP_TIMEOUT};
use spoke_tests::connect;
use spoke_tests::ports::free_port;
use spoke_tests::rotation::write_atomically;
use spoke_tests::wait::{holds_for, poll_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

const NAMESPACE: &str = "kube-system";
const SERVICE_ACCOUNT: &str = "konnectivity-agent";
const AUDIENCE: &str = "system:konnectivity-server";
const AGENT_USER: &str = "system:serviceaccount:kube-system:konnectivity-agent";
/// spoke-server's own credential in the kubeconfig; anything else gets 401.
const SERVER_CREDENTIAL: &str = "spoke-server-credential";
/// How long a refusal must keep the server and the agent unready.
const REFUSED_FOR: Duration = Duration::from_secs(3);

// ---------------------------------------------------------------------------------------------
// Fake kube-apiserver.

/// One TokenReview the fake apiserver answered.
#[derive(Debug, Clone)]
struct Review {
    token: String,
    audiences: Vec<String>,
    /// The request carried spoke-server's kubeconfig credential.
    server_authorized: bool,
    authenticated: bool,
}

#[derive(Default)]
struct Table {
    /// token → (username, audiences the token was issued for).
    tokens: HashMap<String, (String, Vec<String>)>,
    log: Vec<Review>,
}

struct FakeApiServer {
    addr: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    table: Arc<Mutex<Table>>,
    task: Option<JoinHandle<()>>,
}

impl FakeApiServer {
    async fn start(env: &Env) -> Self {
        let main = &env.pki.main;
        let chain = CertificateDer::pem_slice_iter(main.server.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("server cert PEM");
        let key =
            PrivateKeyDer::from_pem_slice(main.server.key_pem.as_bytes()).expect("server key PEM");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("fake apiserver TLS config");
        let mut api = Self {
            addr: SocketAddr::from(([127, 0, 0, 1], free_port())),
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            table: Arc::default(),
            task: None,
        };
        api.up().await;
        api
    }

    fn token(&self, token: &str, username: &str, audiences: &[&str]) {
        let entry = (
            username.to_string(),
            audiences.iter().map(|a| a.to_string()).collect(),
        );
        self.table
            .lock()
            .expect("table")
            .tokens
            .insert(token.to_string(), entry);
    }

    fn revoke(&self, token: &str) {
        self.table.lock().expect("table").tokens.remove(token);
    }

    fn log(&self) -> Vec<Review> {
        self.table.lock().expect("table").log.clone()
    }

    /// Stops listening: connects are refused until [`FakeApiServer::up`].
    fn down(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    /// (Re)starts listening on the same address.
    async fn up(&mut self) {
        self.down();
        let addr = self.addr;
        let listener = poll_until(
            "fake apiserver to bind its port",
            Duration::from_secs(10),
            move || async move {
                TcpListener::bind(addr)
                    .await
                    .map_err(|e| format!("bind {addr}: {e}"))
            },
        )
        .await;
        let (acceptor, table) = (self.acceptor.clone(), self.table.clone());
        self.task = Some(tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, table) = (acceptor.clone(), table.clone());
                conns.spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        let _ = serve_one(tls, &table).await;
                    }
                });
            }
        }));
    }

    /// A kubeconfig for spoke-server pointing here, trusting the main CA, with its own token.
    fn kubeconfig(&self, env: &Env) -> PathBuf {
        let path = env.dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\nclusters:\n- name: fake\n  cluster:\n    server: https://localhost:{port}\n    certificate-authority: {ca}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: spoke-server\nusers:\n- name: spoke-server\n  user:\n    token: {SERVER_CREDENTIAL}\n",
            port = self.addr.port(),
            ca = env.pki.main.ca.display(),
        );
        std::fs::write(&path, text).expect("write kubeconfig");
        path
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.down();
    }
}

/// Reads one HTTP/1.1 request, answers it and closes.
async fn serve_one<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut io: S,
    table: &Mutex<Table>,
) -> anyhow::Result<()> {
    let mut buf = Vec::new();
    let head_end = loop {
        let mut chunk = [0u8; 4096];
        let n = io.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "client closed before the request head");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let header = |name: &str| {
        head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    };
    let len: usize = header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let mut chunk = [0u8; 4096];
        let n = io.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "client closed inside the body");
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8_lossy(&buf[head_end..head_end + len]).to_string();
    let (code, answer) = answer(&head, header("authorization"), &body, table);
    let rsp = format!(
        "HTTP/1.1 {code} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
        if code < 300 { "Created" } else { "Error" },
        answer.len()
    );
    io.write_all(rsp.as_bytes()).await?;
    io.shutdown().await?;
    Ok(())
}

fn api_status(code: u16, message: &str) -> (u16, String) {
    (
        code,
        format!(
            r#"{{"kind":"Status","apiVersion":"v1","status":"Failure","message":{},"code":{code}}}"#,
            json_string(message)
        ),
    )
}

/// kube-apiserver's TokenReview semantics: authenticated only for a known token whose audiences
/// intersect `spec.audiences`; the intersection is echoed in `status.audiences`.
fn answer(
    head: &str,
    authorization: Option<String>,
    body: &str,
    table: &Mutex<Table>,
) -> (u16, String) {
    if !head.starts_with("POST /apis/authentication.k8s.io/v1/tokenreviews HTTP/1.1\r\n") {
        return api_status(404, "not found");
    }
    let server_authorized =
        authorization.as_deref() == Some(&format!("Bearer {SERVER_CREDENTIAL}"));
    let Ok(req) = Json::parse(body) else {
        return api_status(400, "request body is not JSON");
    };
    if req.get("kind").and_then(Json::as_str) != Some("TokenReview")
        || req.get("apiVersion").and_then(Json::as_str) != Some("authentication.k8s.io/v1")
    {
        return api_status(400, "not an authentication.k8s.io/v1 TokenReview");
    }
    let spec = req.get("spec");
    let token = spec
        .and_then(|s| s.get("token"))
        .and_then(Json::as_str)
        .unwrap_or_default()
        .to_string();
    let audiences: Vec<String> = spec
        .and_then(|s| s.get("audiences"))
        .and_then(Json::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let mut table = table.lock().expect("table");
    let hit = table.tokens.get(&token).cloned();
    let common: Vec<String> = match &hit {
        Some((_, token_auds)) => token_auds
            .iter()
            .filter(|a| audiences.contains(a))
            .cloned()
            .collect(),
        None => Vec::new(),
    };
    let authenticated = server_authorized && !common.is_empty();
    table.log.push(Review {
        token,
        audiences,
        server_authorized,
        authenticated,
    });
    if !server_authorized {
        return api_status(401, "Unauthorized");
    }
    let status = match hit {
        Some((user, _)) if authenticated => format!(
            r#"{{"authenticated":true,"user":{{"username":{},"uid":"1234","groups":["system:serviceaccounts"]}},"audiences":[{}]}}"#,
            json_string(&user),
            common
                .iter()
                .map(|a| json_string(a))
                .collect::<Vec<_>>()
                .join(",")
        ),
        Some(_) => r#"{"user":{},"error":"token audiences are invalid"}"#.to_string(),
        None => r#"{"user":{}}"#.to_string(),
    };
    (
        201,
        format!(
            r#"{{"kind":"TokenReview","apiVersion":"authentication.k8s.io/v1","metadata":{{"creationTimestamp":null}},"spec":{{}},"status":{status}}}"#
        ),
    )
}

fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Just enough JSON to read a TokenReview request (the tests crate has no JSON dependency).
#[derive(Debug, Clone, PartialEq)]
enum Json {
    Null,
    Bool(bool),
    Number(f64),
    String(String),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

impl Json {
    fn parse(s: &str) -> Result<Json, String> {
        let mut p = JsonParser {
            s: s.as_bytes(),
            i: 0,
        };
        let v = p.value()?;
        p.ws();
        if p.i != p.s.len() {
            return Err(format!("trailing data at {}", p.i));
        }
        Ok(v)
    }
    fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Object(fields) => fields.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }
    fn as_str(&self) -> Option<&str> {
        match self {
            Json::String(s) => Some(s),
            _ => None,
        }
    }
    fn as_array(&self) -> Option<&[Json]> {
        match self {
            Json::Array(a) => Some(a),
            _ => None,
        }
    }
}

struct JsonParser<'a> {
    s: &'a [u8],
    i: usize,
}

impl JsonParser<'_> {
    fn ws(&mut self) {
        while self.s.get(self.i).is_some_and(|c| c.is_ascii_whitespace()) {
            self.i += 1;
        }
    }
    fn eat(&mut self, c: u8) -> Result<(), String> {
        self.ws();
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            Ok(())
        } else {
            Err(format!("expected {:?} at {}", c as char, self.i))
        }
    }
    fn value(&mut self) -> Result<Json, String> {
        self.ws();
        match self.s.get(self.i) {
            Some(b'{') => {
                self.i += 1;
                let mut fields = Vec::new();
                self.ws();
                if self.s.get(self.i) == Some(&b'}') {
                    self.i += 1;
                    return Ok(Json::Object(fields));
                }
                loop {
                    self.ws();
                    let k = self.string()?;
                    self.eat(b':')?;
                    fields.push((k, self.value()?));
                    self.ws();
                    match self.s.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b'}') => {
                            self.i += 1;
                            return Ok(Json::Object(fields));
                        }
                        _ => return Err(format!("bad object at {}", self.i)),
                    }
                }
            }
            Some(b'[') => {
                self.i += 1;
                let mut items = Vec::new();
                self.ws();
                if self.s.get(self.i) == Some(&b']') {
                    self.i += 1;
                    return Ok(Json::Array(items));
                }
                loop {
                    items.push(self.value()?);
                    self.ws();
                    match self.s.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b']') => {
                            self.i += 1;
                            return Ok(Json::Array(items));
                        }
                        _ => return Err(format!("bad array at {}", self.i)),
                    }
                }
            }
            Some(b'"') => self.string().map(Json::String),
            Some(_) => {
                let start = self.i;
                while self
                    .s
                    .get(self.i)
                    .is_some_and(|c| !b",]} \t\r\n".contains(c))
                {
                    self.i += 1;
                }
                match &self.s[start..self.i] {
                    b"null" => Ok(Json::Null),
                    b"true" => Ok(Json::Bool(true)),
                    b"false" => Ok(Json::Bool(false)),
                    lit => std::str::from_utf8(lit)
                        .ok()
                        .and_then(|t| t.parse().ok())
                        .map(Json::Number)
                        .ok_or_else(|| format!("bad literal at {start}")),
                }
            }
            None => Err("unexpected end".into()),
        }
    }
    fn string(&mut self) -> Result<String, String> {
        if self.s.get(self.i) != Some(&b'"') {
            return Err(format!("expected a string at {}", self.i));
        }
        self.i += 1;
        let mut out = Vec::new();
        loop {
            match self.s.get(self.i).copied() {
                None => return Err("unterminated string".into()),
                Some(b'"') => {
                    self.i += 1;
                    return String::from_utf8(out).map_err(|e| e.to_string());
                }
                Some(b'\\') => {
                    let esc = self.s.get(self.i + 1).copied().ok_or("bad escape")?;
                    self.i += 2;
                    match esc {
                        b'n' => out.push(b'\n'),
                        b't' => out.push(b'\t'),
                        b'r' => out.push(b'\r'),
                        b'b' => out.push(8),
                        b'f' => out.push(12),
                        b'u' => {
                            let hex = self.s.get(self.i..self.i + 4).ok_or("bad \\u escape")?;
                            let code = u32::from_str_radix(
                                std::str::from_utf8(hex).map_err(|e| e.to_string())?,
                                16,
                            )
                            .map_err(|e| e.to_string())?;
                            self.i += 4;
                            let c = char::from_u32(code).unwrap_or('\u{fffd}');
                            out.extend_from_slice(c.to_string().as_bytes());
                        }
                        c => out.push(c),
                    }
                }
                Some(c) => {
                    out.push(c);
                    self.i += 1;
                }
            }
        }
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

#[test]
fn fake_apiserver_json_reader() {
    let v = Json::parse(r#" {"a":[1,true,null,"x\"y\u0041"],"b":{"c":"d"},"e":[]} "#)
        .expect("valid JSON");
    assert_eq!(
        v.get("a").and_then(Json::as_array).map(|a| a.len()),
        Some(4)
    );
    assert_eq!(
        v.get("a")
            .and_then(Json::as_array)
            .and_then(|a| a[3].as_str()),
        Some("x\"yA")
    );
    assert_eq!(
        v.get("b").and_then(|b| b.get("c")).and_then(Json::as_str),
        Some("d")
    );
    assert_eq!(
        v.get("a").and_then(Json::as_array).map(|a| a[1].clone()),
        Some(Json::Bool(true))
    );
    assert!(Json::parse(r#"{"a":}"#).is_err());
    assert!(Json::parse(r#"{"a":1} x"#).is_err());
    assert_eq!(json_string("a\"b"), r#""a\"b""#);
}
