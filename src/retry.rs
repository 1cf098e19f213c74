//! Retries with exponential backoff, full jitter and an optional overall
//! deadline shared by all attempts.

use std::time::{Duration, Instant};

use crate::error::{AsPgxkitError, Error, Result};

/// How to retry: up to `max_retries` more attempts after the first, waiting
/// a random time between zero and `min(max_delay, base_delay × multiplierⁿ)`
/// before retry n+1 ("full jitter"), and never past the overall deadline.
///
/// Only errors for which [`Error::is_retryable`] is true are retried:
/// serialization failures (40001), deadlocks (40P01), connection failures
/// before the statement was sent, checkout timeouts, SQLSTATE class 08 and
/// 57P01-57P03. Never constraint violations, syntax errors, `NotFound`, or a
/// deadline of the caller's own.
///
/// ```
/// use std::time::Duration;
/// use pgxkit::RetryPolicy;
///
/// let policy = RetryPolicy::default()          // 3 retries, 100 ms base, 1 s cap, ×2
///     .max_retries(5)
///     .deadline(Duration::from_secs(3));       // all attempts and waits together
/// ```
#[derive(Debug, Clone, PartialEq)]
#[must_use]
pub struct RetryPolicy {
    max_retries: u32,
    base_delay: Duration,
    max_delay: Duration,
    multiplier: f64,
    jitter: bool,
    deadline: Option<Duration>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 3,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            multiplier: 2.0,
            jitter: true,
            deadline: None,
        }
    }
}

impl RetryPolicy {
    /// Retries after the first attempt. Defaults to 3.
    ///
    /// ```
    /// let policy = pgxkit::RetryPolicy::default().max_retries(5);
    /// ```
    pub fn max_retries(mut self, n: u32) -> Self {
        self.max_retries = n;
        self
    }

    /// The backoff before the first retry (before jitter). Defaults to 100 ms.
    ///
    /// ```
    /// use std::time::Duration;
    /// let policy = pgxkit::RetryPolicy::default().base_delay(Duration::from_millis(20));
    /// ```
    pub fn base_delay(mut self, d: Duration) -> Self {
        self.base_delay = d;
        self
    }

    /// The cap on any one backoff. Defaults to 1 s.
    ///
    /// ```
    /// use std::time::Duration;
    /// let policy = pgxkit::RetryPolicy::default().max_delay(Duration::from_millis(500));
    /// ```
    pub fn max_delay(mut self, d: Duration) -> Self {
        self.max_delay = d;
        self
    }

    /// Growth of the backoff per retry; values below 1 count as 1. Defaults to 2.
    ///
    /// ```
    /// let policy = pgxkit::RetryPolicy::default().multiplier(3.0);
    /// ```
    pub fn multiplier(mut self, m: f64) -> Self {
        self.multiplier = if m.is_finite() && m >= 1.0 { m } else { 1.0 };
        self
    }

    /// Full jitter (a random wait up to the backoff) or none (exactly the
    /// backoff). Defaults to `true`: retries of many clients spread out.
    ///
    /// ```
    /// let policy = pgxkit::RetryPolicy::default().jitter(false); // exactly the backoff
    /// ```
    pub fn jitter(mut self, yes: bool) -> Self {
        self.jitter = yes;
        self
    }

    /// A bound on all attempts and waits together; no retry starts after it.
    /// Defaults to none.
    ///
    /// ```
    /// use std::time::Duration;
    /// let policy = pgxkit::RetryPolicy::default().deadline(Duration::from_secs(2));
    /// ```
    pub fn deadline(mut self, d: Duration) -> Self {
        self.deadline = Some(d);
        self
    }

    /// The wait before retry number `retry` (1-based), given a random
    /// `unit` in `[0, 1)` for the jitter.
    pub(crate) fn backoff(&self, retry: u32, unit: f64) -> Duration {
        let exp = self
            .multiplier
            .powi(i32::try_from(retry.saturating_sub(1)).unwrap_or(i32::MAX));
        let ceiling = self.base_delay.as_secs_f64() * exp;
        let capped = ceiling.min(self.max_delay.as_secs_f64());
        let wait = if self.jitter {
            capped * unit.clamp(0.0, 1.0)
        } else {
            capped
        };
        Duration::try_from_secs_f64(wait).unwrap_or(self.max_delay)
    }

