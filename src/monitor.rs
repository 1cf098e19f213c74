//! The health monitor: one background thread per cluster that probes every
//! node each `health_check_period`: up or down, `pg_is_in_recovery()`, and
//! for replicas the replication lag in bytes and in time.
//!
//! It holds only a `Weak` reference to the cluster and stops when the
//! cluster is dropped (the stop channel disconnects) or shut down. Probes of
//! different nodes run in parallel, each on its own connection whose
//! statements and sends are bounded by [`PROBE_TIMEOUT`], so one dead or
//! black-holed node delays no other.

use std::sync::Weak;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, never, select, tick};
use postgres::types::ToSql;

use crate::cluster::Inner;
use crate::error::Error;
use crate::node::{Node, ProbeRecord};

/// Bound on one probe: each statement and each unacknowledged send (a new
/// probe connection is also bounded by the node's connect timeout).
pub(crate) const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a connection may stay parked for its thread unused.
const UNPARK_AFTER: Duration = Duration::from_secs(1);

const PRIMARY_PROBE: &str = "SELECT pg_is_in_recovery(), \
     CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn()::text END";

/// Lag in bytes against the primary's position read just before; lag in
/// time as now() minus the last replayed commit, or zero when everything
/// is replayed.
const REPLICA_PROBE: &str = "SELECT pg_is_in_recovery(), \
     pg_wal_lsn_diff($1::text::pg_lsn, pg_last_wal_replay_lsn())::float8, \
     CASE WHEN pg_last_wal_replay_lsn() IS NULL THEN NULL \
          WHEN coalesce(pg_wal_lsn_diff($1::text::pg_lsn, pg_last_wal_replay_lsn()) <= 0, \
                        pg_last_wal_receive_lsn() <= pg_last_wal_replay_lsn()) THEN 0 \
          ELSE extract(epoch FROM now() - pg_last_xact_replay_timestamp()) END::float8";

/// What the monitor's settings are.
pub(crate) struct Settings {
    /// `health_check_period`.
    pub(crate) period: Duration,
    /// `leak_detection_threshold`.
    pub(crate) leak_threshold: Option<Duration>,
    /// The shortest `max_conn_idle_time` of any node.
    pub(crate) idle_time: Duration,
}

enum Work {
    Probe,
    Leaks,
    Upkeep,
}

/// How often parked and idle connections are looked at: half the idle
/// time, between 100 ms and 1 s, so an idle connection closes within its
/// idle time plus at most a second.
fn upkeep_period(idle_time: Duration) -> Duration {
    (idle_time / 2).clamp(Duration::from_millis(100), Duration::from_secs(1))
}

/// Starts the monitor; `probes` are the probe connections `build()` made
/// (one slot per node, primary first), kept for the rounds to come.
pub(crate) fn spawn(
    cluster: Weak<Inner>,
    settings: Settings,
    stop: Receiver<()>,
    probes: Vec<Option<postgres::Client>>,
) -> std::io::Result<JoinHandle<()>> {
    thread::Builder::new()
        .name("pgxkit-health".to_owned())
        .spawn(move || run(&cluster, &settings, &stop, probes))
}

fn run(
    cluster: &Weak<Inner>,
    settings: &Settings,
    stop: &Receiver<()>,
    mut probes: Vec<Option<postgres::Client>>,
) {
    let Settings {
        period,
        leak_threshold,
        idle_time,
    } = *settings;
    let ticker = tick(period);
    // Leaks are looked for a few times per threshold, between 10 ms and 1 s.
    let leak_ticker = match leak_threshold {
        Some(t) => tick((t / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))),
        None => never(),
    };
    let upkeep = tick(upkeep_period(idle_time));
    loop {
        let work = select! {
            recv(stop) -> _ => return,
            recv(ticker) -> _ => Work::Probe,
            recv(leak_ticker) -> _ => Work::Leaks,
            recv(upkeep) -> _ => Work::Upkeep,
        };
        let Some(inner) = cluster.upgrade() else {
            return;
        };
        match work {
            Work::Leaks => inner.nodes().for_each(Node::check_leaks),
            // Connections parked for a thread that stopped using them go
            // back to r2d2; idle ones past max_conn_idle_time close.
            Work::Upkeep => inner.nodes().for_each(|node| {
                node.unpark_older_than(UNPARK_AFTER);
                node.close_idle();
            }),
            Work::Probe => round(&inner, &mut probes, true),
        }
    }
}

