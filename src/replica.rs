//! The read handle: [`Cluster::replica`] routes every call to an eligible
//! replica, with the cluster's balancing, fallback and retry-once.

use std::fmt;

use postgres::Row;

use crate::Result;
use crate::cluster::{Cluster, all_rows, at_most_one, exactly_one, opt_count, row_count};
use crate::error::Error;
use crate::hooks::OperationKind;
use crate::info::Role;
use crate::rows::RowIter;
use crate::statements::{Call, Params};
use crate::tx::TransactionBuilder;

/// Reads routed to the replicas, from [`Cluster::replica`].
///
/// Each call goes to the next eligible replica (up, allowed by its breaker,
/// within the lag limits; see [`ReadBalance`](crate::ReadBalance) for which
/// one a thread gets), and to the primary when none is eligible, unless the
/// builder's [`read_fallback`](crate::ClusterBuilder::read_fallback) says
/// fail ([`ErrorKind::NoEligibleReplica`](crate::ErrorKind::NoEligibleReplica)).
/// A query that fails at the connection level (nothing of its result was
/// returned) runs once more on another eligible node, within the same
/// deadline; `with_client` and streaming past the first batch are not
/// retried. There is no `execute`: writes go through the [`Cluster`].
///
/// The handle borrows its cluster and is `Copy`: take one per call or keep
/// one for a scope. Hooks and metrics see its calls with
/// [`route()`](crate::BeforeOperation::route) `== Role::Replica`.
///
/// ```no_run
/// use pgxkit::Reads;
///
/// fn count_users(db: &impl Reads) -> pgxkit::Result<i64> {
///     Ok(db.query_one("SELECT count(*) FROM users", &[])?.get(0))
/// }
///
/// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
/// let on_a_replica = count_users(&cluster.replica())?;
/// let on_the_primary = count_users(&cluster)?;
/// # Ok::<(), pgxkit::Error>(())
/// ```
#[derive(Clone, Copy)]
pub struct ReplicaHandle<'c> {
    cluster: &'c Cluster,
}

impl fmt::Debug for ReplicaHandle<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplicaHandle")
            .field("cluster", self.cluster)
            .finish()
    }
}

impl Cluster {
    /// The read handle: a cheap `Copy` handle whose every call goes to an
    /// eligible replica (up, allowed by its breaker, within the lag limits;
    /// each thread stays on one, the threads spread over them, see
    /// [`ReadBalance`](crate::ReadBalance)), with the fallback policy's
    /// answer when none is (the primary by default). It has no `execute`:
    /// writes go through the `Cluster` itself. It keeps this handle's
    /// deadline and statement mode.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let replica = cluster.replica();
    /// let n: i64 = replica.query_one("SELECT count(*) FROM users", &[])?.get(0);
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn replica(&self) -> ReplicaHandle<'_> {
        ReplicaHandle::new(self)
    }
}

impl<'c> ReplicaHandle<'c> {
    pub(crate) fn new(cluster: &'c Cluster) -> Self {
        ReplicaHandle { cluster }
    }

    /// Runs a query on a replica and returns all rows.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let rows = cluster.replica().query("SELECT id, name FROM users", &[])?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn query(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>> {
        let kind = (OperationKind::Query, Role::Replica);
        self.cluster
            .routed(kind, sql, params, Call::Query, row_count, all_rows)
    }

    /// Runs a query on a replica that must return exactly one row:
    /// [`ErrorKind::NotFound`](crate::ErrorKind::NotFound) for none,
    /// [`ErrorKind::TooManyRows`](crate::ErrorKind::TooManyRows) for more.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let n: i64 = cluster.replica().query_one("SELECT count(*) FROM users", &[])?.get(0);
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn query_one(&self, sql: &str, params: Params<'_>) -> Result<Row> {
        let kind = (OperationKind::QueryOne, Role::Replica);
        self.cluster
            .routed(kind, sql, params, Call::QueryOpt, |_| Some(1), exactly_one)
    }

    /// Runs a query on a replica that returns at most one row.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let row = cluster.replica().query_opt("SELECT name FROM users WHERE id = $1", &[&7i64])?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn query_opt(&self, sql: &str, params: Params<'_>) -> Result<Option<Row>> {
        let kind = (OperationKind::QueryOpt, Role::Replica);
        self.cluster
            .routed(kind, sql, params, Call::QueryOpt, opt_count, at_most_one)
    }

    /// Streams a query's rows from a replica, as
    /// [`Cluster::query_iter`] does on the primary (batches of 1,000
    /// through a cursor; the connection held until the iterator is dropped).
    /// Opening it is retried once elsewhere on a connection failure.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let mut total = 0i64;
    /// for row in cluster.replica().query_iter("SELECT amount FROM payments", &[])? {
    ///     total += row?.get::<_, i64>(0);
    /// }
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn query_iter(&self, sql: &str, params: Params<'_>) -> Result<RowIter<'c>> {
        self.cluster.routed_iter(Role::Replica, sql, params)
    }

    /// Lends a pooled connection of the replica the next read would use,
    /// as [`Cluster::with_client`] does on the primary (not retried
    /// elsewhere: the closure may not be safe to run twice).
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let port: i32 = cluster.replica().with_client(|c| {
    ///     Ok::<_, pgxkit::Error>(c.query_one("SELECT inet_server_port()", &[])?.get(0))
    /// })?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn with_client<T, E: From<Error>>(
        &self,
        f: impl FnOnce(&mut postgres::Client) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        let node = self.cluster.reader(None)?;
        self.cluster.lend(Role::Replica, node, f)
    }

    /// Runs `f` in a read-only `REPEATABLE READ` transaction on an eligible
    /// replica: several reads from one consistent snapshot. Commits when
    /// `f` returns `Ok`; an `Err` (the caller's own error type) rolls back
    /// and comes back unchanged.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let (orders, items): (i64, i64) = cluster.replica().transaction(|tx| {
    ///     let o = tx.query_one("SELECT count(*) FROM orders", &[])?.get(0);
    ///     let i = tx.query_one("SELECT count(*) FROM order_items", &[])?.get(0);
    ///     Ok::<_, pgxkit::Error>((o, i))
    /// })?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn transaction<T, E: From<Error>>(
        &self,
        f: impl FnOnce(&crate::Transaction<'c>) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        self.build_transaction().run(f)
    }

    /// A builder for a read-only transaction on a replica (`REPEATABLE
    /// READ` unless another isolation is chosen; `read_only(false)` is
    /// refused at `begin`/`run`, as a replica cannot write).
    ///
    /// ```no_run
    /// use pgxkit::IsolationLevel;
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let tx = cluster.replica().build_transaction().isolation(IsolationLevel::Serializable).deferrable(true).begin()?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn build_transaction(&self) -> TransactionBuilder<'c> {
        TransactionBuilder::on_replica(self.cluster)
    }
}
