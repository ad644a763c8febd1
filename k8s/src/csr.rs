//! Agent client certificates from the CertificateSigningRequest API (kubelet-style TLS
//! bootstrapping), and the opt-in approver that runs in spoke-server.
//!
//! Agent ([`CertManager`]): with a bootstrap credential and `--cert-dir`, the agent makes an
//! ECDSA P-256 key and a CSR (`CN=system:konnectivity-agent:<agent-id>`, usages digital
//! signature + client auth, signer `kubernetes.io/kube-apiserver-client` unless configured),
//! named after the agent and its key so a restart finds its own pending CSR instead of making
//! another. It waits (get, then a watch of that one object; bounded) for approval and the
//! issued certificate, and stores key and certificate in one PEM file under `--cert-dir`
//! (written to a temporary file with mode 0600, synced, renamed), which the agent's TLS already
//! re-reads every 5 s. It renews at a random 70–90 % of the certificate's lifetime; a tunnel
//! is never dropped for it (new handshakes use the new certificate). A denied or failed CSR,
//! a CSR never approved within the bound, or a `--cert-dir` that cannot be written leave the
//! last valid certificate in use, are logged with the reason, counted, and retried with a
//! backoff. The agent needs `create`, `get` and `watch` on CSRs, nothing more.
//!
//! Approver ([`Approver`]): approves a pending CSR for the configured signer only when it comes
//! from the agents' service account, asks for exactly `CN=system:konnectivity-agent:<id>`
//! (nothing else in the subject, no SANs), an ECDSA P-256 key with a valid self-signature and
//! client-auth usage (digital signature / key encipherment allowed besides), and is the only
//! pending CSR of that agent (older duplicates are denied). CSRs of other requesters or signers
//! are left alone; ours that fail a check are denied with the reason.
use anyhow::{anyhow, bail, Context, Result};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestCondition, CertificateSigningRequestSpec,
    CertificateSigningRequestStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use k8s_openapi::ByteString;
use kube::api::{Api, PostParams, WatchEvent, WatchParams};
use kube::runtime::{watcher, WatchStreamExt};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rand::Rng;
use sha2::Digest;
use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;

/// kube-apiserver client certificates (kube-controller-manager's signer).
pub const DEFAULT_SIGNER: &str = "kubernetes.io/kube-apiserver-client";
/// The subject every agent asks for; the agent ID follows.
pub const CN_PREFIX: &str = "system:konnectivity-agent:";
/// Key and certificate in use (PEM: certificate chain, then the key), mode 0600.
pub const CURRENT_FILE: &str = "spoke-agent-client-current.pem";
/// Key of the CSR in flight, kept so a restart finds its CSR again, mode 0600.
pub const PENDING_KEY_FILE: &str = "spoke-agent-client-pending.key";
const USAGES: [&str; 2] = ["digital signature", "client auth"];
const ALLOWED_USAGES: [&str; 3] = ["digital signature", "key encipherment", "client auth"];
/// Longest one watch request of the CSR lasts before it is re-read.
const WATCH_SLICE: Duration = Duration::from_secs(60);
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_CAP: Duration = Duration::from_secs(60);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

/// `spoke_agent_client_certificate_*`.
#[derive(Clone, Debug, Default)]
pub struct CertMetrics {
    /// notAfter of the certificate in use, Unix seconds.
    pub expiry: Gauge,
    pub renewals: Counter,
    pub failures: Family<ReasonLabel, Counter>,
}

impl CertMetrics {
    /// Registers under the caller's `spoke_agent` prefix.
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "client_certificate_expiration_timestamp_seconds",
            "notAfter of the client certificate from the CSR API in use, as Unix seconds",
            self.expiry.clone(),
        );
        r.register(
            "client_certificate_renewals",
            "Client certificates obtained from the CSR API (first one and renewals)",
            self.renewals.clone(),
        );
        r.register(
            "client_certificate_failures",
            "Failed attempts to obtain a client certificate from the CSR API, by reason (denied, failed, timeout, api, write, invalid)",
            self.failures.clone(),
        );
    }
}

