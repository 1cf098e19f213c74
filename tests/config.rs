//! Configuration: bad input gives a named `Config` error and never a
//! password; the environment table; `from_env` in a real process.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use pgxkit::testkit::LocalCluster;
use pgxkit::{Cluster, ClusterBuilder, ErrorKind, dsn_from_env_with};

const SECRET: &str = "Pw-n0t-2-leak";

fn dsn(query: &str) -> String {
    format!("postgres://app:{SECRET}@127.0.0.1:1/app?{query}")
}

fn assert_config_error(result: pgxkit::Result<Cluster>, key: &str) {
    let err = result.expect_err(key);
    assert_eq!(err.kind(), ErrorKind::Config, "{key}: {err}");
    let shown = format!("{err} | {err:?}");
    assert!(
        shown.contains(key),
        "error for {key} does not name it: {shown}"
    );
    assert!(!shown.contains(SECRET), "password leaked: {shown}");
    assert!(!shown.contains("DSN: DSN"), "said twice: {shown}");
}

#[test]
fn bad_dsns_and_options_name_the_key() {
    let lazy = |b: ClusterBuilder| b.lazy_connect(true).build();
    let cases: Vec<(&str, pgxkit::Result<Cluster>)> = vec![
        ("primary", Cluster::builder().build()),
        (
            "port",
            lazy(Cluster::builder().primary(format!("postgres://app:{SECRET}@h:5x/app"))),
        ),
        (
            "sslmode",
            lazy(Cluster::builder().primary(dsn("sslmode=maybe"))),
        ),
        (
            "pool_max_conns",
            lazy(Cluster::builder().primary(dsn("pool_max_conns=-3"))),
        ),
        (
            "pool_max_conns",
            lazy(Cluster::builder().primary(dsn("pool_max_conns=lots"))),
        ),
        (
            "max_conns",
            lazy(Cluster::builder().primary(dsn("pool_max_conns=0"))),
        ),
        (
            "max_conns",
            lazy(Cluster::builder().primary(dsn("")).max_conns(0)),
        ),
        (
            "min_conns",
            lazy(
                Cluster::builder()
                    .primary(dsn(""))
                    .max_conns(2)
                    .min_conns(3),
            ),
        ),
        (
            "min_conns",
            lazy(Cluster::builder().primary(dsn("pool_min_conns=9&pool_max_conns=4"))),
        ),
        (
            "pool_max_conn_lifetime",
            lazy(Cluster::builder().primary(dsn("pool_max_conn_lifetime=1y"))),
        ),
        (
            "pool_max_conn_idle_time",
            lazy(Cluster::builder().primary(dsn("pool_max_conn_idle_time=30"))),
        ),
        (
            "pool_health_check_period",
            lazy(Cluster::builder().primary(dsn("pool_health_check_period=-1m"))),
        ),
        (
            "max_conn_lifetime",
            lazy(
                Cluster::builder()
                    .primary(dsn(""))
                    .max_conn_lifetime(Duration::ZERO),
            ),
        ),
        (
            "checkout_timeout",
            lazy(
                Cluster::builder()
                    .primary(dsn(""))
                    .checkout_timeout(Duration::ZERO),
            ),
        ),
        (
            "health_check_period",
            lazy(
                Cluster::builder()
                    .primary(dsn(""))
                    .health_check_period(Duration::ZERO),
            ),
        ),
        // An unknown key is not repeated (it may be a piece of a password):
        // its place is named instead.
        (
            "query parameter 1",
            lazy(Cluster::builder().primary(dsn("nonsense=1"))),
        ),
        (
            "postgres://",
            lazy(Cluster::builder().primary(format!("mysql://app:{SECRET}@h/db"))),
        ),
        // Sizes r2d2 would try to allocate up front (an abort, not an error).
        (
            "pool_max_conns",
            lazy(Cluster::builder().primary(dsn("pool_max_conns=4294967295"))),
        ),
        (
            "max_conns",
            lazy(Cluster::builder().primary(dsn("")).max_conns(u32::MAX)),
        ),
        (
            "max_conn_lifetime",
            lazy(
                Cluster::builder()
                    .primary(dsn(""))
                    .max_conn_lifetime(Duration::MAX),
            ),
        ),
        (
            "checkout_timeout",
            lazy(
                Cluster::builder()
                    .primary(dsn(""))
                    .checkout_timeout(Duration::MAX),
            ),
        ),
        (
            "statement_cache_capacity",
            lazy(
                Cluster::builder()
                    .primary(dsn(""))
                    .statement_cache_capacity(usize::MAX),
            ),
        ),
        (
            "capture_slow_plans",
            lazy(Cluster::builder().primary(dsn("")).capture_slow_plans(
                pgxkit::PlanCapture::new(Duration::from_secs(1)).queue(usize::MAX),
            )),
        ),
        (
            "replica2 DSN",
            lazy(
                Cluster::builder()
                    .primary(dsn(""))
                    .replica(dsn(""))
                    .replica(dsn("sslmode=no")),
            ),
        ),
        (
            "sslrootcert",
            lazy(Cluster::builder().primary(dsn("sslmode=verify-full"))),
        ),
        (
            "sslrootcert",
            lazy(
                Cluster::builder()
                    .primary(dsn("sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem")),
            ),
        ),
        (
            "sslkey",
            lazy(Cluster::builder().primary(dsn("sslmode=require&sslkey=/nonexistent/k.pem"))),
        ),
        (
            "password",
            lazy(Cluster::builder().primary(format!("postgres://app:{SECRET}%ZZ@h/app"))),
        ),
        (
            "password",
            lazy(Cluster::builder().primary(format!("host=h user=app password='{SECRET}"))),
        ),
    ];
    for (key, result) in cases {
        assert_config_error(result, key);
    }
}

