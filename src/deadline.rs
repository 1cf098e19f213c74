//! Per-call deadlines for a driver that has none: a watchdog thread cancels
//! the running statement on the server (`CancelToken`, with the node's TLS
//! settings) when its deadline passes, and [`SHUTDOWN_GRACE`] later, if the
//! statement is still running (the node did not answer the cancel), shuts
//! the connection's socket down (see `socket.rs`), which ends the call at
//! once. The same thread bounds connects: the driver's connect timeout
//! covers the TCP connect only, so a start-up handshake the node never
//! answers is ended by shutting its socket down at the connect timeout.
//!
//! The thread starts on first use and stops when the cluster is dropped or
//! shut down. A statement whose cancel request was sent leaves its
//! connection in an uncertain state (the request may land after the
//! statement finished and hit the next one), so that connection is always
//! discarded.
//!
//! The watchdog never sends a cancel request itself: sending one opens a
//! connection to the node, which a node that accepts and never answers
//! holds until the connect timeout. Each node has a canceller thread of its
//! own (started on its first cancel), so such a node delays no other node's
//! deadlines; a
//! node whose canceller is still stuck with [`CANCEL_QUEUE`] requests
//! waiting gets no more (best effort, logged).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicU8, Ordering::SeqCst};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use postgres::CancelToken;

use crate::error::Error;
use crate::info::NodeInfo;
use crate::socket::{Peer, Snapshot, Socket};
use crate::sync::lock;

/// Cancel requests that may wait for one node's canceller.
const CANCEL_QUEUE: usize = 16;

/// How long after its deadline a statement still running has its socket
/// shut down: time for a healthy node to answer the cancel request first
/// (so the server stops the statement and says why).
pub(crate) const SHUTDOWN_GRACE: Duration = Duration::from_millis(20);

const PENDING: u8 = 0;
const DONE: u8 = 1;
const FIRED: u8 = 2;

/// What sends a node's cancel requests (the node's connector: with its TLS
/// settings, bounded by its connect timeout).
pub(crate) trait Canceller: Send + Sync + std::fmt::Debug {
    /// Which node the requests go to.
    fn node(&self) -> &NodeInfo;
    /// Sends a cancel request for the statement running under `token`.
    fn cancel(&self, token: &CancelToken) -> Result<(), Error>;
}

/// A statement's deadline.
struct Job {
    at: Instant,
    token: CancelToken,
    /// Sends the cancel request (with the node's TLS settings, bounded by
    /// its connect timeout).
    connector: Arc<dyn Canceller>,
    state: Arc<AtomicU8>,
    socket: Option<Arc<Socket>>,
}

/// A connect's bound: at `at` the socket it opened is shut down, which
/// ends a start-up handshake the node never answers.
struct ConnectJob {
    at: Instant,
    before: Snapshot,
    peer: Peer,
    node: NodeInfo,
    state: Arc<AtomicU8>,
}

/// What the watchdog waits for.
enum Watch {
    Statement(Box<Job>),
    /// A statement past its deadline by [`SHUTDOWN_GRACE`]: shut its socket
    /// down if it is still running.
    Shut {
        at: Instant,
        state: Arc<AtomicU8>,
        socket: Arc<Socket>,
        node: NodeInfo,
    },
    Connect(Box<ConnectJob>),
}

/// One armed deadline; `disarm` when the statement ends.
#[derive(Debug)]
pub(crate) struct Armed(Option<Arc<AtomicU8>>);

impl Armed {
    /// Ends the watch; `true` when the deadline already fired (a cancel
    /// request was or is being sent, the socket may be shut down).
    pub(crate) fn disarm(self) -> bool {
        match &self.0 {
            Some(state) => state.swap(DONE, SeqCst) != PENDING,
            None => false,
        }
    }
}

/// What the watchdog thread is sent.
enum Msg {
    Arm(Instant, Watch),
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
    /// sent a cancel request, and [`SHUTDOWN_GRACE`] later its socket (if
    /// known) is shut down.
    pub(crate) fn arm(
        &self,
        at: Instant,
        token: CancelToken,
        connector: &Arc<dyn Canceller>,
        socket: Option<&Arc<Socket>>,
    ) -> Armed {
        let state = Arc::new(AtomicU8::new(PENDING));
        let job = Box::new(Job {
            at,
            token,
            connector: Arc::clone(connector),
            state: Arc::clone(&state),
            socket: socket.cloned(),
        });
        match self
            .sender()
            .map(|s| s.send(Msg::Arm(at, Watch::Statement(job))))
        {
            Some(Ok(())) => Armed(Some(state)),
            // No watchdog thread (could not start, or shut down): the
            // statement runs unbounded rather than failing.
            _ => {
                log::warn!(
                    "deadline watchdog unavailable; a statement on {} runs without its deadline",
                    connector.node()
                );
                Armed(None)
            }
        }
    }