/// Why one attempt to obtain a certificate did not give one.
#[derive(Debug)]
pub enum CsrError {
    Denied(String),
    Failed(String),
    Timeout(Duration),
    Api(String),
    Write(String),
    Invalid(String),
}

impl CsrError {
    pub fn reason(&self) -> &'static str {
        match self {
            CsrError::Denied(_) => "denied",
            CsrError::Failed(_) => "failed",
            CsrError::Timeout(_) => "timeout",
            CsrError::Api(_) => "api",
            CsrError::Write(_) => "write",
            CsrError::Invalid(_) => "invalid",
        }
    }
}

impl std::fmt::Display for CsrError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CsrError::Denied(m) => write!(f, "the CSR was denied: {m}"),
            CsrError::Failed(m) => write!(f, "the signer failed the CSR: {m}"),
            CsrError::Timeout(d) => write!(
                f,
                "the CSR was not approved and issued within {d:?} (is an approver running?)"
            ),
            CsrError::Api(m) => write!(f, "CSR API: {m}"),
            CsrError::Write(m) => write!(f, "cannot store the certificate: {m}"),
            CsrError::Invalid(m) => write!(f, "the issued certificate cannot be used: {m}"),
        }
    }
}

/// What the agent asks for.
#[derive(Debug, Clone)]
pub struct CertConfig {
    pub cert_dir: PathBuf,
    pub agent_id: String,
    pub signer: String,
    /// `spec.expirationSeconds` (None: the signer's default).
    pub expiration: Option<Duration>,
    /// Bound on one wait for approval and issuance.
    pub approval_timeout: Duration,
}

/// A stored certificate's validity.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    pub not_before: i64,
    pub not_after: i64,
}

impl Validity {
    fn now() -> i64 {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)
    }

    pub fn is_current(&self) -> bool {
        let now = Self::now();
        self.not_before <= now + 60 && now < self.not_after
    }

    /// When to renew: a random 70–90 % of the lifetime after notBefore (now if past).
    pub fn renew_in(&self) -> Duration {
        let life = (self.not_after - self.not_before).max(0) as f64;
        let at = self.not_before as f64 + life * rand::rng().random_range(0.7..0.9);
        Duration::from_secs_f64((at - Self::now() as f64).max(0.0))
    }
}

/// Obtains, stores and renews the agent's client certificate.
pub struct CertManager {
    api: Api<CertificateSigningRequest>,
    cfg: CertConfig,
    metrics: CertMetrics,
}

impl CertManager {
    pub fn new(client: kube::Client, cfg: CertConfig, metrics: CertMetrics) -> Self {
        Self {
            api: Api::all(client),
            cfg,
            metrics,
        }
    }

    /// The file the agent's TLS uses as both certificate and key.
    pub fn current_path(cert_dir: &Path) -> PathBuf {
        cert_dir.join(CURRENT_FILE)
    }

    /// Creates `--cert-dir` (0700) if needed and checks that it can be written.
    pub fn prepare_dir(cert_dir: &Path) -> Result<()> {
        std::fs::create_dir_all(cert_dir)
            .with_context(|| format!("--cert-dir {}: cannot create it", cert_dir.display()))?;
        let probe = cert_dir.join(format!(".spoke-write-test-{}", std::process::id()));
        write_private(&probe, b"")
            .with_context(|| format!("--cert-dir {}: cannot be written", cert_dir.display()))?;
        let _ = std::fs::remove_file(&probe);
        Ok(())
    }

