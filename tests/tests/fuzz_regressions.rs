//! Fuzz regressions: every input a fuzz target ever crashed on (`fuzz/regressions/<target>/`)
//! and the seed corpus (`fuzz/seeds/<target>/`), replayed through the same harness code
//! the libFuzzer targets run (`fuzz/src/harness`, included here by path), plus direct
//! checks of the bugs fuzzing found. Runs as plain `cargo test`, no fuzzer needed.
//!
//! A bug found and reported but not fixed yet gets a `KnownBug` variant (its check then
//! runs only in strict mode) and an `#[ignore = "open bug: ..."]` test here; once fixed,
//! drop both. None is open (`AbandonedAnswer` and `CancelledDialAnswers` were fixed).
use std::path::{Path, PathBuf};

#[path = "../../fuzz/src/harness/mod.rs"]
mod harness;

use harness::Checks;

fn inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut files = Vec::new();
    for kind in ["regressions", "seeds"] {
        let Ok(dir) = std::fs::read_dir(root.join(kind).join(target)) else {
            continue;
        };
        files.extend(dir.map(|e| e.unwrap().path()).filter(|p| p.is_file()));
    }
    files.sort();
    files
}

fn replay(target: &str, run: fn(&[u8], Checks)) {
    let files = inputs(target);
    assert!(!files.is_empty(), "no inputs for {target}");
    for f in &files {
        let data = std::fs::read(f).unwrap();
        // A failure names the input: rerun it with
        // `cargo run --manifest-path fuzz/Cargo.toml --example replay -- <target> <file>`.
        eprintln!("replaying {}", f.display());
        run(&data, Checks::LENIENT);
    }
}

#[test]
fn packets_server_inputs() {
    replay("packets_server", harness::packets_server_with);
}

#[test]
fn packets_agent_inputs() {
    replay("packets_agent", harness::packets_agent_with);
}

#[test]
fn http_connect_inputs() {
    replay("http_connect", harness::http_connect_with);
}

#[test]
fn http2_inputs() {
    replay("http2", harness::http2_with);
}

#[test]
fn hpack_inputs() {
    replay("hpack", harness::hpack_with);
}

#[test]
fn identifiers_inputs() {
    replay("identifiers", harness::identifiers_with);
}

#[test]
fn flags_inputs() {
    replay("flags", harness::flags_with);
}

// ---- Bugs found by fuzzing (all fixed), checked directly on the library code. ----

/// `flags::go_duration` computes in f64 seconds and hands the total to
/// `Duration::from_secs_f64`, which panicked past ~584 billion years; Go's ParseDuration
/// returns an "invalid duration" error instead. Fuzz input:
/// `fuzz/regressions/flags/crash-ec97bc95328a58c896df6ca4a241cb18cac90f56`.
#[test]
fn go_duration_out_of_range_is_an_error() {
    for s in [
        "9999999999999999999999h",
        "1e400s",
        &format!("{}s", "9".repeat(400)),
    ] {
        let r = std::panic::catch_unwind(|| spoke_process::flags::go_duration(s));
        assert!(matches!(r, Ok(Err(_))), "{s:?}: {r:?}");
    }
}

/// `flow::SendWindow::grant` adds with a wrapping `fetch_add`: a peer's credit of
/// i64::MAX turned the window negative and the connection stalled for good.
/// Fuzz input: `fuzz/regressions/packets_agent/fixed-grant-overflow-wraps`.
#[test]
fn huge_credit_does_not_exhaust_the_window() {
    let w = spoke_tunnel::flow::SendWindow::with_credit(10);
    w.grant(i64::MAX);
    assert!(!w.exhausted(), "a grant made the window exhausted");
}

/// `flow::Inbox::push` bounds bytes, not chunks: zero-length DATA for a connection whose
/// endpoint is not draining was queued forever (about 32 bytes of memory per 11 wire bytes).
/// Fuzz input: `fuzz/regressions/packets_agent/fixed-empty-data-unbounded`.
#[test]
fn empty_data_cannot_grow_an_inbox_without_bound() {
    use spoke_tunnel::conns::{new_conn, ConnTable, Delivery, FlowConfig};
    let metrics = spoke_tunnel::metrics::RelayMetrics::default();
    let flow = FlowConfig {
        buffer_cap: 1024,
        peer_window: None,
    };
    let (entry, mut parts) = new_conn(flow, [metrics.buffered_bytes.clone(), Default::default()]);
    let table = ConnTable::default();
    assert!(table.insert(1, entry));
    for _ in 0..100_000 {
        assert_eq!(
            table.deliver(1, bytes::Bytes::new(), None),
            Delivery::Queued
        );
    }
    assert!(parts.inbox.try_recv().is_none(), "empty chunks were queued");
}

// ---- Bugs fuzzing found in the engine (once `KnownBug`s), reproduced directly. ----

