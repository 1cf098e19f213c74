//! The public shape against a real server: the read handle and the query
//! traits, the transaction builder, caller error types through
//! transactions, savepoints and `with_client`, streaming inside a
//! transaction and on a replica.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::builder_for;
use pgxkit::postgres::error::SqlState;
use pgxkit::testkit::LocalCluster;
use pgxkit::{
    AsPgxkitError, Cluster, ErrorKind, IsolationLevel, OperationKind, Reads, RetryPolicy, Role,
    Writes,
};

/// A caller's own error type, as an application would have one.
#[derive(Debug)]
enum AppError {
    Db(pgxkit::Error),
    SoldOut,
}

impl From<pgxkit::Error> for AppError {
    fn from(e: pgxkit::Error) -> Self {
        AppError::Db(e)
    }
}

/// The driver's errors too (for `with_client` closures), through pgxkit's
/// own classification.
impl From<pgxkit::postgres::Error> for AppError {
    fn from(e: pgxkit::postgres::Error) -> Self {
        AppError::Db(e.into())
    }
}

impl AsPgxkitError for AppError {
    fn as_pgxkit_error(&self) -> Option<&pgxkit::Error> {
        match self {
            AppError::Db(e) => Some(e),
            AppError::SoldOut => None,
        }
    }
}

fn one_node() -> (LocalCluster, Cluster) {
    let local = LocalCluster::start(0).unwrap();
    let cluster = Cluster::builder()
        .primary(local.primary_dsn())
        .build()
        .unwrap();
    cluster
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .unwrap();
    (local, cluster)
}

fn count(cluster: &Cluster) -> i64 {
    cluster
        .query_one("SELECT count(*) FROM t", &[])
        .unwrap()
        .get(0)
}

