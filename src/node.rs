//! One server: what it is (name, role, address), how its connections are
//! opened, its pool (`pool`), its circuit breaker (`breaker::Gate`), and
//! what the health monitor last saw of it. Running statements on it is in
//! `exec.rs`.

use std::sync::atomic::{
    AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed,
};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::breaker::Gate;
use crate::deadline::{Canceller, Watchdog};
use crate::hooks::{self, Hooks, NodeEvent, OperationKind};
use crate::info::{NodeInfo, Role};
use crate::plans::Capture;
use crate::pool::Pool;
use crate::pool::manager::Connector;
use crate::settings::{NodeConfig, NodeOptions};
use crate::socket::Sockets;
use crate::statements::{Call, StatementMode};
use crate::stats::NodeStats;
use crate::sync::lock;
use postgres::types::ToSql;

/// Marks "no value" in the lag atomics.
const UNKNOWN: u64 = u64::MAX;

/// One parameterised statement to run: how, what, and where slow ones go.
#[derive(Clone, Copy)]
pub(crate) struct Stmt<'a> {
    pub(crate) mode: StatementMode,
    pub(crate) kind: OperationKind,
    pub(crate) route: Role,
    pub(crate) sql: &'a str,
    pub(crate) params: &'a [&'a (dyn ToSql + Sync)],
    pub(crate) call: Call,
    pub(crate) plans: Option<&'a Capture>,
}

/// What the last health probe found, beyond the atomics on the hot path.
#[derive(Debug, Clone, Default)]
pub(crate) struct ProbeRecord {
    pub(crate) checked_at: Option<SystemTime>,
    pub(crate) in_recovery: Option<bool>,
    pub(crate) error: Option<String>,
}

/// A cluster's nodes, and which is primary now (see `topology.rs`): what
/// its background workers (health monitor, plan capture, metrics
/// collector) hold, weakly, so they need nothing else of the cluster and
/// stop once it is gone.
#[derive(Debug)]
pub(crate) struct Nodes {
    /// Every node, in the order they were configured.
    pub(crate) nodes: Vec<Node>,
    /// The index of the primary in `nodes`, `topology::NO_PRIMARY` when
    /// none is known.
    pub(crate) primary: AtomicUsize,
    /// The index of the node whose role is `Primary` (the primary, or the
    /// last one while it is down), `topology::NO_PRIMARY` when none: the
    /// balancer's turns skip it, so they are counted over the replicas.
    pub(crate) primary_role: AtomicUsize,
    pub(crate) decisions: Mutex<crate::topology::Decisions>,
    /// Asks the monitor for a probe round now (capacity 1).
    pub(crate) nudge: crossbeam_channel::Sender<()>,
}

impl Nodes {
    /// Every node, in the order they were configured.
    pub(crate) fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter()
    }
}

/// `Node::recovery` values.
const RECOVERY_UNKNOWN: u8 = 0;
const IN_RECOVERY: u8 = 1;
const NOT_IN_RECOVERY: u8 = 2;

#[derive(Debug)]
pub(crate) struct Node {
    pub(crate) info: NodeInfo,
    /// The node's connections: checkout, parking, leak tracking, stats.
    pub(crate) pool: Pool,
    /// How connections to it are opened (and cancel requests sent).
    pub(crate) connector: Arc<Connector>,
    /// The same connector, as the deadline watchdog takes it.
    pub(crate) canceller: Arc<dyn Canceller>,
    pub(crate) watchdog: Arc<Watchdog>,
    hooks: Arc<Hooks>,
    up: AtomicBool,
    lag_bytes: AtomicU64,
    lag_micros: AtomicU64,
    /// Since when the monitor has seen this replica behind with no replayed
    /// commit to date its lag by.
    behind_since: Mutex<Option<Instant>>,
    probe: Mutex<ProbeRecord>,
    /// `pg_is_in_recovery()` as last read (`RECOVERY_UNKNOWN` before).
    recovery: AtomicU8,
    /// The timeline of a node not in recovery, as last read (0: unknown).
    timeline: AtomicU32,
    /// Its WAL position as last read: the current one when not in
    /// recovery, else the last one replayed (0: unknown).
    position: AtomicU64,
    /// The circuit breaker every call passes.
    pub(crate) gate: Gate,
}

impl Node {
    pub(crate) fn open(config: NodeConfig, options: &NodeOptions<'_>) -> Node {
        let NodeConfig {
            info,
            pg,
            tls,
            pool,
            init_sql,
            ..
        } = config;
        let connector = Arc::new(Connector {
            pg,
            tls,
            init_sql,
            node: info.clone(),
            watchdog: Arc::clone(&options.watchdog),
            sockets: Sockets::default(),
        });
        Node {
            pool: Pool::open(&info, Arc::clone(&connector), &pool, options),
            gate: Gate::new(
                options.settings.breaker,
                info.clone(),
                Arc::clone(&options.hooks),
            ),
            info,
            canceller: Arc::clone(&connector) as Arc<dyn Canceller>,
            connector,
            hooks: Arc::clone(&options.hooks),
            watchdog: Arc::clone(&options.watchdog),
            up: AtomicBool::new(true),
            lag_bytes: AtomicU64::new(UNKNOWN),
            lag_micros: AtomicU64::new(UNKNOWN),
            behind_since: Mutex::new(None),
            probe: Mutex::new(ProbeRecord::default()),
            recovery: AtomicU8::new(RECOVERY_UNKNOWN),
            timeline: AtomicU32::new(0),
            position: AtomicU64::new(0),
        }
    }