fn session_metrics() -> spoke_tunnel::session::SessionMetrics {
    spoke_tunnel::session::SessionMetrics {
        stream: Default::default(),
        received: "test",
        relay: Default::default(),
        rejected: Default::default(),
    }
}

const FLOW: spoke_tunnel::conns::FlowConfig = spoke_tunnel::conns::FlowConfig {
    buffer_cap: 1024,
    peer_window: None,
};

/// Was `KnownBug::AbandonedAnswer`: the agent's answer to a dial arrives, and the frontend's
/// client hangs up in the same poll; the frontend's select takes the hang-up and drops its
/// `Dial` with the answer unread. `abandon_dial` found nothing pending, so connection 7
/// stayed in the stream's table with no frontend to close it (and the agent kept the
/// endpoint open). Now `Dial::drop` hands over the receiver and the answer is closed.
#[test]
fn a_dial_abandoned_with_its_answer_unread_leaves_no_connection() {
    use spoke_tunnel::session::{ServerEnd, Session};
    let (out, _out_rx) = spoke_tunnel::outbound::outbound(None);
    let end = ServerEnd::new(
        "agent".into(),
        Default::default(),
        Default::default(),
        prometheus_client::metrics::histogram::Histogram::new([1.0]),
    );
    let session = Session::new(end, out, FLOW, session_metrics());
    let answer = session.send_dial(5, "10.0.0.1:443".into());
    assert!(answer.is_some(), "dial not sent");
    session.dispatch(spoke_tunnel::packet::dial_ok(5, 7));
    assert!(
        session.conns.contains(7),
        "the answer did not establish connection 7"
    );
    // What `Dial::drop` does for a frontend that never read its answer.
    let Some(answer) = answer else { return };
    session.abandon_dial(5, answer);
    assert!(
        !session.conns.contains(7),
        "connection 7 stays in the table with no frontend to close it"
    );
}

/// Was `KnownBug::CancelledDialAnswers`: the server cancels dial 9 (DIAL_CLS) and dials again
/// under the same id. The first dial's connect completes as its cancellation lands, and its
/// task's select takes the connect: its `dial_succeeded` answered the second dial with the
/// first dial's endpoint (10.0.0.1 instead of 10.0.0.2). Tickets now tell the two apart.
#[test]
fn a_cancelled_dial_does_not_answer_a_later_dial_under_its_id() {
    use spoke_tunnel::session::{AgentEnd, DialTicket, EndpointDialer, Session};
    use std::sync::{Arc, Mutex, PoisonError};
    /// Records the dials it is asked to start; the test finishes them.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<DialTicket>>);
    impl EndpointDialer for Recorder {
        fn refuse(&self) -> Option<String> {
            None
        }
        fn start(
            self: Arc<Self>,
            _: Arc<Session<AgentEnd>>,
            _: spoke_proto::DialRequest,
            ticket: DialTicket,
        ) {
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(ticket);
        }
    }
    let dialer = Arc::new(Recorder::default());
    let (out, _out_rx) = spoke_tunnel::outbound::outbound(None);
    let end = AgentEnd::new("server".into(), dialer.clone());
    let session = Session::new(end, out, FLOW, session_metrics());
    session.dispatch(spoke_tunnel::packet::dial_req("10.0.0.1:80".into(), 9));
    session.dispatch(spoke_tunnel::packet::dial_cls(9));
    session.dispatch(spoke_tunnel::packet::dial_req("10.0.0.2:80".into(), 9));
    let tickets = std::mem::take(&mut *dialer.0.lock().unwrap_or_else(PoisonError::into_inner));
    let started: Vec<bool> = tickets.iter().map(|t| t.cancel.is_cancelled()).collect();
    assert_eq!(
        started,
        [true, false],
        "the first dial is cancelled, the second runs"
    );
    // The first dial's task, its connect done: what it calls next.
    assert!(
        session.dial_succeeded(&tickets[0]).is_none(),
        "the cancelled dial to 10.0.0.1 answered the dial to 10.0.0.2"
    );
    // The second dial still gets its own answer.
    assert!(
        session.dial_succeeded(&tickets[1]).is_some(),
        "the dial to 10.0.0.2 lost its answer"
    );
}

/// Every saved input again in strict mode (checks of open `KnownBug`s included).
#[test]
fn inputs_pass_strict_checks() {
    for f in inputs("packets_server")
        .iter()
        .chain(&inputs("packets_agent"))
    {
        let data = std::fs::read(f).unwrap();
        let server = f.to_string_lossy().contains("packets_server");
        eprintln!("strict replay {}", f.display());
        if server {
            harness::packets_server_with(&data, Checks::STRICT);
        } else {
            harness::packets_agent_with(&data, Checks::STRICT);
        }
    }
    for f in inputs("flags") {
        harness::flags_with(&std::fs::read(&f).unwrap(), Checks::STRICT);
    }
}
