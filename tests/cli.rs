//! The `pgxkit` command against testkit clusters: every subcommand, every
//! exit status, `--json` parsed back, configuration from flags and from
//! the environment, a bad DSN, a dead replica.
#![cfg(feature = "cli")]

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use pgxkit::testkit::LocalCluster;
use serde_json::Value;

/// The command, with no `POSTGRES_*` / `PG*` variable of this process.
fn pgxkit() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgxkit"));
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if key.starts_with("PG") || key.starts_with("POSTGRES_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

fn run(cmd: &mut Command) -> (i32, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().unwrap();
    (
        status.code().expect("exited, not killed"),
        String::from_utf8(stdout).unwrap(),
        String::from_utf8(stderr).unwrap(),
    )
}

fn on(local: &LocalCluster) -> Command {
    let mut cmd = pgxkit();
    cmd.args(["--dsn", &local.primary_dsn()]);
    for dsn in local.replica_dsns() {
        cmd.args(["--replica", &dsn]);
    }
    cmd
}

fn json(text: &str) -> Value {
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[test]
fn health_exits_by_status_and_its_json_is_the_report() {
    let local = LocalCluster::start(1).unwrap();
    let (code, out, err) = run(on(&local).arg("health"));
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("status: healthy") && out.contains("replica1"),
        "{out}"
    );
    let (code, out, _) = run(on(&local).args(["health", "--json"]));
    assert_eq!(code, 0);
    let report = json(&out);
    assert_eq!(report["status"], "healthy");
    assert_eq!(report["nodes"].as_array().unwrap().len(), 2);
    assert_eq!(report["nodes"][1]["role"], "replica");

    // A dead replica: degraded, exit 1.
    local.replicas()[0].kill().unwrap();
    let (code, out, _) = run(on(&local).args(["health", "--json"]));
    assert_eq!(code, 1, "{out}");
    let report = json(&out);
    assert_eq!(report["status"], "degraded");
    assert_eq!(report["nodes"][1]["up"], false);
    // And the subcommands that visit every node say so too.
    let (code, out, _) = run(on(&local).args(["lag", "--json"]));
    assert_eq!(code, 1, "{out}");
    assert_eq!(json(&out)["replicas"][0]["up"], false);

    // No primary: unhealthy, exit 2.
    local.primary().kill().unwrap();
    let (code, out, _) = run(on(&local).args(["health", "--json", "--connect-timeout", "2s"]));
    assert_eq!(code, 2, "{out}");
    let report = json(&out);
    assert_eq!(report["status"], "unhealthy");
    assert!(
        report["error"].as_str().unwrap().contains("connect"),
        "{report}"
    );
}

#[test]
fn a_bad_dsn_is_exit_3_naming_the_key_never_the_password() {
    let (code, out, err) = run(pgxkit().args([
        "--dsn",
        "postgres://app:s3cr3tPw@127.0.0.1:1/app?pool_max_conns=many",
        "health",
    ]));
    assert_eq!(code, 3, "{out}{err}");
    assert!(err.contains("pool_max_conns"), "{err}");
    assert!(
        !out.contains("s3cr3tPw") && !err.contains("s3cr3tPw"),
        "{out}{err}"
    );
    // Usage errors are exit 3 as well.
    let (code, _, err) = run(pgxkit().args(["--dsn", "postgres://a@h/d", "frobnicate"]));
    assert_eq!(code, 3);
    assert!(err.contains("unknown command `frobnicate`"), "{err}");
    let (code, _, err) = run(pgxkit().args(["health", "--watch", "soon"]));
    assert_eq!(code, 3);
    assert!(err.contains("--watch"), "{err}");
    let (code, _, err) = run(pgxkit().arg("--bogus"));
    assert_eq!(code, 3, "{err}");
}

#[test]
fn configured_from_the_environment_like_the_library() {
    let local = LocalCluster::start(1).unwrap();
    let replica = format!("127.0.0.1:{}", local.replicas()[0].port());
    let (code, out, err) = run(pgxkit()
        .env("POSTGRES_HOST", "127.0.0.1")
        .env("POSTGRES_PORT", local.primary().port().to_string())
        .env("POSTGRES_USER", "postgres")
        .env("POSTGRES_DB", "postgres")
        .env("POSTGRES_REPLICA_HOSTS", &replica)
        .args(["health", "--json"]));
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(json(&out)["nodes"][1]["address"], replica);
    // libpq's variables too.
    let (code, out, err) = run(pgxkit()
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", local.primary().port().to_string())
        .env("PGUSER", "postgres")
        .args(["health", "--json"]));
    assert_eq!(code, 0, "{out}{err}");
    // A bad variable: exit 3, named.
    let (code, _, err) = run(pgxkit().env("POSTGRES_MAX_CONNS", "lots").arg("health"));
    assert_eq!(code, 3);
    assert!(err.contains("POSTGRES_MAX_CONNS"), "{err}");
}

#[test]
fn wait_ready_waits_for_the_primary_and_replicas_and_gives_up_at_its_timeout() {
    let local = LocalCluster::start(1).unwrap();
    let (code, out, err) = run(on(&local).args(["wait-ready", "--replicas", "1", "--json"]));
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(json(&out)["ready"], true);

    // More replicas than there are: not ready at the timeout, saying why.
    let started = Instant::now();
    let (code, out, _) = run(on(&local).args(["wait-ready", "--replicas", "2", "--timeout", "1s"]));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("waiting for 2 replica(s) (1 up)"), "{out}");
    assert!(started.elapsed() < Duration::from_secs(10));

    // The primary down, then back: ready once it answers.
    local.primary().stop().unwrap();
    let child = on(&local)
        .args(["wait-ready", "--timeout", "60s", "--connect-timeout", "1s"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    local.primary().start().unwrap();
    let output = child.wait_with_output().unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert_eq!(output.status.code(), Some(0), "{out}{err}");
    assert!(err.contains("waiting for the primary"), "{err}");
    assert!(out.contains("ready after"), "{out}");
}

#[test]
fn validate_checks_every_node_tables_tls_and_a_replicated_write() {
    let local = LocalCluster::start(1).unwrap();
    let mut admin = local.primary().client().unwrap();
    admin.batch_execute("CREATE TABLE users (id int)").unwrap();
    local
        .wait_for_replicas_caught_up(Duration::from_secs(30))
        .unwrap();
    let (code, out, err) = run(on(&local).args([
        "validate",
        "--table",
        "users",
        "--write-check",
        "--max-lag",
        "10s",
    ]));
    assert_eq!(code, 0, "{out}{err}");
    for line in [
        "PASS  connect primary",
        "PASS  connect replica1",
        "PASS  table users",
        "PASS  write on the primary",
        "PASS  replica replica1 sees the write",
        "all checks passed",
    ] {
        assert!(out.contains(line), "{line:?} not in:\n{out}");
    }
    // The scratch table is gone.
    let left: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'pgxkit_validate_%'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(left, 0);

    // A missing table and TLS required on a plaintext cluster: exit 1.
    let (code, out, _) =
        run(on(&local).args(["validate", "--table", "orders", "--require-tls", "--json"]));
    assert_eq!(code, 1, "{out}");
    let report = json(&out);
    assert_eq!(report["passed"], false);
    let checks = report["checks"].as_array().unwrap();
    let failed: Vec<&str> = checks
        .iter()
        .filter(|c| c["passed"] == false)
        .map(|c| c["check"].as_str().unwrap())
        .collect();
    assert_eq!(
        failed,
        ["tls primary", "tls replica1", "table orders"],
        "{report}"
    );
}

#[test]
fn lag_connections_and_ssl_report_every_node() {
    let local = LocalCluster::builder()
        .replicas(1)
        .tls(true)
        .start()
        .unwrap();
    let tls = |dsn: String| format!("{dsn}?sslmode=require");
    let cmd = || {
        let mut c = pgxkit();
        c.args(["--dsn", &tls(local.primary_dsn())])
            .args(["--replica", &tls(local.replica_dsns()[0].clone())]);
        c
    };
    let (code, out, err) = run(cmd().args(["lag", "--json"]));
    assert_eq!(code, 0, "{out}{err}");
    let replicas = json(&out)["replicas"].clone();
    assert_eq!(replicas[0]["node"], "replica1");
    assert!(replicas[0]["lag_bytes"].is_u64(), "{replicas}");

    // --watch refreshes, --count times.
    let (code, out, _) = run(cmd().args(["lag", "--json", "--watch", "200ms", "--count", "3"]));
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 3, "{out}");
    out.lines()
        .for_each(|l| assert!(json(l)["replicas"].is_array()));

    let (code, out, err) = run(cmd().args(["connections", "--json"]));
    assert_eq!(code, 0, "{out}{err}");
    let nodes = json(&out)["nodes"].clone();
    assert_eq!(nodes.as_array().unwrap().len(), 2);
    for node in nodes.as_array().unwrap() {
        assert_eq!(node["max_connections"], 200, "{node}");
        assert!(node["total"].as_i64().unwrap() >= 1, "{node}");
    }
    let apps: Vec<&str> = nodes[0]["by_application_state"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["application_name"].as_str().unwrap())
        .collect();
    assert!(apps.contains(&"pgxkit-cli"), "{apps:?}");
    let (code, out, _) = run(cmd().arg("connections"));
    assert_eq!(code, 0);
    assert!(
        out.contains("max_connections") && out.contains("pgxkit-cli"),
        "{out}"
    );

    let (code, out, err) = run(cmd().args(["ssl", "--json"]));
    assert_eq!(code, 0, "{out}{err}");
    for node in json(&out)["nodes"].as_array().unwrap() {
        assert_eq!(node["encrypted"], true, "{node}");
        assert!(
            node["protocol"].as_str().unwrap().starts_with("TLS"),
            "{node}"
        );
    }
    let (code, out, _) = run(cmd().arg("ssl"));
    assert_eq!(code, 0);
    assert!(out.contains("encrypted") && out.contains("true"), "{out}");
}
