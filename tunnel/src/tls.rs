//! TLS configuration from PEM files, with rustls (ring provider).
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

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
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
    PrivateKeyDer::from_pem_file(path).map_err(|e| anyhow!("{flag} {}: {e}", path.display()))
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
}

impl ServerTlsFiles {
    pub fn build(&self) -> Result<ServerConfig> {
        let id = &self.identity;
        let certs = load_certs(id.cert_flag, &id.cert)?;
        let key = load_key(id.key_flag, &id.key)?;
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?;
        let builder = match &self.client_ca {
            Some((flag, path)) => {
                let verifier = WebPkiClientVerifier::builder_with_provider(
                    Arc::new(load_roots(flag, path)?),
                    provider(),
                )
                .build()
                .map_err(|e| anyhow!("{flag} {}: {e}", path.display()))?;
                builder.with_client_cert_verifier(verifier)
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
}

impl TlsFiles for ServerTlsFiles {
    type Config = ServerConfig;
    fn build_config(&self) -> Result<ServerConfig> {
        self.build()
    }
    fn watched(&self) -> Vec<PathBuf> {
        self.paths()
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
}

/// The current config, rebuilt when its files change.
pub struct Reloading<F: TlsFiles> {
    files: F,
    current: RwLock<Arc<F::Config>>,
    stamp: RwLock<Vec<Option<SystemTime>>>,
}

fn stamps(paths: &[PathBuf]) -> Vec<Option<SystemTime>> {
    paths
        .iter()
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

impl<F: TlsFiles> Reloading<F> {
    /// Builds the initial config; errors here are fatal at start-up.
    pub fn new(files: F) -> Result<Arc<Self>> {
        let config = files.build_config()?;
        let stamp = stamps(&files.watched());
        Ok(Arc::new(Self {
            files,
            current: RwLock::new(Arc::new(config)),
            stamp: RwLock::new(stamp),
        }))
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
                tracing::info!("TLS certificates reloaded");
                true
            }
            Err(e) => {
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