#[test]
fn nothing_prints_the_password() {
    let builder = Cluster::builder()
        .primary(dsn("sslmode=disable"))
        .replica(format!("host=127.0.0.1 port=1 user=app password={SECRET}"));
    assert!(!format!("{builder:?}").contains(SECRET));
    let cluster = builder
        .lazy_connect(true)
        .checkout_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    assert!(!format!("{cluster:?}").contains(SECRET));
    assert!(!format!("{:?}", cluster.stats()).contains(SECRET));
    let err = cluster.execute("SELECT 1", &[]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connect);
    assert!(!format!("{err} {err:?}").contains(SECRET));
    assert!(!pgxkit::redact_dsn(&dsn("")).contains(SECRET));
}

#[test]
fn dsn_from_env_table() {
    let user = std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "postgres".into());
    let cases: Vec<(Vec<(&str, &str)>, String)> = vec![
        (vec![], format!("postgres://{user}@localhost:5432/{user}?sslmode=prefer")),
        (
            vec![
                ("POSTGRES_HOST", "db.internal"),
                ("POSTGRES_PORT", "6432"),
                ("POSTGRES_USER", "app"),
                ("POSTGRES_PASSWORD", "p@ss word"),
                ("POSTGRES_DB", "orders"),
                ("POSTGRES_SSLMODE", "verify-full"),
                ("POSTGRES_SSLROOTCERT", "/etc/ca.pem"),
            ],
            "postgres://app:p%40ss%20word@db.internal:6432/orders?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem".into(),
        ),
        (
            vec![("POSTGRES_USER", "app"), ("POSTGRES_HOST", ""), ("POSTGRES_PORT", "")],
            "postgres://app@localhost:5432/app?sslmode=prefer".into(),
        ),
        (vec![("POSTGRES_HOST", "::1"), ("POSTGRES_USER", "a")], "postgres://a@[::1]:5432/a?sslmode=prefer".into()),
        // libpq's variables when the POSTGRES_ ones are not set...
        (
            vec![
                ("PGHOST", "pg.internal"),
                ("PGPORT", "6543"),
                ("PGUSER", "libpq"),
                ("PGPASSWORD", "pw"),
                ("PGDATABASE", "db"),
                ("PGSSLMODE", "require"),
                ("PGSSLROOTCERT", "/ca.pem"),
                ("PGSSLCERT", "/c.pem"),
                ("PGSSLKEY", "/k.pem"),
                ("PGAPPNAME", "job"),
                ("PGCONNECT_TIMEOUT", "2.5"),
            ],
            "postgres://libpq:pw@pg.internal:6543/db?sslmode=require&sslrootcert=%2Fca.pem\
             &sslcert=%2Fc.pem&sslkey=%2Fk.pem&application_name=job&connect_timeout=2.5"
                .into(),
        ),
        // ...and the POSTGRES_ ones first.
        (
            vec![
                ("POSTGRES_HOST", "a"),
                ("PGHOST", "b"),
                ("POSTGRES_USER", "u1"),
                ("PGUSER", "u2"),
                ("POSTGRES_PASSWORD", "p1"),
                ("PGPASSWORD", "p2"),
                ("PGPORT", ""),
            ],
            "postgres://u1:p1@a:5432/u1?sslmode=prefer".into(),
        ),
    ];
    for (vars, expected) in cases {
        let env: HashMap<&str, &str> = vars.iter().copied().collect();
        let dsn = dsn_from_env_with(|k| env.get(k).map(|v| v.to_string())).unwrap();
        assert_eq!(dsn, expected, "{vars:?}");
    }
}