fn ids(cluster: &Cluster) -> Vec<i32> {
    cluster
        .query("SELECT id FROM t ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn port_of(db: &impl Reads) -> u16 {
    let port: i32 = db
        .query_one("SELECT inet_server_port()", &[])
        .unwrap()
        .get(0);
    port as u16
}

fn insert(db: &impl Writes, id: i32) -> pgxkit::Result<u64> {
    db.execute("INSERT INTO t VALUES ($1)", &[&id])
}

#[test]
fn generic_code_runs_on_the_replicas_the_primary_and_in_transactions() {
    let local = LocalCluster::start(1).unwrap();
    let cluster = builder_for(&local).build().unwrap();
    let (primary, replica) = (local.primary().port(), local.replicas()[0].port());
    assert_eq!(port_of(&cluster), primary, "the Cluster reads the primary");
    assert_eq!(
        port_of(&cluster.replica()),
        replica,
        "the read handle a replica"
    );
    let in_tx = cluster
        .transaction(|tx| Ok::<_, pgxkit::Error>(port_of(tx)))
        .unwrap();
    assert_eq!(in_tx, primary);
    let in_snapshot = cluster
        .replica()
        .transaction(|tx| Ok::<_, pgxkit::Error>(port_of(tx)))
        .unwrap();
    assert_eq!(
        in_snapshot, replica,
        "a read-only transaction on the replica"
    );

    // The read handle streams from the replica too, and keeps the
    // cluster handle's deadline.
    let ports: Vec<i32> = cluster
        .replica()
        .query_iter("SELECT inet_server_port() FROM generate_series(1, 3)", &[])
        .unwrap()
        .map(|row| row.unwrap().get(0))
        .collect();
    assert_eq!(ports, [i32::from(replica); 3]);
    let started = Instant::now();
    let err = cluster
        .with_timeout(Duration::from_millis(200))
        .replica()
        .query("SELECT pg_sleep(5)", &[])
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(err.node().unwrap().role(), Role::Replica);

    // A replica cannot be asked for a writing transaction.
    let err = cluster
        .replica()
        .build_transaction()
        .read_only(false)
        .begin()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
}

#[test]
fn hooks_and_plans_see_the_route_even_when_reads_fall_back_to_the_primary() {
    let local = LocalCluster::start(0).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = Arc::clone(&seen);
    let cluster = Cluster::builder()
        .primary(local.primary_dsn())
        .after_operation(move |op| {
            s.lock()
                .unwrap()
                .push((op.kind(), op.route(), op.role(), op.is_ok()));
            Ok(())
        })
        .build()
        .unwrap();
    cluster.query("SELECT 1", &[]).unwrap();
    cluster.replica().query("SELECT 1", &[]).unwrap();
    cluster
        .replica()
        .with_client(|c| Ok::<_, pgxkit::Error>(c.simple_query("SELECT 1")?.len()))
        .unwrap();
    cluster
        .with_client(|_| Err::<(), _>(AppError::SoldOut))
        .unwrap_err();
    assert_eq!(
        *seen.lock().unwrap(),
        [
            (OperationKind::Query, Role::Primary, Role::Primary, true),
            // No replica: the read ran on the primary, routed as a read.
            (OperationKind::Query, Role::Replica, Role::Primary, true),
            (
                OperationKind::WithClient,
                Role::Replica,
                Role::Primary,
                true
            ),
            // The caller's own error is a failure to the hooks.
            (
                OperationKind::WithClient,
                Role::Primary,
                Role::Primary,
                false
            ),
        ]
    );
}

#[test]
fn a_closure_error_of_the_callers_type_rolls_back_and_comes_back_unchanged() {
    let (_local, cluster) = one_node();
    let result: Result<(), AppError> = cluster.transaction(|tx| {
        insert(tx, 1)?;
        Err(AppError::SoldOut)
    });
    assert!(matches!(result, Err(AppError::SoldOut)), "{result:?}");
    assert_eq!(count(&cluster), 0, "rolled back");

    // A pgxkit error inside converts through From, and rolls back too.
    let result: Result<(), AppError> = cluster.transaction(|tx| {
        insert(tx, 1)?;
        insert(tx, 1)?; // duplicate
        Ok(())
    });
    match result {
        Err(AppError::Db(e)) => assert_eq!(e.code(), Some(&SqlState::UNIQUE_VIOLATION)),
        other => panic!("expected the duplicate: {other:?}"),
    }
    assert_eq!(count(&cluster), 0);

    // Ok commits, and savepoints take the caller's type as well.
    let kept: Result<u64, AppError> = cluster.transaction(|tx| {
        insert(tx, 1)?;
        let undone = tx.savepoint(|sp| {
            insert(sp, 2)?;
            Err::<(), _>(AppError::SoldOut)
        });
        assert!(matches!(undone, Err(AppError::SoldOut)));
        Ok(insert(tx, 3)?)
    });
    assert_eq!(kept.unwrap(), 1);
    let ids = ids(&cluster);
    assert_eq!(
        ids,
        [1, 3],
        "the savepoint's row undone, the rest committed"
    );
    assert_eq!(cluster.stats().primary().unwrap().pool.closed_broken, 0);
}

#[test]
fn with_client_passes_the_callers_errors_and_bounds_the_call() {
    let (_local, cluster) = one_node();
    // A migration runner's style: its own error type out of the closure.
    let err = cluster
        .with_client(|client| {
            client.batch_execute("INSERT INTO t VALUES (1)")?;
            Err::<(), _>(AppError::SoldOut)
        })
        .unwrap_err();
    assert!(matches!(err, AppError::SoldOut));
    assert_eq!(count(&cluster), 1, "what the closure did stays done");
    let stats = cluster.stats();
    let primary = stats.primary().unwrap();
    assert_eq!(primary.pool.closed_broken, 0, "the connection was fine");
    assert_eq!(primary.breaker, pgxkit::BreakerState::Closed);

    // The driver's errors convert into pgxkit::Error with their class.
    let err = cluster
        .with_client(|c| Ok::<_, pgxkit::Error>(c.batch_execute("SELEC 1")?))
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::SYNTAX_ERROR), "{err}");

    // The deadline still bounds it: Timeout, whatever the closure returned.
    let started = Instant::now();
    let err = cluster
        .with_timeout(Duration::from_millis(200))
        .with_client(|c| {
            c.batch_execute("SELECT pg_sleep(5)")?;
            Ok::<_, AppError>(())
        })
        .unwrap_err();
    match err {
        AppError::Db(e) => assert_eq!(e.kind(), ErrorKind::Timeout, "{e}"),
        other => panic!("expected a timeout: {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(
        cluster.stats().primary().unwrap().pool.closed_broken,
        1,
        "the cancelled connection is discarded"
    );
}

#[test]
fn with_client_in_a_transaction_finds_out_whether_the_server_aborted_it() {
    let (_local, cluster) = one_node();
    // The caller's error without a server error: the transaction is fine.
    let tx = cluster.build_transaction().begin().unwrap();
    insert(&tx, 1).unwrap();
    let mine = tx.with_client(|_| Err::<(), _>(AppError::SoldOut));
    assert!(matches!(mine, Err(AppError::SoldOut)));
    tx.commit().unwrap();
    assert_eq!(count(&cluster), 1);

    // A server error hidden in the caller's error: commit reports it.
    let tx = cluster.build_transaction().begin().unwrap();
    insert(&tx, 2).unwrap();
    let hidden = tx.with_client(|c| match c.batch_execute("INSERT INTO t VALUES (1)") {
        Err(_) => Err::<(), _>(AppError::SoldOut), // the cause dropped on purpose
        Ok(()) => Ok(()),
    });
    assert!(matches!(hidden, Err(AppError::SoldOut)));
    let err = tx.commit().unwrap_err();
    assert!(err.to_string().contains("aborted"), "{err}");
    assert_eq!(count(&cluster), 1, "row 2 rolled back");
}

