//! Writers and readers running against a `Cluster` while a test changes
//! the servers under it, and what they saw, for the failover tests.
#![allow(dead_code)] // each test file uses its own part of it

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use pgxkit::{Cluster, ErrorKind};

/// The table the writers insert into.
pub const TABLE: &str = "failover_log";

/// One call a load thread made.
#[derive(Debug, Clone)]
pub struct Call {
    /// When it returned.
    pub at: Instant,
    /// How long it took.
    pub took: Duration,
    /// The port of the server that answered it, when it succeeded.
    pub port: Option<i32>,
    /// Its error's kind and SQLSTATE, when it failed.
    pub error: Option<(ErrorKind, Option<String>)>,
    /// For a write: the row it inserted (writer, seq).
    pub row: Option<(i32, i32)>,
}

/// What one thread saw.
#[derive(Debug, Default)]
pub struct Thread {
    pub calls: Vec<Call>,
}

pub struct Load {
    stop: Arc<AtomicBool>,
    writers: Vec<JoinHandle<Thread>>,
    readers: Vec<JoinHandle<Thread>>,
}

/// Every loop stops by itself after this, whatever the test does.
const LONGEST: Duration = Duration::from_secs(180);
/// Between two calls of one thread.
const PAUSE: Duration = Duration::from_millis(2);

/// Creates the writers' table on the cluster's primary.
pub fn create_table(cluster: &Cluster) {
    cluster
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {TABLE} (writer int, seq int, PRIMARY KEY (writer, seq))"
        ))
        .unwrap();
}

impl Load {
    /// `writers` threads inserting rows (each acknowledged one recorded)
    /// and `readers` threads reading through `cluster.replica()`.
    pub fn start(cluster: &Cluster, writers: usize, readers: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let spawn = |write: bool, id: usize| {
            let cluster = cluster.clone();
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                let started = Instant::now();
                let mut seen = Thread::default();
                let mut seq = 0i32;
                let writer = id as i32;
                while !stop.load(Ordering::Relaxed) && started.elapsed() < LONGEST {
                    let call_started = Instant::now();
                    let result = if write {
                        seq += 1;
                        cluster.query_one(
                            &format!(
                                "INSERT INTO {TABLE} (writer, seq) VALUES ($1, $2) \
                                 RETURNING inet_server_port()"
                            ),
                            &[&writer, &seq],
                        )
                    } else {
                        cluster
                            .replica()
                            .query_one("SELECT inet_server_port()", &[])
                    };
                    let at = Instant::now();
                    let took = at - call_started;
                    seen.calls.push(match result {
                        Ok(row) => Call {
                            at,
                            took,
                            port: Some(row.get(0)),
                            error: None,
                            row: write.then_some((writer, seq)),
                        },
                        Err(e) => Call {
                            at,
                            took,
                            port: None,
                            error: Some((e.kind(), e.code().map(|c| c.code().to_owned()))),
                            row: None,
                        },
                    });
                    thread::sleep(PAUSE);
                }
                seen
            })
        };
        Load {
            writers: (0..writers).map(|i| spawn(true, i)).collect(),
            readers: (0..readers).map(|i| spawn(false, i)).collect(),
            stop,
        }
    }

    /// Stops every thread and returns what the writers and the readers saw.
    pub fn stop(self) -> (Vec<Thread>, Vec<Thread>) {
        self.stop.store(true, Ordering::Relaxed);
        let join = |hs: Vec<JoinHandle<Thread>>| -> Vec<Thread> {
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        };
        (join(self.writers), join(self.readers))
    }
}

/// The first successful call at or after `t` on any thread, and how long
/// after `t` it came.
pub fn first_success_after(threads: &[Thread], t: Instant) -> Option<Duration> {
    threads
        .iter()
        .flat_map(|th| &th.calls)
        .filter(|c| c.at >= t && c.error.is_none())
        .map(|c| c.at - t)
        .min()
}

/// The first successful call at or after `t` on `port`.
pub fn first_success_on_after(threads: &[Thread], port: u16, t: Instant) -> Option<Duration> {
    threads
        .iter()
        .flat_map(|th| &th.calls)
        .filter(|c| c.at >= t && c.port == Some(i32::from(port)))
        .map(|c| c.at - t)
        .min()
}

/// The longest time any one thread went between its last success and its
/// next (only streaks with a failure in them count).
pub fn longest_failing_stretch(threads: &[Thread]) -> Duration {
    let mut longest = Duration::ZERO;
    for th in threads {
        let mut last_ok: Option<Instant> = None;
        let mut failed = false;
        for c in &th.calls {
            match (&c.error, last_ok) {
                (Some(_), _) => failed = true,
                (None, Some(ok)) if failed => {
                    longest = longest.max(c.at - ok);
                    failed = false;
                    last_ok = Some(c.at);
                }
                (None, _) => {
                    failed = false;
                    last_ok = Some(c.at);
                }
            }
        }
    }
    longest
}

/// How many calls failed, by kind and SQLSTATE.
pub fn failures(threads: &[Thread]) -> Vec<((ErrorKind, Option<String>), usize)> {
    let mut out: Vec<((ErrorKind, Option<String>), usize)> = Vec::new();
    for e in threads
        .iter()
        .flat_map(|th| &th.calls)
        .filter_map(|c| c.error.clone())
    {
        match out.iter_mut().find(|(k, _)| *k == e) {
            Some((_, n)) => *n += 1,
            None => out.push((e, 1)),
        }
    }
    out
}

/// The longest call, and how many calls were made.
pub fn longest_call(threads: &[Thread]) -> (Duration, usize) {
    let calls = threads.iter().flat_map(|th| &th.calls);
    let n = calls.clone().count();
    (calls.map(|c| c.took).max().unwrap_or_default(), n)
}

/// Every row a writer had acknowledged.
pub fn acknowledged(writers: &[Thread]) -> Vec<(i32, i32)> {
    writers
        .iter()
        .flat_map(|th| &th.calls)
        .filter_map(|c| c.row)
        .collect()
}

/// Per writer, how many of its writes a server refused as read-only
/// (25006): each such write reached a node in recovery.
pub fn read_only_refusals(writers: &[Thread]) -> Vec<usize> {
    writers
        .iter()
        .map(|th| {
            th.calls
                .iter()
                .filter(|c| matches!(&c.error, Some((_, Some(code))) if code == "25006"))
                .count()
        })
        .collect()
}
