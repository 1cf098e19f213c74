//! Node health against real servers: breakers, the health monitor, lag-aware
//! read routing and health reports, driven by the testkit's fault controls.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::{builder_for, read_port, read_port_from_new_thread, wait_for};
use pgxkit::testkit::LocalCluster;
use pgxkit::{BreakerState, ErrorKind, HealthStatus, ReadFallback};

const PERIOD: Duration = Duration::from_millis(100);

#[test]
fn a_killed_replica_under_load_is_excluded_and_readmitted() {
    let local = LocalCluster::start(2).unwrap();
    let cluster = builder_for(&local)
        .health_check_period(PERIOD)
        .max_conns(8)
        .build()
        .unwrap();
    let (victim, survivor) = (&local.replicas()[1], &local.replicas()[0]);
    let victim_port = i32::from(victim.port());

    let stop = Arc::new(AtomicBool::new(false));
    let last_on_victim = Arc::new(AtomicU64::new(0)); // micros since `origin`
    let origin = Instant::now();
    let readers: Vec<_> = (0..8)
        .map(|_| {
            let (cluster, stop, last) = (
                cluster.clone(),
                Arc::clone(&stop),
                Arc::clone(&last_on_victim),
            );
            thread::spawn(move || {
                let mut reads = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let port: i32 = cluster
                        .replica()
                        .query_one("SELECT inet_server_port()", &[])
                        .expect("a read failed while a replica died")
                        .get(0);
                    if port == victim_port {
                        last.fetch_max(origin.elapsed().as_micros() as u64, Ordering::Relaxed);
                    }
                    reads += 1;
                }
                reads
            })
        })
        .collect();

    wait_for("reads on the victim", Duration::from_secs(5), || {
        last_on_victim.load(Ordering::Relaxed) > 0
    });
    let killed_at = origin.elapsed();
    victim.kill().unwrap();
    wait_for(
        "the victim to be marked down",
        Duration::from_secs(10),
        || {
            let h = cluster.health();
            let node = h.node("replica2").unwrap();
            !node.up && !node.eligible_for_reads
        },
    );
    let health = cluster.health();
    assert_eq!(health.status, HealthStatus::Degraded);
    assert!(
        health
            .node("replica2")
            .unwrap()
            .warnings
            .iter()
            .any(|w| w.contains("down"))
    );
    let excluded_after =
        Duration::from_micros(last_on_victim.load(Ordering::Relaxed)).saturating_sub(killed_at);
    let mark = Duration::from_micros(last_on_victim.load(Ordering::Relaxed));

    let restarted_at = Instant::now();
    victim.start().unwrap();
    let start_took = restarted_at.elapsed();
    wait_for(
        "the victim to serve reads again",
        Duration::from_secs(10),
        || Duration::from_micros(last_on_victim.load(Ordering::Relaxed)) > mark,
    );
    let readmitted_after = restarted_at.elapsed().saturating_sub(start_took);
    stop.store(true, Ordering::Relaxed);
    let reads: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();

    let health = cluster.health();
    let victim_health = health.node("replica2").unwrap();
    assert!(victim_health.up, "{victim_health:?}");
    assert_eq!(victim_health.breaker, BreakerState::Closed);
    let port = read_port(&cluster);
    assert!(port == survivor.port() || port == victim.port());
    eprintln!(
        "{reads} reads, none failed; victim's last read {excluded_after:?} after SIGKILL; \
         back in rotation {readmitted_after:?} after it accepted connections (health period {PERIOD:?})"
    );
    assert!(
        readmitted_after < PERIOD * 10,
        "readmission took {readmitted_after:?}"
    );
}

