//! TLS configuration from PEM files, with rustls (ring provider; X25519 from aws-lc-rs).
//!
//! Configs are held in a [`Reloading`] cell: a background task re-reads the files when they
//! change (kubelet-style rotation), so new handshakes use new certs while open
//! connections are untouched; a broken new file keeps the old config and logs why.
use anyhow::{anyhow, Context, Result};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

mod verified;
mod x25519;

/// The clients' provider (an agent's tunnels), and the verifier's signature algorithms.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::CryptoProvider {
        cipher_suites: go_order(rustls::crypto::ring::default_provider().cipher_suites),
        ..rustls::crypto::ring::default_provider()
    })
}

/// The servers' base provider: ring's, with X25519 (the group every client offers first) from
/// aws-lc-rs, see [`x25519`]; ring's order of groups stays. Only servers take it: they make a
/// handshake per agent and per frontend connection, an agent one per server it holds, and the
/// agent would map aws-lc's X25519 code besides ring's (its idle RSS is mostly code pages).
fn server_base_provider() -> rustls::crypto::CryptoProvider {
    let mut p = rustls::crypto::ring::default_provider();
    for g in p.kx_groups.iter_mut() {
        if g.name() == rustls::NamedGroup::X25519 {
            *g = x25519::X25519;
        }
    }
    p
}

/// rustls' suites in the order Go's crypto/tls prefers them on a CPU with AES instructions
/// (its `defaultCipherSuitesTLS13` and `cipherSuitesPreferenceOrder`): AES-128-GCM, then
/// AES-256-GCM, then ChaCha20-Poly1305, TLS 1.3 before 1.2, ECDSA before RSA. A TLS 1.3 server
/// takes the client's order, so a Spoke agent gets what upstream's agent gets, and AES-128
/// seals a record in about 10% less time than AES-256. The bench's clients, which stand in for
/// Go programs, offer the same.
pub fn go_order(
    mut suites: Vec<rustls::SupportedCipherSuite>,
) -> Vec<rustls::SupportedCipherSuite> {
    let rank = |s: &rustls::SupportedCipherSuite| {
        let name = s.suite().as_str().unwrap_or("");
        let aead = ["AES_128_GCM", "AES_256_GCM", "CHACHA20"]
            .iter()
            .position(|a| name.contains(a))
            .unwrap_or(3);
        let rsa = name.contains("_RSA_");
        (
            matches!(s, rustls::SupportedCipherSuite::Tls12(_)),
            aead,
            rsa,
        )
    };
    suites.sort_by_key(rank);
    suites
}

static TLS13_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// `--tls-min-version` and `--cipher-suites`, with Go's names mapped to rustls.
#[derive(Clone, Debug)]
pub struct TlsPolicy {
    versions: &'static [&'static rustls::SupportedProtocolVersion],
    suites: Vec<rustls::SupportedCipherSuite>,
}

impl Default for TlsPolicy {
    /// TLS 1.2 and 1.3 with rustls' suites (all AEAD, forward secret), TLS 1.3 preferred.
    fn default() -> Self {
        Self {
            versions: rustls::ALL_VERSIONS,
            suites: go_order(rustls::crypto::ring::default_provider().cipher_suites),
        }
    }
}

/// Go cipher suite names that rustls does not implement (no AEAD or no forward secrecy).
const GO_INSECURE_SUITES: &[&str] = &[
    "TLS_RSA_WITH_RC4_128_SHA",
    "TLS_RSA_WITH_3DES_EDE_CBC_SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA256",
    "TLS_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_ECDSA_WITH_RC4_128_SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA",
    "TLS_ECDHE_RSA_WITH_RC4_128_SHA",
    "TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256",
];