    /// The stored certificate's validity when it is usable (parses, key matches, not expired).
    pub fn stored(cert_dir: &Path) -> Option<Validity> {
        let pem = std::fs::read_to_string(Self::current_path(cert_dir)).ok()?;
        match check_pair(&pem) {
            Ok(v) if v.is_current() => Some(v),
            Ok(_) => {
                tracing::info!(dir = %cert_dir.display(), "stored client certificate has expired");
                None
            }
            Err(e) => {
                tracing::warn!(dir = %cert_dir.display(), "stored client certificate cannot be used: {e:#}");
                None
            }
        }
    }

    /// Until a valid certificate is stored: the stored one if still valid, else CSRs, retried
    /// with a backoff (each failure logged and counted). Returns its validity.
    pub async fn ensure(&self, stop: &CancellationToken) -> Option<Validity> {
        if let Some(v) = Self::stored(&self.cfg.cert_dir) {
            tracing::info!(
                not_after = v.not_after,
                "using the stored client certificate"
            );
            self.metrics.expiry.set(v.not_after);
            return Some(v);
        }
        self.obtain(stop).await
    }

    /// Renews before expiry, forever (until `stop`).
    pub async fn renew_forever(&self, mut current: Validity, stop: CancellationToken) {
        loop {
            let wait = current.renew_in();
            tracing::info!(renew_in = ?wait, not_after = current.not_after, "client certificate renewal scheduled");
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            match self.obtain(&stop).await {
                Some(v) => current = v,
                None => return,
            }
        }
    }

    /// One certificate, retrying failed attempts with a backoff; `None` only when stopped.
    async fn obtain(&self, stop: &CancellationToken) -> Option<Validity> {
        let mut retry = RETRY_FIRST;
        loop {
            match self.request().await {
                Ok(v) => {
                    self.metrics.renewals.inc();
                    self.metrics.expiry.set(v.not_after);
                    tracing::info!(
                        not_after = v.not_after,
                        "client certificate obtained from the CSR API and stored"
                    );
                    return Some(v);
                }
                Err(e) => {
                    self.metrics
                        .failures
                        .get_or_create(&ReasonLabel { reason: e.reason() })
                        .inc();
                    let still = Self::stored(&self.cfg.cert_dir)
                        .map(|v| {
                            format!(
                                "the current certificate (valid until {}) stays in use",
                                v.not_after
                            )
                        })
                        .unwrap_or_else(|| {
                            "no valid certificate yet: no tunnel can be opened".into()
                        });
                    tracing::error!(reason = e.reason(), retry_in = ?retry, "cannot obtain a client certificate: {e}; {still}");
                    tokio::select! {
                        _ = stop.cancelled() => return None,
                        _ = tokio::time::sleep(retry) => {}
                    }
                    retry = (retry * 2).min(RETRY_CAP);
                }
            }
        }
    }