/// One round: the primary first (its WAL position is the replicas' yardstick),
/// then every replica at once. With `connect` false, only nodes that have a
/// probe connection are probed (`build()`'s round, right after it connected).
pub(crate) fn round(inner: &Inner, probes: &mut Vec<Option<postgres::Client>>, connect: bool) {
    let nodes: Vec<&Node> = inner.nodes().collect();
    probes.resize_with(nodes.len(), || None);
    let (primary_slot, replica_slots) = probes.split_at_mut(1);
    let primary_lsn =
        probe(nodes[0], &mut primary_slot[0], PRIMARY_PROBE, &[], connect).and_then(|row| {
            let lsn: Option<String> = row.try_get(1).ok().flatten();
            apply(nodes[0], Ok(row.try_get(0).ok()), None, None);
            lsn
        });
    thread::scope(|s| {
        for (node, slot) in nodes[1..].iter().zip(replica_slots.iter_mut()) {
            let lsn = primary_lsn.as_deref();
            s.spawn(move || {
                let row = probe(node, slot, REPLICA_PROBE, &[&lsn], connect);
                if let Some(row) = row {
                    let bytes: Option<f64> = row.try_get(1).ok().flatten();
                    let seconds: Option<f64> = row.try_get(2).ok().flatten();
                    let bytes = bytes.map(|b| b.max(0.0) as u64);
                    // Behind, but no commit replayed since the replica
                    // started (no replay timestamp to date the lag by): the
                    // lag is at least as long as the monitor has seen it so.
                    let undated = seconds.is_none() && bytes.is_some_and(|b| b > 0);
                    let undated_for = node.behind_undated(undated, Instant::now());
                    let time = seconds
                        .map(|s| Duration::from_secs_f64(s.max(0.0)))
                        .or(undated_for);
                    apply(node, Ok(row.try_get(0).ok()), bytes, time);
                }
            });
        }
    });
}

/// Runs one probe statement; on failure records the node down and drops the
/// probe connection. Without a connection and without `connect`, nothing.
fn probe(
    node: &Node,
    slot: &mut Option<postgres::Client>,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
    connect: bool,
) -> Option<postgres::Row> {
    let result = match slot.take() {
        Some(client) => Ok(client),
        None if !connect => return None,
        None => node.connect_probe(PROBE_TIMEOUT).map_err(|e| e.to_string()),
    }
    .and_then(|mut client| match client.query_one(sql, params) {
        Ok(row) => {
            *slot = Some(client);
            Ok(row)
        }
        Err(e) => Err(Error::from_postgres(e, &node.info).to_string()),
    });
    match result {
        Ok(row) => Some(row),
        Err(why) => {
            apply(node, Err(why), None, None);
            None
        }
    }
}

/// Records that a node could not be reached for its first probe at `build()`.
pub(crate) fn record_unreachable(node: &Node, err: &Error) {
    apply(node, Err(err.to_string()), None, None);
}

/// Records a probe's result on the node and logs a change of up/down.
fn apply(
    node: &Node,
    result: Result<Option<bool>, String>,
    lag_bytes: Option<u64>,
    lag: Option<Duration>,
) {
    let up = result.is_ok();
    let (in_recovery, error) = match result {
        Ok(r) => (r, None),
        Err(e) => (None, Some(e)),
    };
    if up {
        node.set_lag(lag_bytes, lag);
        node.probe_succeeded();
    }
    node.record_up(up, error.as_deref());
    node.set_probe_record(ProbeRecord {
        checked_at: Some(SystemTime::now()),
        in_recovery,
        error,
    });
}
