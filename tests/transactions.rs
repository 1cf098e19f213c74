//! Transactions and retries against real servers.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

use common::builder_for;
use pgxkit::postgres::error::SqlState;
use pgxkit::testkit::LocalCluster;
use pgxkit::{Cluster, ErrorKind, IsolationLevel, RetryPolicy, Writes};

fn count(cluster: &Cluster, table: &str) -> i64 {
    cluster
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .unwrap()
        .get(0)
}

fn setup() -> (LocalCluster, Cluster) {
    let local = LocalCluster::start(0).unwrap();
    let cluster = Cluster::builder()
        .primary(local.primary_dsn())
        .build()
        .unwrap();
    cluster
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .unwrap();
    (local, cluster)
}

#[test]
fn commit_rollback_on_error_and_dropped_guard() {
    let (_local, cluster) = setup();
    let n = cluster
        .transaction(|tx| -> pgxkit::Result<_> {
            tx.execute("INSERT INTO t VALUES (1, 'a')", &[])?;
            tx.execute("INSERT INTO t VALUES (2, 'b')", &[])?;
            Ok(tx
                .query_one("SELECT count(*) FROM t", &[])?
                .get::<_, i64>(0))
        })
        .unwrap();
    assert_eq!(n, 2);
    assert_eq!(count(&cluster, "t"), 2);

    let err = cluster
        .transaction(|tx| -> pgxkit::Result<_> {
            tx.execute("INSERT INTO t VALUES (3, 'c')", &[])?;
            tx.query_one("SELECT 1 WHERE false", &[])?; // NotFound
            Ok(())
        })
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert_eq!(count(&cluster, "t"), 2, "rolled back on Err");

    let tx = cluster.build_transaction().begin().unwrap();
    tx.execute("INSERT INTO t VALUES (4, 'd')", &[]).unwrap();
    drop(tx);
    assert_eq!(
        count(&cluster, "t"),
        2,
        "rolled back when the guard was dropped"
    );

    let tx = cluster.build_transaction().begin().unwrap();
    tx.execute("INSERT INTO t VALUES (5, 'e')", &[]).unwrap();
    tx.rollback().unwrap();
    let tx = cluster.build_transaction().begin().unwrap();
    tx.execute("INSERT INTO t VALUES (6, 'f')", &[]).unwrap();
    tx.commit().unwrap();
    assert_eq!(count(&cluster, "t"), 3);
    assert_eq!(cluster.stats().primary().unwrap().pool.in_use_conns, 0);
}

#[test]
fn a_panic_rolls_back_and_continues() {
    let (_local, cluster) = setup();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        cluster.transaction(|tx| -> pgxkit::Result<()> {
            tx.execute("INSERT INTO t VALUES (1, 'x')", &[])?;
            panic!("boom inside the transaction");
        })
    }));
    assert!(outcome.is_err(), "the panic continued");
    assert_eq!(count(&cluster, "t"), 0, "rolled back");
    let stats = cluster.stats().primary().unwrap().pool.clone();
    assert_eq!(stats.in_use_conns, 0);
    assert_eq!(
        stats.closed_broken, 1,
        "the connection that saw the panic was discarded"
    );
    cluster
        .execute("INSERT INTO t VALUES (1, 'y')", &[])
        .unwrap();
}

#[test]
fn a_statement_error_aborts_and_commit_reports_it() {
    let (_local, cluster) = setup();
    cluster
        .execute("INSERT INTO t VALUES (1, 'a')", &[])
        .unwrap();
    let tx = cluster.build_transaction().begin().unwrap();
    tx.execute("INSERT INTO t VALUES (2, 'b')", &[]).unwrap();
    let dup = tx
        .execute("INSERT INTO t VALUES (1, 'dup')", &[])
        .unwrap_err();
    assert_eq!(dup.code(), Some(&SqlState::UNIQUE_VIOLATION));
    let err = tx.commit().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Db);
    assert!(err.to_string().contains("aborted"), "{err}");
    assert_eq!(count(&cluster, "t"), 1);
}

