//! One server: its role, its r2d2 pool, its circuit breaker, what the health
//! monitor last saw of it, and its counters.

use std::backtrace::Backtrace;
use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use r2d2::PooledConnection;
use scheduled_thread_pool::{OnPoolDropBehavior, ScheduledThreadPool};

use crate::affinity::{Parking, Waiting};
use crate::breaker::{Breaker, BreakerConfig, BreakerState, Outcome, Transition};
use crate::config::NodeConfig;
use crate::deadline::{Armed, Canceller, Watchdog};
use crate::error::{Error, ErrorKind, NodeInfo, Result, RetryAfter, Role};
use crate::hooks::OperationKind;
use crate::hooks::{self, ConnectionEvent, Hooks, NodeEvent};
use crate::manager::{Conn, ConnectErrorLog, Connector, Manager, PoolShared, ReleaseCounter};
use crate::plans::Capture;
use crate::socket::Sockets;
use crate::statements::{self, Call, Output, Params, StatementMode};
use crate::stats::{NodeStats, PoolStats};
use crate::stripes::Striped;
use crate::sync::lock;
use postgres::types::ToSql;

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

/// Marks "no value" in the lag atomics.
const UNKNOWN: u64 = u64::MAX;

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

/// One parameterised statement to run: how, what, and where slow ones go.
#[derive(Clone, Copy)]
pub(crate) struct Stmt<'a> {
    pub(crate) mode: StatementMode,
    pub(crate) kind: OperationKind,
    pub(crate) route: Role,
    pub(crate) sql: &'a str,
    pub(crate) params: &'a [&'a (dyn ToSql + Sync)],
    pub(crate) call: Call,
    pub(crate) plans: Option<&'a Capture>,
}

/// Cluster-wide settings every node uses.
#[derive(Debug, Clone)]
pub(crate) struct NodeOptions {
    pub(crate) checkout_timeout: Duration,
    pub(crate) validate_after_idle: Duration,
    pub(crate) breaker: BreakerConfig,
    pub(crate) hooks: Arc<Hooks>,
    pub(crate) leak_threshold: Option<Duration>,
    pub(crate) leak_backtrace: bool,
    pub(crate) watchdog: Arc<Watchdog>,
    pub(crate) statement_cache_capacity: usize,
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

/// What the last health probe found, beyond the atomics on the hot path.
#[derive(Debug, Clone, Default)]
pub(crate) struct ProbeRecord {
    pub(crate) checked_at: Option<SystemTime>,
    pub(crate) in_recovery: Option<bool>,
    pub(crate) error: Option<String>,
}

#[derive(Debug)]
pub(crate) struct Node {
    pub(crate) info: NodeInfo,
    pool: r2d2::Pool<Manager>,
    connector: Arc<Connector>,
    /// The same connector, as the deadline watchdog takes it.
    canceller: Arc<dyn Canceller>,
    shared: Arc<PoolShared>,
    max_conns: u32,
    min_conns: u32,
    max_conn_idle_time: Duration,
    checkout_timeout: Duration,
    validate_after_idle: Duration,
    hooks: Arc<Hooks>,
    watchdog: Arc<Watchdog>,
    parking: Parking<PooledConnection<Manager>>,
    hot: Striped<Hot>,
    utilization_warned: AtomicBool,
    leaks: Option<LeakTracker>,
    up: AtomicBool,
    lag_bytes: AtomicU64,
    lag_micros: AtomicU64,
    /// Since when the monitor has seen this replica behind with no replayed
    /// commit to date its lag by.
    behind_since: Mutex<Option<Instant>>,
    probe: Mutex<ProbeRecord>,
    breaker: Mutex<Breaker>,
    // Mirrors of the breaker for the lock-free fast path.
    breaker_state: AtomicU8,
    breaker_failures: AtomicU32,
}

/// A checked-out connection. Returned to the pool on drop, or discarded
/// when a panic unwinds through its user (its state is then unknown);
/// runs the `on_release` hooks and ends leak tracking.
pub(crate) struct Lease<'a> {
    // Always `Some` until dropped (as in r2d2's own `PooledConnection`).
    conn: Option<PooledConnection<Manager>>,
    node: &'a Node,
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
        let node = self.node;
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
                && !node.shared.closed.load(Relaxed);
            if reusable {
                conn.mark_returned(now);
                if let Some(conn) = node.parking.park(conn, now) {
                    give_back(conn);
                }
            } else {
                give_back(conn);
            }
        }
        node.hot.get(self.stripe).in_use.fetch_sub(1, Relaxed);
        if self.leak_id.is_some() || !node.hooks.on_release.is_empty() {
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
        let node = self.node;
        if let (Some(id), Some(leaks)) = (self.leak_id, &node.leaks) {
            lock(&leaks.leases).remove(&id);
        }
        if !node.hooks.on_release.is_empty() {
            let event = ConnectionEvent {
                node: &node.info,
                duration: self.acquired.elapsed(),
                reason: None,
            };
            hooks::notify(&node.hooks.on_release, "on_release", |hook| hook(&event));
        }
    }
}

