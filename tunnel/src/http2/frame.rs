//! HTTP/2 frames (RFC 9113 §4, §6): the 9-byte header, the payloads this implementation
//! understands, and their encoding. Parsing never allocates for DATA: payloads are slices of
//! the receive buffer.
use bytes::{Buf, BufMut, Bytes, BytesMut};

pub const HEADER_LEN: usize = 9;
/// The client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The largest frame a peer must always accept, and the default maximum.
pub const DEFAULT_MAX_FRAME: u32 = 16_384;
/// The largest value SETTINGS_MAX_FRAME_SIZE may take.
pub const MAX_MAX_FRAME: u32 = (1 << 24) - 1;
/// Flow-control windows start here (RFC 9113 §6.9.2).
pub const DEFAULT_WINDOW: u32 = 65_535;
/// Windows may not pass this.
pub const MAX_WINDOW: u32 = (1 << 31) - 1;

pub mod kind {
    pub const DATA: u8 = 0x0;
    pub const HEADERS: u8 = 0x1;
    pub const PRIORITY: u8 = 0x2;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const PUSH_PROMISE: u8 = 0x5;
    pub const PING: u8 = 0x6;
    pub const GOAWAY: u8 = 0x7;
    pub const WINDOW_UPDATE: u8 = 0x8;
    pub const CONTINUATION: u8 = 0x9;
}

pub mod flag {
    pub const END_STREAM: u8 = 0x1;
    pub const ACK: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;
    pub const PADDED: u8 = 0x8;
    pub const PRIORITY: u8 = 0x20;
}

/// Error codes (RFC 9113 §7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reason(pub u32);

impl Reason {
    pub const NO_ERROR: Reason = Reason(0x0);
    pub const PROTOCOL_ERROR: Reason = Reason(0x1);
    pub const INTERNAL_ERROR: Reason = Reason(0x2);
    pub const FLOW_CONTROL_ERROR: Reason = Reason(0x3);
    pub const STREAM_CLOSED: Reason = Reason(0x5);
    pub const FRAME_SIZE_ERROR: Reason = Reason(0x6);
    pub const REFUSED_STREAM: Reason = Reason(0x7);
    pub const CANCEL: Reason = Reason(0x8);
    pub const COMPRESSION_ERROR: Reason = Reason(0x9);
    pub const ENHANCE_YOUR_CALM: Reason = Reason(0xb);

    pub fn name(self) -> &'static str {
        match self.0 {
            0x0 => "NO_ERROR",
            0x1 => "PROTOCOL_ERROR",
            0x2 => "INTERNAL_ERROR",
            0x3 => "FLOW_CONTROL_ERROR",
            0x4 => "SETTINGS_TIMEOUT",
            0x5 => "STREAM_CLOSED",
            0x6 => "FRAME_SIZE_ERROR",
            0x7 => "REFUSED_STREAM",
            0x8 => "CANCEL",
            0x9 => "COMPRESSION_ERROR",
            0xa => "CONNECT_ERROR",
            0xb => "ENHANCE_YOUR_CALM",
            0xc => "INADEQUATE_SECURITY",
            0xd => "HTTP_1_1_REQUIRED",
            _ => "unknown error code",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({:#x})", self.name(), self.0)
    }
}

/// A frame's fixed header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    pub len: u32,
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
}

impl Head {
    pub fn parse(b: &[u8]) -> Head {
        Head {
            len: u32::from_be_bytes([0, b[0], b[1], b[2]]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }

    pub fn encode(&self, out: &mut impl BufMut) {
        out.put_slice(&self.len.to_be_bytes()[1..]);
        out.put_u8(self.kind);
        out.put_u8(self.flags);
        out.put_u32(self.stream);
    }

    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }
}

/// SETTINGS parameters this implementation knows (RFC 9113 §6.5.2).
pub mod setting {
    pub const HEADER_TABLE_SIZE: u16 = 0x1;
    pub const ENABLE_PUSH: u16 = 0x2;
    pub const MAX_CONCURRENT_STREAMS: u16 = 0x3;
    pub const INITIAL_WINDOW_SIZE: u16 = 0x4;
    pub const MAX_FRAME_SIZE: u16 = 0x5;
    pub const MAX_HEADER_LIST_SIZE: u16 = 0x6;
}

/// What a connection error says: the code and why, for GOAWAY and the logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnError {
    pub reason: Reason,
    pub why: String,
}

impl ConnError {
    pub fn new(reason: Reason, why: impl Into<String>) -> ConnError {
        ConnError {
            reason,
            why: why.into(),
        }
    }
}

impl std::fmt::Display for ConnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason, self.why)
    }
}