    /// One CSR: pending key (kept or new), CSR (created or found), wait, store.
    pub async fn request(&self) -> Result<Validity, CsrError> {
        let dir = &self.cfg.cert_dir;
        let key = self
            .pending_key()
            .map_err(|e| CsrError::Write(format!("{e:#}")))?;
        let name = csr_name(&self.cfg.agent_id, &key);
        let csr = self.csr_object(&name, &key)?;
        let created = match self.api.create(&PostParams::default(), &csr).await {
            Ok(c) => {
                tracing::info!(csr = %name, signer = %self.cfg.signer, "CertificateSigningRequest created");
                c
            }
            Err(e) if crate::is_status(&e, 409) => {
                tracing::info!(csr = %name, "CertificateSigningRequest for this key exists already: waiting for it");
                self.api
                    .get(&name)
                    .await
                    .map_err(|e| CsrError::Api(format!("get {name}: {}", crate::error_chain(&e))))?
            }
            Err(e) => {
                return Err(CsrError::Api(format!(
                    "create {name}: {}",
                    crate::error_chain(&e)
                )))
            }
        };
        let cert_pem = match self.wait_issued(&name, created).await {
            Ok(pem) => pem,
            Err(e @ (CsrError::Denied(_) | CsrError::Failed(_))) => {
                // That CSR is closed: the next attempt makes a new key and a new CSR.
                let _ = std::fs::remove_file(dir.join(PENDING_KEY_FILE));
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        let pem = format!("{}\n{}", cert_pem.trim_end(), key.serialize_pem());
        let validity = check_pair(&pem).map_err(|e| CsrError::Invalid(format!("{e:#}")))?;
        write_private(&Self::current_path(dir), pem.as_bytes())
            .map_err(|e| CsrError::Write(format!("{}: {e:#}", dir.display())))?;
        let _ = std::fs::remove_file(dir.join(PENDING_KEY_FILE));
        Ok(validity)
    }

    /// The key of the CSR in flight: the stored pending key, or a new one stored first.
    fn pending_key(&self) -> Result<rcgen::KeyPair> {
        let path = self.cfg.cert_dir.join(PENDING_KEY_FILE);
        if let Ok(pem) = std::fs::read_to_string(&path) {
            match rcgen::KeyPair::from_pem(&pem) {
                Ok(k) => return Ok(k),
                Err(e) => {
                    tracing::warn!(path = %path.display(), "pending key unreadable ({e}): making a new one")
                }
            }
        }
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| anyhow!("cannot generate a key: {e}"))?;
        write_private(&path, key.serialize_pem().as_bytes())?;
        Ok(key)
    }

    fn csr_object(
        &self,
        name: &str,
        key: &rcgen::KeyPair,
    ) -> Result<CertificateSigningRequest, CsrError> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
            .map_err(|e| CsrError::Invalid(e.to_string()))?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("{CN_PREFIX}{}", self.cfg.agent_id),
        );
        let request = params
            .serialize_request(key)
            .and_then(|r| r.pem())
            .map_err(|e| CsrError::Invalid(format!("cannot encode the CSR: {e}")))?;
        Ok(CertificateSigningRequest {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                labels: Some(
                    [(
                        "app.kubernetes.io/name".to_string(),
                        "spoke-agent".to_string(),
                    )]
                    .into(),
                ),
                ..Default::default()
            },
            spec: CertificateSigningRequestSpec {
                request: ByteString(request.into_bytes()),
                signer_name: self.cfg.signer.clone(),
                usages: Some(USAGES.iter().map(|u| u.to_string()).collect()),
                expiration_seconds: self
                    .cfg
                    .expiration
                    .map(|d| d.as_secs().clamp(600, i32::MAX as u64) as i32),
                ..Default::default()
            },
            status: None,
        })
    }

    /// Waits for the certificate (or a denial), bounded by the approval timeout.
    async fn wait_issued(
        &self,
        name: &str,
        mut csr: CertificateSigningRequest,
    ) -> Result<String, CsrError> {
        let deadline = tokio::time::Instant::now() + self.cfg.approval_timeout;
        loop {
            if let Some(pem) = outcome(&csr)? {
                return Ok(pem);
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(CsrError::Timeout(self.cfg.approval_timeout));
            }
            let rv = csr.metadata.resource_version.clone().unwrap_or_default();
            let slice = (deadline - now).min(WATCH_SLICE);
            let wp = WatchParams::default()
                .fields(&format!("metadata.name={name}"))
                .timeout(slice.as_secs().max(1) as u32);
            let watched = tokio::time::timeout(slice, async {
                let stream = self.api.watch(&wp, &rv).await?;
                let mut stream = std::pin::pin!(stream);
                while let Some(ev) = stream.try_next().await? {
                    match ev {
                        WatchEvent::Added(c) | WatchEvent::Modified(c) => {
                            if outcome(&c).map(|o| o.is_some()).unwrap_or(true) {
                                return Ok(Some(c));
                            }
                            csr = c;
                        }
                        WatchEvent::Deleted(_) => return Ok(None),
                        WatchEvent::Bookmark(_) => {}
                        WatchEvent::Error(s) => {
                            tracing::debug!(csr = name, "CSR watch ended: {}", s.message);
                            break;
                        }
                    }
                }
                Ok::<_, kube::Error>(Some(csr.clone()))
            })
            .await;
            csr = match watched {
                Ok(Ok(Some(c))) => c,
                Ok(Ok(None)) => {
                    return Err(CsrError::Failed(format!(
                        "CSR {name} was deleted before it was issued"
                    )))
                }
                Ok(Err(e)) => {
                    tracing::debug!(
                        csr = name,
                        "CSR watch failed: {}; reading it again",
                        crate::error_chain(&e)
                    );
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    self.api.get(name).await.map_err(|e| {
                        CsrError::Api(format!("get {name}: {}", crate::error_chain(&e)))
                    })?
                }
                Err(_) => self.api.get(name).await.map_err(|e| {
                    CsrError::Api(format!("get {name}: {}", crate::error_chain(&e)))
                })?,
            };
        }
    }
}

