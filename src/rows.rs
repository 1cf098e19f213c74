//! Streaming rows: a query whose result is read in batches through a
//! server-side cursor, so memory holds one batch whatever the result's size.
//!
//! The iterator owns its pooled connection (no borrow of the driver's
//! client outlives a call), runs `BEGIN`, `DECLARE ... NO SCROLL CURSOR`
//! and one `FETCH` per [`BATCH`] rows, and on drop closes the cursor and
//! commits, so the connection goes back clean; if that fails (or a statement
//! failed on the connection) the connection is discarded instead.

use std::collections::VecDeque;
use std::time::Instant;

use postgres::Row;

use crate::error::Result;
use crate::node::{Lease, Node};
use crate::shutdown::InFlight;

/// Rows fetched per round trip.
pub(crate) const BATCH: usize = 1_000;

const CURSOR: &str = "pgxkit_rows";

/// Rows of [`Cluster::query_iter`](crate::Cluster::query_iter), read as
/// they are asked for, 1,000 per round trip. Holds a pooled
/// connection (and counts as in flight for `shutdown`) until dropped; each
/// round trip is bounded by the handle's deadline. After an error the
/// iterator ends.
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
    // Dropped in this order: the lease goes back before the in-flight count
    // ends (see `Drop`).
    lease: Option<Lease<'c>>,
    node: &'c Node,
    deadline: Option<Instant>,
    buffer: VecDeque<Row>,
    /// The cursor is exhausted (or an error ended the iteration).
    done: bool,
    _in_flight: InFlight<'c>,
}

impl std::fmt::Debug for RowIter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RowIter")
            .field("node", &self.node.info)
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
        let permit = node.admit()?;
        let lease = node.checkout_until(deadline);
        let mut lease = match lease {
            Ok(lease) => lease,
            Err(e) => {
                permit.finish_error(&e);
                return Err(e);
            }
        };
        let declare = format!("DECLARE {CURSOR} NO SCROLL CURSOR FOR {sql}");
        let opened = node.guarded(&mut lease, deadline, |c| {
            c.batch_execute("BEGIN")?;
            c.execute(declare.as_str(), params)
        });
        permit.finish(&opened);
        if let Err(e) = opened {
            // The transaction may be open: the connection is not reused.
            lease.broken = true;
            return Err(e);
        }
        let mut rows = RowIter {
            lease: Some(lease),
            node,
            deadline,
            buffer: VecDeque::new(),
            done: false,
            _in_flight: in_flight,
        };
        rows.fetch()?;
        Ok(rows)
    }

    /// One `FETCH` of the next batch.
    fn fetch(&mut self) -> Result<()> {
        let Some(lease) = self.lease.as_mut() else {
            self.done = true;
            return Ok(());
        };
        let fetch = format!("FETCH FORWARD {BATCH} FROM {CURSOR}");
        match self
            .node
            .guarded(lease, self.deadline, |c| c.query(fetch.as_str(), &[]))
        {
            Ok(rows) => {
                self.done = rows.len() < BATCH;
                self.buffer.extend(rows);
                Ok(())
            }
            Err(e) => {
                self.done = true;
                lease.broken = true;
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
        let Some(mut lease) = self.lease.take() else {
            return;
        };
        if lease.broken {
            return;
        }
        // Clean: the cursor closed and the transaction ended, within the
        // deadline; otherwise the connection is discarded.
        let closed = self.node.guarded(&mut lease, self.deadline, |c| {
            c.batch_execute(&format!("CLOSE {CURSOR}; COMMIT"))
        });
        if closed.is_err() {
            lease.broken = true;
        }
    }
}
