//! One error type for the whole crate, with a public kind.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use postgres::error::{DbError, SqlState};

use crate::info::NodeInfo;

/// `Result<T, pgxkit::Error>`.
///
/// ```no_run
/// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
/// fn count_users(cluster: &pgxkit::Cluster) -> pgxkit::Result<i64> {
///     Ok(cluster.query_one("SELECT count(*) FROM users", &[])?.get(0))
/// }
/// # Ok::<(), pgxkit::Error>(())
/// ```
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, in a form to match on.
///
/// ```
/// use pgxkit::{Cluster, ErrorKind};
///
/// let err = Cluster::builder().primary("postgres://app@db/app?pool_max_conns=0").build().unwrap_err();
/// assert_eq!(err.kind(), ErrorKind::Config);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Bad configuration: a DSN, an option, an environment variable, a file.
    Config,
    /// A connection to a node could not be established.
    Connect,
    /// No connection became available within the checkout timeout.
    PoolTimeout,
    /// The server answered with an error (see [`Error::code`]).
    Db,
    /// The connection broke while an operation was running (I/O error,
    /// server closed the connection).
    Closed,
    /// `query_one` found no row.
    NotFound,
    /// `query_one` / `query_opt` found more than one row.
    TooManyRows,
    /// The node's circuit breaker is open: the call failed fast.
    CircuitOpen,
    /// No replica is eligible for reads and the fallback policy says fail.
    NoEligibleReplica,
    /// No node is known to be the primary: the one that was stopped
    /// answering or is in recovery, and no other has taken its place yet
    /// (a failover in progress). Nothing was sent; the health monitor is
    /// looking, so running the call again later may succeed
    /// ([`Error::is_retryable`]).
    NoPrimary,
    /// The cluster is shutting down or shut down.
    ShuttingDown,
    /// A deadline passed.
    Timeout,
    /// A hook vetoed the operation, returned an error or panicked.
    Hook,
    /// The connection failed while `COMMIT` was in flight: the transaction
    /// may or may not have committed. Never retried automatically.
    AmbiguousCommit,
    /// The statement could not be sent as given, found on the client before
    /// anything was sent: a parameter of the wrong type for its column (a
    /// `&str` for an `int4`), the wrong number of parameters. The
    /// connection stays usable.
    Client,
    /// A transaction handle used after it ended (commit, rollback), or while
    /// another call on it is still running.
    TransactionState,
    /// The caller's own reader or writer failed during COPY IN or COPY
    /// OUT (the I/O error is the source); the COPY was aborted.
    Io,
    /// What was asked cannot be done in the handle's
    /// [`StatementMode`](crate::StatementMode) (parameters with the simple
    /// protocol, a parameter type an unnamed statement cannot tell).
    Unsupported,
}

impl ErrorKind {
    fn describe(self) -> &'static str {
        match self {
            ErrorKind::Config => "invalid configuration",
            ErrorKind::Connect => "cannot connect",
            ErrorKind::PoolTimeout => "timed out waiting for a pooled connection",
            ErrorKind::Db => "database error",
            ErrorKind::Closed => "connection closed during the operation",
            ErrorKind::NotFound => "no row found",
            ErrorKind::TooManyRows => "more than one row found",
            ErrorKind::CircuitOpen => "circuit breaker open",
            ErrorKind::NoEligibleReplica => "no replica eligible for reads",
            ErrorKind::NoPrimary => "no node is known to be the primary",
            ErrorKind::ShuttingDown => "the cluster is shutting down",
            ErrorKind::Timeout => "deadline exceeded",
            ErrorKind::Hook => "hook failed",
            ErrorKind::AmbiguousCommit => {
                "connection lost during COMMIT: the transaction may or may not have committed"
            }
            ErrorKind::Client => "cannot send the statement as given",
            ErrorKind::TransactionState => "transaction not usable",
            ErrorKind::Unsupported => "not supported in this statement mode",
            ErrorKind::Io => "the COPY data's reader or writer failed",
        }
    }
}

