//! The settings a cluster runs with, resolved and validated by the
//! builder (`config.rs`): the cluster-wide [`Settings`], each node's
//! [`NodeConfig`], the defaults. Read by the cluster and its nodes; this
//! module depends on neither.

use std::sync::Arc;
use std::time::Duration;

use crate::balancer::ReadBalance;
use crate::breaker::BreakerConfig;
use crate::deadline::Watchdog;
use crate::error::{Error, Result};
use crate::hooks::Hooks;
use crate::info::NodeInfo;
use crate::plans::PlanCapture;
use crate::statements::StatementMode;
use crate::tls;

/// Every cluster-wide option, written once: the builder holds it, the
/// cluster and its nodes read it (as ureq's `ConfigBuilder` wraps its
/// `Config`). Defaults are here and nowhere else.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) checkout_timeout: Duration,
    pub(crate) connect_timeout: Option<Duration>,
    pub(crate) validate_after_idle: Duration,
    pub(crate) application_name: Option<String>,
    pub(crate) lazy_connect: bool,
    pub(crate) breaker: BreakerConfig,
    pub(crate) max_replica_lag: Option<Duration>,
    pub(crate) max_replica_lag_bytes: Option<u64>,
    pub(crate) read_fallback: ReadFallback,
    pub(crate) read_balance: ReadBalance,
    pub(crate) leak_threshold: Option<Duration>,
    pub(crate) leak_backtrace: bool,
    pub(crate) plan_capture: Option<PlanCapture>,
    pub(crate) statement_timeout: Option<Duration>,
    pub(crate) tcp_user_timeout: Option<Duration>,
    pub(crate) keepalives_idle: Option<Duration>,
    pub(crate) require_tls: bool,
    pub(crate) statement_mode: StatementMode,
    pub(crate) statement_cache_capacity: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            checkout_timeout: defaults::CHECKOUT_TIMEOUT,
            connect_timeout: None,
            validate_after_idle: defaults::VALIDATE_AFTER_IDLE,
            application_name: None,
            lazy_connect: false,
            breaker: BreakerConfig::default(),
            max_replica_lag: None,
            max_replica_lag_bytes: None,
            read_fallback: ReadFallback::Primary,
            read_balance: ReadBalance::PerThread,
            leak_threshold: None,
            leak_backtrace: false,
            plan_capture: None,
            statement_timeout: None,
            tcp_user_timeout: None,
            keepalives_idle: None,
            require_tls: false,
            statement_mode: StatementMode::Cached,
            statement_cache_capacity: 512,
        }
    }
}

/// What reads do when no replica is eligible (all down, open breakers, or
/// lagging past the limit).
///
/// ```no_run
/// # fn main() -> Result<(), pgxkit::Error> {
/// let cluster = pgxkit::Cluster::builder()
///     .primary("postgres://app@db-primary/app")
///     .replica("postgres://app@db-replica/app")
///     .read_fallback(pgxkit::ReadFallback::Error)
///     .build()?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadFallback {
    /// Reads go to the primary. The default.
    #[default]
    Primary,
    /// Reads fail with [`ErrorKind::NoEligibleReplica`](crate::ErrorKind::NoEligibleReplica).
    Error,
}

/// Defaults, in one place for the docs and the code.
pub(crate) mod defaults {
    use std::time::Duration;

    pub(crate) fn max_conns() -> u32 {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        u32::try_from(cpus).unwrap_or(u32::MAX).max(4)
    }
    pub(crate) const MAX_CONN_LIFETIME: Duration = Duration::from_secs(3600);
    pub(crate) const MAX_CONN_IDLE_TIME: Duration = Duration::from_secs(1800);
    pub(crate) const HEALTH_CHECK_PERIOD: Duration = Duration::from_secs(10);
    pub(crate) const CHECKOUT_TIMEOUT: Duration = Duration::from_secs(10);
    pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
    pub(crate) const VALIDATE_AFTER_IDLE: Duration = Duration::from_secs(1);
    pub(crate) const APPLICATION_NAME: &str = "pgxkit";
}

/// One node's pool settings, resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PoolConfig {
    pub(crate) max_conns: u32,
    pub(crate) min_conns: u32,
    pub(crate) max_conn_lifetime: Duration,
    pub(crate) max_conn_lifetime_jitter: Duration,
    pub(crate) max_conn_idle_time: Duration,
}

impl PoolConfig {
    /// What the bounds of each value alone (checked where it was given)
    /// cannot see.
    pub(crate) fn validate(&self) -> Result<()> {
        if self.min_conns > self.max_conns {
            return Err(Error::config(format!(
                "min_conns: {} is more than max_conns {}",
                self.min_conns, self.max_conns
            )));
        }
        Ok(())
    }
}

/// One node, ready to be opened.
pub(crate) struct NodeConfig {
    pub(crate) info: NodeInfo,
    pub(crate) pg: postgres::Config,
    pub(crate) tls: tls::Tls,
    pub(crate) pool: PoolConfig,
    pub(crate) health_check_period: Option<Duration>,
    pub(crate) init_sql: Option<String>,
}

/// The whole cluster's settings, resolved and validated: the nodes, what
/// is derived from them, and the builder's [`Settings`] as they were set.
pub(crate) struct ClusterConfig {
    /// Every node, in the order they were configured.
    pub(crate) nodes: Vec<NodeConfig>,
    /// The node given as the single-host primary DSN, if one was: the
    /// primary the cluster starts with (and the node `build()` needs).
    pub(crate) primary: Option<usize>,
    pub(crate) health_check_period: Duration,
    pub(crate) hooks: Arc<Hooks>,
    pub(crate) settings: Settings,
}

/// What every node is opened with, beside its own [`NodeConfig`]: the
/// cluster's settings (read at open, not kept), hooks and watchdog.
#[derive(Debug, Clone)]
pub(crate) struct NodeOptions<'a> {
    pub(crate) settings: &'a Settings,
    pub(crate) hooks: Arc<Hooks>,
    pub(crate) watchdog: Arc<Watchdog>,
}
