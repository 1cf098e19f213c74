//! `Cluster`: the public operations, routing writes to the primary and reads
//! over the eligible replicas (see [`ReadBalance`](crate::ReadBalance)), each
//! operation counted in flight (for graceful shutdown), wrapped in the hooks
//! and bounded by its deadline.

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use postgres::Row;

use crate::balancer::Balancer;
use crate::deadline::Watchdog;
use crate::error::{Error, ErrorKind, Result};
use crate::health::{self, HealthReport, NodeHealth};
use crate::hooks::{self, Hooks, Op, OperationKind, ShutdownEvent};
use crate::info::{NodeInfo, Role};
use crate::monitor;
use crate::node::{Node, Nodes, Stmt};
use crate::plans::{self, Capture};
use crate::pool::manager::{Connected, Connector};
use crate::rows::RowIter;
use crate::settings::NodeOptions;
use crate::settings::{ClusterConfig, ReadFallback, Settings};
use crate::shutdown::{InFlight, Lifecycle, ShutdownReport};
use crate::ssl_status::{self, SslStatus};
use crate::statements::{Call, Output, Params, StatementMode};
use crate::stats::ClusterStats;
use crate::sync::lock;
use crate::topology;

/// A probe connection to `node` (see `Cluster::start`), checked for
/// encryption when `require_tls`.
fn check_connection(
    connector: &Connector,
    info: &NodeInfo,
    require_tls: bool,
) -> Result<Connected> {
    let mut probe = connector.connect_probe(monitor::PROBE_TIMEOUT)?;
    if require_tls && !ssl_status::ssl_status(info, &mut probe.client)?.encrypted {
        return Err(Error::config(format!(
            "require_tls: the connection to {info} is not encrypted"
        )));
    }
    Ok(probe)
}

/// How much longer than the connect's own bound `build()` waits for it.
const CHECK_SLACK: Duration = Duration::from_millis(500);

/// A probe connection being opened at `build()`, on a thread of its own.
struct ConnectionCheck {
    info: NodeInfo,
    result: std::io::Result<crossbeam_channel::Receiver<Result<Connected>>>,
    until: Instant,
    bound: Duration,
}

impl ConnectionCheck {
    fn start(node: &Node, require_tls: bool) -> ConnectionCheck {
        // The connect bounds itself (handshake included); this is the
        // backstop, a little later so that its own error, with its cause,
        // is what comes back.
        let connector = node.connector();
        let bound = connector
            .pg
            .get_connect_timeout()
            .copied()
            .unwrap_or(crate::settings::defaults::CONNECT_TIMEOUT)
            .saturating_mul(connector.tls.attempts())
            .saturating_add(CHECK_SLACK);
        let (tx, rx) = crossbeam_channel::bounded(1);
        let connector = Arc::clone(node.connector());
        let info = node.info.clone();
        let result = std::thread::Builder::new()
            .name("pgxkit-connect".to_owned())
            .spawn(move || {
                let _ = tx.send(check_connection(&connector, &info, require_tls));
            })
            .map(|_| rx);
        ConnectionCheck {
            info: node.info.clone(),
            result,
            until: Instant::now() + bound,
            bound,
        }
    }

    /// The connection, or why not, within the node's connect timeout.
    fn wait(self) -> Result<Connected> {
        let rx = self.result.map_err(|e| {
            Error::new(ErrorKind::Connect)
                .with_node(&self.info)
                .with_detail("cannot start the connection check")
                .with_source(e)
        })?;
        let left = self.until.saturating_duration_since(Instant::now());
        rx.recv_timeout(left).unwrap_or_else(|_| {
            Err(Error::new(ErrorKind::Connect)
                .with_node(&self.info)
                .with_detail(format!(
                    "no answer within the connect timeout ({:?}): the server accepted the \
                     connection and did not answer",
                    self.bound
                )))
        })
    }
}

/// Bound on `health_check()`: checkout plus one round trip.
const HEALTH_CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on `is_ready()`.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// A primary and its read replicas behind one thread-safe handle.
///
/// `Cluster` is `Clone + Send + Sync`: clones share the same pools, so clone
/// it into every thread. Everything on the `Cluster` itself goes to the
/// primary (writes, queries, `with_client`, transactions); reads go to the
/// eligible replicas only through the read handle, [`replica`](Self::replica)
/// (each thread stays on one, the threads spread round-robin; see
/// [`ReadBalance`](crate::ReadBalance)), and to the primary when there are
/// none. [`Reads`](crate::Reads) and [`Writes`](crate::Writes) let generic
/// code take either side, or a transaction.
///
/// Every method blocks the calling thread: first to check out a connection
/// (bounded by [`checkout_timeout`](crate::ClusterBuilder::checkout_timeout)), then
/// for the statement itself (bounded by a deadline only when one is set:
/// [`with_timeout`](Self::with_timeout) or
/// [`statement_timeout`](crate::ClusterBuilder::statement_timeout)).
///
/// ```no_run
/// use pgxkit::Cluster;
///
/// # fn main() -> Result<(), pgxkit::Error> {
/// let cluster = Cluster::builder()
///     .primary("postgres://app@db-primary/app")
///     .replica("postgres://app@db-replica-1/app")
///     .build()?;
/// cluster.execute("INSERT INTO users (name) VALUES ($1)", &[&"ada"])?;
/// let n: i64 = cluster.replica().query_one("SELECT count(*) FROM users", &[])?.get(0);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Cluster {
    pub(crate) inner: Arc<Inner>,
    /// The per-call deadline of this handle (`with_timeout`).
    timeout: Option<Duration>,
    /// This handle's statement mode (`with_statement_mode`), else the cluster's.
    mode: Option<StatementMode>,
}

