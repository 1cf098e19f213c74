//! Hooks and observability against real servers: veto, order, after-hook
//! error semantics, connection hooks, contained panics, slow-query log, plan
//! capture, leak detection, utilisation warnings, node events.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{builder_for, log_lines, logs, wait_for};
use pgxkit::hooks::{DisconnectReason, slow_query_log};
use pgxkit::testkit::LocalCluster;
use pgxkit::{BreakerState, Cluster, ErrorKind, OperationKind, PlanCapture, Role};

fn single(local: &LocalCluster) -> pgxkit::ClusterBuilder {
    Cluster::builder().primary(local.primary_dsn())
}

#[test]
fn a_before_hook_vetoes_and_the_server_never_sees_it() {
    let local = LocalCluster::start(0).unwrap();
    let cluster = single(&local)
        .before_operation(|op| {
            if op.sql().contains("DELETE") {
                return Err("DELETE is not allowed here".into());
            }
            Ok(())
        })
        .build()
        .unwrap();
    cluster
        .batch_execute("CREATE TABLE keep (x int); INSERT INTO keep VALUES (1)")
        .unwrap();
    let err = cluster.execute("DELETE FROM keep", &[]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Hook);
    assert_eq!(err.node().unwrap().role(), Role::Primary);
    assert!(
        std::error::Error::source(&err)
            .unwrap()
            .to_string()
            .contains("DELETE is not allowed")
    );
    let n: i64 = cluster
        .query_one("SELECT count(*) FROM keep", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    // Vetoed before checkout: only the allowed operations took a connection.
    assert_eq!(cluster.stats().primary().unwrap().pool.acquire_count, 2);
}

#[test]
fn hooks_run_in_order_and_see_the_operation() {
    let local = LocalCluster::start(1).unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (o1, o2, o3, s) = (order.clone(), order.clone(), order.clone(), seen.clone());
    let cluster = builder_for(&local)
        .before_operation(move |_| {
            o1.lock().unwrap().push("before 1");
            Ok(())
        })
        .before_operation(move |_| {
            o2.lock().unwrap().push("before 2");
            Ok(())
        })
        .after_operation(move |op| {
            o3.lock().unwrap().push("after");
            s.lock().unwrap().push((
                op.kind(),
                op.role(),
                op.node().name().to_owned(),
                op.rows(),
                op.param_count(),
                op.params(),
                op.duration(),
                op.error().map(|e| e.kind()),
                op.route(),
            ));
            Ok(())
        })
        .build()
        .unwrap();
    cluster.batch_execute("CREATE TABLE t (x int)").unwrap();
    cluster
        .execute("INSERT INTO t SELECT generate_series(1, $1)", &[&3i32])
        .unwrap();
    cluster
        .replica()
        .query("SELECT 1 UNION ALL SELECT 2", &[])
        .unwrap();
    cluster.execute("SELEC broken", &[]).unwrap_err();
    assert_eq!(
        *order.lock().unwrap(),
        ["before 1", "before 2", "after"].repeat(4),
        "each operation runs both before-hooks in order, then the after-hook"
    );
    let seen = seen.lock().unwrap();
    assert_eq!(seen[0].0, OperationKind::BatchExecute);
    let insert = &seen[1];
    assert_eq!(
        (insert.0, insert.1, insert.3, insert.4),
        (OperationKind::Execute, Role::Primary, Some(3), 1)
    );
    assert_eq!(
        insert.5, None,
        "parameters are hidden unless log_parameters(true)"
    );
    assert!(insert.6 > Duration::ZERO);
    let read = &seen[2];
    assert_eq!(
        (read.0, read.1, read.2.as_str(), read.3),
        (OperationKind::Query, Role::Replica, "replica1", Some(2))
    );
    assert_eq!(
        (insert.8, read.8),
        (Role::Primary, Role::Replica),
        "each call is reported with its route"
    );
    assert_eq!(seen[3].7, Some(ErrorKind::Db));
}

#[test]
fn parameters_are_shown_only_when_allowed() {
    let local = LocalCluster::start(0).unwrap();
    let seen = Arc::new(Mutex::new(None));
    let s = seen.clone();
    let cluster = single(&local)
        .log_parameters(true)
        .before_operation(move |op| {
            *s.lock().unwrap() = op.params();
            Ok(())
        })
        .build()
        .unwrap();
    cluster
        .query("SELECT $1::int, $2::text", &[&7i32, &"seven"])
        .unwrap();
    assert_eq!(seen.lock().unwrap().clone().unwrap(), ["7", "\"seven\""]);
}

#[test]
fn an_after_hook_error_is_returned_only_when_the_operation_succeeded() {
    let local = LocalCluster::start(0).unwrap();
    let cluster = single(&local)
        .after_operation(|op| {
            if op.sql().contains("-- notify") {
                Err("audit sink down".into())
            } else {
                Ok(())
            }
        })
        .build()
        .unwrap();
    cluster
        .batch_execute("CREATE TABLE audited (x int)")
        .unwrap();
    let err = cluster
        .execute("INSERT INTO audited VALUES (1) -- notify", &[])
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Hook);
    // The statement itself ran: after-hooks report, they do not undo.
    let n: i64 = cluster
        .query_one("SELECT count(*) FROM audited", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    let err = cluster
        .execute("INSERT INTO missing VALUES (1) -- notify", &[])
        .unwrap_err();
    assert_eq!(
        err.kind(),
        ErrorKind::Db,
        "the operation's own error wins: {err}"
    );
}

#[test]
fn connection_hooks_see_connect_acquire_release_and_disconnect() {
    let local = LocalCluster::start(0).unwrap();
    let (connects, acquires, releases) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let disconnects = Arc::new(Mutex::new(Vec::new()));
    let (c, a, r, d) = (
        connects.clone(),
        acquires.clone(),
        releases.clone(),
        disconnects.clone(),
    );
    let cluster = single(&local)
        .max_conns(1)
        .validate_after_idle(Duration::from_secs(3600))
        .on_connect(move |client, node| {
            c.fetch_add(1, Ordering::SeqCst);
            assert_eq!(node.name(), "primary");
            client.batch_execute("SET work_mem = '7MB'")?;
            Ok(())
        })
        .on_acquire(move |_| {
            a.fetch_add(1, Ordering::SeqCst);
        })
        .on_release(move |ev| {
            assert!(ev.duration() > Duration::ZERO);
            r.fetch_add(1, Ordering::SeqCst);
        })
        .on_disconnect(move |ev| d.lock().unwrap().push(ev.reason()))
        .build()
        .unwrap();
    for _ in 0..5 {
        let mem: String = cluster.query_one("SHOW work_mem", &[]).unwrap().get(0);
        assert_eq!(
            mem, "7MB",
            "the on_connect SET applies to pooled connections"
        );
    }
    assert_eq!(connects.load(Ordering::SeqCst), 1);
    assert_eq!(acquires.load(Ordering::SeqCst), 5);
    assert_eq!(releases.load(Ordering::SeqCst), 5);
    // A connection killed under us is discarded: on_disconnect says Broken.
    common::terminate_pooled_backend(&cluster, &local);
    cluster.execute("SELECT 1", &[]).unwrap_err();
    assert_eq!(
        *disconnects.lock().unwrap(),
        [Some(DisconnectReason::Broken)]
    );
    cluster.execute("SELECT 1", &[]).unwrap();
    assert_eq!(connects.load(Ordering::SeqCst), 2);
}

#[test]
fn an_on_connect_error_rejects_the_connection() {
    let local = LocalCluster::start(0).unwrap();
    let cluster = single(&local)
        .lazy_connect(true)
        .checkout_timeout(Duration::from_secs(2))
        .on_connect(|_, _| Err("tenant settings unavailable".into()))
        .build()
        .unwrap();
    let err = cluster.execute("SELECT 1", &[]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connect, "{err:?}");
    assert!(
        format!("{err:?}").contains("tenant settings unavailable"),
        "{err:?}"
    );
    assert_eq!(cluster.stats().primary().unwrap().pool.total_conns, 0);
}

#[test]
fn a_panicking_hook_is_contained() {
    logs();
    let releases = Arc::new(AtomicUsize::new(0));
    let r = releases.clone();
    let local = LocalCluster::start(0).unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let (c1, c2) = (calls.clone(), calls.clone());
    let cluster = single(&local)
        .max_conns(2)
        .before_operation(move |_| {
            if c1.fetch_add(1, Ordering::SeqCst) == 0 {
                panic!("first call blows up");
            }
            Ok(())
        })
        .after_operation(move |_| {
            if c2.load(Ordering::SeqCst) == 2 {
                panic!("after-hook blows up once");
            }
            Ok(())
        })
        .on_release(move |_| {
            // Panics on the first three releases (fewer backtraces in CI logs).
            if r.fetch_add(1, Ordering::SeqCst) < 3 {
                panic!("on_release panics");
            }
        })
        .build()
        .unwrap();
    let err = cluster.execute("SELECT 1", &[]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Hook);
    assert!(err.to_string().contains("panicked"), "{err}");
    let err = cluster.execute("SELECT 1", &[]).unwrap_err();
    assert_eq!(
        err.kind(),
        ErrorKind::Hook,
        "the after-hook's panic on a successful operation"
    );
    for i in 0..1_000 {
        let v: i32 = cluster.query_one("SELECT $1::int", &[&i]).unwrap().get(0);
        assert_eq!(v, i);
    }
    let pool = cluster.stats().primary().unwrap().pool.clone();
    assert_eq!(pool.in_use_conns, 0, "no connection leaked");
    assert!(pool.total_conns <= 2);
    assert!(!log_lines("on_release hook panicked").is_empty());
}

#[test]
fn slow_and_failed_operations_are_logged_with_their_fields() {
    logs();
    let local = LocalCluster::start(0).unwrap();
    let cluster = single(&local)
        .after_operation(slow_query_log(Duration::from_millis(100)))
        .build()
        .unwrap();
    cluster
        .query("SELECT pg_sleep(0.2) /* slowlog-marker */", &[])
        .unwrap();
    cluster.query("SELECT 1 /* fastlog-marker */", &[]).unwrap();
    cluster
        .query("SELECT nonsense /* faillog-marker */", &[])
        .unwrap_err();
    let slow = log_lines("slowlog-marker");
    assert_eq!(slow.len(), 1, "{slow:?}");
    assert_eq!(slow[0].0, log::Level::Warn);
    assert!(
        slow[0].1.contains("slow query on primary")
            && slow[0].1.contains(&local.primary().port().to_string()),
        "{slow:?}"
    );
    assert!(log_lines("fastlog-marker").is_empty());
    let failed = log_lines("faillog-marker");
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].0, log::Level::Error);
    assert!(failed[0].1.contains("query failed"), "{failed:?}");
}