/// `Ok(Some(pem))` once issued, `Ok(None)` while pending, `Err` when denied or failed.
fn outcome(csr: &CertificateSigningRequest) -> Result<Option<String>, CsrError> {
    let status = csr.status.as_ref();
    for c in status
        .and_then(|s| s.conditions.as_deref())
        .unwrap_or_default()
    {
        let why = || {
            format!(
                "{}: {}",
                c.reason.as_deref().unwrap_or("no reason"),
                c.message.as_deref().unwrap_or("no message")
            )
        };
        match c.type_.as_str() {
            "Denied" if c.status == "True" => return Err(CsrError::Denied(why())),
            "Failed" if c.status == "True" => return Err(CsrError::Failed(why())),
            _ => {}
        }
    }
    match status.and_then(|s| s.certificate.as_ref()) {
        Some(ByteString(pem)) if !pem.is_empty() => String::from_utf8(pem.clone())
            .map(Some)
            .map_err(|_| CsrError::Invalid("status.certificate is not PEM text".into())),
        _ => Ok(None),
    }
}

/// `spoke-agent-<agent id>-<first 10 hex digits of the key's SHA-256>`, a valid object name.
fn csr_name(agent_id: &str, key: &rcgen::KeyPair) -> String {
    let mut id: String = agent_id
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    id.truncate(200);
    let id = id.trim_matches(|c| c == '-' || c == '.');
    let hash = sha2::Sha256::digest(rcgen::PublicKeyData::subject_public_key_info(key));
    let hex: String = hash.iter().take(5).map(|b| format!("{b:02x}")).collect();
    format!("spoke-agent-{id}-{hex}")
}

/// Parses a PEM with a certificate chain and a key, checks they belong together, and returns
/// the leaf's validity.
pub fn check_pair(pem: &str) -> Result<Validity> {
    let blocks: Vec<_> = ::x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .filter_map(Result::ok)
        .collect();
    let key = blocks
        .iter()
        .find(|p| p.label == "PRIVATE KEY")
        .ok_or_else(|| anyhow!("no PRIVATE KEY block"))?;
    let key = rcgen::KeyPair::try_from(key.contents.as_slice())
        .map_err(|e| anyhow!("no usable private key: {e}"))?;
    let block = blocks
        .iter()
        .find(|p| p.label == "CERTIFICATE")
        .ok_or_else(|| anyhow!("no certificate"))?;
    let (_, cert) = ::x509_parser::parse_x509_certificate(&block.contents)
        .map_err(|e| anyhow!("certificate does not parse: {e}"))?;
    if cert.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice() {
        bail!("the certificate is not for the stored key");
    }
    Ok(Validity {
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// Writes `data` to `path` atomically with mode 0600 (temporary file, sync, rename).
pub fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        rand::rng().random::<u32>()
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot write {}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// Approver.

/// Whom the approver approves.
#[derive(Debug, Clone)]
pub struct ApproverConfig {
    pub signer: String,
    pub namespace: String,
    pub service_account: String,
}

/// `spoke_server_agent_csr_decisions_total{result}`.
#[derive(Clone, Debug, Default)]
pub struct ApproverMetrics {
    pub decisions: Family<ResultLabel, Counter>,
}

impl ApproverMetrics {
    /// Registers under the caller's `spoke_server` prefix.
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "agent_csr_decisions",
            "Agent CertificateSigningRequests approved or denied by the approver, by result",
            self.decisions.clone(),
        );
    }
}

pub struct Approver {
    api: Api<CertificateSigningRequest>,
    cfg: ApproverConfig,
    metrics: ApproverMetrics,
}

/// What the approver makes of a CSR.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not ours to judge (other signer or requester, or decided already).
    Ignore,
    /// Ours and well-formed, for this agent (the CN).
    Good(String),
    /// Ours and wrong.
    Bad(String),
}

