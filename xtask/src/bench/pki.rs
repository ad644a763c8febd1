//! A throw-away PKI for the bench: CA, server (SANs for loopback and the namespace addresses
//! the agents dial), agent and frontend (kube-apiserver role) client certificates.
use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::path::{Path, PathBuf};

pub struct Pair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub struct Pki {
    pub ca: PathBuf,
    pub server: Pair,
    pub agent: Pair,
    pub frontend: Pair,
}

impl Pki {
    pub fn generate(dir: &Path, server_sans: &[&str]) -> Result<Pki> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "spoke bench CA");
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate()?;
        let ca_pem = params.self_signed(&key)?.pem();
        let issuer = Issuer::new(params, key);
        let write = |name: &str, pem: &str| -> Result<PathBuf> {
            let p = dir.join(name);
            std::fs::write(&p, pem).with_context(|| format!("write {}", p.display()))?;
            Ok(p)
        };
        let leaf =
            |name: &str, sans: &[&str], ekus: Vec<ExtendedKeyUsagePurpose>| -> Result<Pair> {
                let mut params =
                    CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
                params.distinguished_name.push(DnType::CommonName, name);
                params.key_usages = vec![
                    KeyUsagePurpose::DigitalSignature,
                    KeyUsagePurpose::KeyEncipherment,
                ];
                params.extended_key_usages = ekus;
                let key = KeyPair::generate()?;
                let cert = params.signed_by(&key, &issuer)?.pem();
                Ok(Pair {
                    cert: write(&format!("{name}.crt"), &cert)?,
                    key: write(&format!("{name}.key"), &key.serialize_pem())?,
                })
            };
        use ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
        Ok(Pki {
            ca: write("ca.crt", &ca_pem)?,
            server: leaf("server", server_sans, vec![ServerAuth, ClientAuth])?,
            agent: leaf("agent", &[], vec![ClientAuth])?,
            frontend: leaf("frontend", &[], vec![ClientAuth])?,
        })
    }
}

/// The TLS provider of the bench's clients, which stand in for Go programs (kube-apiserver, an
/// upstream agent): ring's suites in Go's order ([`spoke_tunnel::tls::go_order`]), so the server
/// picks what it picks for those clients. rustls alone offers AES-256 first, which would make
/// every mTLS route seal and hash with the larger suite where a Go client would not.
pub fn go_client_provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = spoke_tunnel::tls::go_order(p.cipher_suites);
    std::sync::Arc::new(p)
}
