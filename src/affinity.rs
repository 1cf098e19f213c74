//! Connection affinity: a thread gets back the connection it used last.
//!
//! r2d2 hands out the most recently returned connection, so threads keep
//! trading connections, and each trade breaks a client-thread / server-backend
//! pairing the scheduler had settled (measured: a dedicated client per thread
//! ran up to 2x faster than the plain pool at 2 threads on 2 cores). Here a
//! healthy connection released while no thread is waiting is parked for its
//! thread; the next checkout takes its own parked connection, else any parked
//! one, else asks r2d2. When a thread is waiting, released connections go
//! straight back to r2d2, which wakes the waiter: the fast path never keeps a
//! connection from a waiter. Registering as a waiter and parking happen under
//! one lock, so no wakeup is lost. r2d2 still owns the lifecycle (creation,
//! maximum, lifetime, idle timeout, broken connections): parked connections
//! are handed back to it when they have sat unused for a while, and at shutdown.

use std::sync::Mutex;
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use r2d2::PooledConnection;

use crate::manager::Manager;
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
struct State {
    parked: Vec<Parked>,
    waiters: usize,
}

#[derive(Default)]
pub(crate) struct Parking {
    state: Mutex<State>,
}

impl std::fmt::Debug for Parking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = lock(&self.state);
        f.debug_struct("Parking")
            .field("parked", &state.parked.len())
            .field("waiters", &state.waiters)
            .finish()
    }
}

/// A registered waiter; deregisters on drop.
pub(crate) struct Waiting<'a>(&'a Parking);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut state = lock(&self.0.state);
        state.waiters = state.waiters.saturating_sub(1);
    }
}

impl Parking {
    /// This thread's parked connection, else the most recently parked one;
    /// with none parked, registers the caller as waiting (it must then wait
    /// in r2d2, where released connections now go).
    pub(crate) fn take(&self) -> Result<PooledConnection<Manager>, Waiting<'_>> {
        let me = this_thread();
        let mut state = lock(&self.state);
        let index = state
            .parked
            .iter()
            .rposition(|p| p.owner == me)
            .or_else(|| state.parked.len().checked_sub(1));
        match index {
            Some(i) => Ok(state.parked.swap_remove(i).conn),
            None => {
                state.waiters += 1;
                Err(Waiting(self))
            }
        }
    }

    /// Parks `conn` for this thread unless a thread is waiting; gives it back
    /// when it must go to r2d2 instead (drop it outside this call).
    pub(crate) fn park(
        &self,
        conn: PooledConnection<Manager>,
    ) -> Option<PooledConnection<Manager>> {
        let mut state = lock(&self.state);
        if state.waiters > 0 {
            return Some(conn);
        }
        state.parked.push(Parked {
            owner: this_thread(),
            conn,
            since: Instant::now(),
        });
        None
    }

    /// Takes the connections parked for longer than `age` (all of them with
    /// `Duration::ZERO`), to be handed back to r2d2 by dropping them.
    pub(crate) fn take_older_than(&self, age: Duration) -> Vec<PooledConnection<Manager>> {
        let mut state = lock(&self.state);
        let now = Instant::now();
        let (old, young): (Vec<Parked>, Vec<Parked>) = std::mem::take(&mut state.parked)
            .into_iter()
            .partition(|p| now.saturating_duration_since(p.since) >= age);
        state.parked = young;
        old.into_iter().map(|p| p.conn).collect()
    }

    /// How many connections are parked.
    pub(crate) fn len(&self) -> usize {
        lock(&self.state).parked.len()
    }
}
