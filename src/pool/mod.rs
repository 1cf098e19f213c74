//! A node's pool: r2d2 beneath, with connection affinity (a thread gets
//! back the connection it used last: `affinity`), checkout and its slow
//! path, idle validation, leak tracking, utilisation warnings, stats, and
//! close. How a connection is opened and checked is `manager`.

pub(crate) mod affinity;
pub(crate) mod manager;

use std::backtrace::Backtrace;
use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use r2d2::PooledConnection;
use scheduled_thread_pool::{OnPoolDropBehavior, ScheduledThreadPool};

use crate::error::{Error, ErrorKind, Result};
use crate::hooks::{self, ConnectionEvent, Hooks};
use crate::info::NodeInfo;
use crate::settings::NodeOptions;
use crate::settings::PoolConfig;
use crate::stats::PoolStats;
use crate::stripes::Striped;
use crate::sync::lock;
use affinity::{Parking, Waiting};
use manager::{ConnectErrorLog, Connector, Manager, PoolShared, ReleaseCounter};

/// Threads r2d2 uses to open this node's connections in the background.
/// Each node has its own (a bulkhead): connects that hang on a node that
/// accepts and never answers hold up only that node's pool.
const POOL_THREADS: usize = 2;

/// How long the round trip that validates an idle connection may take (at
/// most what is left of the checkout's timeout or the call's deadline).
const VALIDATE_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a waiting checkout looks for a failed connect attempt, so a
/// dead node fails the caller at once instead of at the checkout timeout.
const CONNECT_FAILURE_POLL: Duration = Duration::from_millis(25);

/// A pool above this share of connections in use is logged (once, until it
/// drops below `UTILIZATION_CLEAR`).
const UTILIZATION_WARN_TENTHS: u32 = 9;
const UTILIZATION_CLEAR_TENTHS: u32 = 8;

/// Utilisation is computed (a sum over the stripes) on every checkout that
/// found no parked connection, and on every this-many-th checkout of a
/// thread's stripe: often enough to catch a busy pool, rarely enough to stay
/// off the fast path.
const UTILIZATION_SAMPLE: u64 = 16;

/// The counters a checkout writes, one copy per stripe of threads
/// (see [`crate::stripes`]).
#[derive(Debug, Default)]
struct Hot {
    acquires: AtomicU64,
    acquire_wait_nanos: AtomicU64,
    statement_cache_hits: AtomicU64,
    /// Leases taken through this stripe and not yet dropped.
    in_use: AtomicU64,
}

/// Connections checked out now, for leak detection (only when enabled).
#[derive(Debug)]
struct LeakTracker {
    threshold: Duration,
    backtrace: bool,
    next_id: AtomicU64,
    leases: Mutex<HashMap<u64, LeaseRecord>>,
}

#[derive(Debug)]
struct LeaseRecord {
    acquired: Instant,
    backtrace: Option<Backtrace>,
    reported: bool,
}

/// A checked-out connection. Returned to the pool on drop, or discarded
/// when a panic unwinds through its user (its state is then unknown);
/// runs the `on_release` hooks and ends leak tracking.
pub(crate) struct Lease<'a> {
    // Always `Some` until dropped (as in r2d2's own `PooledConnection`).
    conn: Option<PooledConnection<Manager>>,
    pool: &'a Pool,
    acquired: Instant,
    leak_id: Option<u64>,
    /// The stripe whose `in_use` counts this lease.
    stripe: usize,
}

const HELD: &str = "a lease holds its connection until it is dropped";

impl Deref for Lease<'_> {
    type Target = PooledConnection<Manager>;
    fn deref(&self) -> &Self::Target {
        self.conn.as_ref().expect(HELD)
    }
}

