//! Whether a session is encrypted, as the server sees it (`pg_stat_ssl`):
//! the queries behind `Cluster::ssl_status` and `require_tls`.

use crate::error::{Error, Result};
use crate::node::Node;

/// Whether one node's connections are encrypted, from `pg_stat_ssl` for the
/// session's own backend (as the Go guide's `validateConnection` does).
///
/// ```no_run
/// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
/// for status in cluster.ssl_status() {
///     let s: pgxkit::SslStatus = status?;
///     println!("{}: encrypted={} {:?}", s.node, s.encrypted, s.version);
/// }
/// # Ok::<(), pgxkit::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SslStatus {
    /// Which node.
    pub node: crate::NodeInfo,
    /// Whether the connection is encrypted.
    pub encrypted: bool,
    /// The TLS protocol version, e.g. `TLSv1.3`.
    pub version: Option<String>,
    /// The cipher, e.g. `TLS_AES_256_GCM_SHA384`.
    pub cipher: Option<String>,
    /// The cipher's key length in bits.
    pub bits: Option<i32>,
}

const SSL_STATUS_SQL: &str =
    "SELECT ssl, version, cipher, bits FROM pg_stat_ssl WHERE pid = pg_backend_pid()";

impl SslStatus {
    fn from_row(node: &crate::NodeInfo, row: &postgres::Row) -> SslStatus {
        SslStatus {
            node: node.clone(),
            encrypted: row.get(0),
            version: row.get(1),
            cipher: row.get(2),
            bits: row.get(3),
        }
    }
}

/// The status of the session on `client`.
pub(crate) fn ssl_status(
    node: &crate::NodeInfo,
    client: &mut postgres::Client,
) -> Result<SslStatus> {
    let row = client
        .query_one(SSL_STATUS_SQL, &[])
        .map_err(|e| Error::from_postgres(e, node))?;
    Ok(SslStatus::from_row(node, &row))
}

/// The status of a pooled connection of `node`.
pub(crate) fn pooled_ssl_status(
    node: &Node,
    deadline: Option<std::time::Instant>,
) -> Result<SslStatus> {
    let row = node.call_bounded(deadline, |c| c.query_one(SSL_STATUS_SQL, &[]))?;
    Ok(SslStatus::from_row(&node.info, &row))
}
