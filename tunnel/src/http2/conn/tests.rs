//! The protocol rules, without sockets: one `Connection` talking to another, and to frames
//! written by hand where a peer breaks a rule.
use super::*;

fn pair() -> (Connection, Connection) {
    let c = Connection::new(Role::Client, Config::default());
    let s = Connection::new(Role::Server, Config::default());
    (c, s)
}

/// Moves everything `from` has to send into `to`.
fn pump(from: &mut Connection, to: &mut Connection) -> Result<(), ConnError> {
    let mut buf = BytesMut::new();
    while let Some(b) = from.take_output() {
        buf.extend_from_slice(&b);
    }
    to.recv(&mut buf)
}

fn events(c: &mut Connection) -> Vec<Event> {
    std::iter::from_fn(|| c.next_event()).collect()
}

fn req() -> Headers {
    let mut h = Headers::new();
    h.push(":method", "POST")
        .push(":path", "/x")
        .push(":authority", "/tmp/a.sock");
    h
}

#[test]
fn settings_are_acknowledged_and_windows_raised() {
    let (mut c, mut s) = pair();
    pump(&mut c, &mut s).unwrap();
    pump(&mut s, &mut c).unwrap();
    pump(&mut c, &mut s).unwrap();
    let id = c.open(&req(), false).unwrap();
    pump(&mut c, &mut s).unwrap();
    // Our settings raised the stream window from 65,535: 3 MiB fits in one go.
    assert!(c.send_capacity(id) >= 3 << 20, "{}", c.send_capacity(id));
    match &events(&mut s)[..] {
        [Event::WindowOpened { stream: 0 }, Event::Headers {
            stream: 1,
            headers,
            end_stream: false,
        }] => {
            assert_eq!(headers.get(":authority"), Some("/tmp/a.sock"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn data_past_the_window_is_a_flow_control_error() {
    let (mut c, mut s) = (
        Connection::new(Role::Client, Config::default()),
        Connection::new(
            Role::Server,
            Config {
                stream_window: 10,
                ..Config::default()
            },
        ),
    );
    pump(&mut c, &mut s).unwrap();
    pump(&mut s, &mut c).unwrap();
    let id = c.open(&req(), false).unwrap();
    assert_eq!(c.send_capacity(id), 10);
    // A peer that ignores the window: its stream is reset, the connection lives on.
    c.send_data(id, b"", Bytes::from_static(b"0123456789abc"), false);
    pump(&mut c, &mut s).unwrap();
    let ev = events(&mut s);
    assert!(
        ev.iter().any(|e| matches!(
            e,
            Event::Reset {
                stream: 1,
                reason: Reason::FLOW_CONTROL_ERROR,
                by_peer: false
            }
        )),
        "{ev:?}"
    );
    pump(&mut s, &mut c).unwrap();
    assert!(events(&mut c).iter().any(|e| matches!(
        e,
        Event::Reset {
            stream: 1,
            by_peer: true,
            ..
        }
    )));
}

#[test]
fn broken_rules_are_connection_errors() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("DATA on stream 0", vec![0, 0, 1, 0, 0, 0, 0, 0, 0, b'x']),
        (
            "PING of 4 bytes",
            vec![0, 0, 4, 6, 0, 0, 0, 0, 0, 1, 2, 3, 4],
        ),
        ("SETTINGS on a stream", vec![0, 0, 0, 4, 0, 0, 0, 0, 1]),
        ("CONTINUATION alone", vec![0, 0, 1, 9, 4, 0, 0, 0, 1, 0x82]),
        ("frame over our maximum", vec![0x20, 0, 0, 0, 0, 0, 0, 0, 1]),
        (
            "zero connection WINDOW_UPDATE",
            vec![0, 0, 4, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        ),
        ("PUSH_PROMISE", vec![0, 0, 4, 5, 4, 0, 0, 0, 1, 0, 0, 0, 2]),
        (
            "undecodable header block",
            vec![0, 0, 1, 1, 4, 0, 0, 0, 1, 0xff],
        ),
    ];
    for (what, bytes) in cases {
        let mut s = Connection::new(Role::Server, Config::default());
        let mut buf = BytesMut::from(super::frame::PREFACE);
        buf.extend_from_slice(&bytes);
        assert!(s.recv(&mut buf).is_err(), "{what} was accepted");
    }
}

#[test]
fn pings_are_answered_and_streams_over_the_limit_refused() {
    let mut s = Connection::new(
        Role::Server,
        Config {
            max_concurrent_streams: 1,
            ..Config::default()
        },
    );
    let mut c = Connection::new(Role::Client, Config::default());
    pump(&mut c, &mut s).unwrap();
    pump(&mut s, &mut c).unwrap();
    c.ping([7; 8]);
    let a = c.open(&req(), false).unwrap();
    // The client has not seen the server's limit yet (no pump): it opens a second one.
    pump(&mut c, &mut s).unwrap();
    let b = c.open(&req(), false);
    assert!(b.is_none(), "the server's limit of one stream applies");
    pump(&mut s, &mut c).unwrap();
    assert!(events(&mut c).contains(&Event::PingAck([7; 8])));
    assert!(c.is_open(a));
}

#[test]
fn header_blocks_split_over_continuations_and_trailers_close() {
    let (mut c, mut s) = pair();
    pump(&mut c, &mut s).unwrap();
    pump(&mut s, &mut c).unwrap();
    pump(&mut c, &mut s).unwrap();
    let mut big = req();
    big.push("x-big", "v".repeat(40_000));
    let id = c.open(&big, false).unwrap();
    pump(&mut c, &mut s).unwrap();
    let got = events(&mut s);
    assert!(got.iter().any(|e| matches!(e, Event::Headers { headers, .. } if headers.get("x-big").map(str::len) == Some(40_000))));
    let mut t = Headers::new();
    t.push("grpc-status", "0");
    s.send_headers(id, &t, true);
    c.send_data(id, b"", Bytes::new(), true);
    pump(&mut s, &mut c).unwrap();
    pump(&mut c, &mut s).unwrap();
    assert_eq!(c.stream_count(), 0);
    assert_eq!(s.stream_count(), 0);
}
