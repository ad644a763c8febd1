//! The HTTP CONNECT request head, as kube-apiserver's HTTPConnect egress sends it. Kept
//! apart from the frontend's I/O so the parser itself can be fuzzed.
use bytes::BytesMut;

/// Largest request head accepted (kube-apiserver sends a few dozen bytes).
pub const MAX_HEAD: usize = 16 * 1024;

#[derive(Debug, PartialEq, Eq)]
pub enum Head {
    /// Dial `address`; `rest` is what the client sent after the head.
    Connect { address: String, rest: BytesMut },
    /// Answer with this status and reason, then close.
    Refuse(u16, &'static str),
}

/// One attempt over what has been read so far; `None` means read more. On `Connect`,
/// `buf` keeps only the head (the bytes after it move to `rest`).
pub fn parse(buf: &mut BytesMut) -> Option<Head> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => {
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
            // The request target is the dial address; Host only if the target is empty.
            let address = if target.is_empty() { host } else { target }.to_string();
            if address.is_empty() || !address.contains(':') {
                return Some(Head::Refuse(400, "CONNECT needs a host:port target"));
            }
            let rest = buf.split_off(len);
            Some(Head::Connect { address, rest })
        }
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => None,
        Ok(httparse::Status::Partial) => Some(Head::Refuse(431, "request header too large")),
        Err(_) => Some(Head::Refuse(400, "malformed HTTP request")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(s: &str) -> Option<Head> {
        parse(&mut BytesMut::from(s.as_bytes()))
    }

    #[test]
    fn connect_target_wins_over_host_and_rest_is_kept() {
        match parse_str("CONNECT 10.0.0.1:10250 HTTP/1.1\r\nHost: x:1\r\n\r\nhello") {
            Some(Head::Connect { address, rest }) => {
                assert_eq!(address, "10.0.0.1:10250");
                assert_eq!(&rest[..], b"hello");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn refusals() {
        assert_eq!(
            parse_str("GET / HTTP/1.1\r\n\r\n"),
            Some(Head::Refuse(
                405,
                "this proxy only supports CONNECT passthrough"
            ))
        );
        assert!(matches!(
            parse_str("CONNECT nohost HTTP/1.1\r\n\r\n"),
            Some(Head::Refuse(400, _))
        ));
        assert!(matches!(
            parse_str("\x01\x02 garbage\r\n\r\n"),
            Some(Head::Refuse(400, _))
        ));
        assert_eq!(parse_str("CONNECT a:1 HTTP/1.1\r\n"), None);
        let big = format!("CONNECT a:1 HTTP/1.1\r\nX: {}\r\n", "y".repeat(MAX_HEAD));
        assert!(matches!(parse_str(&big), Some(Head::Refuse(431, _))));
    }
}
