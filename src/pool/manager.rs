//! Our r2d2 connection manager: opens connections with the node's TLS
//! settings, gives each its own lifetime within the jitter, remembers when it
//! was last returned (for validation after idling), and counts what happens
//! to connections without taking a lock.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::deadline::{Canceller, Watchdog};
use crate::error::{Error, ErrorKind};
use crate::hooks::{self, ConnectionEvent, DisconnectReason, Hooks};
use crate::info::NodeInfo;
use crate::socket::{Peer, Snapshot, Socket, Sockets};
use crate::statements::StatementCache;
use crate::sync::lock;
use crate::tls::Tls;

/// A pooled connection: the driver's client plus what the pool needs to know.
pub(crate) struct Conn {
    pub(crate) client: postgres::Client,
    /// The client's socket, if it could be found: a statement past its
    /// deadline, or a node found silent, shuts it down. Declared after
    /// `client` so it is closed after the client's own descriptor.
    pub(crate) socket: Option<Arc<Socket>>,
    /// This connection's prepared statements.
    pub(crate) statements: StatementCache,
    created: Instant,
    expires: Instant,
    returned: Instant,
    /// Set when an operation saw the connection fail; it is then discarded.
    pub(crate) broken: bool,
    /// Set by the idle sweep: idle for `max_conn_idle_time`; discarded when
    /// handed back to r2d2.
    pub(crate) idle_expired: bool,
    /// Set when the connection goes back to r2d2 without having been used
    /// (the idle sweep, unparking): its idle clock keeps running.
    pub(crate) keep_idle_clock: bool,
}

/// A pooled connection is used as the client it wraps.
impl std::ops::Deref for Conn {
    type Target = postgres::Client;
    fn deref(&self) -> &postgres::Client {
        &self.client
    }
}

impl std::ops::DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut postgres::Client {
        &mut self.client
    }
}

impl Drop for Conn {
    /// A broken connection may still wait for an answer (a statement past
    /// its deadline, a validation that timed out), and the driver's client
    /// waits for every answer before it closes, so dropping it on a node
    /// that does not answer would block this thread: its socket is shut
    /// down first. A healthy one says goodbye (`Terminate`) as usual.
    fn drop(&mut self) {
        if self.broken {
            if let Some(socket) = &self.socket {
                socket.shutdown();
            }
        }
    }
}

impl Conn {
    pub(crate) fn expired(&self, now: Instant) -> bool {
        now >= self.expires
    }

    /// Records that the connection went back to being idle now.
    pub(crate) fn mark_returned(&mut self, now: Instant) {
        self.returned = now;
    }

    pub(crate) fn idle_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.returned)
    }
}

/// Lock-free counters of one node's pool, read by `stats()`.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) checkout_timeouts: AtomicU64,
    pub(crate) created: AtomicU64,
    pub(crate) connect_failures: AtomicU64,
    pub(crate) closed_lifetime: AtomicU64,
    pub(crate) closed_idle: AtomicU64,
    pub(crate) closed_broken: AtomicU64,
    pub(crate) validations: AtomicU64,
    pub(crate) statements_prepared: AtomicU64,
}

/// State shared by a node's manager and the node itself.
#[derive(Debug)]
pub(crate) struct PoolShared {
    pub(crate) node: NodeInfo,
    pub(crate) hooks: Arc<Hooks>,
    pub(crate) counters: Counters,
    /// Set by shutdown: no new connections, returned ones are closed.
    pub(crate) closed: AtomicBool,
    /// The latest failure to connect (cleared by a success), so a checkout
    /// that waited for a connection gets the reason, cause and all.
    last_connect_error: Mutex<Option<(Instant, Error)>>,
}

impl PoolShared {
    pub(crate) fn new(node: NodeInfo, hooks: Arc<Hooks>) -> Arc<Self> {
        Arc::new(PoolShared {
            node,
            hooks,
            counters: Counters::default(),
            closed: AtomicBool::new(false),
            last_connect_error: Mutex::new(None),
        })
    }

    /// Whether the latest attempt to connect failed (until one succeeds).
    pub(crate) fn connect_failing(&self) -> bool {
        lock(&self.last_connect_error).is_some()
    }

    /// The latest connect failure if it happened at or after `since`, as a
    /// [`ErrorKind::Connect`] error with the failure's detail and cause
    /// (the driver's error, a hook's).
    pub(crate) fn connect_error_since(&self, since: Instant) -> Option<Error> {
        lock(&self.last_connect_error)
            .as_ref()
            .filter(|(at, _)| *at >= since)
            .map(|(_, err)| err.duplicate_as(ErrorKind::Connect))
    }
}

/// What opens a connection to one node: the driver config and TLS, and
/// the sockets of the connections it opened.
pub(crate) struct Connector {
    pub(crate) pg: postgres::Config,
    pub(crate) tls: Tls,
    /// Run on every new pooled connection before the `on_connect` hooks
    /// (`SET statement_timeout = ...`).
    pub(crate) init_sql: Option<String>,
    pub(crate) node: NodeInfo,
    /// Bounds each connect's start-up handshake by the connect timeout.
    pub(crate) watchdog: Arc<Watchdog>,
    /// The sockets of every connection opened here (pooled and probe).
    pub(crate) sockets: Sockets,
}

