//! The circuit breaker state machine, pure: time comes in as an argument.
//!
//! Closed lets every call through and counts consecutive connection-level
//! failures; at `failure_threshold` it opens. Open rejects every call until
//! `open_duration` has passed, then becomes half-open. Half-open lets at most
//! `half_open_max_calls` calls through at once: one success closes it, one
//! failure opens it again. Unlike the guide's sketch, half-open is bounded and
//! only failures of the node (not of the statement) count.

mod gate;

use std::fmt;
use std::time::{Duration, Instant};

pub(crate) use gate::{Gate, Permit};

/// The state of a node's circuit breaker.
///
/// ```no_run
/// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
/// if cluster.stats().primary().unwrap().breaker == pgxkit::BreakerState::Open {
///     eprintln!("the primary's breaker is open");
/// }
/// # Ok::<(), pgxkit::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BreakerState {
    /// Calls go through; failures are counted.
    Closed,
    /// Calls fail fast with [`ErrorKind::CircuitOpen`](crate::ErrorKind::CircuitOpen).
    Open,
    /// A bounded number of trial calls go through.
    HalfOpen,
}

impl BreakerState {
    /// `closed`, `open` or `half-open`.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// println!("breaker: {}", cluster.stats().primary().unwrap().breaker.as_str());
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half-open",
        }
    }

    pub(crate) fn to_u8(self) -> u8 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        }
    }

    pub(crate) fn from_u8(v: u8) -> Self {
        match v {
            0 => BreakerState::Closed,
            1 => BreakerState::Open,
            _ => BreakerState::HalfOpen,
        }
    }
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Breaker settings (validated by the builder: threshold and max calls ≥ 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BreakerConfig {
    pub(crate) failure_threshold: u32,
    pub(crate) open_duration: Duration,
    pub(crate) half_open_max_calls: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failure_threshold: 5,
            open_duration: Duration::from_secs(30),
            half_open_max_calls: 1,
        }
    }
}

/// A change of state, for logging and hooks (done outside the lock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Transition {
    pub(crate) from: BreakerState,
    pub(crate) to: BreakerState,
}

/// What a call that was let through turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The node answered (even with a statement error).
    Success,
    /// A connection-level failure: the node did not answer.
    Failure,
    /// The call ended without telling (a panic in user code): release its slot.
    Abandoned,
}

#[derive(Debug)]
pub(crate) struct Breaker {
    config: BreakerConfig,
    state: BreakerState,
    consecutive_failures: u32,
    opened_at: Option<Instant>,
    half_open_calls: u32,
}

impl Breaker {
    pub(crate) fn new(config: BreakerConfig) -> Self {
        Breaker {
            config,
            state: BreakerState::Closed,
            consecutive_failures: 0,
            opened_at: None,
            half_open_calls: 0,
        }
    }

    pub(crate) fn state(&self) -> BreakerState {
        self.state
    }

    pub(crate) fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    /// Asks to let a call through at `now`. `Ok(true)` when the call takes
    /// a half-open trial slot; `Err` holds how long until a call may be tried
    /// again. May move Open to HalfOpen.
    pub(crate) fn try_acquire(
        &mut self,
        now: Instant,
    ) -> (Result<bool, Duration>, Option<Transition>) {
        match self.state {
            BreakerState::Closed => (Ok(false), None),
            BreakerState::Open => {
                let reopen = self.reopens_at(now);
                if now < reopen {
                    return (Err(reopen - now), None);
                }
                let t = self.go(BreakerState::HalfOpen, now);
                self.half_open_calls = 1;
                (Ok(true), t)
            }
            BreakerState::HalfOpen => {
                if self.half_open_calls < self.config.half_open_max_calls {
                    self.half_open_calls += 1;
                    (Ok(true), None)
                } else {
                    // Trial calls are out; the next chance is when one ends.
                    (Err(Duration::ZERO), None)
                }
            }
        }
    }

    /// Whether a call would be let through at `now`, without taking a slot.
    pub(crate) fn would_allow(&self, now: Instant) -> bool {
        match self.state {
            BreakerState::Closed => true,
            BreakerState::Open => now >= self.reopens_at(now),
            BreakerState::HalfOpen => self.half_open_calls < self.config.half_open_max_calls,
        }
    }

    /// How long until an open breaker lets a call through (zero otherwise).
    pub(crate) fn retry_after(&self, now: Instant) -> Duration {
        match self.state {
            BreakerState::Open => self.reopens_at(now).saturating_duration_since(now),
            _ => Duration::ZERO,
        }
    }

    fn reopens_at(&self, now: Instant) -> Instant {
        self.opened_at.unwrap_or(now) + self.config.open_duration
    }

    /// Records how a call that was let through ended; `held_slot` says
    /// whether it was admitted as a half-open trial (and so frees a slot).
    pub(crate) fn record(
        &mut self,
        outcome: Outcome,
        held_slot: bool,
        now: Instant,
    ) -> Option<Transition> {
        if held_slot && self.state == BreakerState::HalfOpen {
            self.half_open_calls = self.half_open_calls.saturating_sub(1);
        }
        match (outcome, self.state) {
            (Outcome::Abandoned, _) => None,
            (Outcome::Success, _) => {
                self.consecutive_failures = 0;
                self.go(BreakerState::Closed, now)
            }
            (Outcome::Failure, BreakerState::Closed) => {
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                if self.consecutive_failures >= self.config.failure_threshold {
                    self.go(BreakerState::Open, now)
                } else {
                    None
                }
            }
            (Outcome::Failure, _) => {
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                self.go(BreakerState::Open, now)
            }
        }
    }