#[test]
fn savepoints_undo_only_their_part() {
    let (_local, cluster) = setup();
    cluster
        .transaction(|tx| -> pgxkit::Result<_> {
            tx.execute("INSERT INTO t VALUES (1, 'kept')", &[])?;
            let err = tx
                .savepoint(|sp| -> pgxkit::Result<_> {
                    sp.execute("INSERT INTO t VALUES (2, 'undone')", &[])?;
                    sp.execute("INSERT INTO t VALUES (1, 'duplicate')", &[])
                })
                .unwrap_err();
            assert_eq!(err.code(), Some(&SqlState::UNIQUE_VIOLATION));
            let inner =
                tx.savepoint(|sp| sp.execute("INSERT INTO t VALUES (3, 'released')", &[]))?;
            assert_eq!(inner, 1);
            Ok(())
        })
        .unwrap();
    let ids: Vec<i32> = cluster
        .query("SELECT id FROM t ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, [1, 3]);
}

#[test]
fn read_transactions_run_read_only_on_a_replica() {
    let local = LocalCluster::start(1).unwrap();
    let cluster = builder_for(&local).build().unwrap();
    cluster
        .batch_execute("CREATE TABLE r (x int); INSERT INTO r VALUES (1), (2)")
        .unwrap();
    local
        .wait_for_replicas_caught_up(Duration::from_secs(10))
        .unwrap();
    let (port, n) = cluster
        .replica()
        .transaction(|tx| -> pgxkit::Result<_> {
            let port: i32 = tx.query_one("SELECT inet_server_port()", &[])?.get(0);
            let n: i64 = tx.query_one("SELECT count(*) FROM r", &[])?.get(0);
            Ok((port, n))
        })
        .unwrap();
    assert_eq!((port as u16, n), (local.replicas()[0].port(), 2));
    let err = cluster
        .replica()
        .transaction(|tx| tx.execute("INSERT INTO r VALUES (3)", &[]))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Db);
    assert_eq!(
        err.code(),
        Some(&SqlState::READ_ONLY_SQL_TRANSACTION),
        "{err:?}"
    );

    // A read-only transaction on the primary rejects writes the same way.
    let err = cluster
        .build_transaction()
        .read_only(true)
        .run(|tx| tx.execute("INSERT INTO r VALUES (4)", &[]))
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::READ_ONLY_SQL_TRANSACTION));
}

fn create_user(db: &impl Writes, id: i32) -> pgxkit::Result<u64> {
    db.execute("INSERT INTO t VALUES ($1, 'user')", &[&id])
}

#[test]
fn executor_code_runs_on_the_cluster_and_in_transactions() {
    let (_local, cluster) = setup();
    create_user(&cluster, 1).unwrap();
    cluster.transaction(|tx| create_user(tx, 2)).unwrap();
    let err = cluster
        .transaction(|tx| -> pgxkit::Result<_> {
            create_user(tx, 3)?;
            create_user(tx, 1)
        })
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::UNIQUE_VIOLATION));
    assert_eq!(count(&cluster, "t"), 2);
}

