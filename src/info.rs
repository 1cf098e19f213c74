//! Which node something is about: [`NodeInfo`] (name, role, address) and
//! [`Role`]. A leaf: errors, events, statistics and nodes all name one.

use std::fmt;
use std::sync::Arc;

/// Whether a node is the primary (writes) or a replica (reads).
///
/// ```no_run
/// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
/// for node in &cluster.stats().nodes {
///     if node.node.role() == pgxkit::Role::Replica {
///         println!("replica {}", node.node.name());
///     }
/// }
/// # Ok::<(), pgxkit::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The primary: every write, and every call not made through the read
    /// handle ([`Cluster::replica`](crate::Cluster::replica)).
    Primary,
    /// A read replica.
    Replica,
}

impl Role {
    /// `"primary"` or `"replica"`, as in logs and metric labels.
    ///
    /// ```
    /// assert_eq!(pgxkit::Role::Replica.as_str(), "replica");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which node an error, an event or a statistic is about: its name, role
/// and address. Never holds credentials.
///
/// ```
/// # let cluster = pgxkit::Cluster::builder()
/// #     .primary("postgres://app@127.0.0.1:1/app").lazy_connect(true).build().unwrap();
/// let node = &cluster.stats().nodes[0].node;
/// assert_eq!(node.name(), "primary");
/// assert_eq!(node.role(), pgxkit::Role::Primary);
/// assert_eq!(node.address(), "127.0.0.1:1");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NodeInfo(Arc<NodeInfoInner>);

#[derive(Debug, PartialEq, Eq, Hash)]
struct NodeInfoInner {
    name: String,
    role: Role,
    address: String,
}

impl NodeInfo {
    pub(crate) fn new(name: String, role: Role, address: String) -> Self {
        NodeInfo(Arc::new(NodeInfoInner {
            name,
            role,
            address,
        }))
    }

    /// The node's name: `primary`, `replica1`, `replica2`, ...
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// assert_eq!(cluster.stats().primary().node.name(), "primary");
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// The node's role.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// assert_eq!(cluster.stats().primary().node.role(), pgxkit::Role::Primary);
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn role(&self) -> Role {
        self.0.role
    }

    /// `host:port` of the node (the first host when several are given).
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// println!("primary at {}", cluster.stats().primary().node.address());
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn address(&self) -> &str {
        &self.0.address
    }
}

impl fmt::Display for NodeInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.name == self.0.role.to_string() {
            write!(f, "{} ({})", self.0.name, self.0.address)
        } else {
            write!(f, "{} {} ({})", self.0.role, self.0.name, self.0.address)
        }
    }
}