impl Approver {
    pub fn new(client: kube::Client, cfg: ApproverConfig, metrics: ApproverMetrics) -> Self {
        Self {
            api: Api::all(client),
            cfg,
            metrics,
        }
    }

    fn requester(&self) -> String {
        format!(
            "system:serviceaccount:{}:{}",
            self.cfg.namespace, self.cfg.service_account
        )
    }

    /// Judges one CSR (pure: no API calls).
    pub fn judge(&self, csr: &CertificateSigningRequest) -> Verdict {
        let spec = &csr.spec;
        if spec.signer_name != self.cfg.signer
            || spec.username.as_deref() != Some(self.requester().as_str())
            || decided(csr)
        {
            return Verdict::Ignore;
        }
        let usages = spec.usages.clone().unwrap_or_default();
        if !usages.iter().any(|u| u == "client auth") {
            return Verdict::Bad("usages must include client auth".into());
        }
        if let Some(u) = usages
            .iter()
            .find(|u| !ALLOWED_USAGES.contains(&u.as_str()))
        {
            return Verdict::Bad(format!("usage {u:?} is not allowed"));
        }
        match check_request(&spec.request.0) {
            Ok(cn) => Verdict::Good(cn),
            Err(e) => Verdict::Bad(format!("{e:#}")),
        }
    }

