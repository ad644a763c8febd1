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
/// upstream agent): rustls' ring suites in the order Go's crypto/tls offers them on a CPU with
/// AES instructions, so the server picks what it picks for those clients. TLS 1.3:
/// AES-128-GCM-SHA256, AES-256-GCM-SHA384, ChaCha20-Poly1305-SHA256; TLS 1.2 after it.
/// rustls alone offers AES-256 first, which would make every mTLS route seal and hash with the
/// larger suite where a Go client would not.
pub fn go_client_provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    let rank = |s: &rustls::SupportedCipherSuite| {
        let name = s.suite().as_str().unwrap_or("");
        let aead = ["AES_128_GCM", "AES_256_GCM", "CHACHA20"]
            .iter()
            .position(|a| name.contains(a))
            .unwrap_or(3);
        (matches!(s, rustls::SupportedCipherSuite::Tls12(_)), aead)
    };
    p.cipher_suites.sort_by_key(rank);
    std::sync::Arc::new(p)
}

#[cfg(test)]
mod tests {
    #[test]
    fn go_order_offers_aes_128_first() {
        let p = super::go_client_provider();
        let names: Vec<&str> = p
            .cipher_suites
            .iter()
            .take(3)
            .map(|s| s.suite().as_str().unwrap_or("?"))
            .collect();
        assert_eq!(
            names,
            [
                "TLS13_AES_128_GCM_SHA256",
                "TLS13_AES_256_GCM_SHA384",
                "TLS13_CHACHA20_POLY1305_SHA256"
            ]
        );
    }
}
