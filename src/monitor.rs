//! The health monitor: one background thread per cluster that probes every
//! node each `health_check_period`: up or down, `pg_is_in_recovery()`, and
//! for replicas the replication lag in bytes and in time.
//!
//! It holds only a `Weak` reference to the cluster's nodes and stops when the
//! cluster is dropped (the stop channel disconnects) or shut down.
//!
//! Bulkheads: each node is probed by a thread of its own (a [`Prober`]), on
//! its own connection, so a node that does not answer (a hung server, a
//! frozen host: nothing the kernel reports) holds up only its own prober.
//! The monitor waits for the primary's answer at most [`overdue_after`] (the
//! replicas' lag is measured against its WAL position), never for a
//! replica's, and marks a node whose probe has been running longer than
//! that down ("no answer"), which takes it out of reads. Probers hold no
//! strong reference to the cluster while they wait on the network.

use std::sync::{Arc, Mutex, Weak};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, Sender, never, select, tick};

use crate::error::Error;
use crate::info::NodeInfo;
use crate::node::Nodes;
use crate::node::{Node, ProbeRecord};
use crate::pool::manager::{Connected, Connector};
use crate::sync::lock;

/// Bound on one probe: each statement and each unacknowledged send (a new
/// probe connection is also bounded by the node's connect timeout).
pub(crate) const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a connection may stay parked for its thread unused.
const UNPARK_AFTER: Duration = Duration::from_secs(1);

/// One query for every node, whatever its role: whether it is in
/// recovery; its WAL position (the current one, else the last replayed);
/// not in recovery, the WAL file name of its current position (whose
/// first eight digits are the timeline it writes on: it moves at
/// promotion); in recovery, its lag in bytes against the primary's
/// position read just before (`$1`, NULL when not known), and in time as
/// now() minus the last replayed commit, or zero when everything is
/// replayed. Sent with the simple protocol (`$1` written in as a literal,
/// [`probe_sql`]), which every pooler passes in any pooling mode: a named
/// statement through PgBouncer in transaction mode may be prepared on one
/// server connection and run on another.
const PROBE: &str = "SELECT pg_is_in_recovery(), \
     CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
          ELSE pg_current_wal_lsn() END::text, \
     CASE WHEN pg_is_in_recovery() THEN NULL \
          ELSE pg_walfile_name(pg_current_wal_lsn()) END, \
     pg_wal_lsn_diff($1::text::pg_lsn, pg_last_wal_replay_lsn())::float8, \
     CASE WHEN pg_last_wal_replay_lsn() IS NULL THEN NULL \
          WHEN coalesce(pg_wal_lsn_diff($1::text::pg_lsn, pg_last_wal_replay_lsn()) <= 0, \
                        pg_last_wal_receive_lsn() <= pg_last_wal_replay_lsn()) THEN 0 \
          ELSE extract(epoch FROM now() - pg_last_xact_replay_timestamp()) END::float8";

/// The shortest time between two rounds asked for by failing writes
/// ([`Nodes::nudge`]): while no primary is known, a new one is found
/// within this plus one probe.
pub(crate) const NUDGE_GAP: Duration = Duration::from_millis(100);

/// What wakes the monitor besides its timers.
pub(crate) struct Wakers {
    /// Disconnects when the cluster is shut down or dropped.
    pub(crate) stop: Receiver<()>,
    /// A write failed in a way that may mean a failover: probe now.
    pub(crate) nudges: Receiver<()>,
}

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
    Nudged,
}

/// How often parked and idle connections are looked at: half the idle
/// time, between 100 ms and 1 s, so an idle connection closes within its
/// idle time plus at most a second.
fn upkeep_period(idle_time: Duration) -> Duration {
    (idle_time / 2).clamp(Duration::from_millis(100), Duration::from_secs(1))
}

/// Starts the monitor with the probers `build()` started.
pub(crate) fn spawn(
    cluster: Weak<Nodes>,
    settings: Settings,
    wakers: Wakers,
    probes: Probers,
) -> std::io::Result<JoinHandle<()>> {
    thread::Builder::new()
        .name("pgxkit-health".to_owned())
        .spawn(move || run(&cluster, &settings, &wakers, probes))
}