pub(crate) struct Inner {
    nodes: Arc<Nodes>,
    balancer: Balancer,
    /// What the builder set (the lag limits, the read fallback and the
    /// statement mode are read here).
    settings: Settings,
    pub(crate) hooks: Arc<Hooks>,
    plans: Option<Capture>,
    pub(crate) lifecycle: Lifecycle,
    watchdog: Arc<Watchdog>,
    /// Dropping the sender stops the background threads.
    stop: Mutex<Option<Sender<()>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Inner {
    pub(crate) fn plans(&self) -> Option<&Capture> {
        self.plans.as_ref()
    }

    /// Every node, in the order they were configured.
    pub(crate) fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.nodes()
    }

    /// The nodes, as a background worker holds them.
    #[cfg_attr(not(feature = "prometheus"), allow(dead_code))]
    pub(crate) fn nodes_weak(&self) -> std::sync::Weak<Nodes> {
        Arc::downgrade(&self.nodes)
    }
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let nodes: Vec<_> = self.inner.nodes().map(|n| &n.info).collect();
        f.debug_struct("Cluster")
            .field("nodes", &nodes)
            .field("timeout", &self.timeout)
            .field("statement_mode", &self.mode())
            .finish()
    }
}

impl Cluster {
    pub(crate) fn start(config: ClusterConfig) -> Result<Cluster> {
        let watchdog = Arc::new(Watchdog::default());
        let options = NodeOptions {
            settings: &config.settings,
            hooks: Arc::clone(&config.hooks),
            watchdog: Arc::clone(&watchdog),
        };
        let idle_time = config
            .nodes
            .iter()
            .map(|n| n.pool.max_conn_idle_time)
            .min()
            .unwrap_or(Duration::MAX);
        let configured_primary = config.primary;
        let nodes: Vec<Node> = config
            .nodes
            .into_iter()
            .map(|n| Node::open(n, &options))
            .collect();

        // A probe connection to each node, all at once, each on a thread of
        // its own and bounded by its connect timeout (the start-up exchange
        // too, which a node that accepts and never answers would hold
        // forever: see Connector::connect), and with require_tls
        // checked for encryption. The round below probes them, so the first
        // health() is current and the roles are known; the monitor keeps
        // them for its rounds. The configured primary must answer (unless
        // lazy_connect, which skips it); without one, some node must.
        let require_tls = config.settings.require_tls;
        let lazy = config.settings.lazy_connect;
        let checks: Vec<Option<ConnectionCheck>> = nodes
            .iter()
            .enumerate()
            .map(|(i, node)| {
                (!(lazy && configured_primary == Some(i)))
                    .then(|| ConnectionCheck::start(node, require_tls))
            })
            .collect();
        let results: Vec<Option<Result<Connected>>> = checks
            .into_iter()
            .map(|check| check.map(ConnectionCheck::wait))
            .collect();
        let mut probes = Vec::with_capacity(nodes.len());
        let mut first_error = None;
        for (i, (node, result)) in nodes.iter().zip(results).enumerate() {
            probes.push(match result {
                None => None,
                Some(Ok(client)) => Some(client),
                Some(Err(e)) if e.kind() == ErrorKind::Config => return Err(e),
                Some(Err(e)) if configured_primary == Some(i) => return Err(e),
                Some(Err(e)) => {
                    monitor::record_unreachable(node, &e);
                    log::warn!("{e}; it gets no reads until a health probe reaches it");
                    first_error.get_or_insert(e);
                    None
                }
            });
        }
        if let Some(e) = first_error
            .filter(|_| !lazy && configured_primary.is_none() && probes.iter().all(Option::is_none))
        {
            return Err(e.context(&format!(
                "none of the {} nodes could be reached; the first",
                nodes.len()
            )));
        }

        let (plans, plan_jobs) = match &config.settings.plan_capture {
            Some(settings) => {
                let (capture, jobs) = Capture::new(settings);
                (Some(capture), Some(jobs))
            }
            None => (None, None),
        };
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let (nudge, nudges) = crossbeam_channel::bounded::<()>(1);
        let inner = Arc::new(Inner {
            nodes: Arc::new(Nodes {
                nodes,
                primary: AtomicUsize::new(configured_primary.unwrap_or(topology::NO_PRIMARY)),
                primary_role: AtomicUsize::new(configured_primary.unwrap_or(topology::NO_PRIMARY)),
                decisions: Mutex::default(),
                nudge,
            }),
            balancer: Balancer::new(config.settings.read_balance),
            hooks: config.hooks,
            plans,
            settings: config.settings,
            lifecycle: Lifecycle::default(),
            watchdog,
            stop: Mutex::new(Some(stop_tx)),
            threads: Mutex::new(Vec::new()),
        });
        let thread_error = |what: &str, e: std::io::Error| {
            Error::new(ErrorKind::Config)
                .with_detail(format!("cannot start the {what} thread"))
                .with_source(e)
        };
        let mut probers = monitor::Probers::start(&inner.nodes, probes)
            .map_err(|e| thread_error("health probe", e))?;
        probers.round(&inner.nodes, config.health_check_period, true, false);
        if inner.nodes.primary().is_none() {
            log::warn!(
                "no node is primary (none answered as one): writes fail with NoPrimary \
                 until a health probe finds one"
            );
        }
        let settings = monitor::Settings {
            period: config.health_check_period,
            leak_threshold: inner.settings.leak_threshold,
            idle_time,
        };
        let monitor = monitor::spawn(
            Arc::downgrade(&inner.nodes),
            settings,
            monitor::Wakers {
                stop: stop_rx.clone(),
                nudges,
            },
            probers,
        )
        .map_err(|e| thread_error("health monitor", e))?;
        lock(&inner.threads).push(monitor);
        if let Some(jobs) = plan_jobs {
            let worker = plans::spawn(Arc::downgrade(&inner.nodes), jobs, stop_rx)
                .map_err(|e| thread_error("plan capture", e))?;
            lock(&inner.threads).push(worker);
        }
        Ok(Cluster {
            inner,
            timeout: None,
            mode: None,
        })
    }