/// The error of every pgxkit operation.
///
/// `Display` names what failed and on which node; the underlying cause (the
/// driver's error, an I/O error) is reached through [`source()`](StdError::source),
/// so it is not printed twice by error reporters. No password ever appears.
///
/// ```
/// use pgxkit::{Cluster, ErrorKind};
///
/// let err = Cluster::builder()
///     .primary("postgres://app:s3cret@db/app?sslmode=sometimes")
///     .build()
///     .unwrap_err();
/// assert_eq!(err.kind(), ErrorKind::Config);
/// assert!(err.to_string().contains("sslmode"));
/// assert!(!err.to_string().contains("s3cret"));
/// ```
pub struct Error(Box<Inner>);

struct Inner {
    kind: ErrorKind,
    /// Known not to have reached the server (checked before sending).
    unsent: bool,
    node: Option<NodeInfo>,
    detail: Option<String>,
    /// Shared, so a connect failure seen by the pool can be handed to every
    /// checkout that waited for it, cause and all.
    source: Option<Arc<dyn StdError + Send + Sync>>,
}

impl Error {
    pub(crate) fn new(kind: ErrorKind) -> Self {
        Error(Box::new(Inner {
            kind,
            unsent: false,
            node: None,
            detail: None,
            source: None,
        }))
    }

    pub(crate) fn config(detail: impl Into<String>) -> Self {
        Error::new(ErrorKind::Config).with_detail(detail)
    }