#[test]
fn a_lagging_replica_gets_no_reads_until_it_catches_up() {
    let local = LocalCluster::start(2).unwrap();
    let cluster = builder_for(&local)
        .health_check_period(PERIOD)
        .max_replica_lag_bytes(1_000_000)
        .max_replica_lag(Duration::from_secs(60))
        .build()
        .unwrap();
    let (fresh, stale) = (&local.replicas()[0], &local.replicas()[1]);
    cluster
        .batch_execute("CREATE TABLE filler (pad text)")
        .unwrap();
    stale.pause_replay().unwrap();
    // About 8 MB of WAL the paused replica receives but does not apply.
    cluster
        .execute(
            "INSERT INTO filler SELECT repeat('x', 800) FROM generate_series(1, 10000)",
            &[],
        )
        .unwrap();
    // The fresh replica may lag past the limit for a moment while it
    // replays the 8 MB too; wait until it is back and the stale one is out.
    wait_for(
        "the stale replica alone to be excluded",
        Duration::from_secs(10),
        || {
            let h = cluster.health();
            !h.node("replica2").unwrap().eligible_for_reads
                && h.node("replica1").unwrap().eligible_for_reads
        },
    );
    // Until the fresh replica has replayed the 8 MB it may go over the limit
    // again, and reads would then fall back to the primary: wait for it to
    // be fully caught up before asserting where reads go.
    wait_for(
        "the fresh replica fully caught up",
        Duration::from_secs(10),
        || cluster.health().node("replica1").unwrap().lag_bytes == Some(0),
    );
    // The lagging replica gets none of them. (They go to the fresh one,
    // or, should a probe of the fresh one be overdue on a loaded machine
    // and mark it down for a moment, to the primary.)
    for _ in 0..50 {
        assert_ne!(read_port(&cluster), stale.port());
    }
    wait_for(
        "a read on the fresh replica",
        Duration::from_secs(10),
        || read_port(&cluster) == fresh.port(),
    );
    let health = cluster.health();
    let stale_health = health.node("replica2").unwrap();
    assert!(
        stale_health.up && stale_health.lag_bytes.unwrap() > 1_000_000,
        "{stale_health:?}"
    );
    assert!(
        stale_health
            .warnings
            .iter()
            .any(|w| w.contains("over the limit")),
        "{stale_health:?}"
    );
    assert_eq!(health.status, HealthStatus::Degraded);

    stale.resume_replay().unwrap();
    local
        .wait_for_replicas_caught_up(Duration::from_secs(30))
        .unwrap();
    wait_for(
        "the stale replica to get reads again",
        Duration::from_secs(10),
        || read_port_from_new_thread(&cluster) == stale.port(),
    );
    // The next probe after catch-up reports zero lag.
    wait_for(
        "a probe to see the caught-up replica",
        Duration::from_secs(10),
        || cluster.health().node("replica2").unwrap().lag == Some(Duration::ZERO),
    );
    let health = cluster.health();
    assert_eq!(
        health.status,
        HealthStatus::Healthy,
        "{:?}",
        health.warnings()
    );
}

#[test]
fn with_both_replicas_down_reads_fall_back_or_fail_as_configured() {
    let local = LocalCluster::start(2).unwrap();
    let to_primary = builder_for(&local)
        .health_check_period(PERIOD)
        .build()
        .unwrap();
    let strict = builder_for(&local)
        .health_check_period(PERIOD)
        .read_fallback(ReadFallback::Error)
        .build()
        .unwrap();
    for replica in local.replicas() {
        replica.stop().unwrap();
    }
    for cluster in [&to_primary, &strict] {
        wait_for("both replicas marked down", Duration::from_secs(10), || {
            cluster.stats().replicas().all(|n| !n.up)
        });
    }
    for _ in 0..10 {
        assert_eq!(read_port(&to_primary), local.primary().port());
    }
    let err = strict.replica().query("SELECT 1", &[]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NoEligibleReplica, "{err}");
    // Writes are unaffected.
    strict.execute("SELECT 1", &[]).unwrap();
}

