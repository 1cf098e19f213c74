//! Health reports: what the health monitor last saw of each node, with the
//! live pool numbers, judged healthy, degraded or unhealthy.

use std::fmt;
use std::time::{Duration, SystemTime};

use crate::breaker::BreakerState;
use crate::info::{NodeInfo, Role};

/// Pool utilisation above which a node's health carries a warning.
pub(crate) const UTILIZATION_WARNING: f64 = 0.8;

/// The overall verdict of a [`HealthReport`].
///
/// ```no_run
/// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
/// match cluster.health().status {
///     pgxkit::HealthStatus::Healthy => {}
///     pgxkit::HealthStatus::Degraded => eprintln!("degraded"),
///     pgxkit::HealthStatus::Unhealthy => eprintln!("unhealthy"),
///     _ => {}
/// }
/// # Ok::<(), pgxkit::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HealthStatus {
    /// Every node up, every breaker closed, no replica lagging, no pool above 80 %.
    Healthy,
    /// The primary is fine but something else is not (a replica down or
    /// lagging, a breaker not closed, a pool above 80 %).
    Degraded,
    /// The primary is down or its breaker is open: writes fail.
    Unhealthy,
}

impl HealthStatus {
    /// `healthy`, `degraded` or `unhealthy`.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// println!("status: {}", cluster.health().status.as_str());
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            HealthStatus::Healthy => "healthy",
            HealthStatus::Degraded => "degraded",
            HealthStatus::Unhealthy => "unhealthy",
        }
    }
}

impl fmt::Display for HealthStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One node's health.
///
/// ```no_run
/// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
/// for node in &cluster.health().nodes {
///     println!("{}: up {} reads {}", node.node.name(), node.up, node.eligible_for_reads);
/// }
/// # Ok::<(), pgxkit::Error>(())
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct NodeHealth {
    /// Which node.
    pub node: NodeInfo,
    /// Whether its last probe succeeded.
    pub up: bool,
    /// What `pg_is_in_recovery()` said at the last successful probe.
    pub in_recovery: Option<bool>,
    /// The timeline it writes on, when it is not in recovery (read from
    /// the WAL file name of `pg_current_wal_lsn()`): of two nodes that
    /// both claim to be primary, writes go to the newer timeline's.
    pub timeline: Option<u32>,
    /// Its circuit breaker.
    pub breaker: BreakerState,
    /// How long until an open breaker lets a call through.
    pub breaker_retry_in: Option<Duration>,
    /// Replication lag in bytes (replicas).
    pub lag_bytes: Option<u64>,
    /// Replication lag in time (replicas).
    pub lag: Option<Duration>,
    /// Whether reads may go to it now (replicas): up, breaker allowing, lag within limits.
    pub eligible_for_reads: bool,
    /// Connections checked out now.
    pub in_use_conns: u32,
    /// Pool size limit.
    pub max_conns: u32,
    /// `in_use_conns / max_conns`.
    pub pool_utilization: f64,
    /// When it was last probed.
    pub last_check: Option<SystemTime>,
    /// Why the last probe failed, if it did.
    pub last_error: Option<String>,
    /// What is wrong, in words.
    pub warnings: Vec<String>,
}

/// The cluster's health: a verdict and every node's state.
///
/// Built from what the health monitor saw last and the pools' live numbers,
/// without any I/O, so it is cheap enough for every `/healthz` request.
///
/// ```no_run
/// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
/// let report = cluster.health();
/// println!("{}", report.status);
/// for node in &report.nodes {
///     println!("{}: up={} breaker={} lag={:?}", node.node, node.up, node.breaker, node.lag);
/// }
/// # Ok::<(), pgxkit::Error>(())
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HealthReport {
    /// The verdict.
    pub status: HealthStatus,
    /// When the report was made.
    pub timestamp: SystemTime,
    /// Every node, in the order they were configured; each one's
    /// `node.role()` is its role now.
    pub nodes: Vec<NodeHealth>,
    /// The index in `nodes` of the node writes go to, if one is known.
    primary: Option<usize>,
}

