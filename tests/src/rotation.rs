//! Certificate rotation: a throwaway CA issuing leaves, atomic file replacement and a probe for
//! the certificate a TLS port serves.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use crate::certs::CertKey;
use crate::wait::poll_until;

/// A CA apart from the harness's PKI, issuing the certificates a test rotates in.
pub struct RotCa {
    /// The CA certificate (PEM).
    pub ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl RotCa {
    /// A fresh self-signed CA named `cn`.
    pub fn new(cn: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, cn);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        let ca_pem = params.self_signed(&key).unwrap().pem();
        Self {
            ca_pem,
            issuer: Issuer::new(params, key),
        }
    }

    /// A serving certificate for `localhost` / `127.0.0.1`; returns (cert PEM, key PEM).
    pub fn server_leaf(&self, cn: &str) -> (String, String) {
        self.sign(server_params(cn))
    }

    /// Like [`RotCa::server_leaf`], valid until `year`-01-01; also returns notAfter as Unix time.
    pub fn server_leaf_until(&self, cn: &str, year: i32) -> (String, String, i64) {
        let mut params = server_params(cn);
        params.not_after = rcgen::date_time_ymd(year, 1, 1);
        let not_after = params.not_after.unix_timestamp();
        let (cert, key) = self.sign(params);
        (cert, key, not_after)
    }

    /// A client certificate; returns (cert PEM, key PEM).
    pub fn client_leaf(&self, cn: &str) -> (String, String) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    fn sign(&self, params: CertificateParams) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap().pem();
        (cert, key.serialize_pem())
    }
}

fn server_params(cn: &str) -> CertificateParams {
    let mut params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params
}

/// Replaces `path` with `content` by a rename, as a secret volume update does.
pub fn write_atomically(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The DER of the first certificate in `pem`.
pub fn der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

/// The leaf certificate a fresh TLS handshake with `addr` presents (trusting `ca_pem`,
/// presenting `client`, offering `alpn`; 5 s at most).
pub async fn served_cert(
    addr: SocketAddr,
    ca_pem: &str,
    client: &CertKey,
    alpn: &[&[u8]],
) -> Result<Vec<u8>, String> {
    let cfg = crate::tls::client_config(ca_pem, Some(client), alpn);
    let tls = tokio::time::timeout(Duration::from_secs(5), crate::tls::connect(addr, cfg))
        .await
        .map_err(|_| "TLS handshake timed out".to_string())?
        .map_err(|e| format!("TLS handshake: {e}"))?;
    tls.get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .ok_or_else(|| "no peer certificate".to_string())
}

/// Polls [`served_cert`] (15 s at most) until it is `want_pem`; returns how long that took.
pub async fn wait_served(
    addr: SocketAddr,
    ca_pem: &str,
    client: &CertKey,
    alpn: &[&[u8]],
    want_pem: &str,
    what: &str,
) -> Duration {
    let t = Instant::now();
    let want = der(want_pem);
    poll_until(what, Duration::from_secs(15), || async {
        let got = served_cert(addr, ca_pem, client, alpn).await?;
        if got == want {
            Ok(())
        } else {
            Err("a handshake still presents another certificate".to_string())
        }
    })
    .await;
    t.elapsed()
}