impl DerefMut for Lease<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.conn.as_mut().expect(HELD)
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let pool = self.pool;
        if let Some(mut conn) = self.conn.take() {
            if std::thread::panicking() {
                conn.broken = true;
            }
            // A healthy connection is parked for this thread; anything else
            // goes back to r2d2, which discards what is broken or expired.
            let now = Instant::now();
            let reusable = !conn.broken
                && !conn.client.is_closed()
                && !conn.expired(now)
                && !pool.shared.closed.load(Relaxed);
            if reusable {
                conn.mark_returned(now);
                if let Some(conn) = pool.parking.park(conn, now) {
                    give_back(conn);
                }
            } else {
                give_back(conn);
            }
        }
        pool.hot.get(self.stripe).in_use.fetch_sub(1, Relaxed);
        if self.leak_id.is_some() || !pool.hooks.on_release.is_empty() {
            self.released_extras();
        }
    }
}

/// Hands a connection back to r2d2 (which discards it if it is broken or
/// expired). Out of line: the common release parks the connection instead,
/// and r2d2's return path is large.
#[cold]
#[inline(never)]
fn give_back(conn: PooledConnection<Manager>) {
    drop(conn);
}

impl Lease<'_> {
    /// Leak tracking and the `on_release` hooks, when configured: out of
    /// line, so a release without them stays a few cache lines of code.
    #[cold]
    #[inline(never)]
    fn released_extras(&self) {
        let pool = self.pool;
        if let (Some(id), Some(leaks)) = (self.leak_id, &pool.leaks) {
            lock(&leaks.leases).remove(&id);
        }
        if !pool.hooks.on_release.is_empty() {
            let event = ConnectionEvent {
                node: &pool.info,
                duration: self.acquired.elapsed(),
                reason: None,
            };
            hooks::notify(&pool.hooks.on_release, "on_release", |hook| hook(&event));
        }
    }
}

/// A node's connections.
#[derive(Debug)]
pub(crate) struct Pool {
    info: NodeInfo,
    r2d2: r2d2::Pool<Manager>,
    shared: Arc<PoolShared>,
    max_conns: u32,
    min_conns: u32,
    max_conn_idle_time: Duration,
    checkout_timeout: Duration,
    validate_after_idle: Duration,
    hooks: Arc<Hooks>,
    parking: Parking<PooledConnection<Manager>>,
    hot: Striped<Hot>,
    utilization_warned: AtomicBool,
    leaks: Option<LeakTracker>,
}

impl Pool {
    pub(crate) fn open(
        info: &NodeInfo,
        connector: Arc<Connector>,
        pool: &PoolConfig,
        options: &NodeOptions<'_>,
    ) -> Pool {
        let shared = PoolShared::new(info.clone(), Arc::clone(&options.hooks));
        let manager = Manager::new(
            connector,
            pool.max_conn_lifetime,
            pool.max_conn_lifetime_jitter,
            options.settings.statement_cache_capacity,
            Arc::clone(&shared),
        );
        // Validated in `ClusterBuilder::resolve`: r2d2 asserts on zero sizes
        // and durations, and min <= max.
        let r2d2 = r2d2::Pool::builder()
            .max_size(pool.max_conns)
            .min_idle(Some(pool.min_conns))
            .max_lifetime(Some(pool.max_conn_lifetime + pool.max_conn_lifetime_jitter))
            .idle_timeout(Some(pool.max_conn_idle_time))
            .connection_timeout(options.settings.checkout_timeout)
            .test_on_check_out(false)
            .thread_pool(Arc::new(
                ScheduledThreadPool::builder()
                    .num_threads(POOL_THREADS)
                    .thread_name_pattern(&format!("pgxkit-{}-{{}}", info.name()))
                    .on_drop_behavior(OnPoolDropBehavior::DiscardPendingScheduled)
                    .build(),
            ))
            .error_handler(Box::new(ConnectErrorLog))
            .connection_customizer(Box::new(ReleaseCounter(Arc::clone(&shared))))
            .build_unchecked(manager);
        Pool {
            info: info.clone(),
            r2d2,
            shared,
            max_conns: pool.max_conns,
            min_conns: pool.min_conns,
            max_conn_idle_time: pool.max_conn_idle_time,
            checkout_timeout: options.settings.checkout_timeout,
            validate_after_idle: options.settings.validate_after_idle,
            hooks: Arc::clone(&options.hooks),
            parking: Parking::default(),
            hot: Striped::default(),
            utilization_warned: AtomicBool::new(false),
            leaks: options
                .settings
                .leak_threshold
                .map(|threshold| LeakTracker {
                    threshold,
                    backtrace: options.settings.leak_backtrace,
                    next_id: AtomicU64::new(0),
                    leases: Mutex::new(HashMap::new()),
                }),
        }
    }