impl std::error::Error for ConnError {}

/// Strips padding (and the priority fields of HEADERS) from a payload.
pub fn unpad(head: &Head, mut payload: Bytes) -> Result<Bytes, ConnError> {
    let bad = || ConnError::new(Reason::PROTOCOL_ERROR, "bad padding");
    let pad = if head.has(flag::PADDED) {
        if payload.is_empty() {
            return Err(bad());
        }
        usize::from(payload.get_u8())
    } else {
        0
    };
    if head.kind == kind::HEADERS && head.has(flag::PRIORITY) {
        if payload.len() < 5 {
            return Err(bad());
        }
        payload.advance(5);
    }
    if pad > payload.len() {
        return Err(bad());
    }
    payload.truncate(payload.len() - pad);
    Ok(payload)
}

/// Appends a whole frame.
pub fn put(out: &mut BytesMut, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    Head {
        len: payload.len() as u32,
        kind,
        flags,
        stream,
    }
    .encode(out);
    out.put_slice(payload);
}

pub fn put_settings(out: &mut BytesMut, values: &[(u16, u32)]) {
    let mut p = Vec::with_capacity(values.len() * 6);
    for (id, v) in values {
        p.extend_from_slice(&id.to_be_bytes());
        p.extend_from_slice(&v.to_be_bytes());
    }
    put(out, kind::SETTINGS, 0, 0, &p);
}

pub fn put_window_update(out: &mut BytesMut, stream: u32, increment: u32) {
    put(
        out,
        kind::WINDOW_UPDATE,
        0,
        stream,
        &increment.to_be_bytes(),
    );
}

pub fn put_rst(out: &mut BytesMut, stream: u32, reason: Reason) {
    put(out, kind::RST_STREAM, 0, stream, &reason.0.to_be_bytes());
}

pub fn put_goaway(out: &mut BytesMut, last_stream: u32, reason: Reason, debug: &[u8]) {
    let mut p = Vec::with_capacity(8 + debug.len());
    p.extend_from_slice(&last_stream.to_be_bytes());
    p.extend_from_slice(&reason.0.to_be_bytes());
    p.extend_from_slice(debug);
    put(out, kind::GOAWAY, 0, 0, &p);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_round_trip_and_reserved_bit() {
        let h = Head {
            len: 0x123456,
            kind: kind::HEADERS,
            flags: flag::END_HEADERS,
            stream: 7,
        };
        let mut b = BytesMut::new();
        h.encode(&mut b);
        assert_eq!(Head::parse(&b), h);
        b[5] |= 0x80; // the reserved bit is ignored on receipt
        assert_eq!(Head::parse(&b).stream, 7);
    }

    #[test]
    fn padding_and_priority_are_stripped_and_checked() {
        let head = |flags| Head {
            len: 0,
            kind: kind::HEADERS,
            flags,
            stream: 1,
        };
        let p = Bytes::from_static(&[2, 0, 0, 0, 1, 16, b'h', b'i', 0, 0]);
        let got = unpad(&head(flag::PADDED | flag::PRIORITY), p).unwrap();
        assert_eq!(&got[..], b"hi");
        let too_much = Bytes::from_static(&[9, b'x']);
        assert!(unpad(&head(flag::PADDED), too_much).is_err());
        assert!(unpad(&head(flag::PADDED), Bytes::new()).is_err());
    }
}