impl HealthReport {
    pub(crate) fn new(nodes: Vec<NodeHealth>, primary: Option<usize>) -> Self {
        let primary = primary.filter(|&i| i < nodes.len());
        let primary_ok =
            primary.is_some_and(|i| nodes[i].up && nodes[i].breaker != BreakerState::Open);
        let status = if !primary_ok {
            HealthStatus::Unhealthy
        } else if nodes.iter().any(|n| !n.warnings.is_empty()) {
            HealthStatus::Degraded
        } else {
            HealthStatus::Healthy
        };
        HealthReport {
            status,
            timestamp: SystemTime::now(),
            nodes,
            primary,
        }
    }

    /// The health of the node writes go to; `None` while no node is known
    /// to be primary (a failover under way: the report is then
    /// `Unhealthy`).
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let report = cluster.health();
    /// match report.primary() {
    ///     Some(primary) => println!("primary {} up={}", primary.node, primary.up),
    ///     None => println!("no primary known"),
    /// }
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn primary(&self) -> Option<&NodeHealth> {
        self.nodes.get(self.primary?)
    }

    /// The node called `name`.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// let report = cluster.health();
    /// if let Some(replica) = report.node("replica1") {
    ///     println!("lag {:?}", replica.lag);
    /// }
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn node(&self, name: &str) -> Option<&NodeHealth> {
        self.nodes.iter().find(|n| n.node.name() == name)
    }

    /// Every node's warnings, each prefixed with the node's name.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app")?;
    /// for warning in cluster.health().warnings() {
    ///     eprintln!("{warning}");
    /// }
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn warnings(&self) -> Vec<String> {
        self.nodes
            .iter()
            .flat_map(|n| {
                n.warnings
                    .iter()
                    .map(move |w| format!("{}: {w}", n.node.name()))
            })
            .collect()
    }
}

/// The node's warnings, from its state.
pub(crate) fn warnings(
    h: &NodeHealth,
    lag_limit: Option<Duration>,
    lag_bytes_limit: Option<u64>,
) -> Vec<String> {
    let mut out = Vec::new();
    if !h.up {
        out.push(match &h.last_error {
            Some(e) => format!("node down: {e}"),
            None => "node down".to_owned(),
        });
    }
    if h.breaker != BreakerState::Closed {
        out.push(format!("circuit breaker {}", h.breaker));
    }
    if h.pool_utilization > UTILIZATION_WARNING {
        out.push(format!(
            "high connection pool utilization: {:.2}%",
            h.pool_utilization * 100.0
        ));
    }
    if let (Some(lag), Some(limit)) = (h.lag, lag_limit) {
        if lag > limit {
            out.push(format!("replication lag {lag:?} over the limit {limit:?}"));
        }
    }
    if let (Some(bytes), Some(limit)) = (h.lag_bytes, lag_bytes_limit) {
        if bytes > limit {
            out.push(format!(
                "replication lag {bytes} bytes over the limit {limit} bytes"
            ));
        }
    }
    if h.up && h.node.role() == Role::Replica && h.in_recovery == Some(false) {
        out.push(format!(
            "not in recovery (timeline {}), yet not the primary writes go to: split brain? \
             it gets neither writes nor reads",
            h.timeline
                .map_or_else(|| "unknown".to_owned(), |t| t.to_string())
        ));
    }
    out
}

