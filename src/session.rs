//! Read-your-writes: a [`Session`] remembers the primary's WAL position
//! after each of its writes, and sends its reads only to a replica that has
//! replayed that far (known from the health monitor or a replica's own
//! answer), waiting for one up to a bound, else to the primary.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use postgres::Row;

use crate::cluster::{Cluster, all_rows, at_most_one, exactly_one, opt_count, row_count};
use crate::error::{Error, ErrorKind, Result};
use crate::hooks::OperationKind;
use crate::info::Role;
use crate::node::Node;
use crate::statements::{Call, Output, Params};
use crate::tx::Transaction;

/// `Session::position` before any write: reads go anywhere.
const NOTHING_WRITTEN: u64 = 0;
/// `Session::position` after a write whose position could not be read:
/// reads go to the primary until the next write's position is known.
const UNKNOWN: u64 = u64::MAX;

/// The WAL position a committed write reached: the primary's insert
/// position right after it, which is at or past the write's commit record.
const POSITION_SQL: &str = "SELECT pg_current_wal_insert_lsn()";

/// How often a replica is asked again while a read waits for it.
const POLL: Duration = Duration::from_millis(2);

/// A caller's view of the cluster that reads its own writes: after each
/// write through it, its reads go only to a replica that has replayed that
/// write (or to the primary), from [`Cluster::session`].
///
/// After a write (or a committed transaction) the session remembers the
/// primary's WAL position (one extra round trip on the primary). A read
/// then goes to an eligible replica the health monitor (or an earlier
/// read) already saw at or past that position; else the replica whose turn
/// it is is asked (`pg_last_wal_replay_lsn()`, one round trip), and asked
/// again every 2 ms until [`wait`](Self::wait) passes (zero by default:
/// no waiting); else the read goes to the primary. Every read checks the
/// replica it is sent to: one replica having caught up says nothing of
/// another. Before any write, reads are the cluster's ordinary reads.
///
/// The position travels as a [`token`](Self::token) (a web request after a
/// redirect, another process): [`Cluster::session_from_token`] resumes it.
/// A session is `Send + Sync`; the position only moves forward.
///
/// ```no_run
/// use std::time::Duration;
/// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
/// let session = cluster.session().wait(Duration::from_millis(50));
/// session.execute("UPDATE users SET name = $1 WHERE id = $2", &[&"ada", &7i64])?;
/// let name: String = session.query_one("SELECT name FROM users WHERE id = $1", &[&7i64])?.get(0);
/// assert_eq!(name, "ada"); // never an older row, whichever node answered
/// # Ok::<(), pgxkit::Error>(())
/// ```
pub struct Session<'c> {
    cluster: &'c Cluster,
    position: AtomicU64,
    wait: Duration,
}

impl fmt::Debug for Session<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("token", &self.token())
            .field("wait", &self.wait)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// A new [`Session`], with nothing written yet.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let session = cluster.session();
    /// session.execute("INSERT INTO events (kind) VALUES ('login')", &[])?;
    /// let n: i64 = session.query_one("SELECT count(*) FROM events", &[])?.get(0);
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn session(&self) -> Session<'_> {
        Session {
            cluster: self,
            position: AtomicU64::new(NOTHING_WRITTEN),
            wait: Duration::ZERO,
        }
    }

    /// A [`Session`] resumed from a [`token`](Session::token) (a WAL
    /// position, `X/Y` in hexadecimal, as PostgreSQL prints an `pg_lsn`).
    ///
    /// # Errors
    /// [`ErrorKind::Config`] when `token` is not a WAL position.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// # let cookie = String::from("0/16B3748");
    /// let session = cluster.session_from_token(&cookie)?;
    /// let rows = session.query("SELECT * FROM orders WHERE user_id = $1", &[&7i64])?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn session_from_token(&self, token: &str) -> Result<Session<'_>> {
        let position = crate::lsn::parse(token).ok_or_else(|| {
            Error::config("session token: not a WAL position (expected X/Y, in hexadecimal)")
        })?;
        let session = self.session();
        session.position.store(position.min(UNKNOWN - 1), Relaxed);
        Ok(session)
    }
}

impl<'c> Session<'c> {
    /// How long a read may wait for a replica to replay the session's last
    /// write before it goes to the primary. Defaults to zero (no waiting).
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let session = cluster.session().wait(Duration::from_millis(20));
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    #[must_use]
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// The session's position as a string to carry elsewhere (a cookie, a
    /// header), for [`Cluster::session_from_token`]; `None` before its
    /// first write, or while its last write's position is unknown.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let session = cluster.session();
    /// session.execute("INSERT INTO carts (user_id) VALUES (7)", &[])?;
    /// let token = session.token().expect("a write was made");
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn token(&self) -> Option<String> {
        match self.position.load(Relaxed) {
            NOTHING_WRITTEN | UNKNOWN => None,
            p => Some(crate::lsn::format(p)),
        }
    }