#[test]
fn a_retrying_transaction_retries_only_what_holds_a_retryable_error() {
    let (_local, cluster) = one_node();
    let policy = RetryPolicy::default()
        .base_delay(Duration::from_millis(5))
        .max_retries(5);

    // The caller's own error is never retried.
    let attempts = AtomicUsize::new(0);
    let result = cluster.build_transaction().retry(&policy).run(|_| {
        attempts.fetch_add(1, Ordering::SeqCst);
        Err::<(), _>(AppError::SoldOut)
    });
    assert!(matches!(result, Err(AppError::SoldOut)));
    assert_eq!(attempts.load(Ordering::SeqCst), 1);

    // A serialization failure wrapped in it is retried, and the retry
    // commits (the server raises 40001 on the first attempt).
    let attempts = AtomicUsize::new(0);
    let result = cluster
        .build_transaction()
        .isolation(IsolationLevel::Serializable)
        .retry(&policy)
        .run(|tx| -> Result<(), AppError> {
            let attempt = attempts.fetch_add(1, Ordering::SeqCst);
            insert(tx, 10 + i32::try_from(attempt).unwrap())?;
            if attempt == 0 {
                tx.batch_execute(
                    "DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END $$",
                )?;
            }
            Ok(())
        });
    result.unwrap();
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
    let ids = ids(&cluster);
    assert_eq!(ids, [11], "only the second attempt's row committed");

    // Boxed errors are searched for a pgxkit::Error.
    let attempts = AtomicUsize::new(0);
    let boxed: Result<(), Box<dyn std::error::Error + Send + Sync>> =
        cluster.build_transaction().retry(&policy).run(|tx| {
            if attempts.fetch_add(1, Ordering::SeqCst) == 0 {
                // A deadlock victim's error, as the server reports it.
                tx.batch_execute(
                    "DO $$ BEGIN RAISE EXCEPTION 'deadlock' USING ERRCODE = '40P01'; END $$",
                )?;
            }
            Ok(())
        });
    boxed.unwrap();
    assert_eq!(
        attempts.load(Ordering::SeqCst),
        2,
        "retried once, then committed"
    );
}

#[test]
fn streaming_inside_a_transaction_sees_its_snapshot_and_closes_its_cursor() {
    let (local, cluster) = one_node();
    cluster
        .execute("INSERT INTO t SELECT generate_series(1, 2500)", &[])
        .unwrap();
    let open_cursors = |tx: &pgxkit::Transaction<'_>| -> i64 {
        tx.query_one(
            "SELECT count(*) FROM pg_cursors WHERE name LIKE 'pgxkit%'",
            &[],
        )
        .unwrap()
        .get(0)
    };
    let summed: i64 = cluster
        .transaction(|tx| -> pgxkit::Result<i64> {
            tx.execute("DELETE FROM t WHERE id > 2000", &[])?;
            let mut sum = 0i64;
            let mut rows = 0;
            for row in tx.query_iter("SELECT id FROM t ORDER BY id", &[])? {
                let id: i32 = row?.get(0);
                sum += i64::from(id);
                rows += 1;
                if rows == 1500 {
                    // Another statement between batches, same transaction.
                    assert_eq!(open_cursors(tx), 1);
                }
            }
            assert_eq!(rows, 2000, "sees its own delete, across two batches");
            assert_eq!(open_cursors(tx), 0, "closed when the iterator is gone");
            // Dropped early: closed too.
            let mut early = tx.query_iter("SELECT id FROM t", &[])?;
            assert!(early.next().is_some());
            drop(early);
            assert_eq!(open_cursors(tx), 0);
            Ok(sum)
        })
        .unwrap();
    assert_eq!(summed, (1..=2000).sum::<i64>());
    assert_eq!(count(&cluster), 2000, "committed");

    // An error half way ends the iteration; the transaction is aborted.
    let tx = cluster.build_transaction().begin().unwrap();
    let results: Vec<_> = tx
        .query_iter("SELECT 1 / (1500 - id) FROM t ORDER BY id", &[])
        .unwrap()
        .collect();
    assert_eq!(results.len(), 1001, "the first batch, then the error");
    let err = results.last().unwrap().as_ref().unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::DIVISION_BY_ZERO), "{err}");
    assert!(tx.commit().unwrap_err().to_string().contains("aborted"));
    let stats = cluster.stats();
    assert_eq!(stats.primary().unwrap().pool.in_use_conns, 0);
    drop(local);
}