/// Admission through a node's breaker; records the call's outcome, or
/// releases its trial slot if dropped without one (a panic in user code).
pub(crate) struct Permit<'a> {
    node: &'a Node,
    held_slot: bool,
    done: bool,
}

impl Permit<'_> {
    /// Records the outcome of the call from its result.
    pub(crate) fn finish<T>(self, result: &Result<T>) {
        match result {
            Ok(_) => self.settle(Outcome::Success),
            Err(e) => self.finish_error(e),
        }
    }

    /// Records a call that failed with `err`: a failure of the node only if
    /// it is a connection-level error.
    pub(crate) fn finish_error(self, err: &Error) {
        self.settle(if err.is_connection_error() {
            Outcome::Failure
        } else {
            Outcome::Success
        });
    }

    fn settle(mut self, outcome: Outcome) {
        self.done = true;
        self.node.record(outcome, self.held_slot);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.node.record(Outcome::Abandoned, self.held_slot);
        }
    }
}

impl Node {
    pub(crate) fn open(config: NodeConfig, options: &NodeOptions) -> Node {
        let NodeConfig {
            info,
            pg,
            tls,
            pool,
            init_sql,
            ..
        } = config;
        let shared = PoolShared::new(info.clone(), Arc::clone(&options.hooks));
        let connector = Arc::new(Connector {
            pg,
            tls,
            init_sql,
            node: info.clone(),
            watchdog: Arc::clone(&options.watchdog),
            sockets: Sockets::default(),
        });
        let manager = Manager::new(
            Arc::clone(&connector),
            pool.max_conn_lifetime,
            pool.max_conn_lifetime_jitter,
            options.statement_cache_capacity,
            Arc::clone(&shared),
        );
        // Validated in `ClusterBuilder::resolve`: r2d2 asserts on zero sizes
        // and durations, and min <= max.
        let r2d2_pool = r2d2::Pool::builder()
            .max_size(pool.max_conns)
            .min_idle(Some(pool.min_conns))
            .max_lifetime(Some(pool.max_conn_lifetime + pool.max_conn_lifetime_jitter))
            .idle_timeout(Some(pool.max_conn_idle_time))
            .connection_timeout(options.checkout_timeout)
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
        Node {
            info,
            pool: r2d2_pool,
            canceller: Arc::clone(&connector) as Arc<dyn Canceller>,
            connector,
            shared,
            max_conns: pool.max_conns,
            min_conns: pool.min_conns,
            max_conn_idle_time: pool.max_conn_idle_time,
            checkout_timeout: options.checkout_timeout,
            validate_after_idle: options.validate_after_idle,
            hooks: Arc::clone(&options.hooks),
            watchdog: Arc::clone(&options.watchdog),
            parking: Parking::default(),
            hot: Striped::default(),
            utilization_warned: AtomicBool::new(false),
            leaks: options.leak_threshold.map(|threshold| LeakTracker {
                threshold,
                backtrace: options.leak_backtrace,
                next_id: AtomicU64::new(0),
                leases: Mutex::new(HashMap::new()),
            }),
            up: AtomicBool::new(true),
            lag_bytes: AtomicU64::new(UNKNOWN),
            lag_micros: AtomicU64::new(UNKNOWN),
            behind_since: Mutex::new(None),
            probe: Mutex::new(ProbeRecord::default()),
            breaker: Mutex::new(Breaker::new(options.breaker)),
            breaker_state: AtomicU8::new(BreakerState::Closed.to_u8()),
            breaker_failures: AtomicU32::new(0),
        }
    }

