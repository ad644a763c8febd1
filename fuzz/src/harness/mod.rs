//! Fuzz harnesses, shared by the libFuzzer targets (`fuzz/fuzz_targets/*.rs`) and the
//! replay tests (`tests/tests/fuzz_regressions.rs`, which includes this module by path).
//!
//! Every entry point takes raw fuzzer bytes and panics on a broken invariant. Checks for
//! bugs that are known and reported but not fixed yet are only made in strict mode
//! (`SPOKE_FUZZ_STRICT=1`), so bounded CI runs stay green while the fix is pending; see
//! [`KnownBug`].
#![allow(dead_code)]

mod hpack;
mod http;
mod http2;
mod packets;
mod text;

pub use hpack::hpack_with;
pub use http::http_connect_with;
pub use http2::http2_with;
pub use packets::{packets_agent_with, packets_server_with};
pub use text::{flags_with, identifiers_with};

/// Open bugs found by fuzzing: lenient mode steers around each of them, strict mode
/// checks for them. When one is fixed, delete its variant and the check becomes permanent.
/// None is open. Fixed so far (in `spoke-tunnel`): zero-length DATA queued without bound,
/// `SendWindow::grant` wrapping, `go_duration` panicking out of range, a dial abandoned with
/// its answer unread leaving the connection open (`abandon_dial` takes the receiver), a
/// cancelled dial's late result answering a later dial under the same `random` (`DialTicket`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KnownBug {}

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
        match bug {}
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

pub fn hpack(data: &[u8]) {
    hpack_with(data, Checks::from_env());
}

pub fn http2(data: &[u8]) {
    http2_with(data, Checks::from_env());
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