#[test]
fn bad_environment_names_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(Vec<(&str, String)>, &str)> = vec![
        (vec![("POSTGRES_PORT", "54a2".into())], "POSTGRES_PORT"),
        (vec![("POSTGRES_PORT", "70000".into())], "POSTGRES_PORT"),
        (vec![("PGPORT", "x".into())], "PGPORT"),
        (vec![("PGSSLMODE", "sometimes".into())], "PGSSLMODE"),
        (
            vec![("PGCONNECT_TIMEOUT", "soon".into())],
            "PGCONNECT_TIMEOUT",
        ),
        (
            vec![("POSTGRES_SSLMODE", "sometimes".into())],
            "POSTGRES_SSLMODE",
        ),
        (
            vec![("POSTGRES_MAX_CONNS", "-1".into())],
            "POSTGRES_MAX_CONNS",
        ),
        (
            vec![("POSTGRES_MIN_CONNS", "few".into())],
            "POSTGRES_MIN_CONNS",
        ),
        (
            vec![("POSTGRES_MAX_CONN_LIFETIME", "3600".into())],
            "POSTGRES_MAX_CONN_LIFETIME",
        ),
        (
            vec![("POSTGRES_MAX_CONN_IDLE_TIME", "soon".into())],
            "POSTGRES_MAX_CONN_IDLE_TIME",
        ),
        (
            vec![("POSTGRES_HEALTH_CHECK_PERIOD", "1 minute".into())],
            "POSTGRES_HEALTH_CHECK_PERIOD",
        ),
        (
            vec![("POSTGRES_REPLICA_HOSTS", "r1:54x".into())],
            "POSTGRES_REPLICA_HOSTS",
        ),
        (
            vec![(
                "POSTGRES_PASSWORD_FILE",
                dir.path().join("missing").display().to_string(),
            )],
            "POSTGRES_PASSWORD_FILE",
        ),
        (
            vec![
                ("POSTGRES_PASSWORD", SECRET.into()),
                ("POSTGRES_PASSWORD_FILE", "/x".into()),
            ],
            "POSTGRES_PASSWORD_FILE",
        ),
    ];
    for (vars, key) in cases {
        let env: HashMap<&str, String> = vars.into_iter().collect();
        let err = ClusterBuilder::from_env_with(|k| env.get(k).cloned()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        let shown = format!("{err} {err:?}");
        assert!(shown.contains(key), "{key}: {shown}");
        assert!(!shown.contains(SECRET), "{shown}");
    }
    // Sizes out of bounds from the environment name the variable.
    for bad in ["0", "4294967295"] {
        let err =
            ClusterBuilder::from_env_with(|k| (k == "POSTGRES_MAX_CONNS").then(|| bad.to_string()))
                .unwrap_err();
        assert!(err.to_string().contains("POSTGRES_MAX_CONNS"), "{err}");
    }
}

#[test]
fn replicas_and_pool_settings_from_the_environment() {
    let local = LocalCluster::start(2).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("pw");
    std::fs::write(&password_file, "unused-with-trust\n").unwrap();
    let hosts = local
        .replicas()
        .iter()
        .map(|r| format!("127.0.0.1:{}", r.port()))
        .collect::<Vec<_>>()
        .join(",");
    let env: HashMap<&str, String> = [
        ("POSTGRES_HOST", "127.0.0.1".to_string()),
        ("POSTGRES_PORT", local.primary().port().to_string()),
        ("POSTGRES_USER", "postgres".into()),
        (
            "POSTGRES_PASSWORD_FILE",
            password_file.display().to_string(),
        ),
        ("POSTGRES_DB", "postgres".into()),
        ("POSTGRES_SSLMODE", "disable".into()),
        ("POSTGRES_MAX_CONNS", "6".into()),
        ("POSTGRES_MIN_CONNS", "1".into()),
        ("POSTGRES_MAX_CONN_LIFETIME", "1h30m".into()),
        ("POSTGRES_MAX_CONN_IDLE_TIME", "30m".into()),
        ("POSTGRES_HEALTH_CHECK_PERIOD", "500ms".into()),
        ("POSTGRES_REPLICA_HOSTS", hosts),
    ]
    .into_iter()
    .collect();
    let cluster = ClusterBuilder::from_env_with(|k| env.get(k).cloned())
        .unwrap()
        .build()
        .unwrap();
    let stats = cluster.stats();
    assert_eq!(stats.nodes.len(), 3);
    assert!(stats.nodes.iter().all(|n| n.pool.max_conns == 6));
    let mut ports: Vec<u16> = (0..4)
        .map(|_| common::read_port_from_new_thread(&cluster))
        .collect();
    ports.sort();
    ports.dedup();
    let mut replica_ports: Vec<u16> = local.replicas().iter().map(|r| r.port()).collect();
    replica_ports.sort();
    assert_eq!(ports, replica_ports);

    // POSTGRES_READ_USER: replicas are reached as another role, the
    // primary as POSTGRES_USER.
    cluster.batch_execute("CREATE ROLE reader LOGIN").unwrap();
    local
        .wait_for_replicas_caught_up(Duration::from_secs(10))
        .unwrap();
    let mut env = env;
    env.insert("POSTGRES_READ_USER", "reader".into());
    let cluster = ClusterBuilder::from_env_with(|k| env.get(k).cloned())
        .unwrap()
        .build()
        .unwrap();
    let user = |row: pgxkit::postgres::Row| row.get::<_, String>(0);
    assert_eq!(
        user(
            cluster
                .replica()
                .query_one("SELECT current_user::text", &[])
                .unwrap()
        ),
        "reader"
    );
    assert_eq!(
        user(cluster.query_one("SELECT current_user::text", &[]).unwrap()),
        "postgres"
    );
}

