//! When a connection gives its buffers back. Its read buffer, once reserved, stays until the
//! connection goes idle; a reconnect storm brings thousands of connections that talk for a
//! moment and then idle, so the storm's peak memory grows with the time an idle connection
//! keeps its buffers. The first check comes soon after activity; while the connection stays
//! busy, the checks back off, so a busy connection costs one timer every couple of seconds.
//! An idle, trimmed connection has no timer at all (thousands of idle agent tunnels must not
//! each wake every few seconds) until it does something again.
//!
//! A check finds a connection idle when the second half of the wait before it was quiet.
//! A dial is a few turns within a millisecond (DIAL_REQ out, DIAL_RSP in, the close), so the
//! first check, 50 ms later, trims it: one timer wake-up per dial of an idle agent, where
//! asking for a whole quiet wait took two and kept the buffers 150 ms.
use std::time::Duration;
use tokio::time::Instant;

/// The first check after activity (a new connection, or a trimmed one that woke).
pub const FIRST: Duration = Duration::from_millis(50);
/// The checks of a connection that stays busy back off to this.
pub const MAX: Duration = Duration::from_secs(2);

/// What the driver does after a turn of its loop.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    Nothing,
    /// Give the buffers back; the timer stays off.
    Trim,
    /// Arm the timer this far ahead.
    Arm(Duration),
}

/// The schedule of one connection. The driver arms its timer [`FIRST`] ahead when it starts.
#[derive(Debug)]
pub struct Clock {
    /// The wait before the check now armed.
    after: Duration,
    trimmed: bool,
    /// The last turn that did something.
    last: Option<Instant>,
}

impl Default for Clock {
    fn default() -> Self {
        Clock {
            after: FIRST,
            trimmed: false,
            last: None,
        }
    }
}

impl Clock {
    /// After a turn of the driver's loop: `progress` if it did anything; `fired` polls the
    /// timer, and is called only while the timer is armed; `now` is read only on a turn that
    /// did something or a check.
    pub fn turn(
        &mut self,
        progress: bool,
        now: impl Fn() -> Instant,
        fired: impl FnOnce() -> bool,
    ) -> Step {
        if self.trimmed {
            if !progress {
                return Step::Nothing;
            }
            // Woken: this turn's work is the activity the first check starts from.
            *self = Clock {
                last: Some(now()),
                ..Clock::default()
            };
            return Step::Arm(FIRST);
        }
        if progress {
            self.last = Some(now());
        }
        if !fired() {
            return Step::Nothing;
        }
        let t = now();
        let quiet = self
            .last
            .map_or(Duration::MAX, |l| t.saturating_duration_since(l));
        if quiet >= self.after / 2 {
            self.trimmed = true;
            Step::Trim
        } else {
            self.after = (self.after * 2).min(MAX);
            Step::Arm(self.after)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// A clock driven through (ms since the start, progress, timer fired) turns; returns
    /// the steps that did something, with the time of each.
    fn run(c: &mut Clock, t0: Instant, turns: &[(u64, bool, bool)]) -> Vec<(u64, Step)> {
        turns
            .iter()
            .map(|&(ms, progress, fired)| (ms, c.turn(progress, || t0 + MS * ms as u32, || fired)))
            .filter(|(_, s)| *s != Step::Nothing)
            .collect()
    }

    #[test]
    fn a_dial_is_trimmed_at_the_first_check() {
        let (mut c, t0) = (Clock::default(), Instant::now());
        // Set-up traffic over a millisecond, then the first check, 50 ms after the start.
        let steps = run(
            &mut c,
            t0,
            &[(0, true, false), (1, true, false), (50, false, true)],
        );
        assert_eq!(steps, [(50, Step::Trim)]);
        // Trimmed and idle: no timer, whatever the (stale) timer says.
        assert_eq!(
            run(&mut c, t0, &[(60, false, true), (70, false, false)]),
            []
        );
        // A dial wakes it: armed once, trimmed at that one check.
        let steps = run(
            &mut c,
            t0,
            &[
                (1000, true, false),
                (1000, true, false),
                (1001, true, false),
                (1050, false, true),
            ],
        );
        assert_eq!(steps, [(1000, Step::Arm(FIRST)), (1050, Step::Trim)]);
    }

    #[test]
    fn a_busy_connections_checks_back_off_to_the_maximum() {
        let (mut c, t0) = (Clock::default(), Instant::now());
        let mut arms = Vec::new();
        let mut ms = 0;
        for _ in 0..8 {
            // Activity just before every check.
            ms += 10_000;
            c.turn(true, || t0 + MS * ms, || false);
            if let Step::Arm(d) = c.turn(false, || t0 + MS * ms, || true) {
                arms.push(d);
            }
        }
        assert_eq!(arms[..3], [FIRST * 2, FIRST * 4, FIRST * 8]);
        assert_eq!(*arms.last().unwrap(), MAX);
        assert!(arms.iter().all(|d| *d <= MAX));
    }

    #[test]
    fn only_a_quiet_second_half_of_the_wait_trims() {
        let (mut c, t0) = (Clock::default(), Instant::now());
        // Busy to the first check (50 ms): the next wait is 100 ms.
        let steps = run(&mut c, t0, &[(49, true, false), (50, false, true)]);
        assert_eq!(steps, [(50, Step::Arm(FIRST * 2))]);
        // Activity 60 ms into that wait (in its second half): checked again, 200 ms later.
        let steps = run(&mut c, t0, &[(110, true, false), (150, false, true)]);
        assert_eq!(steps, [(150, Step::Arm(FIRST * 4))]);
        // Activity in the first half of the 200 ms wait only: trimmed.
        let steps = run(&mut c, t0, &[(240, true, false), (350, false, true)]);
        assert_eq!(steps, [(350, Step::Trim)]);
    }
}