impl TlsPolicy {
    /// `min_version`: "" (TLS 1.2), `VersionTLS12`, `VersionTLS13`. `cipher_suites`: Go names;
    /// as in Go they select TLS 1.2 suites, while TLS 1.3 suites stay on.
    pub fn new(min_version: &str, cipher_suites: &[String]) -> Result<Self> {
        use rustls::crypto::ring::cipher_suite as cs;
        let versions: &'static [&'static rustls::SupportedProtocolVersion] = match min_version {
            "" | "VersionTLS12" => rustls::ALL_VERSIONS,
            "VersionTLS13" => TLS13_ONLY,
            "VersionTLS10" | "VersionTLS11" => {
                return Err(anyhow!("--tls-min-version {min_version}: TLS 1.0 and 1.1 are not supported (insecure); use VersionTLS12 or VersionTLS13"))
            }
            other => return Err(anyhow!("--tls-min-version {other:?}: expected VersionTLS12 or VersionTLS13")),
        };
        if cipher_suites.is_empty() {
            return Ok(Self {
                versions,
                ..Self::default()
            });
        }
        let mut suites = vec![
            cs::TLS13_AES_128_GCM_SHA256,
            cs::TLS13_AES_256_GCM_SHA384,
            cs::TLS13_CHACHA20_POLY1305_SHA256,
        ];
        let mut skipped = Vec::new();
        for name in cipher_suites {
            let suite = match name.as_str() {
                "TLS_AES_128_GCM_SHA256"
                | "TLS_AES_256_GCM_SHA384"
                | "TLS_CHACHA20_POLY1305_SHA256" => continue,
                "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256" => {
                    cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                }
                "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384" => {
                    cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
                }
                "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305"
                | "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256" => {
                    cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
                }
                "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256" => {
                    cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
                }
                "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384" => {
                    cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384
                }
                "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305"
                | "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256" => {
                    cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256
                }
                // Go knows these; lists written for upstream often carry them. rustls has no
                // CBC, RC4, 3DES or non-forward-secret suites, so they are left out, not fatal.
                other if GO_INSECURE_SUITES.contains(&other) => {
                    skipped.push(other);
                    continue;
                }
                other => {
                    return Err(anyhow!(
                        "--cipher-suites {other:?}: unknown cipher suite name"
                    ))
                }
            };
            if !suites.iter().any(|s| s.suite() == suite.suite()) {
                suites.push(suite);
            }
        }
        let has_tls12 = suites
            .iter()
            .any(|s| matches!(s, rustls::SupportedCipherSuite::Tls12(_)));
        if !has_tls12 && versions != TLS13_ONLY {
            return Err(anyhow!(
                "--cipher-suites {}: not supported: no TLS 1.2 suite left (only AEAD suites with forward secrecy are, TLS_ECDHE_*_GCM_* and TLS_ECDHE_*_CHACHA20_POLY1305*); add one or set --tls-min-version=VersionTLS13",
                cipher_suites.join(",")
            ));
        }
        if !skipped.is_empty() {
            tracing::warn!(
                skipped = %skipped.join(","),
                "--cipher-suites: leaving out suites without AEAD or forward secrecy (not offered by this build)"
            );
        }
        // As in Go since 1.17, the list chooses suites, not their order.
        Ok(Self {
            versions,
            suites: go_order(suites),
        })
    }

    fn provider(&self) -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::CryptoProvider {
            cipher_suites: self.suites.clone(),
            ..server_base_provider()
        })
    }
}

/// The leaf certificate's notAfter, as Unix seconds.
pub fn not_after(cert: &CertificateDer<'_>) -> Option<i64> {
    x509_parser::parse_x509_certificate(cert.as_ref())
        .ok()
        .map(|(_, c)| c.validity().not_after.timestamp())
}

pub fn load_certs(flag: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow!("{flag} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(anyhow!(
            "{flag} {}: no PEM certificate found",
            path.display()
        ));
    }
    Ok(certs)
}

pub fn load_key(flag: &str, path: &Path) -> Result<PrivateKeyDer<'static>> {
    use rustls::pki_types::pem::Error as PemError;
    PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        PemError::NoItemsFound => anyhow!(
            "{flag} {}: no PEM private key found (expected PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY)",
            path.display()
        ),
        e => anyhow!("{flag} {}: {e}", path.display()),
    })
}

