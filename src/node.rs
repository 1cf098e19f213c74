//! One server: its role, its r2d2 pool, its health, its counters.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

use r2d2::PooledConnection;
use scheduled_thread_pool::ScheduledThreadPool;

use crate::config::NodeConfig;
use crate::error::{Error, ErrorKind, NodeInfo, Result};
use crate::manager::{ConnectErrorLog, Connector, Manager, PoolShared, ReleaseCounter};
use crate::stats::{NodeStats, PoolStats};

pub(crate) type PooledConn = PooledConnection<Manager>;

/// How long the round trip that validates an idle connection may take.
const VALIDATE_TIMEOUT: Duration = Duration::from_secs(5);

/// Cluster-wide checkout settings every node uses.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timings {
    pub(crate) checkout_timeout: Duration,
    pub(crate) validate_after_idle: Duration,
}

#[derive(Debug)]
pub(crate) struct Node {
    pub(crate) info: NodeInfo,
    pool: r2d2::Pool<Manager>,
    connector: Arc<Connector>,
    shared: Arc<PoolShared>,
    max_conns: u32,
    checkout_timeout: Duration,
    validate_after_idle: Duration,
    up: AtomicBool,
}

impl Node {
    pub(crate) fn open(
        config: NodeConfig,
        timings: Timings,
        threads: &Arc<ScheduledThreadPool>,
    ) -> Node {
        let NodeConfig {
            info,
            pg,
            tls,
            pool,
            ..
        } = config;
        let shared = PoolShared::new(info.clone());
        let connector = Arc::new(Connector { pg, tls });
        let manager = Manager::new(
            Arc::clone(&connector),
            pool.max_conn_lifetime,
            pool.max_conn_lifetime_jitter,
            Arc::clone(&shared),
        );
        // Validated in `ClusterBuilder::resolve`: r2d2 asserts on zero sizes
        // and durations, and min <= max.
        let r2d2_pool = r2d2::Pool::builder()
            .max_size(pool.max_conns)
            .min_idle(Some(pool.min_conns))
            .max_lifetime(Some(pool.max_conn_lifetime + pool.max_conn_lifetime_jitter))
            .idle_timeout(Some(pool.max_conn_idle_time))
            .connection_timeout(timings.checkout_timeout)
            .test_on_check_out(false)
            .thread_pool(Arc::clone(threads))
            .error_handler(Box::new(ConnectErrorLog(info.clone())))
            .connection_customizer(Box::new(ReleaseCounter(Arc::clone(&shared))))
            .build_unchecked(manager);
        Node {
            info,
            pool: r2d2_pool,
            connector,
            shared,
            max_conns: pool.max_conns,
            checkout_timeout: timings.checkout_timeout,
            validate_after_idle: timings.validate_after_idle,
            up: AtomicBool::new(true),
        }
    }

    /// Whether the last health probe (or the check at build) succeeded.
    pub(crate) fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }

    /// Records a probe result; returns the previous state.
    pub(crate) fn set_up(&self, up: bool) -> bool {
        self.up.swap(up, Relaxed)
    }

    /// Opens one connection outside the pool, bounded by the connect timeout.
    pub(crate) fn connect_direct(&self) -> Result<postgres::Client> {
        self.connector.connect().map_err(|e| {
            Error::new(ErrorKind::Connect)
                .with_node(&self.info)
                .with_source(e)
        })
    }

    /// A connection from the pool, waiting at most the checkout timeout.
    /// A connection idle for longer than `validate_after_idle` is checked
    /// with a round trip first; a dead or expired one is discarded and
    /// another taken, within the same deadline.
    pub(crate) fn checkout(&self) -> Result<PooledConn> {
        let start = Instant::now();
        let deadline = start + self.checkout_timeout;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let mut conn = match self.pool.get_timeout(remaining) {
                Ok(conn) => conn,
                Err(_) => return Err(self.checkout_failed(start)),
            };
            let now = Instant::now();
            if conn.expired(now) {
                continue; // dropped here: has_broken sees the expiry, counted as lifetime
            }
            if conn.idle_for(now) >= self.validate_after_idle {
                self.shared.counters.validations.fetch_add(1, Relaxed);
                if conn.client.is_valid(VALIDATE_TIMEOUT).is_err() {
                    conn.broken = true;
                    continue;
                }
            }
            let waited = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
            let counters = &self.shared.counters;
            counters.acquires.fetch_add(1, Relaxed);
            counters.acquire_wait_nanos.fetch_add(waited, Relaxed);
            return Ok(conn);
        }
    }

    fn checkout_failed(&self, start: Instant) -> Error {
        self.shared.counters.checkout_timeouts.fetch_add(1, Relaxed);
        match self.shared.connect_error_since(start) {
            Some(why) => Error::new(ErrorKind::Connect)
                .with_node(&self.info)
                .with_detail(format!(
                    "no connection within {:?}: {why}",
                    self.checkout_timeout
                )),
            None => Error::new(ErrorKind::PoolTimeout)
                .with_node(&self.info)
                .with_detail(format!(
                    "all {} connections busy for {:?}",
                    self.max_conns, self.checkout_timeout
                )),
        }
    }

    /// Runs `op` on a pooled connection; a connection-level failure marks
    /// the connection broken so the pool discards it.
    pub(crate) fn run<T>(
        &self,
        op: impl FnOnce(&mut postgres::Client) -> std::result::Result<T, postgres::Error>,
    ) -> Result<T> {
        let mut conn = self.checkout()?;
        op(&mut conn.client).map_err(|e| self.failed(&mut conn, e))
    }

    /// Converts a driver error, marking the connection broken when the
    /// error says the connection itself is gone.
    pub(crate) fn failed(&self, conn: &mut PooledConn, err: postgres::Error) -> Error {
        let err = Error::from_postgres(err, &self.info);
        if err.is_connection_error() || conn.client.is_closed() {
            conn.broken = true;
        }
        err
    }

    pub(crate) fn stats(&self) -> NodeStats {
        let state = self.pool.state();
        let c = &self.shared.counters;
        NodeStats {
            node: self.info.clone(),
            up: self.is_up(),
            pool: PoolStats {
                max_conns: self.max_conns,
                total_conns: state.connections,
                idle_conns: state.idle_connections,
                in_use_conns: state.connections.saturating_sub(state.idle_connections),
                acquire_count: c.acquires.load(Relaxed),
                acquire_wait: Duration::from_nanos(c.acquire_wait_nanos.load(Relaxed)),
                checkout_timeouts: c.checkout_timeouts.load(Relaxed),
                new_conns: c.created.load(Relaxed),
                connect_failures: c.connect_failures.load(Relaxed),
                closed_lifetime: c.closed_lifetime.load(Relaxed),
                closed_idle: c.closed_idle.load(Relaxed),
                closed_broken: c.closed_broken.load(Relaxed),
                validations: c.validations.load(Relaxed),
            },
        }
    }
}
