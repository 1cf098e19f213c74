//! Streaming rows (`query_iter`) against a real server: a million rows with
//! memory flat, an iterator dropped early gives its connection back clean,
//! an error half way ends it, deadlines and shutdown see it.

use std::time::{Duration, Instant};

use pgxkit::testkit::LocalCluster;
use pgxkit::{Cluster, ErrorKind};

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Our client backends that are in a transaction but idle.
fn idle_in_transaction(local: &LocalCluster) -> i64 {
    local
        .primary()
        .client()
        .unwrap()
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' \
             AND state LIKE 'idle in transaction%'",
            &[],
        )
        .unwrap()
        .get(0)
}

#[test]
fn a_million_rows_stream_with_flat_memory() {
    let local = LocalCluster::start(0).unwrap();
    let cluster = Cluster::connect(&local.primary_dsn()).unwrap();
    let before = peak_rss_kib();
    let started = Instant::now();
    let (mut n, mut sum) = (0u64, 0i64);
    for row in cluster
        .query_iter(
            "SELECT g::int8, repeat('x', 40) FROM generate_series(1, 1000000) g WHERE g > $1",
            &[&0i32],
        )
        .unwrap()
    {
        let row = row.unwrap();
        n += 1;
        sum += row.get::<_, i64>(0);
    }
    let took = started.elapsed();
    assert_eq!(n, 1_000_000);
    assert_eq!(sum, 500_000_500_000);
    // Held whole, a million rows of ~50 bytes (plus each Row's own
    // overhead) would be well over 100 MB.
    let grown_mib = peak_rss_kib().saturating_sub(before) / 1024;
    eprintln!("query_iter: 1,000,000 rows in {took:?}; peak RSS grew {grown_mib} MiB");
    assert!(grown_mib < 16, "peak RSS grew {grown_mib} MiB");
    assert_eq!(idle_in_transaction(&local), 0);
}

#[test]
fn an_iterator_dropped_early_returns_its_connection_clean() {
    let local = LocalCluster::start(0).unwrap();
    let cluster = Cluster::connect(&local.primary_dsn()).unwrap();
    let first: Vec<i32> = cluster
        .query_iter("SELECT g FROM generate_series(1, 100000) g", &[])
        .unwrap()
        .take(10)
        .map(|r| r.unwrap().get(0))
        .collect();
    assert_eq!(first, (1..=10).collect::<Vec<_>>());
    let stats = cluster.stats().primary().unwrap().pool.clone();
    assert_eq!(stats.in_use_conns, 0);
    assert_eq!(stats.closed_broken, 0, "the connection was kept");
    assert_eq!(idle_in_transaction(&local), 0, "and its transaction ended");
    // The same connection serves the next call, its cursor gone.
    let cursors: i64 = cluster
        .query_one(
            "SELECT count(*) FROM pg_cursors WHERE name = 'pgxkit_rows'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(cursors, 0);
    assert_eq!(cluster.stats().primary().unwrap().pool.total_conns, 1);
}

#[test]
fn an_error_half_way_ends_the_iteration_and_the_cluster_goes_on() {
    let local = LocalCluster::start(0).unwrap();
    let cluster = Cluster::connect(&local.primary_dsn()).unwrap();
    let mut ok = 0;
    let mut errors = Vec::new();
    for row in cluster
        .query_iter(
            "SELECT 1 / (g - 5000) FROM generate_series(1, 10000) g",
            &[],
        )
        .unwrap()
    {
        match row {
            Ok(_) => ok += 1,
            Err(e) => errors.push(e),
        }
    }
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].kind(), ErrorKind::Db);
    assert_eq!(
        errors[0].code(),
        Some(&pgxkit::postgres::error::SqlState::DIVISION_BY_ZERO)
    );
    assert!((4_000..5_000).contains(&ok), "{ok} rows before the error");
    assert_eq!(cluster.stats().primary().unwrap().pool.in_use_conns, 0);
    let _: i32 = cluster.query_one("SELECT 1", &[]).unwrap().get(0);
    assert_eq!(idle_in_transaction(&local), 0);
    // A query the server refuses fails at once.
    let err = cluster
        .query_iter("SELECT * FROM nowhere", &[])
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Db, "{err:?}");
}

#[test]
fn deadlines_and_shutdown_see_an_open_iterator() {
    let local = LocalCluster::start(0).unwrap();
    let cluster = Cluster::connect(&local.primary_dsn()).unwrap();
    // Each batch of 1,000 rows would take 10 s: the first ends at the deadline.
    let started = Instant::now();
    let err = cluster
        .with_timeout(Duration::from_millis(300))
        .query_iter("SELECT pg_sleep(0.01) FROM generate_series(1, 10000)", &[])
        .unwrap_err();
    let took = started.elapsed();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err:?}");
    assert!(took < Duration::from_millis(400), "{took:?}");

    // An iterator still open is in flight: shutdown waits for it.
    let rows = cluster
        .query_iter("SELECT g FROM generate_series(1, 10000) g", &[])
        .unwrap();
    let report = cluster.shutdown(Duration::from_millis(200));
    assert!(!report.drained, "{report:?}");
    assert_eq!(report.still_running, 1, "{report:?}");
    assert_eq!(
        rows.count(),
        10_000,
        "an open iterator still reads its rows"
    );
}
