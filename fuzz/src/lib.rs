//! Fuzz harnesses for Spoke. The logic lives in [`harness`] so that
//! `tests/tests/fuzz_regressions.rs` replays saved inputs through exactly the same code.
#[path = "harness/mod.rs"]
pub mod harness;
