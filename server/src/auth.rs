//! Agent token authentication (upstream `--agent-namespace`, `--agent-service-account`,
//! `--authentication-audience`): every agent `Connect` must carry exactly one
//! `authorization: Bearer <token>` value; the token is checked with a TokenReview
//! (`authentication.k8s.io/v1`) against kube-apiserver, which must answer authenticated, without
//! error, for the user `system:serviceaccount:<namespace>:<service-account>`. No caching: every
//! connect costs one review, as upstream.
//!
//! The kube-apiserver client is built from `--kubeconfig` (current context: cluster `server`,
//! `certificate-authority[-data]`, `insecure-skip-tls-verify`, `tls-server-name`; user
//! `client-certificate[-data]`/`client-key[-data]`, `token`, `tokenFile`) or, when no kubeconfig is
//! given, from the in-cluster service account (`KUBERNETES_SERVICE_HOST`/`_PORT` and
//! `/var/run/secrets/kubernetes.io/serviceaccount/{token,ca.crt}`). Token files are re-read on
//! every review, so rotated projected tokens are picked up. TokenReviews are always sent as JSON
//! (`--kube-api-content-type` is not used: it only matters for bulk list/watch traffic).
//!
//! Rate limit (`--kubeconfig-qps`/`--kubeconfig-burst`): a token bucket in front of the reviews.
//! `0` means the default of 50 QPS / burst 100 (client-go's 5/10 would make a reconnect storm of a
//! few hundred agents wait for minutes); a negative QPS disables the limit. A review that would
//! have to wait longer than 10 s for a token is refused with `Unavailable` (the agent retries).

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::metadata::MetadataMap;
use tonic::{Code, Status};

/// Bound on one TokenReview round trip (connect, TLS, request, response).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a review waits for the rate limiter before being refused.
const MAX_RATE_WAIT: Duration = Duration::from_secs(10);
/// Largest TokenReview response accepted.
const MAX_RESPONSE_BYTES: usize = 1 << 20;
/// `--kubeconfig-qps=0` / `--kubeconfig-burst=0`.
pub const DEFAULT_QPS: f32 = 50.0;
pub const DEFAULT_BURST: u32 = 100;
const TOKEN_REVIEW_PATH: &str = "/apis/authentication.k8s.io/v1/tokenreviews";
const BEARER: &str = "Bearer ";
const IN_CLUSTER_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Checks agents' bearer tokens with TokenReviews.
pub struct TokenAuth {
    namespace: String,
    service_account: String,
    audience: String,
    api: ApiClient,
    limiter: Option<RateLimiter>,
}

impl TokenAuth {
    /// kubeconfig: path or "" for in-cluster. Errors are one clear line (bad kubeconfig, missing file...).
    pub fn new(
        kubeconfig: &str,
        namespace: &str,
        service_account: &str,
        audience: &str,
    ) -> Result<Self> {
        let config = if kubeconfig.is_empty() {
            in_cluster_config(
                std::env::var("KUBERNETES_SERVICE_HOST").ok(),
                std::env::var("KUBERNETES_SERVICE_PORT").ok(),
                Path::new(IN_CLUSTER_DIR),
            )
            .context("token authentication: no --kubeconfig given and no in-cluster config")?
        } else {
            load_kubeconfig(Path::new(kubeconfig))
                .with_context(|| format!("token authentication: --kubeconfig {kubeconfig}"))?
        };
        Self::from_config(config, namespace, service_account, audience)
    }

    fn from_config(
        config: KubeConfig,
        namespace: &str,
        service_account: &str,
        audience: &str,
    ) -> Result<Self> {
        let api = ApiClient::new(config)?;
        tracing::info!(
            endpoint = %api.endpoint,
            namespace,
            service_account,
            audience,
            "agent token authentication enabled (TokenReview)"
        );
        Ok(Self {
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
            audience: audience.to_string(),
            api,
            limiter: RateLimiter::new(DEFAULT_QPS, DEFAULT_BURST),
        })
    }

    /// `--kubeconfig-qps` / `--kubeconfig-burst`: 0 keeps the defaults (50 / 100), a negative QPS
    /// disables rate limiting.
    pub fn with_rate_limit(mut self, qps: f32, burst: u32) -> Self {
        let qps = if qps == 0.0 { DEFAULT_QPS } else { qps };
        let burst = if burst == 0 { DEFAULT_BURST } else { burst };
        self.limiter = RateLimiter::new(qps, burst);
        self
    }

    /// Checks the `authorization` metadata of an agent's Connect request.
    pub async fn authenticate(&self, md: &MetadataMap) -> Result<(), Status> {
        let agent_id = md
            .get("agentid")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        match self.review(md).await {
            Ok(username) => {
                tracing::debug!(agent_id, username, "agent token authenticated");
                Ok(())
            }
            Err(f) => {
                tracing::warn!(
                    agent_id,
                    code = ?f.code,
                    reason = %f.reason,
                    "agent token authentication failed: connect refused"
                );
                Err(Status::new(
                    f.code,
                    format!("agent token authentication failed: {}", f.reason),
                ))
            }
        }
    }

    async fn review(&self, md: &MetadataMap) -> Result<String, Failure> {
        let token = bearer_token(md)?;
        if let Some(limiter) = &self.limiter {
            match limiter.reserve(MAX_RATE_WAIT) {
                Some(wait) if !wait.is_zero() => tokio::time::sleep(wait).await,
                Some(_) => {}
                None => return Err(Failure::unavailable(
                    "too many TokenReviews in flight (--kubeconfig-qps/--kubeconfig-burst limit)",
                )),
            }
        }
        let status = self.api.token_review(token, &self.audience).await?;
        check_review(&status, &self.audience)?;
        check_username(
            &status.user.username,
            &self.namespace,
            &self.service_account,
        )?;
        Ok(status.user.username)
    }
}

/// Why a connect is refused: the gRPC code and a log/status text (never containing the token).
#[derive(Debug, PartialEq, Eq)]
struct Failure {
    code: Code,
    reason: String,
}