#[test]
fn serialization_failures_are_retried_until_both_commit_once() {
    let (_local, cluster) = setup();
    cluster
        .batch_execute("CREATE TABLE ledger (writer int, seen bigint)")
        .unwrap();
    let barrier = Arc::new(Barrier::new(2));
    let attempts = Arc::new(AtomicUsize::new(0));
    let serialization_errors = Arc::new(AtomicUsize::new(0));
    let policy = RetryPolicy::default()
        .base_delay(Duration::from_millis(10))
        .max_retries(5);
    let workers: Vec<_> = (0..2)
        .map(|writer: i32| {
            let (cluster, barrier, attempts, errors, policy) = (
                cluster.clone(),
                barrier.clone(),
                attempts.clone(),
                serialization_errors.clone(),
                policy.clone(),
            );
            std::thread::spawn(move || {
                let mine = AtomicUsize::new(0);
                let serializable = cluster
                    .build_transaction()
                    .isolation(IsolationLevel::Serializable);
                let result = serializable.retry(&policy).run(|tx| {
                    attempts.fetch_add(1, Ordering::SeqCst);
                    let seen: i64 = tx.query_one("SELECT count(*) FROM ledger", &[])?.get(0);
                    if mine.fetch_add(1, Ordering::SeqCst) == 0 {
                        barrier.wait(); // both have read before either writes: write skew
                    }
                    let r = tx.execute("INSERT INTO ledger VALUES ($1, $2)", &[&writer, &seen]);
                    if let Err(e) = &r {
                        if e.code() == Some(&SqlState::T_R_SERIALIZATION_FAILURE) {
                            errors.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    r
                });
                result.unwrap();
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let rows: Vec<(i32, i64)> = cluster
        .query("SELECT writer, seen FROM ledger ORDER BY seen", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        rows.len(),
        2,
        "each writer committed exactly once: {rows:?}"
    );
    assert_ne!(rows[0].0, rows[1].0);
    assert_eq!(
        (rows[0].1, rows[1].1),
        (0, 1),
        "the retried one saw the other's row"
    );
    assert!(
        attempts.load(Ordering::SeqCst) >= 3,
        "one writer was retried"
    );
}

#[test]
fn a_unique_violation_is_not_retried() {
    let (_local, cluster) = setup();
    cluster
        .execute("INSERT INTO t VALUES (1, 'a')", &[])
        .unwrap();
    let attempts = AtomicUsize::new(0);
    let err = cluster
        .build_transaction()
        .retry(&RetryPolicy::default())
        .run(|tx| -> pgxkit::Result<_> {
            attempts.fetch_add(1, Ordering::SeqCst);
            tx.execute("INSERT INTO t VALUES (1, 'again')", &[])
        })
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::UNIQUE_VIOLATION));
    assert_eq!(attempts.load(Ordering::SeqCst), 1);
    let calls = AtomicUsize::new(0);
    let err = pgxkit::retry(&RetryPolicy::default(), || {
        calls.fetch_add(1, Ordering::SeqCst);
        cluster.execute("INSERT INTO t VALUES (1, 'again')", &[])
    })
    .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::UNIQUE_VIOLATION));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[test]
fn a_connection_lost_during_commit_is_ambiguous_and_never_retried() {
    let (local, cluster) = setup();
    // A deferred trigger makes COMMIT itself take a while; we kill the
    // backend (SIGKILL: no goodbye message) while COMMIT is in flight.
    cluster
        .batch_execute(
            "CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN PERFORM pg_sleep(5); RETURN NULL; END $$;
             CREATE CONSTRAINT TRIGGER slow AFTER INSERT ON t DEFERRABLE INITIALLY DEFERRED
               FOR EACH ROW EXECUTE FUNCTION slow_commit();",
        )
        .unwrap();
    let attempts = AtomicUsize::new(0);
    let backend = Arc::new(Mutex::new(None::<i32>));
    let killer = {
        let backend = backend.clone();
        let port = local.primary().port();
        std::thread::spawn(move || {
            let mut admin = pgxkit::postgres::Config::new()
                .host("127.0.0.1")
                .port(port)
                .user("postgres")
                .dbname("postgres")
                .connect(pgxkit::postgres::NoTls)
                .unwrap();
            common::wait_for(
                "COMMIT to be running the trigger",
                Duration::from_secs(10),
                || {
                    let Some(pid) = *backend.lock().unwrap() else {
                        return false;
                    };
                    let rows = admin.query("SELECT pid, state, query FROM pg_stat_activity WHERE backend_type = 'client backend'", &[]).unwrap();
                    for r in rows {
                        eprintln!(
                            "pid {:?} state {:?} query {:?} (want {pid})",
                            r.get::<_, i32>(0),
                            r.get::<_, Option<String>>(1),
                            r.get::<_, Option<String>>(2)
                        );
                    }
                    admin
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND query = 'COMMIT'",
                        &[&pid],
                    )
                    .unwrap()
                    .get::<_, i64>(0)
                    == 1
                },
            );
            let pid = backend.lock().unwrap().unwrap();
            let status = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status()
                .unwrap();
            assert!(status.success());
        })
    };
    let err = cluster
        .build_transaction()
        .retry(&RetryPolicy::default())
        .run(|tx| -> pgxkit::Result<_> {
            attempts.fetch_add(1, Ordering::SeqCst);
            *backend.lock().unwrap() = Some(tx.query_one("SELECT pg_backend_pid()", &[])?.get(0));
            tx.execute("INSERT INTO t VALUES (1, 'maybe')", &[])
        })
        .unwrap_err();
    killer.join().unwrap();
    assert_eq!(err.kind(), ErrorKind::AmbiguousCommit, "{err:?}");
    assert!(!err.is_retryable());
    assert_eq!(attempts.load(Ordering::SeqCst), 1, "never re-run");
}

#[test]
fn a_connection_lost_before_commit_is_retried_and_commits_once() {
    let (local, cluster) = setup();
    let mut admin = local.primary().client().unwrap();
    let attempts = AtomicUsize::new(0);
    let committed = cluster
        .build_transaction()
        .retry(&RetryPolicy::default())
        .run(|tx| -> pgxkit::Result<_> {
            let attempt = attempts.fetch_add(1, Ordering::SeqCst) + 1;
            tx.execute("INSERT INTO t VALUES (1, 'once')", &[])?;
            if attempt == 1 {
                // The server ends this backend (57P01) before COMMIT is sent:
                // nothing of the attempt can have committed.
                let pid: i32 = tx.query_one("SELECT pg_backend_pid()", &[])?.get(0);
                let ended: bool = admin
                    .query_one("SELECT pg_terminate_backend($1)", &[&pid])
                    .unwrap()
                    .get(0);
                assert!(ended);
                tx.execute("SELECT 1", &[])?;
            }
            Ok(attempt)
        })
        .unwrap();
    assert_eq!(committed, 2, "committed by the second attempt");
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
    assert_eq!(count(&cluster, "t"), 1, "the row once");
}

#[test]
fn a_deferrable_read_only_serializable_transaction_is_one() {
    let (_local, cluster) = setup();
    let settings = cluster
        .build_transaction()
        .isolation(IsolationLevel::Serializable)
        .read_only(true)
        .deferrable(true)
        .run(|tx| -> pgxkit::Result<_> {
            let show = |name: &str| -> pgxkit::Result<String> {
                Ok(tx.query_one(&format!("SHOW {name}"), &[])?.get(0))
            };
            Ok((
                show("transaction_isolation")?,
                show("transaction_read_only")?,
                show("transaction_deferrable")?,
            ))
        })
        .unwrap();
    assert_eq!(
        settings,
        ("serializable".to_owned(), "on".to_owned(), "on".to_owned())
    );
    // And a write in it is refused by the server.
    let err = cluster
        .build_transaction()
        .read_only(true)
        .deferrable(true)
        .run(|tx| tx.execute("INSERT INTO t VALUES (9, 'no')", &[]))
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&SqlState::READ_ONLY_SQL_TRANSACTION),
        "{err:?}"
    );
}
