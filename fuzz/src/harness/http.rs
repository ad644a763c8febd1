//! The HTTP CONNECT request head, as `server/src/frontend_http.rs` `read_head` reads it.
//!
//! TODO-lead: `read_head` is private to the spoke-server binary. This mirrors its logic
//! (httparse with 32 headers, 16 KiB head limit, request target else Host, `:` required)
//! until it is exposed; then `head()` below should call the real function instead.
use super::{Checks, Input};
use bytes::BytesMut;

/// Largest request head accepted (`frontend_http::MAX_HEAD`).
const MAX_HEAD: usize = 16 * 1024;

#[derive(Debug, PartialEq, Eq)]
enum Head {
    Connect { address: String, rest: Vec<u8> },
    Refuse(u16, &'static str),
}

/// One parse attempt over what has been read so far: `None` means read more.
fn parse(buf: &mut BytesMut) -> Option<Head> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => {
            assert!(
                len <= buf.len(),
                "httparse consumed {len} of {} bytes",
                buf.len()
            );
            if req.method != Some("CONNECT") {
                return Some(Head::Refuse(
                    405,
                    "this proxy only supports CONNECT passthrough",
                ));
            }
            let target = req.path.unwrap_or_default();
            let host = req
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("host"))
                .and_then(|h| std::str::from_utf8(h.value).ok())
                .unwrap_or_default();
            let address = if target.is_empty() { host } else { target }.to_string();
            if address.is_empty() || !address.contains(':') {
                return Some(Head::Refuse(400, "CONNECT needs a host:port target"));
            }
            let rest = buf.split_off(len);
            Some(Head::Connect {
                address,
                rest: rest.to_vec(),
            })
        }
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => None,
        Ok(httparse::Status::Partial) => Some(Head::Refuse(431, "request header too large")),
        Err(_) => Some(Head::Refuse(400, "malformed HTTP request")),
    }
}

/// `read_head` over `reads` (the successive results of `read_buf`); `None` at EOF.
fn head<'a>(reads: impl IntoIterator<Item = &'a [u8]>) -> Option<Head> {
    let mut buf = BytesMut::with_capacity(1024);
    for chunk in reads {
        if chunk.is_empty() {
            return None; // read_buf returned 0: EOF
        }
        buf.extend_from_slice(chunk);
        if let Some(h) = parse(&mut buf) {
            return Some(h);
        }
    }
    None
}

/// Input: one byte choosing how the stream is split into reads, then the stream.
pub fn http_connect_with(data: &[u8], _checks: Checks) {
    let mut input = Input::new(data);
    let split = input.u8();
    let stream = input.bytes(usize::MAX);

    // All at once, as one read.
    let whole = head([stream]);
    // Byte by byte is too slow for big inputs; use the chosen read size instead.
    let step = if stream.len() <= 512 {
        1
    } else {
        usize::from(split).max(1)
    };
    let chunked = head(stream.chunks(step));
    let chunked_big = head(stream.chunks(usize::from(split) * 64 + 1));

    if let Some(Head::Connect { address, rest }) = &whole {
        assert!(!address.is_empty() && address.contains(':'));
        assert!(stream.ends_with(rest), "rest is not the tail of the stream");
        // Reading piecemeal stops at a read boundary at or after the head: fewer bytes.
        for h in [&chunked, &chunked_big] {
            if let Some(Head::Connect { rest: r, .. }) = h {
                assert!(
                    rest.starts_with(r),
                    "piecemeal rest is not a prefix of the tail"
                );
            }
        }
    }

    // How the client's bytes are split into TCP segments must not change the answer:
    // if the whole head arrived at once and parsed, reading it piecemeal gives the same
    // head (only the bytes read past it may differ).
    if stream.len() < MAX_HEAD {
        let strip = |h: &Option<Head>| match h {
            Some(Head::Connect { address, .. }) => Some(Ok(address.clone())),
            Some(Head::Refuse(code, _)) => Some(Err(*code)),
            None => None,
        };
        if let Some(w) = strip(&whole) {
            assert_eq!(
                strip(&chunked),
                Some(w.clone()),
                "one read vs reads of {step}: {:?}",
                String::from_utf8_lossy(stream)
            );
            assert_eq!(strip(&chunked_big), Some(w));
        }
    }
}