impl Failure {
    fn unauthenticated(reason: impl Into<String>) -> Self {
        Self {
            code: Code::Unauthenticated,
            reason: reason.into(),
        }
    }
    fn denied(reason: impl Into<String>) -> Self {
        Self {
            code: Code::PermissionDenied,
            reason: reason.into(),
        }
    }
    fn unavailable(reason: impl Into<String>) -> Self {
        Self {
            code: Code::Unavailable,
            reason: reason.into(),
        }
    }
}

/// The token of the single `authorization: Bearer <token>` value.
fn bearer_token(md: &MetadataMap) -> Result<&str, Failure> {
    let values: Vec<_> = md.get_all("authorization").iter().collect();
    let value =
        match values.as_slice() {
            [] => return Err(Failure::unauthenticated(
                "no authorization metadata (agent started without --service-account-token-path?)",
            )),
            [v] => *v,
            more => {
                return Err(Failure::unauthenticated(format!(
                    "too many ({}) authorization values, expected one",
                    more.len()
                )))
            }
        };
    let value = value
        .to_str()
        .map_err(|_| Failure::unauthenticated("authorization value is not ASCII"))?;
    let Some(token) = value.strip_prefix(BEARER) else {
        return Err(Failure::unauthenticated(format!(
            "authorization value does not have the {BEARER:?} prefix"
        )));
    };
    // A token file read verbatim may end with a newline: tokens never contain whitespace.
    let token = token.trim();
    if token.is_empty() {
        return Err(Failure::unauthenticated("empty bearer token"));
    }
    Ok(token)
}

fn check_review(status: &ReviewStatus, audience: &str) -> Result<(), Failure> {
    if !status.error.is_empty() {
        return Err(Failure::unauthenticated(format!(
            "TokenReview error: {}",
            clip(&status.error)
        )));
    }
    if !status.authenticated {
        return Err(Failure::unauthenticated(format!(
            "TokenReview: token not authenticated (invalid, expired, or not for audience {audience:?})"
        )));
    }
    // An audience-aware apiserver echoes the matching audience; an empty list is accepted as
    // upstream does (it never looks at status.audiences).
    if !status.audiences.is_empty() && !status.audiences.iter().any(|a| a == audience) {
        return Err(Failure::unauthenticated(format!(
            "TokenReview: token audiences {:?} do not include {audience:?}",
            status.audiences
        )));
    }
    Ok(())
}

/// `username` must be exactly `system:serviceaccount:<namespace>:<service_account>`.
fn check_username(username: &str, namespace: &str, service_account: &str) -> Result<(), Failure> {
    let parts: Vec<&str> = username.split(':').collect();
    let [system, kind, ns, sa] = parts.as_slice() else {
        return Err(Failure::denied(format!(
            "TokenReview user {username:?} is not a service account (expected system:serviceaccount:{namespace}:{service_account})"
        )));
    };
    if *system != "system" || *kind != "serviceaccount" {
        return Err(Failure::denied(format!(
            "TokenReview user {username:?} is not a service account (expected system:serviceaccount:{namespace}:{service_account})"
        )));
    }
    if *ns != namespace {
        return Err(Failure::denied(format!(
            "service account token from namespace {ns:?}, expected {namespace:?}"
        )));
    }
    if *sa != service_account {
        return Err(Failure::denied(format!(
            "token of service account {sa:?}, expected {service_account:?}"
        )));
    }
    Ok(())
}

fn clip(s: &str) -> String {
    const MAX: usize = 300;
    let s = s.trim();
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// TokenReview wire format.

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TokenReviewRequest<'a> {
    api_version: &'static str,
    kind: &'static str,
    spec: TokenReviewSpec<'a>,
}

#[derive(Serialize)]
struct TokenReviewSpec<'a> {
    token: &'a str,
    audiences: [&'a str; 1],
}

#[derive(Deserialize, Default, Debug)]
#[serde(default)]
struct TokenReviewResponse {
    status: ReviewStatus,
}

#[derive(Deserialize, Default, Debug)]
#[serde(default)]
struct ReviewStatus {
    authenticated: bool,
    user: ReviewUser,
    audiences: Vec<String>,
    error: String,
}

#[derive(Deserialize, Default, Debug)]
#[serde(default)]
struct ReviewUser {
    username: String,
}

/// kube-apiserver's `Status` body of an error answer.
#[derive(Deserialize, Default)]
#[serde(default)]
struct ApiStatus {
    message: String,
}

// ---------------------------------------------------------------------------------------------
// kubeconfig / in-cluster configuration.

/// What the TokenReview client needs from a kubeconfig or the in-cluster environment.
#[derive(PartialEq, Eq)]
struct KubeConfig {
    server: String,
    ca_pem: Option<Vec<u8>>,
    insecure: bool,
    tls_server_name: Option<String>,
    /// Client certificate chain PEM and key PEM.
    client_identity: Option<(Vec<u8>, Vec<u8>)>,
    token: Option<String>,
    token_file: Option<PathBuf>,
}

/// Secrets (token, client key) are not printed.
impl std::fmt::Debug for KubeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeConfig")
            .field("server", &self.server)
            .field("ca_pem", &self.ca_pem.as_ref().map(Vec::len))
            .field("insecure", &self.insecure)
            .field("tls_server_name", &self.tls_server_name)
            .field("client_identity", &self.client_identity.is_some())
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_file", &self.token_file)
            .finish()
    }
}

fn read_file(what: &str, path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{what} {}", path.display()))
}

fn load_kubeconfig(path: &Path) -> Result<KubeConfig> {
    let text = std::fs::read_to_string(path).context("cannot read the kubeconfig")?;
    let dir = path.parent().unwrap_or(Path::new("."));
    parse_kubeconfig(&text, dir)
}

