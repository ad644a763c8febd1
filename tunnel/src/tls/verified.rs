//! A client-certificate verifier that remembers the chains it has verified.
//!
//! Checking that a chain leads to a trusted CA costs an ECDSA verification per signature in
//! it, about a third of a server's handshake CPU with P-256 certificates. Agents of one
//! cluster often present the same chain: one certificate mounted into every pod of the
//! DaemonSet, and each agent again on every reconnect. Whether a chain verifies depends only
//! on its bytes, the verifier's roots and revocation lists (fixed for this verifier's life: a
//! changed CA file builds a new config and verifier), and the time. So a chain that verified
//! is taken again, without its signatures checked, while the time is still inside every one of
//! its certificates' validity. A failure is never remembered.
//!
//! The handshake's own signature (CertificateVerify), which proves the client holds the key, is
//! checked on every handshake: a remembered chain is worth nothing without it. A chain is
//! remembered only once that signature checked out too: certificates are public, and a client
//! without the key could otherwise fill the memory with one real certificate and changing
//! extra ones, pushing out the chains of real agents.
use ring::digest::{Context, SHA256};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Chains remembered at most, and chains awaiting their holder's signature; when full, the
/// expired ones go, or all of them.
const CAPACITY: usize = 4096;

/// The seconds (Unix) in which every certificate of a chain is valid.
type Window = (u64, u64);
/// A SHA-256 digest.
type Digest = [u8; 32];

#[derive(Debug)]
pub struct Remembering {
    inner: Arc<dyn ClientCertVerifier>,
    /// SHA-256 of the chain → its window.
    verified: Mutex<HashMap<Digest, Window>>,
    /// Chains verified in a handshake whose signature is still to come, by the SHA-256 of their
    /// end-entity certificate (the one the signature is checked against).
    awaiting_key: Mutex<HashMap<Digest, (Digest, Window)>>,
}

fn insert_bounded<V>(
    map: &Mutex<HashMap<Digest, V>>,
    key: Digest,
    value: V,
    live: impl Fn(&V) -> bool,
) {
    let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
    if map.len() >= CAPACITY {
        map.retain(|_, v| live(v));
        if map.len() >= CAPACITY {
            map.clear();
        }
    }
    map.insert(key, value);
}

fn unix_now() -> u64 {
    UnixTime::now().as_secs()
}

impl Remembering {
    pub fn new(inner: Arc<dyn ClientCertVerifier>) -> Self {
        Self {
            inner,
            verified: Mutex::new(HashMap::new()),
            awaiting_key: Mutex::new(HashMap::new()),
        }
    }

    fn remembered(&self, key: &Digest, now: u64) -> bool {
        let verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        matches!(verified.get(key), Some(&(from, until)) if from <= now && now <= until)
    }

    /// The holder of `cert` proved its key: the chain verified with it is remembered.
    fn key_proven(&self, cert: &CertificateDer<'_>) {
        let awaiting = {
            let mut map = self.awaiting_key.lock().unwrap_or_else(|e| e.into_inner());
            map.remove(&digest(cert, &[]))
        };
        if let Some((chain, window)) = awaiting {
            let now = unix_now();
            insert_bounded(&self.verified, chain, window, |&(_, until)| now <= until);
        }
    }
}

/// The chain's digest: each certificate's length, then its bytes, so that no two chains share
/// an input.
fn digest(end_entity: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>]) -> Digest {
    let mut ctx = Context::new(&SHA256);
    for cert in std::iter::once(end_entity).chain(intermediates) {
        ctx.update(&(cert.len() as u64).to_be_bytes());
        ctx.update(cert.as_ref());
    }
    let mut key = [0u8; 32];
    key.copy_from_slice(ctx.finish().as_ref());
    key
}

