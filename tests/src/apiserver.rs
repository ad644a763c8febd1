//! A small kube-apiserver stand-in, served over TLS (hyper + rustls) so the real kube-rs client
//! talks to it exactly as to a cluster. It keeps JSON objects (k8s-openapi shapes) with
//! resourceVersions and serves what Spoke uses:
//!
//! - `authentication.k8s.io/v1` TokenReview (a token table, audiences intersected as
//!   kube-apiserver does);
//! - `coordination.k8s.io/v1` Leases: create, get, list (label and field selectors), update
//!   with `resourceVersion` conflicts, delete with preconditions, watch (from a
//!   resourceVersion, bookmarks when asked, 410 Expired after [`ApiServer::compact`], a bounded
//!   watch length so clients re-watch);
//! - `certificates.k8s.io/v1` CertificateSigningRequests: create (the requester's user is
//!   recorded in `spec.username` as the API server does), get, list, watch, the `approval`
//!   subresource, and a signer that issues approved CSRs of its signer name with a chosen
//!   lifetime (or fails them).
//!
//! Requests authenticate with a bearer token mapped to a user; each user has a list of allowed
//! `verb resource` pairs (RBAC in miniature), and every request is logged with its user and
//! answer so tests can check what a component did and did not ask for. Faults: stop
//! listening ([`ApiServer::down`]), fail the next N requests of a kind, slow answers.
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::{Method, Request, Response};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use crate::certs::CertKey;
use crate::ports::free_port;

type Body = BoxBody<Bytes, Infallible>;

/// Users with every right.
pub const ADMIN: &str = "system:admin";

/// One request as the stand-in saw it.
#[derive(Debug, Clone)]
pub struct Logged {
    pub user: String,
    pub verb: String,
    pub resource: String,
    pub name: String,
    pub query: String,
    pub code: u16,
}

/// One TokenReview as answered.
#[derive(Debug, Clone)]
pub struct Review {
    pub token: String,
    pub audiences: Vec<String>,
    pub reviewer: String,
    pub authenticated: bool,
}

#[derive(Debug, Clone)]
struct Event {
    rv: u64,
    resource: String,
    namespace: String,
    kind: &'static str,
    object: Value,
}

/// A fault: the next `count` requests matching `verb resource` answer `code`.
#[derive(Debug, Clone)]
struct Fault {
    verb: String,
    resource: String,
    code: u16,
    count: usize,
}

/// How the stand-in signs approved CSRs.
pub struct Signer {
    pub name: String,
    pub issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pub ca_pem: String,
    pub lifetime: Duration,
    /// Fail approved CSRs instead of issuing.
    pub fail: bool,
}

#[derive(Default)]
struct Store {
    rv: u64,
    /// (resource, namespace, name) → object.
    objects: BTreeMap<(String, String, String), Value>,
    history: VecDeque<Event>,
    /// Watches from a resourceVersion below this get 410 Expired.
    compacted_below: u64,
    tokens: HashMap<String, (String, Vec<String>)>,
    reviews: Vec<Review>,
    log: Vec<Logged>,
    faults: Vec<Fault>,
}

struct State {
    store: Mutex<Store>,
    events: broadcast::Sender<Event>,
    users: Mutex<HashMap<String, String>>,
    rights: Mutex<HashMap<String, Vec<(String, String)>>>,
    signer: Mutex<Option<Signer>>,
    bookmark_every: Mutex<Duration>,
    max_watch: Mutex<Duration>,
    delay: Mutex<Duration>,
}

/// The stand-in. Dropping it stops it.
pub struct ApiServer {
    pub addr: SocketAddr,
    pub ca: PathBuf,
    acceptor: tokio_rustls::TlsAcceptor,
    state: Arc<State>,
    task: Option<JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ApiServer {
    /// Serves with `cert` (its SANs must name localhost) signed by the CA at `ca`.
    pub async fn start(cert: &CertKey, ca: &Path) -> Self {
        let chain = CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("stand-in cert PEM");
        let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).expect("stand-in key");
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("stand-in TLS config");
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let (events, _) = broadcast::channel(4096);
        let mut api = Self {
            addr: SocketAddr::from(([127, 0, 0, 1], free_port())),
            ca: ca.to_path_buf(),
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            state: Arc::new(State {
                store: Mutex::default(),
                events,
                users: Mutex::default(),
                rights: Mutex::default(),
                signer: Mutex::new(None),
                bookmark_every: Mutex::new(Duration::from_secs(1)),
                max_watch: Mutex::new(Duration::from_secs(30)),
                delay: Mutex::new(Duration::ZERO),
            }),
            task: None,
        };
        api.user("admin-token", ADMIN, &["*"]);
        api.up().await;
        api
    }