/// Scalar YAML value as a string (`token: 1234` parses as an integer).
fn scalar(y: &yaml_rust2::Yaml) -> Option<String> {
    use yaml_rust2::Yaml;
    match y {
        Yaml::String(s) | Yaml::Real(s) => Some(s.clone()),
        Yaml::Integer(i) => Some(i.to_string()),
        Yaml::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The `inner` map of the entry named `name` in list `list` (`clusters`, `contexts`, `users`).
fn named<'a>(
    doc: &'a yaml_rust2::Yaml,
    list: &str,
    inner: &str,
    name: &str,
) -> Result<&'a yaml_rust2::Yaml> {
    let entries = doc[list].as_vec().map(Vec::as_slice).unwrap_or_default();
    let entry = entries
        .iter()
        .find(|e| scalar(&e["name"]).as_deref() == Some(name))
        .ok_or_else(|| anyhow!("{list}: no entry named {name:?}"))?;
    let value = &entry[inner];
    if value.as_hash().is_none() {
        bail!("{list}: entry {name:?} has no {inner} map");
    }
    Ok(value)
}

fn resolve(dir: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        dir.join(p)
    }
}

/// `<field>-data` (base64) or `<field>` (file, relative to the kubeconfig's directory).
fn data_or_file(map: &yaml_rust2::Yaml, field: &str, dir: &Path) -> Result<Option<Vec<u8>>> {
    if let Some(data) = scalar(&map[format!("{field}-data").as_str()]).filter(|s| !s.is_empty()) {
        let compact: String = data.split_whitespace().collect();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(compact)
            .with_context(|| format!("{field}-data is not valid base64"))?;
        return Ok(Some(bytes));
    }
    match scalar(&map[field]).filter(|s| !s.is_empty()) {
        Some(path) => Ok(Some(read_file(field, &resolve(dir, &path))?)),
        None => Ok(None),
    }
}

/// Parses a kubeconfig: the current context's cluster and user (the only context when
/// `current-context` is unset). Relative file paths are relative to `dir`.
fn parse_kubeconfig(text: &str, dir: &Path) -> Result<KubeConfig> {
    let docs =
        yaml_rust2::YamlLoader::load_from_str(text).map_err(|e| anyhow!("not valid YAML: {e}"))?;
    let doc = docs
        .first()
        .filter(|d| d.as_hash().is_some())
        .ok_or_else(|| anyhow!("empty or not a YAML map"))?;
    let context_name = match scalar(&doc["current-context"]).filter(|s| !s.is_empty()) {
        Some(c) => c,
        None => match doc["contexts"].as_vec().map(Vec::as_slice) {
            Some([only]) => scalar(&only["name"]).unwrap_or_default(),
            _ => bail!("no current-context set"),
        },
    };
    let context = named(doc, "contexts", "context", &context_name)?;
    let cluster_name = scalar(&context["cluster"])
        .ok_or_else(|| anyhow!("context {context_name:?} names no cluster"))?;
    let cluster = named(doc, "clusters", "cluster", &cluster_name)?;
    let server = scalar(&cluster["server"])
        .filter(|s| !s.is_empty())
        .ok_or_else(|| anyhow!("cluster {cluster_name:?} has no server"))?;
    if let Some(proxy) = scalar(&cluster["proxy-url"]).filter(|s| !s.is_empty()) {
        tracing::warn!(
            proxy,
            "kubeconfig proxy-url is not supported and is ignored"
        );
    }
    let mut config = KubeConfig {
        server,
        ca_pem: data_or_file(cluster, "certificate-authority", dir)?,
        insecure: cluster["insecure-skip-tls-verify"]
            .as_bool()
            .unwrap_or(false),
        tls_server_name: scalar(&cluster["tls-server-name"]).filter(|s| !s.is_empty()),
        client_identity: None,
        token: None,
        token_file: None,
    };
    let Some(user_name) = scalar(&context["user"]).filter(|s| !s.is_empty()) else {
        return Ok(config);
    };
    let user = named(doc, "users", "user", &user_name)?;
    for unsupported in ["exec", "auth-provider"] {
        if !user[unsupported].is_badvalue() && !user[unsupported].is_null() {
            bail!("user {user_name:?} uses {unsupported}, which is not supported: use client-certificate/client-key, token or tokenFile");
        }
    }
    let cert = data_or_file(user, "client-certificate", dir)?;
    let key = data_or_file(user, "client-key", dir)?;
    config.client_identity = match (cert, key) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        _ => bail!("user {user_name:?}: client-certificate and client-key must be given together"),
    };
    config.token = scalar(&user["token"]).filter(|s| !s.is_empty());
    config.token_file = scalar(&user["tokenFile"])
        .filter(|s| !s.is_empty())
        .map(|p| resolve(dir, &p));
    if config.client_identity.is_none() && config.token.is_none() && config.token_file.is_none() {
        if scalar(&user["username"]).is_some() {
            bail!("user {user_name:?}: basic auth (username/password) is not supported");
        }
        tracing::warn!(
            user = user_name,
            "kubeconfig user has no credentials: TokenReviews will be anonymous"
        );
    }
    Ok(config)
}

/// client-go's `rest.InClusterConfig`.
fn in_cluster_config(
    host: Option<String>,
    port: Option<String>,
    sa_dir: &Path,
) -> Result<KubeConfig> {
    let (Some(host), Some(port)) = (
        host.filter(|h| !h.is_empty()),
        port.filter(|p| !p.is_empty()),
    ) else {
        bail!("KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT must be set");
    };
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host
    };
    let token_file = sa_dir.join("token");
    // Fail early on a missing token; it is re-read on every review.
    read_file("in-cluster service account token", &token_file)?;
    Ok(KubeConfig {
        server: format!("https://{host}:{port}"),
        ca_pem: Some(read_file("in-cluster CA", &sa_dir.join("ca.crt"))?),
        insecure: false,
        tls_server_name: None,
        client_identity: None,
        token: None,
        token_file: Some(token_file),
    })
}

// ---------------------------------------------------------------------------------------------
// The kube-apiserver client.

/// The client's own bearer credential.
enum Credential {
    None,
    Static(String),
    /// Re-read on every request; the last good read wins over `fallback` (kubeconfig `token`).
    File {
        path: PathBuf,
        fallback: Option<String>,
        last: Mutex<Option<String>>,
    },
}

