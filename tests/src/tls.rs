//! rustls clients (ring provider) for talking TLS to the processes under test.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, SupportedCipherSuite, SupportedProtocolVersion};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::certs::CertKey;

/// Client config trusting `ca_pem`, presenting `client` (if any), offering `alpn`.
pub fn client_config(ca_pem: &str, client: Option<&CertKey>, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    restricted_client_config(ca_pem, client, alpn, rustls::DEFAULT_VERSIONS, None)
}

/// Like [`client_config`], restricted to `versions` and, if given, to exactly `suites`.
pub fn restricted_client_config(
    ca_pem: &str,
    client: Option<&CertKey>,
    alpn: &[&[u8]],
    versions: &[&'static SupportedProtocolVersion],
    suites: Option<Vec<SupportedCipherSuite>>,
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("CA PEM")).expect("add CA");
    }
    let mut provider = rustls::crypto::ring::default_provider();
    if let Some(suites) = suites {
        provider.cipher_suites = suites;
    }
    let builder = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(versions)
        .expect("client versions and suites fit")
        .with_root_certificates(roots);
    let mut config = match client {
        Some(ck) => {
            let chain: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(ck.cert_pem.as_bytes())
                    .collect::<Result<_, _>>()
                    .expect("client cert PEM");
            let key = PrivateKeyDer::from_pem_slice(ck.key_pem.as_bytes()).expect("client key PEM");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client auth cert")
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// TCP connect + TLS handshake to `addr`, verifying the server as `localhost`.
pub async fn connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from("localhost").expect("server name");
    TlsConnector::from(config).connect(name, tcp).await
}
