//! Unnamed statements through PgBouncer in transaction pooling mode, from
//! 8 threads in two processes at once; named (cached) statements are run too
//! and what breaks is reported.
//!
//! Its own harness (`harness = false`): without a `pgbouncer` binary the
//! test is reported as ignored, with the reason, in libtest's own words, so
//! a skip is never a silent pass (libtest captures a passing test's output,
//! and a test cannot mark itself ignored at run time). With
//! `PGXKIT_REQUIRE_PGBOUNCER` set (as `.ci/run` does) a missing binary fails.

mod common;

use std::collections::BTreeMap;

use pgxkit::testkit::LocalCluster;
use pgxkit::{Cluster, StatementMode};

const THREADS: i32 = 8;
const QUERIES: i32 = 300;

/// Runs the workload; returns the errors seen, by SQLSTATE (or kind).
fn workload(port: u16, mode: StatementMode) -> BTreeMap<String, usize> {
    let cluster = Cluster::builder()
        .primary(format!("postgres://postgres@127.0.0.1:{port}/postgres"))
        .statement_mode(mode)
        .max_conns(THREADS as u32)
        .build()
        .unwrap();
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let cluster = cluster.clone();
            std::thread::spawn(move || {
                let mut errors = BTreeMap::new();
                for i in 0..QUERIES {
                    match cluster.query_one("SELECT $1::int * 1000 + $2::int", &[&t, &i]) {
                        Ok(row) => assert_eq!(row.get::<_, i32>(0), t * 1000 + i),
                        Err(e) => {
                            let key = e
                                .code()
                                .map_or_else(|| format!("{:?}", e.kind()), |c| c.code().to_owned());
                            *errors.entry(key).or_insert(0) += 1;
                        }
                    }
                }
                errors
            })
        })
        .collect();
    let mut all = BTreeMap::new();
    for w in workers {
        for (k, n) in w.join().unwrap() {
            *all.entry(k).or_insert(0) += n;
        }
    }
    all
}

const NAME: &str = "unnamed_statements_work_through_pgbouncer_in_transaction_mode";

fn main() {
    if let Ok(port) = std::env::var("PGXKIT_BOUNCER_PORT") {
        // The second process.
        let errors = workload(port.parse().unwrap(), StatementMode::Unnamed);
        assert!(errors.is_empty(), "second process: {errors:?}");
        return;
    }
    // libtest's arguments, as far as they concern one test: `--list`, and
    // a name filter (`--exact` or a substring); other flags are accepted.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        println!("{NAME}: test");
        return;
    }
    let exact = args.iter().any(|a| a == "--exact");
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let selected = filters.is_empty()
        || filters.iter().any(|f| {
            if exact {
                f.as_str() == NAME
            } else {
                NAME.contains(f.as_str())
            }
        });
    println!("\nrunning {}", if selected { "1 test" } else { "0 tests" });
    if !selected {
        println!("\ntest result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 1 filtered out\n");
        return;
    }
    let local = LocalCluster::start(0).unwrap();
    match local.pgbouncer("transaction") {
        Ok(bouncer) => {
            run(&local, &bouncer);
            println!("test {NAME} ... ok");
            println!(
                "\ntest result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out\n"
            );
        }
        // The README's test command needs only the PostgreSQL server package;
        // .ci/run installs pgbouncer and sets PGXKIT_REQUIRE_PGBOUNCER=1.
        Err(e)
            if e.to_string().contains("no pgbouncer binary")
                && std::env::var_os("PGXKIT_REQUIRE_PGBOUNCER").is_none() =>
        {
            println!("test {NAME} ... ignored, {e}");
            println!(
                "\ntest result: ok. 0 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out\n"
            );
        }
        Err(e) => panic!("{e}"),
    }
}

fn run(local: &LocalCluster, bouncer: &pgxkit::testkit::PgBouncer) {
    let other = std::process::Command::new(std::env::current_exe().unwrap())
        .env("PGXKIT_BOUNCER_PORT", bouncer.port().to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let errors = workload(bouncer.port(), StatementMode::Unnamed);
    let output = other.wait_with_output().unwrap();
    assert!(errors.is_empty(), "this process: {errors:?}");
    assert!(
        output.status.success(),
        "the second process failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // 2 x 8 threads shared 4 server connections.
    let servers: i64 = local
        .primary()
        .client()
        .unwrap()
        .query_one("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND client_addr IS NOT NULL", &[])
        .unwrap()
        .get(0);
    assert!(
        servers <= 4,
        "{servers} server connections behind PgBouncer"
    );

    // Named statements, as cached mode prepares them, do not survive
    // transaction pooling: report what breaks (asserted only to be errors
    // PgBouncer causes, if any occur).
    let cached = workload(bouncer.port(), StatementMode::Cached);
    eprintln!(
        "cached (named) statements through PgBouncer transaction mode, errors by SQLSTATE: {cached:?}"
    );
    for code in cached.keys() {
        assert!(
            ["26000", "42P05", "08P01"].contains(&code.as_str()),
            "unexpected error {code}"
        );
    }
}
