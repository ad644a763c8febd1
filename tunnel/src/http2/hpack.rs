//! HPACK decoding (RFC 7541): header blocks into (name, value) fields.
//!
//! Our own for speed (see `huffman`): the decoder is on every stream's open, and a reconnect
//! storm opens thousands. Encoding stays with loona-hpack: we never index nor Huffman-code,
//! so it costs little there.
use bytes::Bytes;
use std::collections::VecDeque;

use super::huffman::{self, HuffmanError};

/// The static table, RFC 7541 Appendix A (index 1 first).
const STATIC: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// The dynamic table's size before any SETTINGS (RFC 9113 §6.5.2).
const DEFAULT_TABLE_SIZE: usize = 4096;

/// Per-entry overhead in the table's size accounting (RFC 7541 §4.1).
const ENTRY_OVERHEAD: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HpackError {
    /// The block ends inside a representation.
    Truncated,
    /// An integer of more than four continuation octets (2^28 and up).
    IntegerOverflow,
    /// Index 0, or past the end of the static and dynamic tables.
    BadIndex(usize),
    Huffman(HuffmanError),
    /// A dynamic table size update above the limit we announced.
    TableSizeOverLimit(usize),
    /// A dynamic table size update after the first field of a block.
    LateTableSizeUpdate,
}

impl std::fmt::Display for HpackError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HpackError::Truncated => write!(f, "header block ends inside a field"),
            HpackError::IntegerOverflow => write!(f, "integer too large"),
            HpackError::BadIndex(i) => write!(f, "no table entry at index {i}"),
            HpackError::Huffman(HuffmanError::Eos) => write!(f, "EOS inside a Huffman string"),
            HpackError::Huffman(HuffmanError::Padding) => {
                write!(f, "Huffman string ends in invalid padding")
            }
            HpackError::TableSizeOverLimit(n) => {
                write!(f, "dynamic table size {n} above the limit")
            }
            HpackError::LateTableSizeUpdate => {
                write!(f, "dynamic table size update after a field")
            }
        }
    }
}

impl std::error::Error for HpackError {}

pub struct Decoder {
    /// Newest first, as the indices count.
    table: VecDeque<(Bytes, Bytes)>,
    size: usize,
    max_size: usize,
    /// SETTINGS_HEADER_TABLE_SIZE as we announced it: the encoder may not go above.
    limit: usize,
}

impl Decoder {
    /// `limit`: the SETTINGS_HEADER_TABLE_SIZE we announce. The table starts at the protocol's
    /// 4,096 bytes whatever we announce, as h2 and loona-hpack do: the encoder moves to our
    /// setting with a size update, which may not exceed `limit`.
    pub fn new(limit: usize) -> Decoder {
        Decoder {
            table: VecDeque::new(),
            size: 0,
            max_size: DEFAULT_TABLE_SIZE,
            limit,
        }
    }

    /// Decodes one complete header block, handing each field to `field` in order.
    /// After an error the table may be out of step with the peer's: the connection is done.
    pub fn decode(
        &mut self,
        block: &[u8],
        mut field: impl FnMut(Bytes, Bytes),
    ) -> Result<(), HpackError> {
        let mut r = Reader { buf: block };
        let mut fields_seen = false;
        while let Some(&first) = r.buf.first() {
            if first & 0x80 != 0 {
                // Indexed field.
                let index = r.integer(7)?;
                let (n, v) = self.entry(index)?;
                field(n, v);
            } else if first & 0xc0 == 0x40 {
                // Literal with incremental indexing.
                let (n, v) = self.literal(&mut r, 6)?;
                self.insert(n.clone(), v.clone());
                field(n, v);
            } else if first & 0xe0 == 0x20 {
                if fields_seen {
                    return Err(HpackError::LateTableSizeUpdate);
                }
                let size = r.integer(5)?;
                if size > self.limit {
                    return Err(HpackError::TableSizeOverLimit(size));
                }
                self.max_size = size;
                self.evict(0);
                continue;
            } else {
                // Literal without indexing (0000) or never indexed (0001): same to a proxy
                // that does not re-encode.
                let (n, v) = self.literal(&mut r, 4)?;
                field(n, v);
            }
            fields_seen = true;
        }
        Ok(())
    }

    fn literal(&self, r: &mut Reader<'_>, prefix: u8) -> Result<(Bytes, Bytes), HpackError> {
        let index = r.integer(prefix)?;
        let name = if index == 0 {
            r.string()?
        } else {
            self.entry(index)?.0
        };
        Ok((name, r.string()?))
    }

