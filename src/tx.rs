//! Transactions: a guard that commits or rolls back, the builder that
//! begins one (options, retries, primary or replica), savepoints and
//! streaming inside a transaction.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::time::Instant;

use postgres::Row;

use crate::breaker::Permit;
use crate::cluster::{Cluster, at_most_one, exactly_one};
use crate::error::{AsPgxkitError, Error, ErrorKind, Result};
use crate::hooks::{self, Op, OperationKind, TransactionEvent, TransactionOutcome};
use crate::info::{NodeInfo, Role};
use crate::node::Node;
use crate::pool::Lease;
use crate::pool::manager::Conn;
use crate::retry::RetryPolicy;
use crate::rows::{self, RowIter};
use crate::shutdown::InFlight;
use crate::statements::Params;
use crate::statements::{Call, Output};

/// Isolation levels (PostgreSQL runs `READ UNCOMMITTED` as `READ COMMITTED`).
///
/// ```
/// use pgxkit::IsolationLevel;
/// let level = IsolationLevel::Serializable;
/// assert_ne!(level, IsolationLevel::ReadCommitted);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IsolationLevel {
    /// `READ COMMITTED`, the server's default.
    ReadCommitted,
    /// `REPEATABLE READ`: one snapshot for the whole transaction.
    RepeatableRead,
    /// `SERIALIZABLE`: may fail with 40001, which is retryable.
    Serializable,
}

/// How to begin a transaction, from [`Cluster::build_transaction`] (on the
/// primary) or [`ReplicaHandle::build_transaction`](crate::ReplicaHandle::build_transaction)
/// (read-only, on a replica); then [`run`](Self::run) a closure in it, or
/// [`begin`](Self::begin) it for a guard. [`retry`](Self::retry) makes
/// `run` run the whole transaction again on a retryable failure.
///
/// ```no_run
/// use pgxkit::IsolationLevel;
/// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
/// let total: i64 = cluster
///     .build_transaction()
///     .isolation(IsolationLevel::Serializable)
///     .read_only(true)
///     .deferrable(true)
///     .run(|tx| Ok::<_, pgxkit::Error>(tx.query_one("SELECT sum(balance)::int8 FROM accounts", &[])?.get(0)))?;
/// # Ok::<(), pgxkit::Error>(())
/// ```
#[derive(Clone, Copy)]
#[must_use = "a transaction builder does nothing until `run` or `begin`"]
pub struct TransactionBuilder<'c> {
    cluster: &'c Cluster,
    on_replica: bool,
    isolation: Option<IsolationLevel>,
    read_only: bool,
    deferrable: bool,
}

impl fmt::Debug for TransactionBuilder<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransactionBuilder")
            .field("on_replica", &self.on_replica)
            .field("isolation", &self.isolation)
            .field("read_only", &self.read_only)
            .field("deferrable", &self.deferrable)
            .finish_non_exhaustive()
    }
}

impl<'c> TransactionBuilder<'c> {
    pub(crate) fn on_primary(cluster: &'c Cluster) -> Self {
        TransactionBuilder {
            cluster,
            on_replica: false,
            isolation: None,
            read_only: false,
            deferrable: false,
        }
    }

    pub(crate) fn on_replica(cluster: &'c Cluster) -> Self {
        TransactionBuilder {
            cluster,
            on_replica: true,
            isolation: Some(IsolationLevel::RepeatableRead),
            read_only: true,
            deferrable: false,
        }
    }