fn run(cluster: &Weak<Nodes>, settings: &Settings, wakers: &Wakers, mut probes: Probers) {
    let stop = &wakers.stop;
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
    let mut last_round = Instant::now();
    loop {
        let work = select! {
            recv(stop) -> _ => return,
            recv(ticker) -> _ => Work::Probe,
            recv(leak_ticker) -> _ => Work::Leaks,
            recv(upkeep) -> _ => Work::Upkeep,
            recv(wakers.nudges) -> _ => Work::Nudged,
        };
        if let Work::Nudged = work {
            // Not a storm: at most one asked-for round per NUDGE_GAP.
            let wait = NUDGE_GAP.saturating_sub(last_round.elapsed());
            if !wait.is_zero()
                && matches!(
                    stop.recv_timeout(wait),
                    Ok(()) | Err(crossbeam_channel::RecvTimeoutError::Disconnected)
                )
            {
                return;
            }
        }
        let Some(inner) = cluster.upgrade() else {
            return;
        };
        match work {
            Work::Leaks => inner.nodes().for_each(|node| node.pool.check_leaks()),
            // Connections parked for a thread that stopped using them go
            // back to r2d2; idle ones past max_conn_idle_time close.
            Work::Upkeep => {
                inner.nodes().for_each(|node| {
                    node.pool.unpark_older_than(UNPARK_AFTER);
                    node.pool.close_idle();
                });
                probes.mark_overdue(&inner, period);
            }
            Work::Probe | Work::Nudged => {
                probes.round(&inner, period, false, true);
                last_round = Instant::now();
            }
        }
    }
}

/// How long a probe may run before its node is marked down: one health
/// period, at least 1 s (a busy machine can take a few hundred ms to
/// answer) and at most [`PROBE_TIMEOUT`]. A node that stops answering is so
/// out of reads within its period plus this.
pub(crate) fn overdue_after(period: Duration) -> Duration {
    period.clamp(Duration::from_secs(1), PROBE_TIMEOUT)
}

/// How long a node may go without answering (its probes overdue, or
/// failing without a word from the server) before every open connection
/// to it is ended, so calls blocked on it fail: twice [`overdue_after`]
/// (10 s by default). A call without a deadline on a node that goes silent
/// so fails within one health period plus this, plus the monitor's upkeep
/// tick (at most 1 s).
pub(crate) fn silence_limit(period: Duration) -> Duration {
    overdue_after(period) * 2
}

/// What one probe asks: the primary's WAL position (for a replica's lag),
/// and whether to open a connection when the prober has none.
struct Job {
    primary_lsn: Option<String>,
    connect: bool,
}

/// What one probe found, before it is recorded on its node.
enum Outcome {
    Probed {
        in_recovery: Option<bool>,
        /// Its WAL position (current, else last replayed), as text.
        lsn: Option<String>,
        /// Not in recovery: the timeline it writes on.
        timeline: Option<u32>,
        /// In recovery: `None` when the primary's position was not known
        /// this round.
        bytes: Option<Option<u64>>,
        seconds: Option<f64>,
    },
    /// `answered`: the server said why (an SQLSTATE); else it was not
    /// reached, or did not answer.
    Failed { why: String, answered: bool },
    /// No connection, and none to be opened.
    Skipped,
}

impl Outcome {
    fn failed(err: &Error) -> Outcome {
        Outcome::Failed {
            why: err.to_string(),
            answered: err.as_postgres().and_then(|e| e.as_db_error()).is_some(),
        }
    }

    /// Whether the node answered (a success, or a server's error).
    fn answered(&self) -> bool {
        match self {
            Outcome::Failed { answered, .. } => *answered,
            _ => true,
        }
    }
}

/// A prober's state, shared by its thread and the monitor.
#[derive(Default)]
struct ProbeState {
    /// When the probe running now started.
    busy_since: Option<Instant>,
    /// Since when the node has not answered: its probes ran overdue, or
    /// failed without an answer from the server.
    silent_since: Option<Instant>,
}

/// One node's prober thread, as the monitor sees it.
pub(crate) struct Prober {
    jobs: Sender<Job>,
    /// The primary's WAL position each finished probe found (replicas send
    /// `None`); one slot, the newest kept.
    done: Receiver<Option<String>>,
    state: Arc<Mutex<ProbeState>>,
    overdue_reported: bool,
    /// This silence's connections have been ended.
    aborted: bool,
}

impl Prober {
    /// How long the running probe has run, and how long the node has been
    /// silent (counting a probe overdue by `bound` as silence).
    fn busy_and_silent(
        &self,
        now: Instant,
        bound: Duration,
    ) -> (Option<Duration>, Option<Duration>) {
        let mut state = lock(&self.state);
        let busy = state
            .busy_since
            .map(|since| now.saturating_duration_since(since));
        if let (Some(b), Some(since)) = (busy, state.busy_since) {
            if b > bound && state.silent_since.is_none() {
                state.silent_since = Some(since);
            }
        }
        let silent = state
            .silent_since
            .map(|since| now.saturating_duration_since(since));
        (busy, silent)
    }

    /// Hands the prober a job unless it is still on the last one.
    fn dispatch(&mut self, job: Job, now: Instant) -> bool {
        let mut state = lock(&self.state);
        if state.busy_since.is_some() {
            return false;
        }
        while self.done.try_recv().is_ok() {} // a late answer of an earlier round
        if self.jobs.try_send(job).is_err() {
            return false;
        }
        state.busy_since = Some(now);
        true
    }
}