    pub(crate) fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.0.detail = Some(detail.into());
        self
    }

    /// Prefixes the detail with where it came from (`primary DSN: port: ...`).
    pub(crate) fn context(mut self, what: &str) -> Self {
        self.0.detail = Some(match self.0.detail.take() {
            Some(detail) => format!("{what}: {detail}"),
            None => what.to_owned(),
        });
        self
    }

    /// Marks an error that is known to have happened before anything was
    /// sent to the server.
    pub(crate) fn unsent(mut self) -> Self {
        self.0.unsent = true;
        self
    }

    pub(crate) fn with_node(mut self, node: &NodeInfo) -> Self {
        self.0.node = Some(node.clone());
        self
    }

    pub(crate) fn with_source(
        mut self,
        source: impl Into<Box<dyn StdError + Send + Sync>>,
    ) -> Self {
        self.0.source = Some(Arc::from(source.into()));
        self
    }

    /// A copy of this error as `kind` (its cause shared), for handing one
    /// failure to several callers.
    pub(crate) fn duplicate_as(&self, kind: ErrorKind) -> Self {
        Error(Box::new(Inner {
            kind,
            unsent: self.0.unsent,
            node: self.0.node.clone(),
            detail: self.0.detail.clone(),
            source: self.0.source.clone(),
        }))
    }

    /// Wraps a driver error, classifying it.
    pub(crate) fn from_postgres(err: postgres::Error, node: &NodeInfo) -> Self {
        Error::new(classify(&err)).with_node(node).with_source(err)
    }

    /// What went wrong.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// match cluster.query_one("SELECT id FROM users WHERE name = $1", &[&"ada"]) {
    ///     Err(e) if e.kind() == pgxkit::ErrorKind::NotFound => println!("no such user"),
    ///     other => { other?; }
    /// }
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn kind(&self) -> ErrorKind {
        self.0.kind
    }

    /// The node the error happened on, if it is about one.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// if let Err(e) = cluster.execute("SELECT 1", &[]) {
    ///     if let Some(node) = e.node() {
    ///         eprintln!("failed on {} ({})", node.name(), node.address());
    ///     }
    /// }
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn node(&self) -> Option<&NodeInfo> {
        self.0.node.as_ref()
    }

    /// The SQLSTATE the server sent, if any.
    ///
    /// ```no_run
    /// use pgxkit::postgres::error::SqlState;
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// match cluster.execute("INSERT INTO users (id) VALUES (1)", &[]) {
    ///     Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => println!("already there"),
    ///     other => { other?; }
    /// }
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn code(&self) -> Option<&SqlState> {
        self.as_postgres().and_then(postgres::Error::code)
    }

    /// The server's error (message, detail, hint, position...), if any.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// if let Err(e) = cluster.execute("INSERT INTO users (id) VALUES (1)", &[]) {
    ///     if let Some(db) = e.as_db_error() {
    ///         eprintln!("{}: {:?}", db.message(), db.detail());
    ///     }
    /// }
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn as_db_error(&self) -> Option<&DbError> {
        self.as_postgres().and_then(postgres::Error::as_db_error)
    }

    /// The driver's error, if this one wraps it.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// if let Err(e) = cluster.execute("SELECT 1", &[]) {
    ///     let driver: Option<&pgxkit::postgres::Error> = e.as_postgres();
    ///     eprintln!("driver said: {driver:?}");
    /// }
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn as_postgres(&self) -> Option<&postgres::Error> {
        let mut next: Option<&(dyn StdError + 'static)> = self.source();
        while let Some(err) = next {
            if let Some(pg) = err.downcast_ref::<postgres::Error>() {
                return Some(pg);
            }
            next = err.source();
        }
        None
    }

    /// Whether the failure is about the connection or the node rather than
    /// the statement: could not connect, connection lost, checkout timeout,
    /// SQLSTATE class 08 or 57P01-57P03. These are the failures that count
    /// against a node's circuit breaker; a unique violation or a syntax error
    /// never does.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// if let Err(e) = cluster.execute("SELECT 1", &[]) {
    ///     if e.is_connection_error() {
    ///         eprintln!("the node is in trouble, not the statement: {e}");
    ///     }
    /// }
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn is_connection_error(&self) -> bool {
        match self.0.kind {
            ErrorKind::Connect | ErrorKind::Closed | ErrorKind::PoolTimeout => {
                !self.code().is_some_and(is_auth_failure)
            }
            ErrorKind::Db => self.code().is_some_and(is_connection_state),
            _ => false,
        }
    }

    /// Whether running the same operation again is safe and may succeed:
    /// could not connect (but not a failure that another attempt would
    /// meet again: a wrong password or unknown role, 28xxx; an unknown
    /// database, 3D000; a TLS failure, such as a server that refuses TLS
    /// when it is required or a certificate that does not verify; no
    /// password for a server that asks for one), checkout
    /// timeouts, a connection already closed before the statement was sent,
    /// serialization failures (40001), deadlocks (40P01), SQLSTATE class 08
    /// and 57P01-57P03, a write refused by a server in recovery (25006: a
    /// failover under way) and [`ErrorKind::NoPrimary`]. Not retryable: constraint violations, syntax errors,
    /// `NotFound`, configuration errors, a deadline of the caller's own
    /// ([`ErrorKind::Timeout`]), an I/O failure while a statement was in
    /// flight (it may have run), and [`ErrorKind::AmbiguousCommit`].
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let mut attempts = 0;
    /// let n = loop {
    ///     attempts += 1;
    ///     match cluster.execute("UPDATE stock SET n = n - 1 WHERE id = 7", &[]) {
    ///         Err(e) if e.is_retryable() && attempts < 3 => continue,
    ///         other => break other?,
    ///     }
    /// };
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn is_retryable(&self) -> bool {
        match self.0.kind {
            ErrorKind::Connect => !self.is_permanent_connect_failure(),
            ErrorKind::PoolTimeout | ErrorKind::NoPrimary => true,
            // Only when known unsent: a connection that broke while the
            // statement was in flight may have run it.
            ErrorKind::Closed => self.0.unsent,
            ErrorKind::Db => self.code().is_some_and(|c| {
                is_connection_state(c)
                    || *c == SqlState::T_R_SERIALIZATION_FAILURE
                    || *c == SqlState::T_R_DEADLOCK_DETECTED
                    || *c == SqlState::READ_ONLY_SQL_TRANSACTION
            }),
            _ => false,
        }
    }

    /// A connect failure that trying again cannot cure: authentication
    /// (28xxx), an unknown database (3D000), TLS (the handshake failed or
    /// the server refused TLS that the sslmode requires).
    fn is_permanent_connect_failure(&self) -> bool {
        if self
            .code()
            .is_some_and(|c| is_auth_failure(c) || *c == SqlState::INVALID_CATALOG_NAME)
        {
            return true;
        }
        // The driver keeps its error kind private; its TLS and
        // configuration failures (no password for a server that asks for
        // one) are the ones with its fixed texts for them, or a native-tls
        // error inside.
        self.as_postgres().is_some_and(|pg| {
            let text = pg.to_string();
            text.starts_with("error performing TLS handshake")
                || text.starts_with("invalid configuration")
                || chain_has::<native_tls::Error>(pg)
        })
    }

    /// How long until an open circuit breaker lets a call through, for
    /// [`ErrorKind::CircuitOpen`].
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// if let Err(e) = cluster.execute("SELECT 1", &[]) {
    ///     if let Some(wait) = e.retry_after() {
    ///         std::thread::sleep(wait); // the breaker lets a trial call through then
    ///     }
    /// }
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn retry_after(&self) -> Option<Duration> {
        self.0
            .source
            .as_deref()?
            .downcast_ref::<RetryAfter>()
            .map(|r| r.0)
    }
}

