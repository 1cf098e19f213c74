//! The testkit's snapshot helpers: a plan that changes with an index fails
//! with a diff, the update variable rewrites, a changed statement fails
//! the transcript.

use std::process::Command;

use pgxkit::testkit::{LocalCluster, Snapshots, Transcript, UPDATE_VAR};
use pgxkit::{Cluster, ErrorKind};

#[test]
fn a_dropped_index_fails_the_plan_snapshot_with_a_diff() {
    let local = LocalCluster::start(0).unwrap();
    let cluster = Cluster::connect(&local.primary_dsn()).unwrap();
    cluster
        .batch_execute(
            "CREATE TABLE users (id int PRIMARY KEY, email text NOT NULL);
             INSERT INTO users SELECT i, 'u' || i || '@example.com' FROM generate_series(1, 10000) i;
             CREATE INDEX users_email ON users (email);
             ANALYZE users;",
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let snapshots = Snapshots::new(dir.path()).update(false);
    let sql = "SELECT id FROM users WHERE email = $1";
    let params: &[&(dyn pgxkit::ToSql + Sync)] = &[&"u5@example.com"];
    snapshots
        .check_plan(&cluster, "by_email", sql, params)
        .unwrap(); // written
    let file = dir.path().join("plans/by_email.json");
    let written = std::fs::read_to_string(&file).unwrap();
    assert!(
        written.contains("\"Index Name\": \"users_email\""),
        "{written}"
    );
    assert!(!written.contains("Total Cost"), "costs are off: {written}");
    snapshots
        .check_plan(&cluster, "by_email", sql, params)
        .unwrap(); // same

    cluster.batch_execute("DROP INDEX users_email").unwrap();
    let err = snapshots
        .check_plan(&cluster, "by_email", sql, params)
        .unwrap_err()
        .to_string();
    println!("{err}");
    assert!(
        err.contains(UPDATE_VAR) && err.contains("by_email.json"),
        "{err}"
    );
    assert!(
        err.lines()
            .any(|l| l.starts_with('-') && l.contains("Index Scan")),
        "{err}"
    );
    assert!(
        err.lines()
            .any(|l| l.starts_with('+') && l.contains("Seq Scan")),
        "{err}"
    );
    // The file is untouched until told to rewrite it.
    assert_eq!(std::fs::read_to_string(&file).unwrap(), written);
    let rewrite = Snapshots::new(dir.path()).update(true);
    rewrite
        .check_plan(&cluster, "by_email", sql, params)
        .unwrap();
    assert!(std::fs::read_to_string(&file).unwrap().contains("Seq Scan"));
    snapshots
        .check_plan(&cluster, "by_email", sql, params)
        .unwrap();

    // A statement the server refuses is an error, not a snapshot.
    let err = snapshots
        .check_plan(&cluster, "broken", "SELECT FROM nowhere", &[])
        .unwrap_err();
    let err = err.downcast_ref::<pgxkit::Error>().unwrap();
    assert_eq!(err.kind(), ErrorKind::Db);
    assert!(!dir.path().join("plans/broken.json").exists());
}

#[test]
fn a_transcript_records_what_ran_and_fails_on_a_changed_statement() {
    let local = LocalCluster::start(0).unwrap();
    let transcript = Transcript::new().normalize(|l| l.replace("ada@example.com", "<email>"));
    let cluster = transcript
        .attach(Cluster::builder().primary(local.primary_dsn()))
        .build()
        .unwrap();
    cluster
        .batch_execute(
            "CREATE TABLE accounts (id uuid PRIMARY KEY, email text UNIQUE, at timestamptz)",
        )
        .unwrap();
    transcript.clear();

    let signup = |email_sql: &str| {
        let id = "3f2504e0-4f89-11d3-9a0c-0305e82c3301";
        cluster
            .transaction(|tx| {
                tx.execute(
                    "INSERT INTO accounts VALUES ($1::text::uuid, $2, now())",
                    &[&id, &"ada@example.com"],
                )?;
                tx.query_one(email_sql, &[&"ada@example.com"])
            })
            .unwrap();
        let dup = cluster.execute(
            "INSERT INTO accounts VALUES ($1::text::uuid, $2, '2026-12-04 21:07:37+00')",
            &[&id, &"ada@example.com"],
        );
        assert_eq!(dup.unwrap_err().code().unwrap().code(), "23505");
        cluster.execute("DELETE FROM accounts", &[]).unwrap();
    };
    signup("SELECT id FROM accounts WHERE email = $1");
    let dir = tempfile::tempdir().unwrap();
    let snapshots = Snapshots::new(dir.path()).update(false);
    snapshots.check_transcript("signup", &transcript).unwrap();
    let text = std::fs::read_to_string(dir.path().join("golden/signup.txt")).unwrap();
    println!("{text}");
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        [
            "BEGIN",
            r#"execute: INSERT INTO accounts VALUES ($1::text::uuid, $2, now()) ["<uuid>", "<email>"] -> 1 row"#,
            r#"query_one: SELECT id FROM accounts WHERE email = $1 ["<email>"] -> 1 row"#,
            "COMMIT",
            r#"execute: INSERT INTO accounts VALUES ($1::text::uuid, $2, '<timestamp>') ["<uuid>", "<email>"] -> error Db 23505"#,
            "execute: DELETE FROM accounts -> 1 row",
        ]
    );

    // The same run again matches; a changed statement does not.
    transcript.clear();
    signup("SELECT id FROM accounts WHERE email = $1");
    snapshots.check_transcript("signup", &transcript).unwrap();
    transcript.clear();
    signup("SELECT id FROM accounts WHERE lower(email) = $1");
    let err = snapshots
        .check_transcript("signup", &transcript)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(r#"- query_one: SELECT id FROM accounts WHERE email = $1"#)
            && err.contains(r#"+ query_one: SELECT id FROM accounts WHERE lower(email) = $1"#),
        "{err}"
    );
}

/// Run by the test below as a child process, with the variable set (or not).
#[test]
fn child_writes_a_snapshot() {
    let Some(dir) = std::env::var_os("PGXKIT_SNAPSHOT_CHILD_DIR") else {
        return; // not the child
    };
    Snapshots::new(dir).assert_text("note.txt", "new\n");
}

#[test]
fn the_update_variable_rewrites_and_without_it_a_change_fails() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("note.txt");
    std::fs::write(&file, "old\n").unwrap();
    let child = |update: bool| {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", "child_writes_a_snapshot", "--test-threads", "1"])
            .env("PGXKIT_SNAPSHOT_CHILD_DIR", dir.path())
            .env_remove(UPDATE_VAR);
        if update {
            cmd.env(UPDATE_VAR, "1");
        }
        cmd.output().unwrap()
    };
    let out = child(false);
    assert!(!out.status.success(), "a changed snapshot passed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("- old") && stdout.contains("+ new"),
        "{stdout}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "old\n");

    let out = child(true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "new\n");
}