impl Credential {
    fn current(&self) -> Result<Option<String>, Failure> {
        match self {
            Credential::None => Ok(None),
            Credential::Static(t) => Ok(Some(t.clone())),
            Credential::File {
                path,
                fallback,
                last,
            } => {
                let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
                match std::fs::read_to_string(path) {
                    Ok(t) if !t.trim().is_empty() => {
                        *last = Some(t.trim().to_string());
                    }
                    Ok(_) => tracing::warn!(path = %path.display(), "API token file is empty"),
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "cannot read the API token file")
                    }
                }
                match last.clone().or_else(|| fallback.clone()) {
                    Some(t) => Ok(Some(t)),
                    None => Err(Failure::unavailable(format!(
                        "spoke-server's own API token file {} cannot be read",
                        path.display()
                    ))),
                }
            }
        }
    }
}

struct ApiClient {
    endpoint: http::Uri,
    timeout: Duration,
    credential: Credential,
    client: Client<Connector, Full<Bytes>>,
}

impl ApiClient {
    fn new(config: KubeConfig) -> Result<Self> {
        let server: http::Uri = config
            .server
            .parse()
            .with_context(|| format!("invalid server URL {:?}", config.server))?;
        let tls = match server.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => bail!(
                "server URL {:?} must start with https:// (or http://)",
                config.server
            ),
        };
        let authority = server
            .authority()
            .ok_or_else(|| anyhow!("server URL {:?} has no host", config.server))?;
        let prefix = server.path().trim_end_matches('/');
        let endpoint: http::Uri = format!(
            "{}://{authority}{prefix}{TOKEN_REVIEW_PATH}",
            server.scheme_str().unwrap_or("https")
        )
        .parse()
        .with_context(|| format!("invalid server URL {:?}", config.server))?;
        let tls = if tls {
            let host = config
                .tls_server_name
                .clone()
                .unwrap_or_else(|| strip_brackets(authority.host()).to_string());
            let name = ServerName::try_from(host.clone())
                .map_err(|_| anyhow!("invalid TLS server name {host:?}"))?;
            Some((
                tokio_rustls::TlsConnector::from(Arc::new(tls_config(&config)?)),
                name,
            ))
        } else {
            tracing::warn!(server = %config.server, "kube-apiserver is reached over plain HTTP: TokenReviews (agent tokens) travel unencrypted");
            None
        };
        let credential = match (config.token_file, config.token) {
            (Some(path), fallback) => Credential::File {
                path,
                fallback,
                last: Mutex::new(None),
            },
            (None, Some(t)) => Credential::Static(t),
            (None, None) => Credential::None,
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(4)
            .pool_timer(TokioTimer::new())
            .build(Connector { tls });
        Ok(Self {
            endpoint,
            timeout: REQUEST_TIMEOUT,
            credential,
            client,
        })
    }

    async fn token_review(&self, token: &str, audience: &str) -> Result<ReviewStatus, Failure> {
        let body = serde_json::to_vec(&TokenReviewRequest {
            api_version: "authentication.k8s.io/v1",
            kind: "TokenReview",
            spec: TokenReviewSpec {
                token,
                audiences: [audience],
            },
        })
        .map_err(|e| Failure::unavailable(format!("cannot encode the TokenReview: {e}")))?;
        let mut req = http::Request::post(self.endpoint.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::ACCEPT, "application/json")
            .header(
                http::header::USER_AGENT,
                concat!("spoke-server/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(t) = self.credential.current()? {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req.body(Full::new(Bytes::from(body))).map_err(|_| {
            Failure::unavailable("cannot build the TokenReview request (invalid API credentials?)")
        })?;
        let exchange = async {
            let rsp = self.client.request(req).await.map_err(|e| {
                Failure::unavailable(format!(
                    "TokenReview request to {} failed: {}",
                    self.endpoint,
                    error_chain(&e)
                ))
            })?;
            let status = rsp.status();
            let body = Limited::new(rsp.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| {
                    Failure::unavailable(format!("reading the TokenReview response failed: {e}"))
                })?
                .to_bytes();
            Ok::<_, Failure>((status, body))
        };
        let (status, body) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| {
                Failure::unavailable(format!(
                    "TokenReview request to {} timed out after {:?}",
                    self.endpoint, self.timeout
                ))
            })??;
        if !status.is_success() {
            let message = serde_json::from_slice::<ApiStatus>(&body)
                .map(|s| s.message)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
            let hint = match status.as_u16() {
                401 => " (spoke-server's own kubeconfig credentials were rejected)",
                403 => " (spoke-server needs the system:auth-delegator ClusterRole)",
                _ => "",
            };
            return Err(Failure::unavailable(format!(
                "TokenReview answered HTTP {status}{hint}: {}",
                clip(&message)
            )));
        }
        serde_json::from_slice::<TokenReviewResponse>(&body)
            .map(|r| r.status)
            .map_err(|e| Failure::unavailable(format!("TokenReview response is not valid: {e}")))
    }
}