#[test]
fn plans_of_slow_statements_are_captured_without_running_writes_twice() {
    let local = LocalCluster::start(1).unwrap();
    let (tx, rx) = crossbeam_channel::unbounded();
    let cluster = builder_for(&local)
        .capture_slow_plans(
            PlanCapture::new(Duration::from_millis(100))
                .analyze_reads(true)
                .on_plan(move |plan| tx.send(plan.clone()).unwrap()),
        )
        .build()
        .unwrap();
    cluster
        .batch_execute("CREATE TABLE slow_writes (x int)")
        .unwrap();
    local
        .wait_for_replicas_caught_up(Duration::from_secs(10))
        .unwrap();

    cluster
        .replica()
        .query("SELECT pg_sleep($1) FROM generate_series(1, 2)", &[&0.1f64])
        .unwrap();
    let plan = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("a plan for the slow read");
    assert_eq!(
        (plan.kind(), plan.route()),
        (OperationKind::Query, Role::Replica)
    );
    assert_eq!(plan.node().name(), "replica1");
    assert!(plan.analyzed());
    let json: serde_json::Value = serde_json::from_str(plan.json()).unwrap();
    assert!(
        json[0]["Plan"]["Actual Total Time"].as_f64().is_some(),
        "{json}"
    );

    cluster
        .execute(
            "INSERT INTO slow_writes SELECT 1 FROM pg_sleep($1)",
            &[&0.2f64],
        )
        .unwrap();
    let plan = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("a plan for the slow write");
    assert_eq!(plan.kind(), OperationKind::Execute);
    assert!(!plan.analyzed(), "a write is never analyzed");
    let json: serde_json::Value = serde_json::from_str(plan.json()).unwrap();
    assert_eq!(json[0]["Plan"]["Node Type"], "ModifyTable", "{json}");
    let rows: i64 = cluster
        .query_one("SELECT count(*) FROM slow_writes", &[])
        .unwrap()
        .get(0);
    assert_eq!(rows, 1, "the slow INSERT ran exactly once");
    // A fast statement produces no plan.
    cluster.query("SELECT 1", &[]).unwrap();
    assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
}

