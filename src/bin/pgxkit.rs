//! `pgxkit`: health, readiness, deployment validation, lag, connections
//! and TLS of a PostgreSQL cluster, from a shell, an init container or CI.
//! Configured as the library is: `--dsn` / `--replica` / `--node`, else
//! the `POSTGRES_*` / `PG*` variables and `.pgpass`. Built with
//! `cargo install pgxkit --features cli`.

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use pgxkit::{Cluster, ClusterBuilder, ErrorKind, HealthStatus, Role};
use serde_json::{Value, json};

const USAGE: &str = "\
pgxkit: health, validation and lag of a PostgreSQL cluster

usage: pgxkit [options] <command> [command options]

commands:
  health                     every node's health (probed now)
                             exit 0 healthy, 1 degraded, 2 unhealthy
  wait-ready                 wait until the primary (and --replicas N
                             replicas) answer; exit 1 at --timeout (60s)
  validate                   deployment checks, one line each: connectivity
                             and version of every node; --require-tls;
                             --table NAME (repeatable); --write-check (a
                             scratch table on the primary, seen by every
                             replica within --max-lag, 10s)
  lag                        per replica, bytes and seconds; --watch 1s to
                             refresh (--count N times)
  connections                per node, pg_stat_activity by application and
                             state, against max_connections
  ssl                        per node, encrypted or not, protocol, cipher

options:
  --dsn DSN                  the primary (a multi-host DSN lists every node)
  --replica DSN              a replica (repeatable)
  --node DSN                 a node of unknown role (repeatable)
  --json                     JSON instead of a table
  --connect-timeout DUR      per connection attempt (default 5s)
  -h, --help                 this text

Without --dsn or --node, the POSTGRES_* variables (then PG*) configure it,
as Cluster::from_env does. Exit 3: bad configuration or usage.
";

/// Exit statuses.
const OK: u8 = 0;
const FAILED: u8 = 1;
const UNHEALTHY: u8 = 2;
const BAD_CONFIG: u8 = 3;

#[derive(Debug, Default)]
struct Args {
    command: Option<String>,
    dsn: Option<String>,
    replicas: Vec<String>,
    nodes: Vec<String>,
    json: bool,
    connect_timeout: Option<Duration>,
    timeout: Option<Duration>,
    want_replicas: usize,
    require_tls: bool,
    tables: Vec<String>,
    write_check: bool,
    max_lag: Option<Duration>,
    watch: Option<Duration>,
    count: Option<u64>,
}

/// A usage or configuration problem: printed, exit 3.
struct Usage(String);

fn duration(flag: &str, value: &str) -> Result<Duration, Usage> {
    pgxkit::parse_duration(value)
        .map_err(|why| Usage(format!("{flag}: {why} (a duration such as 500ms, 10s, 1m)")))
}

fn parse_args() -> Result<Args, Usage> {
    use lexopt::prelude::*;
    let mut args = Args::default();
    let mut parser = lexopt::Parser::from_env();
    let bad = |e: lexopt::Error| Usage(e.to_string());
    fn value(parser: &mut lexopt::Parser, flag: &str) -> Result<String, Usage> {
        parser
            .value()
            .map_err(|e| Usage(e.to_string()))?
            .into_string()
            .map_err(|_| Usage(format!("{flag}: not valid UTF-8")))
    }
    while let Some(arg) = parser.next().map_err(bad)? {
        match arg {
            Long("dsn") => args.dsn = Some(value(&mut parser, "--dsn")?),
            Long("replica") => args.replicas.push(value(&mut parser, "--replica")?),
            Long("node") => args.nodes.push(value(&mut parser, "--node")?),
            Long("json") => args.json = true,
            Long("connect-timeout") => {
                args.connect_timeout = Some(duration(
                    "--connect-timeout",
                    &value(&mut parser, "--connect-timeout")?,
                )?)
            }
            Long("timeout") => {
                args.timeout = Some(duration("--timeout", &value(&mut parser, "--timeout")?)?)
            }
            Long("replicas") => {
                args.want_replicas = value(&mut parser, "--replicas")?
                    .parse()
                    .map_err(|_| Usage("--replicas: not a whole number".into()))?
            }
            Long("require-tls") => args.require_tls = true,
            Long("table") => args.tables.push(value(&mut parser, "--table")?),
            Long("write-check") => args.write_check = true,
            Long("max-lag") => {
                args.max_lag = Some(duration("--max-lag", &value(&mut parser, "--max-lag")?)?)
            }
            Long("watch") => {
                args.watch = Some(duration("--watch", &value(&mut parser, "--watch")?)?)
            }
            Long("count") => {
                args.count = Some(
                    value(&mut parser, "--count")?
                        .parse()
                        .map_err(|_| Usage("--count: not a whole number".into()))?,
                )
            }
            Short('h') | Long("help") => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            Value(v) if args.command.is_none() => {
                args.command = Some(
                    v.into_string()
                        .map_err(|_| Usage("the command is not valid UTF-8".into()))?,
                )
            }
            other => return Err(bad(other.unexpected())),
        }
    }
    Ok(args)
}