    /// Adds a user with bearer `token` and `rights` (`"verb resource"`, `"* resource"`, `"*"`).
    pub fn user(&self, token: &str, user: &str, rights: &[&str]) {
        lock(&self.state.users).insert(token.into(), user.into());
        let rights = rights
            .iter()
            .map(|r| match r.split_once(' ') {
                Some((v, res)) => (v.to_string(), res.to_string()),
                None => (r.to_string(), "*".to_string()),
            })
            .collect();
        lock(&self.state.rights).insert(user.into(), rights);
    }

    /// A token that TokenReviews authenticate as `user` for `audiences`.
    pub fn token(&self, token: &str, user: &str, audiences: &[&str]) {
        lock(&self.state.store).tokens.insert(
            token.into(),
            (
                user.into(),
                audiences.iter().map(|a| a.to_string()).collect(),
            ),
        );
    }

    pub fn revoke(&self, token: &str) {
        lock(&self.state.store).tokens.remove(token);
    }

    pub fn reviews(&self) -> Vec<Review> {
        lock(&self.state.store).reviews.clone()
    }

    pub fn log(&self) -> Vec<Logged> {
        lock(&self.state.store).log.clone()
    }

    pub fn set_signer(&self, signer: Signer) {
        *lock(&self.state.signer) = Some(signer);
    }

    /// Lifetime of certificates issued from now on.
    pub fn set_cert_lifetime(&self, lifetime: Duration) {
        if let Some(s) = lock(&self.state.signer).as_mut() {
            s.lifetime = lifetime;
        }
    }

    pub fn set_bookmark_every(&self, d: Duration) {
        *lock(&self.state.bookmark_every) = d;
    }

    /// Longest a watch stays open before the stand-in ends it (clients then re-watch).
    pub fn set_max_watch(&self, d: Duration) {
        *lock(&self.state.max_watch) = d;
    }

    /// Every answer waits this long first.
    pub fn set_delay(&self, d: Duration) {
        *lock(&self.state.delay) = d;
    }

    /// The next `count` requests `verb resource` answer `code` (an API Status).
    pub fn fail_next(&self, verb: &str, resource: &str, code: u16, count: usize) {
        lock(&self.state.store).faults.push(Fault {
            verb: verb.into(),
            resource: resource.into(),
            code,
            count,
        });
    }

    /// Forgets the event history: watches from an older resourceVersion get 410 Expired.
    pub fn compact(&self) {
        let mut s = lock(&self.state.store);
        // As etcd after other writes and a compaction: every resourceVersion a client holds
        // is now too old to watch from.
        s.rv += 1;
        s.history.clear();
        s.compacted_below = s.rv + 1;
    }

