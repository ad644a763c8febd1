//! Polling with deadlines: every wait in the suite goes through here and fails loudly on timeout.

use std::future::Future;
use std::time::{Duration, Instant};

/// Polls `probe` every 50 ms until it returns `Ok(value)`; panics after `timeout` with `what` and
/// the last `Err` observation (a probe cut short by the deadline keeps the one before it).
pub async fn poll_until<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    let mut last = "none (no probe finished)".to_string();
    loop {
        let attempt =
            tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), probe()).await;
        match attempt {
            Ok(Ok(v)) => return v,
            Ok(Err(e)) => last = e,
            Err(_) => panic!(
                "timed out after {timeout:?} waiting for {what} (the last probe was still running); \
                 last observation: {last}"
            ),
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}; last observation: {last}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Checks `probe` repeatedly for the whole of `duration`; panics on the first `Err` (used for
/// "this must stay so" assertions, e.g. readiness that must never come).
pub async fn holds_for<F, Fut>(what: &str, duration: Duration, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + duration;
    while Instant::now() < deadline {
        if let Err(e) = probe().await {
            panic!("expected {what} to hold for {duration:?}, but: {e}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Awaits `fut`, panicking with `what` if it takes longer than `timeout`.
pub async fn within<T>(what: &str, timeout: Duration, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(timeout, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what} did not finish within {timeout:?}"),
    }
}

/// Awaits every task, all within `timeout` (panicking past it, or if a task panicked), and
/// returns how each failed one failed: `#index: error`.
pub async fn failures<T>(
    what: &str,
    timeout: Duration,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<T>>>,
) -> Vec<String> {
    let results = within(what, timeout, futures::future::join_all(tasks)).await;
    results
        .into_iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let r = r.unwrap_or_else(|e| panic!("{what}: task #{i} did not finish: {e}"));
            r.err().map(|e| format!("#{i}: {e:#}"))
        })
        .collect()
}
