//! `ClusterBuilder`: every option, with its default; validation in `build()`.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::balancer::ReadBalance;
use crate::cluster::Cluster;
use crate::dsn::{Dsn, PoolOverrides, SslMode, redact_dsn};
use crate::error::{Error, Result};
use crate::hooks::{
    AfterOperation, BeforeOperation, ConnectionEvent, HookResult, Hooks, NodeEvent, ShutdownEvent,
    TransactionEvent,
};
use crate::info::{NodeInfo, Role};
use crate::limits;
use crate::pgpass;
use crate::plans::PlanCapture;
use crate::settings::{ClusterConfig, NodeConfig, PoolConfig, ReadFallback, Settings, defaults};
use crate::statements::StatementMode;
use crate::tls;

/// Configures and builds a [`Cluster`]. Setters never fail; `build()`
/// validates everything and returns an [`ErrorKind::Config`](crate::ErrorKind::Config)
/// error naming the offending key.
///
/// Pool options set here apply to every node and win over the same setting
/// in a DSN (`pool_max_conns=...`); a DSN's setting wins over the default.
///
/// ```no_run
/// use std::time::Duration;
/// use pgxkit::Cluster;
///
/// # fn main() -> Result<(), pgxkit::Error> {
/// let cluster = Cluster::builder()
///     .primary("postgres://app@db-primary/app")
///     .replica("postgres://app@db-replica-1/app")
///     .replica("postgres://app@db-replica-2/app")
///     .max_conns(30)
///     .min_conns(5)
///     .max_conn_lifetime(Duration::from_secs(3600))
///     .max_conn_lifetime_jitter(Duration::from_secs(600))
///     .max_conn_idle_time(Duration::from_secs(1800))
///     .application_name("billing")
///     .build()?;
/// # Ok(()) }
/// ```
#[derive(Clone, Default)]
#[must_use]
pub struct ClusterBuilder {
    pub(crate) primary: Option<String>,
    pub(crate) replicas: Vec<String>,
    /// Nodes given without a role (`node`, `nodes`).
    pub(crate) nodes: Vec<String>,
    pub(crate) pool: PoolOverrides,
    /// Every other option, as the cluster will use it.
    settings: Settings,
    hooks: Hooks,
    #[cfg(feature = "prometheus")]
    prometheus: Option<prometheus::Registry>,
}

impl fmt::Debug for ClusterBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterBuilder")
            .field("primary", &self.primary.as_deref().map(redact_dsn))
            .field(
                "replicas",
                &self
                    .replicas
                    .iter()
                    .map(|d| redact_dsn(d))
                    .collect::<Vec<_>>(),
            )
            .field(
                "nodes",
                &self.nodes.iter().map(|d| redact_dsn(d)).collect::<Vec<_>>(),
            )
            .field("pool", &self.pool)
            .field("settings", &self.settings)
            .field("hooks", &self.hooks)
            .finish()
    }
}

impl Cluster {
    /// A builder for a cluster with a primary and any number of replicas.
    ///
    /// ```no_run
    /// let cluster = pgxkit::Cluster::builder()
    ///     .primary("postgres://app@db-primary/app")
    ///     .replica("postgres://app@db-replica/app")
    ///     .build()?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
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
}

impl ClusterBuilder {
    /// The primary's DSN (URL or key=value). Required, unless the nodes are
    /// given with [`nodes`](Self::nodes).
    ///
    /// It is the primary the cluster starts with: the health probes then
    /// follow the servers' own roles (a replica promoted takes the writes,
    /// see [`nodes`](Self::nodes)). A DSN that lists several hosts
    /// (`postgres://db1,db2,db3/app`, `host=db1,db2`) gives one node per
    /// host, named `primary-1`, `primary-2`, ..., whose roles are learnt
    /// at `build()`.
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder()
    ///     .primary("postgres://app@db/app")
    ///     .replica("postgres://app@db-replica/app");
    /// ```
    pub fn primary(mut self, dsn: impl Into<String>) -> Self {
        self.primary = Some(dsn.into());
        self
    }

    /// Adds a read replica's DSN; call once per replica. Defaults to none:
    /// reads then go to the primary.
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder()
    ///     .primary("postgres://app@db/app")
    ///     .replica("postgres://app@db-replica-1/app")
    ///     .replica("postgres://app@db-replica-2/app");
    /// ```
    pub fn replica(mut self, dsn: impl Into<String>) -> Self {
        self.replicas.push(dsn.into());
        self
    }

    /// Adds a node without saying which role it has: the cluster learns
    /// each node's role from the server (`pg_is_in_recovery()`), at
    /// `build()` and at every health probe. Nodes are named `node1`,
    /// `node2`, ... in the order given (`node1-1`, `node1-2`, ... for the
    /// hosts of a multi-host DSN). Mixes with [`primary`](Self::primary)
    /// and [`replica`](Self::replica): roles are learnt the same way for all.
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder()
    ///     .node("postgres://app@db1/app")
    ///     .node("postgres://app@db2/app");
    /// ```
    pub fn node(mut self, dsn: impl Into<String>) -> Self {
        self.nodes.push(dsn.into());
        self
    }

