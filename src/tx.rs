//! Transactions: a guard that commits or rolls back, with options,
//! savepoints, read-only transactions on replicas, retries, and the
//! `Executor` trait shared with `Cluster`.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::time::Instant;

use postgres::Row;

use crate::cluster::{Cluster, at_most_one, exactly_one};
use crate::error::{Error, ErrorKind, NodeInfo, Result};
use crate::hooks::{self, OperationKind, TransactionEvent, TransactionOutcome};
use crate::node::{Lease, Node, Permit};
use crate::retry::RetryPolicy;
use crate::shutdown::InFlight;
use crate::statements::Params;
use crate::statements::{Call, Output};

/// Isolation levels (PostgreSQL runs `READ UNCOMMITTED` as `READ COMMITTED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IsolationLevel {
    /// `READ COMMITTED`, the server's default.
    ReadCommitted,
    /// `REPEATABLE READ`: one snapshot for the whole transaction.
    RepeatableRead,
    /// `SERIALIZABLE`: may fail with 40001, which is retryable.
    Serializable,
}

/// How to begin a transaction.
///
/// ```
/// use pgxkit::{IsolationLevel, TransactionOptions};
/// let opts = TransactionOptions::new().isolation(IsolationLevel::Serializable).read_only(true).deferrable(true);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[must_use]
pub struct TransactionOptions {
    isolation: Option<IsolationLevel>,
    read_only: bool,
    deferrable: bool,
}

impl TransactionOptions {
    /// The server's defaults: its default isolation, read-write, not deferrable.
    pub fn new() -> Self {
        Self::default()
    }

    /// The isolation level. Defaults to the server's default.
    pub fn isolation(mut self, level: IsolationLevel) -> Self {
        self.isolation = Some(level);
        self
    }

    /// A read-only transaction: the server rejects any write. Defaults to `false`.
    pub fn read_only(mut self, yes: bool) -> Self {
        self.read_only = yes;
        self
    }

    /// `DEFERRABLE` (meaningful with `SERIALIZABLE READ ONLY`). Defaults to `false`.
    pub fn deferrable(mut self, yes: bool) -> Self {
        self.deferrable = yes;
        self
    }

    fn begin_sql(&self) -> String {
        let mut sql = String::from("BEGIN");
        if let Some(level) = self.isolation {
            sql.push_str(match level {
                IsolationLevel::ReadCommitted => " ISOLATION LEVEL READ COMMITTED",
                IsolationLevel::RepeatableRead => " ISOLATION LEVEL REPEATABLE READ",
                IsolationLevel::Serializable => " ISOLATION LEVEL SERIALIZABLE",
            });
        }
        if self.read_only {
            sql.push_str(" READ ONLY");
        }
        if self.deferrable {
            sql.push_str(" DEFERRABLE");
        }
        sql
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    /// A statement failed: the server refuses everything until rollback.
    Aborted,
    /// The connection was discarded (a deadline fired or it broke).
    Broken,
    Done,
}

/// An open transaction on one node, holding one pooled connection.
///
/// Dropping it without [`commit`](Self::commit) rolls back; if a panic is
/// unwinding, the connection is discarded instead (the server rolls back
/// when it closes). Counted as in flight for graceful shutdown until it ends.
/// Each statement is bounded by the deadline of the handle it was begun
/// from ([`Cluster::with_timeout`]).
///
/// ```no_run
/// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
/// let tx = cluster.begin()?;
/// tx.execute("UPDATE accounts SET balance = balance - 10 WHERE id = $1", &[&1i64])?;
/// tx.execute("UPDATE accounts SET balance = balance + 10 WHERE id = $1", &[&2i64])?;
/// tx.commit()?;
/// # Ok::<(), pgxkit::Error>(())
/// ```
pub struct Transaction<'c> {
    cluster: &'c Cluster,
    node: &'c Node,
    conn: RefCell<Lease<'c>>,
    permit: Cell<Option<Permit<'c>>>,
    _in_flight: InFlight<'c>,
    started: Instant,
    read_only: bool,
    state: Cell<State>,
    savepoints: Cell<u32>,
}

