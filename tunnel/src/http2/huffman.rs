//! HPACK's Huffman code (RFC 7541 §5.2, Appendix B), decoding only.
//!
//! Why our own: the HPACK crates of the ecosystem (loona-hpack and the `hpack` forks) build
//! two hash maps of all 257 codes for every Huffman string they decode; with a reconnect
//! storm of agents whose headers are Huffman-coded (grpc-go, h2), that was ~40% of the
//! server's CPU. The code is canonical, so it is fully described by each symbol's code
//! length; the decode tables below are derived from those lengths at compile time.

/// Code length in bits of each symbol, 0..=255 and EOS (256), from RFC 7541 Appendix B.
const LENGTHS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, //
    28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28, //
    6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, // ' '..'/'
    5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, // '0'..'?'
    13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, // '@'..'O'
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, // 'P'..'_'
    15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5, // '`'..'o'
    6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, // 'p'..DEL
    20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23, //
    24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, //
    22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, //
    21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23, //
    26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, //
    19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, //
    20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23, //
    26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, //
    30, // EOS
];

const EOS: u16 = 256;
const MAX_LEN: usize = 30;
/// Codes up to this length are found with one table lookup (they cover the common text).
const FAST_BITS: u32 = 8;

struct Tables {
    /// By the first `FAST_BITS` bits: the symbol and its length, or length 0 for longer codes.
    fast: [(u16, u8); 1 << FAST_BITS],
    /// Canonical decoding of longer codes: per length, the first code, how many codes there
    /// are, and where their symbols start in `sorted`.
    first: [u32; MAX_LEN + 1],
    count: [u32; MAX_LEN + 1],
    offset: [u16; MAX_LEN + 1],
    /// Symbols in code order (by length, then value).
    sorted: [u16; 257],
}

/// Canonical code assignment: within each length, codes count up in symbol order; moving to
/// the next length appends a zero bit.
const fn build() -> Tables {
    let mut t = Tables {
        fast: [(0, 0); 1 << FAST_BITS],
        first: [0; MAX_LEN + 1],
        count: [0; MAX_LEN + 1],
        offset: [0; MAX_LEN + 1],
        sorted: [0; 257],
    };
    let mut code = 0u32;
    let mut n = 0usize;
    let mut len = 1;
    while len <= MAX_LEN {
        t.first[len] = code;
        t.offset[len] = n as u16;
        let mut sym = 0;
        while sym < 257 {
            if LENGTHS[sym] as usize == len {
                t.sorted[n] = sym as u16;
                n += 1;
                t.count[len] += 1;
                if len as u32 <= FAST_BITS {
                    let shift = FAST_BITS - len as u32;
                    let mut p = code << shift;
                    while p < (code + 1) << shift {
                        t.fast[p as usize] = (sym as u16, len as u8);
                        p += 1;
                    }
                }
                code += 1;
            }
            sym += 1;
        }
        code <<= 1;
        len += 1;
    }
    t
}

static TABLES: Tables = build();

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HuffmanError {
    /// The string contains the EOS symbol.
    Eos,
    /// The string ends in more than 7 bits of padding, or in padding that is not all ones.
    Padding,
}

/// The symbol at the top of `window` (bits left-aligned; a complete code always fits in
/// its top 30 bits) and its code length.
fn symbol(window: u64) -> (u16, u32) {
    let t = &TABLES;
    let (sym, len) = t.fast[(window >> (64 - FAST_BITS)) as usize];
    if len != 0 {
        return (sym, u32::from(len));
    }
    let mut len = FAST_BITS as usize + 1;
    while len <= MAX_LEN {
        let code = (window >> (64 - len)) as u32;
        let i = code.wrapping_sub(t.first[len]);
        if i < t.count[len] {
            return (t.sorted[t.offset[len] as usize + i as usize], len as u32);
        }
        len += 1;
    }
    // Unreachable: the code is complete (every 30-bit string starts with a code; all ones
    // is EOS), so some length above matched.
    (EOS, MAX_LEN as u32)
}