/// The seconds in which every certificate of the chain is valid; `None` if one does not parse
/// (the chain is then verified every time, as without this cache).
fn validity(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
) -> Option<(u64, u64)> {
    let (mut from, mut until) = (0u64, u64::MAX);
    for cert in std::iter::once(end_entity).chain(intermediates) {
        let (_, c) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
        let v = c.validity();
        from = from.max(u64::try_from(v.not_before.timestamp()).unwrap_or(0));
        until = until.min(u64::try_from(v.not_after.timestamp()).ok()?);
    }
    (from <= until).then_some((from, until))
}

impl ClientCertVerifier for Remembering {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let key = digest(end_entity, intermediates);
        let secs = now.as_secs();
        if self.remembered(&key, secs) {
            return Ok(ClientCertVerified::assertion());
        }
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if let Some(window) = validity(end_entity, intermediates) {
            insert_bounded(
                &self.awaiting_key,
                digest(end_entity, &[]),
                (key, window),
                |&(_, (_, until))| secs <= until,
            );
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        let valid = self.inner.verify_tls12_signature(message, cert, dss)?;
        self.key_proven(cert);
        Ok(valid)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        let valid = self.inner.verify_tls13_signature(message, cert, dss)?;
        self.key_proven(cert);
        Ok(valid)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.inner.requires_raw_public_keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use rustls::pki_types::{PrivateKeyDer, ServerName};
    use rustls::server::WebPkiClientVerifier;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Ca(Issuer<'static, KeyPair>, CertificateDer<'static>);

    fn ca() -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = p.self_signed(&key).unwrap();
        Ca(Issuer::new(p, key), cert.der().clone())
    }