    /// Runs `attempt` until it succeeds, fails with an error that is not
    /// retryable (a caller's error that holds no `pgxkit::Error` never is),
    /// runs out of retries, or would pass the deadline. `attempt` gets the
    /// 0-based attempt number.
    pub(crate) fn run<T, E: AsPgxkitError>(
        &self,
        mut attempt: impl FnMut(u32) -> Result<T, E>,
        retryable: impl Fn(&Error) -> bool,
    ) -> Result<T, E> {
        let deadline = self.deadline.map(|d| Instant::now() + d);
        let mut n = 0;
        loop {
            let err = match attempt(n) {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let Some(cause) = err.as_pgxkit_error().filter(|e| retryable(e)) else {
                return Err(err);
            };
            if n >= self.max_retries {
                return Err(err);
            }
            n += 1;
            let wait = self.backoff(n, fastrand::f64());
            if let Some(deadline) = deadline {
                if Instant::now() + wait >= deadline {
                    log::debug!("not retrying: the retry deadline would pass ({cause})");
                    return Err(err);
                }
            }
            log::debug!(
                "retry {n} of {} in {wait:?} after: {cause}",
                self.max_retries
            );
            std::thread::sleep(wait);
        }
    }
}

/// Runs `f`, retrying retryable errors as `policy` says; returns the first
/// success or the last error.
///
/// Blocks for the attempts and the backoff waits between them; with
/// [`RetryPolicy::deadline`] the whole is bounded by it.
///
/// ```no_run
/// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
/// let policy = pgxkit::RetryPolicy::default();
/// let n: i64 = pgxkit::retry(&policy, || {
///     Ok(cluster.query_one("SELECT count(*) FROM jobs", &[])?.get(0))
/// })?;
/// # Ok::<(), pgxkit::Error>(())
/// ```
pub fn retry<T>(policy: &RetryPolicy, mut f: impl FnMut() -> Result<T>) -> Result<T> {
    policy.run(|_| f(), Error::is_retryable)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use std::cell::Cell;

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let p = RetryPolicy::default().jitter(false);
        let ms = |r| p.backoff(r, 0.5).as_millis();
        assert_eq!(
            [ms(1), ms(2), ms(3), ms(4), ms(5)],
            [100, 200, 400, 800, 1000]
        );
        let j = RetryPolicy::default();
        assert_eq!(j.backoff(3, 0.0), Duration::ZERO);
        assert_eq!(j.backoff(3, 0.5).as_millis(), 200);
        assert!(j.backoff(3, 0.999_999) <= Duration::from_millis(400));
        assert_eq!(
            RetryPolicy::default()
                .multiplier(0.5)
                .jitter(false)
                .backoff(4, 0.3)
                .as_millis(),
            100
        );
    }

    #[test]
    fn stops_at_max_retries_and_on_non_retryable_errors() {
        let p = RetryPolicy::default()
            .base_delay(Duration::ZERO)
            .max_retries(3);
        let calls = Cell::new(0);
        let r: Result<()> = p.run(
            |_| {
                calls.set(calls.get() + 1);
                Err(Error::new(ErrorKind::PoolTimeout))
            },
            Error::is_retryable,
        );
        assert!(r.is_err());
        assert_eq!(calls.get(), 4, "one attempt plus three retries");

        calls.set(0);
        let r: Result<()> = p.run(
            |_| {
                calls.set(calls.get() + 1);
                Err(Error::new(ErrorKind::NotFound))
            },
            Error::is_retryable,
        );
        assert_eq!(r.unwrap_err().kind(), ErrorKind::NotFound);
        assert_eq!(calls.get(), 1);
    }

    #[test]
    fn the_deadline_stops_retries_that_would_pass_it() {
        let p = RetryPolicy::default()
            .jitter(false)
            .base_delay(Duration::from_millis(40))
            .max_retries(100)
            .deadline(Duration::from_millis(150));
        let started = Instant::now();
        let calls = Cell::new(0);
        let _ = p.run(
            |_| -> Result<()> {
                calls.set(calls.get() + 1);
                Err(Error::new(ErrorKind::PoolTimeout))
            },
            Error::is_retryable,
        );
        // Waits of 40 + 80 ms fit, 160 more would not.
        assert_eq!(calls.get(), 3);
        assert!(started.elapsed() < Duration::from_millis(150));
    }

    #[test]
    fn success_after_retries_returns_the_value() {
        let p = RetryPolicy::default().base_delay(Duration::ZERO);
        let v = p
            .run(
                |n| {
                    if n < 2 {
                        Err(Error::new(ErrorKind::PoolTimeout))
                    } else {
                        Ok(n)
                    }
                },
                Error::is_retryable,
            )
            .unwrap();
        assert_eq!(v, 2);
    }
}