    /// The isolation level. Defaults to the server's default on the
    /// primary, `REPEATABLE READ` on a replica.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let tx = cluster.build_transaction().isolation(pgxkit::IsolationLevel::Serializable).begin()?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn isolation(mut self, level: IsolationLevel) -> Self {
        self.isolation = Some(level);
        self
    }

    /// A read-only transaction: the server rejects any write. Defaults to
    /// `false` on the primary; always `true` on a replica.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let total: i64 = cluster.build_transaction().read_only(true).run(|tx| {
    ///     Ok::<_, pgxkit::Error>(tx.query_one("SELECT count(*) FROM orders", &[])?.get(0))
    /// })?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn read_only(mut self, yes: bool) -> Self {
        self.read_only = yes;
        self
    }

    /// `DEFERRABLE` (meaningful with `SERIALIZABLE READ ONLY`). Defaults to `false`.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// use pgxkit::IsolationLevel;
    /// let tx = cluster.build_transaction()
    ///     .isolation(IsolationLevel::Serializable)
    ///     .read_only(true)
    ///     .deferrable(true) // waits for a snapshot free of serialization failures
    ///     .begin()?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn deferrable(mut self, yes: bool) -> Self {
        self.deferrable = yes;
        self
    }

    /// Runs the transaction again, as `policy` says, when it fails with a
    /// retryable error (serialization failure, deadlock, checkout timeout)
    /// or a connection failure before `COMMIT` was sent: nothing of it can
    /// have committed then. A transaction whose `COMMIT` may have reached
    /// the server is never run again ([`ErrorKind::AmbiguousCommit`]). The
    /// closure's own errors are retried only when they hold such an error
    /// (see [`AsPgxkitError`]); it should only use `tx`: work it does
    /// elsewhere is not rolled back.
    ///
    /// ```no_run
    /// use pgxkit::{IsolationLevel, RetryPolicy};
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let policy = RetryPolicy::default();
    /// cluster.build_transaction().isolation(IsolationLevel::Serializable).retry(&policy).run(|tx| {
    ///     tx.execute("UPDATE seats SET taken = true WHERE id = (SELECT min(id) FROM seats WHERE NOT taken)", &[])?;
    ///     Ok::<_, pgxkit::Error>(())
    /// })?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn retry<'p>(self, policy: &'p RetryPolicy) -> RetryingTransaction<'c, 'p> {
        RetryingTransaction {
            builder: self,
            policy,
        }
    }

    /// Begins the transaction and returns its guard (see [`Transaction`]).
    /// Blocks to check out a connection and send `BEGIN`, bounded by the
    /// handle's deadline and the checkout timeout.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let tx = cluster.build_transaction().begin()?;
    /// tx.execute("DELETE FROM sessions WHERE expires < now()", &[])?;
    /// tx.commit()?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn begin(self) -> Result<Transaction<'c>> {
        let cluster = self.cluster;
        if self.on_replica {
            if !self.read_only {
                return Err(Error::new(ErrorKind::Unsupported)
                    .with_detail("read_only(false): a transaction on a replica cannot write"));
            }
            Transaction::begin(cluster, cluster.reader(None)?, Role::Replica, self)
        } else {
            let node = cluster.primary()?;
            let read_only = self.read_only;
            let begun = Transaction::begin(cluster, node, Role::Primary, self);
            cluster.after_write(node, &begun, read_only);
            begun
        }
    }

    /// Runs `f` in the transaction: commits when it returns `Ok`, rolls
    /// back when it returns `Err` (the caller's own error type, any `E:
    /// From<pgxkit::Error>`, which comes back unchanged) or panics (the
    /// panic then continues). A failed `BEGIN` or `COMMIT` comes back as
    /// `E::from(pgxkit::Error)`.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let id: i64 = cluster.build_transaction().run(|tx| {
    ///     Ok::<_, pgxkit::Error>(tx.query_one("INSERT INTO orders DEFAULT VALUES RETURNING id", &[])?.get(0))
    /// })?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn run<T, E: From<Error>>(
        self,
        f: impl FnOnce(&Transaction<'c>) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        run_transaction(self.begin()?, f)
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

/// A transaction that runs again on retryable failures, from
/// [`TransactionBuilder::retry`]; see there.
///
/// ```no_run
/// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
/// let policy = pgxkit::RetryPolicy::default();
/// let retrying: pgxkit::RetryingTransaction<'_, '_> = cluster.build_transaction().retry(&policy);
/// retrying.run(|tx| tx.execute("UPDATE counters SET n = n + 1", &[]))?;
/// # Ok::<(), pgxkit::Error>(())
/// ```
#[must_use = "a transaction builder does nothing until `run`"]
pub struct RetryingTransaction<'c, 'p> {
    builder: TransactionBuilder<'c>,
    policy: &'p RetryPolicy,
}

impl fmt::Debug for RetryingTransaction<'_, '_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryingTransaction")
            .field("builder", &self.builder)
            .field("policy", self.policy)
            .finish()
    }
}