#[test]
fn leak_detection_reports_a_held_connection_once_and_not_a_returned_one() {
    logs();
    let local = LocalCluster::start(0).unwrap();
    let port = local.primary().port().to_string();
    let cluster = single(&local)
        // Long enough that none of the quick calls below is held that
        // long on a loaded machine (at 100 ms, soak run 4 saw one reported
        // while a 300 s chaos run shared the two cores).
        .leak_detection_threshold(Duration::from_secs(1))
        .leak_detection_backtrace(true)
        .build()
        .unwrap();
    for _ in 0..50 {
        cluster.execute("SELECT 1", &[]).unwrap();
    }
    let leaks = || {
        log_lines("possible connection leak")
            .into_iter()
            .filter(|(_, l)| l.contains(&port))
            .collect::<Vec<_>>()
    };
    assert!(leaks().is_empty());
    cluster
        .with_client(|_held| -> pgxkit::Result<_> {
            wait_for("the leak report", Duration::from_secs(10), || {
                !leaks().is_empty()
            });
            Ok(())
        })
        .unwrap();
    let found = leaks();
    assert_eq!(found.len(), 1, "reported once: {found:?}");
    assert_eq!(found[0].0, log::Level::Warn);
    assert!(
        found[0].1.contains("checked out at"),
        "with a backtrace: {}",
        found[0].1
    );
}