    /// Adds every DSN of `dsns` as a [`node`](Self::node): the way to
    /// configure a cluster run by an HA manager such as Patroni, where
    /// any node may be the primary. The node not in recovery takes the
    /// writes (on the newest timeline, should two claim it); the others
    /// serve reads. `build()` needs one of them to answer (unless
    /// [`lazy_connect`](Self::lazy_connect)).
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder()
    ///     .nodes(["postgres://app@db1/app", "postgres://app@db2/app", "postgres://app@db3/app"]);
    /// ```
    pub fn nodes<I>(mut self, dsns: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        self.nodes.extend(dsns.into_iter().map(Into::into));
        self
    }

    /// Maximum connections per node. Defaults to the DSN's `pool_max_conns`,
    /// else the number of CPUs, at least 4.
    ///
    /// Below this many, a checkout that finds no free connection waits for
    /// the one it makes the pool open (as Go's pgxpool does), so threads do
    /// not trade connections while the pool fills; at this many, or while
    /// opening connections fails, it waits for one to be released. Either
    /// wait is bounded by [`checkout_timeout`](Self::checkout_timeout).
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder()
    ///     .primary("postgres://app@db/app")
    ///     .max_conns(20);
    /// ```
    pub fn max_conns(mut self, n: u32) -> Self {
        self.pool.max_conns = Some(n);
        self
    }

    /// Connections per node kept open even when idle. Defaults to the DSN's
    /// `pool_min_conns`, else 0.
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder()
    ///     .primary("postgres://app@db/app")
    ///     .min_conns(2);
    /// ```
    pub fn min_conns(mut self, n: u32) -> Self {
        self.pool.min_conns = Some(n);
        self
    }

    /// How long a connection may live before it is closed (when next
    /// returned or checked out; idle ones within a second, or within 30 s
    /// with [`min_conns`](Self::min_conns)). At most one year. Defaults to
    /// the DSN's `pool_max_conn_lifetime`, else 1 hour.
    ///
    /// ```
    /// use std::time::Duration;
    /// let builder = pgxkit::Cluster::builder()
    ///     .primary("postgres://app@db/app")
    ///     .max_conn_lifetime(Duration::from_secs(1800));
    /// ```
    pub fn max_conn_lifetime(mut self, d: Duration) -> Self {
        self.pool.max_conn_lifetime = Some(d);
        self
    }

    /// Each connection's lifetime is `max_conn_lifetime` plus a random part
    /// of this, so a pool never recycles all its connections at once.
    /// Defaults to the DSN's `pool_max_conn_lifetime_jitter`, else 0.
    ///
    /// ```
    /// use std::time::Duration;
    /// let builder = pgxkit::Cluster::builder()
    ///     .primary("postgres://app@db/app")
    ///     .max_conn_lifetime(Duration::from_secs(3600))
    ///     .max_conn_lifetime_jitter(Duration::from_secs(600));
    /// ```
    pub fn max_conn_lifetime_jitter(mut self, d: Duration) -> Self {
        self.pool.max_conn_lifetime_jitter = Some(d);
        self
    }

