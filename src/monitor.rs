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
use std::time::{Duration, SystemTime};

use crossbeam_channel::{Receiver, never, select, tick};
use postgres::types::ToSql;

use crate::cluster::Inner;
use crate::error::source_chain;
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

pub(crate) fn spawn(
    cluster: Weak<Inner>,
    period: Duration,
    leak_threshold: Option<Duration>,
    stop: Receiver<()>,
) -> std::io::Result<JoinHandle<()>> {
    thread::Builder::new()
        .name("pgxkit-health".to_owned())
        .spawn(move || run(&cluster, period, leak_threshold, &stop))
}

fn run(
    cluster: &Weak<Inner>,
    period: Duration,
    leak_threshold: Option<Duration>,
    stop: &Receiver<()>,
) {
    let ticker = tick(period);
    // Leaks are looked for a few times per threshold, between 10 ms and 1 s.
    let leak_ticker = match leak_threshold {
        Some(t) => tick((t / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))),
        None => never(),
    };
    // One probe connection per node, kept between rounds.
    let mut probes: Vec<Option<postgres::Client>> = Vec::new();
    loop {
        let leaks_only = select! {
            recv(stop) -> _ => return,
            recv(ticker) -> _ => false,
            recv(leak_ticker) -> _ => true,
        };
        let Some(inner) = cluster.upgrade() else {
            return;
        };
        if leaks_only {
            inner.nodes().for_each(Node::check_leaks);
        } else {
            // Connections parked for a thread that stopped using them go
            // back to r2d2, whose reaper applies the idle timeout.
            inner
                .nodes()
                .for_each(|node| node.unpark_older_than(UNPARK_AFTER));
            round(&inner, &mut probes);
        }
    }
}

/// One round: the primary first (its WAL position is the replicas' yardstick),
/// then every replica at once.
pub(crate) fn round(inner: &Inner, probes: &mut Vec<Option<postgres::Client>>) {
    let nodes: Vec<&Node> = inner.nodes().collect();
    probes.resize_with(nodes.len(), || None);
    let (primary_slot, replica_slots) = probes.split_at_mut(1);
    let primary_lsn = probe(nodes[0], &mut primary_slot[0], PRIMARY_PROBE, &[]).and_then(|row| {
        let lsn: Option<String> = row.try_get(1).ok().flatten();
        apply(nodes[0], Ok(row.try_get(0).ok()), None, None);
        lsn
    });
    thread::scope(|s| {
        for (node, slot) in nodes[1..].iter().zip(replica_slots.iter_mut()) {
            let lsn = primary_lsn.as_deref();
            s.spawn(move || {
                let row = probe(node, slot, REPLICA_PROBE, &[&lsn]);
                if let Some(row) = row {
                    let bytes: Option<f64> = row.try_get(1).ok().flatten();
                    let seconds: Option<f64> = row.try_get(2).ok().flatten();
                    let bytes = bytes.map(|b| b.max(0.0) as u64);
                    let time = seconds.map(|s| Duration::from_secs_f64(s.max(0.0)));
                    apply(node, Ok(row.try_get(0).ok()), bytes, time);
                }
            });
        }
    });
}

/// Runs one probe statement; on failure records the node down and drops the
/// probe connection.
fn probe(
    node: &Node,
    slot: &mut Option<postgres::Client>,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Option<postgres::Row> {
    let result = match slot.take() {
        Some(client) => Ok(client),
        None => node
            .connect_probe(PROBE_TIMEOUT)
            .map_err(|e| source_chain(&e)),
    }
    .and_then(|mut client| match client.query_one(sql, params) {
        Ok(row) => {
            *slot = Some(client);
            Ok(row)
        }
        Err(e) => Err(source_chain(&e)),
    });
    match result {
        Ok(row) => Some(row),
        Err(why) => {
            apply(node, Err(why), None, None);
            None
        }
    }
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
