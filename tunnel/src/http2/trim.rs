//! When a connection gives its buffers back. Its read buffer, once reserved, stays until the
//! connection goes idle; a reconnect storm brings thousands of connections that talk for a
//! moment and then idle, so the storm's peak memory grows with the time an idle connection
//! keeps its buffers. The first check comes soon after activity; while the connection stays
//! busy, the checks back off, so a busy connection costs one timer every couple of seconds.
//! An idle, trimmed connection has no timer at all (thousands of idle agent tunnels must not
//! each wake every few seconds) until it does something again.
use std::time::Duration;

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
    after: Duration,
    trimmed: bool,
    /// Did anything since the last check.
    active: bool,
}

impl Default for Clock {
    fn default() -> Self {
        Clock {
            after: FIRST,
            trimmed: false,
            active: false,
        }
    }
}

impl Clock {
    /// After a turn of the driver's loop: `progress` if it did anything; `fired` polls the
    /// timer, and is called only while the timer is armed.
    pub fn turn(&mut self, progress: bool, fired: impl FnOnce() -> bool) -> Step {
        if self.trimmed {
            if !progress {
                return Step::Nothing;
            }
            // Woken: this turn's work is the activity the first check starts from.
            *self = Clock::default();
            return Step::Arm(FIRST);
        }
        self.active |= progress;
        if !fired() {
            return Step::Nothing;
        }
        if std::mem::take(&mut self.active) {
            self.after = (self.after * 2).min(MAX);
            Step::Arm(self.after)
        } else {
            self.trimmed = true;
            Step::Trim
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `turns` of (progress, timer fired) and returns the steps that did something.
    fn run(c: &mut Clock, turns: &[(bool, bool)]) -> Vec<Step> {
        turns
            .iter()
            .map(|&(progress, fired)| c.turn(progress, || fired))
            .filter(|s| *s != Step::Nothing)
            .collect()
    }

    #[test]
    fn a_connection_that_talks_once_is_trimmed_at_the_second_check() {
        let mut c = Clock::default();
        // Set-up traffic, then the first check finds it, then silence.
        let steps = run(
            &mut c,
            &[(true, false), (true, false), (false, true), (false, true)],
        );
        assert_eq!(steps, [Step::Arm(FIRST * 2), Step::Trim]);
        // Trimmed and idle: no timer, whatever the (stale) timer says.
        assert_eq!(run(&mut c, &[(false, true), (false, false)]), []);
    }

    #[test]
    fn a_busy_connections_checks_back_off_to_the_maximum() {
        let mut c = Clock::default();
        let mut arms = Vec::new();
        for _ in 0..8 {
            if let Step::Arm(d) = c.turn(true, || true) {
                arms.push(d);
            }
        }
        assert_eq!(arms[..3], [FIRST * 2, FIRST * 4, FIRST * 8]);
        assert_eq!(*arms.last().unwrap(), MAX);
        assert!(arms.iter().all(|d| *d <= MAX));
    }

    #[test]
    fn a_trimmed_connection_that_wakes_is_checked_soon_again() {
        let mut c = Clock::default();
        for _ in 0..8 {
            c.turn(true, || true);
        }
        assert_eq!(c.turn(false, || true), Step::Trim);
        // One message: armed at FIRST, and trimmed at the first check if nothing follows.
        assert_eq!(c.turn(true, || false), Step::Arm(FIRST));
        assert_eq!(c.turn(false, || true), Step::Trim);
    }
}