/// RFC 3339 UTC with milliseconds, e.g. `2026-11-29T23:41:05.123Z`.
#[cfg(any(feature = "serde", test))]
pub(crate) fn rfc3339(t: SystemTime) -> String {
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

#[cfg(feature = "serde")]
mod json {
    //! The guide's health handler body (`status`, `timestamp`, `database`,
    //! `warnings`, and `error` when unhealthy), plus every node.

    use serde::ser::{Serialize, SerializeMap, Serializer};

    use super::{HealthReport, HealthStatus, NodeHealth, rfc3339};

    struct Database<'a>(Option<&'a NodeHealth>);

    impl Serialize for Database<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let Some(n) = self.0 else {
                let mut m = s.serialize_map(Some(2))?;
                m.serialize_entry("connected", &false)?;
                m.serialize_entry("primary", &None::<&str>)?;
                return m.end();
            };
            let mut m = s.serialize_map(Some(5))?;
            m.serialize_entry("connected", &n.up)?;
            m.serialize_entry("primary", n.node.name())?;
            m.serialize_entry(
                "pool_utilization",
                &format!("{:.2}%", n.pool_utilization * 100.0),
            )?;
            m.serialize_entry("active_connections", &n.in_use_conns)?;
            m.serialize_entry("max_connections", &n.max_conns)?;
            m.end()
        }
    }

    #[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
    impl Serialize for NodeHealth {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut m = s.serialize_map(None)?;
            m.serialize_entry("name", self.node.name())?;
            m.serialize_entry("role", &self.node.role().to_string())?;
            m.serialize_entry("address", self.node.address())?;
            m.serialize_entry("up", &self.up)?;
            m.serialize_entry("in_recovery", &self.in_recovery)?;
            m.serialize_entry("timeline", &self.timeline)?;
            m.serialize_entry("breaker", self.breaker.as_str())?;
            m.serialize_entry("lag_bytes", &self.lag_bytes)?;
            m.serialize_entry("lag_seconds", &self.lag.map(|l| l.as_secs_f64()))?;
            m.serialize_entry("eligible_for_reads", &self.eligible_for_reads)?;
            m.serialize_entry(
                "pool_utilization",
                &format!("{:.2}%", self.pool_utilization * 100.0),
            )?;
            m.serialize_entry("active_connections", &self.in_use_conns)?;
            m.serialize_entry("max_connections", &self.max_conns)?;
            m.serialize_entry("last_check", &self.last_check.map(rfc3339))?;
            m.serialize_entry("last_error", &self.last_error)?;
            m.serialize_entry("warnings", &self.warnings)?;
            m.end()
        }
    }

    #[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
    impl Serialize for HealthReport {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut m = s.serialize_map(None)?;
            m.serialize_entry("status", self.status.as_str())?;
            if self.status == HealthStatus::Unhealthy {
                let error = match self.primary() {
                    Some(primary) => primary
                        .last_error
                        .clone()
                        .unwrap_or_else(|| format!("primary circuit breaker {}", primary.breaker)),
                    None => match self
                        .nodes
                        .iter()
                        .find(|n| n.node.role() == crate::Role::Primary)
                    {
                        Some(last) => format!(
                            "no node is known to be primary; the last one, {}, is down: {}",
                            last.node,
                            last.last_error.as_deref().unwrap_or("no answer")
                        ),
                        None => "no node is known to be primary".to_owned(),
                    },
                };
                m.serialize_entry("error", &error)?;
            }
            m.serialize_entry("timestamp", &rfc3339(self.timestamp))?;
            m.serialize_entry("database", &Database(self.primary()))?;
            let warnings = self.warnings();
            if !warnings.is_empty() {
                m.serialize_entry("warnings", &warnings)?;
            }
            m.serialize_entry("nodes", &self.nodes)?;
            m.end()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        let at = |secs: u64, millis: u64| {
            SystemTime::UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis)
        };
        assert_eq!(rfc3339(at(0, 0)), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(at(951_782_400, 5)), "2000-02-29T00:00:00.005Z");
        assert_eq!(rfc3339(at(1_796_000_000, 999)), "2026-11-30T00:53:20.999Z");
        assert_eq!(rfc3339(at(4_102_444_799, 0)), "2099-12-31T23:59:59.000Z");
    }
}