    /// A handle to the same cluster whose every call (and every statement of
    /// its transactions) is bounded by `timeout`: checkout included. When it
    /// passes, the running statement is cancelled on the server (a cancel
    /// request sent by a watchdog thread, with the node's TLS settings) and
    /// the call returns [`ErrorKind::Timeout`] shortly after the deadline;
    /// the connection, whose state is then uncertain, is discarded.
    ///
    /// A statement still running 20 ms after the deadline (the node did not
    /// answer the cancel request: a hung server, a stopped host, a network
    /// that drops packets) has its connection's socket shut down, which
    /// ends the call at once (on Linux; see the README's "Every call is
    /// bounded" for how the socket is found and when it cannot be).
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let fast = cluster.with_timeout(Duration::from_millis(200));
    /// match fast.query("SELECT * FROM big_report", &[]) {
    ///     Err(e) if e.kind() == pgxkit::ErrorKind::Timeout => eprintln!("report too slow"),
    ///     other => { other?; }
    /// }
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    #[must_use]
    pub fn with_timeout(&self, timeout: Duration) -> Cluster {
        Cluster {
            inner: Arc::clone(&self.inner),
            timeout: Some(timeout),
            mode: self.mode,
        }
    }

    /// A handle to the same cluster whose calls use `mode` (see
    /// [`StatementMode`]), e.g. the simple protocol for one statement.
    ///
    /// ```no_run
    /// use pgxkit::StatementMode;
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let once = cluster.with_statement_mode(StatementMode::Unnamed);
    /// once.query("SELECT * FROM one_off_report WHERE day = $1", &[&"2026-11-29"])?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    #[must_use]
    pub fn with_statement_mode(&self, mode: StatementMode) -> Cluster {
        Cluster {
            inner: Arc::clone(&self.inner),
            timeout: self.timeout,
            mode: Some(mode),
        }
    }

    /// The statement mode of this handle.
    pub(crate) fn mode(&self) -> StatementMode {
        self.mode.unwrap_or(self.inner.settings.statement_mode)
    }

