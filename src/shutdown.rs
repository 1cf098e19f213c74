//! Graceful shutdown: in-flight accounting and the report.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering::SeqCst};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Error, ErrorKind, Result};
use crate::stripes::Striped;
use crate::sync::lock;

const RUNNING: u8 = 0;
const SHUTTING_DOWN: u8 = 1;

/// What [`Cluster::shutdown`](crate::Cluster::shutdown) achieved.
///
/// ```no_run
/// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
/// let report = cluster.shutdown(std::time::Duration::from_secs(30));
/// if !report.drained {
///     eprintln!("{} operations were still running at the deadline", report.still_running);
/// }
/// # Ok::<(), pgxkit::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Whether every running operation and transaction finished in time.
    pub drained: bool,
    /// Operations and transactions running when shutdown began.
    pub in_flight_at_start: usize,
    /// Those still running at the deadline (0 when drained).
    pub still_running: usize,
    /// How long the shutdown took.
    pub elapsed: Duration,
}

/// Running or shutting down, and how many operations are in flight.
///
/// Every operation counts itself in and out, so the count is striped per
/// thread (see [`crate::stripes`]); shutdown adds the stripes up.
#[derive(Debug, Default)]
pub(crate) struct Lifecycle {
    state: AtomicU8,
    in_flight: Striped<AtomicUsize>,
    lock: Mutex<()>,
    drained: Condvar,
}

/// One operation in flight (counted in the stripe at `.1`); leaving is
/// counted on drop, in the same stripe, on whatever thread drops it.
#[derive(Debug)]
pub(crate) struct InFlight<'a>(&'a Lifecycle, usize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let before = self.0.in_flight.get(self.1).fetch_sub(1, SeqCst);
        if before == 1 && self.0.state.load(SeqCst) != RUNNING {
            // Notify under the lock so a waiter cannot miss it.
            let _guard = lock(&self.0.lock);
            self.0.drained.notify_all();
        }
    }
}

impl Lifecycle {
    /// Counts an operation in, or fails at once with `ShuttingDown`.
    pub(crate) fn enter(&self) -> Result<InFlight<'_>> {
        // Count first, then look: shutdown sets the state first, then counts,
        // so it sees every operation that got past this check (all SeqCst:
        // one order for the count, the state and shutdown's reads).
        let (stripe, count) = self.in_flight.mine();
        count.fetch_add(1, SeqCst);
        let guard = InFlight(self, stripe);
        if self.state.load(SeqCst) != RUNNING {
            return Err(Error::new(ErrorKind::ShuttingDown));
        }
        Ok(guard)
    }

    /// Stops admitting operations; returns how many are in flight.
    pub(crate) fn begin_shutdown(&self) -> usize {
        self.state.store(SHUTTING_DOWN, SeqCst);
        self.running()
    }

    /// Operations in flight: each stripe's count is at least the number of
    /// operations counted in it that are still running, so 0 means drained.
    fn running(&self) -> usize {
        usize::try_from(self.in_flight.sum(|c| c.load(SeqCst) as u64)).unwrap_or(usize::MAX)
    }

    /// Waits until nothing is in flight or `deadline` passes; returns how
    /// many are still running.
    pub(crate) fn wait_drained(&self, deadline: Instant) -> usize {
        let mut guard = lock(&self.lock);
        loop {
            let running = self.running();
            let now = Instant::now();
            if running == 0 || now >= deadline {
                return running;
            }
            guard = self
                .drained
                .wait_timeout(guard, deadline - now)
                .map_or_else(|p| p.into_inner().0, |(g, _)| g);
        }
    }
}
