//! Spoke's HTTP/2 connection core (`spoke_tunnel::http2::conn`) as a hostile peer meets it:
//! bytes in reads of varying sizes, after the preface (server) or not (client).
use super::{Checks, Input};
use bytes::BytesMut;
use spoke_tunnel::http2::conn::{Config, Connection, Event, Role};
use spoke_tunnel::http2::frame::PREFACE;
use spoke_tunnel::http2::headers::Headers;

/// What the connection made of the bytes: its events, what it sent, and the error that
/// ended it, if one did.
#[derive(Clone, Debug, PartialEq)]
struct Outcome {
    events: Vec<String>,
    output: Vec<u8>,
    error: Option<String>,
}

fn run(role: Role, stream: &[u8], sizes: &[usize]) -> Outcome {
    // Small limits, so that windows, frame sizes and stream limits are all reached.
    let config = Config {
        max_frame_size: 16_384,
        stream_window: 1000,
        connection_window: 70_000,
        max_concurrent_streams: 3,
        max_header_list_size: 2048,
    };
    let mut c = Connection::new(role, config);
    if role == Role::Client {
        let mut h = Headers::new();
        h.push(":method", "POST")
            .push(":path", "/AgentService/Connect");
        let _ = c.open(&h, false);
    }
    let mut out = Outcome {
        events: Vec::new(),
        output: Vec::new(),
        error: None,
    };
    let mut buf = BytesMut::new();
    let mut rest = stream;
    let mut turn = 0;
    while !rest.is_empty() && out.error.is_none() {
        let n = sizes[turn % sizes.len()].min(rest.len());
        turn += 1;
        buf.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        if let Err(e) = c.recv(&mut buf) {
            out.error = Some(e.to_string());
            c.go_away(e.reason, &e.why);
        }
        let failed = out.error.is_some();
        while let Some(ev) = c.next_event() {
            // Answer as a user of the connection would: take data, reply to requests; after a
            // connection error nothing is answered (the driver ends the connection).
            match &ev {
                _ if failed => {}
                Event::Data { stream, data, .. } => c.release(*stream, data.len()),
                Event::Headers { stream, .. } if role == Role::Server => {
                    let mut h = Headers::new();
                    h.push(":status", "200");
                    c.send_headers(*stream, &h, false);
                    let room = c.send_capacity(*stream).min(c.max_send_frame()).min(5000);
                    c.send_data(
                        *stream,
                        b"hi",
                        vec![7u8; room.saturating_sub(2)].into(),
                        false,
                    );
                }
                _ => {}
            }
            out.events.push(format!("{ev:?}"));
        }
        assert!(
            c.send_capacity(u32::MAX) == 0,
            "capacity for a stream that never existed"
        );
    }
    while let Some(b) = c.take_output() {
        out.output.extend_from_slice(&b);
    }
    out
}

/// Input: a byte choosing read sizes, a byte choosing the role, then the peer's bytes.
pub fn http2_with(data: &[u8], _checks: Checks) {
    let mut input = Input::new(data);
    let split = usize::from(input.u8()).max(1);
    let role = if input.u8() & 1 == 0 {
        Role::Server
    } else {
        Role::Client
    };
    let mut stream = if role == Role::Server {
        PREFACE.to_vec()
    } else {
        Vec::new()
    };
    stream.extend_from_slice(input.bytes(usize::MAX));
    let whole = run(role, &stream, &[usize::MAX]);
    // How the peer's bytes fall into reads must not change what the connection does: the
    // events and the error always. What it sends depends on them too, but where our answers
    // fall among the frames the connection sends by itself (SETTINGS and PING acks, window
    // updates) and how much DATA the window allows at that moment depend on where the reads
    // fell; so of the output, the answers' HEADERS frames are compared, stream by stream,
    // unless an error or reset cut the exchange short.
    let cut_short = whole.error.is_some() || whole.events.iter().any(|e| e.starts_with("Reset"));
    for sizes in [&[1][..], &[split, 1, 9], &[split * 37 + 5]] {
        let mut split_run = run(role, &stream, sizes);
        let mut whole = whole.clone();
        for out in [&mut split_run.output, &mut whole.output] {
            *out = if cut_short {
                Vec::new()
            } else {
                header_frames(out)
            };
        }
        assert_eq!(split_run, whole, "read sizes {sizes:?} changed the outcome");
    }
}

/// The HEADERS frames (head and payload) in `output`, in order.
fn header_frames(output: &[u8]) -> Vec<u8> {
    let mut headers = Vec::new();
    let mut rest = output;
    while rest.len() >= 9 {
        let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        let end = (9 + len).min(rest.len());
        if rest[3] == 1 {
            headers.extend_from_slice(&rest[..end]);
        }
        rest = &rest[end..];
    }
    headers
}