    /// A leaf for `name`, valid from 2020 to 2040, and its key.
    fn leaf(ca: &Ca, name: &str) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec![name.to_string()]).unwrap();
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2040, 1, 1);
        let cert = p.signed_by(&key, &ca.0).unwrap();
        (
            cert.der().clone(),
            PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
    }

    /// Counts the chains the real verifier is asked about.
    #[derive(Debug)]
    struct Counting(Arc<dyn ClientCertVerifier>, AtomicUsize);

    impl ClientCertVerifier for Counting {
        fn root_hint_subjects(&self) -> &[DistinguishedName] {
            self.0.root_hint_subjects()
        }
        fn verify_client_cert(
            &self,
            e: &CertificateDer<'_>,
            i: &[CertificateDer<'_>],
            now: UnixTime,
        ) -> Result<ClientCertVerified, Error> {
            self.1.fetch_add(1, Ordering::SeqCst);
            self.0.verify_client_cert(e, i, now)
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            self.0.verify_tls12_signature(m, c, d)
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            self.0.verify_tls13_signature(m, c, d)
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.supported_verify_schemes()
        }
    }

    fn verifier(ca: &Ca) -> (Arc<Counting>, Remembering) {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.1.clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let webpki = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .unwrap();
        let counting = Arc::new(Counting(webpki, AtomicUsize::new(0)));
        (counting.clone(), Remembering::new(counting))
    }

    fn at(y: i32) -> UnixTime {
        let t = rcgen::date_time_ymd(y, 6, 1).unix_timestamp();
        UnixTime::since_unix_epoch(std::time::Duration::from_secs(t as u64))
    }

    #[test]
    fn a_chain_is_verified_once_while_its_certificates_are_valid() {
        let ca = ca();
        let (a, _) = leaf(&ca, "agent-a");
        let (b, _) = leaf(&ca, "agent-b");
        let (count, v) = verifier(&ca);
        let calls = || count.1.load(Ordering::SeqCst);
        // Each chain's holder then signs, as in a handshake (`key_proven`).
        v.verify_client_cert(&a, &[], at(2030)).unwrap();
        v.verify_client_cert(&a, &[], at(2030)).unwrap();
        assert_eq!(calls(), 2, "not remembered before its holder signed");
        v.key_proven(&a);
        v.verify_client_cert(&a, &[], at(2031)).unwrap();
        assert_eq!(calls(), 2, "the same chain again is not verified again");
        v.verify_client_cert(&b, &[], at(2030)).unwrap();
        v.key_proven(&b);
        assert_eq!(calls(), 3, "another chain is verified");
        v.verify_client_cert(&a, std::slice::from_ref(&b), at(2030))
            .unwrap();
        v.key_proven(&a);
        assert_eq!(
            calls(),
            4,
            "the same leaf with other intermediates is another chain"
        );
        let expired = v.verify_client_cert(&a, &[], at(2041)).unwrap_err();
        assert_eq!(calls(), 5, "outside the validity the real verifier decides");
        assert!(format!("{expired:?}").contains("Expired"), "{expired:?}");
    }

    #[test]
    fn a_failure_is_never_remembered() {
        let (trusted, untrusted) = (ca(), ca());
        let (stranger, _) = leaf(&untrusted, "stranger");
        let (count, v) = verifier(&trusted);
        for _ in 0..3 {
            assert!(v.verify_client_cert(&stranger, &[], at(2030)).is_err());
        }
        assert_eq!(count.1.load(Ordering::SeqCst), 3);
    }

    /// Presents `cert` with whatever key it is given, matching or not.
    #[derive(Debug)]
    struct Present(Arc<rustls::sign::CertifiedKey>);

    impl rustls::client::ResolvesClientCert for Present {
        fn resolve(
            &self,
            _: &[&[u8]],
            _: &[SignatureScheme],
        ) -> Option<Arc<rustls::sign::CertifiedKey>> {
            Some(self.0.clone())
        }
        fn has_certs(&self) -> bool {
            true
        }
    }

    /// A whole handshake in memory; the server's error if it fails.
    fn handshake(
        server: &Arc<rustls::ServerConfig>,
        ca: &Ca,
        cert: &CertificateDer<'static>,
        key: &PrivateKeyDer<'static>,
    ) -> Result<(), Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let signer = provider
            .key_provider
            .load_private_key(key.clone_key())
            .unwrap();
        let certified = rustls::sign::CertifiedKey::new(vec![cert.clone()], signer);
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.1.clone()).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_cert_resolver(Arc::new(Present(Arc::new(certified))));
        let name = ServerName::try_from("server").unwrap();
        let mut c = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut s = rustls::ServerConnection::new(server.clone()).unwrap();
        for _ in 0..10 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            let mut r = &buf[..];
            while !r.is_empty() {
                s.read_tls(&mut r).unwrap();
                s.process_new_packets()?;
            }
            let mut out = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut out).unwrap();
            }
            let mut r = &out[..];
            while !r.is_empty() {
                c.read_tls(&mut r).unwrap();
                c.process_new_packets().unwrap();
            }
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(());
            }
        }
        panic!("the handshake did not finish");
    }

    #[test]
    fn a_remembered_chain_still_needs_its_key() {
        let ca = ca();
        let (agent, agent_key) = leaf(&ca, "agent");
        let (_, other_key) = leaf(&ca, "other");
        let (server_cert, server_key) = leaf(&ca, "server");
        let (count, v) = verifier(&ca);
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(Arc::new(v))
        .with_single_cert(vec![server_cert], server_key)
        .unwrap();
        let server = Arc::new(server);
        let calls = || count.1.load(Ordering::SeqCst);
        let bad_signature = |r: Result<(), Error>| {
            matches!(
                r,
                Err(Error::InvalidCertificate(
                    rustls::CertificateError::BadSignature
                ))
            )
        };
        assert!(bad_signature(handshake(&server, &ca, &agent, &other_key)));
        handshake(&server, &ca, &agent, &agent_key).expect("the agent's own key");
        assert_eq!(
            calls(),
            2,
            "a chain whose holder did not sign is not remembered"
        );
        handshake(&server, &ca, &agent, &agent_key).expect("again");
        assert_eq!(calls(), 2, "the chain was remembered");
        assert!(
            bad_signature(handshake(&server, &ca, &agent, &other_key)),
            "a remembered chain with another key must fail"
        );
    }
}