impl Error {
    /// Whether this failure of a call on the primary may mean the primary
    /// changed (it is gone, or it is in recovery now): the health monitor
    /// should look at once.
    pub(crate) fn suggests_failover(&self) -> bool {
        matches!(self.0.kind, ErrorKind::CircuitOpen | ErrorKind::NoPrimary)
            || self.is_connection_error()
            || self.code() == Some(&SqlState::READ_ONLY_SQL_TRANSACTION)
    }
}

/// Carries the wait of a `CircuitOpen` error as its source.
#[derive(Debug)]
pub(crate) struct RetryAfter(pub(crate) Duration);

impl fmt::Display for RetryAfter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "next attempt allowed in {:?}", self.0)
    }
}

impl StdError for RetryAfter {}

/// SQLSTATE class 08 (connection exception) and 57P01-57P03 (the server is
/// shutting down, crashed, or cannot accept connections now).
pub(crate) fn is_connection_state(code: &SqlState) -> bool {
    code.code().starts_with("08")
        || *code == SqlState::ADMIN_SHUTDOWN
        || *code == SqlState::CRASH_SHUTDOWN
        || *code == SqlState::CANNOT_CONNECT_NOW
}

/// Whether `err` or one of its sources is a `T`.
fn chain_has<T: StdError + 'static>(err: &(dyn StdError + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(e) = next {
        if e.is::<T>() {
            return true;
        }
        next = e.source();
    }
    false
}

fn is_auth_failure(code: &SqlState) -> bool {
    code.code().starts_with("28")
}

/// The kind of a driver error: a server error with a connection-level
/// SQLSTATE is still `Db` (its code says the rest); a closed connection or
/// an I/O error is `Closed`.
fn classify(err: &postgres::Error) -> ErrorKind {
    if let Some(db) = err.as_db_error() {
        // The server's statement_timeout cancelled it.
        if *db.code() == SqlState::QUERY_CANCELED && db.message().contains("statement timeout") {
            ErrorKind::Timeout
        } else {
            ErrorKind::Db
        }
    } else if err.is_closed() || chain_has::<std::io::Error>(err) {
        ErrorKind::Closed
    } else if is_client_side(err) {
        ErrorKind::Client
    } else {
        ErrorKind::Db
    }
}