/// Checks out both connections of a 2-connection pool (nested) and expects
/// the "100% in use" warning for the node on `port` exactly once.
fn assert_full_once_when_both_are_checked_out(cluster: &Cluster, port: &str) {
    let inner = cluster.clone();
    cluster
        .with_client(move |_| {
            Ok::<_, pgxkit::Error>(inner.with_client(|_| Ok::<_, pgxkit::Error>(())))
        })
        .unwrap()
        .unwrap();
    let lines: Vec<_> = log_lines("100% in use")
        .into_iter()
        .filter(|(_, l)| l.contains(port))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
}

#[test]
fn a_pool_past_90_percent_is_logged() {
    logs();
    let local = LocalCluster::start(0).unwrap();
    let port = local.primary().port().to_string();
    let cluster = single(&local).max_conns(2).build().unwrap();
    assert_full_once_when_both_are_checked_out(&cluster, &port);
}

#[test]
fn a_pool_past_90_percent_is_logged_when_it_served_idle_connections() {
    // A checkout that finds nothing parked but an idle connection in r2d2
    // looks at utilisation too, not only every 16th checkout of a thread.
    logs();
    let local = LocalCluster::start(0).unwrap();
    let port = local.primary().port().to_string();
    let cluster = single(&local).max_conns(2).min_conns(2).build().unwrap();
    wait_for("two idle connections", Duration::from_secs(10), || {
        cluster.stats().primary().unwrap().pool.idle_conns == 2
    });
    assert_full_once_when_both_are_checked_out(&cluster, &port);
}

