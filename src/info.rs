//! Which node something is about: [`NodeInfo`] (name, role, address) and
//! [`Role`]. A leaf: errors, events, statistics and nodes all name one.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering::Relaxed};

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

impl Role {
    fn from_u8(v: u8) -> Role {
        if v == Role::Primary as u8 {
            Role::Primary
        } else {
            Role::Replica
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
/// The role is the node's role now, as the cluster last learnt it (see
/// [`Cluster::builder`](crate::Cluster::builder)'s "Roles follow the
/// servers"): every clone of a `NodeInfo` sees a failover. Two `NodeInfo`s
/// are equal when they name the same node (name and address).
///
/// ```
/// # let cluster = pgxkit::Cluster::builder()
/// #     .primary("postgres://app@127.0.0.1:1/app").lazy_connect(true).build().unwrap();
/// let node = &cluster.stats().nodes[0].node;
/// assert_eq!(node.name(), "primary");
/// assert_eq!(node.role(), pgxkit::Role::Primary);
/// assert_eq!(node.address(), "127.0.0.1:1");
/// ```
#[derive(Debug, Clone)]
pub struct NodeInfo(Arc<NodeInfoInner>);

#[derive(Debug)]
struct NodeInfoInner {
    name: String,
    /// `Role as u8`: changed by the cluster's topology when the servers'
    /// roles change.
    role: AtomicU8,
    address: String,
}

impl PartialEq for NodeInfo {
    fn eq(&self, other: &Self) -> bool {
        self.0.name == other.0.name && self.0.address == other.0.address
    }
}

impl Eq for NodeInfo {}

impl Hash for NodeInfo {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.name.hash(state);
        self.0.address.hash(state);
    }
}

impl NodeInfo {
    pub(crate) fn new(name: String, role: Role, address: String) -> Self {
        NodeInfo(Arc::new(NodeInfoInner {
            name,
            role: AtomicU8::new(role as u8),
            address,
        }))
    }

    /// Sets the node's role; returns the one it had.
    pub(crate) fn set_role(&self, role: Role) -> Role {
        Role::from_u8(self.0.role.swap(role as u8, Relaxed))
    }

    /// The node's name: `primary`, `replica1`, `replica2`, ...
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// assert_eq!(cluster.stats().primary().unwrap().node.name(), "primary");
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// The node's role.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// assert_eq!(cluster.stats().primary().unwrap().node.role(), pgxkit::Role::Primary);
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn role(&self) -> Role {
        Role::from_u8(self.0.role.load(Relaxed))
    }

    /// `host:port` of the node (the first host when several are given).
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// println!("primary at {}", cluster.stats().primary().unwrap().node.address());
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn address(&self) -> &str {
        &self.0.address
    }
}

impl fmt::Display for NodeInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let role = self.role();
        if self.0.name == role.as_str() {
            write!(f, "{} ({})", self.0.name, self.0.address)
        } else {
            write!(f, "{role} {} ({})", self.0.name, self.0.address)
        }
    }
}