/// Appends the decoding of `src` to `dst`.
pub fn decode(src: &[u8], dst: &mut Vec<u8>) -> Result<(), HuffmanError> {
    // Codes average under 8 bits for header text: reserve for the common case.
    dst.reserve(src.len() * 8 / 5);
    // Unconsumed bits, left-aligned.
    let mut acc = 0u64;
    let mut bits = 0u32;
    let mut rest = src;
    loop {
        while bits <= 56 {
            let Some((&b, tail)) = rest.split_first() else {
                break;
            };
            acc |= u64::from(b) << (56 - bits);
            bits += 8;
            rest = tail;
        }
        if bits == 0 {
            return Ok(());
        }
        // Past the end, read ones: a code that fits in the real bits is a real symbol; one
        // that needs the padding means only padding is left.
        let window = acc | u64::MAX.checked_shr(bits).unwrap_or(0);
        let (sym, len) = symbol(window);
        if len > bits {
            // No code of 8 bits or fewer is all ones, so this is the end: at most 7 bits,
            // all ones (a prefix of EOS).
            return if bits <= 7 && window == u64::MAX {
                Ok(())
            } else {
                Err(HuffmanError::Padding)
            };
        }
        if sym == EOS {
            return Err(HuffmanError::Eos);
        }
        dst.push(sym as u8);
        acc <<= len;
        bits -= len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoded(hex: &str) -> Result<Vec<u8>, HuffmanError> {
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
            .collect();
        let mut out = Vec::new();
        decode(&bytes, &mut out).map(|()| out)
    }

    /// Encodes with the codes the tables were built from (bit by bit, the slow obvious way).
    fn encode(text: &[u8]) -> Vec<u8> {
        let t = &TABLES;
        let mut code_of = [0u32; 257];
        for len in 1..=MAX_LEN {
            for i in 0..t.count[len] {
                code_of[t.sorted[t.offset[len] as usize + i as usize] as usize] = t.first[len] + i;
            }
        }
        let mut bits: Vec<bool> = Vec::new();
        for &b in text {
            let len = LENGTHS[b as usize];
            for k in (0..len).rev() {
                bits.push(code_of[b as usize] >> k & 1 == 1);
            }
        }
        while !bits.len().is_multiple_of(8) {
            bits.push(true);
        }
        bits.chunks(8)
            .map(|c| c.iter().fold(0u8, |a, &b| a << 1 | u8::from(b)))
            .collect()
    }

    #[test]
    fn rfc7541_appendix_c4_and_c6_strings() {
        for (hex, text) in [
            ("f1e3c2e5f23a6ba0ab90f4ff", "www.example.com"),
            ("a8eb10649cbf", "no-cache"),
            ("25a849e95ba97d7f", "custom-key"),
            ("25a849e95bb8e8b4bf", "custom-value"),
            ("6402", "302"),
            ("aec3771a4b", "private"),
            (
                "d07abe941054d444a8200595040b8166e082a62d1bff",
                "Mon, 21 Oct 2013 20:13:21 GMT",
            ),
            ("9d29ad171863c78f0b97c8e9ae82ae43d3", "https://www.example.com"),
            (
                "94e7821dd7f2e6c7b335dfdfcd5b3960d5af27087f3672c1ab270fb5291f9587316065c003ed4ee5b1063d5007",
                "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1",
            ),
        ] {
            assert_eq!(decoded(hex).as_deref(), Ok(text.as_bytes()), "{text}");
        }
    }

    #[test]
    fn every_octet_round_trips() {
        let all: Vec<u8> = (0..=255).collect();
        let mut out = Vec::new();
        decode(&encode(&all), &mut out).expect("decode");
        assert_eq!(out, all);
        // The code is complete: lengths satisfy Kraft's equality.
        let kraft: f64 = LENGTHS.iter().map(|&l| 0.5f64.powi(i32::from(l))).sum();
        assert!((kraft - 1.0).abs() < 1e-12, "{kraft}");
    }

    #[test]
    fn padding_and_eos_rules() {
        assert_eq!(decoded(""), Ok(vec![]));
        // '0' is 00000: three ones of padding are fine.
        assert_eq!(decoded("07"), Ok(b"0".to_vec()));
        // Padding of zeros is not.
        assert_eq!(decoded("00"), Err(HuffmanError::Padding));
        // A full byte of ones is over 7 bits of padding.
        assert_eq!(decoded("ff"), Err(HuffmanError::Padding));
        assert_eq!(decoded("07ff"), Err(HuffmanError::Padding));
        // EOS itself (30 ones), padded: an error, not the end.
        assert_eq!(decoded("ffffffff"), Err(HuffmanError::Eos));
        // '\0' (1111111111000) then three zero bits.
        assert_eq!(decoded("ffc0"), Err(HuffmanError::Padding));
        // The first 8 bits of a longer code, then the end.
        assert_eq!(decoded("fe"), Err(HuffmanError::Padding));
    }

    #[test]
    fn long_codes_and_mixed_text() {
        for text in [
            &b"\x00\x01\xfe\xff\x7f{}|~\\^"[..],
            b"Bearer eyJhbGciOiJSUzI1NiIsImtpZCI6IiJ9.eyJhdWQiOlsic3lzdGVtOmtvbm5lY3Rpdml0eSJdfQ",
            b"/agent.AgentService/Connect",
        ] {
            let mut out = Vec::new();
            decode(&encode(text), &mut out).expect("decode");
            assert_eq!(out, text);
        }
    }
}