/// A driver error found before anything was sent: a value that cannot be
/// encoded as its parameter's type, the wrong number of parameters, a
/// column that is not there. The driver's kind is private; these are its
/// fixed messages for them (tokio-postgres `Kind::ToSql`, `FromSql`,
/// `Parameters`, `Column`).
fn is_client_side(err: &postgres::Error) -> bool {
    let text = err.to_string();
    chain_has::<postgres::types::WrongType>(err)
        || [
            "error serializing parameter",
            "error deserializing column",
            "invalid column",
        ]
        .iter()
        .any(|p| text.starts_with(p))
        || (text.starts_with("expected ") && text.contains(" parameters but got "))
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.0.kind)
            .field("node", &self.0.node)
            .field("detail", &self.0.detail)
            .field("code", &self.code().map(SqlState::code))
            .field("message", &self.as_db_error().map(DbError::message))
            .field("db_detail", &self.as_db_error().and_then(DbError::detail))
            .field("hint", &self.as_db_error().and_then(DbError::hint))
            .field("source", &self.0.source.as_deref().map(|s| source_chain(s)))
            .finish()
    }
}

/// A source and its own sources, joined: the driver's `Display` says only
/// "db error" and keeps the server's words one level down.
pub(crate) fn source_chain(err: &dyn StdError) -> String {
    let mut text = err.to_string();
    let mut next = err.source();
    while let Some(s) = next {
        text.push_str(": ");
        text.push_str(&s.to_string());
        next = s.source();
    }
    text
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.kind.describe())?;
        if let Some(code) = self.code() {
            write!(f, " {}", code.code())?;
        }
        if let Some(node) = &self.0.node {
            write!(f, " on {node}")?;
        }
        if let Some(detail) = &self.0.detail {
            write!(f, ": {detail}")?;
        }
        if let Some(cause) = self.root_cause() {
            if !self
                .0
                .detail
                .as_deref()
                .is_some_and(|d| d.ends_with(&cause))
            {
                write!(f, ": {cause}")?;
            }
        }
        Ok(())
    }
}

