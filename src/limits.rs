//! The bounds of every size and duration an option takes, checked wherever
//! the value comes from (builder, DSN, environment) and named by the key
//! the user wrote. Anything past them could not work: r2d2 allocates a
//! vector of `max_conns` entries up front, and a deadline past the clock's
//! range would overflow.

use std::time::Duration;

use crate::error::{Error, Result};

/// The most connections one node's pool may have.
pub(crate) const MAX_CONNS: u32 = 10_000;

/// The longest duration any option takes: one year.
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// The longest socket timeout (`tcp_user_timeout`): the kernel takes
/// milliseconds in a 32-bit signed int, so about 24 days.
pub(crate) const MAX_SOCKET_TIMEOUT: Duration = Duration::from_millis(i32::MAX as u64);

/// The most queued jobs (plan capture) or cached statements per connection.
pub(crate) const MAX_QUEUE: usize = 100_000;

/// `n` connections: at least 1 and at most [`MAX_CONNS`].
pub(crate) fn conns(key: &str, n: u32) -> Result<u32> {
    if n == 0 {
        Err(Error::config(format!("{key}: must be at least 1")))
    } else {
        at_most_conns(key, n)
    }
}

/// `n` connections, zero allowed (`min_conns`).
pub(crate) fn at_most_conns(key: &str, n: u32) -> Result<u32> {
    if n > MAX_CONNS {
        Err(Error::config(format!("{key}: must be at most {MAX_CONNS}")))
    } else {
        Ok(n)
    }
}

/// A duration of at most [`MAX_DURATION`].
pub(crate) fn duration(key: &str, d: Duration) -> Result<Duration> {
    if d > MAX_DURATION {
        Err(Error::config(format!(
            "{key}: must be at most one year ({}s)",
            MAX_DURATION.as_secs()
        )))
    } else {
        Ok(d)
    }
}

/// A duration greater than zero and at most [`MAX_DURATION`].
pub(crate) fn positive(key: &str, d: Duration) -> Result<Duration> {
    if d.is_zero() {
        Err(Error::config(format!("{key}: must be greater than zero")))
    } else {
        duration(key, d)
    }
}

/// A socket timeout of at most [`MAX_SOCKET_TIMEOUT`].
pub(crate) fn socket_timeout(key: &str, d: Duration) -> Result<Duration> {
    if d > MAX_SOCKET_TIMEOUT {
        Err(Error::config(format!(
            "{key}: must be at most {}ms",
            MAX_SOCKET_TIMEOUT.as_millis()
        )))
    } else {
        Ok(d)
    }
}

/// A count of queued or cached items, at most [`MAX_QUEUE`].
pub(crate) fn queue(key: &str, n: usize) -> Result<usize> {
    if n > MAX_QUEUE {
        Err(Error::config(format!("{key}: must be at most {MAX_QUEUE}")))
    } else {
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_name_the_key() {
        assert!(
            conns("pool_max_conns", 0)
                .unwrap_err()
                .to_string()
                .contains("pool_max_conns")
        );
        assert!(conns("max_conns", MAX_CONNS + 1).is_err());
        assert_eq!(conns("max_conns", MAX_CONNS).unwrap(), MAX_CONNS);
        assert!(positive("open_duration", Duration::ZERO).is_err());
        assert!(duration("x", MAX_DURATION + Duration::from_nanos(1)).is_err());
        assert!(duration("x", Duration::ZERO).is_ok());
        assert!(queue("queue", MAX_QUEUE + 1).is_err());
    }
}