impl<'c> RetryingTransaction<'c, '_> {
    /// Runs `f` in a transaction, and the whole transaction again (a new
    /// `BEGIN`, a new connection) as the policy says; returns the first
    /// commit's result or the last error. Blocks for the attempts and the
    /// backoff waits between them.
    ///
    /// ```no_run
    /// use pgxkit::RetryPolicy;
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let policy = RetryPolicy::default().max_retries(5);
    /// let moved = cluster.build_transaction().retry(&policy).run(|tx| {
    ///     tx.execute("UPDATE accounts SET balance = balance - 10 WHERE id = 1", &[])
    /// })?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn run<T, E: From<Error> + AsPgxkitError>(
        self,
        mut f: impl FnMut(&Transaction<'c>) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        let builder = self.builder;
        self.policy
            .run(|_| builder.run(&mut f), retryable_transaction)
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
/// let tx = cluster.build_transaction().begin()?;
/// tx.execute("UPDATE accounts SET balance = balance - 10 WHERE id = $1", &[&1i64])?;
/// tx.execute("UPDATE accounts SET balance = balance + 10 WHERE id = $1", &[&2i64])?;
/// tx.commit()?;
/// # Ok::<(), pgxkit::Error>(())
/// ```
pub struct Transaction<'c> {
    cluster: &'c Cluster,
    node: &'c Node,
    route: Role,
    conn: RefCell<Lease<'c>>,
    permit: Cell<Option<Permit<'c>>>,
    _in_flight: InFlight<'c>,
    started: Instant,
    read_only: bool,
    state: Cell<State>,
    savepoints: Cell<u32>,
    cursors: Cell<u32>,
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
    fn begin(
        cluster: &'c Cluster,
        node: &'c Node,
        route: Role,
        options: TransactionBuilder<'_>,
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
        let permit = node.gate.admit()?;
        let deadline = cluster.deadline();
        let begun = node.pool.checkout_until(deadline).and_then(|mut conn| {
            node.bounded(&mut conn, deadline, |c| {
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
            route,
            conn: RefCell::new(conn),
            permit: Cell::new(Some(permit)),
            _in_flight: in_flight,
            started: Instant::now(),
            read_only: options.read_only,
            state: Cell::new(State::Open),
            savepoints: Cell::new(0),
            cursors: Cell::new(0),
        })
    }

    /// The node the transaction runs on.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// cluster.replica().transaction(|tx| {
    ///     println!("snapshot from {}", tx.node());
    ///     Ok::<_, pgxkit::Error>(())
    /// })?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
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

    /// The connection, for one call: refused while another call (an open
    /// `with_client` closure) holds it.
    fn conn(&self) -> Result<std::cell::RefMut<'_, Lease<'c>>> {
        self.check_usable()?;
        self.conn.try_borrow_mut().map_err(|_| {
            Error::new(ErrorKind::TransactionState)
                .with_node(&self.node.info)
                .with_detail("the transaction is in use by another call")
        })
    }

    /// Books what a call left behind: a discarded connection, or a
    /// statement error (the server then refuses everything until rollback).
    fn settle<T>(&self, conn: &Lease<'_>, result: &Result<T>) {
        if conn.broken {
            self.state.set(State::Broken);
        } else if let Err(e) = result {
            if e.kind() != ErrorKind::Hook {
                self.state.set(State::Aborted);
            }
        }
    }

    fn op<'a>(&'a self, kind: OperationKind, sql: &'a str, params: Params<'a>) -> Op<'a> {
        Op {
            kind,
            route: self.route,
            node: &self.node.info,
            sql,
            params,
        }
    }

    /// One call in the transaction: hooks, deadline, state tracking.
    fn call<T>(
        &self,
        kind: OperationKind,
        sql: &str,
        params: Params<'_>,
        rows: impl Fn(&T) -> Option<u64>,
        op: impl FnOnce(&mut Lease<'c>, Option<Instant>) -> Result<T>,
    ) -> Result<T> {
        let mut conn = self.conn()?;
        let deadline = self.cluster.deadline();
        let result = hooks::around(
            &self.cluster.inner.hooks,
            self.op(kind, sql, params),
            rows,
            hooks::itself,
            || op(&mut conn, deadline),
        );
        self.settle(&conn, &result);
        if self.route == Role::Primary {
            self.cluster.after_write(self.node, &result, self.read_only);
        }
        result
    }

    /// A parameterised statement in the cluster's statement mode (cached by default).
    fn run_stmt(
        &self,
        kind: OperationKind,
        sql: &str,
        params: Params<'_>,
        call: Call,
    ) -> Result<Output> {
        let stmt = self.cluster.stmt((kind, self.route), sql, params, call);
        let rows = |out: &Output| Some(out.len());
        self.call(kind, sql, params, rows, |conn, deadline| {
            self.node.run_stmt(conn, deadline, &stmt)
        })
    }

    /// Runs a statement and returns the number of rows it affected.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// cluster.transaction(|tx| tx.execute("DELETE FROM carts WHERE user_id = $1", &[&7i64]))?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn execute(&self, sql: &str, params: Params<'_>) -> Result<u64> {
        self.run_stmt(OperationKind::Execute, sql, params, Call::Execute)
            .map(Output::count)
    }

    /// Runs a query and returns all rows.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let rows = cluster.transaction(|tx| tx.query("SELECT id FROM carts FOR UPDATE", &[]))?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn query(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>> {
        self.run_stmt(OperationKind::Query, sql, params, Call::Query)
            .map(Output::rows)
    }

    /// Runs a query that must return exactly one row.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let n: i64 = cluster.transaction(|tx| tx.query_one("SELECT count(*) FROM carts", &[]))?.get(0);
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn query_one(&self, sql: &str, params: Params<'_>) -> Result<Row> {
        let out = self.run_stmt(OperationKind::QueryOne, sql, params, Call::QueryOpt)?;
        exactly_one(out, self.node)
    }

    /// Runs a query that returns at most one row.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let cart = cluster.transaction(|tx| tx.query_opt("SELECT id FROM carts WHERE user_id = 7", &[]))?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn query_opt(&self, sql: &str, params: Params<'_>) -> Result<Option<Row>> {
        let out = self.run_stmt(OperationKind::QueryOpt, sql, params, Call::QueryOpt)?;
        at_most_one(out, self.node)
    }

    /// Streams a query's rows inside the transaction (its snapshot, its
    /// locks), in batches of 1,000 through a cursor of the transaction's
    /// own, closed when the iterator is dropped. The iterator borrows the
    /// transaction, so it cannot commit before the iterator is gone; other
    /// statements may run between batches. Hooks see the opening as
    /// `query_iter`.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// cluster.transaction(|tx| {
    ///     for row in tx.query_iter("SELECT id FROM jobs WHERE state = 'new' FOR UPDATE", &[])? {
    ///         let id: i64 = row?.get(0);
    ///         tx.execute("UPDATE jobs SET state = 'queued' WHERE id = $1", &[&id])?;
    ///     }
    ///     Ok::<_, pgxkit::Error>(())
    /// })?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn query_iter(&self, sql: &str, params: Params<'_>) -> Result<RowIter<'_>> {
        let n = self.cursors.get() + 1;
        self.cursors.set(n);
        let cursor = format!("pgxkit_rows_{n}");
        let declare = format!("DECLARE {cursor} NO SCROLL CURSOR FOR {sql}");
        let fetch = rows::fetch_sql(&cursor);
        let first = self.call(
            OperationKind::QueryIter,
            sql,
            params,
            |_: &Vec<Row>| None,
            |conn, deadline| {
                self.node.bounded(conn, deadline, |c| {
                    c.execute(declare.as_str(), params)?;
                    c.query(fetch.as_str(), &[])
                })
            },
        )?;
        Ok(RowIter::in_transaction(self, cursor, first))
    }

    /// One statement of a streaming iterator: deadline and state tracking,
    /// no hooks.
    fn cursor_step<T>(
        &self,
        op: impl FnOnce(&mut Conn) -> std::result::Result<T, postgres::Error>,
    ) -> Result<T> {
        let mut conn = self.conn()?;
        let result = self.node.bounded(&mut conn, self.cluster.deadline(), op);
        self.settle(&conn, &result);
        result
    }

    /// Runs statements separated by semicolons (simple protocol, no parameters).
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// cluster.transaction(|tx| tx.batch_execute("LOCK TABLE carts; DELETE FROM carts"))?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn batch_execute(&self, sql: &str) -> Result<()> {
        self.call(
            OperationKind::BatchExecute,
            sql,
            &[],
            |_| None,
            |conn, deadline| self.node.bounded(conn, deadline, |c| c.batch_execute(sql)),
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
        self.call(
            OperationKind::CopyIn,
            sql,
            &[],
            |n: &u64| Some(*n),
            |conn, deadline| {
                let mut failed = None;
                let result = self.node.bounded(conn, deadline, |c| {
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
        self.call(
            OperationKind::CopyOut,
            sql,
            &[],
            |_: &u64| None,
            |conn, deadline| {
                let mut failed = None;
                let result = self.node.bounded(conn, deadline, |c| {
                    crate::copy::copy_out(c, sql, &mut out, &mut failed)
                });
                crate::copy::outcome(result, failed, &self.node.info, "writing the output")
            },
        )
    }

    /// Lends the transaction's `postgres::Client` (`query_raw`,
    /// `simple_query`, a tool that takes a client), as
    /// [`Cluster::with_client`] does: the closure's error type is the
    /// caller's, and comes back unchanged. Do not commit or roll back
    /// through it. When the closure fails, one round trip tells whether the
    /// server aborted the transaction (then only a rollback is possible,
    /// as after any failed statement).
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// cluster.transaction(|tx| {
    ///     tx.with_client(|c| {
    ///         let n = c.simple_query("SELECT 1")?.len();
    ///         Ok::<_, pgxkit::Error>(n)
    ///     })
    /// })?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn with_client<T, E: From<Error>>(
        &self,
        f: impl FnOnce(&mut postgres::Client) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        let mut conn = self.conn()?;
        let deadline = self.cluster.deadline();
        let result = hooks::around(
            &self.cluster.inner.hooks,
            self.op(OperationKind::WithClient, "", &[]),
            |_| None,
            hooks::opaque,
            || self.node.lend_on(&mut conn, deadline, f),
        );
        if conn.broken {
            self.state.set(State::Broken);
        } else if result.is_err() && self.state.get() == State::Open {
            // The caller's error says nothing of the server's side: ask it.
            let probe = self
                .node
                .bounded(&mut conn, deadline, |c| c.batch_execute("SELECT 1"));
            self.settle(&conn, &probe);
        }
        result
    }

    /// Runs `f` inside a savepoint: released when `f` returns `Ok`, rolled
    /// back to (undoing only `f`'s work, and clearing an error inside it)
    /// when `f` returns `Err` (the caller's own error type), which is then
    /// returned unchanged.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// cluster.transaction(|tx| {
    ///     tx.execute("INSERT INTO orders (id) VALUES (1)", &[])?;
    ///     // A duplicate here undoes only the savepoint's work.
    ///     let _ = tx.savepoint(|sp| sp.execute("INSERT INTO audit (order_id) VALUES (1)", &[]));
    ///     Ok::<_, pgxkit::Error>(())
    /// })?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn savepoint<T, E: From<Error>>(
        &self,
        f: impl FnOnce(&Transaction<'c>) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
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
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let tx = cluster.build_transaction().begin()?;
    /// tx.execute("INSERT INTO audit (what) VALUES ('login')", &[])?;
    /// tx.commit()?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
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
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let tx = cluster.build_transaction().begin()?;
    /// tx.execute("DELETE FROM carts", &[])?;
    /// tx.rollback()?; // changed our mind
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
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
            .bounded(&mut conn, self.cluster.deadline(), |c| c.batch_execute(sql));
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

impl rows::InTransaction for Transaction<'_> {
    fn node_info(&self) -> &NodeInfo {
        &self.node.info
    }
    fn cursor_query(&self, sql: &str) -> Result<Vec<Row>> {
        self.cursor_step(|c| c.query(sql, &[]))
    }
    fn cursor_execute(&self, sql: &str) -> Result<()> {
        self.cursor_step(|c| c.batch_execute(sql))
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
    /// Runs `f` in a transaction on the primary: commits when it returns
    /// `Ok`, rolls back when it returns `Err` or panics (the panic then
    /// continues). `f` returns the caller's own error type (any `E:
    /// From<pgxkit::Error>`): an `Err` comes back unchanged after the
    /// rollback. For options, retries or a guard, see
    /// [`build_transaction`](Self::build_transaction).
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let id: i64 = cluster.transaction(|tx| {
    ///     let id: i64 = tx.query_one("INSERT INTO orders DEFAULT VALUES RETURNING id", &[])?.get(0);
    ///     tx.execute("INSERT INTO order_events (order_id, kind) VALUES ($1, 'created')", &[&id])?;
    ///     Ok::<_, pgxkit::Error>(id)
    /// })?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn transaction<T, E: From<Error>>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        self.build_transaction().run(f)
    }

    /// A builder for a transaction on the primary: isolation, read-only,
    /// deferrable, retries; then `run` or `begin`. See [`TransactionBuilder`].
    ///
    /// ```no_run
    /// use pgxkit::IsolationLevel;
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let tx = cluster.build_transaction().isolation(IsolationLevel::RepeatableRead).begin()?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn build_transaction(&self) -> TransactionBuilder<'_> {
        TransactionBuilder::on_primary(self)
    }
}

/// A failed transaction may run again when the error is retryable anyway,
/// or when it is a connection failure before `COMMIT` was sent: nothing of
/// the transaction can have committed then. Never after an ambiguous commit.
fn retryable_transaction(err: &Error) -> bool {
    err.is_retryable() || (err.is_connection_error() && err.kind() != ErrorKind::AmbiguousCommit)
}

fn run_transaction<'c, T, E: From<Error>>(
    tx: Transaction<'c>,
    f: impl FnOnce(&Transaction<'c>) -> std::result::Result<T, E>,
) -> std::result::Result<T, E> {
    match f(&tx) {
        Ok(value) => match tx.commit() {
            Ok(()) => Ok(value),
            Err(e) => Err(e.into()),
        },
        Err(e) => {
            if let Err(rollback) = tx.rollback() {
                log::warn!("rollback after an error failed: {rollback}");
            }
            Err(e)
        }
    }
}
