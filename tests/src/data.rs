//! Deterministic pseudo-random byte streams. A `(seed, length)` pair describes a payload, so the
//! receiving side verifies every byte against the generator instead of trusting a checksum sent
//! along with the data.

/// Generator of the byte stream for one seed; byte `i` depends only on `(seed, i)`.
#[derive(Debug, Clone)]
pub struct Pattern {
    seed: u64,
    pos: u64,
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Pattern {
    /// Stream for `seed`, positioned at offset 0.
    pub fn new(seed: u64) -> Self {
        Self { seed, pos: 0 }
    }

    /// Bytes produced (or verified) so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    fn word(&self, index: u64) -> [u8; 8] {
        splitmix64(self.seed ^ index.wrapping_mul(0xD6E8_FEB8_6659_FD93)).to_le_bytes()
    }

    /// Fills `buf` with the next `buf.len()` bytes of the stream.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut i = 0;
        while i < buf.len() {
            let word = self.word(self.pos / 8);
            let off = (self.pos % 8) as usize;
            let n = (8 - off).min(buf.len() - i);
            buf[i..i + n].copy_from_slice(&word[off..off + n]);
            i += n;
            self.pos += n as u64;
        }
    }

    /// Checks that `buf` equals the next bytes of the stream and advances. On mismatch returns the
    /// absolute offset of the first differing byte.
    pub fn verify(&mut self, buf: &[u8]) -> Result<(), u64> {
        let start = self.pos;
        let mut expected = vec![0u8; buf.len()];
        self.fill(&mut expected);
        match buf.iter().zip(&expected).position(|(a, b)| a != b) {
            None => Ok(()),
            Some(i) => Err(start + i as u64),
        }
    }
}

/// Incremental verifier of a received stream that must be exactly `len` bytes of `Pattern(seed)`.
#[derive(Debug)]
pub struct Verifier {
    pattern: Pattern,
    len: u64,
    first_mismatch: Option<u64>,
}

impl Verifier {
    /// Expects `len` bytes of the stream for `seed`.
    pub fn new(seed: u64, len: u64) -> Self {
        Self {
            pattern: Pattern::new(seed),
            len,
            first_mismatch: None,
        }
    }

    /// Feeds received bytes (bytes beyond `len` are counted and reported by [`Verifier::finish`]).
    pub fn feed(&mut self, buf: &[u8]) {
        if let Err(at) = self.pattern.verify(buf) {
            self.first_mismatch.get_or_insert(at);
        }
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.pattern.position()
    }

    /// Bytes still expected.
    pub fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.received())
    }

    /// Ok iff exactly `len` bytes arrived and all of them matched.
    pub fn finish(&self) -> anyhow::Result<()> {
        if let Some(at) = self.first_mismatch {
            anyhow::bail!(
                "payload corrupted: first differing byte at offset {at} (of {} expected)",
                self.len
            );
        }
        anyhow::ensure!(
            self.received() == self.len,
            "payload length mismatch: received {} bytes, expected {}",
            self.received(),
            self.len
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_is_position_independent() {
        let mut whole = vec![0u8; 1000];
        Pattern::new(7).fill(&mut whole);
        let mut p = Pattern::new(7);
        let mut parts = Vec::new();
        for n in [3, 5, 13, 979] {
            let mut b = vec![0u8; n];
            p.fill(&mut b);
            parts.extend(b);
        }
        assert_eq!(whole, parts);
    }

    #[test]
    fn verifier_detects_corruption_and_length() {
        let mut buf = vec![0u8; 100];
        Pattern::new(1).fill(&mut buf);
        let mut v = Verifier::new(1, 100);
        v.feed(&buf);
        assert!(v.finish().is_ok());
        buf[42] ^= 1;
        let mut v = Verifier::new(1, 100);
        v.feed(&buf);
        assert!(v.finish().unwrap_err().to_string().contains("offset 42"));
        let mut v = Verifier::new(1, 101);
        v.feed(&[]);
        assert!(v.finish().is_err());
    }
}