impl fmt::Debug for Transaction<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transaction")
            .field("node", &self.node.info)
            .field("read_only", &self.read_only)
            .field("state", &self.state.get())
            .finish_non_exhaustive()
    }
}

impl<'c> Transaction<'c> {
    pub(crate) fn begin(
        cluster: &'c Cluster,
        node: &'c Node,
        options: TransactionOptions,
    ) -> Result<Self> {
        let in_flight = cluster.enter()?;
        let hooks = &*cluster.inner.hooks;
        if !hooks.before_transaction.is_empty() {
            let event = TransactionEvent {
                node: &node.info,
                read_only: options.read_only,
                outcome: None,
                duration: std::time::Duration::ZERO,
                error: None,
            };
            hooks::run(&hooks.before_transaction, "before_transaction", |hook| {
                hook(&event)
            })
            .map_err(|e| e.with_node(&node.info))?;
        }
        let permit = node.admit()?;
        let deadline = cluster.deadline();
        let begun = node.checkout_until(deadline).and_then(|mut conn| {
            node.guarded(&mut conn, deadline, |c| {
                c.batch_execute(&options.begin_sql())
            })
            .map(|()| conn)
        });
        let conn = match begun {
            Ok(conn) => conn,
            Err(e) => {
                permit.finish_error(&e);
                return Err(e);
            }
        };
        Ok(Transaction {
            cluster,
            node,
            conn: RefCell::new(conn),
            permit: Cell::new(Some(permit)),
            _in_flight: in_flight,
            started: Instant::now(),
            read_only: options.read_only,
            state: Cell::new(State::Open),
            savepoints: Cell::new(0),
        })
    }

    /// The node the transaction runs on.
    pub fn node(&self) -> &NodeInfo {
        &self.node.info
    }

    fn check_usable(&self) -> Result<()> {
        match self.state.get() {
            State::Broken => Err(Error::new(ErrorKind::Closed)
                .with_node(&self.node.info)
                .with_detail(
                    "the transaction's connection was discarded (a deadline passed or it broke)",
                )),
            State::Done => Err(Error::new(ErrorKind::TransactionState)
                .with_node(&self.node.info)
                .with_detail("the transaction has ended")),
            State::Open | State::Aborted => Ok(()),
        }
    }

