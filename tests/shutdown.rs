//! Deadlines and graceful shutdown against real servers.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::wait_for;
use pgxkit::testkit::LocalCluster;
use pgxkit::{Cluster, ErrorKind};

fn active_sleeps(local: &LocalCluster, app: &str) -> i64 {
    local
        .primary()
        .client()
        .unwrap()
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 \
             AND state = 'active' AND query LIKE 'SELECT pg_sleep%'",
            &[&app],
        )
        .unwrap()
        .get(0)
}

fn connections(local: &LocalCluster, app: &str) -> i64 {
    local
        .primary()
        .client()
        .unwrap()
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
            &[&app],
        )
        .unwrap()
        .get(0)
}

#[test]
fn a_deadline_cancels_the_statement_on_the_server() {
    let local = LocalCluster::start(0).unwrap();
    let app = "deadline_test";
    let cluster = Cluster::builder()
        .primary(local.primary_dsn())
        .application_name(app)
        .build()
        .unwrap();
    let started = Instant::now();
    let err = cluster
        .with_timeout(Duration::from_millis(200))
        .query("SELECT pg_sleep(10)", &[])
        .unwrap_err();
    let took = started.elapsed();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err:?}");
    assert!(!err.is_retryable());
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_millis(800),
        "{took:?}"
    );
    // The cancel request is sent off the caller's thread; the call itself
    // may return first (20 ms after the deadline its socket is shut down),
    // so the server stops the statement a moment later.
    wait_for(
        "the server to stop the statement",
        Duration::from_secs(5),
        || active_sleeps(&local, app) == 0,
    );
    assert_eq!(
        cluster.stats().primary().unwrap().pool.closed_broken,
        1,
        "its connection was discarded"
    );
    // The handle without a deadline is unaffected, and the pool works.
    let v: i32 = cluster.query_one("SELECT 1", &[]).unwrap().get(0);
    assert_eq!(v, 1);
    // A fast statement under a deadline is fine and keeps its connection.
    cluster
        .with_timeout(Duration::from_secs(5))
        .execute("SELECT 1", &[])
        .unwrap();
    assert_eq!(cluster.stats().primary().unwrap().pool.closed_broken, 1);
}

#[test]
fn a_deadline_bounds_transactions_and_waiting_for_a_connection() {
    let local = LocalCluster::start(0).unwrap();
    let cluster = Cluster::builder()
        .primary(local.primary_dsn())
        .max_conns(1)
        .build()
        .unwrap();
    cluster.batch_execute("CREATE TABLE d (x int)").unwrap();
    let short = cluster.with_timeout(Duration::from_millis(200));
    let err = short
        .transaction(|tx| -> pgxkit::Result<_> {
            tx.execute("INSERT INTO d VALUES (1)", &[])?;
            tx.query("SELECT pg_sleep(5)", &[])
        })
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err:?}");
    let n: i64 = cluster
        .query_one("SELECT count(*) FROM d", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "rolled back");

    // The only connection is held: the deadline, not the 10 s checkout timeout, ends the wait.
    let err = cluster
        .with_client(|_held| -> pgxkit::Result<_> {
            let started = Instant::now();
            let err = short.execute("SELECT 1", &[]).unwrap_err();
            assert!(started.elapsed() < Duration::from_secs(1));
            Ok(err)
        })
        .unwrap();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err:?}");
}