/// What a bounded connect made, and its socket if it was looked for and
/// found.
struct Bounded<T> {
    value: T,
    socket: Option<Socket>,
}

/// A new connection and its socket (if it could be found).
pub(crate) struct Connected {
    pub(crate) client: postgres::Client,
    pub(crate) socket: Option<Arc<Socket>>,
}

impl Connected {
    /// Drops a connection that failed, its socket shut down first so the
    /// drop cannot wait for an answer that may never come (see `Conn`'s
    /// `Drop`).
    pub(crate) fn discard(self) {
        if let Some(socket) = &self.socket {
            socket.shutdown();
        }
    }
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // postgres::Config's Debug redacts the password.
        f.debug_struct("Connector")
            .field("pg", &self.pg)
            .finish_non_exhaustive()
    }
}

impl Canceller for Connector {
    fn node(&self) -> &NodeInfo {
        &self.node
    }

    /// Sends a cancel request for the statement running under `token`,
    /// bounded like a connect.
    fn cancel(&self, token: &postgres::CancelToken) -> Result<(), Error> {
        self.bounded(&self.pg, false, || self.tls.cancel(token))
            .map(|_| ())
    }
}

impl Connector {
    /// Opens one connection (start-up handshake included, bounded by the
    /// connect timeout; twice that when a `prefer` connection falls back to
    /// plaintext) and finds its socket.
    pub(crate) fn connect(&self) -> Result<Connected, Error> {
        self.connect_with(&self.pg)
    }

    fn connect_with(&self, pg: &postgres::Config) -> Result<Connected, Error> {
        let bounded = self.bounded(pg, true, || self.tls.connect(pg))?;
        let socket = bounded.socket.map(Arc::new);
        if let Some(socket) = &socket {
            self.sockets.add(socket);
        }
        Ok(Connected {
            client: bounded.value,
            socket,
        })
    }

    /// Runs `connect` (what opens one connection to `pg`'s address) through
    /// the address's gate, with its socket shut down if it has not ended
    /// within the connect timeout (twice that for a `prefer` connection that
    /// may fall back to plaintext); with `find`, finds the new socket.
    fn bounded<T>(
        &self,
        pg: &postgres::Config,
        find: bool,
        connect: impl FnOnce() -> Result<T, postgres::Error>,
    ) -> Result<Bounded<T>, Error> {
        let timeout = pg
            .get_connect_timeout()
            .copied()
            .unwrap_or(crate::settings::defaults::CONNECT_TIMEOUT);
        let bound = timeout.saturating_mul(self.tls.attempts());
        let peer = Peer::of(pg);
        let gate = peer.gate();
        // The connect before is bounded the same way; a little longer, for
        // its shutdown to take effect. One that has not ended by then is
        // stuck (its socket could not be told apart to end it): rather than
        // open a connection nothing can end, fail.
        let wait = bound.saturating_add(Duration::from_secs(1));
        let Some(entered) = gate.enter(wait) else {
            return Err(Error::new(ErrorKind::Connect)
                .with_node(&self.node)
                .with_detail(format!(
                    "another connect to this node has not ended within {wait:?} (the node does \
                     not answer)"
                )));
        };
        let before = Snapshot::take();
        let started = Instant::now();
        let watch = self.watchdog.arm_connect(
            started.checked_add(bound).unwrap_or(started),
            before.clone(),
            peer.clone(),
            &self.node,
        );
        let result = connect();
        if watch.disarm() {
            // It did not end within the bound and its socket was shut down
            // (a connection made just then is dropped too).
            let detail = format!(
                "the server did not finish the start-up handshake within the connect timeout \
                 ({bound:?})"
            );
            let err = Error::new(ErrorKind::Connect)
                .with_node(&self.node)
                .with_detail(detail);
            return Err(match result {
                Err(e) => err.with_source(e),
                Ok(_) => err,
            });
        }
        let value = result.map_err(|e| {
            Error::new(ErrorKind::Connect)
                .with_node(&self.node)
                .with_source(e)
        })?;
        let socket = if find { before.find_new(&peer) } else { None };
        drop(entered);
        Ok(Bounded { value, socket })
    }

    /// A connection for health probes: like the pool's, but every statement
    /// and every unacknowledged send is bounded by `timeout` (a node that
    /// acknowledges and never answers is left to the monitor's overdue
    /// check).
    pub(crate) fn connect_probe(&self, timeout: Duration) -> Result<Connected, Error> {
        let mut pg = self.pg.clone();
        let millis = timeout.as_millis();
        pg.tcp_user_timeout(timeout)
            .options(&format!(
                "-c statement_timeout={millis} -c lock_timeout={millis}"
            ))
            .application_name("pgxkit-health");
        self.connect_with(&pg)
    }
}

#[derive(Debug)]
pub(crate) struct Manager {
    connector: Arc<Connector>,
    lifetime: Duration,
    jitter: Duration,
    cache_capacity: usize,
    shared: Arc<PoolShared>,
}