    /// The deadline of a call starting now.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.timeout.map(|t| Instant::now() + t)
    }

    pub(crate) fn enter(&self) -> Result<InFlight<'_>> {
        self.inner.lifecycle.enter()
    }

    /// The node writes go to now; when no node is known to be primary,
    /// [`ErrorKind::NoPrimary`] (and the monitor is asked to look again).
    #[inline]
    pub(crate) fn primary(&self) -> Result<&Node> {
        match self.inner.nodes.primary() {
            Some(node) => Ok(node),
            None => Err(self.no_primary()),
        }
    }

    #[cold]
    #[inline(never)]
    fn no_primary(&self) -> Error {
        self.inner.nodes.nudge();
        let seen: Vec<String> = self
            .inner
            .nodes()
            .map(|n| {
                let state = match (n.is_up(), n.in_recovery()) {
                    (false, _) => "down",
                    (true, Some(true)) => "in recovery",
                    (true, Some(false)) => "not in recovery",
                    (true, None) => "not probed yet",
                };
                format!("{} {state}", n.info.name())
            })
            .collect();
        Error::new(ErrorKind::NoPrimary).with_detail(format!(
            "no node answers as primary ({}); the health monitor is looking",
            seen.join(", ")
        ))
    }

    /// Whether a replica may take reads now: up, in recovery (as far as
    /// known: a node that claims to be primary but is not the one writes
    /// go to gets no reads), breaker allowing a call, lag within the limits.
    fn eligible(&self, node: &Node) -> bool {
        if !node.is_up() || !node.gate.allows() || node.in_recovery() == Some(false) {
            return false;
        }
        let (bytes, time) = node.lag();
        let over = |value: Option<u64>, limit: Option<u64>| matches!((value, limit), (Some(v), Some(l)) if v > l);
        let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        !over(bytes, self.inner.settings.max_replica_lag_bytes)
            && !over(
                time.map(micros),
                self.inner.settings.max_replica_lag.map(micros),
            )
    }

    /// The node for the next read: the next eligible replica other than
    /// `not`, else the fallback (the primary, or an error).
    pub(crate) fn reader(&self, not: Option<&Node>) -> Result<&Node> {
        let nodes = &self.inner.nodes.nodes;
        let (slots, slot) = self.inner.nodes.replica_slots();
        let pick = self.inner.balancer.pick(slots, |k| {
            let node = slot(k);
            node.info.role() == Role::Replica
                && !not.is_some_and(|n| std::ptr::eq(n, node))
                && self.eligible(node)
        });
        match (pick, self.inner.settings.read_fallback) {
            (Some(k), _) => Ok(slot(k)),
            (None, ReadFallback::Primary) => match self.inner.nodes.primary() {
                Some(node) => Ok(node),
                None => {
                    self.inner.nodes.nudge();
                    Err(Error::new(ErrorKind::NoEligibleReplica).with_detail(
                        "no replica is eligible for reads, and no node is known to be \
                         primary to fall back to",
                    ))
                }
            },
            (None, ReadFallback::Error) => Err(Error::new(ErrorKind::NoEligibleReplica)
                .with_detail(format!(
                    "none of {} replicas is up, allowed by its breaker and within the lag limit",
                    nodes
                        .iter()
                        .filter(|n| n.info.role() == Role::Replica)
                        .count()
                ))),
        }
    }

    /// An operation on the primary: counted in flight, between the hooks,
    /// bounded by this handle's deadline.
    fn on_primary<'s, T>(
        &'s self,
        kind: OperationKind,
        sql: &str,
        params: Params<'_>,
        rows: impl Fn(&T) -> Option<u64>,
        op: impl FnOnce(&'s Node, Option<Instant>) -> Result<T>,
    ) -> Result<T> {
        let _in_flight = self.enter()?;
        let deadline = self.deadline();
        let node = match self.primary() {
            Ok(node) => node,
            Err(e) => return self.without_primary(kind, sql, params, rows, e),
        };
        let what = Op {
            kind,
            route: Role::Primary,
            node: &node.info,
            sql,
            params,
        };
        let result = hooks::around(&self.inner.hooks, what, rows, hooks::itself, || {
            op(node, deadline)
        });
        self.after_write(node, &result, false);
        result
    }

    /// A call for the primary while none is known: its `NoPrimary` error,
    /// shown to the operation hooks (and so the metrics) as a call on the
    /// node that was primary last (the first node if none was).
    #[cold]
    #[inline(never)]
    fn without_primary<T>(
        &self,
        kind: OperationKind,
        sql: &str,
        params: Params<'_>,
        rows: impl Fn(&T) -> Option<u64>,
        e: Error,
    ) -> Result<T> {
        let nodes = &self.inner.nodes.nodes;
        let Some(last) = nodes
            .iter()
            .find(|n| n.info.role() == Role::Primary)
            .or(nodes.first())
        else {
            return Err(e);
        };
        let what = Op {
            kind,
            route: Role::Primary,
            node: &last.info,
            sql,
            params,
        };
        hooks::around(&self.inner.hooks, what, rows, hooks::itself, || Err(e))
    }

    /// When a call on the primary failed in a way that may mean a
    /// failover, asks the monitor to look at once; when the server
    /// refused a write as read-only (25006) outside a transaction the
    /// caller made read-only, it is in recovery now (demoted): it takes no
    /// more writes until a probe finds it primary again, so each writer
    /// sends at most its call in flight to it.
    #[inline]
    pub(crate) fn after_write<T>(&self, node: &Node, result: &Result<T>, read_only: bool) {
        if let Err(e) = result {
            if e.suggests_failover() {
                self.refused_write(node, e, read_only);
            }
        }
    }

    #[cold]
    #[inline(never)]
    fn refused_write(&self, node: &Node, e: &Error, read_only: bool) {
        let nodes = &*self.inner.nodes;
        if !read_only && e.code() == Some(&postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION) {
            let is_primary = nodes.primary().is_some_and(|p| std::ptr::eq(p, node));
            if is_primary {
                log::warn!(
                    "{} refused a write as read-only: taking it out of writes",
                    node.info
                );
                node.set_replication(Some(true), None, None);
                nodes.decide();
            }
        }
        nodes.nudge();
    }

    /// A read on the next eligible node; if that fails at the connection
    /// level (the whole result is lost, no row was returned), it runs once
    /// more on another eligible node, within the same deadline.
    pub(crate) fn read<'s, T>(
        &'s self,
        kind: OperationKind,
        sql: &str,
        params: Params<'_>,
        rows: impl Fn(&T) -> Option<u64>,
        op: impl Fn(&'s Node, Option<Instant>) -> Result<T>,
    ) -> Result<T> {
        let _in_flight = self.enter()?;
        let deadline = self.deadline();
        let hooks = &*self.inner.hooks;
        let what = |node: &'s Node| Op {
            kind,
            route: Role::Replica,
            node: &node.info,
            sql,
            params,
        };
        let first = self.reader(None)?;
        match hooks::around(hooks, what(first), &rows, hooks::itself, || {
            op(first, deadline)
        }) {
            Err(e) if e.is_connection_error() => {
                let second = match self.reader(Some(first)) {
                    Ok(n) if !std::ptr::eq(n, first) => n,
                    _ => return Err(e),
                };
                log::warn!("read failed on {}, trying {}: {e}", first.info, second.info);
                hooks::around(hooks, what(second), &rows, hooks::itself, || {
                    op(second, deadline)
                })
            }
            other => other,
        }
    }

    /// A statement as this handle runs it: its statement mode, the
    /// cluster's plan capture.
    pub(crate) fn stmt<'a>(
        &'a self,
        (kind, route): (OperationKind, Role),
        sql: &'a str,
        params: Params<'a>,
        call: Call,
    ) -> Stmt<'a> {
        Stmt {
            mode: self.mode(),
            kind,
            route,
            sql,
            params,
            call,
            plans: self.inner.plans(),
        }
    }

    /// One parameterised statement routed as `route` says: to the primary,
    /// or (through [`read`](Self::read)) to an eligible replica; `done`
    /// turns its output into the caller's result.
    #[inline]
    pub(crate) fn routed<T>(
        &self,
        (kind, route): (OperationKind, Role),
        sql: &str,
        params: Params<'_>,
        call: Call,
        rows: impl Fn(&T) -> Option<u64>,
        done: impl Fn(Output, &Node) -> Result<T>,
    ) -> Result<T> {
        let op = |node: &Node, deadline| {
            let stmt = self.stmt((kind, route), sql, params, call);
            node.call(deadline, |mut lease| {
                node.run_stmt(&mut lease, deadline, &stmt)
            })
            .and_then(|out| done(out, node))
        };
        match route {
            Role::Primary => self.on_primary(kind, sql, params, rows, op),
            Role::Replica => self.read(kind, sql, params, rows, op),
        }
    }

    /// One parameterised statement on `node` (a read the caller chose the
    /// node for): counted in flight, between the hooks, bounded by this
    /// handle's deadline.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn routed_on<T>(
        &self,
        node: &Node,
        (kind, route): (OperationKind, Role),
        sql: &str,
        params: Params<'_>,
        call: Call,
        rows: impl Fn(&T) -> Option<u64>,
        done: impl Fn(Output, &Node) -> Result<T>,
    ) -> Result<T> {
        let _in_flight = self.enter()?;
        let deadline = self.deadline();
        let what = Op {
            kind,
            route,
            node: &node.info,
            sql,
            params,
        };
        hooks::around(&self.inner.hooks, what, rows, hooks::itself, || {
            let stmt = self.stmt((kind, route), sql, params, call);
            node.call(deadline, |mut lease| {
                node.run_stmt(&mut lease, deadline, &stmt)
            })
            .and_then(|out| done(out, node))
        })
    }

    /// The eligible replica whose turn it is among those `also` accepts.
    pub(crate) fn replica_where(&self, also: impl Fn(&Node) -> bool) -> Option<&Node> {
        let (slots, slot) = self.inner.nodes.replica_slots();
        let pick = self.inner.balancer.pick(slots, |k| {
            let node = slot(k);
            node.info.role() == Role::Replica && self.eligible(node) && also(node)
        })?;
        Some(slot(pick))
    }

    /// A streamed query routed as `route` says.
    pub(crate) fn routed_iter<'s>(
        &'s self,
        route: Role,
        sql: &str,
        params: Params<'_>,
    ) -> Result<RowIter<'s>> {
        let open =
            |node: &'s Node, deadline| RowIter::open(node, self.enter()?, deadline, sql, params);
        let kind = OperationKind::QueryIter;
        let rows = |_: &RowIter<'_>| None;
        match route {
            Role::Primary => self.on_primary(kind, sql, params, rows, open),
            Role::Replica => self.read(kind, sql, params, rows, open),
        }
    }

    /// A caller's closure on a pooled connection of `node`, between the
    /// hooks, bounded by this handle's deadline.
    pub(crate) fn lend<T, E: From<Error>>(
        &self,
        route: Role,
        node: &Node,
        f: impl FnOnce(&mut postgres::Client) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        let _in_flight = self.enter()?;
        let deadline = self.deadline();
        let what = Op {
            kind: OperationKind::WithClient,
            route,
            node: &node.info,
            sql: "",
            params: &[],
        };
        hooks::around(
            &self.inner.hooks,
            what,
            |_| None,
            hooks::opaque,
            || node.lend(deadline, f),
        )
    }

    /// Runs a statement on the primary and returns the number of rows it
    /// affected. Parameters are bound as in `postgres` (`$1`, `$2`, ...).
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let n = cluster.execute("UPDATE users SET active = $1 WHERE id = $2", &[&true, &42i64])?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn execute(&self, sql: &str, params: Params<'_>) -> Result<u64> {
        let kind = (OperationKind::Execute, Role::Primary);
        self.routed(kind, sql, params, Call::Execute, |n| Some(*n), count)
    }

    /// Runs a query on the primary and returns all rows.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// for row in cluster.query("SELECT id, name FROM users WHERE id > $1", &[&10i64])? {
    ///     let (id, name): (i64, String) = (row.get(0), row.get(1));
    /// }
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn query(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>> {
        let kind = (OperationKind::Query, Role::Primary);
        self.routed(kind, sql, params, Call::Query, row_count, all_rows)
    }

    /// Runs a query on the primary that must return exactly one row:
    /// [`ErrorKind::NotFound`] for none, [`ErrorKind::TooManyRows`] for more.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let id: i64 = cluster.query_one("INSERT INTO users (name) VALUES ($1) RETURNING id", &[&"ada"])?.get(0);
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn query_one(&self, sql: &str, params: Params<'_>) -> Result<Row> {
        let kind = (OperationKind::QueryOne, Role::Primary);
        self.routed(kind, sql, params, Call::QueryOpt, |_| Some(1), exactly_one)
    }

    /// Runs a query on the primary that returns at most one row.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let name: Option<String> = cluster
    ///     .query_opt("SELECT name FROM users WHERE id = $1", &[&42i64])?
    ///     .map(|row| row.get(0));
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn query_opt(&self, sql: &str, params: Params<'_>) -> Result<Option<Row>> {
        let kind = (OperationKind::QueryOpt, Role::Primary);
        self.routed(kind, sql, params, Call::QueryOpt, opt_count, at_most_one)
    }

    /// Streams a query's rows from the primary: read in batches of 1,000
    /// through a server-side cursor (in a transaction of its own, committed
    /// when the iterator is dropped), so memory holds one batch whatever the
    /// result's size. The iterator holds a pooled connection, and counts as
    /// in flight for `shutdown`, until dropped; each batch's round trip is
    /// bounded by this handle's deadline; hooks and metrics see the opening
    /// (the first batch) as `query_iter`. Dropping it early returns the
    /// connection clean (cursor closed, transaction ended).
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// for row in cluster.query_iter("SELECT id, email FROM users ORDER BY id", &[])? {
    ///     let row = row?;
    ///     let (id, email): (i64, String) = (row.get(0), row.get(1));
    ///     println!("{id} {email}");
    /// }
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn query_iter(&self, sql: &str, params: Params<'_>) -> Result<RowIter<'_>> {
        self.routed_iter(Role::Primary, sql, params)
    }

    /// Copies data into a table on the primary: `sql` is a `COPY ... FROM
    /// STDIN` statement, `data` its input in the statement's format (text,
    /// CSV or binary), streamed in 64 KiB chunks. Returns the rows copied.
    /// Counted in flight for shutdown, bounded by this handle's deadline,
    /// seen by the operation hooks and metrics as `copy_in`. If `data`
    /// fails, the COPY is aborted (nothing is copied) and the error is
    /// [`ErrorKind::Io`] with the I/O error as its source.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let csv = "1,ada\n2,grace\n";
    /// let rows = cluster.copy_in("COPY users (id, name) FROM STDIN (FORMAT csv)", csv.as_bytes())?;
    /// assert_eq!(rows, 2);
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn copy_in(&self, sql: &str, mut data: impl std::io::Read) -> Result<u64> {
        self.on_primary(
            OperationKind::CopyIn,
            sql,
            &[],
            |n: &u64| Some(*n),
            |node, deadline| {
                let mut failed = None;
                let result = node.call_bounded(deadline, |conn| {
                    crate::copy::copy_in(conn, sql, &mut data, &mut failed)
                });
                crate::copy::outcome(result, failed, &node.info, "reading the data")
            },
        )
    }

    /// Copies data out of the primary: `sql` is a `COPY ... TO STDOUT`
    /// statement (or `COPY (SELECT ...) TO STDOUT`); its output is written
    /// to `out` as it arrives, never held whole. Returns the bytes written.
    /// Counted, bounded and observed as [`copy_in`](Self::copy_in) is (as
    /// `copy_out`). If `out` fails, the rest is not read, the connection is
    /// discarded and the error is [`ErrorKind::Io`].
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let mut file = std::fs::File::create("users.csv").expect("a file");
    /// cluster.copy_out("COPY users TO STDOUT (FORMAT csv)", &mut file)?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn copy_out(&self, sql: &str, mut out: impl std::io::Write) -> Result<u64> {
        self.on_primary(
            OperationKind::CopyOut,
            sql,
            &[],
            |_: &u64| None,
            |node, deadline| {
                let mut failed = None;
                let result = node.call_bounded(deadline, |conn| {
                    crate::copy::copy_out(conn, sql, &mut out, &mut failed)
                });
                crate::copy::outcome(result, failed, &node.info, "writing the output")
            },
        )
    }

    /// Runs one or more statements separated by semicolons on the primary,
    /// with the simple protocol (no parameters).
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// cluster.batch_execute("CREATE TABLE IF NOT EXISTS users (id bigserial PRIMARY KEY, name text)")?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn batch_execute(&self, sql: &str) -> Result<()> {
        self.on_primary(
            OperationKind::BatchExecute,
            sql,
            &[],
            |_| None,
            |node, deadline| node.call_bounded(deadline, |c| c.batch_execute(sql)),
        )
    }

    /// Lends a pooled primary connection for anything the methods above do
    /// not cover (`query_raw`, `simple_query`, a migration runner that takes
    /// a `&mut postgres::Client`). The closure returns the caller's own
    /// error type `E` (any type with `From<pgxkit::Error>`; `pgxkit::Error`
    /// itself converts the driver's errors, so `?` works on them), which
    /// comes back unchanged; only when this handle's deadline fired during
    /// the call is the result [`ErrorKind::Timeout`]. Counted in flight,
    /// bounded by the deadline, seen by the hooks as `with_client`. Leave
    /// the connection as you found it: a transaction left open, or a `SET`
    /// without `RESET`, stays on it for the next user; a connection the
    /// closure leaves closed is discarded.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let messages = cluster.with_client(|client| {
    ///     let rows = client.simple_query("SELECT 1; SELECT 2")?;
    ///     Ok::<_, pgxkit::Error>(rows.len())
    /// })?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn with_client<T, E: From<Error>>(
        &self,
        f: impl FnOnce(&mut postgres::Client) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        self.lend(Role::Primary, self.primary()?, f)
    }

    /// A snapshot of every node's pool. Takes each pool's lock briefly; the
    /// counters are read without locks.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// for node in cluster.stats().nodes {
    ///     println!("{}: {} in use, {} acquires", node.node, node.pool.in_use_conns, node.pool.acquire_count);
    /// }
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    #[must_use]
    pub fn stats(&self) -> ClusterStats {
        ClusterStats {
            nodes: self.inner.nodes().map(Node::stats).collect(),
            primary: self.inner.nodes.primary_index(),
        }
    }

    /// A cheap liveness check of the primary, like the Go library's
    /// `HealthCheck`: a checkout and one round trip, together bounded by
    /// 5 seconds. Fails fast with `CircuitOpen` when the primary's breaker is open.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// if let Err(e) = cluster.health_check() {
    ///     eprintln!("database unavailable: {e}");
    /// }
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn health_check(&self) -> Result<()> {
        self.ping_primary(HEALTH_CHECK_TIMEOUT)
    }

    /// Whether the primary answers within 2 seconds (checkout plus a round
    /// trip): the readiness probe.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let status = if cluster.is_ready() { 200 } else { 503 };
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    #[must_use]
    pub fn is_ready(&self) -> bool {
        self.ping_primary(READY_TIMEOUT).is_ok()
    }

    fn ping_primary(&self, timeout: Duration) -> Result<()> {
        let _in_flight = self.enter()?;
        let node = self.primary()?;
        let started = Instant::now();
        let result = node.call_with(
            |pool| pool.checkout_within(timeout),
            |mut conn| {
                let left = timeout
                    .saturating_sub(started.elapsed())
                    .max(Duration::from_millis(1));
                let result = conn.client.is_valid(left);
                result.map_err(|e| node.failed(&mut conn, e))
            },
        );
        self.after_write(node, &result, false);
        result
    }

    /// The cluster's health as the monitor last saw it, with live pool
    /// numbers; no I/O. See [`HealthReport`].
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let report = cluster.health();
    /// println!("{}: {} node(s)", report.status, report.nodes.len());
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    #[must_use]
    pub fn health(&self) -> HealthReport {
        let nodes = self
            .inner
            .nodes()
            .map(|node| {
                let stats = node.stats();
                let probe = node.probe_record();
                let mut h = NodeHealth {
                    eligible_for_reads: node.info.role() == Role::Replica && self.eligible(node),
                    node: stats.node,
                    up: stats.up,
                    in_recovery: probe.in_recovery,
                    timeline: node.timeline().filter(|_| probe.in_recovery == Some(false)),
                    breaker: stats.breaker,
                    breaker_retry_in: (stats.breaker == crate::BreakerState::Open)
                        .then(|| node.gate.retry_after()),
                    lag_bytes: stats.lag_bytes,
                    lag: stats.lag,
                    in_use_conns: stats.pool.in_use_conns,
                    max_conns: stats.pool.max_conns,
                    pool_utilization: stats.pool.utilization(),
                    last_check: probe.checked_at,
                    last_error: probe.error,
                    warnings: Vec::new(),
                };
                h.warnings = health::warnings(
                    &h,
                    self.inner.settings.max_replica_lag,
                    self.inner.settings.max_replica_lag_bytes,
                );
                h
            })
            .collect();
        let primary = self.inner.nodes.primary_index();
        HealthReport::new(nodes, primary)
    }

    /// Whether each node's connections are encrypted, with protocol and
    /// cipher, from `pg_stat_ssl` for a pooled connection's own backend.
    /// One entry per node, in the order they were configured; a node that cannot be reached
    /// gives its error. Blocks for one checkout and round trip per node.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app?sslmode=require")?;
    /// for status in cluster.ssl_status() {
    ///     let s = status?;
    ///     println!("{}: encrypted={} {:?} {:?}", s.node, s.encrypted, s.version, s.cipher);
    /// }
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn ssl_status(&self) -> Vec<Result<SslStatus>> {
        self.inner
            .nodes()
            .map(|node| {
                let _in_flight = self.enter()?;
                ssl_status::pooled_ssl_status(node, self.deadline())
            })
            .collect()
    }

    /// Shuts the cluster down gracefully, waiting at most `deadline`.
    ///
    /// From the moment of the call, new operations (on every clone) fail at
    /// once with [`ErrorKind::ShuttingDown`]. Operations and transactions
    /// already running may finish until the deadline; the `on_shutdown`
    /// hooks run; the background threads (health monitor, plan capture,
    /// deadline watchdog) are stopped and joined; the pools close their idle
    /// connections, and connections still in use are closed when they come
    /// back. Blocks until everything drained or `deadline` passed, whichever
    /// is first: there is no fixed sleep. Calling it again waits again and
    /// reports again.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let report = cluster.shutdown(Duration::from_secs(30));
    /// assert!(report.drained || report.still_running > 0);
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    #[must_use = "the report says whether everything drained in time"]
    pub fn shutdown(&self, deadline: Duration) -> ShutdownReport {
        let started = Instant::now();
        let until = started + deadline;
        let inner = &*self.inner;
        let in_flight_at_start = inner.lifecycle.begin_shutdown();
        log::info!(
            "shutting down: {in_flight_at_start} operations in flight, deadline {deadline:?}"
        );
        let event = ShutdownEvent {
            deadline,
            in_flight: in_flight_at_start,
        };
        hooks::notify(&inner.hooks.on_shutdown, "on_shutdown", |hook| hook(&event));
        let still_running = inner.lifecycle.wait_drained(until);

        // Stop the background threads: the channel disconnects for all of them.
        drop(lock(&inner.stop).take());
        let mut threads: Vec<JoinHandle<()>> = std::mem::take(&mut *lock(&inner.threads));
        threads.extend(inner.watchdog.stop());
        for thread in threads {
            join_until(thread, until);
        }
        for node in inner.nodes() {
            node.pool.close();
        }
        let report = ShutdownReport {
            drained: still_running == 0,
            in_flight_at_start,
            still_running,
            elapsed: started.elapsed(),
        };
        log::info!("shut down: {report:?}");
        report
    }
}