#[test]
fn a_dead_primary_fails_fast_with_no_primary_and_writes_resume_when_it_is_back() {
    let local = LocalCluster::start(0).unwrap();
    let cluster = pgxkit::Cluster::builder()
        .primary(local.primary_dsn())
        .failure_threshold(3)
        .health_check_period(Duration::from_secs(3600)) // only failing writes ask for probes
        .build()
        .unwrap();
    cluster.execute("SELECT 1", &[]).unwrap();
    local.primary().kill().unwrap();

    // The first failure is the connection's; it asks the monitor to look,
    // which finds the node down: no primary is known.
    let err = cluster.execute("SELECT 1", &[]).unwrap_err();
    assert!(err.is_connection_error(), "{err:?}");
    wait_for("NoPrimary", Duration::from_secs(5), || {
        cluster
            .execute("SELECT 1", &[])
            .is_err_and(|e| e.kind() == ErrorKind::NoPrimary)
    });
    let err = cluster.execute("SELECT 1", &[]).unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert!(err.node().is_none());
    assert!(err.to_string().contains("primary down"), "{err}");

    let calls = 1_000;
    let started = Instant::now();
    for _ in 0..calls {
        assert_eq!(
            cluster.execute("SELECT 1", &[]).unwrap_err().kind(),
            ErrorKind::NoPrimary
        );
    }
    let per_call = started.elapsed() / calls;
    eprintln!("fail-fast without a primary: {per_call:?} per call");
    assert!(per_call < Duration::from_millis(1), "{per_call:?} per call");
    assert_eq!(cluster.health().status, HealthStatus::Unhealthy);
    assert!(cluster.health().primary().is_none());
    assert!(!cluster.is_ready());
    assert_eq!(
        cluster.health_check().unwrap_err().kind(),
        ErrorKind::NoPrimary
    );

    local.primary().start().unwrap();
    // Each failing write asks for a probe (at most one per 100 ms), which
    // finds the node primary again: writes resume without a health period.
    let back = Instant::now();
    wait_for("writes to succeed again", Duration::from_secs(5), || {
        cluster.execute("SELECT 1", &[]).is_ok()
    });
    eprintln!("writes resumed {:?} after the restart", back.elapsed());
    assert_eq!(
        cluster.stats().primary().unwrap().breaker,
        BreakerState::Closed
    );
    cluster.health_check().unwrap();
    assert!(cluster.is_ready());
}

#[test]
fn statement_errors_never_open_the_breaker() {
    let local = LocalCluster::start(0).unwrap();
    let cluster = pgxkit::Cluster::builder()
        .primary(local.primary_dsn())
        .failure_threshold(5)
        .build()
        .unwrap();
    cluster
        .batch_execute("CREATE TABLE once (id int PRIMARY KEY); INSERT INTO once VALUES (1)")
        .unwrap();
    for _ in 0..10_000 {
        let err = cluster
            .execute("INSERT INTO once VALUES (1)", &[])
            .unwrap_err();
        assert_eq!(
            err.code(),
            Some(&pgxkit::postgres::error::SqlState::UNIQUE_VIOLATION)
        );
    }
    assert_eq!(
        cluster
            .query_one("SELECT 1 WHERE false", &[])
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        cluster.stats().primary().unwrap().breaker,
        BreakerState::Closed
    );
    cluster.execute("INSERT INTO once VALUES (2)", &[]).unwrap();
}

#[test]
fn health_reports_a_healthy_cluster() {
    let local = LocalCluster::start(1).unwrap();
    let cluster = builder_for(&local)
        .health_check_period(PERIOD)
        .build()
        .unwrap();
    common::wait_for_first_probe(&cluster);
    cluster.health_check().unwrap();
    assert!(cluster.is_ready());
    let report = cluster.health();
    assert_eq!(
        report.status,
        HealthStatus::Healthy,
        "{:?}",
        report.warnings()
    );
    assert_eq!(report.primary().unwrap().in_recovery, Some(false));
    let replica = report.node("replica1").unwrap();
    assert_eq!(replica.in_recovery, Some(true));
    assert!(replica.eligible_for_reads);
    assert_eq!(replica.breaker, BreakerState::Closed);
    assert!(replica.lag_bytes.is_some() && replica.lag.is_some());
}