    /// Watches CSRs and decides on them until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        tracing::info!(signer = %self.cfg.signer, requester = %self.requester(), "approving agent CSRs");
        let events = watcher(self.api.clone(), watcher::Config::default())
            .default_backoff()
            .applied_objects();
        let mut events = std::pin::pin!(events);
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => return,
                n = events.next() => n,
            };
            match next {
                None => return,
                Some(Ok(csr)) => self.consider(csr).await,
                Some(Err(e)) => tracing::warn!(
                    "CSR watch failed (retrying with backoff): {}",
                    crate::error_chain(&e)
                ),
            }
        }
    }

    async fn consider(&self, csr: CertificateSigningRequest) {
        let Some(name) = csr.metadata.name.clone() else {
            return;
        };
        match self.judge(&csr) {
            Verdict::Ignore => {}
            Verdict::Bad(why) => self.decide(&csr, &name, false, &why).await,
            Verdict::Good(cn) => {
                // At most one pending CSR per agent: a newer pending one of the same agent wins.
                match self.newer_pending_of(&cn, &csr).await {
                    Ok(Some(newer)) => {
                        self.decide(
                            &csr,
                            &name,
                            false,
                            &format!("agent {cn} has a newer pending CSR {newer}"),
                        )
                        .await
                    }
                    Ok(None) => {
                        self.decide(
                            &csr,
                            &name,
                            true,
                            &format!(
                                "agent {cn}: service account, subject, key and usages checked"
                            ),
                        )
                        .await
                    }
                    Err(e) => {
                        tracing::warn!(csr = %name, "cannot list pending CSRs: {e:#}; deciding later")
                    }
                }
            }
        }
    }

    async fn newer_pending_of(
        &self,
        cn: &str,
        csr: &CertificateSigningRequest,
    ) -> Result<Option<String>> {
        let all = self.api.list(&Default::default()).await?;
        let created = |c: &CertificateSigningRequest| {
            (
                c.metadata.creation_timestamp.as_ref().map(|t| t.0),
                c.metadata.name.clone(),
            )
        };
        let mine = created(csr);
        Ok(all
            .items
            .iter()
            .filter(|c| c.metadata.name != csr.metadata.name)
            .filter(|c| matches!(self.judge(c), Verdict::Good(ref other) if other == cn))
            .filter(|c| created(c) > mine)
            .find_map(|c| c.metadata.name.clone()))
    }

    async fn decide(&self, csr: &CertificateSigningRequest, name: &str, approve: bool, why: &str) {
        let (type_, reason, result) = match approve {
            true => ("Approved", "SpokeAgentApprove", "approved"),
            false => ("Denied", "SpokeAgentDeny", "denied"),
        };
        let mut updated = csr.clone();
        let status = updated
            .status
            .get_or_insert_with(CertificateSigningRequestStatus::default);
        status
            .conditions
            .get_or_insert_with(Vec::new)
            .push(CertificateSigningRequestCondition {
                type_: type_.into(),
                status: "True".into(),
                reason: Some(reason.into()),
                message: Some(why.into()),
                last_update_time: Some(Time(Timestamp::now())),
                last_transition_time: None,
            });
        match self
            .api
            .replace_subresource("approval", name, &PostParams::default(), &updated)
            .await
        {
            Ok(_) => {
                self.metrics
                    .decisions
                    .get_or_create(&ResultLabel { result })
                    .inc();
                tracing::info!(csr = name, result, "agent CSR {result}: {why}");
            }
            Err(e) => tracing::warn!(
                csr = name,
                "cannot record the decision ({result}: {why}): {}",
                crate::error_chain(&e)
            ),
        }
    }
}

fn decided(csr: &CertificateSigningRequest) -> bool {
    csr.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| matches!(c.type_.as_str(), "Approved" | "Denied" | "Failed"))
        })
}

/// Checks a CSR's PEM: valid self-signature, ECDSA P-256 key, subject exactly
/// `CN=system:konnectivity-agent:<id>`, no extensions. Returns the CN.
pub fn check_request(pem: &[u8]) -> Result<String> {
    use ::x509_parser::certification_request::X509CertificationRequest;
    use ::x509_parser::prelude::FromDer;
    use ::x509_parser::public_key::PublicKey;
    let (_, block) =
        ::x509_parser::pem::parse_x509_pem(pem).map_err(|e| anyhow!("request is not PEM: {e}"))?;
    if block.label != "CERTIFICATE REQUEST" {
        bail!(
            "request is a {:?} PEM block, not a CERTIFICATE REQUEST",
            block.label
        );
    }
    let (_, req) = X509CertificationRequest::from_der(&block.contents)
        .map_err(|e| anyhow!("request does not parse: {e}"))?;
    req.verify_signature()
        .map_err(|e| anyhow!("request signature does not verify: {e}"))?;
    let info = &req.certification_request_info;
    match info.subject_pki.parsed() {
        Ok(PublicKey::EC(p)) if p.key_size() == 256 => {}
        Ok(_) | Err(_) => bail!("key must be ECDSA P-256"),
    }
    let curve = info
        .subject_pki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    if curve != Some(::x509_parser::oid_registry::OID_EC_P256) {
        bail!("key must be ECDSA P-256");
    }
    let attrs: Vec<_> = info.subject.iter_attributes().collect();
    let [attr] = attrs.as_slice() else {
        bail!(
            "subject must be exactly CN={CN_PREFIX}<agent id>, got {}",
            info.subject
        );
    };
    if attr.attr_type() != &::x509_parser::oid_registry::OID_X509_COMMON_NAME {
        bail!(
            "subject must be exactly CN={CN_PREFIX}<agent id>, got {}",
            info.subject
        );
    }
    let cn = attr
        .as_str()
        .map_err(|_| anyhow!("subject CN is not a string"))?;
    let Some(id) = cn.strip_prefix(CN_PREFIX) else {
        bail!("subject CN {cn:?} must start with {CN_PREFIX:?}");
    };
    if id.is_empty() {
        bail!("subject CN {cn:?} names no agent");
    }
    if req
        .requested_extensions()
        .is_some_and(|mut e| e.next().is_some())
    {
        bail!("request must not ask for extensions (SANs, CA, ...)");
    }
    Ok(cn.to_string())
}

