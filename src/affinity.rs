//! Connection affinity: a thread gets back the connection it used last.
//!
//! r2d2 hands out the most recently returned connection, so threads keep
//! trading connections, and each trade breaks a client-thread / server-backend
//! pairing the scheduler had settled (measured: a dedicated client per thread
//! ran up to 2x faster than the plain pool at 2 threads on 2 cores). Here a
//! healthy connection released while no thread is waiting is parked in the
//! releasing thread's stripe (see [`crate::stripes`]); the next checkout takes
//! its own parked connection from its stripe, else any parked one, else asks
//! r2d2. The common case locks only the thread's own stripe, so threads on
//! different cores do not trade a lock's cache line on every query.
//!
//! When a thread is waiting, released connections go back to r2d2, which
//! wakes the waiter: the fast path never keeps a connection from a waiter.
//! No wakeup is lost: a waiter registers, then looks at every stripe once
//! more; a parker pushes, then looks at the waiter count; with a `SeqCst`
//! fence between each side's two steps, at least one of them sees the other
//! (and a parker that sees a waiter hands a connection to r2d2). r2d2 still
//! owns the lifecycle (creation, maximum, lifetime, idle timeout, broken
//! connections): parked connections are handed back to it when they have sat
//! unused for a while, and at shutdown.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst, fence};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use r2d2::PooledConnection;

use crate::manager::Manager;
use crate::stripes::Striped;
use crate::sync::lock;

thread_local! {
    static THREAD: ThreadId = std::thread::current().id();
}

fn this_thread() -> ThreadId {
    THREAD.with(|id| *id)
}

struct Parked {
    owner: ThreadId,
    conn: PooledConnection<Manager>,
    since: Instant,
}

#[derive(Default)]
pub(crate) struct Parking {
    shards: Striped<Mutex<Vec<Parked>>>,
    waiters: AtomicUsize,
}

impl std::fmt::Debug for Parking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parking")
            .field("parked", &self.len())
            .field("waiters", &self.waiters.load(SeqCst))
            .finish()
    }
}

/// A registered waiter; deregisters on drop.
pub(crate) struct Waiting<'a>(&'a Parking);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiters.fetch_sub(1, SeqCst);
    }
}

/// From one stripe: `owner`'s most recently parked connection if given and
/// there, else the most recently parked one.
fn take_from(
    parked: &mut Vec<Parked>,
    owner: Option<ThreadId>,
) -> Option<PooledConnection<Manager>> {
    let i = owner
        .and_then(|me| parked.iter().rposition(|p| p.owner == me))
        .or_else(|| parked.len().checked_sub(1))?;
    Some(parked.swap_remove(i).conn)
}

impl Parking {
    /// This thread's parked connection, else the most recently parked one of
    /// its stripe, else one from another stripe; with none parked, registers
    /// the caller as waiting (it must then wait in r2d2, where released
    /// connections now go).
    #[inline]
    pub(crate) fn take(&self) -> Result<PooledConnection<Manager>, Waiting<'_>> {
        let (stripe, own) = self.shards.mine();
        // The guard must be gone before looking at the other stripes.
        let mine = take_from(&mut lock(own), Some(this_thread()));
        match mine {
            Some(conn) => Ok(conn),
            None => self.take_elsewhere(stripe),
        }
    }

    /// [`take`](Self::take) when this thread's stripe had nothing: out of
    /// line, so the common path stays a few cache lines of code.
    #[cold]
    #[inline(never)]
    fn take_elsewhere(&self, stripe: usize) -> Result<PooledConnection<Manager>, Waiting<'_>> {
        if let Some(conn) = self.any(stripe) {
            return Ok(conn);
        }
        self.waiters.fetch_add(1, SeqCst);
        let waiting = Waiting(self);
        fence(SeqCst);
        // A connection parked since the look above, by a thread that had not
        // yet seen this registration.
        match self.any(stripe) {
            Some(conn) => Ok(conn),
            None => Err(waiting),
        }
    }

    /// The most recently parked connection of the first stripe, from `from`
    /// on, that has one.
    fn any(&self, from: usize) -> Option<PooledConnection<Manager>> {
        self.shards
            .from(from)
            .find_map(|shard| take_from(&mut lock(shard), None))
    }

    /// Parks `conn` for this thread unless a thread is waiting; gives back a
    /// connection when one must go to r2d2 instead (drop it outside this
    /// call). `now` is when it was released.
    #[inline]
    pub(crate) fn park(
        &self,
        conn: PooledConnection<Manager>,
        now: Instant,
    ) -> Option<PooledConnection<Manager>> {
        if self.waiters.load(SeqCst) > 0 {
            return Some(conn);
        }
        let (_, own) = self.shards.mine();
        lock(own).push(Parked {
            owner: this_thread(),
            conn,
            since: now,
        });
        fence(SeqCst);
        if self.waiters.load(SeqCst) > 0 {
            // A thread began waiting meanwhile and may have looked before
            // the push: one connection goes to r2d2, which wakes it.
            return take_from(&mut lock(own), None);
        }
        None
    }

    /// Takes the connections parked for longer than `age` (all of them with
    /// `Duration::ZERO`), to be handed back to r2d2 by dropping them.
    pub(crate) fn take_older_than(&self, age: Duration) -> Vec<PooledConnection<Manager>> {
        let now = Instant::now();
        let mut old = Vec::new();
        for shard in self.shards.from(0) {
            let mut parked = lock(shard);
            let (aged, young): (Vec<Parked>, Vec<Parked>) = std::mem::take(&mut *parked)
                .into_iter()
                .partition(|p| now.saturating_duration_since(p.since) >= age);
            *parked = young;
            old.extend(aged.into_iter().map(|p| p.conn));
        }
        old
    }

    /// How many connections are parked.
    pub(crate) fn len(&self) -> usize {
        self.shards.from(0).map(|shard| lock(shard).len()).sum()
    }
}
