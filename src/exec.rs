//! Running statements on a node: admission through its breaker, a
//! checkout, the statement bounded by its deadline (cancelled on the
//! server and its socket shut when it passes), driver errors mapped and
//! a broken connection discarded, the outcome booked on the breaker.

use std::time::Instant;

use crate::deadline::Armed;
use crate::error::{Error, ErrorKind, Result};
use crate::hooks::OperationKind;
use crate::info::Role;
use crate::node::{Node, Stmt};
use crate::plans::Capture;
use crate::pool::manager::Conn;
use crate::pool::{Lease, Pool};
use crate::statements::{self, Call, Output, Params, StatementMode};

impl Node {
    /// One call on the node, the steps every operation that takes a
    /// connection of its own goes through: admission through the breaker,
    /// a checkout within `deadline`, `op` on the lease, and the outcome
    /// booked on the breaker (a connection-level failure counts against
    /// the node; any other outcome is the node answering). `lend` books
    /// its own (a caller's error says nothing of the node), and a
    /// transaction holds its admission until it ends.
    #[inline]
    pub(crate) fn call<'n, T>(
        &'n self,
        deadline: Option<Instant>,
        op: impl FnOnce(Lease<'n>) -> Result<T>,
    ) -> Result<T> {
        self.call_with(|pool| pool.checkout_until(deadline), op)
    }

    /// [`call`](Self::call) whose op is `op` on the connection, bounded by
    /// the same deadline ([`bounded`](Self::bounded)): one driver call.
    #[inline]
    pub(crate) fn call_bounded<T>(
        &self,
        deadline: Option<Instant>,
        op: impl FnOnce(&mut Conn) -> std::result::Result<T, postgres::Error>,
    ) -> Result<T> {
        self.call(deadline, |mut lease| self.bounded(&mut lease, deadline, op))
    }

    /// [`call`](Self::call) with a checkout of the caller's (the health
    /// check's is bounded by its own timeout, not a deadline).
    #[inline]
    pub(crate) fn call_with<'n, T>(
        &'n self,
        checkout: impl FnOnce(&'n Pool) -> Result<Lease<'n>>,
        op: impl FnOnce(Lease<'n>) -> Result<T>,
    ) -> Result<T> {
        let permit = self.gate.admit()?;
        let result = checkout(&self.pool).and_then(op);
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
        let permit = self.gate.admit()?;
        let mut conn = match self.pool.checkout_until(deadline) {
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
            return result.map_err(|_| self.timed_out().into());
        }
        if conn.client.is_closed() {
            conn.broken = true;
        }
        result
    }

    /// Runs `op` on a checked-out connection, bounded by `deadline`: when it
    /// passes, the statement is cancelled on the server and the call returns
    /// `Timeout`; the connection, whose state is then uncertain, is discarded.
    /// A driver error is mapped (and a connection it says is gone marked
    /// broken). `op` gets the whole pooled connection, which derefs to its
    /// `postgres::Client`.
    pub(crate) fn bounded<T>(
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
        self.timed_out().with_source(err)
    }

    /// `Timeout`: the watchdog cancelled the statement at its deadline.
    #[cold]
    #[inline(never)]
    fn timed_out(&self) -> Error {
        Error::new(ErrorKind::Timeout)
            .with_node(&self.info)
            .with_detail("deadline passed; the statement was cancelled on the server")
    }

    /// Runs one parameterised statement on a checked-out connection,
    /// bounded by `deadline`; offers a slow one to plan capture.
    pub(crate) fn run_stmt(
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
                let (output, statement, hit) = self.bounded(conn, deadline, |c| {
                    let Conn {
                        client, statements, ..
                    } = c;
                    statements.run(client, sql, |client, statement| {
                        call.run(client, statement, params)
                    })
                })?;
                self.pool.count_statement(conn, hit);
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
            return self.bounded(conn, deadline, |c| call.run_unnamed(c, sql, params, &types));
        }
        if !params.is_empty() {
            return Err(Error::new(ErrorKind::Unsupported)
                .with_detail("the simple protocol takes no parameters ($1, ...)"));
        }
        match call {
            Call::Execute => self.bounded(conn, deadline, |c| statements::execute_simple(c, sql)),
            Call::Query | Call::QueryOpt => Err(Error::new(ErrorKind::Unsupported).with_detail(
                "the simple protocol returns text rows, not postgres::Row; \
                 use with_client(|c| c.simple_query(..))",
            )),
        }
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
}