    /// How long a connection may sit idle before it is closed: within this
    /// plus at most one second (the health monitor looks every half of it,
    /// 100 ms to 1 s); with [`min_conns`](Self::min_conns) set, r2d2's own
    /// reaper closes them, which looks every 30 s. At most one year.
    /// Defaults to the DSN's `pool_max_conn_idle_time`, else 30 minutes.
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// let cluster = pgxkit::Cluster::builder()
    ///     .primary("postgres://app@db/app")
    ///     .max_conn_idle_time(Duration::from_secs(60))
    ///     .build()?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn max_conn_idle_time(mut self, d: Duration) -> Self {
        self.pool.max_conn_idle_time = Some(d);
        self
    }

    /// How often the health monitor probes each node. A node whose probe
    /// has not answered within one period (at least 1 s, at most 5 s) is
    /// marked down and gets no reads until it answers; one that has not
    /// answered for twice that (10 s by default) has every connection to it
    /// shut down, so calls without a deadline waiting on it fail. At most
    /// one year. Defaults to the primary DSN's `pool_health_check_period`,
    /// else 10 seconds.
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// let cluster = pgxkit::Cluster::builder()
    ///     .primary("postgres://app@db-primary/app")
    ///     .replica("postgres://app@db-replica/app")
    ///     .health_check_period(Duration::from_secs(5))
    ///     .build()?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn health_check_period(mut self, d: Duration) -> Self {
        self.pool.health_check_period = Some(d);
        self
    }

    /// How long an operation waits for a pooled connection (including
    /// opening a new one) before failing with
    /// [`ErrorKind::PoolTimeout`](crate::ErrorKind::PoolTimeout) or
    /// [`ErrorKind::Connect`](crate::ErrorKind::Connect). Defaults to 10 seconds.
    ///
    /// ```
    /// use std::time::Duration;
    /// let builder = pgxkit::Cluster::builder()
    ///     .primary("postgres://app@db/app")
    ///     .checkout_timeout(Duration::from_secs(2));
    /// ```
    pub fn checkout_timeout(mut self, d: Duration) -> Self {
        self.settings.checkout_timeout = d;
        self
    }

    /// How long opening one connection may take. Defaults to the DSN's
    /// `connect_timeout`, else 10 seconds.
    ///
    /// ```
    /// use std::time::Duration;
    /// let builder = pgxkit::Cluster::builder()
    ///     .primary("postgres://app@db/app")
    ///     .connect_timeout(Duration::from_secs(3));
    /// ```
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.settings.connect_timeout = Some(d);
        self
    }

    /// A pooled connection idle for longer than this is checked with a
    /// round trip before it is handed out; fresher ones are not, so a busy
    /// pool pays no ping per checkout. Defaults to 1 second.
    ///
    /// ```
    /// use std::time::Duration;
    /// let builder = pgxkit::Cluster::builder()
    ///     .primary("postgres://app@db/app")
    ///     .validate_after_idle(Duration::from_secs(5));
    /// ```
    pub fn validate_after_idle(mut self, d: Duration) -> Self {
        self.settings.validate_after_idle = d;
        self
    }

    /// `application_name` of every connection (shown in `pg_stat_activity`).
    /// Defaults to the DSN's, else `pgxkit`.
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder()
    ///     .primary("postgres://app@db/app")
    ///     .application_name("billing-worker");
    /// ```
    pub fn application_name(mut self, name: impl Into<String>) -> Self {
        self.settings.application_name = Some(name.into());
        self
    }

    /// When `true`, `build()` does not connect to the primary first, so it
    /// succeeds while the primary is down (and, with a node list, while
    /// every node is). Defaults to `false`: an unreachable primary fails
    /// `build()` (with a node list: no node answering). Unreachable
    /// replicas never do. With a node list, writes fail with `NoPrimary`
    /// until a probe finds the primary (each such write asks for one).
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder()
    ///     .primary("postgres://app@db/app")
    ///     .lazy_connect(true); // build() succeeds while the primary is down
    /// ```
    pub fn lazy_connect(mut self, lazy: bool) -> Self {
        self.settings.lazy_connect = lazy;
        self
    }

    /// Consecutive connection-level failures that open a node's circuit
    /// breaker. Only failures of the node count (could not connect, connection
    /// lost, checkout timeout, SQLSTATE class 08 and 57P01-57P03); a unique
    /// violation or a syntax error never does. Defaults to 5.
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder()
    ///     .primary("postgres://app@db/app")
    ///     .failure_threshold(3);
    /// ```
    pub fn failure_threshold(mut self, n: u32) -> Self {
        self.settings.breaker.failure_threshold = n;
        self
    }

    /// How long an open breaker fails calls fast before letting a trial
    /// call through. A successful health probe closes it sooner. Defaults to 30 seconds.
    ///
    /// ```
    /// use std::time::Duration;
    /// let builder = pgxkit::Cluster::builder()
    ///     .primary("postgres://app@db/app")
    ///     .open_duration(Duration::from_secs(10));
    /// ```
    pub fn open_duration(mut self, d: Duration) -> Self {
        self.settings.breaker.open_duration = d;
        self
    }

    /// How many trial calls a half-open breaker lets through at once.
    /// Defaults to 1.
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder()
    ///     .primary("postgres://app@db/app")
    ///     .half_open_max_calls(2);
    /// ```
    pub fn half_open_max_calls(mut self, n: u32) -> Self {
        self.settings.breaker.half_open_max_calls = n;
        self
    }

    /// A replica whose replay lags the primary by more than this gets no
    /// reads until it catches up (measured each health period). Defaults to
    /// no limit.
    ///
    /// ```
    /// use std::time::Duration;
    /// let builder = pgxkit::Cluster::builder()
    ///     .primary("postgres://app@db/app")
    ///     .replica("postgres://app@db-replica/app")
    ///     .max_replica_lag(Duration::from_secs(5));
    /// ```
    pub fn max_replica_lag(mut self, d: Duration) -> Self {
        self.settings.max_replica_lag = Some(d);
        self
    }

    /// Like [`max_replica_lag`](Self::max_replica_lag), in bytes of WAL not
    /// yet replayed. Defaults to no limit.
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder()
    ///     .primary("postgres://app@db/app")
    ///     .replica("postgres://app@db-replica/app")
    ///     .max_replica_lag_bytes(16 * 1024 * 1024);
    /// ```
    pub fn max_replica_lag_bytes(mut self, bytes: u64) -> Self {
        self.settings.max_replica_lag_bytes = Some(bytes);
        self
    }

    /// What reads do when no replica is eligible. Defaults to
    /// [`ReadFallback::Primary`].
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder()
    ///     .primary("postgres://app@db/app")
    ///     .replica("postgres://app@db-replica/app")
    ///     .read_fallback(pgxkit::ReadFallback::Error);
    /// ```
    pub fn read_fallback(mut self, fallback: ReadFallback) -> Self {
        self.settings.read_fallback = fallback;
        self
    }

    /// How reads are spread over the eligible replicas. Defaults to
    /// [`ReadBalance::PerThread`]: each thread stays on one replica, threads
    /// are spread round-robin; [`ReadBalance::PerCall`] alternates every read.
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder()
    ///     .primary("postgres://app@db/app")
    ///     .replica("postgres://app@db-replica-1/app")
    ///     .replica("postgres://app@db-replica-2/app")
    ///     .read_balance(pgxkit::ReadBalance::PerCall);
    /// ```
    pub fn read_balance(mut self, balance: ReadBalance) -> Self {
        self.settings.read_balance = balance;
        self
    }

    /// Adds a hook run before every operation, after the node is chosen and
    /// before a connection is checked out. An `Err` (or a panic) vetoes the
    /// operation: it never reaches the server, and the caller gets
    /// [`ErrorKind::Hook`](crate::ErrorKind::Hook). Hooks run in the order added.
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder()
    ///     .primary("postgres://app@db/app")
    ///     .before_operation(|op| {
    ///         if op.sql().contains("DROP TABLE") {
    ///             return Err("no DROP TABLE from the application".into());
    ///         }
    ///         Ok(())
    ///     });
    /// ```
    pub fn before_operation(
        mut self,
        hook: impl Fn(&BeforeOperation<'_>) -> HookResult + Send + Sync + 'static,
    ) -> Self {
        self.hooks.before_operation.push(Arc::new(hook));
        self
    }

    /// Adds a hook run after every operation with its duration, rows and
    /// error. An `Err` from it is logged, and returned as
    /// [`ErrorKind::Hook`](crate::ErrorKind::Hook) only if the operation
    /// itself succeeded (the operation's own error wins).
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder()
    ///     .primary("postgres://app@db/app")
    ///     .after_operation(|op| {
    ///         if !op.is_ok() {
    ///             log::warn!("{} on {} failed after {:?}", op.kind(), op.node(), op.duration());
    ///         }
    ///         Ok(())
    ///     });
    /// ```
    pub fn after_operation(
        mut self,
        hook: impl Fn(&AfterOperation<'_>) -> HookResult + Send + Sync + 'static,
    ) -> Self {
        self.hooks.after_operation.push(Arc::new(hook));
        self
    }

    /// Adds a hook run before a transaction begins; an `Err` vetoes it.
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder()
    ///     .primary("postgres://app@db/app")
    ///     .before_transaction(|tx| {
    ///         log::debug!("transaction on {} (read-only: {})", tx.node(), tx.read_only());
    ///         Ok(())
    ///     });
    /// ```
    pub fn before_transaction(
        mut self,
        hook: impl Fn(&TransactionEvent<'_>) -> HookResult + Send + Sync + 'static,
    ) -> Self {
        self.hooks.before_transaction.push(Arc::new(hook));
        self
    }

    /// Adds a hook run after a transaction commits or rolls back.
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder()
    ///     .primary("postgres://app@db/app")
    ///     .after_transaction(|tx| {
    ///         log::info!("{:?} after {:?}", tx.outcome(), tx.duration());
    ///         Ok(())
    ///     });
    /// ```
    pub fn after_transaction(
        mut self,
        hook: impl Fn(&TransactionEvent<'_>) -> HookResult + Send + Sync + 'static,
    ) -> Self {
        self.hooks.after_transaction.push(Arc::new(hook));
        self
    }

    /// Adds a hook run on every new connection before it joins the pool,
    /// e.g. to `SET` session settings. An `Err` rejects the connection.
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder().on_connect(|client, _node| {
    ///     client.batch_execute("SET statement_timeout = '30s'")?;
    ///     Ok(())
    /// });
    /// ```
    pub fn on_connect(
        mut self,
        hook: impl Fn(&mut postgres::Client, &NodeInfo) -> HookResult + Send + Sync + 'static,
    ) -> Self {
        self.hooks.on_connect.push(Arc::new(hook));
        self
    }

    /// Adds a hook run when a connection leaves its pool (with its age and the reason).
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder()
    ///     .primary("postgres://app@db/app")
    ///     .on_disconnect(|ev| log::info!("{} closed a connection: {:?}", ev.node(), ev.reason()));
    /// ```
    pub fn on_disconnect(
        mut self,
        hook: impl Fn(&ConnectionEvent<'_>) + Send + Sync + 'static,
    ) -> Self {
        self.hooks.on_disconnect.push(Arc::new(hook));
        self
    }

    /// Adds a hook run on every checkout (with the wait).
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder()
    ///     .primary("postgres://app@db/app")
    ///     .on_acquire(|ev| log::trace!("waited {:?} for a connection to {}", ev.duration(), ev.node()));
    /// ```
    pub fn on_acquire(
        mut self,
        hook: impl Fn(&ConnectionEvent<'_>) + Send + Sync + 'static,
    ) -> Self {
        self.hooks.on_acquire.push(Arc::new(hook));
        self
    }

    /// Adds a hook run when a checked-out connection is given back (with how long it was held).
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder()
    ///     .primary("postgres://app@db/app")
    ///     .on_release(|ev| log::trace!("held a connection to {} for {:?}", ev.node(), ev.duration()));
    /// ```
    pub fn on_release(
        mut self,
        hook: impl Fn(&ConnectionEvent<'_>) + Send + Sync + 'static,
    ) -> Self {
        self.hooks.on_release.push(Arc::new(hook));
        self
    }

    /// Adds a hook run when `shutdown` begins.
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder()
    ///     .primary("postgres://app@db/app")
    ///     .on_shutdown(|ev| log::info!("draining {} operations within {:?}", ev.in_flight(), ev.deadline()));
    /// ```
    pub fn on_shutdown(mut self, hook: impl Fn(&ShutdownEvent) + Send + Sync + 'static) -> Self {
        self.hooks.on_shutdown.push(Arc::new(hook));
        self
    }

    /// Adds a hook run when a node's circuit breaker changes state.
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder()
    ///     .primary("postgres://app@db/app")
    ///     .on_breaker_state_change(|ev| log::warn!("breaker of {}: {:?}", ev.node(), ev.breaker_change()));
    /// ```
    pub fn on_breaker_state_change(
        mut self,
        hook: impl Fn(&NodeEvent<'_>) + Send + Sync + 'static,
    ) -> Self {
        self.hooks.on_breaker_state_change.push(Arc::new(hook));
        self
    }

    /// Adds a hook run when the health monitor finds a node gone down or back up.
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder()
    ///     .primary("postgres://app@db/app")
    ///     .on_node_health_change(|ev| log::warn!("{} is {}", ev.node(), if ev.up() == Some(true) { "up" } else { "down" }));
    /// ```
    pub fn on_node_health_change(
        mut self,
        hook: impl Fn(&NodeEvent<'_>) + Send + Sync + 'static,
    ) -> Self {
        self.hooks.on_node_health_change.push(Arc::new(hook));
        self
    }

    /// Runs `hook` when a node's role changes: a replica promoted (by an
    /// HA manager, or by hand), a primary that stopped answering and came
    /// back in recovery, a primary displaced by one on a newer timeline.
    /// The change is also logged at `warn`. See the README's "Failover".
    ///
    /// ```
    /// use pgxkit::Role;
    /// let builder = pgxkit::Cluster::builder()
    ///     .nodes(["postgres://app@db1/app", "postgres://app@db2/app"])
    ///     .on_role_change(|ev| {
    ///         if let Some((_, Role::Primary)) = ev.role_change() {
    ///             log::warn!("{} is the primary now", ev.node());
    ///         }
    ///     });
    /// ```
    pub fn on_role_change(mut self, hook: impl Fn(&NodeEvent<'_>) + Send + Sync + 'static) -> Self {
        self.hooks.on_role_change.push(Arc::new(hook));
        self
    }

    /// Whether hooks (and the ready-made slow-query log) may see statement
    /// parameters as text. They may hold personal data. Defaults to `false`:
    /// hooks see only the count.
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder()
    ///     .primary("postgres://app@db/app")
    ///     .log_parameters(true); // hooks may now see parameter values
    /// ```
    pub fn log_parameters(mut self, yes: bool) -> Self {
        self.hooks.log_parameters = yes;
        self
    }

    /// Logs (once, at `warn`) any connection checked out for longer than
    /// this: a leak, or a transaction left open. Defaults to off.
    ///
    /// ```
    /// use std::time::Duration;
    /// let builder = pgxkit::Cluster::builder()
    ///     .primary("postgres://app@db/app")
    ///     .leak_detection_threshold(Duration::from_secs(30));
    /// ```
    pub fn leak_detection_threshold(mut self, d: Duration) -> Self {
        self.settings.leak_threshold = Some(d);
        self
    }

    /// With leak detection on, capture a backtrace at each checkout and log
    /// it with the leak. Costly; defaults to `false`.
    ///
    /// ```
    /// use std::time::Duration;
    /// let builder = pgxkit::Cluster::builder()
    ///     .primary("postgres://app@db/app")
    ///     .leak_detection_threshold(Duration::from_secs(30))
    ///     .leak_detection_backtrace(true);
    /// ```
    pub fn leak_detection_backtrace(mut self, yes: bool) -> Self {
        self.settings.leak_backtrace = yes;
        self
    }

    /// A default bound on every statement, enforced by the server
    /// (`SET statement_timeout` on each new connection): a statement running
    /// longer is cancelled and fails with
    /// [`ErrorKind::Timeout`](crate::ErrorKind::Timeout). A per-call deadline
    /// ([`Cluster::with_timeout`](crate::Cluster::with_timeout)) can be shorter. Defaults to none.
    ///
    /// ```
    /// use std::time::Duration;
    /// let builder = pgxkit::Cluster::builder()
    ///     .primary("postgres://app@db/app")
    ///     .statement_timeout(Duration::from_secs(30));
    /// ```
    pub fn statement_timeout(mut self, d: Duration) -> Self {
        self.settings.statement_timeout = Some(d);
        self
    }

    /// Linux `TCP_USER_TIMEOUT` for every connection: how long sent data may
    /// stay unacknowledged before the connection is dropped, so a dead peer
    /// or a black-holed network is noticed. Defaults to the DSN's
    /// `tcp_user_timeout`, else the OS default.
    ///
    /// ```
    /// use std::time::Duration;
    /// let builder = pgxkit::Cluster::builder()
    ///     .primary("postgres://app@db/app")
    ///     .tcp_user_timeout(Duration::from_secs(10));
    /// ```
    pub fn tcp_user_timeout(mut self, d: Duration) -> Self {
        self.settings.tcp_user_timeout = Some(d);
        self
    }

    /// TCP keepalives on every connection, first probe after `idle`, so an
    /// idle connection to a dead peer is noticed. Defaults to the DSN's
    /// `keepalives_idle`, else the driver's default (keepalives on, 2 hours).
    ///
    /// ```
    /// use std::time::Duration;
    /// let builder = pgxkit::Cluster::builder()
    ///     .primary("postgres://app@db/app")
    ///     .keepalives_idle(Duration::from_secs(30));
    /// ```
    pub fn keepalives_idle(mut self, idle: Duration) -> Self {
        self.settings.keepalives_idle = Some(idle);
        self
    }

    /// Refuse to start unless every node's connections are encrypted: each
    /// node's `sslmode` must be `require`, `verify-ca` or `verify-full`
    /// (`prefer` may fall back to plaintext), and every connection `build()`
    /// makes is checked in `pg_stat_ssl`. Defaults to `false`.
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder()
    ///     .primary("postgres://app@db/app")
    ///     .require_tls(true); // build() fails unless every node's sslmode is require or stricter
    /// ```
    pub fn require_tls(mut self, yes: bool) -> Self {
        self.settings.require_tls = yes;
        self
    }

    /// How parameterised operations reach the server; see [`StatementMode`].
    /// A handle can differ per call ([`Cluster::with_statement_mode`](crate::Cluster::with_statement_mode)).
    /// Defaults to [`StatementMode::Cached`].
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder()
    ///     .primary("postgres://app@db/app")
    ///     .statement_mode(pgxkit::StatementMode::Unnamed); // behind PgBouncer in transaction mode
    /// ```
    pub fn statement_mode(mut self, mode: StatementMode) -> Self {
        self.settings.statement_mode = mode;
        self
    }

    /// How many prepared statements each connection keeps (LRU; an evicted
    /// one is closed on the server). 0 turns caching off. Defaults to 512.
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder()
    ///     .primary("postgres://app@db/app")
    ///     .statement_cache_capacity(128);
    /// ```
    pub fn statement_cache_capacity(mut self, n: usize) -> Self {
        self.settings.statement_cache_capacity = n;
        self
    }

    /// Captures the plan of statements slower than the capture's threshold,
    /// on a background worker (see [`PlanCapture`]). Defaults to off.
    ///
    /// ```
    /// use std::time::Duration;
    /// use pgxkit::PlanCapture;
    /// let builder = pgxkit::Cluster::builder()
    ///     .primary("postgres://app@db/app")
    ///     .capture_slow_plans(PlanCapture::new(Duration::from_millis(500)));
    /// ```
    pub fn capture_slow_plans(mut self, capture: PlanCapture) -> Self {
        self.settings.plan_capture = Some(capture);
        self
    }

    /// Registers pgxkit's metrics on `registry` at `build()` (feature
    /// `prometheus`); see the crate's metrics table in the README. A name
    /// already registered there fails `build()` with a `Config` error.
    ///
    /// ```no_run
    /// let registry = prometheus::Registry::new();
    /// let cluster = pgxkit::Cluster::builder()
    ///     .primary("postgres://app@localhost/app")
    ///     .prometheus(&registry)
    ///     .build()?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    #[cfg(feature = "prometheus")]
    #[cfg_attr(docsrs, doc(cfg(feature = "prometheus")))]
    pub fn prometheus(mut self, registry: &prometheus::Registry) -> Self {
        self.prometheus = Some(registry.clone());
        self
    }

    /// Validates the configuration, opens the pools and returns the cluster.
    ///
    /// Blocks while it connects once to each node (each attempt bounded by
    /// the connect timeout): the primary must answer unless
    /// [`lazy_connect`](Self::lazy_connect) is set; a replica that does not is
    /// logged and left out of reads until a health probe reaches it.
    ///
    /// # Errors
    /// [`ErrorKind::Config`](crate::ErrorKind::Config) for bad input, naming
    /// the key; [`ErrorKind::Connect`](crate::ErrorKind::Connect) when the
    /// primary cannot be reached.
    ///
    /// ```no_run
    /// let cluster = pgxkit::Cluster::builder()
    ///     .primary("postgres://app@db-primary/app")
    ///     .replica("postgres://app@db-replica/app")
    ///     .build()?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn build(self) -> Result<Cluster> {
        let (config, metrics) = self.resolve()?;
        let cluster = Cluster::start(config)?;
        // Last, so a build that fails leaves the user's registry as it was.
        #[cfg(feature = "prometheus")]
        if let Some((registry, pending)) = metrics {
            crate::metrics::register(&registry, pending, cluster.inner.nodes_weak())?;
        }
        #[cfg(not(feature = "prometheus"))]
        let _: Option<Metrics> = metrics;
        Ok(cluster)
    }

    pub(crate) fn resolve(&self) -> Result<(ClusterConfig, Option<Metrics>)> {
        if self.primary.is_none() && self.nodes.is_empty() {
            return Err(Error::config(
                "primary: no primary DSN given (call .primary(dsn), or .nodes([...]))",
            ));
        }
        let mut connectors = tls::Connectors::default();
        let mut nodes = Vec::new();
        let mut primary = None;
        let mut add = |name: String, role: Role, dsn: &str, nodes: &mut Vec<NodeConfig>| {
            let hosts = Dsn::parse_each_host(dsn).map_err(|e| e.context(&format!("{name} DSN")))?;
            let several = hosts.len() > 1;
            for (i, parsed) in hosts.into_iter().enumerate() {
                let name = if several {
                    format!("{name}-{}", i + 1)
                } else {
                    name.clone()
                };
                let node = self
                    .node_config(name.clone(), role, parsed, &mut connectors)
                    .map_err(|e| e.context(&format!("{name} DSN")))?;
                nodes.push(node);
            }
            Ok::<bool, Error>(several)
        };
        if let Some(dsn) = &self.primary {
            if !add("primary".to_owned(), Role::Primary, dsn, &mut nodes)? {
                primary = Some(0);
            }
        }
        for (i, dsn) in self.replicas.iter().enumerate() {
            add(format!("replica{}", i + 1), Role::Replica, dsn, &mut nodes)?;
        }
        for (i, dsn) in self.nodes.iter().enumerate() {
            add(format!("node{}", i + 1), Role::Replica, dsn, &mut nodes)?;
        }
        // Of the nodes from a multi-host primary DSN, none is primary before
        // a probe says so.
        if primary.is_none() {
            for node in &nodes {
                node.info.set_role(Role::Replica);
            }
        }
        self.check_bounds()?;
        let health_check_period = self
            .pool
            .health_check_period
            .or(nodes.first().and_then(|n| n.health_check_period))
            .unwrap_or(defaults::HEALTH_CHECK_PERIOD);
        let (hooks, metrics) = self.resolve_hooks()?;
        let config = ClusterConfig {
            nodes,
            primary,
            health_check_period,
            hooks: Arc::new(hooks),
            settings: self.settings.clone(),
        };
        Ok((config, metrics))
    }

    /// Every size and duration set on the builder, within
    /// [`limits`](crate::limits), named as the builder's method.
    fn check_bounds(&self) -> Result<()> {
        let p = &self.pool;
        if let Some(n) = p.max_conns {
            limits::conns("max_conns", n)?;
        }
        if let Some(n) = p.min_conns {
            limits::at_most_conns("min_conns", n)?;
        }
        let positive = [
            ("max_conn_lifetime", p.max_conn_lifetime),
            ("max_conn_idle_time", p.max_conn_idle_time),
            ("health_check_period", p.health_check_period),
            ("checkout_timeout", Some(self.settings.checkout_timeout)),
            ("connect_timeout", self.settings.connect_timeout),
            ("open_duration", Some(self.settings.breaker.open_duration)),
            ("leak_detection_threshold", self.settings.leak_threshold),
        ];
        for (key, d) in positive {
            if let Some(d) = d {
                limits::positive(key, d)?;
            }
        }
        let bounded = [
            ("max_conn_lifetime_jitter", p.max_conn_lifetime_jitter),
            (
                "validate_after_idle",
                Some(self.settings.validate_after_idle),
            ),
            ("max_replica_lag", self.settings.max_replica_lag),
            ("statement_timeout", self.settings.statement_timeout),
            ("keepalives_idle", self.settings.keepalives_idle),
        ];
        for (key, d) in bounded {
            if let Some(d) = d {
                limits::duration(key, d)?;
            }
        }
        if let Some(d) = self.settings.tcp_user_timeout {
            limits::socket_timeout("tcp_user_timeout", d)?;
        }
        if self.settings.breaker.failure_threshold == 0 {
            return Err(Error::config("failure_threshold: must be at least 1"));
        }
        if self.settings.breaker.half_open_max_calls == 0 {
            return Err(Error::config("half_open_max_calls: must be at least 1"));
        }
        limits::queue(
            "statement_cache_capacity",
            self.settings.statement_cache_capacity,
        )?;
        if let Some(capture) = &self.settings.plan_capture {
            limits::queue("capture_slow_plans queue", capture.queue_len())?;
        }
        Ok(())
    }

    /// The user's hooks plus the internal ones (metrics), and the metrics
    /// to register once the cluster is built.
    fn resolve_hooks(&self) -> Result<(Hooks, Option<Metrics>)> {
        #[allow(unused_mut)]
        let mut hooks = self.hooks.clone();
        #[cfg(feature = "prometheus")]
        if let Some(registry) = &self.prometheus {
            let pending = crate::metrics::OperationMetrics::install(&mut hooks)?;
            return Ok((hooks, Some((registry.clone(), pending))));
        }
        Ok((hooks, None))
    }

    fn node_config(
        &self,
        name: String,
        role: Role,
        mut parsed: Dsn,
        connectors: &mut tls::Connectors,
    ) -> Result<NodeConfig> {
        if parsed.pg.get_password().is_none() {
            password_from_file(&mut parsed);
        }
        let p = self.pool.or(parsed.pool);
        let pool = PoolConfig {
            max_conns: p.max_conns.unwrap_or_else(defaults::max_conns),
            min_conns: p.min_conns.unwrap_or(0),
            max_conn_lifetime: p.max_conn_lifetime.unwrap_or(defaults::MAX_CONN_LIFETIME),
            max_conn_lifetime_jitter: p.max_conn_lifetime_jitter.unwrap_or(Duration::ZERO),
            max_conn_idle_time: p.max_conn_idle_time.unwrap_or(defaults::MAX_CONN_IDLE_TIME),
        };
        pool.validate()?;
        let connect_timeout = self
            .settings
            .connect_timeout
            .or(parsed.pg.get_connect_timeout().copied())
            .unwrap_or(defaults::CONNECT_TIMEOUT);
        parsed.pg.connect_timeout(connect_timeout);
        match (
            &self.settings.application_name,
            parsed.pg.get_application_name(),
        ) {
            (Some(name), _) => {
                parsed.pg.application_name(name);
            }
            (None, None) => {
                parsed.pg.application_name(defaults::APPLICATION_NAME);
            }
            (None, Some(_)) => {}
        }
        if let Some(d) = self.settings.tcp_user_timeout {
            parsed.pg.tcp_user_timeout(d);
        }
        if let Some(d) = self.settings.keepalives_idle {
            parsed.pg.keepalives(true).keepalives_idle(d);
        }
        let init_sql = self
            .settings
            .statement_timeout
            .map(|d| format!("SET statement_timeout = {}", d.as_millis().max(1)));
        if self.settings.require_tls
            && matches!(parsed.tls.mode, SslMode::Disable | SslMode::Prefer)
        {
            return Err(Error::config(format!(
                "sslmode: `{}` with require_tls: use require, verify-ca or verify-full",
                parsed.tls.mode
            )));
        }
        let tls = tls::connector(&parsed.tls, &mut parsed.pg, connectors)?;
        Ok(NodeConfig {
            info: NodeInfo::new(name, role, parsed.address()),
            health_check_period: parsed.pool.health_check_period,
            pg: parsed.pg,
            tls,
            pool,
            init_sql,
        })
    }
}

/// The password for a DSN that gives none, from libpq's password file.
/// A registry and the metrics to register on it once the cluster is built.
#[cfg(feature = "prometheus")]
pub(crate) type Metrics = (prometheus::Registry, crate::metrics::Pending);
/// Without the `prometheus` feature there are none.
#[cfg(not(feature = "prometheus"))]
pub(crate) type Metrics = std::convert::Infallible;

fn password_from_file(parsed: &mut Dsn) {
    use postgres::config::Host;
    let Some(path) = pgpass::location(parsed.passfile.as_deref()) else {
        return;
    };
    let pg = &parsed.pg;
    let (Some(user), host) = (pg.get_user(), pg.get_hosts().first()) else {
        return;
    };
    let host = match host {
        Some(Host::Tcp(h)) => h.as_str(),
        // libpq matches a socket directory's connection as `localhost`.
        Some(Host::Unix(_)) | None => "localhost",
    };
    let target = pgpass::Target {
        host,
        port: pg.get_ports().first().copied().unwrap_or(5432),
        dbname: pg.get_dbname().unwrap_or(user),
        user,
    };
    if let Some(password) = pgpass::lookup(&path, &target) {
        parsed.pg.password(password);
    }
}