    /// One statement: hooks, deadline, state tracking.
    fn run<T>(
        &self,
        kind: OperationKind,
        sql: &str,
        params: Params<'_>,
        rows: impl Fn(&T) -> Option<u64>,
        op: impl FnOnce(&mut Lease<'c>, Option<Instant>) -> Result<T>,
    ) -> Result<T> {
        self.check_usable()?;
        let mut conn = self.conn.try_borrow_mut().map_err(|_| {
            Error::new(ErrorKind::TransactionState)
                .with_node(&self.node.info)
                .with_detail("the transaction is in use by another call")
        })?;
        let deadline = self.cluster.deadline();
        let result = hooks::around(
            &self.cluster.inner.hooks,
            kind,
            &self.node.info,
            sql,
            params,
            rows,
            || op(&mut conn, deadline),
        );
        if conn.broken {
            self.state.set(State::Broken);
        } else if let Err(e) = &result {
            if e.kind() != ErrorKind::Hook {
                self.state.set(State::Aborted);
            }
        }
        result
    }

    /// A parameterised statement in the cluster's statement mode (cached by default).
    fn statement(
        &self,
        kind: OperationKind,
        sql: &str,
        params: Params<'_>,
        call: Call,
    ) -> Result<Output> {
        let stmt = self.cluster.stmt(kind, sql, params, call);
        let rows = |out: &Output| Some(out.len());
        self.run(kind, sql, params, rows, |conn, deadline| {
            self.node.statement(conn, deadline, &stmt)
        })
    }

    /// Runs a statement and returns the number of rows it affected.
    pub fn execute(&self, sql: &str, params: Params<'_>) -> Result<u64> {
        self.statement(OperationKind::Execute, sql, params, Call::Execute)
            .map(Output::count)
    }

    /// Runs a query and returns all rows.
    pub fn query(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>> {
        self.statement(OperationKind::Query, sql, params, Call::Query)
            .map(Output::rows)
    }

    /// Runs a query that must return exactly one row.
    pub fn query_one(&self, sql: &str, params: Params<'_>) -> Result<Row> {
        let out = self.statement(OperationKind::QueryOne, sql, params, Call::QueryOpt)?;
        exactly_one(out, self.node)
    }

    /// Runs a query that returns at most one row.
    pub fn query_opt(&self, sql: &str, params: Params<'_>) -> Result<Option<Row>> {
        let out = self.statement(OperationKind::QueryOpt, sql, params, Call::QueryOpt)?;
        at_most_one(out, self.node)
    }

    /// Runs statements separated by semicolons (simple protocol, no parameters).
    pub fn batch_execute(&self, sql: &str) -> Result<()> {
        self.run(
            OperationKind::BatchExecute,
            sql,
            &[],
            |_| None,
            |conn, deadline| self.node.guarded(conn, deadline, |c| c.batch_execute(sql)),
        )
    }

    /// COPY IN inside the transaction, as
    /// [`Cluster::copy_in`](crate::Cluster::copy_in) does it: the rows
    /// copied. Rolled back with the transaction.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// cluster.transaction(|tx| {
    ///     tx.execute("TRUNCATE staging", &[])?;
    ///     tx.copy_in("COPY staging FROM STDIN", "1\n2\n".as_bytes())
    /// })?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn copy_in(&self, sql: &str, mut data: impl std::io::Read) -> Result<u64> {
        self.run(
            OperationKind::CopyIn,
            sql,
            &[],
            |n: &u64| Some(*n),
            |conn, deadline| {
                let mut failed = None;
                let result = self.node.guarded_conn(conn, deadline, |c| {
                    crate::copy::copy_in(c, sql, &mut data, &mut failed)
                });
                crate::copy::outcome(result, failed, &self.node.info, "reading the data")
            },
        )
    }

    /// COPY OUT inside the transaction (its snapshot), as
    /// [`Cluster::copy_out`](crate::Cluster::copy_out) does it: the bytes
    /// written.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let mut out = Vec::new();
    /// cluster.transaction(|tx| tx.copy_out("COPY users TO STDOUT", &mut out))?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn copy_out(&self, sql: &str, mut out: impl std::io::Write) -> Result<u64> {
        self.run(
            OperationKind::CopyOut,
            sql,
            &[],
            |_: &u64| None,
            |conn, deadline| {
                let mut failed = None;
                let result = self.node.guarded_conn(conn, deadline, |c| {
                    crate::copy::copy_out(c, sql, &mut out, &mut failed)
                });
                crate::copy::outcome(result, failed, &self.node.info, "writing the output")
            },
        )
    }

    /// Lends the transaction's `postgres::Client` (COPY, `query_raw`...).
    /// Do not commit or roll back through it.
    pub fn with_client<T>(
        &self,
        f: impl FnOnce(&mut postgres::Client) -> std::result::Result<T, postgres::Error>,
    ) -> Result<T> {
        self.run(
            OperationKind::WithPrimary,
            "",
            &[],
            |_| None,
            |conn, deadline| self.node.guarded(conn, deadline, f),
        )
    }

