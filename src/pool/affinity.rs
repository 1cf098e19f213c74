//! Connection affinity: a thread gets back the connection it used last.
//!
//! r2d2 hands out the most recently returned connection, so threads keep
//! trading connections, and each trade breaks a client-thread / server-backend
//! pairing the scheduler had settled (measured: a dedicated client per thread
//! ran up to 2x faster than the plain pool at 2 threads on 2 cores). Here a
//! healthy connection released while no thread is waiting is parked in the
//! releasing thread's stripe (see [`crate::stripes`]); the next checkout takes
//! its own parked connection from its stripe, else an idle one from r2d2,
//! else another thread's parked one. The common case locks only the
//! thread's own stripe, so threads on different cores do not trade a lock's
//! cache line on every query.
//!
//! A checkout that finds nothing while the pool can open another connection
//! waits for that one (a grower), as Go's pgxpool does, so a pool filling up
//! does not pass connections from thread to thread. Otherwise (the pool
//! full, or the latest connect failed) it registers as a waiter: released
//! connections then go back to r2d2, which wakes the waiter, so the fast
//! path never keeps a connection from a waiter.
//! No wakeup is lost: a waiter registers, then looks at every stripe once
//! more, taking each stripe's lock; a parker pushes and looks at the waiter
//! count under its stripe's lock. The lock orders the two: either the
//! waiter's look comes after the push and finds it, or it came before, and
//! then the registration that preceded it is seen by the parker (which hands
//! a connection to r2d2). r2d2 still
//! owns the lifecycle (creation, maximum, lifetime, idle timeout, broken
//! connections): parked connections are handed back to it when they have sat
//! unused for a while, and at shutdown.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use crate::stripes::Striped;
use crate::sync::lock;

thread_local! {
    static THREAD: ThreadId = std::thread::current().id();
}

fn this_thread() -> ThreadId {
    THREAD.with(|id| *id)
}

/// Points of the waiter/parker handshake where a test can run the other
/// side, to check each interleaving deterministically.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// A taker found nothing and is about to register as a waiter.
    TakerFoundNothing,
    /// A parker saw no waiter and is about to push.
    ParkerSawNoWaiter,
}

/// A test's hook, run at each [`Step`] on its thread.
#[cfg(test)]
type Hook = Box<dyn FnMut(Step)>;

#[cfg(test)]
thread_local! {
    static BETWEEN: std::cell::RefCell<Option<Hook>> = const { std::cell::RefCell::new(None) };
}

/// Runs the test's hook at `step` (nothing outside tests). The hook is
/// taken out while it runs, so calls it makes do not run it again.
#[inline(always)]
fn between(step: Step) {
    #[cfg(test)]
    {
        let hook = BETWEEN.with(|h| h.borrow_mut().take());
        if let Some(mut hook) = hook {
            hook(step);
            BETWEEN.with(|h| *h.borrow_mut() = Some(hook));
        }
    }
    #[cfg(not(test))]
    let _ = step;
}

struct Parked<C> {
    owner: ThreadId,
    conn: C,
    since: Instant,
}

/// Parked connections of type `C` (r2d2's `PooledConnection` in the pool;
/// generic so the handshake can be tested without a server).
pub(crate) struct Parking<C> {
    shards: Striped<Mutex<Shard<C>>>,
    waiters: AtomicUsize,
    /// Checkouts waiting for a connection they made the pool open.
    growers: AtomicUsize,
}

impl<C> Default for Parking<C> {
    fn default() -> Self {
        Parking {
            shards: Striped::default(),
            waiters: AtomicUsize::new(0),
            growers: AtomicUsize::new(0),
        }
    }
}

impl<C> std::fmt::Debug for Parking<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parking")
            .field("parked", &self.len())
            .field("waiters", &self.waiters.load(SeqCst))
            .field("growers", &self.growers.load(SeqCst))
            .finish()
    }
}

/// A checkout that found nothing and must wait in r2d2: for the connection
/// it makes the pool open (a grower), or registered as a waiter, whom
/// releases then serve. Counted until dropped.
pub(crate) struct Waiting<'a, C> {
    parking: &'a Parking<C>,
    growing: bool,
}

