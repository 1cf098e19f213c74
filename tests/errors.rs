//! Errors keep their cause and get the right class, against real servers:
//! a wrong password, an unknown database or role, TLS refused or not
//! verified, a closed port, found at checkout (after a lazy `build()`) as well
//! as at `build()`; client-side errors; transaction misuse; `Display` on one
//! line with the root cause once.

mod common;

use std::cell::Cell;
use std::error::Error as _;
use std::time::{Duration, Instant};

use pgxkit::testkit::LocalCluster;
use pgxkit::{Cluster, ErrorKind, RetryPolicy};

/// A connect failure found at checkout (the build is lazy), with what it
/// must say, and that `retry` gives up on it at once.
fn assert_permanent(dsn: &str, code: Option<&str>, says: &str) {
    let cluster = Cluster::builder()
        .primary(dsn)
        .lazy_connect(true)
        .connect_timeout(Duration::from_secs(5))
        .checkout_timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let attempts = Cell::new(0);
    let started = Instant::now();
    let err = pgxkit::retry(&RetryPolicy::default(), || {
        attempts.set(attempts.get() + 1);
        cluster.query_one("SELECT 1", &[])
    })
    .unwrap_err();
    let shown = err.to_string();
    assert_eq!(err.kind(), ErrorKind::Connect, "{dsn}: {err:?}");
    assert_eq!(err.code().map(|c| c.code()), code, "{dsn}: {err:?}");
    assert!(!err.is_retryable(), "{dsn}: {err:?}");
    assert_eq!(attempts.get(), 1, "{dsn}: retried {shown}");
    // At once: the failed connect ends the checkout, which does not wait
    // for its 30 s timeout. Alone this takes 50-150 ms; once, with two
    // full suites running on the machine, 5.3 s (not explained yet: see
    // the session notes), so the bound is well under the timeout it
    // guards against rather than tight.
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    assert!(err.source().is_some(), "{dsn}: the cause is kept");
    assert!(
        err.as_postgres().is_some(),
        "{dsn}: the driver's error is kept"
    );
    assert!(shown.contains(says), "{dsn}: {shown}");
    assert_eq!(shown.matches(says).count(), 1, "said once: {shown}");
    assert!(shown.contains("primary"), "names the node: {shown}");
    assert!(!shown.contains('\n'), "one line: {shown}");
}

#[test]
fn permanent_connect_failures_are_never_retried_and_say_why() {
    let local = LocalCluster::builder().password_auth(true).start().unwrap();
    let port = local.primary().port();
    let password = local.password().unwrap().to_owned();
    let url = |user: &str, pw: &str, db: &str| {
        format!("postgres://{user}:{pw}@127.0.0.1:{port}/{db}?sslmode=disable")
    };
    assert_permanent(
        &url("postgres", "wrong-password", "postgres"),
        Some("28P01"),
        "password authentication failed",
    );
    assert_permanent(
        &url("postgres", &password, "no_such_db"),
        Some("3D000"),
        "does not exist",
    );
    assert_permanent(
        &url("no_such_role", &password, "postgres"),
        Some("28P01"),
        "password authentication failed",
    );
    // With trust auth an unknown role is 28000, not a password failure.
    let trust = LocalCluster::start(0).unwrap();
    assert_permanent(
        &format!(
            "postgres://no_such_role@127.0.0.1:{}/postgres?sslmode=disable",
            trust.primary().port()
        ),
        Some("28000"),
        "does not exist",
    );
    // TLS required by the client, refused by this plaintext server.
    assert_permanent(
        &format!(
            "postgres://postgres@127.0.0.1:{}/postgres?sslmode=require",
            trust.primary().port()
        ),
        None,
        "TLS",
    );
}

#[test]
fn a_certificate_that_does_not_verify_is_never_retried() {
    let local = LocalCluster::builder().tls(true).start().unwrap();
    let files = local.tls().unwrap();
    assert_permanent(
        &format!(
            "postgres://postgres@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}",
            local.primary().port(),
            files.other_ca_cert.display()
        ),
        None,
        "certificate verify failed",
    );
}

#[test]
fn a_closed_port_says_why_and_stays_retryable() {
    let free = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dsn = format!("postgres://postgres@127.0.0.1:{free}/postgres?sslmode=disable");
    let err = Cluster::builder().primary(&dsn).build().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connect);
    assert!(err.is_retryable(), "{err:?}");
    let shown = err.to_string();
    assert!(shown.contains("Connection refused"), "{shown}");
    assert!(shown.contains(&format!("127.0.0.1:{free}")), "{shown}");
    // At checkout (lazy build) too, with the driver's error as the cause.
    let cluster = Cluster::builder()
        .primary(&dsn)
        .lazy_connect(true)
        .build()
        .unwrap();
    let err = cluster.execute("SELECT 1", &[]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connect, "{err:?}");
    assert!(err.as_postgres().is_some(), "{err:?}");
    let shown = err.to_string();
    assert_eq!(shown.matches("Connection refused").count(), 1, "{shown}");
}

#[test]
fn client_side_errors_have_their_own_kind_and_leave_the_connection_usable() {
    let local = LocalCluster::start(0).unwrap();
    let cluster = Cluster::builder()
        .primary(local.primary_dsn())
        .max_conns(1)
        .failure_threshold(1)
        .build()
        .unwrap();
    let err = cluster
        .query_one("SELECT $1::int4", &[&"not a number"])
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Client, "{err:?}");
    assert!(!err.is_retryable() && !err.is_connection_error());
    let err = cluster.query_one("SELECT $1::int4", &[]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Client, "{err:?}");
    // Same connection (max_conns 1), breaker still closed (threshold 1).
    let row = cluster.query_one("SELECT $1::int4", &[&7i32]).unwrap();
    assert_eq!(row.get::<_, i32>(0), 7);
    assert_eq!(cluster.stats().nodes[0].pool.new_conns, 1);
    assert_eq!(
        cluster.stats().nodes[0].breaker,
        pgxkit::BreakerState::Closed
    );
}

#[test]
fn using_a_transaction_while_it_runs_is_its_own_kind() {
    let local = LocalCluster::start(0).unwrap();
    let cluster = Cluster::connect(&local.primary_dsn()).unwrap();
    let tx = cluster.build_transaction().begin().unwrap();
    // `with_client`'s closure runs while the transaction's connection is
    // lent out; calling the transaction itself from there is re-entry.
    let mut inner = None;
    tx.with_client(|_client| -> pgxkit::Result<_> {
        inner = Some(tx.execute("SELECT 1", &[]));
        Ok(())
    })
    .unwrap();
    let err = inner.unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TransactionState, "{err:?}");
    // The transaction itself is still fine.
    assert_eq!(tx.execute("SELECT 1", &[]).unwrap(), 1);
    tx.commit().unwrap();
}

#[test]
fn server_errors_show_the_servers_words_once_on_one_line() {
    let local = LocalCluster::start(0).unwrap();
    let cluster = Cluster::connect(&local.primary_dsn()).unwrap();
    let err = cluster
        .execute("SELECT * FROM no_such_table", &[])
        .unwrap_err();
    let shown = err.to_string();
    assert_eq!(err.kind(), ErrorKind::Db);
    assert!(
        shown.starts_with("database error 42P01 on primary"),
        "{shown}"
    );
    assert_eq!(
        shown
            .matches("relation \"no_such_table\" does not exist")
            .count(),
        1,
        "{shown}"
    );
    assert!(!shown.contains("db error"), "{shown}");
}
