//! `Cluster`: the public operations, routing writes to the primary and reads
//! round-robin over the replicas that are up.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use postgres::types::ToSql;
use postgres::{Row, Statement};
use scheduled_thread_pool::{OnPoolDropBehavior, ScheduledThreadPool};

use crate::balancer::RoundRobin;
use crate::config::{ClusterBuilder, ClusterConfig, ReadFallback};
use crate::error::{Error, ErrorKind, Result, Role};
use crate::health::{self, HealthReport, NodeHealth};
use crate::hooks::{self, AfterOperation, BeforeOperation, Hooks, OperationKind, ParamView};
use crate::monitor;
use crate::node::{Node, NodeOptions};
use crate::plans::{self, Capture};
use crate::stats::ClusterStats;
use crate::sync::lock;

/// Threads r2d2 uses to open connections in the background, shared by every
/// pool of a cluster.
const POOL_THREADS: usize = 3;

/// A primary and its read replicas behind one thread-safe handle.
///
/// `Cluster` is `Clone + Send + Sync`: clones share the same pools, so clone
/// it into every thread. Writes and every operation not marked as a read
/// (`execute`, `query`, `query_one`, `query_opt`, `batch_execute`,
/// `with_primary`) go to the primary; the `read_*` family and `with_replica`
/// go to the replicas, round-robin over those that are up, and to the
/// primary when there are none.
///
/// Every method blocks the calling thread: first to check out a connection
/// (bounded by [`checkout_timeout`](ClusterBuilder::checkout_timeout)), then
/// for the statement itself.
///
/// ```no_run
/// use pgxkit::Cluster;
///
/// # fn main() -> Result<(), pgxkit::Error> {
/// let cluster = Cluster::builder()
///     .primary("postgres://app@db-primary/app")
///     .replica("postgres://app@db-replica-1/app")
///     .build()?;
/// cluster.execute("INSERT INTO users (name) VALUES ($1)", &[&"ada"])?;
/// let n: i64 = cluster.read_query_one("SELECT count(*) FROM users", &[])?.get(0);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

/// Bound on `health_check()`: checkout plus one round trip.
const HEALTH_CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on `is_ready()`.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) struct Inner {
    primary: Node,
    replicas: Vec<Node>,
    balancer: RoundRobin,
    max_replica_lag: Option<Duration>,
    max_replica_lag_bytes: Option<u64>,
    read_fallback: ReadFallback,
    hooks: Arc<Hooks>,
    plans: Option<Capture>,
    // Dropping the sender stops the health monitor.
    _stop_monitor: Sender<()>,
    _monitor: Mutex<Option<JoinHandle<()>>>,
    _plan_worker: Mutex<Option<JoinHandle<()>>>,
    _threads: Arc<ScheduledThreadPool>,
}

impl Inner {
    pub(crate) fn plans(&self) -> Option<&Capture> {
        self.plans.as_ref()
    }

    /// The primary, then the replicas.
    pub(crate) fn nodes(&self) -> impl Iterator<Item = &Node> {
        std::iter::once(&self.primary).chain(&self.replicas)
    }
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("primary", &self.inner.primary.info)
            .field(
                "replicas",
                &self
                    .inner
                    .replicas
                    .iter()
                    .map(|r| &r.info)
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

impl Cluster {
    /// A builder for a cluster with a primary and any number of replicas.
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder::default()
    }

    /// One node serving reads and writes (the Go library's `Connect`).
    ///
    /// ```no_run
    /// let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app?pool_max_conns=10")?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn connect(dsn: &str) -> Result<Cluster> {
        Self::builder().primary(dsn).build()
    }

