//! Per-test PKI generated with rcgen: a CA with server/agent/frontend leaves, and an unrelated
//! "rogue" CA with the same set of leaves for negative tests. Written as PEM files.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A certificate + private key, as PEM files and in memory.
#[derive(Debug, Clone)]
pub struct CertKey {
    /// Certificate PEM file.
    pub cert: PathBuf,
    /// PKCS#8 private key PEM file.
    pub key: PathBuf,
    /// Certificate PEM.
    pub cert_pem: String,
    /// Private key PEM.
    pub key_pem: String,
}

/// One CA and the leaves it signed.
#[derive(Debug, Clone)]
pub struct CaSet {
    /// CA certificate PEM file.
    pub ca: PathBuf,
    /// CA certificate PEM.
    pub ca_pem: String,
    /// Server certificate (SANs `localhost`, `127.0.0.1` and any extra ones asked for),
    /// serverAuth + clientAuth.
    pub server: CertKey,
    /// Agent client certificate.
    pub agent: CertKey,
    /// Frontend (kube-apiserver role) client certificate.
    pub frontend: CertKey,
}

/// The test PKI: `main` is what a correct deployment uses; `rogue` is unrelated to it.
#[derive(Debug, Clone)]
pub struct Pki {
    /// The trusted CA set.
    pub main: CaSet,
    /// An unrelated CA set.
    pub rogue: CaSet,
}

impl Pki {
    /// Generates both CA sets into `dir`.
    pub fn generate(dir: &Path) -> Self {
        Self::generate_with_server_sans(dir, &[])
    }

    /// Like [`Pki::generate`], with `extra_sans` (names or IP addresses) added to the main
    /// server certificate, e.g. the address a server listens on in another network namespace.
    pub fn generate_with_server_sans(dir: &Path, extra_sans: &[&str]) -> Self {
        Self {
            main: CaSet::generate(dir, "main", extra_sans),
            rogue: CaSet::generate(dir, "rogue", &[]),
        }
    }
}

fn write(dir: &Path, name: &str, pem: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, pem).expect("write PEM");
    path
}

impl CaSet {
    fn generate(dir: &Path, prefix: &str, extra_server_sans: &[&str]) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("spoke e2e {prefix} CA"));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        let ca_pem = params.self_signed(&key).expect("self-sign CA").pem();
        let issuer = Issuer::new(params, key);
        let leaf = |name: &str, sans: &[&str], ekus: Vec<ExtendedKeyUsagePurpose>| {
            let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
            let mut params = CertificateParams::new(sans).expect("leaf params");
            params.distinguished_name.push(DnType::CommonName, name);
            params.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ];
            params.extended_key_usages = ekus;
            let key = KeyPair::generate().expect("leaf key");
            let cert_pem = params.signed_by(&key, &issuer).expect("sign leaf").pem();
            let key_pem = key.serialize_pem();
            CertKey {
                cert: write(dir, &format!("{prefix}-{name}.crt"), &cert_pem),
                key: write(dir, &format!("{prefix}-{name}.key"), &key_pem),
                cert_pem,
                key_pem,
            }
        };
        use ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
        let mut server_sans = vec!["localhost", "127.0.0.1"];
        server_sans.extend_from_slice(extra_server_sans);
        Self {
            ca: write(dir, &format!("{prefix}-ca.crt"), &ca_pem),
            server: leaf("server", &server_sans, vec![ServerAuth, ClientAuth]),
            agent: leaf("agent", &[], vec![ClientAuth]),
            frontend: leaf("frontend", &[], vec![ClientAuth]),
            ca_pem,
        }
    }
}
