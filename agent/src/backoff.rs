//! Jittered exponential backoff, as upstream's agent sync loop: factor 1.5, jitter 10 %,
//! starting at `--sync-interval`, capped at `--sync-interval-cap`.
use rand::Rng;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap: cap.max(base),
            next: base,
        }
    }

    /// The next delay (with jitter), growing the following one.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = self.next.mul_f64(1.5).min(self.cap);
        jitter(d)
    }

    pub fn reset(&mut self) {
        self.next = self.base;
    }
}

/// `d` plus up to 10 %.
pub fn jitter(d: Duration) -> Duration {
    d.mul_f64(1.0 + rand::rng().random_range(0.0..0.1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(3));
        let d: Vec<_> = (0..5).map(|_| b.next_delay().as_secs_f64()).collect();
        assert!((1.0..1.1).contains(&d[0]));
        assert!((1.5..1.65).contains(&d[1]));
        assert!((2.25..2.5).contains(&d[2]));
        assert!((3.0..3.3).contains(&d[4]));
        b.reset();
        assert!(b.next_delay() < Duration::from_millis(1100));
    }
}