    /// Runs a statement on the primary (as [`Cluster::execute`]) and
    /// remembers its position.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let session = cluster.session();
    /// session.execute("UPDATE users SET active = true WHERE id = $1", &[&7i64])?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn execute(&self, sql: &str, params: Params<'_>) -> Result<u64> {
        let n = self.cluster.execute(sql, params)?;
        self.record_write();
        Ok(n)
    }

    /// Runs `f` in a transaction on the primary (as
    /// [`Cluster::transaction`]); once it committed, remembers its position.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let session = cluster.session();
    /// let id: i64 = session.transaction(|tx| {
    ///     Ok::<_, pgxkit::Error>(tx.query_one("INSERT INTO orders DEFAULT VALUES RETURNING id", &[])?.get(0))
    /// })?;
    /// let order = session.query_one("SELECT * FROM orders WHERE id = $1", &[&id])?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn transaction<T, E: From<Error>>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        let value = self.cluster.transaction(f)?;
        self.record_write();
        Ok(value)
    }

    /// Remembers the primary's position now, for a write made some other
    /// way (`cluster.with_client`, another handle): the session's reads
    /// then see it. A position that cannot be read makes the reads go to
    /// the primary until a later one can.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let session = cluster.session();
    /// cluster.copy_in("COPY items FROM STDIN", &b"1\n2\n"[..])?;
    /// session.record_write();
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn record_write(&self) {
        match self.primary_position() {
            Ok(p) => {
                // Later positions include earlier ones; an unknown one is
                // replaced by the first known one after it.
                let _ = self.position.fetch_update(Relaxed, Relaxed, |old| {
                    (old == UNKNOWN || p > old).then_some(p)
                });
            }
            Err(e) => {
                log::warn!(
                    "read-your-writes: cannot read the primary's WAL position ({e}); this session reads from the primary until it can"
                );
                self.position.store(UNKNOWN, Relaxed);
            }
        }
    }

    fn primary_position(&self) -> Result<u64> {
        let primary = self.cluster.primary()?;
        let deadline = self.cluster.deadline();
        let text = primary.call_bounded(deadline, |c| {
            let messages = c.simple_query(POSITION_SQL)?;
            Ok(messages.iter().find_map(|m| match m {
                postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
                _ => None,
            }))
        })?;
        text.as_deref().and_then(crate::lsn::parse).ok_or_else(|| {
            Error::new(ErrorKind::Db)
                .with_node(&primary.info)
                .with_detail("pg_current_wal_insert_lsn() gave no position")
        })
    }

    /// Runs a query that sees the session's writes; returns all rows.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let session = cluster.session();
    /// let rows = session.query("SELECT id FROM orders WHERE user_id = $1", &[&7i64])?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn query(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>> {
        self.read(
            OperationKind::Query,
            sql,
            params,
            Call::Query,
            row_count,
            all_rows,
        )
    }

    /// Runs a query that sees the session's writes and must return exactly
    /// one row (as [`Cluster::query_one`]).
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let session = cluster.session();
    /// let n: i64 = session.query_one("SELECT count(*) FROM orders", &[])?.get(0);
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn query_one(&self, sql: &str, params: Params<'_>) -> Result<Row> {
        self.read(
            OperationKind::QueryOne,
            sql,
            params,
            Call::QueryOpt,
            |_| Some(1),
            exactly_one,
        )
    }

    /// Runs a query that sees the session's writes and returns at most one row.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let session = cluster.session();
    /// let row = session.query_opt("SELECT name FROM users WHERE id = $1", &[&7i64])?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn query_opt(&self, sql: &str, params: Params<'_>) -> Result<Option<Row>> {
        self.read(
            OperationKind::QueryOpt,
            sql,
            params,
            Call::QueryOpt,
            opt_count,
            at_most_one,
        )
    }

    fn read<T>(
        &self,
        kind: OperationKind,
        sql: &str,
        params: Params<'_>,
        call: Call,
        rows: impl Fn(&T) -> Option<u64>,
        done: impl Fn(Output, &Node) -> Result<T>,
    ) -> Result<T> {
        let position = self.position.load(Relaxed);
        if position == NOTHING_WRITTEN {
            return self
                .cluster
                .routed((kind, Role::Replica), sql, params, call, rows, done);
        }
        if position != UNKNOWN {
            if let Some(node) = self.caught_up(position) {
                return self.cluster.routed_on(
                    node,
                    (kind, Role::Replica),
                    sql,
                    params,
                    call,
                    rows,
                    done,
                );
            }
        }
        self.cluster
            .routed((kind, Role::Primary), sql, params, call, rows, done)
    }

    /// A replica that has replayed `position`: one the monitor (or an
    /// earlier read) saw there, else the one whose turn it is, if it gets
    /// there within the session's wait.
    fn caught_up(&self, position: u64) -> Option<&'c Node> {
        let cluster = self.cluster;
        if let Some(node) = cluster.replica_where(|n| n.replayed() >= position) {
            return Some(node);
        }
        let node = cluster.replica_where(|_| true)?;
        let until = Instant::now() + self.wait;
        let deadline = cluster.deadline().map_or(until, |d| d.min(until));
        let reached = node.call_bounded(cluster.deadline(), |c| {
            loop {
                let messages = c.simple_query("SELECT pg_last_wal_replay_lsn()")?;
                let replayed = messages.iter().find_map(|m| match m {
                    postgres::SimpleQueryMessage::Row(row) => {
                        row.get(0).and_then(crate::lsn::parse)
                    }
                    _ => None,
                });
                if let Some(r) = replayed {
                    node.saw_replayed(r);
                    if r >= position {
                        return Ok(true);
                    }
                }
                if Instant::now() + POLL > deadline {
                    return Ok(false);
                }
                std::thread::sleep(POLL);
            }
        });
        matches!(reached, Ok(true)).then_some(node)
    }
}