    /// Counts a statement run on `lease`: a hit in its connection's
    /// statement cache (on the lease's stripe), or a new prepare.
    #[inline]
    pub(crate) fn count_statement(&self, lease: &Lease<'_>, cache_hit: bool) {
        let counter = if cache_hit {
            &self.hot.get(lease.stripe).statement_cache_hits
        } else {
            &self.shared.counters.statements_prepared
        };
        counter.fetch_add(1, Relaxed);
    }

    /// A connection from the pool, waiting at most the checkout timeout.
    pub(crate) fn checkout(&self) -> Result<Lease<'_>> {
        self.checkout_within(self.checkout_timeout)
    }

    /// A connection from the pool within `timeout`. A connection idle for
    /// longer than `validate_after_idle` is checked with a round trip first;
    /// a dead or expired one is discarded and another taken, within the same
    /// deadline. When the pool must open a connection and that fails, the
    /// checkout fails at once with `Connect`.
    pub(crate) fn checkout_within(&self, timeout: Duration) -> Result<Lease<'_>> {
        // Clock readings are a visible share of a query's client CPU: the
        // fast path (a parked connection that needs no check) reads the
        // clock once, here.
        let start = Instant::now();
        // Set when this thread had no connection of its own parked and asked
        // r2d2.
        let mut unparked = false;
        let taken = self.parking.take(
            || {
                unparked = true;
                self.r2d2.try_get()
            },
            |growers| self.may_grow(growers),
        );
        match taken {
            Ok(conn) if !conn.expired(start) && conn.idle_for(start) < self.validate_after_idle => {
                Ok(self.lease(conn, start, start, unparked))
            }
            first => self.checkout_slow(start, timeout, first, unparked),
        }
    }

    /// The rest of [`checkout_within`](Self::checkout_within): waiting in
    /// r2d2, validating, discarding, failing. Out of line, so the common
    /// path stays a few cache lines of code. `first` is the first look's
    /// result; `from_pool`, whether that look found no connection of this
    /// thread's parked.
    #[cold]
    #[inline(never)]
    fn checkout_slow<'a>(
        &'a self,
        start: Instant,
        timeout: Duration,
        first: std::result::Result<
            PooledConnection<Manager>,
            Waiting<'a, PooledConnection<Manager>>,
        >,
        mut from_pool: bool,
    ) -> Result<Lease<'a>> {
        let deadline = start + timeout;
        let mut now = start;
        let mut first = Some(first);
        // A grower whose slice ended before its new connection came.
        let mut growing = None;
        loop {
            let taken = match first.take() {
                Some(taken) => taken,
                None if now >= deadline => return Err(self.checkout_failed(start, timeout)),
                None => {
                    // Still waiting for the connection it made r2d2 open:
                    // not through the stripes again, where it would take a
                    // thread's parked one.
                    let grower = growing
                        .take()
                        .filter(|_| self.may_grow(self.parking.growers()));
                    match grower {
                        Some(waiting) => Err(waiting),
                        None => self.parking.take(
                            || {
                                from_pool = true;
                                self.r2d2.try_get()
                            },
                            |growers| self.may_grow(growers),
                        ),
                    }
                }
            };
            let got = match taken {
                Ok(conn) => Ok(conn),
                Err(waiting) => {
                    from_pool = true;
                    let slice = deadline
                        .saturating_duration_since(now)
                        .min(CONNECT_FAILURE_POLL);
                    let got = self.r2d2.get_timeout(slice);
                    now = Instant::now();
                    if got.is_err() && waiting.is_growing() {
                        // No connection yet: a grower goes on waiting for
                        // its new one while the pool may still grow. If the
                        // connect failed, it does not fail at once: it looks
                        // again, now as a waiter whom releases serve
                        // (`may_grow` says no while connects fail).
                        growing = Some(waiting);
                        continue;
                    }
                    drop(waiting);
                    got
                }
            };
            let mut conn = match got {
                Ok(conn) => conn,
                Err(_) => match self.shared.connect_error_since(start) {
                    Some(err) => {
                        self.shared.counters.checkout_timeouts.fetch_add(1, Relaxed);
                        return Err(err);
                    }
                    None => continue,
                },
            };
            if conn.expired(now) {
                continue; // dropped here: has_broken sees the expiry, counted as lifetime
            }
            if conn.idle_for(now) >= self.validate_after_idle {
                self.shared.counters.validations.fetch_add(1, Relaxed);
                // Within the checkout's own bound (a call's deadline).
                let left = deadline.saturating_duration_since(now);
                let valid =
                    !left.is_zero() && conn.client.is_valid(VALIDATE_TIMEOUT.min(left)).is_ok();
                now = Instant::now();
                if !valid {
                    conn.broken = true;
                    continue;
                }
            }
            return Ok(self.lease(conn, start, now, from_pool));
        }
    }

    /// Whether a checkout that found nothing may wait for a new connection
    /// (see [`Parking::take`]): the pool is open, below `max_conns`, and
    /// the latest connect did not fail.
    ///
    /// The other growers are not counted against the room: r2d2 counts a
    /// connection as open as soon as it hands it to a grower, which counts
    /// itself until it has returned from r2d2, so the sum would count that
    /// connection twice for a moment, and the "no" it gave sent a checkout
    /// to take another thread's parked connection while the pool filled. A
    /// grower too many costs only one wait slice: once the pool is full it
    /// looks again (`checkout_slow`) and waits for a release.
    #[cold]
    #[inline(never)]
    fn may_grow(&self, _growers: usize) -> bool {
        if self.shared.closed.load(Relaxed) || self.shared.connect_failing() {
            return false;
        }
        self.r2d2.state().connections < self.max_conns
    }

    /// Books a successful checkout: counters, the utilisation warning, leak
    /// tracking, the `on_acquire` hooks. `from_pool`: no parked connection
    /// was found (the pool may be busy).
    #[inline]
    fn lease(
        &self,
        conn: PooledConnection<Manager>,
        start: Instant,
        acquired: Instant,
        from_pool: bool,
    ) -> Lease<'_> {
        let waited = acquired.saturating_duration_since(start);
        let (stripe, hot) = self.hot.mine();
        let nth = hot.acquires.fetch_add(1, Relaxed);
        hot.acquire_wait_nanos.fetch_add(
            u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX),
            Relaxed,
        );
        hot.in_use.fetch_add(1, Relaxed);
        if from_pool || nth % UTILIZATION_SAMPLE == 0 {
            self.check_utilization();
        }
        let leak_id = if self.leaks.is_some() || !self.hooks.on_acquire.is_empty() {
            self.leased_extras(acquired, waited)
        } else {
            None
        };
        Lease {
            conn: Some(conn),
            pool: self,
            acquired,
            leak_id,
            stripe,
        }
    }

    /// Leak tracking (its id) and the `on_acquire` hooks, when configured.
    #[cold]
    #[inline(never)]
    fn leased_extras(&self, acquired: Instant, waited: Duration) -> Option<u64> {
        let leak_id = self.leaks.as_ref().map(|leaks| {
            let id = leaks.next_id.fetch_add(1, Relaxed);
            let record = LeaseRecord {
                acquired,
                backtrace: leaks.backtrace.then(Backtrace::force_capture),
                reported: false,
            };
            lock(&leaks.leases).insert(id, record);
            id
        });
        if !self.hooks.on_acquire.is_empty() {
            let event = ConnectionEvent {
                node: &self.info,
                duration: waited,
                reason: None,
            };
            hooks::notify(&self.hooks.on_acquire, "on_acquire", |hook| hook(&event));
        }
        leak_id
    }

    /// Leases outstanding: a sum over the stripes, read one after another,
    /// so approximate while checkouts run (never above `max_conns`).
    fn in_use(&self) -> u32 {
        let n = self.hot.sum(|h| h.in_use.load(Relaxed));
        u32::try_from(n).unwrap_or(u32::MAX).min(self.max_conns)
    }

    /// Logs once when the pool is above 90 % in use, and re-arms when it
    /// drops below 80 %.
    #[cold]
    #[inline(never)]
    fn check_utilization(&self) {
        let in_use = self.in_use();
        if in_use * 10 >= self.max_conns * UTILIZATION_WARN_TENTHS {
            // Look before writing: a full pool stays full for a while, and a
            // write here would take the line from every thread reading the
            // node's other fields.
            if !self.utilization_warned.load(Relaxed)
                && !self.utilization_warned.swap(true, Relaxed)
            {
                log::warn!(
                    "connection pool of {} is {}% in use ({in_use} of {})",
                    self.info,
                    in_use * 100 / self.max_conns,
                    self.max_conns
                );
            }
        } else if in_use * 10 < self.max_conns * UTILIZATION_CLEAR_TENTHS
            && self.utilization_warned.load(Relaxed)
        {
            self.utilization_warned.store(false, Relaxed);
        }
    }

    /// Logs, once each, connections held longer than the leak threshold.
    pub(crate) fn check_leaks(&self) {
        let Some(leaks) = &self.leaks else {
            return;
        };
        let mut found = Vec::new();
        for record in lock(&leaks.leases).values_mut() {
            let held = record.acquired.elapsed();
            if !record.reported && held > leaks.threshold {
                record.reported = true;
                // Reported once: the backtrace leaves the record, and is
                // formatted (symbolised, slow) after the lock every
                // checkout takes is released.
                found.push((held, record.backtrace.take()));
            }
        }
        for (held, backtrace) in found {
            match backtrace {
                Some(bt) => log::warn!(
                    "possible connection leak: a connection to {} held for {held:?} (threshold {:?}), checked out at:\n{bt}",
                    self.info,
                    leaks.threshold
                ),
                None => log::warn!(
                    "possible connection leak: a connection to {} held for {held:?} (threshold {:?}); \
                     enable leak_detection_backtrace to see where it was checked out",
                    self.info,
                    leaks.threshold
                ),
            }
        }
    }

    fn checkout_failed(&self, start: Instant, timeout: Duration) -> Error {
        self.shared.counters.checkout_timeouts.fetch_add(1, Relaxed);
        match self.shared.connect_error_since(start) {
            Some(err) => err.context(&format!("no connection within {timeout:?}")),
            None => Error::new(ErrorKind::PoolTimeout)
                .with_node(&self.info)
                .with_detail(format!(
                    "all {} connections busy for {timeout:?}",
                    self.max_conns
                )),
        }
    }

    /// A connection within the checkout timeout, or sooner if `deadline`
    /// comes first (then running out is `Timeout`, not `PoolTimeout`).
    pub(crate) fn checkout_until(&self, deadline: Option<Instant>) -> Result<Lease<'_>> {
        let Some(at) = deadline else {
            return self.checkout();
        };
        let left = at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::new(ErrorKind::Timeout)
                .with_node(&self.info)
                .with_detail("deadline passed before a connection was checked out"));
        }
        if left >= self.checkout_timeout {
            return self.checkout();
        }
        self.checkout_within(left).map_err(|e| {
            if e.kind() == ErrorKind::PoolTimeout {
                Error::new(ErrorKind::Timeout)
                    .with_node(&self.info)
                    .with_detail("deadline passed waiting for a connection")
            } else {
                e
            }
        })
    }

    /// Refuses new connections from now on and closes every idle one; a
    /// connection in use is closed when it comes back.
    pub(crate) fn close(&self) {
        self.shared.closed.store(true, Relaxed);
        let mut idle = self.parking.take_older_than(Duration::ZERO);
        for conn in &mut idle {
            conn.broken = true;
        }
        while let Some(mut conn) = self.r2d2.try_get() {
            conn.broken = true;
            idle.push(conn);
        }
        drop(idle);
    }

    /// Hands connections parked longer than `age` back to r2d2, whose
    /// reaper then applies the idle timeout to them.
    pub(crate) fn unpark_older_than(&self, age: Duration) {
        let mut unparked = self.parking.take_older_than(age);
        for conn in &mut unparked {
            conn.keep_idle_clock = true;
        }
        drop(unparked);
    }

    /// Closes the connections idle in r2d2 for `max_conn_idle_time` or
    /// past their lifetime (r2d2's own reaper looks only every 30 s), and
    /// hands the others back in the order they were (r2d2 keeps a stack),
    /// their idle clocks running on. Only without `min_conns`: r2d2 opens
    /// a connection whenever a take leaves fewer idle than that, so the
    /// sweep would open what it looks at; r2d2's reaper serves that case.
    pub(crate) fn close_idle(&self) {
        if self.min_conns > 0 {
            return;
        }
        let now = Instant::now();
        let mut kept = Vec::new();
        let mut closing = Vec::new();
        // Bounded: every connection taken stays here until the end, so at
        // most max_conns of them.
        while let Some(mut conn) = self.r2d2.try_get() {
            if conn.expired(now) {
                closing.push(conn); // has_broken sees the expiry
            } else if conn.idle_for(now) >= self.max_conn_idle_time {
                conn.idle_expired = true;
                closing.push(conn);
            } else {
                conn.keep_idle_clock = true;
                kept.push(conn);
            }
        }
        drop(closing);
        // The last taken was the deepest in the stack: it goes back first.
        while let Some(conn) = kept.pop() {
            drop(conn);
        }
    }

    pub(crate) fn stats(&self) -> PoolStats {
        let state = self.r2d2.state();
        // Parked connections are idle, though r2d2 counts them checked out.
        let parked = u32::try_from(self.parking.len()).unwrap_or(u32::MAX);
        let idle = state
            .idle_connections
            .saturating_add(parked)
            .min(state.connections);
        let c = &self.shared.counters;
        PoolStats {
            max_conns: self.max_conns,
            total_conns: state.connections,
            idle_conns: idle,
            in_use_conns: state.connections.saturating_sub(idle),
            acquire_count: self.hot.sum(|h| h.acquires.load(Relaxed)),
            acquire_wait: Duration::from_nanos(
                self.hot.sum(|h| h.acquire_wait_nanos.load(Relaxed)),
            ),
            checkout_timeouts: c.checkout_timeouts.load(Relaxed),
            new_conns: c.created.load(Relaxed),
            connect_failures: c.connect_failures.load(Relaxed),
            closed_lifetime: c.closed_lifetime.load(Relaxed),
            closed_idle: c.closed_idle.load(Relaxed),
            closed_broken: c.closed_broken.load(Relaxed),
            validations: c.validations.load(Relaxed),
            statements_prepared: c.statements_prepared.load(Relaxed),
            statement_cache_hits: self.hot.sum(|h| h.statement_cache_hits.load(Relaxed)),
        }
    }
}