#[test]
fn node_events_reach_their_hooks() {
    let local = LocalCluster::start(1).unwrap();
    let events = Arc::new(Mutex::new(Vec::new()));
    let (e1, e2) = (events.clone(), events.clone());
    let cluster = builder_for(&local)
        .health_check_period(Duration::from_millis(100))
        .failure_threshold(1)
        .read_fallback(pgxkit::ReadFallback::Primary)
        .on_breaker_state_change(move |ev| {
            e1.lock().unwrap().push(format!(
                "{} breaker {:?}",
                ev.node().name(),
                ev.breaker_change().unwrap()
            ))
        })
        .on_node_health_change(move |ev| {
            e2.lock()
                .unwrap()
                .push(format!("{} up {}", ev.node().name(), ev.up().unwrap()))
        })
        .build()
        .unwrap();
    cluster.replica().query("SELECT 1", &[]).unwrap();
    local.replicas()[0].kill().unwrap();
    // The read fails on the replica (opening its breaker) and is retried on the primary.
    cluster.replica().query("SELECT 1", &[]).unwrap();
    wait_for("the down event", Duration::from_secs(10), || {
        events
            .lock()
            .unwrap()
            .iter()
            .any(|e| e == "replica1 up false")
    });
    local.replicas()[0].start().unwrap();
    wait_for("the up event", Duration::from_secs(10), || {
        events
            .lock()
            .unwrap()
            .iter()
            .any(|e| e == "replica1 up true")
    });
    let events = events.lock().unwrap();
    let opened = format!(
        "replica1 breaker {:?}",
        (BreakerState::Closed, BreakerState::Open)
    );
    let closed = format!(
        "replica1 breaker {:?}",
        (BreakerState::Open, BreakerState::Closed)
    );
    assert!(
        events.contains(&opened) && events.contains(&closed),
        "{events:?}"
    );
}

#[test]
fn transaction_hooks_see_commit_rollback_and_can_veto() {
    use pgxkit::hooks::TransactionOutcome;
    let local = LocalCluster::start(0).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let begun = Arc::new(AtomicUsize::new(0));
    let (s, b) = (seen.clone(), begun.clone());
    let cluster = single(&local)
        .before_transaction(move |ev| {
            b.fetch_add(1, Ordering::SeqCst);
            assert!(ev.outcome().is_none());
            if ev.read_only() {
                return Err("no read-only transactions today".into());
            }
            Ok(())
        })
        .after_transaction(move |ev| {
            s.lock().unwrap().push((
                ev.outcome(),
                ev.error().map(|e| e.kind()),
                ev.duration() > Duration::ZERO,
            ));
            Ok(())
        })
        .build()
        .unwrap();
    cluster
        .batch_execute("CREATE TABLE h (x int PRIMARY KEY)")
        .unwrap();
    cluster
        .transaction(|tx| tx.execute("INSERT INTO h VALUES (1)", &[]))
        .unwrap();
    cluster
        .transaction(|tx| tx.query_one("SELECT 1 WHERE false", &[]))
        .unwrap_err();
    drop(cluster.build_transaction().begin().unwrap());
    let err = cluster
        .build_transaction()
        .read_only(true)
        .run(|_| Ok::<_, pgxkit::Error>(()))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Hook);
    assert_eq!(begun.load(Ordering::SeqCst), 4);
    assert_eq!(
        *seen.lock().unwrap(),
        [
            (Some(TransactionOutcome::Commit), None, true),
            (Some(TransactionOutcome::Rollback), None, true),
            (Some(TransactionOutcome::Rollback), None, true),
        ],
        "the vetoed transaction never began"
    );
}
