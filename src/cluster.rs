//! `Cluster`: the public operations, routing writes to the primary and reads
//! round-robin over the replicas that are up.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::Sender;
use postgres::Row;
use postgres::types::ToSql;
use scheduled_thread_pool::{OnPoolDropBehavior, ScheduledThreadPool};

use crate::balancer::RoundRobin;
use crate::config::{ClusterBuilder, ClusterConfig};
use crate::error::{Error, ErrorKind, Result};
use crate::health;
use crate::node::{Node, Timings};
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

pub(crate) struct Inner {
    primary: Node,
    replicas: Vec<Node>,
    balancer: RoundRobin,
    // Dropping the sender stops the health monitor.
    _stop_monitor: Sender<()>,
    _monitor: Mutex<Option<JoinHandle<()>>>,
    _threads: Arc<ScheduledThreadPool>,
}

impl Inner {
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
        let timings = Timings {
            checkout_timeout: config.checkout_timeout,
            validate_after_idle: config.validate_after_idle,
        };
        let primary = Node::open(config.primary, timings, &threads);
        let replicas: Vec<Node> = config
            .replicas
            .into_iter()
            .map(|r| Node::open(r, timings, &threads))
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

        let (stop_tx, stop_rx) = crossbeam_channel::bounded(0);
        let inner = Arc::new(Inner {
            primary,
            replicas,
            balancer: RoundRobin::default(),
            _stop_monitor: stop_tx,
            _monitor: Mutex::new(None),
            _threads: threads,
        });
        let monitor = health::spawn(Arc::downgrade(&inner), config.health_check_period, stop_rx)
            .map_err(|e| {
                Error::new(ErrorKind::Config)
                    .with_detail("cannot start the health monitor thread")
                    .with_source(e)
            })?;
        *lock(&inner._monitor) = Some(monitor);
        Ok(Cluster { inner })
    }

    fn primary(&self) -> &Node {
        &self.inner.primary
    }

    /// The node for the next read: the next replica that is up, else the primary.
    fn reader(&self) -> &Node {
        let replicas = &self.inner.replicas;
        match self
            .inner
            .balancer
            .pick(replicas.len(), |i| replicas[i].is_up())
        {
            Some(i) => &replicas[i],
            None => &self.inner.primary,
        }
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
        self.primary().run(|c| c.execute(sql, params))
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
        self.primary().run(|c| c.query(sql, params))
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
        let node = self.primary();
        exactly_one(node.run(|c| c.query(sql, params))?, node)
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
        let node = self.primary();
        at_most_one(node.run(|c| c.query(sql, params))?, node)
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
        self.primary().run(|c| c.batch_execute(sql))
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
        self.reader().run(|c| c.query(sql, params))
    }

    /// [`read_query`](Self::read_query) that must return exactly one row.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let n: i64 = cluster.read_query_one("SELECT count(*) FROM users", &[])?.get(0);
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn read_query_one(&self, sql: &str, params: Params<'_>) -> Result<Row> {
        let node = self.reader();
        exactly_one(node.run(|c| c.query(sql, params))?, node)
    }

    /// [`read_query`](Self::read_query) that returns at most one row.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let row = cluster.read_query_opt("SELECT name FROM users WHERE id = $1", &[&7i64])?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn read_query_opt(&self, sql: &str, params: Params<'_>) -> Result<Option<Row>> {
        let node = self.reader();
        at_most_one(node.run(|c| c.query(sql, params))?, node)
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
        self.primary().run(f)
    }

    /// Like [`with_primary`](Self::with_primary), on the replica the next
    /// read would use.
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
        self.reader().run(f)
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
}

fn exactly_one(rows: Vec<Row>, node: &Node) -> Result<Row> {
    match at_most_one(rows, node)? {
        Some(row) => Ok(row),
        None => Err(Error::new(ErrorKind::NotFound).with_node(&node.info)),
    }
}

fn at_most_one(mut rows: Vec<Row>, node: &Node) -> Result<Option<Row>> {
    if rows.len() > 1 {
        return Err(Error::new(ErrorKind::TooManyRows)
            .with_node(&node.info)
            .with_detail(format!("{} rows", rows.len())));
    }
    Ok(rows.pop())
}
