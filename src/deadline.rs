//! Per-call deadlines for a driver that has none: a watchdog thread cancels
//! the running statement on the server (`CancelToken`, with the node's TLS
//! settings) when its deadline passes.
//!
//! The thread starts on first use and stops when the cluster is dropped or
//! shut down. A statement whose cancel request was sent leaves its
//! connection in an uncertain state (the request may land after the
//! statement finished and hit the next one), so that connection is always
//! discarded.
//!
//! The watchdog never sends a cancel request itself: sending one opens a
//! connection to the node, which a node that accepts and never answers
//! holds forever. Each node has a canceller thread of its own (started on
//! its first cancel), so such a node delays no other node's deadlines; a
//! node whose canceller is still stuck with [`CANCEL_QUEUE`] requests
//! waiting gets no more (best effort, logged).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicU8, Ordering::SeqCst};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use postgres::CancelToken;

use crate::error::NodeInfo;
use crate::sync::lock;
use crate::tls::Tls;

/// Cancel requests that may wait for one node's canceller.
const CANCEL_QUEUE: usize = 16;

const PENDING: u8 = 0;
const DONE: u8 = 1;
const FIRED: u8 = 2;

struct Job {
    at: Instant,
    token: CancelToken,
    tls: Tls,
    node: NodeInfo,
    state: Arc<AtomicU8>,
}

/// One armed deadline; `disarm` when the statement ends.
#[derive(Debug)]
pub(crate) struct Armed(Option<Arc<AtomicU8>>);

impl Armed {
    /// Ends the watch; `true` when the deadline already fired (a cancel
    /// request was or is being sent).
    pub(crate) fn disarm(self) -> bool {
        match &self.0 {
            Some(state) => state
                .compare_exchange(PENDING, DONE, SeqCst, SeqCst)
                .is_err(),
            None => false,
        }
    }
}

/// What the watchdog thread is sent.
enum Msg {
    Arm(Box<Job>),
    /// Shutdown: end now, whatever is armed.
    Stop,
}

#[derive(Default)]
pub(crate) struct Watchdog {
    jobs: OnceLock<Sender<Msg>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Watchdog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watchdog")
            .field("started", &self.jobs.get().is_some())
            .finish()
    }
}

impl Watchdog {
    /// Watches a statement: at `at`, unless disarmed first, its backend is
    /// sent a cancel request.
    pub(crate) fn arm(&self, at: Instant, token: CancelToken, tls: Tls, node: &NodeInfo) -> Armed {
        let state = Arc::new(AtomicU8::new(PENDING));
        let job = Box::new(Job {
            at,
            token,
            tls,
            node: node.clone(),
            state: Arc::clone(&state),
        });
        match self.sender().map(|s| s.send(Msg::Arm(job))) {
            Some(Ok(())) => Armed(Some(state)),
            // No watchdog thread (could not start, or shut down): the
            // statement runs unbounded rather than failing.
            _ => {
                log::warn!(
                    "deadline watchdog unavailable; a statement on {node} runs without its deadline"
                );
                Armed(None)
            }
        }
    }

    /// The job channel, starting the thread on first use. The thread is
    /// spawned, and a failure logged, outside the lock; the lock only pairs
    /// the channel with its thread. A caller that lost the race to start it
    /// lets its own thread go (its channel closes, so it ends at once).
    fn sender(&self) -> Option<&Sender<Msg>> {
        if let Some(s) = self.jobs.get() {
            return Some(s);
        }
        let (tx, rx) = crossbeam_channel::unbounded();
        let spawned = std::thread::Builder::new()
            .name("pgxkit-deadline".to_owned())
            .spawn(move || run(&rx));
        match spawned {
            Ok(handle) => {
                let lost = {
                    let mut thread = lock(&self.thread);
                    match self.jobs.set(tx) {
                        Ok(()) => {
                            *thread = Some(handle);
                            None
                        }
                        Err(_closed) => Some(handle),
                    }
                };
                if let Some(handle) = lost {
                    let _ = handle.join();
                }
            }
            Err(e) => log::error!("cannot start the deadline watchdog thread: {e}"),
        }
        self.jobs.get()
    }

    /// Stops the thread (shutdown) and hands it over to be joined; it ends
    /// at once. A deadline armed after this runs without its watch.
    pub(crate) fn stop(&self) -> Option<JoinHandle<()>> {
        if let Some(jobs) = self.jobs.get() {
            let _ = jobs.send(Msg::Stop);
        }
        lock(&self.thread).take()
    }
}

fn run(jobs: &Receiver<Msg>) {
    let mut heap: BinaryHeap<Reverse<(Instant, u64)>> = BinaryHeap::new();
    let mut pending: HashMap<u64, Box<Job>> = HashMap::new();
    let mut cancellers = Cancellers::default();
    let mut seq = 0u64;
    let mut sweep_at = 1024;
    loop {
        let received = match heap.peek() {
            Some(Reverse((at, _))) => jobs.recv_deadline(*at),
            None => jobs.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match received {
            Ok(Msg::Arm(job)) => {
                seq += 1;
                heap.push(Reverse((job.at, seq)));
                pending.insert(seq, job);
                if pending.len() >= sweep_at {
                    // Statements that ended in time need no watch: drop them
                    // now rather than at their deadlines.
                    pending.retain(|_, job| job.state.load(SeqCst) == PENDING);
                    heap = pending
                        .iter()
                        .map(|(id, job)| Reverse((job.at, *id)))
                        .collect();
                    sweep_at = (pending.len() * 2).max(1024);
                }
            }
            Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => return,
            Err(RecvTimeoutError::Timeout) => {}
        }
        let now = Instant::now();
        while let Some(Reverse((at, id))) = heap.peek().copied() {
            if at > now {
                break;
            }
            heap.pop();
            if let Some(job) = pending.remove(&id) {
                fire(job, &mut cancellers);
            }
        }
    }
}

fn fire(job: Box<Job>, cancellers: &mut Cancellers) {
    if job
        .state
        .compare_exchange(PENDING, FIRED, SeqCst, SeqCst)
        .is_err()
    {
        return; // finished in time
    }
    log::debug!("deadline passed on {}; cancelling the statement", job.node);
    cancellers.send(job);
}

/// One canceller thread per node, by node name; each ends when the
/// watchdog does (its channel closes) or, if stuck on a node that does not
/// answer, once that connection ends.
#[derive(Default)]
struct Cancellers(HashMap<String, Sender<Box<Job>>>);

impl Cancellers {
    fn send(&mut self, job: Box<Job>) {
        let name = job.node.name().to_owned();
        if !self.0.contains_key(&name) {
            let (tx, rx) = crossbeam_channel::bounded::<Box<Job>>(CANCEL_QUEUE);
            let spawned = std::thread::Builder::new()
                .name(format!("pgxkit-cancel-{name}"))
                .spawn(move || {
                    while let Ok(job) = rx.recv() {
                        if let Err(e) = job.tls.cancel(&job.token) {
                            log::warn!(
                                "could not cancel a statement past its deadline on {}: {e}",
                                job.node
                            );
                        }
                    }
                });
            if let Err(e) = spawned {
                log::error!("cannot start a cancel thread for {}: {e}", job.node);
                return;
            }
            self.0.insert(name.clone(), tx);
        }
        if let Some(tx) = self.0.get(&name) {
            if let Err(e) = tx.try_send(job) {
                let job = e.into_inner();
                log::warn!(
                    "not cancelling a statement past its deadline on {}: {CANCEL_QUEUE} cancel \
                     requests to it are still waiting (the node does not answer)",
                    job.node
                );
            }
        }
    }
}