impl<C> Waiting<'_, C> {
    /// Whether this checkout waits for a new connection rather than for a
    /// release.
    pub(crate) fn is_growing(&self) -> bool {
        self.growing
    }
}

impl<C> Drop for Waiting<'_, C> {
    fn drop(&mut self) {
        let count = if self.growing {
            &self.parking.growers
        } else {
            &self.parking.waiters
        };
        count.fetch_sub(1, SeqCst);
    }
}

/// One stripe's parked connections. A stripe usually holds one, its
/// thread's: that one sits inline, in the stripe's own cache lines beside
/// its lock, and only more go to a separately allocated `Vec` (with every
/// connection in a `Vec`, each park and take also wrote a buffer line of its
/// own, and throughput at 8 threads on 2 cores was ~8 % lower).
struct Shard<C> {
    first: Option<Parked<C>>,
    more: Vec<Parked<C>>,
}

impl<C> Default for Shard<C> {
    fn default() -> Self {
        Shard {
            first: None,
            more: Vec::new(),
        }
    }
}

impl<C> Shard<C> {
    fn push(&mut self, parked: Parked<C>) {
        if self.first.is_none() && self.more.is_empty() {
            self.first = Some(parked);
        } else {
            self.more.push(parked);
        }
    }

    /// `owner`'s most recently parked connection, if it has one here.
    fn take_own(&mut self, owner: ThreadId) -> Option<C> {
        if let Some(i) = self.more.iter().rposition(|p| p.owner == owner) {
            return Some(self.more.swap_remove(i).conn);
        }
        self.first.take_if(|p| p.owner == owner).map(|p| p.conn)
    }

    /// The most recently parked connection, whoever parked it.
    fn take_any(&mut self) -> Option<C> {
        self.more
            .pop()
            .or_else(|| self.first.take())
            .map(|p| p.conn)
    }

    /// Moves the connections parked for `age` or longer at `now` to `out`.
    fn take_older_than(&mut self, now: Instant, age: Duration, out: &mut Vec<C>) {
        let aged = |p: &Parked<C>| now.saturating_duration_since(p.since) >= age;
        if let Some(p) = self.first.take_if(|p| aged(p)) {
            out.push(p.conn);
        }
        // In place: the `Vec` keeps the buffer its own thread allocated.
        let mut i = 0;
        while i < self.more.len() {
            if aged(&self.more[i]) {
                out.push(self.more.remove(i).conn);
            } else {
                i += 1;
            }
        }
    }

    fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.more.len()
    }
}

