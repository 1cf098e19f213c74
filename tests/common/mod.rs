//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use pgxkit::testkit::LocalCluster;
use pgxkit::{Cluster, ClusterBuilder};

/// A builder for `local`: its primary and every replica.
pub fn builder_for(local: &LocalCluster) -> ClusterBuilder {
    local
        .replica_dsns()
        .into_iter()
        .fold(Cluster::builder().primary(local.primary_dsn()), |b, dsn| {
            b.replica(dsn)
        })
}

/// The port of the server that ran a read.
pub fn read_port(cluster: &Cluster) -> u16 {
    let port: i32 = cluster
        .replica()
        .query_one("SELECT inet_server_port()", &[])
        .unwrap()
        .get(0);
    port as u16
}

/// [`read_port`] from a new thread: under the default
/// [`ReadBalance::PerThread`](pgxkit::ReadBalance::PerThread) each new thread
/// takes the next replica in turn, so successive calls alternate.
pub fn read_port_from_new_thread(cluster: &Cluster) -> u16 {
    std::thread::scope(|s| s.spawn(|| read_port(cluster)).join().unwrap())
}

/// Polls `condition` until it holds or `timeout` passes; panics with `what` then.
pub fn wait_for(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

static ALL: std::sync::OnceLock<std::sync::Mutex<Vec<String>>> = std::sync::OnceLock::new();

/// Every log line of every crate (the driver's included), once `logs()` was called.
pub fn all_logs() -> Vec<String> {
    ALL.get()
        .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()).clone())
        .unwrap_or_default()
}

/// Every log record of this test binary, captured by a logger installed on
/// first use: (level, message). Records of other crates (the driver logs
/// statements at debug level) are kept apart, see [`all_logs`].
pub fn logs() -> &'static std::sync::Mutex<Vec<(log::Level, String)>> {
    use std::sync::{Mutex, OnceLock};
    static LOGS: OnceLock<Mutex<Vec<(log::Level, String)>>> = OnceLock::new();
    ALL.get_or_init(|| Mutex::new(Vec::new()));
    struct Capture;
    impl log::Log for Capture {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }
        fn log(&self, record: &log::Record<'_>) {
            let line = record.args().to_string();
            let ours = record.target().starts_with("pgxkit");
            if let Some(logs) = LOGS.get() {
                if ours {
                    logs.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((record.level(), line.clone()));
                }
            }
            if let Some(all) = ALL.get() {
                all.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        }
        fn flush(&self) {}
    }
    let logs = LOGS.get_or_init(|| Mutex::new(Vec::new()));
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        static CAPTURE: Capture = Capture;
        let _ = log::set_logger(&CAPTURE);
        log::set_max_level(log::LevelFilter::Trace);
    });
    logs
}

/// The captured log lines containing `needle`.
pub fn log_lines(needle: &str) -> Vec<(log::Level, String)> {
    logs()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|(_, line)| line.contains(needle))
        .cloned()
        .collect()
}

/// Terminates, from outside, the server backend behind the primary
/// connection the cluster's next primary operation would use; returns its pid.
pub fn terminate_pooled_backend(cluster: &Cluster, local: &LocalCluster) -> i32 {
    let pid: i32 = cluster
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap()
        .get(0);
    let mut admin = local.primary().client().unwrap();
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .unwrap();
    pid
}

/// Waits until the health monitor has probed every node once.
pub fn wait_for_first_probe(cluster: &Cluster) {
    wait_for(
        "a first probe of every node",
        Duration::from_secs(10),
        || {
            cluster
                .health()
                .nodes
                .iter()
                .all(|n| n.last_check.is_some())
        },
    );
}