/// Every node's prober, in the order of the nodes.
pub(crate) struct Probers(Vec<Prober>);

impl Probers {
    /// Starts a prober per node; `probes` are the connections `build()`
    /// opened (one slot per node, in the order of the nodes).
    pub(crate) fn start(
        cluster: &Arc<Nodes>,
        probes: Vec<Option<Connected>>,
    ) -> std::io::Result<Probers> {
        let mut probers = Vec::new();
        for (index, (node, slot)) in cluster.nodes().zip(probes).enumerate() {
            let (jobs, job_rx) = crossbeam_channel::bounded::<Job>(1);
            let (done_tx, done) = crossbeam_channel::bounded(1);
            let state = Arc::new(Mutex::new(ProbeState::default()));
            let context = ProberContext {
                cluster: Arc::downgrade(cluster),
                index,
                connector: Arc::clone(node.connector()),
                info: node.info.clone(),
                state: Arc::clone(&state),
            };
            thread::Builder::new()
                .name(format!("pgxkit-probe-{}", node.info.name()))
                .spawn(move || context.run(slot, &job_rx, &done_tx))?;
            probers.push(Prober {
                jobs,
                done,
                state,
                overdue_reported: false,
                aborted: false,
            });
        }
        Ok(Probers(probers))
    }

    /// One round: the node believed primary first, if one is (its WAL
    /// position is the replicas' yardstick; waited for at most
    /// [`overdue_after`]), then every other node whose prober is free. With `wait`, the replicas' answers are waited
    /// for too, as long again (`build()`, so the first report is current);
    /// with `connect` false only nodes that have a probe connection are
    /// probed. Nodes whose probe is overdue are marked down.
    pub(crate) fn round(&mut self, inner: &Nodes, period: Duration, wait: bool, connect: bool) {
        let bound = overdue_after(period);
        let started = Instant::now();
        let mut primary_lsn = None;
        let primary = inner.primary.load(std::sync::atomic::Ordering::Acquire);
        if let Some(prober) = self.0.get_mut(primary) {
            let job = Job {
                primary_lsn: None,
                connect,
            };
            if prober.dispatch(job, started) {
                primary_lsn = prober.done.recv_timeout(bound).ok().flatten();
            }
        }
        let mut sent = Vec::new();
        for (i, prober) in self.0.iter_mut().enumerate() {
            if i == primary {
                continue;
            }
            let job = Job {
                primary_lsn: primary_lsn.clone(),
                connect,
            };
            if prober.dispatch(job, Instant::now()) {
                sent.push(i);
            }
        }
        if wait {
            let until = Instant::now() + bound;
            for i in sent {
                let left = until.saturating_duration_since(Instant::now());
                let _ = self.0[i].done.recv_timeout(left);
            }
        }
        self.mark_overdue(inner, period);
    }

    /// Marks down, once per episode, each node whose probe has run longer
    /// than `bound`; ends every connection of a node silent for
    /// [`silence_limit`] (once per silence).
    pub(crate) fn mark_overdue(&mut self, inner: &Nodes, period: Duration) {
        let bound = overdue_after(period);
        let now = Instant::now();
        for (node, prober) in inner.nodes().zip(&mut self.0) {
            let (busy, silent) = prober.busy_and_silent(now, bound);
            match busy {
                Some(busy) if busy > bound => {
                    if !prober.overdue_reported {
                        prober.overdue_reported = true;
                        let why = format!("no answer to the health probe within {bound:?}");
                        apply(node, Err(why), None, None);
                        inner.decide();
                    }
                }
                Some(_) => {}
                None => prober.overdue_reported = false,
            }
            match silent {
                Some(silent) if silent >= silence_limit(period) => {
                    if !prober.aborted {
                        prober.aborted = true;
                        let ended = node.end_connections();
                        log::warn!(
                            "{} has not answered for {silent:?}; ended its {ended} open \
                             connections, so calls waiting on it fail",
                            node.info
                        );
                    }
                }
                Some(_) => {}
                None => prober.aborted = false,
            }
        }
    }
}

/// What a prober thread owns: nothing of the cluster but a `Weak`, so one
/// stuck on a silent node keeps no pool alive.
struct ProberContext {
    cluster: Weak<Nodes>,
    index: usize,
    connector: Arc<Connector>,
    info: NodeInfo,
    state: Arc<Mutex<ProbeState>>,
}