#[cfg(feature = "serde")]
#[test]
fn health_serialises_like_the_guide_handler() {
    let local = LocalCluster::start(1).unwrap();
    let cluster = builder_for(&local)
        .health_check_period(PERIOD)
        .build()
        .unwrap();
    common::wait_for_first_probe(&cluster);
    let json = serde_json::to_value(cluster.health()).unwrap();
    assert_eq!(json["status"], "healthy");
    assert!(json["timestamp"].as_str().unwrap().ends_with('Z'));
    assert_eq!(json["database"]["connected"], true);
    assert_eq!(json["database"]["pool_utilization"], "0.00%");
    assert!(json["database"]["max_connections"].as_u64().unwrap() >= 4);
    assert!(json.get("warnings").is_none());
    assert_eq!(json["nodes"][1]["name"], "replica1");
    assert_eq!(json["nodes"][1]["breaker"], "closed");

    local.primary().kill().unwrap();
    wait_for("the primary marked down", Duration::from_secs(10), || {
        !cluster.health().node("primary").unwrap().up
    });
    let json = serde_json::to_value(cluster.health()).unwrap();
    assert_eq!(json["status"], "unhealthy");
    assert!(
        json["error"].as_str().unwrap().contains("connect"),
        "{json}"
    );
    assert_eq!(json["database"]["connected"], false);
}

#[test]
fn the_first_health_report_is_current() {
    let local = LocalCluster::start(2).unwrap();
    // A period far longer than the test: whatever health() shows was
    // probed by build() itself.
    let cluster = builder_for(&local)
        .health_check_period(Duration::from_secs(3600))
        .build()
        .unwrap();
    let report = cluster.health();
    assert_eq!(
        report.status,
        HealthStatus::Healthy,
        "{:?}",
        report.warnings()
    );
    for node in &report.nodes {
        assert!(node.up, "{node:?}");
        assert!(node.last_check.is_some(), "not probed at build: {node:?}");
        let replica = node.node.role() == pgxkit::Role::Replica;
        assert_eq!(node.in_recovery, Some(replica), "{node:?}");
        if replica {
            assert!(node.lag_bytes.is_some() && node.lag.is_some(), "{node:?}");
            assert!(node.eligible_for_reads, "{node:?}");
        }
    }
}

#[test]
fn a_replica_with_a_wrong_password_is_reported_at_build() {
    let local = LocalCluster::builder()
        .replicas(1)
        .password_auth(true)
        .start()
        .unwrap();
    let password = local.password().unwrap();
    let wrong = local.replica_dsns()[0].replacen(password, "not-the-password", 1);
    let cluster = pgxkit::Cluster::builder()
        .primary(local.primary_dsn())
        .replica(wrong)
        .health_check_period(Duration::from_secs(3600))
        .build()
        .unwrap();
    let report = cluster.health();
    let replica = report.node("replica1").unwrap();
    assert!(!replica.up && !replica.eligible_for_reads, "{replica:?}");
    assert!(replica.last_check.is_some(), "{replica:?}");
    let why = replica.last_error.as_deref().unwrap_or("");
    assert!(why.contains("password authentication failed"), "{why}");
    assert!(!why.contains(password), "{why}");
    assert_eq!(report.status, HealthStatus::Degraded);
    assert!(report.primary().unwrap().up && report.primary().unwrap().last_check.is_some());
    // Reads go to the primary meanwhile.
    assert_eq!(read_port(&cluster), local.primary().port());
}