#[test]
fn a_cluster_wide_statement_timeout_is_enforced_by_the_server() {
    let local = LocalCluster::start(0).unwrap();
    let cluster = Cluster::builder()
        .primary(local.primary_dsn())
        .statement_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let started = Instant::now();
    let err = cluster.query("SELECT pg_sleep(5)", &[]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    cluster.query("SELECT pg_sleep(0.01)", &[]).unwrap();
}

#[test]
fn shutdown_drains_running_queries_refuses_new_ones_and_closes_connections() {
    let local = LocalCluster::start(0).unwrap();
    let app = "shutdown_test";
    let hook_saw = Arc::new(AtomicUsize::new(usize::MAX));
    let seen = hook_saw.clone();
    let cluster = Cluster::builder()
        .primary(local.primary_dsn())
        .application_name(app)
        .max_conns(8)
        .on_shutdown(move |ev| seen.store(ev.in_flight(), Ordering::SeqCst))
        .build()
        .unwrap();
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let cluster = cluster.clone();
            std::thread::spawn(move || cluster.query("SELECT pg_sleep(0.3)", &[]).map(|_| ()))
        })
        .collect();
    wait_for("8 queries running", Duration::from_secs(10), || {
        active_sleeps(&local, app) == 8
    });

    let report = cluster.shutdown(Duration::from_secs(10));
    for w in workers {
        w.join().unwrap().expect("a running query was cut short");
    }
    assert!(report.drained, "{report:?}");
    assert_eq!(report.in_flight_at_start, 8);
    assert_eq!(report.still_running, 0);
    assert!(report.elapsed < Duration::from_secs(2), "{report:?}");
    assert_eq!(hook_saw.load(Ordering::SeqCst), 8);

    let started = Instant::now();
    let err = cluster.execute("SELECT 1", &[]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ShuttingDown);
    assert!(
        cluster.build_transaction().begin().is_err()
            && cluster.replica().query("SELECT 1", &[]).is_err()
    );
    assert!(
        started.elapsed() < Duration::from_millis(50),
        "new calls fail at once"
    );
    wait_for(
        "every connection of the cluster to end",
        Duration::from_secs(5),
        || connections(&local, app) == 0,
    );
    // A second shutdown is harmless.
    assert!(cluster.shutdown(Duration::from_secs(1)).drained);
}

#[test]
fn shutdown_returns_at_its_deadline_when_a_query_runs_longer() {
    let local = LocalCluster::start(0).unwrap();
    let app = "shutdown_deadline_test";
    let cluster = Cluster::builder()
        .primary(local.primary_dsn())
        .application_name(app)
        .build()
        .unwrap();
    let long = {
        let cluster = cluster.clone();
        std::thread::spawn(move || cluster.query("SELECT pg_sleep(2)", &[]).map(|_| ()))
    };
    wait_for("the long query", Duration::from_secs(10), || {
        active_sleeps(&local, app) == 1
    });
    let started = Instant::now();
    let report = cluster.shutdown(Duration::from_millis(300));
    let took = started.elapsed();
    assert!(!report.drained, "{report:?}");
    assert_eq!(report.still_running, 1);
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(900),
        "{took:?}"
    );
    long.join().unwrap().unwrap();
    wait_for(
        "its connection to close on return",
        Duration::from_secs(5),
        || connections(&local, app) == 0,
    );
}

#[test]
fn dropping_the_last_clone_releases_everything() {
    let local = LocalCluster::start(0).unwrap();
    let app = "drop_test";
    let cluster = Cluster::builder()
        .primary(local.primary_dsn())
        .application_name(app)
        .min_conns(3)
        .health_check_period(Duration::from_millis(50))
        .build()
        .unwrap();
    let other = cluster.clone();
    cluster.execute("SELECT 1", &[]).unwrap();
    wait_for("the pool to fill", Duration::from_secs(5), || {
        connections(&local, app) >= 3
    });
    drop(cluster);
    other.execute("SELECT 1", &[]).unwrap();
    drop(other);
    wait_for("every connection to end", Duration::from_secs(5), || {
        connections(&local, app) == 0
    });
    wait_for(
        "the health monitor's probe connection to end",
        Duration::from_secs(5),
        || connections(&local, "pgxkit-health") == 0,
    );
}

#[test]
fn shutdown_after_a_deadline_was_used_waits_for_nothing() {
    let local = LocalCluster::start(0).unwrap();
    let cluster = Cluster::connect(&local.primary_dsn()).unwrap();
    // A deadline that fires (the watchdog thread starts and cancels) and
    // one that does not.
    let err = cluster
        .with_timeout(Duration::from_millis(100))
        .execute("SELECT pg_sleep(5)", &[])
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout);
    cluster
        .with_timeout(Duration::from_secs(5))
        .execute("SELECT 1", &[])
        .unwrap();
    let started = Instant::now();
    let report = cluster.shutdown(Duration::from_secs(5));
    assert!(report.drained, "{report:?}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "shutdown took {:?}",
        started.elapsed()
    );
}