/// Pending CSRs per agent CN, for tests and status.
pub fn pending_by_agent(csrs: &[CertificateSigningRequest]) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for c in csrs.iter().filter(|c| !decided(c)) {
        if let Ok(cn) = check_request(&c.spec.request.0) {
            *out.entry(cn).or_insert(0) += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(cn: &str, key: &rcgen::KeyPair, sans: Vec<String>) -> String {
        let mut p = rcgen::CertificateParams::new(sans).expect("params");
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p.serialize_request(key).and_then(|r| r.pem()).expect("csr")
    }

    #[test]
    fn request_checks() {
        let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let good = request("system:konnectivity-agent:node-1", &ec, vec![]);
        assert_eq!(
            check_request(good.as_bytes()).expect("good"),
            "system:konnectivity-agent:node-1"
        );
        let other_cn = request("system:node:node-1", &ec, vec![]);
        assert!(check_request(other_cn.as_bytes()).is_err());
        let with_san = request(
            "system:konnectivity-agent:n",
            &ec,
            vec!["evil.example".into()],
        );
        let e = check_request(with_san.as_bytes()).expect_err("SAN refused");
        assert!(e.to_string().contains("extensions"), "{e}");
        let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("key");
        let big = request("system:konnectivity-agent:n", &p384, vec![]);
        assert!(check_request(big.as_bytes())
            .expect_err("P-384")
            .to_string()
            .contains("P-256"));
        let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key");
        assert!(
            check_request(request("system:konnectivity-agent:n", &ed, vec![]).as_bytes()).is_err()
        );
        assert!(check_request(b"garbage").is_err());
        let mut tampered = good.clone().into_bytes();
        let mid = tampered.len() / 2;
        tampered[mid] = if tampered[mid] == b'A' { b'B' } else { b'A' };
        assert!(check_request(&tampered).is_err());
    }

    #[test]
    fn names_are_object_names() {
        let k = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let n = csr_name("Node_1.example", &k);
        assert!(n.starts_with("spoke-agent-node-1.example-"), "{n}");
        assert!(n
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.'));
        assert_eq!(n, csr_name("Node_1.example", &k), "stable for one key");
    }

    #[test]
    fn private_writes_are_0600_and_atomic() {
        let dir = std::env::temp_dir().join(format!("spoke-csr-{}", rand::rng().random::<u32>()));
        std::fs::create_dir_all(&dir).expect("dir");
        let p = dir.join("f.pem");
        write_private(&p, b"one").expect("write");
        write_private(&p, b"two").expect("rewrite");
        assert_eq!(std::fs::read(&p).expect("read"), b"two");
        let mode = std::fs::metadata(&p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            std::fs::read_dir(&dir).expect("ls").count(),
            1,
            "no temporary file left"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn renewal_falls_in_70_to_90_percent() {
        let now = Validity::now();
        let v = Validity {
            not_before: now,
            not_after: now + 1000,
        };
        for _ in 0..50 {
            let d = v.renew_in().as_secs_f64();
            assert!((690.0..=901.0).contains(&d), "{d}");
        }
    }
}
