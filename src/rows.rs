//! Streaming rows: a query whose result is read in batches through a
//! server-side cursor, so memory holds one batch whatever the result's size.
//!
//! On its own the iterator owns its pooled connection (no borrow of the
//! driver's client outlives a call), runs `BEGIN`, `DECLARE ... NO SCROLL
//! CURSOR` and one `FETCH` per [`BATCH`] rows, and on drop closes the
//! cursor and commits, so the connection goes back clean; if that fails (or
//! a statement failed on the connection) the connection is discarded
//! instead. Inside a transaction it declares a cursor of the transaction
//! and closes it on drop.

use std::collections::VecDeque;
use std::time::Instant;

use postgres::Row;

use crate::error::Result;
use crate::info::NodeInfo;
use crate::node::Node;
use crate::pool::Lease;
use crate::shutdown::InFlight;

/// A transaction as its cursors see it (a trait object, so the iterator
/// need not name the transaction's own lifetime).
pub(crate) trait InTransaction {
    /// The transaction's node.
    fn node_info(&self) -> &NodeInfo;
    /// One statement of the cursor, bounded by the transaction's deadline,
    /// its failure booked on the transaction (no hooks).
    fn cursor_query(&self, sql: &str) -> Result<Vec<Row>>;
    /// Like `cursor_query`, without rows.
    fn cursor_execute(&self, sql: &str) -> Result<()>;
}

/// Rows fetched per round trip.
pub(crate) const BATCH: usize = 1_000;

/// The cursor of an iterator with a connection of its own.
const CURSOR: &str = "pgxkit_rows";

/// `FETCH` of the next batch from `cursor`.
pub(crate) fn fetch_sql(cursor: &str) -> String {
    format!("FETCH FORWARD {BATCH} FROM {cursor}")
}

/// Rows of a `query_iter` ([`Cluster::query_iter`](crate::Cluster::query_iter),
/// [`ReplicaHandle::query_iter`](crate::ReplicaHandle::query_iter),
/// [`Transaction::query_iter`](crate::Transaction::query_iter)), read as they are asked for, 1,000 per
/// round trip. Holds its connection (and counts as in flight for
/// `shutdown`) until dropped; each round trip is bounded by the handle's
/// deadline. After an error the iterator ends.
///
/// ```no_run
/// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
/// let mut total = 0i64;
/// for row in cluster.query_iter("SELECT amount FROM payments WHERE day = $1", &[&"2026-12-01"])? {
///     let amount: i64 = row?.get(0);
///     total += amount;
/// }
/// # Ok::<(), pgxkit::Error>(())
/// ```
#[must_use = "rows are fetched only as the iterator is advanced"]
pub struct RowIter<'c> {
    source: Source<'c>,
    fetch: String,
    buffer: VecDeque<Row>,
    /// The cursor is exhausted (or an error ended the iteration).
    done: bool,
}

/// Where the rows come from.
enum Source<'c> {
    /// A pooled connection of the iterator's own, in a transaction of its
    /// own. Dropped in this order: the lease goes back before the
    /// in-flight count ends (see `Drop`).
    Pool {
        lease: Option<Lease<'c>>,
        node: &'c Node,
        deadline: Option<Instant>,
        _in_flight: InFlight<'c>,
    },
    /// A cursor of a caller's transaction.
    Transaction {
        tx: &'c dyn InTransaction,
        cursor: String,
    },
}

impl std::fmt::Debug for RowIter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let node = match &self.source {
            Source::Pool { node, .. } => &node.info,
            Source::Transaction { tx, .. } => tx.node_info(),
        };
        f.debug_struct("RowIter")
            .field("node", node)
            .field("buffered", &self.buffer.len())
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl<'c> RowIter<'c> {
    /// Opens the cursor on `node` and fetches the first batch.
    pub(crate) fn open(
        node: &'c Node,
        in_flight: InFlight<'c>,
        deadline: Option<Instant>,
        sql: &str,
        params: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Result<RowIter<'c>> {
        let declare = format!("DECLARE {CURSOR} NO SCROLL CURSOR FOR {sql}");
        let lease = node.call(deadline, |mut lease| {
            let opened = node.bounded(&mut lease, deadline, |c| {
                c.batch_execute("BEGIN")?;
                c.execute(declare.as_str(), params)
            });
            match opened {
                Ok(_) => Ok(lease),
                Err(e) => {
                    // The transaction may be open: the connection is not reused.
                    lease.broken = true;
                    Err(e)
                }
            }
        })?;
        let mut rows = RowIter {
            source: Source::Pool {
                lease: Some(lease),
                node,
                deadline,
                _in_flight: in_flight,
            },
            fetch: fetch_sql(CURSOR),
            buffer: VecDeque::new(),
            done: false,
        };
        rows.fetch()?;
        Ok(rows)
    }

    /// An iterator over `cursor` of `tx`, already declared, whose first
    /// batch is `first`.
    pub(crate) fn in_transaction(
        tx: &'c dyn InTransaction,
        cursor: String,
        first: Vec<Row>,
    ) -> RowIter<'c> {
        RowIter {
            fetch: fetch_sql(&cursor),
            source: Source::Transaction { tx, cursor },
            done: first.len() < BATCH,
            buffer: first.into(),
        }
    }

    /// One `FETCH` of the next batch.
    fn fetch(&mut self) -> Result<()> {
        let fetch = self.fetch.as_str();
        let fetched = match &mut self.source {
            Source::Pool {
                lease: Some(lease),
                node,
                deadline,
                ..
            } => {
                let fetched = node.bounded(lease, *deadline, |c| c.query(fetch, &[]));
                if fetched.is_err() {
                    lease.broken = true;
                }
                fetched
            }
            Source::Pool { lease: None, .. } => Ok(Vec::new()),
            Source::Transaction { tx, .. } => tx.cursor_query(fetch),
        };
        match fetched {
            Ok(rows) => {
                self.done = rows.len() < BATCH;
                self.buffer.extend(rows);
                Ok(())
            }
            Err(e) => {
                self.done = true;
                Err(e)
            }
        }
    }
}

impl Iterator for RowIter<'_> {
    type Item = Result<Row>;

    fn next(&mut self) -> Option<Result<Row>> {
        if let Some(row) = self.buffer.pop_front() {
            return Some(Ok(row));
        }
        if self.done {
            return None;
        }
        match self.fetch() {
            Ok(()) => self.buffer.pop_front().map(Ok),
            Err(e) => Some(Err(e)),
        }
    }
}

impl Drop for RowIter<'_> {
    fn drop(&mut self) {
        match &mut self.source {
            Source::Pool {
                lease,
                node,
                deadline,
                ..
            } => {
                let Some(mut lease) = lease.take() else {
                    return;
                };
                if lease.broken {
                    return;
                }
                // Clean: the cursor closed and the transaction ended, within
                // the deadline; otherwise the connection is discarded.
                let closed = node.bounded(&mut lease, *deadline, |c| {
                    c.batch_execute(&format!("CLOSE {CURSOR}; COMMIT"))
                });
                if closed.is_err() {
                    lease.broken = true;
                }
            }
            Source::Transaction { tx, cursor } => {
                // A failure is the transaction's to report (it is then
                // aborted or broken, and its commit says so).
                if let Err(e) = tx.cursor_execute(&format!("CLOSE {cursor}")) {
                    log::debug!("closing a cursor of {}: {e}", tx.node_info());
                }
            }
        }
    }
}