impl Args {
    /// The cluster's builder: the flags, else the environment.
    fn builder(&self) -> pgxkit::Result<ClusterBuilder> {
        let mut builder = if self.dsn.is_some() || !self.nodes.is_empty() {
            let mut b = Cluster::builder();
            if let Some(dsn) = &self.dsn {
                b = b.primary(dsn.clone());
            }
            b.nodes(self.nodes.clone())
        } else {
            ClusterBuilder::from_env()?
        };
        for dsn in &self.replicas {
            builder = builder.replica(dsn.clone());
        }
        Ok(builder
            .application_name("pgxkit-cli")
            .connect_timeout(self.connect_timeout.unwrap_or(Duration::from_secs(5))))
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(Usage(why)) => {
            eprintln!("pgxkit: {why}\n\n{USAGE}");
            return ExitCode::from(BAD_CONFIG);
        }
    };
    let Some(command) = args.command.clone() else {
        eprintln!("pgxkit: no command given\n\n{USAGE}");
        return ExitCode::from(BAD_CONFIG);
    };
    let result = match command.as_str() {
        "health" => health(&args),
        "wait-ready" => wait_ready(&args),
        "validate" => validate(&args),
        "lag" => lag(&args),
        "connections" => connections(&args),
        "ssl" => ssl(&args),
        other => {
            eprintln!("pgxkit: unknown command `{other}`\n\n{USAGE}");
            return ExitCode::from(BAD_CONFIG);
        }
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("pgxkit: {e}");
            ExitCode::from(if e.kind() == ErrorKind::Config {
                BAD_CONFIG
            } else {
                UNHEALTHY
            })
        }
    }
}

/// Prints `value` as JSON, or `table` (a header and rows) aligned.
fn emit(args: &Args, value: &Value, table: &[Vec<String>]) {
    let mut out = std::io::stdout().lock();
    if args.json {
        let _ = writeln!(out, "{value}");
        return;
    }
    // A row of one cell (a summary line) is printed as it is.
    let rows = || table.iter().filter(|r| r.len() > 1);
    let columns = rows().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in table {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        let line = if row.len() > 1 {
            line.join("  ")
        } else {
            row.join("")
        };
        let _ = writeln!(out, "{}", line.trim_end());
    }
}

fn or_dash<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// Builds the cluster (every node probed): `None`, reported as unhealthy,
/// when the primary cannot be reached; a configuration error is returned.
fn open(args: &Args, builder: ClusterBuilder) -> pgxkit::Result<Option<Cluster>> {
    match builder.build() {
        Ok(cluster) => Ok(Some(cluster)),
        Err(e) if e.kind() == ErrorKind::Config => Err(e),
        Err(e) => {
            emit(
                args,
                &json!({"status": "unhealthy", "error": e.to_string()}),
                &[
                    vec!["status".into(), "error".into()],
                    vec!["unhealthy".into(), e.to_string()],
                ],
            );
            Ok(None)
        }
    }
}