    /// A health probe reached the node: an open or half-open breaker closes.
    pub(crate) fn probe_succeeded(&mut self, now: Instant) -> Option<Transition> {
        if self.state == BreakerState::Closed {
            return None;
        }
        self.consecutive_failures = 0;
        self.go(BreakerState::Closed, now)
    }

    fn go(&mut self, to: BreakerState, now: Instant) -> Option<Transition> {
        let from = self.state;
        if from == to {
            // A failure in Open (a late call) restarts the wait.
            if to == BreakerState::Open {
                self.opened_at = Some(now);
            }
            return None;
        }
        self.state = to;
        match to {
            BreakerState::Open => {
                self.opened_at = Some(now);
                self.half_open_calls = 0;
            }
            BreakerState::Closed => {
                self.opened_at = None;
                self.half_open_calls = 0;
            }
            BreakerState::HalfOpen => {}
        }
        Some(Transition { from, to })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPEN: Duration = Duration::from_secs(30);

    fn breaker(threshold: u32, half_open_max: u32) -> Breaker {
        Breaker::new(BreakerConfig {
            failure_threshold: threshold,
            open_duration: OPEN,
            half_open_max_calls: half_open_max,
        })
    }

    fn fail(b: &mut Breaker, now: Instant) -> Option<Transition> {
        let slot = b.try_acquire(now).0.unwrap();
        b.record(Outcome::Failure, slot, now)
    }

    #[test]
    fn opens_after_threshold_consecutive_failures() {
        let t0 = Instant::now();
        let mut b = breaker(3, 1);
        assert_eq!(fail(&mut b, t0), None);
        assert_eq!(fail(&mut b, t0), None);
        assert_eq!(
            fail(&mut b, t0),
            Some(Transition {
                from: BreakerState::Closed,
                to: BreakerState::Open
            })
        );
        let (res, _) = b.try_acquire(t0 + Duration::from_secs(10));
        assert_eq!(res, Err(Duration::from_secs(20)));
        assert_eq!(
            b.retry_after(t0 + Duration::from_secs(25)),
            Duration::from_secs(5)
        );
    }

    #[test]
    fn a_success_resets_the_count() {
        let t0 = Instant::now();
        let mut b = breaker(3, 1);
        fail(&mut b, t0);
        fail(&mut b, t0);
        assert_eq!(b.try_acquire(t0).0, Ok(false));
        b.record(Outcome::Success, false, t0);
        fail(&mut b, t0);
        fail(&mut b, t0);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn half_open_is_bounded_and_decides_on_the_first_result() {
        let t0 = Instant::now();
        let mut b = breaker(1, 2);
        fail(&mut b, t0);
        let later = t0 + OPEN;
        let (first, t) = b.try_acquire(later);
        assert_eq!(first, Ok(true));
        assert_eq!(
            t,
            Some(Transition {
                from: BreakerState::Open,
                to: BreakerState::HalfOpen
            })
        );
        assert!(b.try_acquire(later).0.is_ok(), "second trial call");
        assert!(
            b.try_acquire(later).0.is_err(),
            "a third exceeds half_open_max_calls"
        );
        assert!(!b.would_allow(later));
        // One trial ends abandoned: its slot frees up without a verdict.
        assert_eq!(b.record(Outcome::Abandoned, true, later), None);
        assert!(b.would_allow(later));
        // A call admitted while closed, ending now, frees no trial slot.
        b.record(Outcome::Abandoned, false, later);
        assert!(b.try_acquire(later).0.is_ok());
        assert!(!b.would_allow(later));
        assert_eq!(
            b.record(Outcome::Success, true, later),
            Some(Transition {
                from: BreakerState::HalfOpen,
                to: BreakerState::Closed
            })
        );
        assert!(b.would_allow(later));
    }

    #[test]
    fn a_half_open_failure_reopens_for_a_full_period() {
        let t0 = Instant::now();
        let mut b = breaker(1, 1);
        fail(&mut b, t0);
        let t1 = t0 + OPEN + Duration::from_secs(1);
        assert!(b.try_acquire(t1).0.is_ok());
        assert_eq!(
            b.record(Outcome::Failure, true, t1),
            Some(Transition {
                from: BreakerState::HalfOpen,
                to: BreakerState::Open
            })
        );
        assert_eq!(
            b.try_acquire(t1 + Duration::from_secs(29)).0,
            Err(Duration::from_secs(1))
        );
        assert!(b.try_acquire(t1 + OPEN).0.is_ok());
    }

    #[test]
    fn a_successful_probe_closes_an_open_breaker() {
        let t0 = Instant::now();
        let mut b = breaker(1, 1);
        fail(&mut b, t0);
        assert_eq!(
            b.probe_succeeded(t0),
            Some(Transition {
                from: BreakerState::Open,
                to: BreakerState::Closed
            })
        );
        assert!(b.try_acquire(t0).0.is_ok());
        assert_eq!(b.probe_succeeded(t0), None);
    }

    #[test]
    fn state_round_trips_through_u8() {
        for s in [
            BreakerState::Closed,
            BreakerState::Open,
            BreakerState::HalfOpen,
        ] {
            assert_eq!(BreakerState::from_u8(s.to_u8()), s);
        }
    }
}