/// Joins `thread` if it ends before `until`; otherwise leaves it to end on
/// its own (each stops at its next wake-up).
fn join_until(thread: JoinHandle<()>, until: Instant) {
    while !thread.is_finished() {
        if Instant::now() >= until {
            log::debug!(
                "a background thread is still busy at the shutdown deadline; not waiting for it"
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = thread.join();
}

// `&Vec` because the row counter takes the operation's own result type by reference.
#[allow(clippy::ptr_arg)]
pub(crate) fn row_count(rows: &Vec<Row>) -> Option<u64> {
    Some(rows.len() as u64)
}

pub(crate) fn opt_count(row: &Option<Row>) -> Option<u64> {
    Some(u64::from(row.is_some()))
}

pub(crate) fn count(out: Output, _: &Node) -> Result<u64> {
    Ok(out.count())
}

pub(crate) fn all_rows(out: Output, _: &Node) -> Result<Vec<Row>> {
    Ok(out.rows())
}

pub(crate) fn exactly_one(out: Output, node: &Node) -> Result<Row> {
    match at_most_one(out, node)? {
        Some(row) => Ok(row),
        None => Err(not_found(node)),
    }
}

pub(crate) fn at_most_one(out: Output, node: &Node) -> Result<Option<Row>> {
    out.opt().map_err(|()| too_many_rows(node))
}

#[cold]
#[inline(never)]
fn not_found(node: &Node) -> Error {
    Error::new(ErrorKind::NotFound).with_node(&node.info)
}

#[cold]
#[inline(never)]
fn too_many_rows(node: &Node) -> Error {
    Error::new(ErrorKind::TooManyRows)
        .with_node(&node.info)
        .with_detail("more than one row")
}
