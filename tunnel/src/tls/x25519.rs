//! X25519 key exchange for rustls, computed by aws-lc-rs.
//!
//! Spoke's TLS otherwise runs on ring, whose X25519 costs a handshake about 28 µs more than
//! aws-lc's on this project's bench host: the server's side of a whole mTLS handshake, run in
//! memory, took about 90 µs of CPU with ring's and 62 with aws-lc's. An agent fleet
//! reconnecting to a restarted server pays that once per agent.
//! aws-lc-rs is already linked for the record layer ([`crate::http2::records`]); enabling
//! rustls' own aws-lc-rs provider instead would give the process two default providers, and
//! `ClientConfig::builder()` (kube-rs' TLS) panics when it cannot tell which to use.
//!
//! The private scalar comes from ring's RNG (the kernel's `getrandom`), as every other random
//! byte of Spoke's TLS does. aws-lc's own RNG seeds itself on first use, which took 30–36 ms
//! here: more than the first thousand handshakes save.
use aws_lc_rs::agreement::{self, PrivateKey, UnparsedPublicKey};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::crypto::{ActiveKeyExchange, SharedSecret, SupportedKxGroup};
use rustls::{Error, NamedGroup, PeerMisbehaved};

/// The X25519 group, for a [`rustls::crypto::CryptoProvider`]'s `kx_groups`.
pub static X25519: &dyn SupportedKxGroup = &X25519Group;

#[derive(Debug)]
struct X25519Group;

impl SupportedKxGroup for X25519Group {
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, Error> {
        let mut scalar = zeroize::Zeroizing::new([0u8; 32]);
        SystemRandom::new()
            .fill(scalar.as_mut())
            .map_err(|_| Error::FailedToGetRandomBytes)?;
        // aws-lc clamps the scalar itself (RFC 7748), as it would a generated one.
        let key = PrivateKey::from_private_key(&agreement::X25519, scalar.as_ref())
            .map_err(|_| Error::General("X25519 key generation failed".into()))?;
        let public = key
            .compute_public_key()
            .map_err(|_| Error::General("X25519 public key failed".into()))?;
        Ok(Box::new(Exchange {
            key,
            public: public.as_ref().to_vec(),
        }))
    }

    fn name(&self) -> NamedGroup {
        NamedGroup::X25519
    }
}

struct Exchange {
    key: PrivateKey,
    public: Vec<u8>,
}

impl ActiveKeyExchange for Exchange {
    fn complete(self: Box<Self>, peer: &[u8]) -> Result<SharedSecret, Error> {
        // aws-lc rejects a peer share of the wrong length and an all-zero result (a low-order
        // point), as RFC 8446 section 7.4.2 requires.
        agreement::agree(
            &self.key,
            UnparsedPublicKey::new(&agreement::X25519, peer),
            Error::PeerMisbehaved(PeerMisbehaved::InvalidKeyShare),
            |secret| Ok(SharedSecret::from(secret)),
        )
    }

    fn pub_key(&self) -> &[u8] {
        &self.public
    }

    fn group(&self) -> NamedGroup {
        NamedGroup::X25519
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both sides of an exchange agree, against ring's X25519 either way round, and a bad
    /// share is refused rather than yielding a secret.
    #[test]
    fn agrees_with_ring_and_refuses_bad_shares() {
        let ring = rustls::crypto::ring::kx_group::X25519;
        for (a, b) in [(X25519, ring), (ring, X25519), (X25519, X25519)] {
            let (ka, kb) = (a.start().unwrap(), b.start().unwrap());
            let pa = ka.pub_key().to_vec();
            let sa = ka.complete(kb.pub_key()).unwrap();
            let sb = kb.complete(&pa).unwrap();
            assert_eq!(sa.secret_bytes(), sb.secret_bytes());
            assert_eq!(sa.secret_bytes().len(), 32);
        }
        // The all-zero point has low order: its shared secret would be all zeros.
        assert!(X25519.start().unwrap().complete(&[0u8; 32]).is_err());
        assert!(X25519.start().unwrap().complete(&[9u8; 31]).is_err());
    }
}