impl Error {
    /// The message of the innermost cause, on one line: the server's own
    /// words for a server error (not the driver's "db error"), else the
    /// deepest source's first line.
    fn root_cause(&self) -> Option<String> {
        if let Some(db) = self.as_db_error() {
            return Some(db.message().to_owned());
        }
        let mut deepest: &(dyn StdError + 'static) = self.source()?;
        while let Some(next) = deepest.source() {
            deepest = next;
        }
        let text = deepest.to_string();
        Some(text.lines().next().unwrap_or("").trim_end().to_owned()).filter(|t| !t.is_empty())
    }
}

/// A driver error met inside a closure (`with_client`), classified as
/// the crate's own are, so `?` works on the driver's calls there.
///
/// ```no_run
/// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
/// let port: i32 = cluster.with_client(|client| {
///     let row = client.query_one("SELECT inet_server_port()", &[])?; // postgres::Error -> pgxkit::Error
///     Ok::<_, pgxkit::Error>(row.get(0))
/// })?;
/// # Ok::<(), pgxkit::Error>(())
/// ```
impl From<postgres::Error> for Error {
    fn from(err: postgres::Error) -> Self {
        Error::new(classify(&err)).with_source(err)
    }
}

/// A caller's error type that may hold a [`pgxkit::Error`](Error), so a
/// retrying transaction can tell whether a failure is worth another run.
///
/// Closures given to transactions and `with_client` return the caller's
/// own error type `E` (with `E: From<pgxkit::Error>`); a retrying
/// transaction runs again only when [`as_pgxkit_error`](Self::as_pgxkit_error)
/// returns an error that is retryable. Implemented for `pgxkit::Error`
/// itself and for boxed errors (whose source chain is searched).
///
/// ```
/// #[derive(Debug)]
/// enum AppError {
///     Db(pgxkit::Error),
///     SoldOut,
/// }
/// impl From<pgxkit::Error> for AppError {
///     fn from(e: pgxkit::Error) -> Self {
///         AppError::Db(e)
///     }
/// }
/// impl pgxkit::AsPgxkitError for AppError {
///     fn as_pgxkit_error(&self) -> Option<&pgxkit::Error> {
///         match self {
///             AppError::Db(e) => Some(e),
///             AppError::SoldOut => None,
///         }
///     }
/// }
/// ```
pub trait AsPgxkitError {
    /// The `pgxkit::Error` this error is or wraps, if any.
    fn as_pgxkit_error(&self) -> Option<&Error>;
}

impl AsPgxkitError for Error {
    fn as_pgxkit_error(&self) -> Option<&Error> {
        Some(self)
    }
}

impl AsPgxkitError for Box<dyn StdError + Send + Sync> {
    fn as_pgxkit_error(&self) -> Option<&Error> {
        find_in_chain(&**self)
    }
}

impl AsPgxkitError for Box<dyn StdError> {
    fn as_pgxkit_error(&self) -> Option<&Error> {
        find_in_chain(&**self)
    }
}

/// The first `pgxkit::Error` in `err`'s source chain, `err` included.
fn find_in_chain<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a Error> {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(found) = e.downcast_ref::<Error>() {
            return Some(found);
        }
        next = e.source();
    }
    None
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.0
            .source
            .as_deref()
            .map(|s| s as &(dyn StdError + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::info::Role;

    #[test]
    fn error_stays_one_pointer_wide() {
        assert_eq!(std::mem::size_of::<Error>(), std::mem::size_of::<usize>());
        assert_eq!(
            std::mem::size_of::<Result<()>>(),
            std::mem::size_of::<usize>()
        );
    }

    #[test]
    fn display_names_kind_node_and_detail_once() {
        let node = NodeInfo::new("replica2".into(), Role::Replica, "10.0.0.2:5432".into());
        let err = Error::new(ErrorKind::PoolTimeout)
            .with_node(&node)
            .with_detail("waited 2s");
        assert_eq!(
            err.to_string(),
            "timed out waiting for a pooled connection on replica replica2 (10.0.0.2:5432): waited 2s"
        );
        assert!(err.is_connection_error() && err.is_retryable());
    }

    #[test]
    fn statement_errors_are_not_connection_errors() {
        for kind in [
            ErrorKind::NotFound,
            ErrorKind::Config,
            ErrorKind::Hook,
            ErrorKind::TooManyRows,
            ErrorKind::Timeout,
            ErrorKind::AmbiguousCommit,
        ] {
            let err = Error::new(kind);
            assert!(!err.is_connection_error(), "{kind:?}");
            assert!(!err.is_retryable(), "{kind:?}");
        }
    }

    #[test]
    fn boxed_errors_are_searched_for_a_pgxkit_error() {
        #[derive(Debug)]
        struct Outer(Error);
        impl fmt::Display for Outer {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("outer")
            }
        }
        impl StdError for Outer {
            fn source(&self) -> Option<&(dyn StdError + 'static)> {
                Some(&self.0)
            }
        }
        let boxed: Box<dyn StdError + Send + Sync> =
            Box::new(Outer(Error::new(ErrorKind::PoolTimeout)));
        let found = boxed.as_pgxkit_error().map(Error::kind);
        assert_eq!(found, Some(ErrorKind::PoolTimeout));
        let other: Box<dyn StdError> = "not ours".into();
        assert!(other.as_pgxkit_error().is_none());
    }

    #[test]
    fn connection_sqlstates() {
        for code in ["08000", "08006", "08P01", "57P01", "57P02", "57P03"] {
            assert!(is_connection_state(&SqlState::from_code(code)), "{code}");
        }
        for code in ["23505", "42601", "40001", "57014", "28P01"] {
            assert!(!is_connection_state(&SqlState::from_code(code)), "{code}");
        }
    }
}