    /// Stops listening and drops every open connection (watches break).
    pub fn down(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    /// (Re)starts listening on the same address.
    pub async fn up(&mut self) {
        self.down();
        let addr = self.addr;
        let listener = crate::wait::poll_until(
            "the API server stand-in to bind its port",
            Duration::from_secs(10),
            move || async move {
                TcpListener::bind(addr)
                    .await
                    .map_err(|e| format!("bind {addr}: {e}"))
            },
        )
        .await;
        let (acceptor, state) = (self.acceptor.clone(), self.state.clone());
        self.task = Some(tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((tcp, _)) = accepted else { return };
                        let (acceptor, state) = (acceptor.clone(), state.clone());
                        conns.spawn(async move {
                            let Ok(tls) = acceptor.accept(tcp).await else { return };
                            let svc = hyper::service::service_fn(move |req| {
                                let state = state.clone();
                                async move { Ok::<_, Infallible>(handle(state, req).await) }
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(tls), svc)
                                .await;
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        }));
    }

    /// A kubeconfig for `token`'s user pointing here.
    pub fn kubeconfig(&self, dir: &Path, file: &str, token: &str) -> PathBuf {
        let path = dir.join(file);
        let text = format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: standin\nclusters:\n- name: standin\n  cluster:\n    server: https://localhost:{port}\n    certificate-authority: {ca}\ncontexts:\n- name: standin\n  context:\n    cluster: standin\n    user: u\nusers:\n- name: u\n  user:\n    token: {token}\n",
            port = self.addr.port(),
            ca = self.ca.display(),
        );
        std::fs::write(&path, text).expect("write kubeconfig");
        path
    }

    // ---- direct access for tests (as an administrator or a controller would act) ----

    /// The object, if it exists.
    pub fn get(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        lock(&self.state.store)
            .objects
            .get(&(resource.into(), namespace.into(), name.into()))
            .cloned()
    }

    /// Every object of `resource` in `namespace` ("" for cluster-scoped).
    pub fn list(&self, resource: &str, namespace: &str) -> Vec<Value> {
        lock(&self.state.store)
            .objects
            .iter()
            .filter(|((r, ns, _), _)| r == resource && ns == namespace)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Creates or replaces an object as an administrator would (no checks).
    pub fn put(&self, resource: &str, namespace: &str, mut object: Value) {
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let mut s = lock(&self.state.store);
        let existed = s
            .objects
            .contains_key(&(resource.into(), namespace.into(), name.clone()));
        commit(
            &self.state,
            &mut s,
            resource,
            namespace,
            &name,
            &mut object,
            if existed { "MODIFIED" } else { "ADDED" },
        );
    }

    /// Deletes an object as an administrator would.
    pub fn remove(&self, resource: &str, namespace: &str, name: &str) -> bool {
        let mut s = lock(&self.state.store);
        remove(&self.state, &mut s, resource, namespace, name).is_some()
    }

    /// Approves (`true`) or denies a CSR as `kubectl certificate approve|deny` would; the
    /// signer then issues approved ones.
    pub fn decide_csr(&self, name: &str, approve: bool, reason: &str) -> bool {
        let Some(mut csr) = self.get("certificatesigningrequests", "", name) else {
            return false;
        };
        add_condition(
            &mut csr,
            if approve { "Approved" } else { "Denied" },
            reason,
        );
        let mut s = lock(&self.state.store);
        commit(
            &self.state,
            &mut s,
            "certificatesigningrequests",
            "",
            name,
            &mut csr,
            "MODIFIED",
        );
        drop(s);
        sign_if_approved(&self.state, name);
        true
    }

    /// Pending CSRs (no Approved/Denied/Failed condition).
    pub fn pending_csrs(&self) -> Vec<Value> {
        self.list("certificatesigningrequests", "")
            .into_iter()
            .filter(|c| !decided(c))
            .collect()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.down();
    }
}

fn decided(csr: &Value) -> bool {
    csr["status"]["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| matches!(c["type"].as_str(), Some("Approved" | "Denied" | "Failed")))
    })
}

fn add_condition(csr: &mut Value, type_: &str, reason: &str) {
    let cond = json!({
        "type": type_, "status": "True", "reason": reason,
        "message": format!("{type_} by the test"),
        "lastUpdateTime": now_rfc3339(),
    });
    if !csr["status"].is_object() {
        csr["status"] = json!({});
    }
    match csr["status"]["conditions"].as_array_mut() {
        Some(cs) => cs.push(cond),
        None => csr["status"]["conditions"] = json!([cond]),
    }
}

fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    k8s_openapi::jiff::Timestamp::from_second(secs)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// Stores `object` with a new resourceVersion and publishes the event.
fn commit(
    state: &State,
    s: &mut Store,
    resource: &str,
    namespace: &str,
    name: &str,
    object: &mut Value,
    kind: &'static str,
) {
    s.rv += 1;
    object["metadata"]["resourceVersion"] = json!(s.rv.to_string());
    s.objects.insert(
        (resource.into(), namespace.into(), name.into()),
        object.clone(),
    );
    let ev = Event {
        rv: s.rv,
        resource: resource.into(),
        namespace: namespace.into(),
        kind,
        object: object.clone(),
    };
    s.history.push_back(ev.clone());
    while s.history.len() > 10_000 {
        s.history.pop_front();
    }
    let _ = state.events.send(ev);
}

fn remove(
    state: &State,
    s: &mut Store,
    resource: &str,
    namespace: &str,
    name: &str,
) -> Option<Value> {
    let mut obj = s
        .objects
        .remove(&(resource.into(), namespace.into(), name.into()))?;
    s.rv += 1;
    obj["metadata"]["resourceVersion"] = json!(s.rv.to_string());
    let ev = Event {
        rv: s.rv,
        resource: resource.into(),
        namespace: namespace.into(),
        kind: "DELETED",
        object: obj.clone(),
    };
    s.history.push_back(ev.clone());
    let _ = state.events.send(ev);
    Some(obj)
}

// ---------------------------------------------------------------------------------------------
// Request handling.

fn full(v: impl Into<Bytes>) -> Body {
    Full::new(v.into()).boxed()
}

fn json_response(code: u16, v: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(full(v.to_string()))
        .unwrap_or_else(|_| Response::new(full("")))
}

fn status(code: u16, reason: &str, message: &str) -> Response<Body> {
    json_response(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code}),
    )
}