    /// Runs `f` inside a savepoint: released when `f` returns `Ok`, rolled
    /// back to (undoing only `f`'s work, and clearing an error inside it)
    /// when `f` returns `Err`, whose error is then returned.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// cluster.transaction(|tx| {
    ///     tx.execute("INSERT INTO orders (id) VALUES (1)", &[])?;
    ///     // A duplicate here undoes only the savepoint's work.
    ///     let _ = tx.savepoint(|sp| sp.execute("INSERT INTO audit (order_id) VALUES (1)", &[]));
    ///     Ok(())
    /// })?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn savepoint<T>(&self, f: impl FnOnce(&Transaction<'c>) -> Result<T>) -> Result<T> {
        let n = self.savepoints.get() + 1;
        self.savepoints.set(n);
        let name = format!("pgxkit_savepoint_{n}");
        let before = self.state.get();
        self.batch_execute(&format!("SAVEPOINT {name}"))?;
        match f(self) {
            Ok(value) => {
                self.batch_execute(&format!("RELEASE SAVEPOINT {name}"))?;
                Ok(value)
            }
            Err(e) => {
                if self.state.get() != State::Broken {
                    self.state.set(before);
                    self.batch_execute(&format!(
                        "ROLLBACK TO SAVEPOINT {name}; RELEASE SAVEPOINT {name}"
                    ))?;
                }
                Err(e)
            }
        }
    }

    /// Commits. If a statement of the transaction failed, the server can
    /// only roll back: the transaction is rolled back and an error returned.
    ///
    /// # Errors
    /// The server's error if it refused the commit (the transaction did not
    /// commit; a serialization failure 40001 is retryable);
    /// [`ErrorKind::AmbiguousCommit`] when the connection failed while
    /// `COMMIT` was in flight (it may or may not have committed).
    pub fn commit(self) -> Result<()> {
        self.check_usable()?;
        if self.state.get() == State::Aborted {
            let rollback = self.end("ROLLBACK");
            let err = Error::new(ErrorKind::Db)
                .with_node(&self.node.info)
                .with_detail("commit of a transaction aborted by an earlier error: rolled back");
            self.finish(TransactionOutcome::Rollback, Some(&err));
            rollback?;
            return Err(err);
        }
        match self.end("COMMIT") {
            Ok(()) => {
                self.finish(TransactionOutcome::Commit, None);
                Ok(())
            }
            // The server answered, or COMMIT was never sent (the connection
            // was found closed before sending): definitely not committed.
            Err(e) if e.kind() == ErrorKind::Db || e.is_retryable() => {
                self.finish(TransactionOutcome::Rollback, Some(&e));
                Err(e)
            }
            Err(e) => {
                let err = Error::new(ErrorKind::AmbiguousCommit)
                    .with_node(&self.node.info)
                    .with_source(e);
                self.finish(TransactionOutcome::Unknown, Some(&err));
                Err(err)
            }
        }
    }

    /// Rolls back.
    pub fn rollback(self) -> Result<()> {
        self.check_usable()?;
        let result = self.end("ROLLBACK");
        self.finish(TransactionOutcome::Rollback, result.as_ref().err());
        result
    }

    /// Sends `COMMIT` or `ROLLBACK`, bounded by the deadline.
    fn end(&self, sql: &str) -> Result<()> {
        let mut conn = self.conn.borrow_mut();
        let result = self
            .node
            .guarded(&mut conn, self.cluster.deadline(), |c| c.batch_execute(sql));
        if conn.broken {
            self.state.set(State::Broken);
        }
        result
    }

    /// Books the end: breaker, `after_transaction` hooks.
    fn finish(&self, outcome: TransactionOutcome, error: Option<&Error>) {
        self.state.set(State::Done);
        if let Some(permit) = self.permit.take() {
            match error {
                Some(e) if e.kind() == ErrorKind::AmbiguousCommit => {
                    permit.finish_error(&Error::new(ErrorKind::Closed));
                }
                Some(e) => permit.finish_error(e),
                None => permit.finish(&Ok(())),
            }
        }
        let hooks = &self.cluster.inner.hooks.after_transaction;
        if !hooks.is_empty() {
            let event = TransactionEvent {
                node: &self.node.info,
                read_only: self.read_only,
                outcome: Some(outcome),
                duration: self.started.elapsed(),
                error,
            };
            if let Err(e) = hooks::run(hooks, "after_transaction", |hook| hook(&event)) {
                log::warn!("{e}");
            }
        }
    }
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        match self.state.get() {
            State::Done => {}
            _ if std::thread::panicking() => {
                // No I/O while unwinding: discard the connection; the server
                // rolls back when it closes.
                self.conn.get_mut().broken = true;
                self.finish(TransactionOutcome::Rollback, None);
            }
            State::Broken => self.finish(TransactionOutcome::Rollback, None),
            State::Open | State::Aborted => {
                let result = self.end("ROLLBACK");
                if let Err(e) = &result {
                    log::warn!(
                        "rollback of a dropped transaction on {} failed: {e}",
                        self.node.info
                    );
                    self.conn.get_mut().broken = true;
                }
                self.finish(TransactionOutcome::Rollback, result.as_ref().err());
            }
        }
    }
}