    /// Whether the last health probe (or the check at build) succeeded.
    pub(crate) fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }

    /// Records whether the node answered; returns the previous value.
    pub(crate) fn set_up(&self, up: bool) -> bool {
        self.up.swap(up, Relaxed)
    }

    /// Replication lag as last measured: bytes and time, `None` when unknown.
    pub(crate) fn lag(&self) -> (Option<u64>, Option<Duration>) {
        let known = |v: u64| (v != UNKNOWN).then_some(v);
        (
            known(self.lag_bytes.load(Relaxed)),
            known(self.lag_micros.load(Relaxed)).map(Duration::from_micros),
        )
    }

    pub(crate) fn set_lag(&self, bytes: Option<u64>, time: Option<Duration>) {
        self.lag_bytes.store(bytes.unwrap_or(UNKNOWN), Relaxed);
        let micros = time.map_or(UNKNOWN, |t| {
            u64::try_from(t.as_micros()).unwrap_or(UNKNOWN - 1)
        });
        self.lag_micros.store(micros, Relaxed);
    }

    /// For a replica seen `behind` with no replay timestamp: how long it has
    /// been seen so (from the first such probe); `None`, and forgotten, once
    /// it is not.
    pub(crate) fn behind_undated(&self, behind: bool, now: Instant) -> Option<Duration> {
        let mut since = lock(&self.behind_since);
        if !behind {
            *since = None;
            return None;
        }
        Some(now.saturating_duration_since(*since.get_or_insert(now)))
    }

    pub(crate) fn probe_record(&self) -> ProbeRecord {
        lock(&self.probe).clone()
    }

    pub(crate) fn set_probe_record(&self, record: ProbeRecord) {
        *lock(&self.probe) = record;
    }

    pub(crate) fn breaker_state(&self) -> BreakerState {
        BreakerState::from_u8(self.breaker_state.load(Relaxed))
    }

    /// Whether the breaker would let a call through now (no slot is taken).
    pub(crate) fn breaker_allows(&self) -> bool {
        self.breaker_state() == BreakerState::Closed
            || lock(&self.breaker).would_allow(Instant::now())
    }

    /// How long until an open breaker lets a call through.
    pub(crate) fn breaker_retry_after(&self) -> Duration {
        lock(&self.breaker).retry_after(Instant::now())
    }

    /// Asks the breaker to let a call through; fails fast when it is open.
    pub(crate) fn admit(&self) -> Result<Permit<'_>> {
        if self.breaker_state() == BreakerState::Closed {
            return Ok(Permit {
                node: self,
                held_slot: false,
                done: false,
            });
        }
        let now = Instant::now();
        let (admitted, transition) = {
            let mut b = lock(&self.breaker);
            let r = b.try_acquire(now);
            self.mirror(&b);
            r
        };
        self.report(transition);
        match admitted {
            Ok(held_slot) => Ok(Permit {
                node: self,
                held_slot,
                done: false,
            }),
            Err(wait) => Err(Error::new(ErrorKind::CircuitOpen)
                .with_node(&self.info)
                .with_source(RetryAfter(wait))),
        }
    }

    fn record(&self, outcome: Outcome, held_slot: bool) {
        // The common case, a success on a healthy node, takes no lock.
        if !held_slot
            && outcome != Outcome::Failure
            && self.breaker_state() == BreakerState::Closed
            && self.breaker_failures.load(Relaxed) == 0
        {
            return;
        }
        let transition = {
            let mut b = lock(&self.breaker);
            let t = b.record(outcome, held_slot, Instant::now());
            self.mirror(&b);
            t
        };
        self.report(transition);
    }

    /// A health probe reached the node: an open breaker closes.
    pub(crate) fn probe_succeeded(&self) {
        if self.breaker_state() == BreakerState::Closed {
            return;
        }
        let transition = {
            let mut b = lock(&self.breaker);
            let t = b.probe_succeeded(Instant::now());
            self.mirror(&b);
            t
        };
        self.report(transition);
    }

    fn mirror(&self, b: &Breaker) {
        self.breaker_state.store(b.state().to_u8(), Relaxed);
        self.breaker_failures
            .store(b.consecutive_failures(), Relaxed);
    }

    /// Logs a state change (never while the breaker lock is held).
    fn report(&self, transition: Option<Transition>) {
        if let Some(t) = transition {
            match t.to {
                BreakerState::Open => {
                    log::warn!("circuit breaker of {} opened (was {})", self.info, t.from)
                }
                _ => log::info!(
                    "circuit breaker of {} is {} (was {})",
                    self.info,
                    t.to,
                    t.from
                ),
            }
            let event = NodeEvent {
                node: &self.info,
                breaker: Some((t.from, t.to)),
                up: None,
            };
            hooks::notify(
                &self.hooks.on_breaker_state_change,
                "on_breaker_state_change",
                |hook| hook(&event),
            );
        }
    }

    /// Records whether the node answered its probe; logs and runs the hooks on a change.
    pub(crate) fn record_up(&self, up: bool, why: Option<&str>) {
        let was_up = self.set_up(up);
        if was_up == up {
            return;
        }
        if up {
            log::info!("{} is up again", self.info);
        } else {
            log::warn!("{} is down: {}", self.info, why.unwrap_or("probe failed"));
        }
        let event = NodeEvent {
            node: &self.info,
            breaker: None,
            up: Some(up),
        };
        hooks::notify(
            &self.hooks.on_node_health_change,
            "on_node_health_change",
            |hook| hook(&event),
        );
    }

    /// How this node's connections are opened.
    /// Shuts down the socket of every open connection to this node (a
    /// node found silent), so calls blocked on it fail at once; how many.
    pub(crate) fn end_connections(&self) -> usize {
        self.connector.sockets.shutdown_all()
    }

    pub(crate) fn connector(&self) -> &Arc<Connector> {
        &self.connector
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
                self.pool.try_get()
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
                                self.pool.try_get()
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
                    let got = self.pool.get_timeout(slice);
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
        self.pool.state().connections < self.max_conns
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
            node: self,
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

    /// Runs `op` on a pooled connection, through the breaker. A
    /// connection-level failure marks the connection broken (the pool then
    /// discards it) and counts against the breaker; any other outcome counts
    /// as the node answering.
    pub(crate) fn run<T>(
        &self,
        deadline: Option<Instant>,
        op: impl FnOnce(&mut postgres::Client) -> std::result::Result<T, postgres::Error>,
    ) -> Result<T> {
        let permit = self.admit()?;
        let result = self
            .checkout_until(deadline)
            .and_then(|mut conn| self.guarded(&mut conn, deadline, op));
        permit.finish(&result);
        result
    }

    /// [`run`](Self::run) with the whole pooled connection (COPY marks it
    /// broken when it stops half way).
    pub(crate) fn run_conn<T>(
        &self,
        deadline: Option<Instant>,
        op: impl FnOnce(&mut Conn) -> std::result::Result<T, postgres::Error>,
    ) -> Result<T> {
        let permit = self.admit()?;
        let result = self
            .checkout_until(deadline)
            .and_then(|mut conn| self.guarded_conn(&mut conn, deadline, op));
        permit.finish(&result);
        result
    }

    /// Lends a pooled connection to a caller's closure (`with_client`),
    /// through the breaker and bounded by `deadline`. The closure's error
    /// comes back unchanged, except after the deadline fired (then it is
    /// `Timeout`). A connection the closure leaves closed is discarded and
    /// counts against the breaker.
    pub(crate) fn lend<T, E: From<Error>>(
        &self,
        deadline: Option<Instant>,
        f: impl FnOnce(&mut postgres::Client) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        let permit = self.admit()?;
        let mut conn = match self.checkout_until(deadline) {
            Ok(conn) => conn,
            Err(e) => {
                permit.finish_error(&e);
                return Err(e.into());
            }
        };
        let result = self.lend_on(&mut conn, deadline, f);
        if conn.broken {
            permit.finish_error(&Error::new(ErrorKind::Closed));
        } else {
            permit.finish(&Ok(()));
        }
        result
    }

    /// [`lend`](Self::lend) on a connection already checked out (a
    /// transaction's).
    pub(crate) fn lend_on<T, E: From<Error>>(
        &self,
        conn: &mut Lease<'_>,
        deadline: Option<Instant>,
        f: impl FnOnce(&mut postgres::Client) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        if conn.client.is_closed() {
            return Err(self.closed_before_sending(conn).into());
        }
        let armed = deadline.map(|at| self.arm(conn, at));
        let result = f(&mut conn.client);
        if armed.is_some_and(Armed::disarm) {
            conn.broken = true;
            return result.map_err(|_| {
                Error::new(ErrorKind::Timeout)
                    .with_node(&self.info)
                    .with_detail("deadline passed; the statement was cancelled on the server")
                    .into()
            });
        }
        if conn.client.is_closed() {
            conn.broken = true;
        }
        result
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

    /// Runs `op` on a checked-out connection, bounded by `deadline`: when it
    /// passes, the statement is cancelled on the server and the call returns
    /// `Timeout`; the connection, whose state is then uncertain, is discarded.
    pub(crate) fn guarded<T>(
        &self,
        conn: &mut Lease<'_>,
        deadline: Option<Instant>,
        op: impl FnOnce(&mut postgres::Client) -> std::result::Result<T, postgres::Error>,
    ) -> Result<T> {
        self.guarded_conn(conn, deadline, |c| op(&mut c.client))
    }

    /// [`guarded`](Self::guarded), with the whole pooled connection (its
    /// statement cache too).
    pub(crate) fn guarded_conn<T>(
        &self,
        conn: &mut Lease<'_>,
        deadline: Option<Instant>,
        op: impl FnOnce(&mut Conn) -> std::result::Result<T, postgres::Error>,
    ) -> Result<T> {
        if conn.client.is_closed() {
            return Err(self.closed_before_sending(conn));
        }
        let armed = deadline.map(|at| self.arm(conn, at));
        let result = op(conn);
        if armed.is_some_and(Armed::disarm) {
            // The watchdog fired: the connection's state is uncertain.
            conn.broken = true;
            return result.map_err(|e| self.cancelled(e));
        }
        result.map_err(|e| self.failed(conn, e))
    }

    #[cold]
    #[inline(never)]
    fn closed_before_sending(&self, conn: &mut Lease<'_>) -> Error {
        conn.broken = true;
        Error::new(ErrorKind::Closed)
            .with_node(&self.info)
            .with_detail("the connection was closed before the statement was sent")
            .unsent()
    }

    /// Has the watchdog cancel the statement about to run on `conn` at `at`.
    #[inline(never)]
    fn arm(&self, conn: &Lease<'_>, at: Instant) -> Armed {
        let token = conn.client.cancel_token();
        self.watchdog
            .arm(at, token, &self.canceller, conn.socket.as_ref())
    }

    /// The error of a statement the watchdog cancelled at its deadline.
    #[cold]
    #[inline(never)]
    fn cancelled(&self, err: postgres::Error) -> Error {
        Error::new(ErrorKind::Timeout)
            .with_node(&self.info)
            .with_detail("deadline passed; the statement was cancelled on the server")
            .with_source(err)
    }

    /// Runs one parameterised statement on a checked-out connection,
    /// bounded by `deadline`; offers a slow one to plan capture.
    pub(crate) fn statement(
        &self,
        conn: &mut Lease<'_>,
        deadline: Option<Instant>,
        stmt: &Stmt<'_>,
    ) -> Result<Output> {
        let Stmt {
            mode,
            kind,
            route,
            sql,
            params,
            call,
            plans,
        } = *stmt;
        match mode {
            StatementMode::Cached => {
                let started = plans.map(|_| Instant::now());
                let (output, statement, hit) = self.guarded_conn(conn, deadline, |c| {
                    let Conn {
                        client, statements, ..
                    } = c;
                    statements.run(client, sql, |client, statement| {
                        call.run(client, statement, params)
                    })
                })?;
                let counter = if hit {
                    &self.hot.get(conn.stripe).statement_cache_hits
                } else {
                    &self.shared.counters.statements_prepared
                };
                counter.fetch_add(1, Relaxed);
                if let (Some(capture), Some(started)) = (plans, started) {
                    self.offer_plan(capture, (kind, route), &statement, sql, params, started);
                }
                Ok(output)
            }
            StatementMode::Unnamed | StatementMode::Simple => {
                self.uncached(mode, conn, deadline, stmt)
            }
        }
    }

    /// Offers a statement that took longer than the capture threshold.
    #[inline(never)]
    fn offer_plan(
        &self,
        capture: &Capture,
        (kind, route): (OperationKind, Role),
        statement: &postgres::Statement,
        sql: &str,
        params: Params<'_>,
        started: Instant,
    ) {
        let took = started.elapsed();
        if took > capture.threshold {
            capture.offer(&self.info, (kind, route), statement, sql, params, took);
        }
    }

    /// The modes without a statement cache: [`StatementMode::Unnamed`]
    /// (parse, bind and execute in one round trip) and
    /// [`StatementMode::Simple`] (no parameters, no rows). Out of line: the
    /// default mode's path stays a few cache lines of code.
    #[inline(never)]
    fn uncached(
        &self,
        mode: StatementMode,
        conn: &mut Lease<'_>,
        deadline: Option<Instant>,
        stmt: &Stmt<'_>,
    ) -> Result<Output> {
        let Stmt {
            sql, params, call, ..
        } = *stmt;
        if mode == StatementMode::Unnamed {
            let types = statements::infer_types(params).map_err(|n| {
                Error::new(ErrorKind::Unsupported).with_detail(format!(
                    "cannot tell the type of parameter ${n} for an unnamed statement; \
                     use with_client and query_typed"
                ))
            })?;
            return self.guarded(conn, deadline, |client| {
                call.run_unnamed(client, sql, params, &types)
            });
        }
        if !params.is_empty() {
            return Err(Error::new(ErrorKind::Unsupported)
                .with_detail("the simple protocol takes no parameters ($1, ...)"));
        }
        match call {
            Call::Execute => self.guarded(conn, deadline, |client| {
                statements::execute_simple(client, sql)
            }),
            Call::Query | Call::QueryOpt => Err(Error::new(ErrorKind::Unsupported).with_detail(
                "the simple protocol returns text rows, not postgres::Row; \
                 use with_client(|c| c.simple_query(..))",
            )),
        }
    }

    /// Admission, checkout and [`statement`](Self::statement) in one call.
    pub(crate) fn run_statement(
        &self,
        deadline: Option<Instant>,
        stmt: &Stmt<'_>,
    ) -> Result<Output> {
        let permit = self.admit()?;
        let result = self
            .checkout_until(deadline)
            .and_then(|mut conn| self.statement(&mut conn, deadline, stmt));
        permit.finish(&result);
        result
    }

    /// Refuses new connections from now on and closes every idle one; a
    /// connection in use is closed when it comes back.
    pub(crate) fn close(&self) {
        self.shared.closed.store(true, Relaxed);
        let mut idle = self.parking.take_older_than(Duration::ZERO);
        for conn in &mut idle {
            conn.broken = true;
        }
        while let Some(mut conn) = self.pool.try_get() {
            conn.broken = true;
            idle.push(conn);
        }
        drop(idle);
    }

    /// Converts a driver error, marking the connection broken when the
    /// error says the connection itself is gone.
    #[cold]
    #[inline(never)]
    pub(crate) fn failed(&self, conn: &mut Lease<'_>, err: postgres::Error) -> Error {
        let err = Error::from_postgres(err, &self.info);
        if err.is_connection_error() || conn.client.is_closed() {
            conn.broken = true;
        }
        err
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
        while let Some(mut conn) = self.pool.try_get() {
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

    pub(crate) fn pool_stats(&self) -> PoolStats {
        let state = self.pool.state();
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

    pub(crate) fn stats(&self) -> NodeStats {
        let (lag_bytes, lag) = self.lag();
        NodeStats {
            node: self.info.clone(),
            up: self.is_up(),
            breaker: self.breaker_state(),
            lag_bytes,
            lag,
            pool: self.pool_stats(),
        }
    }
}
