//! Hooks: what runs before and after operations, around connections and on
//! cluster events, with event structs whose fields are behind getters (so
//! fields can be added), and ready-made hooks for the common cases.
//!
//! Every hook is called outside every lock. A hook that panics is contained:
//! the operation gets an [`ErrorKind::Hook`] error
//! (for event-only hooks the panic is logged), no lock is poisoned and no
//! connection leaks.

use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Duration;

use postgres::types::ToSql;

use crate::breaker::BreakerState;
use crate::error::{Error, ErrorKind};
use crate::info::{NodeInfo, Role};

/// What a hook returns: `Err` vetoes (before-hooks) or reports (after-hooks).
///
/// ```
/// let veto: pgxkit::HookResult = Err("not from this service".into());
/// assert!(veto.is_err());
/// ```
pub type HookResult = std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// The operation a hook event is about.
///
/// ```
/// let builder = pgxkit::Cluster::builder().after_operation(|op| {
///     if op.kind() == pgxkit::OperationKind::CopyIn {
///         log::info!("bulk load of {:?} rows", op.rows());
///     }
///     Ok(())
/// });
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum OperationKind {
    /// `execute`.
    Execute,
    /// `query`.
    Query,
    /// `query_one`.
    QueryOne,
    /// `query_opt`.
    QueryOpt,
    /// `batch_execute`.
    BatchExecute,
    /// `with_client` (no SQL is known).
    WithClient,
    /// `copy_in` (`COPY ... FROM STDIN`).
    CopyIn,
    /// `copy_out` (`COPY ... TO STDOUT`).
    CopyOut,
    /// `query_iter`: the hooks see its opening (the cursor declared, the
    /// first batch fetched), not each later batch.
    QueryIter,
}

impl OperationKind {
    /// The snake-case name, as used in logs and metric labels (`query_one`).
    ///
    /// ```
    /// assert_eq!(pgxkit::OperationKind::QueryOne.as_str(), "query_one");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            OperationKind::Execute => "execute",
            OperationKind::Query => "query",
            OperationKind::QueryOne => "query_one",
            OperationKind::QueryOpt => "query_opt",
            OperationKind::BatchExecute => "batch_execute",
            OperationKind::WithClient => "with_client",
            OperationKind::CopyIn => "copy_in",
            OperationKind::CopyOut => "copy_out",
            OperationKind::QueryIter => "query_iter",
        }
    }
}

impl fmt::Display for OperationKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Statement parameters as hooks see them: always the count, the values
/// only when the builder's `log_parameters(true)` allows (they may hold
/// personal data).
#[derive(Clone, Copy)]
pub(crate) struct ParamView<'a> {
    params: &'a [&'a (dyn ToSql + Sync)],
    visible: bool,
}

impl<'a> ParamView<'a> {
    pub(crate) fn new(params: &'a [&'a (dyn ToSql + Sync)], visible: bool) -> Self {
        ParamView { params, visible }
    }

    fn texts(&self) -> Option<Vec<String>> {
        self.visible
            .then(|| self.params.iter().map(|p| format!("{p:?}")).collect())
    }
}

/// Seen by `before_operation` hooks; an `Err` from one vetoes the operation.
///
/// ```
/// let builder = pgxkit::Cluster::builder().before_operation(|op| {
///     if op.sql().contains("DROP TABLE") {
///         return Err("no DROP TABLE from the application".into());
///     }
///     Ok(())
/// });
/// ```
pub struct BeforeOperation<'a> {
    pub(crate) kind: OperationKind,
    pub(crate) route: Role,
    pub(crate) sql: &'a str,
    pub(crate) node: &'a NodeInfo,
    pub(crate) params: ParamView<'a>,
}