impl Cluster {
    /// Begins a transaction on the primary; see [`Transaction`].
    ///
    /// Blocks to check out a connection and send `BEGIN`.
    pub fn begin(&self) -> Result<Transaction<'_>> {
        self.begin_with(TransactionOptions::new())
    }

    /// Begins a transaction on the primary with `options`.
    ///
    /// ```no_run
    /// use pgxkit::{IsolationLevel, TransactionOptions};
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let tx = cluster.begin_with(TransactionOptions::new().isolation(IsolationLevel::Serializable))?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn begin_with(&self, options: TransactionOptions) -> Result<Transaction<'_>> {
        Transaction::begin(self, self.primary(), options)
    }

    /// Runs `f` in a transaction on the primary: commits when it returns
    /// `Ok`, rolls back when it returns `Err` or panics (the panic then
    /// continues).
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let id: i64 = cluster.transaction(|tx| {
    ///     let id: i64 = tx.query_one("INSERT INTO orders DEFAULT VALUES RETURNING id", &[])?.get(0);
    ///     tx.execute("INSERT INTO order_events (order_id, kind) VALUES ($1, 'created')", &[&id])?;
    ///     Ok(id)
    /// })?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn transaction<T>(&self, f: impl FnOnce(&Transaction<'_>) -> Result<T>) -> Result<T> {
        self.transaction_with(TransactionOptions::new(), f)
    }

    /// [`transaction`](Self::transaction) with `options`.
    pub fn transaction_with<T>(
        &self,
        options: TransactionOptions,
        f: impl FnOnce(&Transaction<'_>) -> Result<T>,
    ) -> Result<T> {
        run_transaction(self.begin_with(options)?, f)
    }

    /// Runs `f` in a read-only `REPEATABLE READ` transaction on an eligible
    /// replica (the primary when none is, unless the fallback policy says
    /// fail): several reads from one consistent snapshot.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let (orders, items): (i64, i64) = cluster.read_transaction(|tx| {
    ///     let o = tx.query_one("SELECT count(*) FROM orders", &[])?.get(0);
    ///     let i = tx.query_one("SELECT count(*) FROM order_items", &[])?.get(0);
    ///     Ok((o, i))
    /// })?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn read_transaction<T>(&self, f: impl FnOnce(&Transaction<'_>) -> Result<T>) -> Result<T> {
        let options = TransactionOptions::new()
            .isolation(IsolationLevel::RepeatableRead)
            .read_only(true);
        run_transaction(Transaction::begin(self, self.reader(None)?, options)?, f)
    }

    /// Runs `f` in a transaction and runs the whole transaction again when
    /// it fails with a retryable error (serialization failure, deadlock,
    /// checkout timeout) or a connection failure before `COMMIT` was sent,
    /// as `policy` says. A transaction whose `COMMIT` may have reached the
    /// server is never run again: that is [`ErrorKind::AmbiguousCommit`].
    /// `f` should only use `tx`: work it does elsewhere is not rolled back.
    ///
    /// ```no_run
    /// use pgxkit::{IsolationLevel, RetryPolicy, TransactionOptions};
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// cluster.transaction_with_retry(&RetryPolicy::default(), |tx| {
    ///     let n: i64 = tx.query_one("SELECT count(*) FROM seats WHERE taken", &[])?.get(0);
    ///     if n < 100 {
    ///         tx.execute("UPDATE seats SET taken = true WHERE id = (SELECT min(id) FROM seats WHERE NOT taken)", &[])?;
    ///     }
    ///     Ok(())
    /// })?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn transaction_with_retry<T>(
        &self,
        policy: &RetryPolicy,
        f: impl FnMut(&Transaction<'_>) -> Result<T>,
    ) -> Result<T> {
        self.transaction_with_retry_opts(policy, TransactionOptions::new(), f)
    }

    /// [`transaction_with_retry`](Self::transaction_with_retry) with `options`
    /// (such as `SERIALIZABLE`).
    pub fn transaction_with_retry_opts<T>(
        &self,
        policy: &RetryPolicy,
        options: TransactionOptions,
        mut f: impl FnMut(&Transaction<'_>) -> Result<T>,
    ) -> Result<T> {
        policy.run(
            |_| self.transaction_with(options, &mut f),
            retryable_transaction,
        )
    }
}

/// A failed transaction may run again when the error is retryable anyway,
/// or when it is a connection failure before `COMMIT` was sent: nothing of
/// the transaction can have committed then. Never after an ambiguous commit.
fn retryable_transaction(err: &Error) -> bool {
    err.is_retryable() || (err.is_connection_error() && err.kind() != ErrorKind::AmbiguousCommit)
}

fn run_transaction<T>(
    tx: Transaction<'_>,
    f: impl FnOnce(&Transaction<'_>) -> Result<T>,
) -> Result<T> {
    match f(&tx) {
        Ok(value) => tx.commit().map(|()| value),
        Err(e) => {
            if let Err(rollback) = tx.rollback() {
                log::warn!("rollback after an error failed: {rollback}");
            }
            Err(e)
        }
    }
}

/// What `Cluster` and `Transaction` have in common, so code can run
/// against either (the Go library's `Executor`).
///
/// ```no_run
/// use pgxkit::{Executor, Result};
///
/// fn create_user(db: &impl Executor, name: &str) -> Result<i64> {
///     Ok(db.query_one("INSERT INTO users (name) VALUES ($1) RETURNING id", &[&name])?.get(0))
/// }
///
/// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
/// create_user(&cluster, "ada")?;                       // on its own
/// cluster.transaction(|tx| create_user(tx, "grace"))?; // inside a transaction
/// # Ok::<(), pgxkit::Error>(())
/// ```
pub trait Executor {
    /// Runs a statement; returns the rows affected.
    fn execute(&self, sql: &str, params: Params<'_>) -> Result<u64>;
    /// Runs a query; returns all rows.
    fn query(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>>;
    /// Runs a query that must return exactly one row.
    fn query_one(&self, sql: &str, params: Params<'_>) -> Result<Row>;
    /// Runs a query that returns at most one row.
    fn query_opt(&self, sql: &str, params: Params<'_>) -> Result<Option<Row>>;
    /// Runs statements separated by semicolons.
    fn batch_execute(&self, sql: &str) -> Result<()>;
}

impl Executor for Cluster {
    fn execute(&self, sql: &str, params: Params<'_>) -> Result<u64> {
        Cluster::execute(self, sql, params)
    }
    fn query(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>> {
        Cluster::query(self, sql, params)
    }
    fn query_one(&self, sql: &str, params: Params<'_>) -> Result<Row> {
        Cluster::query_one(self, sql, params)
    }
    fn query_opt(&self, sql: &str, params: Params<'_>) -> Result<Option<Row>> {
        Cluster::query_opt(self, sql, params)
    }
    fn batch_execute(&self, sql: &str) -> Result<()> {
        Cluster::batch_execute(self, sql)
    }
}

impl Executor for Transaction<'_> {
    fn execute(&self, sql: &str, params: Params<'_>) -> Result<u64> {
        Transaction::execute(self, sql, params)
    }
    fn query(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>> {
        Transaction::query(self, sql, params)
    }
    fn query_one(&self, sql: &str, params: Params<'_>) -> Result<Row> {
        Transaction::query_one(self, sql, params)
    }
    fn query_opt(&self, sql: &str, params: Params<'_>) -> Result<Option<Row>> {
        Transaction::query_opt(self, sql, params)
    }
    fn batch_execute(&self, sql: &str) -> Result<()> {
        Transaction::batch_execute(self, sql)
    }
}