fn strip_brackets(host: &str) -> &str {
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

fn tls_config(config: &KubeConfig) -> Result<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS setup")?;
    let builder = if config.insecure {
        tracing::warn!(
            server = %config.server,
            "insecure-skip-tls-verify: kube-apiserver's certificate is NOT verified"
        );
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
    } else {
        let mut roots = RootCertStore::empty();
        match &config.ca_pem {
            Some(pem) => {
                for cert in CertificateDer::pem_slice_iter(pem) {
                    let cert = cert.map_err(|e| anyhow!("certificate authority: bad PEM: {e}"))?;
                    roots
                        .add(cert)
                        .map_err(|e| anyhow!("certificate authority: bad certificate: {e}"))?;
                }
                if roots.is_empty() {
                    bail!("certificate authority holds no PEM certificate");
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        builder.with_root_certificates(roots)
    };
    let mut tls = match &config.client_identity {
        Some((cert_pem, key_pem)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
                .collect::<Result<_, _>>()
                .map_err(|e| anyhow!("client certificate: bad PEM: {e}"))?;
            if chain.is_empty() {
                bail!("client certificate holds no PEM certificate");
            }
            let key = PrivateKeyDer::from_pem_slice(key_pem)
                .map_err(|e| anyhow!("client key: bad PEM: {e}"))?;
            builder
                .with_client_auth_cert(chain, key)
                .context("client certificate/key")?
        }
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tls)
}

/// `insecure-skip-tls-verify`: any certificate, but handshake signatures still checked.
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// TCP (+ TLS) connector for hyper-util's pooled client.
#[derive(Clone)]
struct Connector {
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
}

type ConnectFuture = Pin<Box<dyn Future<Output = std::io::Result<TokioIo<Conn>>> + Send>>;

impl tower::Service<http::Uri> for Connector {
    type Response = TokioIo<Conn>;
    type Error = std::io::Error;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let tls = self.tls.clone();
        Box::pin(async move {
            let host = strip_brackets(uri.host().unwrap_or_default()).to_string();
            let port = uri
                .port_u16()
                .unwrap_or(if tls.is_some() { 443 } else { 80 });
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let conn = match tls {
                Some((connector, name)) => Conn::Tls(Box::new(connector.connect(name, tcp).await?)),
                None => Conn::Plain(tcp),
            };
            Ok(TokioIo::new(conn))
        })
    }
}

enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Connection for Conn {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Rate limit.

/// Token bucket handing out reservations: a caller sleeps until its token is due.
struct RateLimiter {
    qps: f64,
    burst: f64,
    /// (tokens, at): may go negative = reservations waiting.
    state: Mutex<(f64, Instant)>,
}

impl RateLimiter {
    /// `None` (unlimited) for a negative or non-finite QPS.
    fn new(qps: f32, burst: u32) -> Option<Self> {
        if !(qps > 0.0 && qps.is_finite()) {
            return None;
        }
        let burst = f64::from(burst.max(1));
        Some(Self {
            qps: f64::from(qps),
            burst,
            state: Mutex::new((burst, Instant::now())),
        })
    }

    /// How long to wait for a token, or `None` (nothing reserved) if longer than `max_wait`.
    fn reserve(&self, max_wait: Duration) -> Option<Duration> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let (tokens, at) = *state;
        let refilled =
            (tokens + now.saturating_duration_since(at).as_secs_f64() * self.qps).min(self.burst);
        let left = refilled - 1.0;
        let wait = if left >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-left / self.qps)
        };
        if wait > max_wait {
            *state = (refilled, now);
            return None;
        }
        *state = (left, now);
        Some(wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::server::WebPkiClientVerifier;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tonic::metadata::MetadataValue;

    const AUD: &str = "system:konnectivity-server";
    const GOOD_USER: &str = "system:serviceaccount:kube-system:konnectivity-agent";

    fn scratch() -> PathBuf {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "spoke-auth-unit-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    fn md(values: &[&str]) -> MetadataMap {
        let mut md = MetadataMap::new();
        md.insert("agentid", MetadataValue::from_static("agent-1"));
        for v in values {
            md.append(
                "authorization",
                MetadataValue::try_from(*v).expect("ascii value"),
            );
        }
        md
    }

    fn b64(s: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn bearer_header_parsing() {
        assert_eq!(bearer_token(&md(&["Bearer abc.def"])), Ok("abc.def"));
        assert_eq!(bearer_token(&md(&["Bearer abc.def \t"])), Ok("abc.def"));
        let err = |values: &[&str]| bearer_token(&md(values)).expect_err("must be refused");
        let missing = err(&[]);
        assert_eq!(missing.code, Code::Unauthenticated);
        assert!(missing.reason.contains("no authorization"), "{missing:?}");
        let two = err(&["Bearer a", "Bearer b"]);
        assert_eq!(two.code, Code::Unauthenticated);
        assert!(two.reason.contains("too many (2)"), "{two:?}");
        for bad in ["bearer abc", "Basic abc", "abc", "Bearerabc"] {
            let e = err(&[bad]);
            assert_eq!(e.code, Code::Unauthenticated);
            assert!(e.reason.contains("prefix"), "{bad}: {e:?}");
            assert!(
                !e.reason.contains("abc"),
                "the token must not be echoed: {e:?}"
            );
        }
        assert!(err(&["Bearer "]).reason.contains("empty"));
    }

    #[test]
    fn username_must_be_the_configured_service_account() {
        let check = |u: &str| check_username(u, "kube-system", "konnectivity-agent");
        assert_eq!(check(GOOD_USER), Ok(()));
        for (user, code, needle) in [
            (
                "system:serviceaccount:default:konnectivity-agent",
                Code::PermissionDenied,
                "namespace \"default\"",
            ),
            (
                "system:serviceaccount:kube-system:other",
                Code::PermissionDenied,
                "service account \"other\"",
            ),
            ("admin", Code::PermissionDenied, "not a service account"),
            (
                "system:node:kube-system:konnectivity-agent",
                Code::PermissionDenied,
                "not a service account",
            ),
            (
                "system:serviceaccount:kube-system:konnectivity-agent:extra",
                Code::PermissionDenied,
                "not a service account",
            ),
            ("", Code::PermissionDenied, "not a service account"),
        ] {
            let e = check(user).expect_err(user);
            assert_eq!(e.code, code, "{user}");
            assert!(e.reason.contains(needle), "{user}: {}", e.reason);
        }
    }

    #[test]
    fn review_status_checks() {
        let status = |authenticated: bool, auds: &[&str], error: &str| ReviewStatus {
            authenticated,
            user: ReviewUser {
                username: GOOD_USER.into(),
            },
            audiences: auds.iter().map(|s| s.to_string()).collect(),
            error: error.into(),
        };
        assert_eq!(check_review(&status(true, &[AUD], ""), AUD), Ok(()));
        assert_eq!(check_review(&status(true, &[], ""), AUD), Ok(()));
        assert!(check_review(&status(false, &[AUD], ""), AUD)
            .expect_err("unauthenticated")
            .reason
            .contains("not authenticated"));
        assert!(check_review(&status(true, &[AUD], "boom"), AUD)
            .expect_err("error")
            .reason
            .contains("boom"));
        assert!(check_review(&status(true, &["other"], ""), AUD)
            .expect_err("audience")
            .reason
            .contains("audiences"));
    }

    #[test]
    fn kubeconfig_with_files_relative_to_its_directory() {
        let dir = scratch();
        std::fs::write(dir.join("ca.crt"), "CA PEM").expect("write");
        std::fs::create_dir_all(dir.join("pki")).expect("mkdir");
        std::fs::write(dir.join("pki/client.crt"), "CERT PEM").expect("write");
        std::fs::write(dir.join("key.pem"), "KEY PEM").expect("write");
        let text = format!(
            r#"
apiVersion: v1
kind: Config
current-context: ctx-b
clusters:
- name: other
  cluster:
    server: https://wrong:1
- name: kube
  cluster:
    server: https://10.0.0.1:6443/prefix/
    certificate-authority: ca.crt
    tls-server-name: kubernetes.default
contexts:
- name: ctx-a
  context: {{cluster: other, user: nobody}}
- name: ctx-b
  context:
    cluster: kube
    user: proxy
users:
- name: proxy
  user:
    client-certificate: pki/client.crt
    client-key: {}
"#,
            dir.join("key.pem").display()
        );
        let c = parse_kubeconfig(&text, &dir).expect("parses");
        assert_eq!(c.server, "https://10.0.0.1:6443/prefix/");
        assert_eq!(c.ca_pem.as_deref(), Some(&b"CA PEM"[..]));
        assert!(!c.insecure);
        assert_eq!(c.tls_server_name.as_deref(), Some("kubernetes.default"));
        assert_eq!(
            c.client_identity,
            Some((b"CERT PEM".to_vec(), b"KEY PEM".to_vec()))
        );
        assert_eq!(c.token, None);
        assert_eq!(c.token_file, None);
        let api = ApiClient::new(KubeConfig {
            ca_pem: None,
            client_identity: None,
            ..c
        })
        .expect("client");
        assert_eq!(
            api.endpoint.to_string(),
            "https://10.0.0.1:6443/prefix/apis/authentication.k8s.io/v1/tokenreviews"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn kubeconfig_with_data_and_tokens() {
        let dir = scratch();
        let text = format!(
            r#"
current-context: c
clusters:
- name: k
  cluster:
    server: "https://[::1]:6443"
    certificate-authority-data: {}
    insecure-skip-tls-verify: true
contexts:
- name: c
  context: {{cluster: k, user: u}}
users:
- name: u
  user:
    client-certificate-data: {}
    client-key-data: {}
    token: 12345
    tokenFile: tok
"#,
            b64(b"CA DATA"),
            b64(b"CERT DATA"),
            b64(b"KEY DATA")
        );
        let c = parse_kubeconfig(&text, &dir).expect("parses");
        assert_eq!(c.server, "https://[::1]:6443");
        assert_eq!(c.ca_pem.as_deref(), Some(&b"CA DATA"[..]));
        assert!(c.insecure);
        assert_eq!(
            c.client_identity,
            Some((b"CERT DATA".to_vec(), b"KEY DATA".to_vec()))
        );
        assert_eq!(c.token.as_deref(), Some("12345"));
        assert_eq!(c.token_file, Some(dir.join("tok")));

        // No current-context but a single context; token only; no user at all.
        let only = r#"{"clusters":[{"name":"k","cluster":{"server":"https://h"}}],
            "contexts":[{"name":"c","context":{"cluster":"k","user":"u"}}],
            "users":[{"name":"u","user":{"token":"abc"}}]}"#;
        let c = parse_kubeconfig(only, &dir).expect("JSON kubeconfig with one context");
        assert_eq!(c.token.as_deref(), Some("abc"));
        assert_eq!(c.client_identity, None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn kubeconfig_errors_are_clear() {
        let dir = scratch();
        let cfg = |cluster: &str, user: &str| {
            format!(
                "current-context: c\nclusters:\n- name: k\n  cluster: {cluster}\ncontexts:\n- name: c\n  context: {{cluster: k, user: u}}\nusers:\n- name: u\n  user: {user}\n"
            )
        };
        let err = |text: &str| format!("{:#}", parse_kubeconfig(text, &dir).expect_err(text));
        assert!(err("").contains("empty"));
        assert!(err("a: [").contains("not valid YAML"));
        assert!(err("clusters: []").contains("no current-context"));
        assert!(err(&cfg("{server: ''}", "{}")).contains("has no server"));
        assert!(err(&cfg(
            "{server: 'https://h', certificate-authority: nope.crt}",
            "{}"
        ))
        .contains("nope.crt"));
        assert!(err(&cfg(
            "{server: 'https://h', certificate-authority-data: '%%%'}",
            "{}"
        ))
        .contains("base64"));
        assert!(err(&cfg("{server: 'https://h'}", "{exec: {command: x}}")).contains("exec"));
        assert!(err(&cfg(
            "{server: 'https://h'}",
            "{client-certificate-data: QQ==}"
        ))
        .contains("together"));
        assert!(err(&cfg("{server: 'https://h'}", "{username: a, password: b}")).contains("basic"));
        assert!(
            err(&cfg("{server: 'https://h'}", "{}").replace("user: u", "user: x"))
                .contains("no entry named \"x\"")
        );
        let missing = TokenAuth::new("/nonexistent/kubeconfig", "ns", "sa", AUD)
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(
            missing.contains("--kubeconfig /nonexistent/kubeconfig")
                && missing.contains("cannot read"),
            "{missing}"
        );
        let bad_url = ApiClient::new(KubeConfig {
            server: "ftp://h".into(),
            ca_pem: None,
            insecure: false,
            tls_server_name: None,
            client_identity: None,
            token: None,
            token_file: None,
        })
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
        assert!(bad_url.contains("https://"), "{bad_url}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn in_cluster_config_from_env_and_service_account_dir() {
        let dir = scratch();
        let e = in_cluster_config(None, Some("443".into()), &dir).expect_err("no host");
        assert!(format!("{e:#}").contains("KUBERNETES_SERVICE_HOST"));
        let e = in_cluster_config(Some("10.96.0.1".into()), Some("443".into()), &dir)
            .expect_err("no token");
        assert!(format!("{e:#}").contains("token"), "{e:#}");
        std::fs::write(dir.join("token"), "tok").expect("write");
        std::fs::write(dir.join("ca.crt"), "CA").expect("write");
        let c = in_cluster_config(Some("fd00::1".into()), Some("443".into()), &dir).expect("ok");
        assert_eq!(c.server, "https://[fd00::1]:443");
        assert_eq!(c.ca_pem.as_deref(), Some(&b"CA"[..]));
        assert_eq!(c.token_file, Some(dir.join("token")));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn rate_limiter_reserves_and_refuses_past_max_wait() {
        assert!(RateLimiter::new(-1.0, 10).is_none());
        let l = RateLimiter::new(1.0, 2).expect("limited");
        let max = Duration::from_secs(3);
        assert_eq!(l.reserve(max), Some(Duration::ZERO));
        assert_eq!(l.reserve(max), Some(Duration::ZERO));
        let w = l.reserve(max).expect("third waits ~1 s");
        assert!(
            w > Duration::from_millis(900) && w <= Duration::from_secs(1),
            "{w:?}"
        );
        let w = l.reserve(max).expect("fourth waits ~2 s");
        assert!(w > Duration::from_millis(1900), "{w:?}");
        let w = l.reserve(max).expect("fifth waits ~3 s");
        assert!(w > Duration::from_millis(2900), "{w:?}");
        assert_eq!(
            l.reserve(max),
            None,
            "past max wait: refused, nothing reserved"
        );
    }

    // -----------------------------------------------------------------------------------------
    // Against a fake kube-apiserver (HTTPS on loopback).

    struct Pki {
        ca_pem: String,
        server: (String, String),
        client: (String, String),
    }

    fn pki() -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().expect("key");
        let ca_pem = ca.self_signed(&ca_key).expect("ca").pem();
        let issuer = Issuer::new(ca, ca_key);
        let leaf = |sans: Vec<String>| {
            let key = KeyPair::generate().expect("key");
            let cert = CertificateParams::new(sans)
                .expect("params")
                .signed_by(&key, &issuer)
                .expect("sign");
            (cert.pem(), key.serialize_pem())
        };
        Pki {
            ca_pem,
            server: leaf(vec!["localhost".into(), "127.0.0.1".into()]),
            client: leaf(vec!["spoke-server".into()]),
        }
    }

    #[derive(Debug, Clone)]
    struct Seen {
        authorization: Option<String>,
        client_cert: bool,
        token: String,
        audiences: Vec<String>,
    }

    struct FakeApi {
        addr: SocketAddr,
        seen: Arc<Mutex<Vec<Seen>>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for FakeApi {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    /// Answers TokenReviews: `tokens` maps token → (username, token audiences); `http_status`
    /// forces an error answer.
    async fn fake_api(
        pki: &Pki,
        tokens: &[(&str, &str, &[&str])],
        http_status: Option<u16>,
    ) -> FakeApi {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(pki.ca_pem.as_bytes()) {
            roots.add(c.expect("pem")).expect("root");
        }
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .allow_unauthenticated()
                .build()
                .expect("verifier");
        let chain = CertificateDer::pem_slice_iter(pki.server.0.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("chain");
        let key = PrivateKeyDer::from_pem_slice(pki.server.1.as_bytes()).expect("key");
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let table: Vec<(String, String, Vec<String>)> = tokens
            .iter()
            .map(|(t, u, a)| {
                (
                    t.to_string(),
                    u.to_string(),
                    a.iter().map(|s| s.to_string()).collect(),
                )
            })
            .collect();
        let log = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, log, table) = (acceptor.clone(), log.clone(), table.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let client_cert = tls.get_ref().1.peer_certificates().is_some();
                    let mut buf = Vec::new();
                    let head_end = loop {
                        let mut chunk = [0u8; 4096];
                        let Ok(n) = tls.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                    let header = |name: &str| {
                        head.lines().find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
                        })
                    };
                    let len: usize = header("content-length")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    while buf.len() < head_end + len {
                        let mut chunk = [0u8; 4096];
                        match tls.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let req: serde_json::Value =
                        serde_json::from_slice(&buf[head_end..head_end + len]).unwrap_or_default();
                    let token = req["spec"]["token"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string();
                    let audiences: Vec<String> = req["spec"]["audiences"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|v| v.as_str().map(String::from))
                                .collect()
                        })
                        .unwrap_or_default();
                    assert!(
                        head.starts_with(
                            "POST /apis/authentication.k8s.io/v1/tokenreviews HTTP/1.1"
                        ),
                        "{head}"
                    );
                    assert_eq!(req["kind"], "TokenReview");
                    assert_eq!(req["apiVersion"], "authentication.k8s.io/v1");
                    log.lock().expect("log").push(Seen {
                        authorization: header("authorization"),
                        client_cert,
                        token: token.clone(),
                        audiences: audiences.clone(),
                    });
                    let (code, body) = match http_status {
                        Some(code) => (
                            code,
                            r#"{"kind":"Status","message":"forbidden: no auth-delegator"}"#
                                .to_string(),
                        ),
                        None => {
                            let hit = table.iter().find(|(t, _, _)| *t == token);
                            let status = match hit {
                                Some((_, user, auds)) => {
                                    let common: Vec<&String> =
                                        auds.iter().filter(|a| audiences.contains(a)).collect();
                                    if common.is_empty() {
                                        serde_json::json!({"authenticated": false, "error": "token audiences invalid"})
                                    } else {
                                        serde_json::json!({"authenticated": true, "user": {"username": user}, "audiences": common})
                                    }
                                }
                                None => serde_json::json!({"user": {}}),
                            };
                            (
                                201,
                                serde_json::json!({"kind": "TokenReview", "status": status})
                                    .to_string(),
                            )
                        }
                    };
                    let rsp = format!(
                        "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = tls.write_all(rsp.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        FakeApi { addr, seen, task }
    }

    fn config(server: String, ca: Option<&str>) -> KubeConfig {
        KubeConfig {
            server,
            ca_pem: ca.map(|c| c.as_bytes().to_vec()),
            insecure: false,
            tls_server_name: None,
            client_identity: None,
            token: Some("server-token".into()),
            token_file: None,
        }
    }

    fn auth(c: KubeConfig) -> TokenAuth {
        TokenAuth::from_config(c, "kube-system", "konnectivity-agent", AUD).expect("auth")
    }

    #[tokio::test]
    async fn token_reviews_against_a_fake_apiserver() {
        let pki = pki();
        let api = fake_api(
            &pki,
            &[
                ("good", GOOD_USER, &[AUD]),
                ("wrong-aud", GOOD_USER, &["api"]),
                (
                    "wrong-sa",
                    "system:serviceaccount:kube-system:default",
                    &[AUD],
                ),
            ],
            None,
        )
        .await;
        let a = auth(config(
            format!("https://localhost:{}", api.addr.port()),
            Some(&pki.ca_pem),
        ));
        a.authenticate(&md(&["Bearer good"]))
            .await
            .expect("good token accepted");
        let e = a
            .authenticate(&md(&["Bearer wrong-aud"]))
            .await
            .expect_err("audience");
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
        assert!(!e.message().contains("wrong-aud"), "token leaked: {e:?}");
        let e = a
            .authenticate(&md(&["Bearer wrong-sa"]))
            .await
            .expect_err("sa");
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains("\"default\""), "{e:?}");
        let e = a
            .authenticate(&md(&["Bearer unknown"]))
            .await
            .expect_err("unknown");
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
        let e = a.authenticate(&md(&[])).await.expect_err("none");
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");

        let seen = api.seen.lock().expect("log").clone();
        assert_eq!(
            seen.len(),
            4,
            "no review without a token, no caching: {seen:?}"
        );
        assert!(seen.iter().all(|s| s.audiences == [AUD]), "{seen:?}");
        assert!(
            seen.iter()
                .all(|s| s.authorization.as_deref() == Some("Bearer server-token")),
            "{seen:?}"
        );
        assert!(seen.iter().all(|s| !s.client_cert));
        assert_eq!(seen[0].token, "good");

        // No caching: the same token is reviewed again.
        a.authenticate(&md(&["Bearer good"]))
            .await
            .expect("good token accepted");
        assert_eq!(api.seen.lock().expect("log").len(), 5);
    }

    #[tokio::test]
    async fn client_certificate_ip_server_name_and_token_file() {
        let pki = pki();
        let api = fake_api(&pki, &[("good", GOOD_USER, &[AUD])], None).await;
        let dir = scratch();
        std::fs::write(dir.join("api-token"), "file-token-1\n").expect("write");
        let mut c = config(
            format!("https://127.0.0.1:{}/", api.addr.port()),
            Some(&pki.ca_pem),
        );
        c.client_identity = Some((
            pki.client.0.as_bytes().to_vec(),
            pki.client.1.as_bytes().to_vec(),
        ));
        c.token_file = Some(dir.join("api-token"));
        let a = auth(c);
        a.authenticate(&md(&["Bearer good"]))
            .await
            .expect("good token accepted");
        std::fs::write(dir.join("api-token"), "file-token-2").expect("rotate");
        a.authenticate(&md(&["Bearer good"]))
            .await
            .expect("good token accepted");
        std::fs::remove_file(dir.join("api-token")).expect("remove");
        a.authenticate(&md(&["Bearer good"]))
            .await
            .expect("last good token kept");
        let seen = api.seen.lock().expect("log").clone();
        let auths: Vec<_> = seen
            .iter()
            .map(|s| s.authorization.clone().unwrap_or_default())
            .collect();
        assert_eq!(
            auths,
            [
                "Bearer file-token-1",
                "Bearer file-token-2",
                "Bearer file-token-2"
            ]
        );
        assert!(
            seen.iter().all(|s| s.client_cert),
            "client certificate presented: {seen:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn tls_verification_and_insecure_skip() {
        let pki = pki();
        let other = self::pki();
        let api = fake_api(&pki, &[("good", GOOD_USER, &[AUD])], None).await;
        let url = format!("https://localhost:{}", api.addr.port());
        let a = auth(config(url.clone(), Some(&other.ca_pem)));
        let e = a
            .authenticate(&md(&["Bearer good"]))
            .await
            .expect_err("untrusted apiserver");
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        let mut c = config(url, None);
        c.insecure = true;
        auth(c)
            .authenticate(&md(&["Bearer good"]))
            .await
            .expect("good token accepted");
    }

    #[tokio::test]
    async fn apiserver_down_or_refusing_is_unavailable() {
        let pki = pki();
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            l.local_addr().expect("addr").port()
        };
        let a = auth(config(
            format!("https://127.0.0.1:{port}"),
            Some(&pki.ca_pem),
        ));
        let e = a
            .authenticate(&md(&["Bearer good"]))
            .await
            .expect_err("down");
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        assert!(e.message().contains("TokenReview request"), "{e:?}");

        let api = fake_api(&pki, &[("good", GOOD_USER, &[AUD])], Some(403)).await;
        let a = auth(config(
            format!("https://localhost:{}", api.addr.port()),
            Some(&pki.ca_pem),
        ));
        let e = a
            .authenticate(&md(&["Bearer good"]))
            .await
            .expect_err("403");
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        assert!(
            e.message().contains("403") && e.message().contains("auth-delegator"),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn hung_apiserver_times_out() {
        let pki = pki();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let mut a = auth(config(
            format!("https://localhost:{port}"),
            Some(&pki.ca_pem),
        ));
        a.api.timeout = Duration::from_millis(300);
        let e = a
            .authenticate(&md(&["Bearer good"]))
            .await
            .expect_err("timeout");
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        assert!(e.message().contains("timed out"), "{e:?}");
        hold.abort();
    }
}