    fn entry(&self, index: usize) -> Result<(Bytes, Bytes), HpackError> {
        match index {
            1..=61 => {
                let (n, v) = STATIC[index - 1];
                Ok((
                    Bytes::from_static(n.as_bytes()),
                    Bytes::from_static(v.as_bytes()),
                ))
            }
            _ => index
                .checked_sub(62)
                .and_then(|i| self.table.get(i))
                .cloned()
                .ok_or(HpackError::BadIndex(index)),
        }
    }

    fn insert(&mut self, name: Bytes, value: Bytes) {
        let size = name.len() + value.len() + ENTRY_OVERHEAD;
        if size > self.max_size {
            // Not an error: the table just empties (RFC 7541 §4.4).
            self.table.clear();
            self.size = 0;
            return;
        }
        self.evict(size);
        self.size += size;
        self.table.push_front((name, value));
    }

    /// Drops the oldest entries until `room` more bytes fit.
    fn evict(&mut self, room: usize) {
        while self.size + room > self.max_size {
            let Some((n, v)) = self.table.pop_back() else {
                break;
            };
            self.size -= n.len() + v.len() + ENTRY_OVERHEAD;
        }
    }
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl Reader<'_> {
    /// An integer with an N-bit prefix (RFC 7541 §5.1). The bits above the prefix in the
    /// first octet are the representation's type, already read by the caller.
    fn integer(&mut self, prefix: u8) -> Result<usize, HpackError> {
        let (&first, rest) = self.buf.split_first().ok_or(HpackError::Truncated)?;
        self.buf = rest;
        let max = (1usize << prefix) - 1;
        let mut value = usize::from(first) & max;
        if value < max {
            return Ok(value);
        }
        // Four continuation octets, as h2 allows: values below 2^28, enough for any size or
        // index we could accept (and within a 32-bit usize); more is an attack or garbage.
        const MAX_SHIFT: u32 = 21;
        let mut shift = 0;
        loop {
            let (&b, rest) = self.buf.split_first().ok_or(HpackError::Truncated)?;
            self.buf = rest;
            value += usize::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
            shift += 7;
            if shift > MAX_SHIFT {
                return Err(HpackError::IntegerOverflow);
            }
        }
    }