impl BeforeOperation<'_> {
    /// Which operation.
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder().before_operation(|op| {
    ///     log::debug!("kind: {:?}", op.kind());
    ///     Ok(())
    /// });
    /// ```
    pub fn kind(&self) -> OperationKind {
        self.kind
    }
    /// The SQL (empty for `with_client`).
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder().before_operation(|op| {
    ///     log::debug!("sql: {:?}", op.sql());
    ///     Ok(())
    /// });
    /// ```
    pub fn sql(&self) -> &str {
        self.sql
    }
    /// The node it will run on.
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder().before_operation(|op| {
    ///     log::debug!("node: {:?}", op.node());
    ///     Ok(())
    /// });
    /// ```
    pub fn node(&self) -> &NodeInfo {
        self.node
    }
    /// The node's role.
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder().before_operation(|op| {
    ///     log::debug!("role: {:?}", op.role());
    ///     Ok(())
    /// });
    /// ```
    pub fn role(&self) -> Role {
        self.node.role()
    }
    /// How the call was routed: [`Role::Replica`] for a call through the
    /// read handle ([`Cluster::replica`](crate::Cluster::replica)), even
    /// when it fell back to the primary; [`Role::Primary`] otherwise.
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder().before_operation(|op| {
    ///     log::debug!("route: {:?}", op.route());
    ///     Ok(())
    /// });
    /// ```
    pub fn route(&self) -> Role {
        self.route
    }
    /// How many parameters the statement has.
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder().before_operation(|op| {
    ///     log::debug!("param_count: {:?}", op.param_count());
    ///     Ok(())
    /// });
    /// ```
    pub fn param_count(&self) -> usize {
        self.params.params.len()
    }
    /// The parameters as `Debug` text, only when `log_parameters(true)` is set.
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder().before_operation(|op| {
    ///     log::debug!("params: {:?}", op.params());
    ///     Ok(())
    /// });
    /// ```
    pub fn params(&self) -> Option<Vec<String>> {
        self.params.texts()
    }
}

impl fmt::Debug for BeforeOperation<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BeforeOperation")
            .field("kind", &self.kind)
            .field("route", &self.route)
            .field("sql", &self.sql)
            .field("node", &self.node)
            .field("param_count", &self.param_count())
            .finish_non_exhaustive()
    }
}

/// Seen by `after_operation` hooks: what ran, where, how long, and how it ended.
///
/// ```
/// use std::time::Duration;
/// let builder = pgxkit::Cluster::builder().after_operation(|op| {
///     if op.duration() > Duration::from_millis(250) {
///         log::warn!("slow {} on {}: {:?}", op.kind(), op.node(), op.duration());
///     }
///     Ok(())
/// });
/// ```
pub struct AfterOperation<'a> {
    pub(crate) before: BeforeOperation<'a>,
    pub(crate) duration: Duration,
    pub(crate) rows: Option<u64>,
    pub(crate) error: Option<&'a Error>,
    pub(crate) failed: bool,
}

impl AfterOperation<'_> {
    /// Which operation.
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder().after_operation(|op| {
    ///     log::debug!("kind: {:?}", op.kind());
    ///     Ok(())
    /// });
    /// ```
    pub fn kind(&self) -> OperationKind {
        self.before.kind
    }
    /// The SQL (empty for `with_client`).
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder().after_operation(|op| {
    ///     log::debug!("sql: {:?}", op.sql());
    ///     Ok(())
    /// });
    /// ```
    pub fn sql(&self) -> &str {
        self.before.sql
    }
    /// The node it ran on.
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder().after_operation(|op| {
    ///     log::debug!("node: {:?}", op.node());
    ///     Ok(())
    /// });
    /// ```
    pub fn node(&self) -> &NodeInfo {
        self.before.node
    }
    /// The node's role.
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder().after_operation(|op| {
    ///     log::debug!("role: {:?}", op.role());
    ///     Ok(())
    /// });
    /// ```
    pub fn role(&self) -> Role {
        self.before.node.role()
    }
    /// How the call was routed (see [`BeforeOperation::route`]).
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder().after_operation(|op| {
    ///     log::debug!("route: {:?}", op.route());
    ///     Ok(())
    /// });
    /// ```
    pub fn route(&self) -> Role {
        self.before.route
    }
    /// How many parameters the statement had.
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder().after_operation(|op| {
    ///     log::debug!("param_count: {:?}", op.param_count());
    ///     Ok(())
    /// });
    /// ```
    pub fn param_count(&self) -> usize {
        self.before.param_count()
    }
    /// The parameters as `Debug` text, only when `log_parameters(true)` is set.
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder().after_operation(|op| {
    ///     log::debug!("params: {:?}", op.params());
    ///     Ok(())
    /// });
    /// ```
    pub fn params(&self) -> Option<Vec<String>> {
        self.before.params()
    }
    /// From just before checkout to the end of the statement.
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder().after_operation(|op| {
    ///     log::debug!("duration: {:?}", op.duration());
    ///     Ok(())
    /// });
    /// ```
    pub fn duration(&self) -> Duration {
        self.duration
    }
    /// Rows affected (`execute`) or returned (queries), where known.
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder().after_operation(|op| {
    ///     log::debug!("rows: {:?}", op.rows());
    ///     Ok(())
    /// });
    /// ```
    pub fn rows(&self) -> Option<u64> {
        self.rows
    }
    /// The operation's error, if it failed with a `pgxkit::Error`
    /// (`None` too when a closure returned an error of the caller's own type).
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder().after_operation(|op| {
    ///     log::debug!("error: {:?}", op.error());
    ///     Ok(())
    /// });
    /// ```
    pub fn error(&self) -> Option<&Error> {
        self.error
    }
    /// Whether it succeeded.
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder().after_operation(|op| {
    ///     log::debug!("is_ok: {:?}", op.is_ok());
    ///     Ok(())
    /// });
    /// ```
    pub fn is_ok(&self) -> bool {
        !self.failed
    }
}

impl fmt::Debug for AfterOperation<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AfterOperation")
            .field("kind", &self.kind())
            .field("route", &self.route())
            .field("sql", &self.sql())
            .field("node", &self.node())
            .field("duration", &self.duration)
            .field("rows", &self.rows)
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

/// How a transaction ended.
///
/// ```
/// use pgxkit::hooks::TransactionOutcome;
/// let builder = pgxkit::Cluster::builder().after_transaction(|tx| {
///     if tx.outcome() == Some(TransactionOutcome::Unknown) {
///         log::error!("a COMMIT on {} may or may not have happened", tx.node());
///     }
///     Ok(())
/// });
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TransactionOutcome {
    /// Committed.
    Commit,
    /// Rolled back (by the caller, on error, on panic, or by dropping the guard).
    Rollback,
    /// The connection failed while `COMMIT` was in flight: unknown.
    Unknown,
}

/// Seen by `before_transaction` (no outcome yet) and `after_transaction` hooks.
///
/// ```
/// let builder = pgxkit::Cluster::builder().after_transaction(|tx| {
///     log::debug!("{:?} on {} after {:?} (error: {:?})", tx.outcome(), tx.node(), tx.duration(), tx.error());
///     Ok(())
/// });
/// ```
pub struct TransactionEvent<'a> {
    pub(crate) node: &'a NodeInfo,
    pub(crate) read_only: bool,
    pub(crate) outcome: Option<TransactionOutcome>,
    pub(crate) duration: Duration,
    pub(crate) error: Option<&'a Error>,
}

impl TransactionEvent<'_> {
    /// The node the transaction runs on.
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder().after_transaction(|tx| {
    ///     log::debug!("node: {:?}", tx.node());
    ///     Ok(())
    /// });
    /// ```
    pub fn node(&self) -> &NodeInfo {
        self.node
    }
    /// Whether it is a read-only transaction.
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder().after_transaction(|tx| {
    ///     log::debug!("read_only: {:?}", tx.read_only());
    ///     Ok(())
    /// });
    /// ```
    pub fn read_only(&self) -> bool {
        self.read_only
    }
    /// Commit or rollback (`None` in `before_transaction`).
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder().after_transaction(|tx| {
    ///     log::debug!("outcome: {:?}", tx.outcome());
    ///     Ok(())
    /// });
    /// ```
    pub fn outcome(&self) -> Option<TransactionOutcome> {
        self.outcome
    }
    /// From `BEGIN` to the end (zero in `before_transaction`).
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder().after_transaction(|tx| {
    ///     log::debug!("duration: {:?}", tx.duration());
    ///     Ok(())
    /// });
    /// ```
    pub fn duration(&self) -> Duration {
        self.duration
    }
    /// The error that ended it, if any.
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder().after_transaction(|tx| {
    ///     log::debug!("error: {:?}", tx.error());
    ///     Ok(())
    /// });
    /// ```
    pub fn error(&self) -> Option<&Error> {
        self.error
    }
}

impl fmt::Debug for TransactionEvent<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransactionEvent")
            .field("node", &self.node)
            .field("read_only", &self.read_only)
            .field("outcome", &self.outcome)
            .field("duration", &self.duration)
            .finish_non_exhaustive()
    }
}

/// Why a connection left its pool.
///
/// ```
/// use pgxkit::hooks::DisconnectReason;
/// let builder = pgxkit::Cluster::builder().on_disconnect(|ev| {
///     if ev.reason() == Some(DisconnectReason::Broken) {
///         log::warn!("lost a connection to {}", ev.node());
///     }
/// });
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DisconnectReason {
    /// Its lifetime was over.
    Lifetime,
    /// It sat idle too long.
    Idle,
    /// It broke (or failed validation).
    Broken,
}

/// Seen by connection hooks (`on_disconnect`, `on_acquire`, `on_release`).
///
/// ```
/// let builder = pgxkit::Cluster::builder()
///     .on_acquire(|ev| log::trace!("{}: waited {:?}", ev.node(), ev.duration()));
/// ```
#[derive(Debug)]
pub struct ConnectionEvent<'a> {
    pub(crate) node: &'a NodeInfo,
    pub(crate) duration: Duration,
    pub(crate) reason: Option<DisconnectReason>,
}

impl ConnectionEvent<'_> {
    /// The connection's node.
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder()
    ///     .on_release(|ev| log::debug!("node: {:?}", ev.node()));
    /// ```
    pub fn node(&self) -> &NodeInfo {
        self.node
    }
    /// `on_acquire`: the wait for the connection; `on_release`: how long it
    /// was held; `on_disconnect`: its age.
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder()
    ///     .on_release(|ev| log::debug!("duration: {:?}", ev.duration()));
    /// ```
    pub fn duration(&self) -> Duration {
        self.duration
    }
    /// `on_disconnect`: why it was closed.
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder()
    ///     .on_release(|ev| log::debug!("reason: {:?}", ev.reason()));
    /// ```
    pub fn reason(&self) -> Option<DisconnectReason> {
        self.reason
    }
}

/// Seen by `on_breaker_state_change`, `on_node_health_change` and
/// `on_role_change` hooks.
///
/// ```
/// let builder = pgxkit::Cluster::builder()
///     .on_node_health_change(|ev| log::warn!("{}: up = {:?}", ev.node(), ev.up()));
/// ```
#[derive(Debug)]
pub struct NodeEvent<'a> {
    pub(crate) node: &'a NodeInfo,
    pub(crate) breaker: Option<(BreakerState, BreakerState)>,
    pub(crate) up: Option<bool>,
    pub(crate) role: Option<(Role, Role)>,
}

impl NodeEvent<'_> {
    /// The node.
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder()
    ///     .on_breaker_state_change(|ev| log::debug!("node: {:?}", ev.node()));
    /// ```
    pub fn node(&self) -> &NodeInfo {
        self.node
    }
    /// For a breaker change: the states before and after.
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder()
    ///     .on_breaker_state_change(|ev| log::debug!("breaker_change: {:?}", ev.breaker_change()));
    /// ```
    pub fn breaker_change(&self) -> Option<(BreakerState, BreakerState)> {
        self.breaker
    }
    /// For a health change: whether the node is up now.
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder()
    ///     .on_breaker_state_change(|ev| log::debug!("up: {:?}", ev.up()));
    /// ```
    pub fn up(&self) -> Option<bool> {
        self.up
    }
    /// For a role change: the roles before and after (the node itself
    /// already shows the new one).
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder()
    ///     .on_role_change(|ev| log::warn!("{}: {:?}", ev.node(), ev.role_change()));
    /// ```
    pub fn role_change(&self) -> Option<(Role, Role)> {
        self.role
    }
}

/// Seen by `on_shutdown` hooks.
///
/// ```
/// let builder = pgxkit::Cluster::builder()
///     .on_shutdown(|ev| log::info!("{} in flight, deadline {:?}", ev.in_flight(), ev.deadline()));
/// ```
#[derive(Debug)]
pub struct ShutdownEvent {
    pub(crate) deadline: Duration,
    pub(crate) in_flight: usize,
}

impl ShutdownEvent {
    /// The deadline given to `shutdown`.
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder()
    ///     .on_shutdown(|ev| log::debug!("deadline: {:?}", ev.deadline()));
    /// ```
    pub fn deadline(&self) -> Duration {
        self.deadline
    }
    /// Operations still running when shutdown began.
    ///
    /// ```
    /// let builder = pgxkit::Cluster::builder()
    ///     .on_shutdown(|ev| log::debug!("in_flight: {:?}", ev.in_flight()));
    /// ```
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }
}

pub(crate) type BeforeOperationHook = Arc<dyn Fn(&BeforeOperation<'_>) -> HookResult + Send + Sync>;
pub(crate) type AfterOperationHook = Arc<dyn Fn(&AfterOperation<'_>) -> HookResult + Send + Sync>;
pub(crate) type TransactionHook = Arc<dyn Fn(&TransactionEvent<'_>) -> HookResult + Send + Sync>;
pub(crate) type ConnectHook =
    Arc<dyn Fn(&mut postgres::Client, &NodeInfo) -> HookResult + Send + Sync>;
pub(crate) type ConnectionHook = Arc<dyn Fn(&ConnectionEvent<'_>) + Send + Sync>;
pub(crate) type NodeHook = Arc<dyn Fn(&NodeEvent<'_>) + Send + Sync>;
pub(crate) type ShutdownHook = Arc<dyn Fn(&ShutdownEvent) + Send + Sync>;

/// Every hook registered on a builder.
#[derive(Clone, Default)]
pub(crate) struct Hooks {
    pub(crate) before_operation: Vec<BeforeOperationHook>,
    pub(crate) after_operation: Vec<AfterOperationHook>,
    pub(crate) before_transaction: Vec<TransactionHook>,
    pub(crate) after_transaction: Vec<TransactionHook>,
    pub(crate) on_connect: Vec<ConnectHook>,
    pub(crate) on_disconnect: Vec<ConnectionHook>,
    pub(crate) on_acquire: Vec<ConnectionHook>,
    pub(crate) on_release: Vec<ConnectionHook>,
    pub(crate) on_shutdown: Vec<ShutdownHook>,
    pub(crate) on_breaker_state_change: Vec<NodeHook>,
    pub(crate) on_node_health_change: Vec<NodeHook>,
    pub(crate) on_role_change: Vec<NodeHook>,
    pub(crate) log_parameters: bool,
}

impl fmt::Debug for Hooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hooks")
            .field("before_operation", &self.before_operation.len())
            .field("after_operation", &self.after_operation.len())
            .field("before_transaction", &self.before_transaction.len())
            .field("after_transaction", &self.after_transaction.len())
            .field("on_connect", &self.on_connect.len())
            .field("on_disconnect", &self.on_disconnect.len())
            .field("on_acquire", &self.on_acquire.len())
            .field("on_release", &self.on_release.len())
            .field("on_shutdown", &self.on_shutdown.len())
            .field(
                "on_breaker_state_change",
                &self.on_breaker_state_change.len(),
            )
            .field("on_node_health_change", &self.on_node_health_change.len())
            .field("on_role_change", &self.on_role_change.len())
            .field("log_parameters", &self.log_parameters)
            .finish()
    }
}

impl Hooks {
    /// Whether any operation hook is registered (else operations skip the
    /// timing and event building altogether).
    pub(crate) fn wraps_operations(&self) -> bool {
        !self.before_operation.is_empty() || !self.after_operation.is_empty()
    }
}

/// Runs hooks in order (`call` hands each its event); the first error (or
/// panic) stops and is returned as an `ErrorKind::Hook` error.
pub(crate) fn run<H>(
    hooks: &[H],
    what: &str,
    mut call: impl FnMut(&H) -> HookResult,
) -> Result<(), Error> {
    for hook in hooks {
        match catch_unwind(AssertUnwindSafe(|| call(hook))) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(Error::new(ErrorKind::Hook)
                    .with_detail(format!("{what} hook failed"))
                    .with_source(e));
            }
            Err(panic) => {
                let why = panic_message(&*panic);
                log::error!("{what} hook panicked: {why}");
                return Err(
                    Error::new(ErrorKind::Hook).with_detail(format!("{what} hook panicked: {why}"))
                );
            }
        }
    }
    Ok(())
}

/// Runs event-only hooks; a panic is logged and the rest still run.
pub(crate) fn notify<H>(hooks: &[H], what: &str, call: impl Fn(&H)) {
    for hook in hooks {
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| call(hook))) {
            log::error!("{what} hook panicked: {}", panic_message(&*panic));
        }
    }
}

pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(non-string panic payload)".to_owned())
}

/// A ready-made `after_operation` hook: logs operations slower than
/// `threshold` at `warn` level (operation, node, duration, SQL; parameters
/// only with `log_parameters(true)`), and every failed operation at `error`
/// level. Never logs a password.
///
/// ```
/// use std::time::Duration;
/// let builder = pgxkit::Cluster::builder()
///     .after_operation(pgxkit::hooks::slow_query_log(Duration::from_millis(200)));
/// ```
pub fn slow_query_log(
    threshold: Duration,
) -> impl Fn(&AfterOperation<'_>) -> HookResult + Send + Sync + 'static {
    move |op| {
        let params = op
            .params()
            .map(|p| format!(" params={p:?}"))
            .unwrap_or_default();
        if let Some(err) = op.error() {
            log::error!(
                "{} failed on {} after {:?}: {err}; sql={:?}{params}",
                op.kind(),
                op.node(),
                op.duration(),
                op.sql()
            );
        } else if op.duration() > threshold {
            log::warn!(
                "slow {} on {}: {:?} (threshold {threshold:?}); sql={:?}{params}",
                op.kind(),
                op.node(),
                op.duration(),
                op.sql()
            );
        }
        Ok(())
    }
}

/// What an operation is, for its hooks: the kind, how it was routed, the
/// node it runs on, its SQL and parameters.
#[derive(Clone, Copy)]
pub(crate) struct Op<'a> {
    pub(crate) kind: OperationKind,
    pub(crate) route: Role,
    pub(crate) node: &'a NodeInfo,
    pub(crate) sql: &'a str,
    pub(crate) params: &'a [&'a (dyn ToSql + Sync)],
}

/// The `pgxkit::Error` of an operation's own result.
pub(crate) fn itself(e: &Error) -> Option<&Error> {
    Some(e)
}

/// A caller's error type, opaque to the hooks.
pub(crate) fn opaque<E>(_: &E) -> Option<&Error> {
    None
}

/// Runs `op` between the operation hooks of `hooks`. With none registered
/// it is a plain call: no clock reading, no event built. `error_of` finds
/// the `pgxkit::Error` in a failure, for the after-hooks.
#[inline]
pub(crate) fn around<T, E: From<Error>>(
    hooks: &Hooks,
    what: Op<'_>,
    rows: impl Fn(&T) -> Option<u64>,
    error_of: impl Fn(&E) -> Option<&Error>,
    op: impl FnOnce() -> Result<T, E>,
) -> Result<T, E> {
    if !hooks.wraps_operations() {
        return op();
    }
    hooked(hooks, what, rows, error_of, op)
}

/// [`around`] with hooks registered: out of line, so an operation without
/// hooks does not carry this code (and a second copy of `op`) through the
/// instruction cache.
#[cold]
#[inline(never)]
fn hooked<T, E: From<Error>>(
    hooks: &Hooks,
    what: Op<'_>,
    rows: impl Fn(&T) -> Option<u64>,
    error_of: impl Fn(&E) -> Option<&Error>,
    op: impl FnOnce() -> Result<T, E>,
) -> Result<T, E> {
    let node = what.node;
    let before = BeforeOperation {
        kind: what.kind,
        route: what.route,
        sql: what.sql,
        node,
        params: ParamView::new(what.params, hooks.log_parameters),
    };
    run(&hooks.before_operation, "before_operation", |hook| {
        hook(&before)
    })
    .map_err(|e| E::from(e.with_node(node)))?;
    let started = std::time::Instant::now();
    let result = op();
    if hooks.after_operation.is_empty() {
        return result;
    }
    let after = AfterOperation {
        before,
        duration: started.elapsed(),
        rows: result.as_ref().ok().and_then(&rows),
        error: result.as_ref().err().and_then(&error_of),
        failed: result.is_err(),
    };
    let verdict = run(&hooks.after_operation, "after_operation", |hook| {
        hook(&after)
    });
    match verdict {
        Err(e) if result.is_ok() => Err(E::from(e.with_node(node))),
        Err(e) => {
            log::warn!("{e} (after a failed operation, whose error is returned)");
            result
        }
        Ok(()) => result,
    }
}