fn reason_of(code: u16) -> &'static str {
    match code {
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        409 => "Conflict",
        410 => "Expired",
        422 => "Invalid",
        429 => "TooManyRequests",
        503 => "ServiceUnavailable",
        _ => "InternalError",
    }
}

/// What a path names.
struct Target {
    group_version: String,
    resource: String,
    namespace: String,
    name: String,
    subresource: String,
}

fn parse_path(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (gv, rest) = match parts.as_slice() {
        ["apis", g, v, rest @ ..] => (format!("{g}/{v}"), rest),
        ["api", v, rest @ ..] => (v.to_string(), rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (ns.to_string(), rest),
        _ => (String::new(), rest),
    };
    let (resource, name, sub) = match rest {
        [r] => (r, "", ""),
        [r, n] => (r, *n, ""),
        [r, n, s] => (r, *n, *s),
        _ => return None,
    };
    Some(Target {
        group_version: gv,
        resource: resource.to_string(),
        namespace,
        name: name.to_string(),
        subresource: sub.to_string(),
    })
}

fn kind_of(resource: &str) -> Option<(&'static str, &'static str)> {
    match resource {
        "leases" => Some(("Lease", "coordination.k8s.io/v1")),
        "certificatesigningrequests" => {
            Some(("CertificateSigningRequest", "certificates.k8s.io/v1"))
        }
        "tokenreviews" => Some(("TokenReview", "authentication.k8s.io/v1")),
        _ => None,
    }
}

fn query_map(q: Option<&str>) -> HashMap<String, String> {
    form_urlencoded::parse(q.unwrap_or_default().as_bytes())
        .into_owned()
        .collect()
}

/// `k=v`, `k==v`, `k!=v`, `k`, `!k` terms, comma-separated (all must hold).
pub fn labels_match(selector: &str, labels: &Value) -> bool {
    selector
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .all(|term| {
            let get = |k: &str| labels.get(k.trim()).and_then(Value::as_str);
            if let Some((k, v)) = term.split_once("!=") {
                get(k) != Some(v.trim())
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                get(k) == Some(v.trim())
            } else if let Some(k) = term.strip_prefix('!') {
                get(k).is_none()
            } else {
                get(term).is_some()
            }
        })
}

fn fields_match(selector: &str, obj: &Value) -> bool {
    selector.split(',').filter(|t| !t.is_empty()).all(|term| {
        let Some((k, v)) = term.split_once('=') else {
            return false;
        };
        let v = v.trim_start_matches('=');
        match k {
            "metadata.name" => obj["metadata"]["name"].as_str() == Some(v),
            "metadata.namespace" => obj["metadata"]["namespace"].as_str().unwrap_or("") == v,
            _ => false,
        }
    })
}

fn matches_query(q: &HashMap<String, String>, obj: &Value) -> bool {
    q.get("labelSelector")
        .is_none_or(|s| labels_match(s, &obj["metadata"]["labels"]))
        && q.get("fieldSelector").is_none_or(|s| fields_match(s, obj))
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<Body> {
    let delay = *lock(&state.delay);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let user = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .and_then(|t| lock(&state.users).get(t.trim()).cloned());
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query_text = req.uri().query().unwrap_or_default().to_string();
    let query = query_map(req.uri().query());
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return status(400, "BadRequest", "cannot read the body"),
    };
    let Some(t) = parse_path(&path) else {
        return status(404, "NotFound", &format!("no route {path}"));
    };
    let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    let verb = match (&method, t.name.is_empty(), watch) {
        (&Method::GET, _, true) => "watch",
        (&Method::GET, true, false) => "list",
        (&Method::GET, false, false) => "get",
        (&Method::POST, _, _) => "create",
        (&Method::PUT, _, _) | (&Method::PATCH, _, _) => "update",
        (&Method::DELETE, _, _) => "delete",
        _ => "unknown",
    };
    let resource = if t.subresource.is_empty() {
        t.resource.clone()
    } else {
        format!("{}/{}", t.resource, t.subresource)
    };
    let rsp = serve(
        &state,
        &t,
        verb,
        &resource,
        user.as_deref(),
        &query,
        &method,
        &body,
    )
    .await;
    lock(&state.store).log.push(Logged {
        user: user.unwrap_or_default(),
        verb: verb.into(),
        resource,
        name: t.name.clone(),
        query: query_text,
        code: rsp.status().as_u16(),
    });
    rsp
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    state: &Arc<State>,
    t: &Target,
    verb: &str,
    resource: &str,
    user: Option<&str>,
    query: &HashMap<String, String>,
    method: &Method,
    body: &Bytes,
) -> Response<Body> {
    let Some(user) = user else {
        return status(401, "Unauthorized", "Unauthorized");
    };
    let allowed = lock(&state.rights).get(user).is_some_and(|rights| {
        rights
            .iter()
            .any(|(v, r)| (v == "*" || v == verb) && (r == "*" || r == resource))
    });
    if !allowed {
        return status(
            403,
            "Forbidden",
            &format!("User \"{user}\" cannot {verb} resource \"{resource}\""),
        );
    }
    {
        let mut s = lock(&state.store);
        if let Some(f) = s
            .faults
            .iter_mut()
            .find(|f| f.count > 0 && (f.verb == verb || f.verb == "*") && f.resource == t.resource)
        {
            f.count -= 1;
            let code = f.code;
            return status(code, reason_of(code), "injected by the test");
        }
    }
    let Some((kind, api_version)) = kind_of(&t.resource) else {
        return status(
            404,
            "NotFound",
            &format!("the server could not find resource {}", t.resource),
        );
    };
    if api_version != t.group_version {
        return status(404, "NotFound", "wrong group/version");
    }
    let parsed = || serde_json::from_slice::<Value>(body);
    match (t.resource.as_str(), verb) {
        ("tokenreviews", "create") => token_review(state, user, body),
        (_, "list") => list(state, t, kind, api_version, query),
        (_, "watch") => watch(state, t, kind, api_version, query),
        (_, "get") => match state_get(state, t) {
            Some(o) => json_response(200, &o),
            None => status(
                404,
                "NotFound",
                &format!("{} \"{}\" not found", t.resource, t.name),
            ),
        },
        (_, "create") => match parsed() {
            Ok(o) => create(state, t, kind, api_version, user, o),
            Err(e) => status(400, "BadRequest", &format!("body is not JSON: {e}")),
        },
        ("certificatesigningrequests", "update") if t.subresource == "approval" => match parsed() {
            Ok(o) => approval(state, t, o, method),
            Err(e) => status(400, "BadRequest", &format!("body is not JSON: {e}")),
        },
        (_, "update") if t.subresource.is_empty() => match parsed() {
            Ok(o) => update(state, t, o),
            Err(e) => status(400, "BadRequest", &format!("body is not JSON: {e}")),
        },
        (_, "delete") => delete(state, t, body),
        _ => status(405, "MethodNotAllowed", "not supported by the stand-in"),
    }
}

fn state_get(state: &State, t: &Target) -> Option<Value> {
    lock(&state.store)
        .objects
        .get(&(t.resource.clone(), t.namespace.clone(), t.name.clone()))
        .cloned()
}

fn token_review(state: &State, reviewer: &str, body: &Bytes) -> Response<Body> {
    use k8s_openapi::api::authentication::v1::TokenReview;
    let Ok(req) = serde_json::from_slice::<TokenReview>(body) else {
        return status(400, "BadRequest", "not a TokenReview");
    };
    let token = req.spec.token.clone().unwrap_or_default();
    let audiences = req.spec.audiences.clone().unwrap_or_default();
    let mut s = lock(&state.store);
    let hit = s.tokens.get(&token).cloned();
    let common: Vec<String> = hit
        .as_ref()
        .map(|(_, auds)| {
            auds.iter()
                .filter(|a| audiences.contains(a))
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    let authenticated = !common.is_empty();
    s.reviews.push(Review {
        token,
        audiences,
        reviewer: reviewer.into(),
        authenticated,
    });
    let status = match hit {
        Some((user, _)) if authenticated => json!({
            "authenticated": true,
            "user": {"username": user, "uid": "1234", "groups": ["system:serviceaccounts"]},
            "audiences": common,
        }),
        Some(_) => json!({"user": {}, "error": "token audiences are invalid"}),
        None => json!({"user": {}}),
    };
    json_response(
        201,
        &json!({"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
                "metadata": {"creationTimestamp": null}, "spec": {}, "status": status}),
    )
}

fn list(
    state: &State,
    t: &Target,
    kind: &str,
    api_version: &str,
    query: &HashMap<String, String>,
) -> Response<Body> {
    let s = lock(&state.store);
    let items: Vec<Value> = s
        .objects
        .iter()
        .filter(|((r, ns, _), _)| {
            *r == t.resource && (t.namespace.is_empty() || *ns == t.namespace)
        })
        .map(|(_, v)| v)
        .filter(|v| matches_query(query, v))
        .cloned()
        .collect();
    json_response(
        200,
        &json!({"kind": format!("{kind}List"), "apiVersion": api_version,
                "metadata": {"resourceVersion": s.rv.to_string()}, "items": items}),
    )
}

fn line(v: &Value) -> Result<Frame<Bytes>, Infallible> {
    Ok(Frame::data(Bytes::from(format!("{v}\n"))))
}

fn watch(
    state: &Arc<State>,
    t: &Target,
    kind: &str,
    api_version: &str,
    query: &HashMap<String, String>,
) -> Response<Body> {
    let from: Option<u64> = query
        .get("resourceVersion")
        .filter(|v| !v.is_empty() && *v != "0")
        .and_then(|v| v.parse().ok());
    let bookmarks = query
        .get("allowWatchBookmarks")
        .is_some_and(|v| v == "true");
    let asked = query
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(300));
    let length = asked.min(*lock(&state.max_watch));
    let bookmark_every = *lock(&state.bookmark_every);
    let (resource, namespace) = (t.resource.clone(), t.namespace.clone());
    let (kind, api_version) = (kind.to_string(), api_version.to_string());
    let q = query.clone();
    let wanted = move |ev: &Event| {
        ev.resource == resource
            && (namespace.is_empty() || ev.namespace == namespace)
            && matches_query(&q, &ev.object)
    };
    // Subscribe and read the backlog under one lock so no event falls between them.
    let (backlog, mut live, current) = {
        let s = lock(&state.store);
        let live = state.events.subscribe();
        let backlog: Result<Vec<Event>, ()> = match from {
            Some(rv) if rv + 1 < s.compacted_below => Err(()),
            Some(rv) => Ok(s.history.iter().filter(|e| e.rv > rv).cloned().collect()),
            None => Ok(s
                .objects
                .iter()
                .filter(|((r, _, _), _)| *r == t.resource)
                .map(|((r, ns, _), o)| Event {
                    rv: s.rv,
                    resource: r.clone(),
                    namespace: ns.clone(),
                    kind: "ADDED",
                    object: o.clone(),
                })
                .collect()),
        };
        (backlog, live, s.rv)
    };
    let backlog = match backlog {
        Ok(b) => b,
        Err(()) => {
            let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
                "metadata": {}, "status": "Failure", "message": "too old resource version",
                "reason": "Expired", "code": 410}});
            let body = StreamBody::new(futures::stream::iter([line(&gone)]));
            return Response::builder()
                .status(200)
                .header("content-type", "application/json")
                .body(BodyExt::boxed(body))
                .unwrap_or_else(|_| Response::new(full("")));
        }
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Value>(256);
    tokio::spawn(async move {
        for ev in backlog.iter().filter(|e| wanted(e)) {
            if tx.send(ev.to_json()).await.is_err() {
                return;
            }
        }
        let end = tokio::time::sleep(length);
        let mut end = std::pin::pin!(end);
        let mut tick = tokio::time::interval(bookmark_every);
        tick.tick().await;
        let mut last_rv = current;
        loop {
            let next = tokio::select! {
                _ = &mut end => return,
                _ = tick.tick(), if bookmarks => json!({"type": "BOOKMARK", "object": {
                    "kind": kind, "apiVersion": api_version,
                    "metadata": {"resourceVersion": last_rv.to_string()}}}),
                ev = live.recv() => match ev {
                    Ok(ev) => {
                        last_rv = last_rv.max(ev.rv);
                        if !wanted(&ev) {
                            continue;
                        }
                        ev.to_json()
                    }
                    // A watcher too slow to keep up is cut off, as the API server does.
                    Err(_) => return,
                }
            };
            if tx.send(next).await.is_err() {
                return;
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(|v| line(&v));
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap_or_else(|_| Response::new(full("")))
}

impl Event {
    fn to_json(&self) -> Value {
        json!({"type": self.kind, "object": self.object})
    }
}

fn create(
    state: &State,
    t: &Target,
    kind: &str,
    api_version: &str,
    user: &str,
    mut obj: Value,
) -> Response<Body> {
    let name = match obj["metadata"]["name"].as_str() {
        Some(n) if !n.is_empty() => n.to_string(),
        _ => match obj["metadata"]["generateName"].as_str() {
            Some(p) => format!("{p}{:05x}", rand::random::<u32>() & 0xfffff),
            None => return status(422, "Invalid", "metadata.name is required"),
        },
    };
    let mut s = lock(&state.store);
    let key = (t.resource.clone(), t.namespace.clone(), name.clone());
    if s.objects.contains_key(&key) {
        return status(
            409,
            "AlreadyExists",
            &format!("{} \"{name}\" already exists", t.resource),
        );
    }
    obj["kind"] = json!(kind);
    obj["apiVersion"] = json!(api_version);
    obj["metadata"]["name"] = json!(name);
    obj["metadata"]["uid"] = json!(format!("uid-{:08x}", rand::random::<u32>()));
    obj["metadata"]["creationTimestamp"] = json!(now_rfc3339());
    if !t.namespace.is_empty() {
        obj["metadata"]["namespace"] = json!(t.namespace);
    }
    if t.resource == "certificatesigningrequests" {
        obj["spec"]["username"] = json!(user);
        obj["spec"]["groups"] = json!(["system:serviceaccounts", "system:authenticated"]);
        obj["status"] = json!({});
    }
    commit(
        state,
        &mut s,
        &t.resource,
        &t.namespace,
        &name,
        &mut obj,
        "ADDED",
    );
    json_response(201, &obj)
}

fn update(state: &State, t: &Target, mut obj: Value) -> Response<Body> {
    let mut s = lock(&state.store);
    let key = (t.resource.clone(), t.namespace.clone(), t.name.clone());
    let Some(current) = s.objects.get(&key).cloned() else {
        return status(
            404,
            "NotFound",
            &format!("{} \"{}\" not found", t.resource, t.name),
        );
    };
    let sent = obj["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default();
    if !sent.is_empty() && Some(sent) != current["metadata"]["resourceVersion"].as_str() {
        return status(
            409,
            "Conflict",
            &format!(
                "Operation cannot be fulfilled on {} \"{}\": the object has been modified; please apply your changes to the latest version and try again",
                t.resource, t.name
            ),
        );
    }
    for keep in ["uid", "creationTimestamp", "namespace", "name"] {
        obj["metadata"][keep] = current["metadata"][keep].clone();
    }
    obj["kind"] = current["kind"].clone();
    obj["apiVersion"] = current["apiVersion"].clone();
    if t.resource == "certificatesigningrequests" {
        obj["spec"] = current["spec"].clone();
        obj["status"] = current["status"].clone();
    }
    commit(
        state,
        &mut s,
        &t.resource,
        &t.namespace,
        &t.name,
        &mut obj,
        "MODIFIED",
    );
    json_response(200, &obj)
}

fn approval(state: &Arc<State>, t: &Target, obj: Value, method: &Method) -> Response<Body> {
    if method != Method::PUT {
        return status(
            405,
            "MethodNotAllowed",
            "the stand-in takes approvals by PUT",
        );
    }
    let mut s = lock(&state.store);
    let key = (t.resource.clone(), String::new(), t.name.clone());
    let Some(mut current) = s.objects.get(&key).cloned() else {
        return status(
            404,
            "NotFound",
            &format!("certificatesigningrequests \"{}\" not found", t.name),
        );
    };
    let sent = obj["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default();
    if !sent.is_empty() && Some(sent) != current["metadata"]["resourceVersion"].as_str() {
        return status(409, "Conflict", "the object has been modified");
    }
    let conds = obj["status"]["conditions"].clone();
    let both = conds.as_array().is_some_and(|cs| {
        cs.iter().any(|c| c["type"] == "Approved") && cs.iter().any(|c| c["type"] == "Denied")
    });
    if both {
        return status(
            422,
            "Invalid",
            "Approved and Denied conditions are mutually exclusive",
        );
    }
    if !current["status"].is_object() {
        current["status"] = json!({});
    }
    current["status"]["conditions"] = conds;
    commit(
        state,
        &mut s,
        &t.resource,
        "",
        &t.name,
        &mut current,
        "MODIFIED",
    );
    drop(s);
    let name = t.name.clone();
    let st = state.clone();
    // The signer acts after the approval is recorded, as kube-controller-manager does.
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        sign_if_approved(&st, &name);
    });
    json_response(200, &current)
}

/// Issues (or fails) an approved, not yet issued CSR of the signer's name.
fn sign_if_approved(state: &State, name: &str) {
    let signer = lock(&state.signer);
    let Some(signer) = signer.as_ref() else {
        return;
    };
    let mut s = lock(&state.store);
    let key = (
        "certificatesigningrequests".to_string(),
        String::new(),
        name.to_string(),
    );
    let Some(mut csr) = s.objects.get(&key).cloned() else {
        return;
    };
    let conds = csr["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let approved = conds.iter().any(|c| c["type"] == "Approved");
    let closed = conds
        .iter()
        .any(|c| c["type"] == "Denied" || c["type"] == "Failed");
    let issued = csr["status"]["certificate"]
        .as_str()
        .is_some_and(|c| !c.is_empty());
    if !approved || closed || issued || csr["spec"]["signerName"].as_str() != Some(&signer.name) {
        return;
    }
    if signer.fail {
        add_condition(&mut csr, "Failed", "SignerFailed");
    } else {
        match issue(signer, &csr) {
            Ok(pem) => {
                use base64::Engine;
                let b64 = base64::engine::general_purpose::STANDARD.encode(pem.as_bytes());
                csr["status"]["certificate"] = json!(b64);
            }
            Err(e) => {
                add_condition(&mut csr, "Failed", &format!("SignerError: {e}"));
            }
        }
    }
    commit(
        state,
        &mut s,
        "certificatesigningrequests",
        "",
        name,
        &mut csr,
        "MODIFIED",
    );
}

fn issue(signer: &Signer, csr: &Value) -> Result<String, String> {
    use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
    let typed: CertificateSigningRequest =
        serde_json::from_value(csr.clone()).map_err(|e| e.to_string())?;
    let pem = String::from_utf8(typed.spec.request.0).map_err(|e| e.to_string())?;
    let mut params =
        rcgen::CertificateSigningRequestParams::from_pem(&pem).map_err(|e| e.to_string())?;
    let now = time::OffsetDateTime::now_utc();
    params.params.not_before = now - time::Duration::seconds(5);
    params.params.not_after = now + time::Duration::seconds(signer.lifetime.as_secs() as i64);
    params.params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    let cert = params
        .signed_by(&signer.issuer)
        .map_err(|e| e.to_string())?;
    Ok(format!("{}{}", cert.pem(), signer.ca_pem))
}

fn delete(state: &State, t: &Target, body: &Bytes) -> Response<Body> {
    let mut s = lock(&state.store);
    let key = (t.resource.clone(), t.namespace.clone(), t.name.clone());
    let Some(current) = s.objects.get(&key).cloned() else {
        return status(
            404,
            "NotFound",
            &format!("{} \"{}\" not found", t.resource, t.name),
        );
    };
    let opts: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    if let Some(rv) = opts["preconditions"]["resourceVersion"].as_str() {
        if Some(rv) != current["metadata"]["resourceVersion"].as_str() {
            return status(
                409,
                "Conflict",
                &format!("Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}", current["metadata"]["resourceVersion"]),
            );
        }
    }
    let obj = remove(state, &mut s, &t.resource, &t.namespace, &t.name).unwrap_or(current);
    json_response(200, &obj)
}

/// A signer CA for [`Signer`]: its issuer and certificate PEM (written to `dir/name.crt`).
pub fn signer_ca(
    dir: &Path,
    name: &str,
) -> (rcgen::Issuer<'static, rcgen::KeyPair>, String, PathBuf) {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("stand-in signer {name}"));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let key = rcgen::KeyPair::generate().expect("CA key");
    let pem = params.self_signed(&key).expect("self-sign").pem();
    let path = dir.join(format!("{name}.crt"));
    std::fs::write(&path, &pem).expect("write signer CA");
    (rcgen::Issuer::new(params, key), pem, path)
}
