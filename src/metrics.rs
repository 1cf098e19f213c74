//! Prometheus metrics (feature `prometheus`), registered on the user's
//! `prometheus::Registry` by [`ClusterBuilder::prometheus`](crate::ClusterBuilder::prometheus).
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `pgxkit_queries_total` | counter | `operation`, `route` (`primary`/`replica`: the handle the call came through), `status` (`success`/`error`) |
//! | `pgxkit_query_duration_seconds` | histogram, buckets 1 ms × 2ⁿ, 20 of them | `operation`, `route`, `status` |
//! | `pgxkit_checkout_wait_seconds` | histogram, same buckets | `node` |
//! | `pgxkit_connections` | gauge | `node`, `role`, `state` (`acquired`, `idle`, `total`, `max`) |
//! | `pgxkit_node_up` | gauge (1/0) | `node`, `role` |
//! | `pgxkit_replica_lag_bytes` | gauge | `node` |
//! | `pgxkit_replica_lag_seconds` | gauge | `node` |
//! | `pgxkit_breaker_state` | gauge (0 closed, 1 open, 2 half-open) | `node` |
//!
//! Counters and histograms are updated by internal hooks as operations end;
//! gauges are read from the cluster at scrape time, without I/O.

use std::sync::{Arc, Weak};

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

use crate::breaker::BreakerState;
use crate::error::{Error, Result};
use crate::hooks::Hooks;
use crate::info::Role;
use crate::node::Nodes;

fn buckets() -> Vec<f64> {
    // 1 ms, 2 ms, ... ~524 s, as in the Go guide.
    (0..20).map(|i| 0.001 * f64::from(1u32 << i)).collect()
}

fn prom_error(e: prometheus::Error) -> Error {
    Error::config(format!("prometheus: {e}"))
}

/// The metrics updated by hooks; registered at `build()`.
pub(crate) struct OperationMetrics {
    queries: IntCounterVec,
    durations: HistogramVec,
    checkout_wait: HistogramVec,
}

impl OperationMetrics {
    /// Creates the counters and histograms and adds the hooks that feed
    /// them; nothing is registered until [`register`] (once the cluster is
    /// built, so a `build()` that fails leaves the registry as it was).
    pub(crate) fn install(hooks: &mut Hooks) -> Result<Pending> {
        let queries = IntCounterVec::new(
            Opts::new(
                "pgxkit_queries_total",
                "Operations run, by operation and status.",
            ),
            &["operation", "route", "status"],
        )
        .map_err(prom_error)?;
        let durations = HistogramVec::new(
            HistogramOpts::new(
                "pgxkit_query_duration_seconds",
                "Operation duration, checkout included.",
            )
            .buckets(buckets()),
            &["operation", "route", "status"],
        )
        .map_err(prom_error)?;
        let checkout_wait = HistogramVec::new(
            HistogramOpts::new(
                "pgxkit_checkout_wait_seconds",
                "Time waited for a pooled connection.",
            )
            .buckets(buckets()),
            &["node"],
        )
        .map_err(prom_error)?;
        let pending = Pending(vec![twin(&queries), twin(&durations), twin(&checkout_wait)]);
        let metrics = Arc::new(OperationMetrics {
            queries,
            durations,
            checkout_wait,
        });
        let m = Arc::clone(&metrics);
        hooks.after_operation.push(Arc::new(move |op| {
            let status = if op.is_ok() { "success" } else { "error" };
            let labels = [op.kind().as_str(), op.route().as_str(), status];
            m.queries.with_label_values(&labels).inc();
            m.durations
                .with_label_values(&labels)
                .observe(op.duration().as_secs_f64());
            Ok(())
        }));
        hooks.on_acquire.push(Arc::new(move |ev| {
            metrics
                .checkout_wait
                .with_label_values(&[ev.node().name()])
                .observe(ev.duration().as_secs_f64());
        }));
        Ok(pending)
    }
}

/// A collector, and a second handle to it (the prometheus types are
/// `Arc`-backed) with which to unregister it again.
type Twin = (Box<dyn Collector>, Box<dyn Collector>);

fn twin<C: Collector + Clone + 'static>(c: &C) -> Twin {
    (Box::new(c.clone()), Box::new(c.clone()))
}