/// `Cluster::from_env()` reads the real process environment: run this test
/// binary again as a child with the variables set.
#[test]
fn from_env_in_a_real_process() {
    if std::env::var("PGXKIT_FROM_ENV_CHILD").is_ok() {
        let cluster = Cluster::from_env().unwrap();
        let port: i32 = cluster
            .query_one("SELECT inet_server_port()", &[])
            .unwrap()
            .get(0);
        let expected: i32 = std::env::var("POSTGRES_PORT").unwrap().parse().unwrap();
        assert_eq!(port, expected);
        let dsn = pgxkit::dsn_from_env().unwrap();
        assert!(dsn.contains(&format!(":{expected}/postgres")), "{dsn}");
        return;
    }
    let local = LocalCluster::start(0).unwrap();
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "from_env_in_a_real_process", "--test-threads=1"])
        .env("PGXKIT_FROM_ENV_CHILD", "1")
        .env("POSTGRES_HOST", "127.0.0.1")
        .env("POSTGRES_PORT", local.primary().port().to_string())
        .env("POSTGRES_USER", "postgres")
        .env("POSTGRES_DB", "postgres")
        .env("POSTGRES_SSLMODE", "disable")
        .env_remove("POSTGRES_PASSWORD")
        .env_remove("POSTGRES_PASSWORD_FILE")
        .env_remove("POSTGRES_REPLICA_HOSTS")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "the child test failed: {}\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn a_dsn_without_a_password_finds_it_in_the_password_file() {
    use std::os::unix::fs::PermissionsExt;
    let local = LocalCluster::builder().password_auth(true).start().unwrap();
    let port = local.primary().port();
    let dir = tempfile::tempdir().unwrap();
    let passfile = dir.path().join("pgpass");
    std::fs::write(
        &passfile,
        format!(
            "# other servers first\n127.0.0.1:1:*:*:wrong\n127.0.0.1:{port}:postgres:postgres:{}\n",
            local.password().unwrap()
        ),
    )
    .unwrap();
    let dsn = format!(
        "host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=disable passfile={}",
        passfile.display()
    );
    std::fs::set_permissions(&passfile, std::fs::Permissions::from_mode(0o600)).unwrap();
    let cluster = Cluster::builder().primary(&dsn).build().unwrap();
    assert_eq!(
        cluster.query_one("SELECT 1", &[]).unwrap().get::<_, i32>(0),
        1
    );
    // As libpq: a file that others can read is not used.
    std::fs::set_permissions(&passfile, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = Cluster::builder().primary(&dsn).build().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connect, "{err}");
    assert!(!err.is_retryable(), "{err:?}");
}

#[test]
fn libpq_variables_reach_a_real_server() {
    let local = LocalCluster::start(0).unwrap();
    let port = local.primary().port().to_string();
    let env: HashMap<&str, String> = [
        ("PGHOST", "127.0.0.1".to_string()),
        ("PGPORT", port),
        ("PGUSER", "postgres".into()),
        ("PGDATABASE", "postgres".into()),
        ("PGSSLMODE", "disable".into()),
        ("PGAPPNAME", "nightly-job".into()),
        ("PGCONNECT_TIMEOUT", "2.5".into()),
    ]
    .into_iter()
    .collect();
    let cluster = ClusterBuilder::from_env_with(|k| env.get(k).cloned())
        .unwrap()
        .build()
        .unwrap();
    let row = cluster
        .query_one(
            "SELECT current_setting('application_name'), inet_server_port()",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "nightly-job");
    assert_eq!(row.get::<_, i32>(1), i32::from(local.primary().port()));
}