    /// Bounds a connect: at `at`, unless disarmed first, the socket to
    /// `peer` opened since `before` is shut down. Without the watchdog
    /// thread the connect runs unbounded.
    pub(crate) fn arm_connect(
        &self,
        at: Instant,
        before: Snapshot,
        peer: Peer,
        node: &NodeInfo,
    ) -> Armed {
        let state = Arc::new(AtomicU8::new(PENDING));
        let job = Box::new(ConnectJob {
            at,
            before,
            peer,
            node: node.clone(),
            state: Arc::clone(&state),
        });
        match self
            .sender()
            .map(|s| s.send(Msg::Arm(at, Watch::Connect(job))))
        {
            Some(Ok(())) => Armed(Some(state)),
            _ => Armed(None),
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
    let mut pending: HashMap<u64, Watch> = HashMap::new();
    let mut cancellers = Cancellers::default();
    let mut seq = 0u64;
    let mut sweep_at = 1024;
    loop {
        let received = match heap.peek() {
            Some(Reverse((at, _))) => jobs.recv_deadline(*at),
            None => jobs.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match received {
            Ok(Msg::Arm(at, watch)) => {
                seq += 1;
                heap.push(Reverse((at, seq)));
                pending.insert(seq, watch);
                if pending.len() >= sweep_at {
                    // Statements that ended in time need no watch: drop them
                    // now rather than at their deadlines.
                    pending.retain(|_, watch| watch.state().load(SeqCst) != DONE);
                    heap = pending
                        .iter()
                        .map(|(id, watch)| Reverse((watch.at(), *id)))
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
            let Some(watch) = pending.remove(&id) else {
                continue;
            };
            if let Some((at, shut)) = fire(watch, &mut cancellers) {
                seq += 1;
                heap.push(Reverse((at, seq)));
                pending.insert(seq, shut);
            }
        }
    }
}

impl Watch {
    fn state(&self) -> &AtomicU8 {
        match self {
            Watch::Statement(job) => &job.state,
            Watch::Shut { state, .. } => state,
            Watch::Connect(job) => &job.state,
        }
    }

    fn at(&self) -> Instant {
        match self {
            Watch::Statement(job) => job.at,
            Watch::Shut { at, .. } => *at,
            Watch::Connect(job) => job.at,
        }
    }
}

/// Acts on a watch that is due; a statement that fired comes back as the
/// shutdown of its socket, due [`SHUTDOWN_GRACE`] later.
fn fire(watch: Watch, cancellers: &mut Cancellers) -> Option<(Instant, Watch)> {
    match watch {
        Watch::Statement(mut job) => {
            if job
                .state
                .compare_exchange(PENDING, FIRED, SeqCst, SeqCst)
                .is_err()
            {
                return None; // finished in time
            }
            log::debug!(
                "deadline passed on {}; cancelling the statement",
                job.connector.node()
            );
            let shut = job.socket.take().map(|socket| {
                let at = job.at + SHUTDOWN_GRACE;
                let shut = Watch::Shut {
                    at,
                    state: Arc::clone(&job.state),
                    socket,
                    node: job.connector.node().clone(),
                };
                (at, shut)
            });
            cancellers.send(job);
            shut
        }
        Watch::Shut {
            state,
            socket,
            node,
            ..
        } => {
            if state.load(SeqCst) == FIRED {
                log::debug!(
                    "statement on {node} still running past its deadline; closing its connection"
                );
                socket.shutdown();
            }
            None
        }
        Watch::Connect(job) => {
            if job
                .state
                .compare_exchange(PENDING, FIRED, SeqCst, SeqCst)
                .is_ok()
            {
                match job.before.find_new(&job.peer) {
                    Some(socket) => socket.shutdown(),
                    None => log::warn!(
                        "connecting to {} is past its connect timeout, and its socket cannot be \
                         told apart to end it",
                        job.node
                    ),
                }
            }
            None
        }
    }
}

/// One canceller thread per node, by node name; each ends when the
/// watchdog does (its channel closes). A cancel request's connection is
/// bounded like any connect (see `Connector::cancel`), so a node that does
/// not answer holds its canceller at most its connect timeout per request.
#[derive(Default)]
struct Cancellers(HashMap<String, Sender<Box<Job>>>);

impl Cancellers {
    fn send(&mut self, job: Box<Job>) {
        let name = job.connector.node().name().to_owned();
        if !self.0.contains_key(&name) {
            let (tx, rx) = crossbeam_channel::bounded::<Box<Job>>(CANCEL_QUEUE);
            let spawned = std::thread::Builder::new()
                .name(format!("pgxkit-cancel-{name}"))
                .spawn(move || {
                    while let Ok(job) = rx.recv() {
                        if let Err(e) = job.connector.cancel(&job.token) {
                            log::warn!("could not cancel a statement past its deadline: {e}");
                        }
                    }
                });
            if let Err(e) = spawned {
                log::error!(
                    "cannot start a cancel thread for {}: {e}",
                    job.connector.node()
                );
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
                    job.connector.node()
                );
            }
        }
    }
}