impl ProberContext {
    fn run(self, mut slot: Option<Connected>, jobs: &Receiver<Job>, done: &Sender<Option<String>>) {
        while let Ok(job) = jobs.recv() {
            let outcome = self.probe(&mut slot, &job);
            let answered = outcome.answered();
            let Some(inner) = self.cluster.upgrade() else {
                return;
            };
            let Some(node) = inner.nodes().nth(self.index) else {
                return;
            };
            let lsn = record(node, outcome);
            inner.decide();
            drop(inner);
            {
                let mut state = lock(&self.state);
                let started = state.busy_since.take();
                state.silent_since = match answered {
                    true => None,
                    false => state.silent_since.or(started),
                };
            }
            let _ = done.try_send(lsn);
        }
    }

    /// The probe's I/O, on the prober's own connection (opened if needed
    /// and allowed); a failure drops the connection.
    fn probe(&self, slot: &mut Option<Connected>, job: &Job) -> Outcome {
        let mut probe = match slot.take() {
            Some(probe) => probe,
            None if !job.connect => return Outcome::Skipped,
            None => match self.connector.connect_probe(PROBE_TIMEOUT) {
                Ok(probe) => probe,
                Err(e) => return Outcome::failed(&e),
            },
        };
        let sql = probe_sql(job.primary_lsn.as_deref());
        let messages = match probe.client.simple_query(&sql) {
            Ok(messages) => messages,
            Err(e) => {
                probe.discard();
                return Outcome::failed(&Error::from_postgres(e, &self.info));
            }
        };
        *slot = Some(probe);
        let Some(row) = messages.iter().find_map(|m| match m {
            postgres::SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        }) else {
            return Outcome::Failed {
                why: "the health probe returned no row".to_owned(),
                answered: true,
            };
        };
        let text = |i: usize| row.try_get(i).ok().flatten();
        let number = |i: usize| text(i).and_then(|t: &str| t.parse::<f64>().ok());
        Outcome::Probed {
            in_recovery: text(0).map(|t| t == "t"),
            lsn: text(1).map(str::to_owned),
            timeline: text(2).and_then(crate::lsn::timeline_of_walfile),
            bytes: job
                .primary_lsn
                .is_some()
                .then(|| number(3).map(|b| b.max(0.0) as u64)),
            seconds: number(4),
        }
    }
}

/// [`PROBE`] with the primary's position written in: a `pg_lsn` literal
/// re-printed from its parsed value (so nothing but `X/Y` is ever
/// inserted), else NULL.
fn probe_sql(primary_lsn: Option<&str>) -> String {
    let literal = primary_lsn.and_then(crate::lsn::parse).map_or_else(
        || "NULL".to_owned(),
        |p| format!("'{}'", crate::lsn::format(p)),
    );
    PROBE.replace("$1", &literal)
}

/// Records a probe's outcome on its node; the node's WAL position when it
/// is not in recovery (the yardstick of the replicas' lag).
fn record(node: &Node, outcome: Outcome) -> Option<String> {
    match outcome {
        Outcome::Skipped => None,
        Outcome::Failed { why, .. } => {
            apply(node, Err(why), None, None);
            None
        }
        Outcome::Probed {
            in_recovery,
            lsn,
            timeline,
            bytes,
            seconds,
        } => {
            node.set_replication(
                in_recovery,
                timeline,
                lsn.as_deref().and_then(crate::lsn::parse),
            );
            if in_recovery == Some(false) {
                apply(node, Ok(in_recovery), None, None);
                return lsn;
            }
            // Without the primary's position (its probe failed or was late)
            // the lag in bytes is what it was: "unknown" would make a
            // lagging replica eligible for reads again.
            let bytes = bytes.unwrap_or_else(|| node.lag().0);
            // Behind, but no commit replayed since the replica started (no
            // replay timestamp to date the lag by): the lag is at least as
            // long as the monitor has seen it so.
            let undated = seconds.is_none() && bytes.is_some_and(|b| b > 0);
            let undated_for = node.behind_undated(undated, Instant::now());
            let time = seconds
                .map(|s| Duration::from_secs_f64(s.max(0.0)))
                .or(undated_for);
            apply(node, Ok(in_recovery), bytes, time);
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
        node.gate.probe_succeeded();
    }
    node.record_up(up, error.as_deref());
    node.set_probe_record(ProbeRecord {
        checked_at: Some(SystemTime::now()),
        in_recovery,
        error,
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_primary_position_is_written_in_as_a_literal_or_null() {
        let sql = super::probe_sql(Some("0/16B3748"));
        assert!(
            sql.contains("'0/16B3748'::text::pg_lsn") && !sql.contains("$1"),
            "{sql}"
        );
        assert!(super::probe_sql(None).contains("NULL::text::pg_lsn"));
        // Anything but a position becomes NULL.
        assert!(super::probe_sql(Some("0/1'; DROP TABLE x; --")).contains("NULL::text"));
    }
}
