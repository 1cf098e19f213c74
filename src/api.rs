//! The query traits: what the primary side, the read handle and a
//! transaction have in common, so generic code can take any of them.

use postgres::Row;

use crate::cluster::Cluster;
use crate::error::{Error, Result};
use crate::replica::ReplicaHandle;
use crate::rows::RowIter;
use crate::statements::Params;
use crate::tx::Transaction;

mod sealed {
    pub trait Sealed {}
    impl Sealed for crate::Cluster {}
    impl Sealed for crate::ReplicaHandle<'_> {}
    impl Sealed for crate::Transaction<'_> {}
}

/// Reading: implemented by [`Cluster`] (the primary),
/// [`ReplicaHandle`] (the replicas, from [`Cluster::replica`]) and
/// [`Transaction`]. Sealed: the crate's own types are the only ones. Each
/// method is the type's own method of the same name; see there.
///
/// ```no_run
/// use pgxkit::Reads;
///
/// fn names(db: &impl Reads) -> pgxkit::Result<Vec<String>> {
///     Ok(db.query("SELECT name FROM users ORDER BY name", &[])?.iter().map(|r| r.get(0)).collect())
/// }
///
/// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
/// names(&cluster.replica())?;                  // on a replica
/// names(&cluster)?;                            // on the primary
/// cluster.transaction(|tx| names(tx))?;        // inside a transaction
/// # Ok::<(), pgxkit::Error>(())
/// ```
pub trait Reads: sealed::Sealed {
    /// Runs a query; returns all rows.
    fn query(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>>;
    /// Runs a query that must return exactly one row.
    fn query_one(&self, sql: &str, params: Params<'_>) -> Result<Row>;
    /// Runs a query that returns at most one row.
    fn query_opt(&self, sql: &str, params: Params<'_>) -> Result<Option<Row>>;
    /// Streams a query's rows through a cursor, 1,000 per round trip.
    fn query_iter(&self, sql: &str, params: Params<'_>) -> Result<RowIter<'_>>;
    /// Lends the underlying `postgres::Client` to `f`.
    fn with_client<T, E: From<Error>>(
        &self,
        f: impl FnOnce(&mut postgres::Client) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E>;
}

/// Writing, on top of [`Reads`]: implemented by [`Cluster`] (the primary)
/// and [`Transaction`], never by the read handle. Sealed.
///
/// ```no_run
/// use pgxkit::Writes;
///
/// fn create_user(db: &impl Writes, name: &str) -> pgxkit::Result<i64> {
///     Ok(db.query_one("INSERT INTO users (name) VALUES ($1) RETURNING id", &[&name])?.get(0))
/// }
///
/// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
/// create_user(&cluster, "ada")?;                       // on its own
/// cluster.transaction(|tx| create_user(tx, "grace"))?; // inside a transaction
/// # Ok::<(), pgxkit::Error>(())
/// ```
pub trait Writes: Reads {
    /// Runs a statement; returns the rows affected.
    fn execute(&self, sql: &str, params: Params<'_>) -> Result<u64>;
    /// Runs statements separated by semicolons (simple protocol).
    fn batch_execute(&self, sql: &str) -> Result<()>;
    /// `COPY ... FROM STDIN` from `data`; returns the rows copied.
    fn copy_in(&self, sql: &str, data: impl std::io::Read) -> Result<u64>;
    /// `COPY ... TO STDOUT` into `out`; returns the bytes written.
    fn copy_out(&self, sql: &str, out: impl std::io::Write) -> Result<u64>;
}

/// Implements `Reads` by calling the type's own methods.
macro_rules! reads_by_inherent_methods {
    ($ty:ty) => {
        impl Reads for $ty {
            fn query(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>> {
                <$ty>::query(self, sql, params)
            }
            fn query_one(&self, sql: &str, params: Params<'_>) -> Result<Row> {
                <$ty>::query_one(self, sql, params)
            }
            fn query_opt(&self, sql: &str, params: Params<'_>) -> Result<Option<Row>> {
                <$ty>::query_opt(self, sql, params)
            }
            fn query_iter(&self, sql: &str, params: Params<'_>) -> Result<RowIter<'_>> {
                <$ty>::query_iter(self, sql, params)
            }
            fn with_client<T, E: From<Error>>(
                &self,
                f: impl FnOnce(&mut postgres::Client) -> std::result::Result<T, E>,
            ) -> std::result::Result<T, E> {
                <$ty>::with_client(self, f)
            }
        }
    };
}

/// Implements `Writes` by calling the type's own methods.
macro_rules! writes_by_inherent_methods {
    ($ty:ty) => {
        impl Writes for $ty {
            fn execute(&self, sql: &str, params: Params<'_>) -> Result<u64> {
                <$ty>::execute(self, sql, params)
            }
            fn batch_execute(&self, sql: &str) -> Result<()> {
                <$ty>::batch_execute(self, sql)
            }
            fn copy_in(&self, sql: &str, data: impl std::io::Read) -> Result<u64> {
                <$ty>::copy_in(self, sql, data)
            }
            fn copy_out(&self, sql: &str, out: impl std::io::Write) -> Result<u64> {
                <$ty>::copy_out(self, sql, out)
            }
        }
    };
}

reads_by_inherent_methods!(Cluster);
reads_by_inherent_methods!(ReplicaHandle<'_>);
reads_by_inherent_methods!(Transaction<'_>);
writes_by_inherent_methods!(Cluster);
writes_by_inherent_methods!(Transaction<'_>);
