//! Spoke tunnel core.