    /// Reads from `read_dsn`, everything else to `write_dsn` (the Go
    /// library's `ConnectReadWrite`). Each DSN may carry its own `pool_*` settings.
    ///
    /// ```no_run
    /// let cluster = pgxkit::Cluster::connect_read_write(
    ///     "postgres://reader@db-replica/app?pool_max_conns=50",
    ///     "postgres://writer@db-primary/app?pool_max_conns=20",
    /// )?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn connect_read_write(read_dsn: &str, write_dsn: &str) -> Result<Cluster> {
        Self::builder().primary(write_dsn).replica(read_dsn).build()
    }

    /// A cluster configured from `POSTGRES_*` environment variables; see
    /// [`ClusterBuilder::from_env`] for the table.
    ///
    /// ```no_run
    /// let cluster = pgxkit::Cluster::from_env()?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn from_env() -> Result<Cluster> {
        ClusterBuilder::from_env()?.build()
    }

    pub(crate) fn start(config: ClusterConfig) -> Result<Cluster> {
        let threads = Arc::new(
            ScheduledThreadPool::builder()
                .num_threads(POOL_THREADS)
                .thread_name_pattern("pgxkit-pool-{}")
                .on_drop_behavior(OnPoolDropBehavior::DiscardPendingScheduled)
                .build(),
        );
        let options = NodeOptions {
            checkout_timeout: config.checkout_timeout,
            validate_after_idle: config.validate_after_idle,
            breaker: config.breaker,
            hooks: Arc::clone(&config.hooks),
            leak_threshold: config.leak_threshold,
            leak_backtrace: config.leak_backtrace,
        };
        let primary = Node::open(config.primary, &options, &threads);
        let replicas: Vec<Node> = config
            .replicas
            .into_iter()
            .map(|r| Node::open(r, &options, &threads))
            .collect();

        // One connection to each node, all at once, each bounded by its
        // connect timeout.
        let primary_check = std::thread::scope(|s| {
            for replica in &replicas {
                s.spawn(move || {
                    if let Err(e) = replica.connect_direct() {
                        replica.set_up(false);
                        log::warn!("{e}; it gets no reads until a health probe reaches it");
                    }
                });
            }
            (!config.lazy_connect).then(|| primary.connect_direct())
        });
        if let Some(Err(e)) = primary_check {
            return Err(e);
        }

        let (plans, plan_jobs) = match &config.plan_capture {
            Some(settings) => {
                let (capture, jobs) = Capture::new(settings);
                (Some(capture), Some(jobs))
            }
            None => (None, None),
        };
        let (stop_tx, stop_rx) = crossbeam_channel::bounded(0);
        let inner = Arc::new(Inner {
            primary,
            replicas,
            balancer: RoundRobin::default(),
            max_replica_lag: config.max_replica_lag,
            max_replica_lag_bytes: config.max_replica_lag_bytes,
            read_fallback: config.read_fallback,
            hooks: config.hooks,
            plans,
            _plan_worker: Mutex::new(None),
            _stop_monitor: stop_tx,
            _monitor: Mutex::new(None),
            _threads: threads,
        });
        let monitor = monitor::spawn(
            Arc::downgrade(&inner),
            config.health_check_period,
            config.leak_threshold,
            stop_rx,
        )
        .map_err(|e| {
            Error::new(ErrorKind::Config)
                .with_detail("cannot start the health monitor thread")
                .with_source(e)
        })?;
        *lock(&inner._monitor) = Some(monitor);
        #[cfg(feature = "prometheus")]
        if let Some(registry) = &config.prometheus {
            crate::metrics::ClusterCollector::register(registry, Arc::downgrade(&inner))?;
        }
        if let Some(jobs) = plan_jobs {
            let worker = plans::spawn(Arc::downgrade(&inner), jobs).map_err(|e| {
                Error::new(ErrorKind::Config)
                    .with_detail("cannot start the plan capture thread")
                    .with_source(e)
            })?;
            *lock(&inner._plan_worker) = Some(worker);
        }
        Ok(Cluster { inner })
    }

    fn primary(&self) -> &Node {
        &self.inner.primary
    }

    /// Whether a replica may take reads now: up, breaker allowing a call,
    /// lag within the limits.
    fn eligible(&self, node: &Node) -> bool {
        if !node.is_up() || !node.breaker_allows() {
            return false;
        }
        let (bytes, time) = node.lag();
        let over = |value: Option<u64>, limit: Option<u64>| matches!((value, limit), (Some(v), Some(l)) if v > l);
        !over(bytes, self.inner.max_replica_lag_bytes)
            && !over(
                time.map(|t| t.as_micros() as u64),
                self.inner.max_replica_lag.map(|t| t.as_micros() as u64),
            )
    }

    /// The node for the next read: the next eligible replica other than
    /// `not`, else the fallback (the primary, or an error).
    fn reader(&self, not: Option<&Node>) -> Result<&Node> {
        let replicas = &self.inner.replicas;
        if replicas.is_empty() {
            return Ok(&self.inner.primary);
        }
        let pick = self.inner.balancer.pick(replicas.len(), |i| {
            !not.is_some_and(|n| std::ptr::eq(n, &replicas[i])) && self.eligible(&replicas[i])
        });
        match (pick, self.inner.read_fallback) {
            (Some(i), _) => Ok(&replicas[i]),
            (None, ReadFallback::Primary) => Ok(&self.inner.primary),
            (None, ReadFallback::Error) => Err(Error::new(ErrorKind::NoEligibleReplica)
                .with_detail(format!(
                    "none of {} replicas is up, allowed by its breaker and within the lag limit",
                    replicas.len()
                ))),
        }
    }

    /// Runs a read on the next eligible node; if that fails at the
    /// connection level (the whole result is lost, no row was returned), runs
    /// it once more on another eligible node.
    fn read<T>(
        &self,
        kind: OperationKind,
        sql: &str,
        params: Params<'_>,
        rows: impl Fn(&T) -> Option<u64>,
        op: impl Fn(&Node) -> Result<T>,
    ) -> Result<T> {
        let first = self.reader(None)?;
        match self.hooked(kind, first, sql, params, &rows, &op) {
            Err(e) if e.is_connection_error() => {
                let second = match self.reader(Some(first)) {
                    Ok(n) if !std::ptr::eq(n, first) => n,
                    _ => return Err(e),
                };
                log::warn!("read failed on {}, trying {}: {e}", first.info, second.info);
                self.hooked(kind, second, sql, params, &rows, &op)
            }
            other => other,
        }
    }

    /// Runs `op` on `node` between the operation hooks. With none
    /// registered it is a plain call: no clock read, no event built.
    fn hooked<T>(
        &self,
        kind: OperationKind,
        node: &Node,
        sql: &str,
        params: Params<'_>,
        rows: impl Fn(&T) -> Option<u64>,
        op: impl FnOnce(&Node) -> Result<T>,
    ) -> Result<T> {
        let hooks = &*self.inner.hooks;
        if !hooks.wraps_operations() {
            return op(node);
        }
        let before = BeforeOperation {
            kind,
            sql,
            node: &node.info,
            params: ParamView::new(params, hooks.log_parameters),
        };
        hooks::run(&hooks.before_operation, "before_operation", |hook| {
            hook(&before)
        })
        .map_err(|e| e.with_node(&node.info))?;
        let started = Instant::now();
        let result = op(node);
        if hooks.after_operation.is_empty() {
            return result;
        }
        let after = AfterOperation {
            before,
            duration: started.elapsed(),
            rows: result.as_ref().ok().and_then(&rows),
            error: result.as_ref().err(),
        };
        let verdict = hooks::run(&hooks.after_operation, "after_operation", |hook| {
            hook(&after)
        });
        match verdict {
            Err(e) if result.is_ok() => Err(e.with_node(&node.info)),
            Err(e) => {
                log::warn!("{e} (after a failed operation, whose error is returned)");
                result
            }
            Ok(()) => result,
        }
    }

    /// Runs a parameterised statement on `node`, prepared first (the same
    /// round trips as `Client::query(&str)`, which prepares one itself), so
    /// that a slow one can have its plan captured with its parameters.
    fn statement<T>(
        &self,
        kind: OperationKind,
        node: &Node,
        sql: &str,
        params: Params<'_>,
        run: impl FnOnce(&mut postgres::Client, &Statement) -> std::result::Result<T, postgres::Error>,
    ) -> Result<T> {
        node.run(|client| {
            let statement = client.prepare(sql)?;
            let Some(capture) = self.inner.plans() else {
                return run(client, &statement);
            };
            let started = Instant::now();
            let result = run(client, &statement);
            let took = started.elapsed();
            if result.is_ok() && took > capture.threshold {
                capture.offer(&node.info, kind, &statement, sql, params, took);
            }
            result
        })
    }

    /// Runs a statement on the primary and returns the number of rows it
    /// affected. Parameters are bound as in `postgres` (`$1`, `$2`, ...).
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let n = cluster.execute("UPDATE users SET active = $1 WHERE id = $2", &[&true, &42i64])?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn execute(&self, sql: &str, params: Params<'_>) -> Result<u64> {
        self.hooked(
            OperationKind::Execute,
            self.primary(),
            sql,
            params,
            |n| Some(*n),
            |node| {
                self.statement(OperationKind::Execute, node, sql, params, |c, s| {
                    c.execute(s, params)
                })
            },
        )
    }

    /// Runs a query on the primary and returns all rows.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// for row in cluster.query("SELECT id, name FROM users WHERE id > $1", &[&10i64])? {
    ///     let (id, name): (i64, String) = (row.get(0), row.get(1));
    /// }
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn query(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>> {
        self.hooked(
            OperationKind::Query,
            self.primary(),
            sql,
            params,
            row_count,
            |node| {
                self.statement(OperationKind::Query, node, sql, params, |c, s| {
                    c.query(s, params)
                })
            },
        )
    }

    /// Runs a query on the primary that must return exactly one row:
    /// [`ErrorKind::NotFound`] for none, [`ErrorKind::TooManyRows`] for more.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let id: i64 = cluster.query_one("INSERT INTO users (name) VALUES ($1) RETURNING id", &[&"ada"])?.get(0);
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn query_one(&self, sql: &str, params: Params<'_>) -> Result<Row> {
        self.hooked(
            OperationKind::QueryOne,
            self.primary(),
            sql,
            params,
            |_| Some(1),
            |node| {
                self.statement(OperationKind::QueryOne, node, sql, params, |c, s| {
                    c.query(s, params)
                })
                .and_then(|rows| exactly_one(rows, node))
            },
        )
    }

    /// Runs a query on the primary that returns at most one row.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let name: Option<String> = cluster
    ///     .query_opt("SELECT name FROM users WHERE id = $1", &[&42i64])?
    ///     .map(|row| row.get(0));
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn query_opt(&self, sql: &str, params: Params<'_>) -> Result<Option<Row>> {
        self.hooked(
            OperationKind::QueryOpt,
            self.primary(),
            sql,
            params,
            opt_count,
            |node| {
                self.statement(OperationKind::QueryOpt, node, sql, params, |c, s| {
                    c.query(s, params)
                })
                .and_then(|rows| at_most_one(rows, node))
            },
        )
    }

    /// Runs one or more statements separated by semicolons on the primary,
    /// with the simple protocol (no parameters).
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// cluster.batch_execute("CREATE TABLE IF NOT EXISTS users (id bigserial PRIMARY KEY, name text)")?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn batch_execute(&self, sql: &str) -> Result<()> {
        self.hooked(
            OperationKind::BatchExecute,
            self.primary(),
            sql,
            &[],
            |_| None,
            |node| node.run(|c| c.batch_execute(sql)),
        )
    }

    /// Runs a query on the next replica (round-robin) and returns all rows.
    /// With no replica up, it runs on the primary.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let rows = cluster.read_query("SELECT id, name FROM users", &[])?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn read_query(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>> {
        let kind = OperationKind::ReadQuery;
        self.read(kind, sql, params, row_count, |node| {
            self.statement(kind, node, sql, params, |c, s| c.query(s, params))
        })
    }

    /// [`read_query`](Self::read_query) that must return exactly one row.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let n: i64 = cluster.read_query_one("SELECT count(*) FROM users", &[])?.get(0);
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn read_query_one(&self, sql: &str, params: Params<'_>) -> Result<Row> {
        let kind = OperationKind::ReadQueryOne;
        self.read(
            kind,
            sql,
            params,
            |_| Some(1),
            |node| {
                self.statement(kind, node, sql, params, |c, s| c.query(s, params))
                    .and_then(|rows| exactly_one(rows, node))
            },
        )
    }

    /// [`read_query`](Self::read_query) that returns at most one row.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let row = cluster.read_query_opt("SELECT name FROM users WHERE id = $1", &[&7i64])?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn read_query_opt(&self, sql: &str, params: Params<'_>) -> Result<Option<Row>> {
        let kind = OperationKind::ReadQueryOpt;
        self.read(kind, sql, params, opt_count, |node| {
            self.statement(kind, node, sql, params, |c, s| c.query(s, params))
                .and_then(|rows| at_most_one(rows, node))
        })
    }

    /// Lends a pooled primary connection for anything the methods above do
    /// not cover: COPY, streaming with `query_raw`, `Client::transaction()`.
    /// Leave the connection as you found it: a transaction left open, or a
    /// `SET` without `RESET`, stays on it for the next user.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// use std::io::Write;
    /// cluster.with_primary(|client| {
    ///     let mut copy = client.copy_in("COPY users (name) FROM STDIN")?;
    ///     copy.write_all(b"ada\ngrace\n").expect("in-memory write");
    ///     copy.finish()
    /// })?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn with_primary<T>(
        &self,
        f: impl FnOnce(&mut postgres::Client) -> std::result::Result<T, postgres::Error>,
    ) -> Result<T> {
        self.hooked(
            OperationKind::WithPrimary,
            self.primary(),
            "",
            &[],
            |_| None,
            |node| node.run(f),
        )
    }

    /// Like [`with_primary`](Self::with_primary), on the replica the next
    /// read would use (not retried elsewhere: the closure may not be
    /// safe to run twice).
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let port: i32 = cluster.with_replica(|c| c.query_one("SELECT inet_server_port()", &[]))?.get(0);
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn with_replica<T>(
        &self,
        f: impl FnOnce(&mut postgres::Client) -> std::result::Result<T, postgres::Error>,
    ) -> Result<T> {
        let node = self.reader(None)?;
        self.hooked(
            OperationKind::WithReplica,
            node,
            "",
            &[],
            |_| None,
            |node| node.run(f),
        )
    }

    /// A snapshot of every node's pool. Takes each pool's lock briefly; the
    /// counters are read without locks.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// for node in cluster.stats().nodes {
    ///     println!("{}: {} in use, {} acquires", node.node, node.pool.in_use_conns, node.pool.acquire_count);
    /// }
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn stats(&self) -> ClusterStats {
        ClusterStats {
            nodes: self.inner.nodes().map(Node::stats).collect(),
        }
    }

    /// A cheap liveness check of the primary, like the Go library's
    /// `HealthCheck`: a checkout and one round trip, together bounded by
    /// 5 seconds. Fails fast with `CircuitOpen` when the primary's breaker is open.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// if let Err(e) = cluster.health_check() {
    ///     eprintln!("database unavailable: {e}");
    /// }
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn health_check(&self) -> Result<()> {
        self.ping_primary(HEALTH_CHECK_TIMEOUT)
    }

    /// Whether the primary answers within 2 seconds (checkout plus a round
    /// trip): the readiness probe.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let status = if cluster.is_ready() { 200 } else { 503 };
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn is_ready(&self) -> bool {
        self.ping_primary(READY_TIMEOUT).is_ok()
    }

    fn ping_primary(&self, timeout: Duration) -> Result<()> {
        let node = self.primary();
        let started = Instant::now();
        let permit = node.admit()?;
        let result = node.checkout_within(timeout).and_then(|mut conn| {
            let left = timeout
                .saturating_sub(started.elapsed())
                .max(Duration::from_millis(1));
            let result = conn.client.is_valid(left);
            result.map_err(|e| node.failed(&mut conn, e))
        });
        permit.finish(&result);
        result
    }

    /// The cluster's health as the monitor last saw it, with live pool
    /// numbers; no I/O. See [`HealthReport`].
    pub fn health(&self) -> HealthReport {
        let nodes = self
            .inner
            .nodes()
            .map(|node| {
                let stats = node.stats();
                let probe = node.probe_record();
                let mut h = NodeHealth {
                    eligible_for_reads: node.info.role() == Role::Replica && self.eligible(node),
                    node: stats.node,
                    up: stats.up,
                    in_recovery: probe.in_recovery,
                    breaker: stats.breaker,
                    breaker_retry_in: (stats.breaker == crate::BreakerState::Open)
                        .then(|| node.breaker_retry_after()),
                    lag_bytes: stats.lag_bytes,
                    lag: stats.lag,
                    in_use_conns: stats.pool.in_use_conns,
                    max_conns: stats.pool.max_conns,
                    pool_utilization: stats.pool.utilization(),
                    last_check: probe.checked_at,
                    last_error: probe.error,
                    warnings: Vec::new(),
                };
                h.warnings = health::warnings(
                    &h,
                    self.inner.max_replica_lag,
                    self.inner.max_replica_lag_bytes,
                );
                h
            })
            .collect();
        HealthReport::new(nodes)
    }
}

// `&Vec` because `hooked` hands the operation's own result type by reference.
#[allow(clippy::ptr_arg)]
fn row_count(rows: &Vec<Row>) -> Option<u64> {
    Some(rows.len() as u64)
}

fn opt_count(row: &Option<Row>) -> Option<u64> {
    Some(u64::from(row.is_some()))
}

fn exactly_one(rows: Vec<Row>, node: &Node) -> Result<Row> {
    at_most_one(rows, node)?.ok_or_else(|| Error::new(ErrorKind::NotFound).with_node(&node.info))
}

fn at_most_one(mut rows: Vec<Row>, node: &Node) -> Result<Option<Row>> {
    if rows.len() > 1 {
        return Err(Error::new(ErrorKind::TooManyRows)
            .with_node(&node.info)
            .with_detail(format!("{} rows", rows.len())));
    }
    Ok(rows.pop())
}