fn load_roots(flag: &str, path: &Path) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(flag, path)? {
        roots
            .add(cert)
            .map_err(|e| anyhow!("{flag} {}: invalid CA certificate: {e}", path.display()))?;
    }
    Ok(roots)
}

/// A certificate/key pair given by flags, e.g. `--cluster-cert` / `--cluster-key`.
#[derive(Clone, Debug)]
pub struct CertFiles {
    pub cert_flag: &'static str,
    pub cert: PathBuf,
    pub key_flag: &'static str,
    pub key: PathBuf,
}

/// Everything needed to build a server config, so it can be rebuilt on change.
#[derive(Clone, Debug)]
pub struct ServerTlsFiles {
    pub identity: CertFiles,
    /// CA for client certificates; `Some` makes it mutual TLS.
    pub client_ca: Option<(&'static str, PathBuf)>,
    pub alpn: Vec<Vec<u8>>,
    pub policy: TlsPolicy,
}

impl ServerTlsFiles {
    pub fn build(&self) -> Result<ServerConfig> {
        let id = &self.identity;
        let certs = load_certs(id.cert_flag, &id.cert)?;
        let key = load_key(id.key_flag, &id.key)?;
        let builder = ServerConfig::builder_with_provider(self.policy.provider())
            .with_protocol_versions(self.policy.versions)
            .context("TLS protocol versions and cipher suites do not fit together")?;
        let builder = match &self.client_ca {
            Some((flag, path)) => {
                let verifier = WebPkiClientVerifier::builder_with_provider(
                    Arc::new(load_roots(flag, path)?),
                    provider(),
                )
                .build()
                .map_err(|e| anyhow!("{flag} {}: {e}", path.display()))?;
                builder.with_client_cert_verifier(Arc::new(verified::Remembering::new(verifier)))
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(certs, key).map_err(|e| {
            anyhow!(
                "{} {} / {} {}: {e}",
                id.cert_flag,
                id.cert.display(),
                id.key_flag,
                id.key.display()
            )
        })?;
        config.alpn_protocols = self.alpn.clone();
        // No session resumption: neither upstream's agent nor kube-apiserver's egress dialer
        // keeps a session cache, so the tickets a TLS 1.3 server sends after each handshake
        // (two, each a cache entry) would be work per connect that nobody uses.
        config.send_tls13_tickets = 0;
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        // After a TLS 1.3 handshake Spoke's HTTP/2 seals and opens the records itself.
        config.enable_secret_extraction = true;
        Ok(config)
    }

    fn paths(&self) -> Vec<PathBuf> {
        let mut p = vec![self.identity.cert.clone(), self.identity.key.clone()];
        p.extend(self.client_ca.iter().map(|(_, ca)| ca.clone()));
        p
    }
}

/// Everything needed to build a client config.
#[derive(Clone, Debug)]
pub struct ClientTlsFiles {
    pub ca: Option<(&'static str, PathBuf)>,
    pub identity: Option<CertFiles>,
    pub alpn: Vec<Vec<u8>>,
}

impl ClientTlsFiles {
    pub fn build(&self) -> Result<ClientConfig> {
        let roots = match &self.ca {
            Some((flag, path)) => load_roots(flag, path)?,
            None => RootCertStore::empty(),
        };
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_root_certificates(roots);
        let mut config = match &self.identity {
            Some(id) => builder
                .with_client_auth_cert(
                    load_certs(id.cert_flag, &id.cert)?,
                    load_key(id.key_flag, &id.key)?,
                )
                .map_err(|e| {
                    anyhow!(
                        "{} {} / {} {}: {e}",
                        id.cert_flag,
                        id.cert.display(),
                        id.key_flag,
                        id.key.display()
                    )
                })?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = self.alpn.clone();
        config.enable_secret_extraction = true;
        Ok(config)
    }

    fn paths(&self) -> Vec<PathBuf> {
        let mut p: Vec<_> = self.ca.iter().map(|(_, ca)| ca.clone()).collect();
        if let Some(id) = &self.identity {
            p.push(id.cert.clone());
            p.push(id.key.clone());
        }
        p
    }
}

/// Something that builds a TLS config from files.
pub trait TlsFiles: Send + Sync + 'static {
    type Config: Send + Sync + 'static;
    fn build_config(&self) -> Result<Self::Config>;
    fn watched(&self) -> Vec<PathBuf>;
    /// The identity certificate (flag, file), for the expiry metric.
    fn identity(&self) -> Option<(&'static str, &Path)>;
}

impl TlsFiles for ServerTlsFiles {
    type Config = ServerConfig;
    fn build_config(&self) -> Result<ServerConfig> {
        self.build()
    }
    fn watched(&self) -> Vec<PathBuf> {
        self.paths()
    }
    fn identity(&self) -> Option<(&'static str, &Path)> {
        Some((self.identity.cert_flag, &self.identity.cert))
    }
}

impl TlsFiles for ClientTlsFiles {
    type Config = ClientConfig;
    fn build_config(&self) -> Result<ClientConfig> {
        self.build()
    }
    fn watched(&self) -> Vec<PathBuf> {
        self.paths()
    }
    fn identity(&self) -> Option<(&'static str, &Path)> {
        self.identity
            .as_ref()
            .map(|id| (id.cert_flag, id.cert.as_path()))
    }
}

/// The current config, rebuilt when its files change.
pub struct Reloading<F: TlsFiles> {
    files: F,
    current: RwLock<Arc<F::Config>>,
    stamp: RwLock<Vec<Option<SystemTime>>>,
    metrics: crate::metrics::TlsMetrics,
}

fn stamps(paths: &[PathBuf]) -> Vec<Option<SystemTime>> {
    paths
        .iter()
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

impl<F: TlsFiles> Reloading<F> {
    /// Builds the initial config; errors here are fatal at start-up.
    pub fn new(files: F, metrics: crate::metrics::TlsMetrics) -> Result<Arc<Self>> {
        let config = files.build_config()?;
        let stamp = stamps(&files.watched());
        let me = Self {
            files,
            current: RwLock::new(Arc::new(config)),
            stamp: RwLock::new(stamp),
            metrics,
        };
        me.record_expiry();
        Ok(Arc::new(me))
    }

    fn record_expiry(&self) {
        let Some((flag, path)) = self.files.identity() else {
            return;
        };
        let expiry = load_certs(flag, path)
            .ok()
            .and_then(|c| c.first().and_then(not_after));
        if let Some(t) = expiry {
            self.metrics.expiry(flag, t);
        }
    }

    pub fn current(&self) -> Arc<F::Config> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Rebuilds if any file changed. Returns true when a new config took effect.
    pub fn check(&self) -> bool {
        let now = stamps(&self.files.watched());
        if *self.stamp.read().unwrap_or_else(|e| e.into_inner()) == now {
            return false;
        }
        *self.stamp.write().unwrap_or_else(|e| e.into_inner()) = now;
        match self.files.build_config() {
            Ok(c) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(c);
                self.record_expiry();
                tracing::info!("TLS certificates reloaded");
                true
            }
            Err(e) => {
                self.metrics.reload_failures.inc();
                tracing::error!(error = %e, "TLS files changed but cannot be used; keeping the previous certificates");
                false
            }
        }
    }

    /// Polls the files every `every` for as long as the runtime lives.
    pub fn watch(self: &Arc<Self>, every: Duration) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                match me.upgrade() {
                    Some(m) => {
                        m.check();
                    }
                    None => return,
                }
            }
        });
    }
}

pub fn server_name(host: &str) -> Result<ServerName<'static>> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string())
        .map_err(|e| anyhow!("invalid TLS server name {host:?}: {e}"))
}