impl Manager {
    pub(crate) fn new(
        connector: Arc<Connector>,
        lifetime: Duration,
        jitter: Duration,
        cache_capacity: usize,
        shared: Arc<PoolShared>,
    ) -> Self {
        Manager {
            connector,
            lifetime,
            jitter,
            cache_capacity,
            shared,
        }
    }

    /// This connection's own lifetime: the maximum plus a random share of the jitter.
    fn lifetime(&self) -> Duration {
        let jitter_nanos = u64::try_from(self.jitter.as_nanos()).unwrap_or(u64::MAX);
        let extra = if jitter_nanos == 0 {
            0
        } else {
            fastrand::u64(0..jitter_nanos)
        };
        self.lifetime + Duration::from_nanos(extra)
    }
}

impl Manager {
    /// Opens a connection and runs the `on_connect` hooks on it; a hook's
    /// error rejects the connection.
    fn open(&self) -> Result<Connected, Error> {
        let node = &self.shared.node;
        if self.shared.closed.load(Relaxed) {
            return Err(Error::new(ErrorKind::ShuttingDown).with_node(node));
        }
        let Connected { mut client, socket } = self.connector.connect()?;
        if let Some(sql) = &self.connector.init_sql {
            client
                .batch_execute(sql)
                .map_err(|e| Error::from_postgres(e, node))?;
        }
        let hooks = &self.shared.hooks.on_connect;
        hooks::run(hooks, "on_connect", |hook| hook(&mut client, node))
            .map_err(|e| e.with_node(node))?;
        Ok(Connected { client, socket })
    }
}

impl r2d2::ManageConnection for Manager {
    // Boxed: r2d2 keeps the connection by value in every handle, and a
    // `postgres::Client` carries its own runtime, so each move of a
    // checked-out connection would copy about a kilobyte (measured: ~950
    // instructions per query).
    type Connection = Box<Conn>;
    type Error = Error;

    fn connect(&self) -> Result<Box<Conn>, Error> {
        match self.open() {
            Ok(Connected { client, socket }) => {
                self.shared.counters.created.fetch_add(1, Relaxed);
                *lock(&self.shared.last_connect_error) = None;
                let now = Instant::now();
                Ok(Box::new(Conn {
                    client,
                    socket,
                    statements: StatementCache::new(self.cache_capacity),
                    created: now,
                    expires: now + self.lifetime(),
                    returned: now,
                    broken: false,
                    idle_expired: false,
                    keep_idle_clock: false,
                }))
            }
            Err(e) => {
                self.shared.counters.connect_failures.fetch_add(1, Relaxed);
                let seen = e.duplicate_as(e.kind());
                *lock(&self.shared.last_connect_error) = Some((Instant::now(), seen));
                Err(e)
            }
        }
    }

    fn is_valid(&self, conn: &mut Box<Conn>) -> Result<(), Error> {
        conn.client
            .is_valid(Duration::from_secs(5))
            .map_err(|e| Error::from_postgres(e, &self.shared.node))
    }

    fn has_broken(&self, conn: &mut Box<Conn>) -> bool {
        let now = Instant::now();
        if !std::mem::take(&mut conn.keep_idle_clock) {
            conn.returned = now;
        }
        conn.broken
            || conn.idle_expired
            || conn.client.is_closed()
            || conn.expired(now)
            || self.shared.closed.load(Relaxed)
    }
}

/// Counts why connections leave the pool (r2d2 calls this outside its lock).
#[derive(Debug)]
pub(crate) struct ReleaseCounter(pub(crate) Arc<PoolShared>);

impl r2d2::CustomizeConnection<Box<Conn>, Error> for ReleaseCounter {
    fn on_release(&self, conn: Box<Conn>) {
        let counters = &self.0.counters;
        let (counter, reason) = if conn.idle_expired {
            (&counters.closed_idle, DisconnectReason::Idle)
        } else if conn.broken || conn.client.is_closed() {
            (&counters.closed_broken, DisconnectReason::Broken)
        } else if conn.expired(Instant::now()) {
            (&counters.closed_lifetime, DisconnectReason::Lifetime)
        } else {
            (&counters.closed_idle, DisconnectReason::Idle)
        };
        counter.fetch_add(1, Relaxed);
        log::debug!("closing a connection to {} ({reason:?})", self.0.node);
        let age = conn.created.elapsed();
        drop(conn);
        let event = ConnectionEvent {
            node: &self.0.node,
            duration: age,
            reason: Some(reason),
        };
        hooks::notify(&self.0.hooks.on_disconnect, "on_disconnect", |hook| {
            hook(&event)
        });
    }
}

/// Logs r2d2's background connect failures at debug level: callers get
/// the failure in their own error, and a down node would otherwise flood
/// the log with one line per retry.
#[derive(Debug)]
pub(crate) struct ConnectErrorLog;

impl r2d2::HandleError<Error> for ConnectErrorLog {
    fn handle_error(&self, error: Error) {
        log::debug!("{error}");
    }
}
