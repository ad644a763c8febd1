//! Certificate rotation: atomic file replacement and a probe for the certificate a TLS port
//! serves (the certificates come from [`crate::certs::Ca`]).

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use crate::certs::CertKey;
use crate::wait::poll_until;

/// Replaces `path` with `content` by a rename, as a secret volume update does.
pub fn write_atomically(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    std::fs::rename(&tmp, path).unwrap_or_else(|e| panic!("rename to {}: {e}", path.display()));
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
