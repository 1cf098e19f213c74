//! The statement cache and protocol modes against a real server.

mod common;

use pgxkit::testkit::LocalCluster;
use pgxkit::{Cluster, ErrorKind, StatementMode};

fn one_connection(local: &LocalCluster) -> pgxkit::ClusterBuilder {
    Cluster::builder().primary(local.primary_dsn()).max_conns(1)
}

/// Statements prepared over the protocol on the cluster's only connection,
/// as the server sees them.
fn server_statements(cluster: &Cluster) -> Vec<String> {
    // The simple protocol, so that this look does not prepare a statement itself.
    let messages = cluster
        .with_client(|c| -> pgxkit::Result<_> {
            Ok(c.simple_query("SELECT statement FROM pg_prepared_statements WHERE NOT from_sql ORDER BY statement")?)
        })
        .unwrap();
    messages
        .iter()
        .filter_map(|m| match m {
            pgxkit::postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
        .collect()
}

#[test]
fn a_repeated_query_is_prepared_once_per_connection() {
    let local = LocalCluster::start(0).unwrap();
    let cluster = one_connection(&local).build().unwrap();
    for i in 0..10 {
        let v: i32 = cluster
            .query_one("SELECT $1::int + 1", &[&i])
            .unwrap()
            .get(0);
        assert_eq!(v, i + 1);
    }
    let pool = cluster.stats().primary().unwrap().pool.clone();
    assert_eq!(
        (pool.statements_prepared, pool.statement_cache_hits),
        (1, 9)
    );
    assert_eq!(
        server_statements(&cluster),
        ["SELECT $1::int + 1"],
        "one Parse on the server"
    );
    // Transactions use the same cache.
    cluster
        .transaction(|tx| tx.query_one("SELECT $1::int + 1", &[&5i32]).map(|_| ()))
        .unwrap();
    assert_eq!(
        cluster.stats().primary().unwrap().pool.statement_cache_hits,
        10
    );
}

#[test]
fn a_changed_column_type_between_cached_executions_is_re_prepared() {
    let local = LocalCluster::start(0).unwrap();
    let cluster = one_connection(&local).build().unwrap();
    cluster
        .batch_execute("CREATE TABLE m (id int PRIMARY KEY, v int); INSERT INTO m VALUES (1, 42)")
        .unwrap();
    let v: i32 = cluster
        .query_one("SELECT * FROM m WHERE id = $1", &[&1i32])
        .unwrap()
        .get(1);
    assert_eq!(v, 42);
    // From another session, as a migration would.
    local
        .primary()
        .client()
        .unwrap()
        .batch_execute("ALTER TABLE m ALTER COLUMN v TYPE text")
        .unwrap();
    let row = cluster
        .query_one("SELECT * FROM m WHERE id = $1", &[&1i32])
        .unwrap();
    assert_eq!(
        row.get::<_, String>(1),
        "42",
        "the stale statement was re-prepared transparently"
    );
    assert_eq!(
        cluster.stats().primary().unwrap().pool.statements_prepared,
        2
    );
    // A dropped and recreated table is fine too.
    local
        .primary()
        .client()
        .unwrap()
        .batch_execute("DROP TABLE m; CREATE TABLE m (id int, v bool)")
        .unwrap();
    assert!(
        cluster
            .query_opt("SELECT * FROM m WHERE id = $1", &[&1i32])
            .unwrap()
            .is_none()
    );
}

#[test]
fn the_cache_capacity_is_respected_and_evicted_statements_are_closed() {
    let local = LocalCluster::start(0).unwrap();
    let cluster = one_connection(&local)
        .statement_cache_capacity(2)
        .build()
        .unwrap();
    for sql in [
        "SELECT 1 + $1::int",
        "SELECT 2 + $1::int",
        "SELECT 1 + $1::int",
        "SELECT 3 + $1::int",
    ] {
        cluster.query_one(sql, &[&1i32]).unwrap();
    }
    // LRU: "2 +" was least recently used when "3 +" came.
    assert_eq!(
        server_statements(&cluster),
        ["SELECT 1 + $1::int", "SELECT 3 + $1::int"]
    );
    let pool = cluster.stats().primary().unwrap().pool.clone();
    assert_eq!(
        (pool.statements_prepared, pool.statement_cache_hits),
        (3, 1)
    );

    let uncached = one_connection(&local)
        .statement_cache_capacity(0)
        .build()
        .unwrap();
    uncached.query_one("SELECT 4 + $1::int", &[&1i32]).unwrap();
    assert!(server_statements(&uncached).is_empty());
}

#[test]
fn unnamed_statements_leave_nothing_on_the_server() {
    let local = LocalCluster::start(0).unwrap();
    let cluster = one_connection(&local)
        .statement_mode(StatementMode::Unnamed)
        .build()
        .unwrap();
    cluster
        .batch_execute("CREATE TABLE u (id int, name text, ok bool)")
        .unwrap();
    let n = cluster
        .execute(
            "INSERT INTO u VALUES ($1, $2, $3), ($4, $5, $6)",
            &[&1i32, &"a", &true, &2i32, &"b", &false],
        )
        .unwrap();
    assert_eq!(n, 2);
    let row = cluster
        .query_one(
            "SELECT name FROM u WHERE id = $1 AND ok = $2",
            &[&1i32, &true],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "a");
    let none: Option<i64> = None;
    assert!(
        cluster
            .query_one("SELECT $1::int8 IS NULL", &[&none])
            .unwrap()
            .get::<_, bool>(0)
    );
    assert!(server_statements(&cluster).is_empty());
    assert_eq!(
        cluster.stats().primary().unwrap().pool.statements_prepared,
        0
    );
}

#[test]
fn the_simple_protocol_runs_statements_without_parameters() {
    let local = LocalCluster::start(0).unwrap();
    let cluster = one_connection(&local).build().unwrap();
    let simple = cluster.with_statement_mode(StatementMode::Simple);
    simple.execute("CREATE TABLE s (x int)", &[]).unwrap();
    assert_eq!(
        simple
            .execute("INSERT INTO s VALUES (1), (2)", &[])
            .unwrap(),
        2
    );
    let err = simple
        .execute("INSERT INTO s VALUES ($1)", &[&3i32])
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    assert!(err.to_string().contains("statement mode"), "{err}");
    assert_eq!(
        simple.query("SELECT 1", &[]).unwrap_err().kind(),
        ErrorKind::Unsupported
    );
    assert!(server_statements(&cluster).is_empty());
}