#[test]
fn a_pool_more_than_80_percent_in_use_is_a_health_warning() {
    let local = LocalCluster::start(0).unwrap();
    let cluster = pgxkit::Cluster::builder()
        .primary(local.primary_dsn())
        .max_conns(5)
        .health_check_period(Duration::from_secs(3600))
        .build()
        .unwrap();
    let warned = |report: &pgxkit::HealthReport| {
        report
            .warnings()
            .iter()
            .any(|w| w.contains("high connection pool utilization"))
    };
    // Hold `n` connections at once and look at the report meanwhile.
    let report_with = |n: usize| {
        let held = std::sync::Barrier::new(n + 1);
        let done = std::sync::Barrier::new(n + 1);
        thread::scope(|s| {
            for _ in 0..n {
                s.spawn(|| {
                    cluster
                        .with_client(|_c| -> pgxkit::Result<_> {
                            held.wait();
                            done.wait();
                            Ok(())
                        })
                        .unwrap()
                });
            }
            held.wait();
            let report = cluster.health();
            done.wait();
            report
        })
    };
    let four = report_with(4); // 80 %: not over
    assert!(!warned(&four), "{:?}", four.warnings());
    assert_eq!(four.primary().unwrap().in_use_conns, 4);
    let five = report_with(5); // 100 %
    assert!(warned(&five), "{:?}", five.warnings());
    assert_eq!(five.status, HealthStatus::Degraded);
    assert!(!warned(&cluster.health()), "cleared once released");
}

#[test]
fn the_lag_in_time_is_measured_and_limits_reads() {
    let local = LocalCluster::start(1).unwrap();
    let cluster = builder_for(&local)
        .health_check_period(PERIOD)
        .max_replica_lag(Duration::from_secs(2))
        .build()
        .unwrap();
    let replica = &local.replicas()[0];
    let lag = || cluster.health().node("replica1").unwrap().lag;
    wait_for("a replica in sync", Duration::from_secs(10), || {
        lag() == Some(Duration::ZERO)
    });
    replica.pause_replay().unwrap();
    let paused = Instant::now();
    cluster
        .batch_execute("CREATE TABLE tick (at timestamptz)")
        .unwrap();
    cluster
        .execute("INSERT INTO tick VALUES (now())", &[])
        .unwrap();
    // The lag in time grows with the wall clock while replay is paused
    // (now() minus the last replayed commit), and past the limit the replica
    // gets no reads.
    wait_for(
        "the lag past the 2 s limit",
        Duration::from_secs(15),
        || lag().is_some_and(|l| l > Duration::from_secs(2)),
    );
    let measured = lag().unwrap();
    assert!(
        measured <= paused.elapsed() + Duration::from_secs(1),
        "lag {measured:?} after {:?} paused",
        paused.elapsed()
    );
    let health = cluster.health();
    let node = health.node("replica1").unwrap();
    assert!(!node.eligible_for_reads, "{node:?}");
    assert!(
        node.lag_bytes.is_some_and(|b| b > 0),
        "bytes behind too: {node:?}"
    );
    assert_eq!(read_port(&cluster), local.primary().port());
    replica.resume_replay().unwrap();
    wait_for(
        "the replica back in rotation",
        Duration::from_secs(15),
        || {
            cluster
                .health()
                .node("replica1")
                .unwrap()
                .eligible_for_reads
        },
    );
    assert_eq!(lag(), Some(Duration::ZERO));
    // Again, now that the replica has replayed a commit: the lag is dated
    // by that commit's timestamp (the first pause had none to date it by).
    replica.pause_replay().unwrap();
    cluster
        .execute("INSERT INTO tick VALUES (now())", &[])
        .unwrap();
    wait_for(
        "the lag past the limit again",
        Duration::from_secs(15),
        || lag().is_some_and(|l| l > Duration::from_secs(2)),
    );
    assert!(
        !cluster
            .health()
            .node("replica1")
            .unwrap()
            .eligible_for_reads
    );
    replica.resume_replay().unwrap();
    wait_for("the replica back again", Duration::from_secs(15), || {
        lag() == Some(Duration::ZERO)
    });
}
