//! Fuzz harnesses, shared by the libFuzzer targets (`fuzz/fuzz_targets/*.rs`) and the
//! replay tests (`tests/tests/fuzz_regressions.rs`, which includes this module by path).
//!
//! Every entry point takes raw fuzzer bytes and panics on a broken invariant. Checks for
//! bugs that are known and reported but not fixed yet are only made in strict mode
//! (`SPOKE_FUZZ_STRICT=1`), so bounded CI runs stay green while the fix is pending; see
//! [`KnownBug`].
#![allow(dead_code)]

mod h2;
mod http;
mod packets;
mod text;

pub use h2::h2_authority_with;
pub use http::http_connect_with;
pub use packets::{packets_agent_with, packets_server_with};
pub use text::{flags_with, identifiers_with};

/// Open bugs found by fuzzing: lenient mode steers around each of them, strict mode
/// checks for them. When one is fixed, delete its variant and the check becomes permanent.
/// Fixed so far (in `spoke-tunnel`): zero-length DATA queued without bound,
/// `SendWindow::grant` wrapping, `go_duration` panicking out of range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KnownBug {
    /// Server: a frontend whose client hangs up just as the agent's answer arrives drops its
    /// `Dial` with the answer unread (`wait_watching_client` and the gRPC frontend's select
    /// may pick the hang-up). `abandon_dial` then finds no pending dial, so the established
    /// connection stays in the table with no local side to close it, and the agent keeps its
    /// endpoint open, until either end closes it or the stream ends.
    AbandonedAnswer,
    /// Agent: pending dials are known by the server's `random` alone. A dial cancelled by
    /// DIAL_CLS whose connect completes at the same moment (the dial task's select may take
    /// either) calls `dial_succeeded`/`dial_failed`; if the server has meanwhile dialled again
    /// under the same `random`, that answers the new dial with the old dial's endpoint (or
    /// error), and the new dial's own result is dropped.
    CancelledDialAnswers,
}
/// Which invariants a run checks.
#[derive(Clone, Copy, Debug)]
pub struct Checks {
    /// Also check the invariants broken by [`KnownBug`]s.
    pub strict: bool,
}

impl Checks {
    pub const LENIENT: Checks = Checks { strict: false };
    pub const STRICT: Checks = Checks { strict: true };

    /// `SPOKE_FUZZ_STRICT=1` turns strict mode on for fuzz targets.
    pub fn from_env() -> Checks {
        static STRICT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        Checks {
            strict: *STRICT.get_or_init(|| {
                std::env::var("SPOKE_FUZZ_STRICT").is_ok_and(|v| !v.is_empty() && v != "0")
            }),
        }
    }

    /// Whether to check the invariant that `bug` breaks.
    pub fn check(&self, bug: KnownBug) -> bool {
        match bug {
            KnownBug::AbandonedAnswer | KnownBug::CancelledDialAnswers => self.strict,
        }
    }
}

pub fn packets_server(data: &[u8]) {
    packets_server_with(data, Checks::from_env());
}

pub fn packets_agent(data: &[u8]) {
    packets_agent_with(data, Checks::from_env());
}

pub fn http_connect(data: &[u8]) {
    http_connect_with(data, Checks::from_env());
}

pub fn h2_authority(data: &[u8]) {
    h2_authority_with(data, Checks::from_env());
}

pub fn identifiers(data: &[u8]) {
    identifiers_with(data, Checks::from_env());
}

pub fn flags(data: &[u8]) {
    flags_with(data, Checks::from_env());
}

/// Reads structured choices out of fuzzer bytes; yields zeros once exhausted.
pub(crate) struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((b, rest)) => {
                self.data = rest;
                *b
            }
            None => 0,
        }
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }
}