impl<C> Parking<C> {
    /// This thread's parked connection, else an idle one from `idle`
    /// (r2d2's idle list); else, when `room` says the pool has room for the
    /// given number of growers (this one included), the caller waits in
    /// r2d2 as a grower for the connection its wait makes r2d2 open; else
    /// another thread's parked connection; else the caller waits in r2d2
    /// registered as a waiter, so that released connections go to r2d2.
    #[inline]
    pub(crate) fn take(
        &self,
        idle: impl FnOnce() -> Option<C>,
        room: impl FnOnce(usize) -> bool,
    ) -> Result<C, Waiting<'_, C>> {
        let (stripe, own) = self.shards.mine();
        // The guard must be gone before looking at the other stripes.
        let mine = lock(own).take_own(this_thread());
        match mine {
            Some(conn) => Ok(conn),
            None => self.take_elsewhere(stripe, idle, room),
        }
    }

    /// How many checkouts wait for a connection they made the pool open.
    pub(crate) fn growers(&self) -> usize {
        self.growers.load(SeqCst)
    }

    /// [`take`](Self::take) when this thread had nothing parked: out of
    /// line, so the common path stays a few cache lines of code.
    #[cold]
    #[inline(never)]
    fn take_elsewhere(
        &self,
        stripe: usize,
        idle: impl FnOnce() -> Option<C>,
        room: impl FnOnce(usize) -> bool,
    ) -> Result<C, Waiting<'_, C>> {
        // An idle connection comes before another thread's parked one. A
        // thread without a connection of its own that takes another
        // thread's leaves that thread without one, which then does the same
        // at its next checkout, and the hole goes round while the idle
        // connection that would end it is never asked for. Each turn moves
        // a connection to another thread, away from the CPU the scheduler
        // had placed its backend next to (measured, 8 threads on 8
        // connections, 8 paired 2 s runs: threads ending a run on another
        // backend than they began it with, 28 before, 9 after; median
        // throughput +9 %).
        //
        // And before registering as a waiter: while a waiter is registered,
        // every release hands its connection to r2d2 instead of parking it,
        // so that releaser finds nothing at its next checkout and waits in
        // turn (measured: 100 to 2,400 waits in 2 s at 8 threads on 8
        // connections, each trading connections between threads).
        if let Some(conn) = idle() {
            return Ok(conn);
        }
        // While the pool can open another connection, wait for that one
        // (as Go's pgxpool does) instead of registering, for the same
        // reason: while a pool filled, registered waiters passed
        // connections from thread to thread (measured: 100-300 of the first
        // 400 checkouts at 8 threads on 8 connections). And before taking
        // another thread's parked connection: that thread is between two
        // of its queries and would only have to take someone else's (a
        // thread that started late took one as the pool filled, and two
        // threads each saw two backends).
        let growers = self.growers.fetch_add(1, SeqCst) + 1;
        let growing = Waiting {
            parking: self,
            growing: true,
        };
        if room(growers) {
            return Err(growing);
        }
        drop(growing);
        if let Some(conn) = self.any(stripe) {
            return Ok(conn);
        }
        between(Step::TakerFoundNothing);
        self.waiters.fetch_add(1, SeqCst);
        let waiting = Waiting {
            parking: self,
            growing: false,
        };
        // A connection parked since the look above, by a thread that had not
        // yet seen this registration (see `park` for why locking each stripe
        // to look is enough).
        match self.any(stripe) {
            Some(conn) => Ok(conn),
            None => Err(waiting),
        }
    }

    /// The most recently parked connection of the first stripe, from `from`
    /// on, that has one.
    fn any(&self, from: usize) -> Option<C> {
        self.shards
            .from(from)
            .find_map(|shard| lock(shard).take_any())
    }

    /// Parks `conn` for this thread unless a thread is waiting; gives back a
    /// connection when one must go to r2d2 instead (drop it outside this
    /// call). `now` is when it was released.
    #[inline]
    pub(crate) fn park(&self, conn: C, now: Instant) -> Option<C> {
        // A hint, to skip the push; the look that counts is the one below.
        if self.waiters.load(Relaxed) > 0 {
            return Some(conn);
        }
        between(Step::ParkerSawNoWaiter);
        let (_, own) = self.shards.mine();
        let mut parked = lock(own);
        parked.push(Parked {
            owner: this_thread(),
            conn,
            since: now,
        });
        // Looked at under the stripe's lock, which a waiter takes (after
        // registering) to look at this stripe: if its look came first, its
        // registration happened before this lock was taken and is seen here;
        // if not, its look comes after this push and finds it. No fence (it
        // cost ~6 % of throughput at 8 threads on 2 cores).
        if self.waiters.load(Relaxed) > 0 {
            // A thread began waiting meanwhile and may have looked before
            // the push: one connection goes to r2d2, which wakes it.
            return parked.take_any();
        }
        None
    }

    /// Takes the connections parked for longer than `age` (all of them with
    /// `Duration::ZERO`), to be handed back to r2d2 by dropping them.
    pub(crate) fn take_older_than(&self, age: Duration) -> Vec<C> {
        let now = Instant::now();
        let mut old = Vec::new();
        for shard in self.shards.from(0) {
            lock(shard).take_older_than(now, age, &mut old);
        }
        old
    }

    /// How many connections are parked.
    pub(crate) fn len(&self) -> usize {
        self.shards.from(0).map(|shard| lock(shard).len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Two threads meet here: each arrival counts one, and a thread goes on
    /// once both have arrived for its `nth` meeting. Spinning (then
    /// yielding) rather than a `Barrier`, whose futex wake-up lets one thread
    /// run microseconds ahead: the race below needs both to start together.
    fn meet(arrived: &AtomicUsize, nth: &mut usize) {
        *nth += 1;
        arrived.fetch_add(1, SeqCst);
        let mut spins = 0u32;
        while arrived.load(SeqCst) < 2 * *nth {
            spins += 1;
            if spins < 10_000 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// Runs `other` once, at `step` of the next call on this thread.
    fn at(step: Step, other: impl FnOnce() + 'static) {
        let mut other = Some(other);
        BETWEEN.with(|h| {
            *h.borrow_mut() = Some(Box::new(move |now| {
                if now == step {
                    if let Some(other) = other.take() {
                        other();
                    }
                }
            }))
        });
    }

    fn clear() {
        BETWEEN.with(|h| *h.borrow_mut() = None);
    }

    #[test]
    fn an_idle_connection_is_taken_before_registering_as_a_waiter() {
        let parking = Parking::<u64>::default();
        assert_eq!(parking.take(|| Some(9), |_| false).ok(), Some(9));
        assert_eq!(parking.waiters.load(SeqCst), 0, "no waiter registered");
        // So the release parks rather than handing the connection to r2d2.
        assert_eq!(parking.park(9, Instant::now()), None);
        // And the thread's own parked connection comes before an idle one.
        assert_eq!(parking.take(|| Some(1), |_| false).ok(), Some(9));
        assert!(
            parking.take(|| None, |_| false).is_err(),
            "nothing anywhere: a waiter"
        );
    }

    #[test]
    fn a_checkout_the_pool_has_room_for_waits_for_a_new_connection_unregistered() {
        let parking = Parking::<u64>::default();
        let mut asked = None;
        let first = parking.take(
            || None,
            |growers| {
                asked = Some(growers);
                growers <= 1
            },
        );
        let first = first.expect_err("nothing to take");
        assert_eq!(asked, Some(1), "room asked for this grower");
        assert!(first.is_growing());
        assert_eq!(parking.waiters.load(SeqCst), 0, "not registered");
        // Room for one grower only: the second registers as a waiter.
        let second = parking.take(|| None, |growers| growers <= 1);
        let second = second.expect_err("nothing to take");
        assert!(!second.is_growing());
        assert_eq!((parking.growers(), parking.waiters.load(SeqCst)), (1, 1));
        drop(second);
        // With only a grower waiting, a release parks: no one else's
        // connection is sent to r2d2 for it.
        assert_eq!(parking.park(7, Instant::now()), None);
        drop(first);
        assert_eq!(parking.growers(), 0);
        assert_eq!(parking.take(|| None, |_| true).ok(), Some(7));
    }

    #[test]
    fn an_idle_connection_is_taken_before_another_threads_parked_one() {
        let parking = Arc::new(Parking::<u64>::default());
        let other = Arc::clone(&parking);
        std::thread::spawn(move || assert_eq!(other.park(5, Instant::now()), None))
            .join()
            .unwrap();
        assert_eq!(
            parking.take(|| Some(9), |_| false).ok(),
            Some(9),
            "r2d2's idle one"
        );
        assert_eq!(parking.len(), 1, "the other thread's stays parked");
        assert_eq!(
            parking.take(|| None, |_| false).ok(),
            Some(5),
            "taken when nothing is idle"
        );
    }

    #[test]
    fn a_stripe_gives_its_owner_only_its_own_and_others_the_most_recent() {
        let (a, b) = (
            std::thread::spawn(|| std::thread::current().id())
                .join()
                .unwrap(),
            std::thread::spawn(|| std::thread::current().id())
                .join()
                .unwrap(),
        );
        let at = Instant::now();
        let mut shard = Shard::default();
        for (owner, conn) in [(a, 1), (b, 2), (a, 3), (b, 4)] {
            shard.push(Parked {
                owner,
                conn,
                since: at,
            });
        }
        assert_eq!(shard.len(), 4);
        assert_eq!(shard.take_own(a), Some(3), "a's most recent");
        assert_eq!(shard.take_own(a), Some(1), "a's other one, inline");
        assert_eq!(shard.take_own(a), None, "none left for a");
        assert_eq!(shard.take_any(), Some(4), "the most recent");
        assert_eq!(shard.take_any(), Some(2));
        assert_eq!(shard.take_any(), None);
        assert_eq!(shard.len(), 0);
    }

    #[test]
    fn only_connections_parked_long_enough_are_taken_as_old() {
        let me = std::thread::current().id();
        let now = Instant::now();
        let ago = |ms| now - Duration::from_millis(ms);
        let mut shard = Shard::default();
        for (conn, since) in [(1, ago(500)), (2, ago(10)), (3, ago(900)), (4, ago(20))] {
            shard.push(Parked {
                owner: me,
                conn,
                since,
            });
        }
        let mut old = Vec::new();
        shard.take_older_than(now, Duration::from_millis(100), &mut old);
        assert_eq!(old, vec![1, 3]);
        assert_eq!(shard.len(), 2);
        assert_eq!(shard.take_any(), Some(4), "the young keep their order");
        assert_eq!(shard.take_any(), Some(2));
    }

    #[test]
    fn a_taker_sees_what_was_parked_after_its_first_look() {
        // The taker has looked everywhere and found nothing; the parker then
        // parks (seeing no waiter yet) before the taker registers.
        let parking: &'static Parking<u64> = Box::leak(Box::default());
        at(Step::TakerFoundNothing, move || {
            assert_eq!(parking.park(7, Instant::now()), None, "parked");
        });
        let taken = parking.take(|| None, |_| false);
        clear();
        assert_eq!(taken.ok(), Some(7), "the taker's second look finds it");
        assert_eq!(parking.len(), 0);
    }

    #[test]
    fn a_parker_hands_back_what_a_waiter_registered_for_meanwhile() {
        // The parker saw no waiter; before it pushes, a taker looks
        // everywhere, finds nothing and registers.
        let parking: &'static Parking<u64> = Box::leak(Box::default());
        at(Step::ParkerSawNoWaiter, move || {
            let waiting = parking.take(|| None, |_| false);
            assert!(waiting.is_err(), "nothing parked yet");
            // Still waiting (in r2d2) when the parker goes on.
            std::mem::forget(waiting);
        });
        let back = parking.park(7, Instant::now());
        clear();
        assert_eq!(back, Some(7), "handed back for r2d2 to pass to the waiter");
        assert_eq!(parking.len(), 0);
    }

    /// A thread that finds nothing parked registers as a waiter (and then
    /// waits in r2d2) while another parks a connection at the same moment:
    /// either the waiter sees the connection, or the parker sees the waiter
    /// and hands the connection back for r2d2 to pass on. Never neither: a
    /// waiter registered while the connection sits parked would wait out a
    /// whole poll slice for nothing.
    #[test]
    fn a_connection_parked_as_a_thread_starts_waiting_is_never_missed_by_both() {
        const ROUNDS: u64 = 300_000;
        let parking = Arc::new(Parking::<u64>::default());
        let arrived = Arc::new(AtomicUsize::new(0));
        let parker = {
            let (parking, arrived) = (Arc::clone(&parking), Arc::clone(&arrived));
            std::thread::spawn(move || {
                let mut nth = 0;
                (0..ROUNDS)
                    .map(|i| {
                        meet(&arrived, &mut nth);
                        let handed_back = parking.park(i, Instant::now()).is_some();
                        meet(&arrived, &mut nth);
                        meet(&arrived, &mut nth); // the taker empties the stripes
                        handed_back
                    })
                    .collect::<Vec<bool>>()
            })
        };
        let mut nth = 0;
        let mut waited = Vec::new();
        for _ in 0..ROUNDS {
            meet(&arrived, &mut nth);
            // Still registered while the parker runs, as a real waiter is
            // while it waits in r2d2.
            let taken = parking.take(|| None, |_| false);
            meet(&arrived, &mut nth);
            waited.push(taken.is_err());
            drop(taken);
            drop(parking.take_older_than(Duration::ZERO));
            meet(&arrived, &mut nth);
        }
        let handed_back = parker.join().unwrap();
        let missed = (0..ROUNDS as usize)
            .filter(|&i| waited[i] && !handed_back[i])
            .count();
        assert_eq!(
            missed, 0,
            "rounds where the connection stayed parked while a thread waited"
        );
        // And never both: one connection is taken or handed back, not both.
        let both = (0..ROUNDS as usize)
            .filter(|&i| !waited[i] && handed_back[i])
            .count();
        assert_eq!(both, 0, "a connection both taken and handed back");
    }
}
