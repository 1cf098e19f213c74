//! One named node: [`Cluster::on_node`] runs queries on that node only,
//! whatever its role, for diagnostics and operations tools (server
//! version, `pg_stat_activity`, replay position of one replica).

use std::fmt;

use postgres::Row;

use crate::Result;
use crate::cluster::{Cluster, all_rows, at_most_one, exactly_one, opt_count, row_count};
use crate::hooks::OperationKind;
use crate::info::NodeInfo;
use crate::node::Node;
use crate::statements::{Call, Params};

/// Queries on one node, from [`Cluster::on_node`]: no balancing, no
/// fallback, no retry elsewhere; through the node's pool, breaker and
/// hooks (which see the node's role now as the route), bounded like any
/// call of the handle it came from.
///
/// ```no_run
/// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
/// for node in cluster.stats().nodes {
///     let on = cluster.on_node(node.node.name()).expect("a node of this cluster");
///     let version: String = on.query_one("SHOW server_version", &[])?.get(0);
///     println!("{}: PostgreSQL {version}", node.node);
/// }
/// # Ok::<(), pgxkit::Error>(())
/// ```
#[derive(Clone, Copy)]
pub struct NodeHandle<'c> {
    cluster: &'c Cluster,
    node: &'c Node,
}

impl fmt::Debug for NodeHandle<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeHandle")
            .field("node", &self.node.info)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// The node called `name` (`primary`, `replica1`, `node2`, ... as in
    /// [`NodeInfo::name`]), for queries on it alone; `None` when the
    /// cluster has no such node.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let primary = cluster.on_node("primary").expect("configured");
    /// let n: i64 = primary.query_one("SELECT count(*) FROM pg_stat_activity", &[])?.get(0);
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn on_node(&self, name: &str) -> Option<NodeHandle<'_>> {
        let node = self.inner.nodes().find(|n| n.info.name() == name)?;
        Some(NodeHandle {
            cluster: self,
            node,
        })
    }
}

impl NodeHandle<'_> {
    /// Which node.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let on = cluster.on_node("primary").unwrap();
    /// println!("{} is {}", on.node().name(), on.node().role());
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn node(&self) -> &NodeInfo {
        &self.node.info
    }

    fn route(&self, kind: OperationKind) -> (OperationKind, crate::Role) {
        (kind, self.node.info.role())
    }

    /// Runs a query on this node; returns all rows.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let rows = cluster.on_node("primary").unwrap().query("SELECT datname FROM pg_database", &[])?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn query(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>> {
        let kind = self.route(OperationKind::Query);
        self.cluster.routed_on(
            self.node,
            kind,
            sql,
            params,
            Call::Query,
            row_count,
            all_rows,
        )
    }

    /// Runs a query on this node that must return exactly one row.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let v: String = cluster.on_node("primary").unwrap().query_one("SHOW server_version", &[])?.get(0);
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn query_one(&self, sql: &str, params: Params<'_>) -> Result<Row> {
        let kind = self.route(OperationKind::QueryOne);
        self.cluster.routed_on(
            self.node,
            kind,
            sql,
            params,
            Call::QueryOpt,
            |_| Some(1),
            exactly_one,
        )
    }

    /// Runs a query on this node that returns at most one row.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let row = cluster.on_node("primary").unwrap().query_opt("SELECT 1 WHERE false", &[])?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn query_opt(&self, sql: &str, params: Params<'_>) -> Result<Option<Row>> {
        let kind = self.route(OperationKind::QueryOpt);
        self.cluster.routed_on(
            self.node,
            kind,
            sql,
            params,
            Call::QueryOpt,
            opt_count,
            at_most_one,
        )
    }
}