fn health(args: &Args) -> pgxkit::Result<u8> {
    let Some(cluster) = open(args, args.builder()?)? else {
        return Ok(UNHEALTHY);
    };
    let report = cluster.health();
    let mut table = vec![
        [
            "node",
            "role",
            "address",
            "up",
            "recovery",
            "breaker",
            "lag bytes",
            "lag",
            "reads",
            "warnings",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for n in &report.nodes {
        table.push(vec![
            n.node.name().to_owned(),
            n.node.role().to_string(),
            n.node.address().to_owned(),
            n.up.to_string(),
            or_dash(n.in_recovery),
            n.breaker.to_string(),
            or_dash(n.lag_bytes),
            or_dash(n.lag.map(|l| format!("{:.3}s", l.as_secs_f64()))),
            n.eligible_for_reads.to_string(),
            n.warnings.join("; "),
        ]);
    }
    table.push(vec![format!("status: {}", report.status)]);
    let value = serde_json::to_value(&report).unwrap_or(Value::Null);
    emit(args, &value, &table);
    Ok(match report.status {
        HealthStatus::Healthy => OK,
        HealthStatus::Degraded => FAILED,
        HealthStatus::Unhealthy => UNHEALTHY,
    })
}

fn wait_ready(args: &Args) -> pgxkit::Result<u8> {
    let timeout = args.timeout.unwrap_or(Duration::from_secs(60));
    let cluster = args
        .builder()?
        .lazy_connect(true)
        .health_check_period(Duration::from_millis(250))
        .build()?;
    let started = Instant::now();
    let mut last = String::new();
    loop {
        let primary = cluster.health_check();
        let up = cluster
            .health()
            .nodes
            .iter()
            .filter(|n| n.node.role() == Role::Replica && n.up && n.in_recovery == Some(true))
            .count();
        let primary_ok = primary.is_ok();
        let replicas_ok = up >= args.want_replicas;
        let waiting_for = match (&primary, replicas_ok) {
            (Ok(()), true) => String::new(),
            (Ok(()), false) => format!("{} replica(s) ({up} up)", args.want_replicas),
            (Err(e), true) => format!("the primary ({e})"),
            (Err(e), false) => {
                format!(
                    "the primary ({e}); {} replica(s) ({up} up)",
                    args.want_replicas
                )
            }
        };
        if primary_ok && replicas_ok {
            let elapsed = started.elapsed();
            emit(
                args,
                &json!({"ready": true, "replicas_up": up, "waited_seconds": elapsed.as_secs_f64()}),
                &[vec![format!(
                    "ready after {:.1}s: the primary and {up} replica(s) answer",
                    elapsed.as_secs_f64()
                )]],
            );
            return Ok(OK);
        }
        if started.elapsed() >= timeout {
            emit(
                args,
                &json!({"ready": false, "waiting_for": waiting_for, "timeout_seconds": timeout.as_secs_f64()}),
                &[vec![format!(
                    "not ready after {timeout:?}: waiting for {waiting_for}"
                )]],
            );
            return Ok(FAILED);
        }
        if waiting_for != last && !args.json {
            eprintln!("waiting for {waiting_for}");
            last = waiting_for;
        }
        std::thread::sleep(
            Duration::from_millis(250).min(timeout.saturating_sub(started.elapsed())),
        );
    }
}

/// One line of `validate`.
struct Check {
    name: String,
    passed: bool,
    detail: String,
}

fn validate(args: &Args) -> pgxkit::Result<u8> {
    let Some(cluster) = open(args, args.builder()?)? else {
        return Ok(FAILED);
    };
    let mut checks = Vec::new();
    let mut check = |name: String, result: Result<String, String>| {
        let passed = result.is_ok();
        let detail = result.unwrap_or_else(|e| e);
        checks.push(Check {
            name,
            passed,
            detail,
        });
    };
    let report = cluster.health();
    for n in &report.nodes {
        let name = format!("connect {} ({})", n.node.name(), n.node.address());
        let on = cluster.on_node(n.node.name());
        let version = on
            .ok_or_else(|| "no such node".to_owned())
            .and_then(|on| {
                on.query_one("SHOW server_version", &[])
                    .map_err(|e| e.to_string())
            })
            .map(|row| format!("PostgreSQL {}, {}", row.get::<_, String>(0), n.node.role()));
        check(name, version);
    }
    if args.require_tls {
        for status in cluster.ssl_status() {
            match status {
                Ok(s) if s.encrypted => check(
                    format!("tls {}", s.node.name()),
                    Ok(format!("{} {}", or_dash(s.version), or_dash(s.cipher))),
                ),
                Ok(s) => check(
                    format!("tls {}", s.node.name()),
                    Err("not encrypted".into()),
                ),
                Err(e) => check("tls".into(), Err(e.to_string())),
            }
        }
    }
    for table in &args.tables {
        let found = cluster
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[table])
            .map_err(|e| e.to_string())
            .and_then(|row| {
                if row.get(0) {
                    Ok("present".to_owned())
                } else {
                    Err("missing".to_owned())
                }
            });
        check(format!("table {table}"), found);
    }
    if args.write_check {
        write_check(
            &cluster,
            args.max_lag.unwrap_or(Duration::from_secs(10)),
            &mut check,
        );
    }
    let passed = checks.iter().all(|c| c.passed);
    let mut table: Vec<Vec<String>> = checks
        .iter()
        .map(|c| {
            vec![
                if c.passed { "PASS" } else { "FAIL" }.to_owned(),
                c.name.clone(),
                c.detail.clone(),
            ]
        })
        .collect();
    table.push(vec![
        if passed {
            "all checks passed"
        } else {
            "some checks failed"
        }
        .to_owned(),
    ]);
    let value = json!({
        "passed": passed,
        "checks": checks.iter().map(|c| json!({"check": c.name, "passed": c.passed, "detail": c.detail})).collect::<Vec<_>>(),
    });
    emit(args, &value, &table);
    Ok(if passed { OK } else { FAILED })
}

/// Writes a row to a scratch table on the primary, waits for every
/// replica to have it (within `max_lag`), drops the table.
fn write_check(
    cluster: &Cluster,
    max_lag: Duration,
    check: &mut impl FnMut(String, Result<String, String>),
) {
    let table = format!(
        "pgxkit_validate_{}_{}",
        std::process::id(),
        fastrand::u32(..)
    );
    let token = fastrand::i64(..);
    let created = cluster
        .batch_execute(&format!("CREATE TABLE {table} (token bigint)"))
        .and_then(|()| cluster.execute(&format!("INSERT INTO {table} VALUES ($1)"), &[&token]));
    if let Err(e) = created {
        check("write on the primary".into(), Err(e.to_string()));
        return;
    }
    check(
        "write on the primary".into(),
        Ok(format!("a row in the scratch table {table}")),
    );
    let written = Instant::now();
    for n in cluster
        .health()
        .nodes
        .iter()
        .filter(|n| n.node.role() == Role::Replica)
    {
        let name = format!("replica {} sees the write", n.node.name());
        let Some(on) = cluster.on_node(n.node.name()) else {
            continue;
        };
        let result = loop {
            let seen = on.query_opt(
                &format!("SELECT 1 FROM {table} WHERE token = $1"),
                &[&token],
            );
            match seen {
                Ok(Some(_)) => break Ok(format!("after {:?}", written.elapsed())),
                // Not there yet: the row, or the table itself (its creation not replayed).
                Ok(None) | Err(_) if written.elapsed() < max_lag => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok(None) => break Err(format!("not within {max_lag:?}")),
                Err(e) => break Err(format!("not within {max_lag:?}: {e}")),
            }
        };
        check(name, result);
    }
    if let Err(e) = cluster.batch_execute(&format!("DROP TABLE {table}")) {
        check("drop the scratch table".into(), Err(e.to_string()));
    }
}

fn lag(args: &Args) -> pgxkit::Result<u8> {
    let every = args.watch.unwrap_or(Duration::from_secs(1));
    let count = args
        .count
        .unwrap_or(if args.watch.is_some() { u64::MAX } else { 1 });
    let Some(cluster) = open(args, args.builder()?.health_check_period(every))? else {
        return Ok(UNHEALTHY);
    };
    let mut code = OK;
    for i in 0..count {
        if i > 0 {
            std::thread::sleep(every);
        }
        let report = cluster.health();
        let replicas: Vec<_> = report
            .nodes
            .iter()
            .filter(|n| n.node.role() == Role::Replica)
            .collect();
        let mut table = vec![
            ["replica", "address", "up", "lag bytes", "lag seconds"]
                .map(String::from)
                .to_vec(),
        ];
        let mut rows = Vec::new();
        code = OK;
        for n in &replicas {
            if !n.up || n.lag_bytes.is_none() {
                code = FAILED;
            }
            table.push(vec![
                n.node.name().to_owned(),
                n.node.address().to_owned(),
                n.up.to_string(),
                or_dash(n.lag_bytes),
                or_dash(n.lag.map(|l| format!("{:.3}", l.as_secs_f64()))),
            ]);
            rows.push(json!({
                "node": n.node.name(), "address": n.node.address(), "up": n.up,
                "lag_bytes": n.lag_bytes, "lag_seconds": n.lag.map(|l| l.as_secs_f64()),
            }));
        }
        emit(args, &json!({"replicas": rows}), &table);
    }
    Ok(code)
}

fn connections(args: &Args) -> pgxkit::Result<u8> {
    let Some(cluster) = open(args, args.builder()?)? else {
        return Ok(UNHEALTHY);
    };
    let mut code = OK;
    let mut table = vec![
        [
            "node",
            "application",
            "state",
            "connections",
            "max_connections",
        ]
        .map(String::from)
        .to_vec(),
    ];
    let mut nodes = Vec::new();
    for stats in cluster.stats().nodes {
        let name = stats.node.name().to_owned();
        let Some(on) = cluster.on_node(&name) else {
            continue;
        };
        let result = on
            .query_one("SELECT current_setting('max_connections')::int", &[])
            .and_then(|max| {
                let rows = on.query(
                    "SELECT coalesce(application_name, ''), coalesce(state, ''), count(*) \
                     FROM pg_stat_activity WHERE backend_type = 'client backend' \
                     GROUP BY 1, 2 ORDER BY 1, 2",
                    &[],
                )?;
                Ok((max.get::<_, i32>(0), rows))
            });
        match result {
            Ok((max, rows)) => {
                let mut groups = Vec::new();
                for r in &rows {
                    let (app, state, n): (String, String, i64) = (r.get(0), r.get(1), r.get(2));
                    table.push(vec![
                        name.clone(),
                        app.clone(),
                        state.clone(),
                        n.to_string(),
                        max.to_string(),
                    ]);
                    groups.push(json!({"application_name": app, "state": state, "count": n}));
                }
                let total: i64 = rows.iter().map(|r| r.get::<_, i64>(2)).sum();
                nodes.push(json!({"node": name, "max_connections": max, "total": total, "by_application_state": groups}));
            }
            Err(e) => {
                code = FAILED;
                table.push(vec![
                    name.clone(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    format!("error: {e}"),
                ]);
                nodes.push(json!({"node": name, "error": e.to_string()}));
            }
        }
    }
    emit(args, &json!({"nodes": nodes}), &table);
    Ok(code)
}

fn ssl(args: &Args) -> pgxkit::Result<u8> {
    let Some(cluster) = open(args, args.builder()?)? else {
        return Ok(UNHEALTHY);
    };
    let mut code = OK;
    let mut table = vec![
        ["node", "encrypted", "protocol", "cipher"]
            .map(String::from)
            .to_vec(),
    ];
    let mut nodes = Vec::new();
    for (stats, status) in cluster.stats().nodes.iter().zip(cluster.ssl_status()) {
        let name = stats.node.name().to_owned();
        match status {
            Ok(s) => {
                table.push(vec![
                    name.clone(),
                    s.encrypted.to_string(),
                    or_dash(s.version.clone()),
                    or_dash(s.cipher.clone()),
                ]);
                nodes.push(json!({"node": name, "encrypted": s.encrypted, "protocol": s.version, "cipher": s.cipher}));
            }
            Err(e) => {
                code = FAILED;
                table.push(vec![name.clone(), format!("error: {e}")]);
                nodes.push(json!({"node": name, "error": e.to_string()}));
            }
        }
    }
    emit(args, &json!({"nodes": nodes}), &table);
    Ok(code)
}
