//! gRPC over HTTP/2 (the PROTOCOL-HTTP2 spec): request and response headers, trailers with
//! status, and length-prefixed messages — Konnectivity `Packet`s, whose DATA payload is
//! framed as a separate slice so it is never copied into an encode buffer.
use super::headers::Headers;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;
use spoke_proto::packet::Payload;
use spoke_proto::{Packet, PacketType};
use tonic::Code;

/// The 5-byte prefix of a message: not compressed, then its length.
pub const PREFIX: usize = 5;

/// A packet as it goes out: a small head (gRPC prefix and protobuf fields, encoded) and a
/// body (the DATA payload, as it is).
pub struct Outgoing {
    pub head: Bytes,
    pub body: Bytes,
}

impl Outgoing {
    pub fn len(&self) -> usize {
        self.head.len() + self.body.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn varint_len(v: u64) -> usize {
    prost::encoding::encoded_len_varint(v)
}

/// Encodes a packet as one gRPC message. A DATA packet keeps its payload out of the head:
/// the bytes are what prost would write (fields in number order, defaults left out).
pub fn encode(p: &Packet) -> Outgoing {
    if let (Ok(PacketType::Data), Some(Payload::Data(d))) =
        (PacketType::try_from(p.r#type), &p.payload)
    {
        if d.error.is_empty() {
            let id = d.connect_id as u64;
            let id_field = if id == 0 { 0 } else { 1 + varint_len(id) };
            let data_field = if d.data.is_empty() {
                0
            } else {
                1 + varint_len(d.data.len() as u64) + d.data.len()
            };
            let inner = id_field + data_field;
            let msg = 2 + 1 + varint_len(inner as u64) + inner;
            let mut head = BytesMut::with_capacity(PREFIX + msg - d.data.len());
            head.put_u8(0);
            head.put_u32(msg as u32);
            head.put_slice(&[0x08, PacketType::Data as u8, 0x22]);
            prost::encoding::encode_varint(inner as u64, &mut head);
            if id != 0 {
                head.put_u8(0x08);
                prost::encoding::encode_varint(id, &mut head);
            }
            if !d.data.is_empty() {
                head.put_u8(0x1a);
                prost::encoding::encode_varint(d.data.len() as u64, &mut head);
            }
            return Outgoing {
                head: head.freeze(),
                body: d.data.clone(),
            };
        }
    }
    let len = p.encoded_len();
    let mut head = BytesMut::with_capacity(PREFIX + len);
    head.put_u8(0);
    head.put_u32(len as u32);
    // Writing into a buffer sized for it cannot fail.
    let _ = p.encode(&mut head);
    Outgoing {
        head: head.freeze(),
        body: Bytes::new(),
    }
}

/// Why a stream's messages could not be read.
#[derive(Debug, PartialEq, Eq)]
pub enum DeframeError {
    TooLarge(usize),
    Compressed,
}

/// Cuts one stream's DATA into messages. A message inside one DATA frame is a slice of it;
/// one that spans frames is gathered (the only copy on the receive path).
#[derive(Default)]
pub struct Deframer {
    partial: BytesMut,
}

impl Deframer {
    pub fn is_empty(&self) -> bool {
        self.partial.is_empty()
    }

    /// Bytes of a message not complete yet.
    pub fn buffered(&self) -> usize {
        self.partial.len()
    }

    /// Feeds `data`; complete messages go to `out`.
    pub fn push(
        &mut self,
        mut data: Bytes,
        max: usize,
        out: &mut Vec<Bytes>,
    ) -> Result<(), DeframeError> {
        while !data.is_empty() {
            if self.partial.is_empty() && data.len() >= PREFIX {
                let (flag, len) = prefix(&data);
                check(flag, len, max)?;
                if data.len() >= PREFIX + len {
                    data.advance(PREFIX);
                    out.push(data.split_to(len));
                    continue;
                }
            }
            // Gather: first the prefix, then the rest of the message.
            let need = if self.partial.len() < PREFIX {
                PREFIX - self.partial.len()
            } else {
                let (flag, len) = prefix(&self.partial);
                check(flag, len, max)?;
                PREFIX + len - self.partial.len()
            };
            let n = need.min(data.len());
            self.partial.extend_from_slice(&data.split_to(n));
            if self.partial.len() >= PREFIX {
                let (flag, len) = prefix(&self.partial);
                check(flag, len, max)?;
                if self.partial.len() == PREFIX + len {
                    let mut m = std::mem::take(&mut self.partial).freeze();
                    m.advance(PREFIX);
                    out.push(m);
                }
            }
        }
        Ok(())
    }
}

fn prefix(b: &[u8]) -> (u8, usize) {
    (b[0], u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize)
}

fn check(flag: u8, len: usize, max: usize) -> Result<(), DeframeError> {
    if flag != 0 {
        return Err(DeframeError::Compressed);
    }
    if len > max {
        return Err(DeframeError::TooLarge(len));
    }
    Ok(())
}

/// Decodes a message as a packet (a DATA payload stays a slice of `msg`).
pub fn decode(msg: Bytes) -> Result<Packet, prost::DecodeError> {
    Packet::decode(msg)
}

/// The headers of a request for `path`.
pub fn request(scheme: &str, authority: &str, path: &str, user_agent: &str) -> Headers {
    let mut h = Headers::new();
    h.push(":method", "POST")
        .push(":scheme", scheme.to_string())
        .push(":path", path.to_string())
        .push(":authority", authority.to_string())
        .push("content-type", "application/grpc")
        .push("user-agent", user_agent.to_string())
        .push("te", "trailers");
    h
}

/// Adds custom metadata, refusing a value HTTP/2 may not carry (control characters).
pub fn metadata(h: &mut Headers, key: &'static str, value: &str) -> Result<(), String> {
    http::HeaderValue::from_str(value).map_err(|_| format!("invalid {key} value"))?;
    h.push(key, value.to_string());
    Ok(())
}

/// The custom metadata of a header list (pseudo-headers left out), as tonic holds it.
pub fn metadata_map(h: &Headers) -> tonic::metadata::MetadataMap {
    let mut map = http::HeaderMap::new();
    for (n, v) in h.iter() {
        if n.starts_with(b":") {
            continue;
        }
        if let (Ok(n), Ok(v)) = (
            http::HeaderName::from_bytes(n),
            http::HeaderValue::from_bytes(v),
        ) {
            map.append(n, v);
        }
    }
    tonic::metadata::MetadataMap::from_headers(map)
}

/// The headers of a response that goes on.
pub fn response() -> Headers {
    let mut h = Headers::new();
    h.push(":status", "200")
        .push("content-type", "application/grpc");
    h
}

/// Trailers ending a call with `code`.
pub fn trailers(code: Code, message: &str) -> Headers {
    let mut h = Headers::new();
    push_status(&mut h, code, message);
    h
}

/// A response that is only trailers (a call refused before it started).
pub fn trailers_only(code: Code, message: &str) -> Headers {
    let mut h = response();
    push_status(&mut h, code, message);
    h
}

fn push_status(h: &mut Headers, code: Code, message: &str) {
    h.push("grpc-status", (code as i32).to_string());
    if !message.is_empty() {
        h.push("grpc-message", percent_encode(message));
    }
}

/// What a request asks for, once checked as a gRPC call: its path.
pub fn check_request(h: &Headers) -> Result<&str, (Code, String)> {
    if h.get(":method") != Some("POST") {
        return Err((Code::Unimplemented, "gRPC requires POST".into()));
    }
    let ct = h.get("content-type").unwrap_or("");
    if !(ct == "application/grpc"
        || ct.starts_with("application/grpc+")
        || ct.starts_with("application/grpc;"))
    {
        return Err((Code::Unknown, format!("content-type {ct:?} is not gRPC")));
    }
    if let Some(enc) = h.get("grpc-encoding") {
        if enc != "identity" {
            return Err((
                Code::Unimplemented,
                format!("grpc-encoding {enc} is not supported"),
            ));
        }
    }
    h.get(":path")
        .ok_or_else(|| (Code::Unimplemented, "no :path".into()))
}

/// The status in trailers (or a trailers-only response), if any.
pub fn status(h: &Headers) -> Option<(Code, String)> {
    let code = h.get("grpc-status")?.parse::<i32>().ok()?;
    let message = h
        .get("grpc-message")
        .map(percent_decode)
        .unwrap_or_default();
    Some((Code::from(code), message))
}

/// gRPC's percent-encoding of grpc-message: everything outside printable ASCII, and `%`.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet;

    fn whole(o: &Outgoing) -> Vec<u8> {
        [&o.head[..], &o.body[..]].concat()
    }

    #[test]
    fn data_packets_encode_as_prost_does_with_the_payload_apart() {
        for (id, data) in [
            (7i64, vec![1u8; 70_000]),
            (1, vec![]),
            (-5, vec![9]),
            (0, vec![3; 10]),
        ] {
            let p = packet::data(id, Bytes::from(data.clone()));
            let o = encode(&p);
            assert_eq!(&o.body[..], &data[..]);
            let mut want = vec![0u8];
            want.extend((p.encoded_len() as u32).to_be_bytes());
            want.extend(p.encode_to_vec());
            assert_eq!(whole(&o), want, "connect_id {id}");
        }
        let p = packet::close_rsp(3, "gone");
        assert!(encode(&p).body.is_empty());
    }

    #[test]
    fn messages_are_cut_however_the_frames_fall() {
        let msgs: Vec<Packet> = vec![
            packet::data(1, Bytes::from(vec![5u8; 100_000])),
            packet::dial_req("10.0.0.1:10250".into(), 42),
            packet::data(2, Bytes::new()),
        ];
        let wire: Vec<u8> = msgs.iter().flat_map(|p| whole(&encode(p))).collect();
        for step in [1usize, 7, 5, 16_384, 1 << 20] {
            let mut d = Deframer::default();
            let mut out = Vec::new();
            for chunk in wire.chunks(step) {
                d.push(Bytes::copy_from_slice(chunk), 1 << 20, &mut out)
                    .unwrap();
            }
            assert!(d.is_empty());
            let got: Vec<Packet> = out.into_iter().map(|m| decode(m).unwrap()).collect();
            assert_eq!(got, msgs, "step {step}");
        }
    }

    #[test]
    fn oversize_and_compressed_messages_are_refused() {
        let mut d = Deframer::default();
        let big = [0u8, 0, 0x10, 0, 0];
        assert_eq!(
            d.push(Bytes::copy_from_slice(&big), 1024, &mut vec![]),
            Err(DeframeError::TooLarge(0x100000))
        );
        let mut d = Deframer::default();
        assert_eq!(
            d.push(Bytes::from_static(&[1, 0, 0, 0, 1, 0]), 1024, &mut vec![]),
            Err(DeframeError::Compressed)
        );
    }

    #[test]
    fn status_round_trip() {
        let t = trailers(Code::Unavailable, "agent 100% gone\n");
        assert_eq!(
            status(&t),
            Some((Code::Unavailable, "agent 100% gone\n".into()))
        );
        assert_eq!(t.get("grpc-message"), Some("agent 100%25 gone%0A"));
    }
}