/// Collectors made at `resolve()`, registered only once the cluster is up.
pub(crate) struct Pending(Vec<Twin>);

/// Registers `pending` and the cluster's gauges on `registry`, all or none:
/// on a failure (a name already registered there) whatever this call
/// registered is unregistered again.
pub(crate) fn register(registry: &Registry, pending: Pending, cluster: Weak<Nodes>) -> Result<()> {
    let mut collectors = pending.0;
    collectors.push(twin(&ClusterCollector::new(cluster)?));
    let mut done = Vec::new();
    for (collector, handle) in collectors {
        if let Err(e) = registry.register(collector) {
            for handle in done {
                let _ = registry.unregister(handle);
            }
            return Err(prom_error(e));
        }
        done.push(handle);
    }
    Ok(())
}

/// Gauges read from the cluster at scrape time.
#[derive(Clone)]
pub(crate) struct ClusterCollector {
    cluster: Weak<Nodes>,
    connections: GaugeVec,
    node_up: GaugeVec,
    lag_bytes: GaugeVec,
    lag_seconds: GaugeVec,
    breaker: GaugeVec,
}

impl ClusterCollector {
    fn new(cluster: Weak<Nodes>) -> Result<ClusterCollector> {
        let gauge =
            |name: &str, help: &str, labels: &[&str]| GaugeVec::new(Opts::new(name, help), labels);
        let collector = ClusterCollector {
            cluster,
            connections: gauge(
                "pgxkit_connections",
                "Pool connections by state (acquired, idle, total, max).",
                &["node", "role", "state"],
            )
            .map_err(prom_error)?,
            node_up: gauge(
                "pgxkit_node_up",
                "1 when the node's last health probe succeeded.",
                &["node", "role"],
            )
            .map_err(prom_error)?,
            lag_bytes: gauge(
                "pgxkit_replica_lag_bytes",
                "WAL bytes a replica has not replayed.",
                &["node"],
            )
            .map_err(prom_error)?,
            lag_seconds: gauge(
                "pgxkit_replica_lag_seconds",
                "Replication lag in time.",
                &["node"],
            )
            .map_err(prom_error)?,
            breaker: gauge(
                "pgxkit_breaker_state",
                "Circuit breaker state: 0 closed, 1 open, 2 half-open.",
                &["node"],
            )
            .map_err(prom_error)?,
        };
        Ok(collector)
    }

    fn vecs(&self) -> [&GaugeVec; 5] {
        [
            &self.connections,
            &self.node_up,
            &self.lag_bytes,
            &self.lag_seconds,
            &self.breaker,
        ]
    }
}

impl Collector for ClusterCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.vecs().into_iter().flat_map(|v| v.desc()).collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let Some(inner) = self.cluster.upgrade() else {
            return Vec::new();
        };
        for v in self.vecs() {
            v.reset();
        }
        for node in inner.nodes() {
            let stats = node.stats();
            let name = stats.node.name();
            let role = stats.node.role().to_string();
            let p = &stats.pool;
            for (state, value) in [
                ("acquired", p.in_use_conns),
                ("idle", p.idle_conns),
                ("total", p.total_conns),
                ("max", p.max_conns),
            ] {
                self.connections
                    .with_label_values(&[name, role.as_str(), state])
                    .set(f64::from(value));
            }
            self.node_up
                .with_label_values(&[name, role.as_str()])
                .set(if stats.up { 1.0 } else { 0.0 });
            let breaker = match stats.breaker {
                BreakerState::Closed => 0.0,
                BreakerState::Open => 1.0,
                BreakerState::HalfOpen => 2.0,
            };
            self.breaker.with_label_values(&[name]).set(breaker);
            if stats.node.role() == Role::Replica {
                if let Some(bytes) = stats.lag_bytes {
                    self.lag_bytes.with_label_values(&[name]).set(bytes as f64);
                }
                if let Some(lag) = stats.lag {
                    self.lag_seconds
                        .with_label_values(&[name])
                        .set(lag.as_secs_f64());
                }
            }
        }
        self.vecs().into_iter().flat_map(|v| v.collect()).collect()
    }
}
