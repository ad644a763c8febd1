//! Test certificates, generated with rcgen: [`Ca`], a certificate authority that signs the
//! leaves a test needs (rotations, expiries, stand-in servers), and the per-test [`Pki`]
//! built from two of them: a CA with server/agent/frontend leaves, and an unrelated "rogue"
//! CA with the same set of leaves for negative tests. Written as PEM files.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::ExtendedKeyUsagePurpose::{self, ClientAuth, ServerAuth};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

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
    std::fs::write(&path, pem).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

impl CertKey {
    /// Writes `<name>.crt` and `<name>.key` into `dir`: the files a process under test reads.
    pub fn write(dir: &Path, name: &str, cert_pem: &str, key_pem: &str) -> CertKey {
        CertKey {
            cert: write(dir, &format!("{name}.crt"), cert_pem),
            key: write(dir, &format!("{name}.key"), key_pem),
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
        }
    }
}

/// A certificate authority: signs leaves (ECDSA P-256 keys, rcgen's default validity unless
/// asked otherwise).
pub struct Ca {
    /// The CA certificate (PEM).
    pub cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

/// SANs of the servers the tests run: they are reached as `localhost` or `127.0.0.1`.
const LOCAL_SANS: [&str; 2] = ["localhost", "127.0.0.1"];

impl Ca {
    /// A fresh self-signed CA named `cn`.
    pub fn new(cn: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, cn);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        let cert_pem = params.self_signed(&key).expect("self-sign CA").pem();
        Ca {
            cert_pem,
            issuer: Issuer::new(params, key),
        }
    }

    /// Writes the CA certificate to `<name>.crt` in `dir`.
    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        write(dir, &format!("{name}.crt"), &self.cert_pem)
    }

    /// A leaf named `cn` for `sans` and `usages`, valid until `not_after` (Unix seconds) if
    /// given; returns (certificate PEM, key PEM).
    pub fn leaf(
        &self,
        cn: &str,
        sans: &[&str],
        usages: &[ExtendedKeyUsagePurpose],
        not_after: Option<i64>,
    ) -> (String, String) {
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(sans).expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = usages.to_vec();
        if let Some(t) = not_after {
            let secs = u64::try_from(t).expect("notAfter after 1970");
            params.not_after = rcgen::date_time_ymd(1970, 1, 1) + Duration::from_secs(secs);
        }
        let key = KeyPair::generate().expect("leaf key");
        let cert_pem = params
            .signed_by(&key, &self.issuer)
            .expect("sign leaf")
            .pem();
        (cert_pem, key.serialize_pem())
    }

    /// A serving certificate for `localhost` / `127.0.0.1`; returns (cert PEM, key PEM).
    pub fn server_leaf(&self, cn: &str) -> (String, String) {
        self.leaf(cn, &LOCAL_SANS, &[ServerAuth], None)
    }

    /// Like [`Ca::server_leaf`], valid until `year`-01-01; also returns notAfter as Unix time.
    pub fn server_leaf_until(&self, cn: &str, year: i32) -> (String, String, i64) {
        let not_after = rcgen::date_time_ymd(year, 1, 1).unix_timestamp();
        let (cert, key) = self.leaf(cn, &LOCAL_SANS, &[ServerAuth], Some(not_after));
        (cert, key, not_after)
    }

    /// A client certificate; returns (cert PEM, key PEM).
    pub fn client_leaf(&self, cn: &str) -> (String, String) {
        self.leaf(cn, &[], &[ClientAuth], None)
    }
}

impl CaSet {
    fn generate(dir: &Path, prefix: &str, extra_server_sans: &[&str]) -> Self {
        let ca = Ca::new(&format!("spoke e2e {prefix} CA"));
        let leaf = |name: &str, sans: &[&str], usages: &[ExtendedKeyUsagePurpose]| {
            let (cert, key) = ca.leaf(name, sans, usages, None);
            CertKey::write(dir, &format!("{prefix}-{name}"), &cert, &key)
        };
        let mut server_sans = LOCAL_SANS.to_vec();
        server_sans.extend_from_slice(extra_server_sans);
        Self {
            ca: ca.write(dir, &format!("{prefix}-ca")),
            server: leaf("server", &server_sans, &[ServerAuth, ClientAuth]),
            agent: leaf("agent", &[], &[ClientAuth]),
            frontend: leaf("frontend", &[], &[ClientAuth]),
            ca_pem: ca.cert_pem,
        }
    }
}