    /// A string literal (RFC 7541 §5.2), Huffman-decoded if so marked.
    fn string(&mut self) -> Result<Bytes, HpackError> {
        let huffman = self.buf.first().ok_or(HpackError::Truncated)? & 0x80 != 0;
        let len = self.integer(7)?;
        if len > self.buf.len() {
            return Err(HpackError::Truncated);
        }
        let (raw, rest) = self.buf.split_at(len);
        self.buf = rest;
        if !huffman {
            return Ok(Bytes::copy_from_slice(raw));
        }
        let mut out = Vec::new();
        huffman::decode(raw, &mut out).map_err(HpackError::Huffman)?;
        // The decoder reserves for the shortest codes (8/5 of the input); long codes decode to
        // far less, and what a field keeps (it may live on in the dynamic table) is its length.
        if out.capacity() > out.len() + out.len() / 4 {
            out.shrink_to_fit();
        }
        Ok(Bytes::from(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    fn fields(d: &mut Decoder, block: &str) -> Result<Vec<(String, String)>, HpackError> {
        let mut out = Vec::new();
        d.decode(&hex(block), |n, v| {
            out.push((
                String::from_utf8_lossy(&n).into_owned(),
                String::from_utf8_lossy(&v).into_owned(),
            ))
        })?;
        Ok(out)
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    /// RFC 7541 C.3 and C.4: three requests on one connection, without and with Huffman;
    /// the second and third reuse the first's dynamic table entries.
    #[test]
    fn rfc7541_request_examples() {
        for blocks in [
            [
                "828684410f7777772e6578616d706c652e636f6d",
                "828684be58086e6f2d6361636865",
                "828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565",
            ],
            [
                "828684418cf1e3c2e5f23a6ba0ab90f4ff",
                "828684be5886a8eb10649cbf",
                "828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf",
            ],
        ] {
            let mut d = Decoder::new(4096);
            let base = [
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
            ];
            assert_eq!(fields(&mut d, blocks[0]), Ok(pairs(&base)));
            let mut second = base.to_vec();
            second.push(("cache-control", "no-cache"));
            assert_eq!(fields(&mut d, blocks[1]), Ok(pairs(&second)));
            assert_eq!(
                fields(&mut d, blocks[2]),
                Ok(pairs(&[
                    (":method", "GET"),
                    (":scheme", "https"),
                    (":path", "/index.html"),
                    (":authority", "www.example.com"),
                    ("custom-key", "custom-value"),
                ]))
            );
            // Three entries inserted: 57 + 53 + 54 bytes.
            assert_eq!(d.size, 164);
            assert_eq!(d.table.len(), 3);
        }
    }

    /// RFC 7541 C.5: responses with a 256-byte table, so entries are evicted.
    #[test]
    fn rfc7541_response_examples_evict() {
        let mut d = Decoder::new(256);
        // The encoder moves the table to our 256 bytes first (3fe101: a size update to 256).
        let first = fields(
            &mut d,
            "3fe1014803333032580770726976617465611d4d6f6e2c203231204f637420323031332032303a31333a323120474d546e1768747470733a2f2f7777772e6578616d706c652e636f6d",
        );
        assert_eq!(
            first,
            Ok(pairs(&[
                (":status", "302"),
                ("cache-control", "private"),
                ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
                ("location", "https://www.example.com"),
            ]))
        );
        assert_eq!(d.size, 222);
        let second = fields(&mut d, "4803333037c1c0bf");
        assert_eq!(
            second,
            Ok(pairs(&[
                (":status", "307"),
                ("cache-control", "private"),
                ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
                ("location", "https://www.example.com"),
            ]))
        );
        // ":status: 302" was evicted to make room for ":status: 307".
        assert_eq!(d.size, 222);
        assert_eq!(d.table.len(), 4);
    }

    #[test]
    fn bad_input_is_an_error() {
        let mut d = Decoder::new(4096);
        // Index 0, and an index past both tables.
        assert_eq!(fields(&mut d, "80"), Err(HpackError::BadIndex(0)));
        assert_eq!(fields(&mut d, "be"), Err(HpackError::BadIndex(62)));
        // Integer running on, or cut off.
        assert_eq!(
            fields(&mut d, "ffffffffffff7f"),
            Err(HpackError::IntegerOverflow)
        );
        // Redundant continuation octets are legal, up to four (as h2); a fifth is refused.
        assert_eq!(fields(&mut d, "ff80808000"), Err(HpackError::BadIndex(127)));
        assert_eq!(
            fields(&mut d, "ff8080808000"),
            Err(HpackError::IntegerOverflow)
        );
        assert_eq!(fields(&mut d, "ff"), Err(HpackError::Truncated));
        assert_eq!(fields(&mut d, "ff80"), Err(HpackError::Truncated));
        // A string longer than the block, and a literal without its value.
        assert_eq!(fields(&mut d, "400a6162"), Err(HpackError::Truncated));
        assert_eq!(fields(&mut d, "0f01"), Err(HpackError::Truncated));
        // Table size above what we announced, and an update after a field.
        assert_eq!(
            fields(&mut d, "3fe21f"),
            Err(HpackError::TableSizeOverLimit(4097))
        );
        assert_eq!(fields(&mut d, "8220"), Err(HpackError::LateTableSizeUpdate));
        // Huffman padding of zeros.
        assert_eq!(
            fields(&mut d, "0f018100"),
            Err(HpackError::Huffman(HuffmanError::Padding))
        );
    }

    #[test]
    fn table_size_update_shrinks_and_evicts() {
        let mut d = Decoder::new(4096);
        fields(&mut d, "400a637573746f6d2d6b65790c637573746f6d2d76616c7565").expect("insert");
        assert_eq!(d.table.len(), 1);
        // Size 0 then back to 4096, at the start of the next block: the table is empty.
        assert_eq!(
            fields(&mut d, "203fe11f82"),
            Ok(pairs(&[(":method", "GET")]))
        );
        assert_eq!(d.table.len(), 0);
        assert_eq!(fields(&mut d, "be"), Err(HpackError::BadIndex(62)));
        // An entry larger than the table empties it rather than failing.
        let mut small = Decoder::new(40);
        // Until the encoder's size update, the table is the protocol's 4,096 bytes.
        assert_eq!(small.max_size, 4096);
        fields(&mut small, "3f09").expect("a size update to 40");
        assert_eq!(small.max_size, 40);
        assert_eq!(
            fields(&mut small, "3f0a"),
            Err(HpackError::TableSizeOverLimit(41))
        );
        fields(&mut small, "4001610162").expect("fits: 34 bytes");
        assert_eq!(small.table.len(), 1);
        // "a": "bcdefghi" is 41 bytes.
        fields(&mut small, "400161086263646566676869").expect("too big is no error");
        assert_eq!((small.table.len(), small.size), (0, 0));
    }
}
