//! Hostile clients: random bytes, half-sent requests, and checks that the peer hangs up.

use std::time::{Duration, Instant};

use rand::RngCore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::BoxIo;

/// `n` random bytes.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::rng().fill_bytes(&mut v);
    v
}

/// Reads (discarding) until the peer closes or errors; returns how long that took, or `Err`
/// if the connection is still open after `timeout`.
pub async fn closed_within(io: &mut BoxIo, timeout: Duration) -> Result<Duration, String> {
    let start = Instant::now();
    let mut buf = vec![0u8; 16 * 1024];
    let mut got = 0usize;
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, io.read(&mut buf)).await {
            Err(_) => {
                return Err(format!(
                    "still open after {timeout:?} ({got} bytes received meanwhile)"
                ))
            }
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(start.elapsed()),
            Ok(Ok(n)) => got += n,
        }
    }
}

/// Writes `bytes` (a write error counts as the peer having hung up) and requires the peer to
/// close the connection within `timeout`.
pub async fn expect_rejected(
    mut io: BoxIo,
    bytes: &[u8],
    timeout: Duration,
) -> Result<Duration, String> {
    let start = Instant::now();
    if io.write_all(bytes).await.and(io.flush().await).is_err() {
        return Ok(start.elapsed());
    }
    closed_within(&mut io, timeout)
        .await
        .map(|_| start.elapsed())
}
