//! The HTTP CONNECT request head: spoke-server's own parser (`spoke_tunnel::connect_head`),
//! fed the way `frontend_http::read_head` feeds it, one read at a time.
use super::{Checks, Input};
use bytes::BytesMut;
use spoke_tunnel::connect_head::{parse, Head, MAX_HEAD};

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
        assert!(
            stream.ends_with(&rest[..]),
            "rest is not the tail of the stream"
        );
        // Reading piecemeal stops at a read boundary at or after the head: fewer bytes.
        for h in [&chunked, &chunked_big] {
            if let Some(Head::Connect { rest: r, .. }) = h {
                assert!(
                    rest.starts_with(&r[..]),
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