/// Why a TLS handshake was refused, as a metric label.
pub fn handshake_failure_reason(e: &std::io::Error) -> &'static str {
    use rustls::{CertificateError, Error};
    match e.get_ref().and_then(|i| i.downcast_ref::<Error>()) {
        Some(Error::NoCertificatesPresented) => "no_client_certificate",
        Some(Error::InvalidCertificate(CertificateError::UnknownIssuer)) => "unknown_ca",
        Some(Error::InvalidCertificate(CertificateError::Expired))
        | Some(Error::InvalidCertificate(CertificateError::ExpiredContext { .. })) => {
            "expired_certificate"
        }
        Some(Error::InvalidCertificate(_)) => "bad_certificate",
        Some(Error::PeerIncompatible(_)) | Some(Error::NoApplicationProtocol) => "incompatible",
        Some(Error::InvalidMessage(_)) => "malformed",
        Some(Error::AlertReceived(_)) => "peer_alert",
        Some(_) => "tls_error",
        None if e.kind() == std::io::ErrorKind::UnexpectedEof => "eof",
        None => "io_error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Servers take aws-lc's X25519, first as ring's was; clients keep ring's whole provider.
    #[test]
    fn servers_take_aws_lc_x25519_and_clients_ring() {
        let server = TlsPolicy::default().provider();
        let client = provider();
        let groups = |p: &rustls::crypto::CryptoProvider| -> Vec<String> {
            p.kx_groups
                .iter()
                .map(|g| format!("{:?}", g.name()))
                .collect()
        };
        assert_eq!(
            groups(&server),
            groups(&client),
            "the same groups in the same order"
        );
        assert_eq!(groups(&server)[0], "X25519");
        assert_eq!(format!("{:?}", server.kx_groups[0]), "X25519Group");
        assert_ne!(format!("{:?}", client.kx_groups[0]), "X25519Group");
    }

    fn names(suites: &[rustls::SupportedCipherSuite]) -> Vec<&'static str> {
        suites
            .iter()
            .map(|s| s.suite().as_str().unwrap_or("?"))
            .collect()
    }

    /// A policy from `--cipher-suites` names, with TLS 1.2 allowed.
    fn with_suites(list: &[&str]) -> Result<TlsPolicy> {
        let list: Vec<String> = list.iter().map(|s| s.to_string()).collect();
        TlsPolicy::new("", &list)
    }

    /// Go 1.22+'s `defaultCipherSuitesTLS13` and the AEAD part of its
    /// `cipherSuitesPreferenceOrder`, as a Go client offers them with AES hardware.
    #[test]
    fn default_suites_in_gos_order() {
        let server = names(&TlsPolicy::default().suites);
        assert_eq!(
            server,
            [
                "TLS13_AES_128_GCM_SHA256",
                "TLS13_AES_256_GCM_SHA384",
                "TLS13_CHACHA20_POLY1305_SHA256",
                "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
                "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
                "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
                "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
                "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
                "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
            ]
        );
        let agent = names(&provider().cipher_suites);
        assert_eq!(agent, server, "an agent offers the same order");
    }

    #[test]
    fn go_cipher_names_and_versions() {
        let p = TlsPolicy::new("VersionTLS13", &[]).unwrap();
        assert_eq!(p.versions.len(), 1);
        let p = with_suites(&[
            "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
            "TLS_AES_128_GCM_SHA256",
        ])
        .unwrap();
        // Three TLS 1.3 suites stay, plus the one TLS 1.2 suite asked for.
        assert_eq!(p.suites.len(), 4);
        assert!(TlsPolicy::new("VersionTLS10", &[]).is_err());
        assert!(TlsPolicy::new("TLS12", &[]).is_err());
        // Insecure suites Go knows are left out; alone they leave TLS 1.2 with nothing.
        assert!(with_suites(&["TLS_RSA_WITH_AES_128_CBC_SHA"]).is_err());
        let p = with_suites(&[
            "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA",
            "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
        ])
        .unwrap();
        assert_eq!(p.suites.len(), 4);
        assert!(TlsPolicy::new("VersionTLS13", &["TLS_RSA_WITH_AES_128_CBC_SHA".into()]).is_ok());
        assert!(with_suites(&["bogus"]).is_err());
        // The list picks suites; their order stays Go's, as Go ignores the list's.
        let p = with_suites(&[
            "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305",
            "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
        ])
        .unwrap();
        assert_eq!(
            names(&p.suites)[3..],
            [
                "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
                "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256"
            ]
        );
    }
}
