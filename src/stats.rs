//! Point-in-time snapshots of the pools (what pgxpool's `Stat` reports, per node).

use std::time::Duration;

use crate::breaker::BreakerState;
use crate::info::{NodeInfo, Role};

/// One pool's numbers at the moment `stats()` was called. Counters count
/// from the cluster's start.
///
/// ```no_run
/// # fn main() -> Result<(), pgxkit::Error> {
/// # let cluster = pgxkit::Cluster::connect("postgres://app@db/app")?;
/// let stats = cluster.stats();
/// let primary = &stats.primary().unwrap().pool;
/// println!("{} of {} in use, {} checkout timeouts",
///          primary.in_use_conns, primary.max_conns, primary.checkout_timeouts);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolStats {
    /// The most connections the pool may hold.
    pub max_conns: u32,
    /// Connections open now (idle plus in use).
    pub total_conns: u32,
    /// Open connections waiting in the pool.
    pub idle_conns: u32,
    /// Connections checked out now.
    pub in_use_conns: u32,
    /// Successful checkouts.
    pub acquire_count: u64,
    /// Time spent waiting in successful checkouts, summed.
    pub acquire_wait: Duration,
    /// Checkouts that gave up at the checkout timeout.
    pub checkout_timeouts: u64,
    /// Connections opened.
    pub new_conns: u64,
    /// Attempts to open a connection that failed.
    pub connect_failures: u64,
    /// Connections closed because their lifetime was over.
    pub closed_lifetime: u64,
    /// Connections closed after sitting idle too long.
    pub closed_idle: u64,
    /// Connections discarded as broken.
    pub closed_broken: u64,
    /// Idle connections checked with a round trip before being handed out.
    pub validations: u64,
    /// Statements prepared (statement cache misses, `StatementMode::Cached`).
    pub statements_prepared: u64,
    /// Executions that reused a cached prepared statement.
    pub statement_cache_hits: u64,
}

impl PoolStats {
    /// `in_use_conns / max_conns`, from 0.0 to 1.0.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let stats = cluster.stats();
    /// let pool = &stats.primary().unwrap().pool;
    /// if pool.utilization() > 0.8 {
    ///     eprintln!("primary pool {:.0} % in use", pool.utilization() * 100.0);
    /// }
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn utilization(&self) -> f64 {
        if self.max_conns == 0 {
            0.0
        } else {
            f64::from(self.in_use_conns) / f64::from(self.max_conns)
        }
    }
}

/// One node's snapshot.
///
/// ```no_run
/// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
/// for node in &cluster.stats().nodes {
///     println!("{}: {} of {} in use", node.node.name(), node.pool.in_use_conns, node.pool.max_conns);
/// }
/// # Ok::<(), pgxkit::Error>(())
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct NodeStats {
    /// Which node.
    pub node: NodeInfo,
    /// Whether the node's last health probe (or the check at `build()`) succeeded.
    pub up: bool,
    /// The state of its circuit breaker.
    pub breaker: BreakerState,
    /// Replication lag in bytes of WAL not yet replayed (replicas; `None`
    /// before the first probe or while the primary is unreachable).
    pub lag_bytes: Option<u64>,
    /// Replication lag in time (replicas; zero when everything received is replayed).
    pub lag: Option<std::time::Duration>,
    /// Its pool.
    pub pool: PoolStats,
}

/// Every node's snapshot, in the order the nodes were configured.
///
/// ```no_run
/// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
/// let stats = cluster.stats();
/// println!("{} checkouts, {} in use", stats.total_acquire_count(), stats.total_in_use());
/// # Ok::<(), pgxkit::Error>(())
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClusterStats {
    /// Every node, in the order they were configured.
    pub nodes: Vec<NodeStats>,
    /// The index in `nodes` of the node writes go to, if one is known.
    pub(crate) primary: Option<usize>,
}

impl ClusterStats {
    /// The snapshot of the node writes go to; `None` while no node is
    /// known to be primary (a failover under way).
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// if let Some(primary) = cluster.stats().primary() {
    ///     println!("{} connections to the primary", primary.pool.total_conns);
    /// }
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn primary(&self) -> Option<&NodeStats> {
        self.nodes.get(self.primary?)
    }

    /// The replicas' snapshots.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// for replica in cluster.stats().replicas() {
    ///     println!("{} lag {:?}", replica.node.name(), replica.lag);
    /// }
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn replicas(&self) -> impl Iterator<Item = &NodeStats> {
        self.nodes.iter().filter(|n| n.node.role() == Role::Replica)
    }

    /// The snapshot of the node called `name`.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// if let Some(r) = cluster.stats().node("replica1") {
    ///     println!("breaker {:?}", r.breaker);
    /// }
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn node(&self, name: &str) -> Option<&NodeStats> {
        self.nodes.iter().find(|n| n.node.name() == name)
    }

    /// Successful checkouts on all nodes together.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let before = cluster.stats().total_acquire_count();
    /// cluster.execute("SELECT 1", &[])?;
    /// assert!(cluster.stats().total_acquire_count() > before);
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn total_acquire_count(&self) -> u64 {
        self.nodes.iter().map(|n| n.pool.acquire_count).sum()
    }

    /// Connections checked out now, on all nodes together.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// assert_eq!(cluster.stats().total_in_use(), 0);
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn total_in_use(&self) -> u32 {
        self.nodes.iter().map(|n| n.pool.in_use_conns).sum()
    }
}