    /// `pg_is_in_recovery()` as the last probe that read it found.
    #[inline]
    pub(crate) fn in_recovery(&self) -> Option<bool> {
        match self.recovery.load(Relaxed) {
            IN_RECOVERY => Some(true),
            NOT_IN_RECOVERY => Some(false),
            _ => None,
        }
    }

    /// The timeline the node was last seen on when not in recovery.
    pub(crate) fn timeline(&self) -> Option<u32> {
        Some(self.timeline.load(Relaxed)).filter(|&t| t > 0)
    }

    /// Records what a probe read of the node's replication state: in
    /// recovery or not, the timeline (not in recovery), the WAL position.
    pub(crate) fn set_replication(
        &self,
        in_recovery: Option<bool>,
        timeline: Option<u32>,
        position: Option<u64>,
    ) {
        if let Some(r) = in_recovery {
            self.recovery
                .store(if r { IN_RECOVERY } else { NOT_IN_RECOVERY }, Relaxed);
        }
        self.timeline.store(timeline.unwrap_or(0), Relaxed);
        if let Some(p) = position {
            self.position.fetch_max(p, Relaxed);
        }
    }

    /// The WAL position a replica was last seen to have replayed (by the
    /// monitor, or a read-your-writes check); 0 when unknown.
    #[inline]
    pub(crate) fn replayed(&self) -> u64 {
        self.position.load(Relaxed)
    }

    /// Records a replay position a read-your-writes check saw.
    pub(crate) fn saw_replayed(&self, lsn: u64) {
        self.position.fetch_max(lsn, Relaxed);
    }

    /// What the topology's decision reads of the node.
    pub(crate) fn view(&self) -> crate::topology::View {
        crate::topology::View {
            up: self.is_up(),
            in_recovery: self.in_recovery(),
            timeline: self.timeline(),
        }
    }

    /// Sets the node's role; logs and runs the `on_role_change` hooks when
    /// that is a change.
    pub(crate) fn change_role(&self, role: Role) {
        let was = self.info.set_role(role);
        if was == role {
            return;
        }
        // A position from before (a primary's) says nothing of what a
        // replica has replayed.
        self.position.store(0, Relaxed);
        log::warn!(
            "{} ({}) was {was}: it is {role} now",
            self.info.name(),
            self.info.address()
        );
        let event = NodeEvent {
            node: &self.info,
            breaker: None,
            up: None,
            role: Some((was, role)),
        };
        hooks::notify(&self.hooks.on_role_change, "on_role_change", |hook| {
            hook(&event)
        });
    }

    /// Whether the last health probe (or the check at build) succeeded.
    pub(crate) fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }

    /// Records whether the node answered; returns the previous value.
    pub(crate) fn set_up(&self, up: bool) -> bool {
        self.up.swap(up, Relaxed)
    }

    /// Replication lag as last measured: bytes and time, `None` when unknown.
    pub(crate) fn lag(&self) -> (Option<u64>, Option<Duration>) {
        let known = |v: u64| (v != UNKNOWN).then_some(v);
        (
            known(self.lag_bytes.load(Relaxed)),
            known(self.lag_micros.load(Relaxed)).map(Duration::from_micros),
        )
    }

    pub(crate) fn set_lag(&self, bytes: Option<u64>, time: Option<Duration>) {
        self.lag_bytes.store(bytes.unwrap_or(UNKNOWN), Relaxed);
        let micros = time.map_or(UNKNOWN, |t| {
            u64::try_from(t.as_micros()).unwrap_or(UNKNOWN - 1)
        });
        self.lag_micros.store(micros, Relaxed);
    }

    /// For a replica seen `behind` with no replay timestamp: how long it has
    /// been seen so (from the first such probe); `None`, and forgotten, once
    /// it is not.
    pub(crate) fn behind_undated(&self, behind: bool, now: Instant) -> Option<Duration> {
        let mut since = lock(&self.behind_since);
        if !behind {
            *since = None;
            return None;
        }
        Some(now.saturating_duration_since(*since.get_or_insert(now)))
    }

    pub(crate) fn probe_record(&self) -> ProbeRecord {
        lock(&self.probe).clone()
    }

    pub(crate) fn set_probe_record(&self, record: ProbeRecord) {
        *lock(&self.probe) = record;
    }

    /// Records whether the node answered its probe; logs and runs the hooks on a change.
    pub(crate) fn record_up(&self, up: bool, why: Option<&str>) {
        let was_up = self.set_up(up);
        if was_up == up {
            return;
        }
        if up {
            log::info!("{} is up again", self.info);
        } else {
            log::warn!("{} is down: {}", self.info, why.unwrap_or("probe failed"));
        }
        let event = NodeEvent {
            node: &self.info,
            breaker: None,
            up: Some(up),
            role: None,
        };
        hooks::notify(
            &self.hooks.on_node_health_change,
            "on_node_health_change",
            |hook| hook(&event),
        );
    }

    /// How this node's connections are opened.
    /// Shuts down the socket of every open connection to this node (a
    /// node found silent), so calls blocked on it fail at once; how many.
    pub(crate) fn end_connections(&self) -> usize {
        self.connector.sockets.shutdown_all()
    }

    pub(crate) fn connector(&self) -> &Arc<Connector> {
        &self.connector
    }

    pub(crate) fn stats(&self) -> NodeStats {
        let (lag_bytes, lag) = self.lag();
        NodeStats {
            node: self.info.clone(),
            up: self.is_up(),
            breaker: self.gate.state(),
            lag_bytes,
            lag,
            pool: self.pool.stats(),
        }
    }
}
