//! Side-by-side benchmark: pgxkit against the baselines a user would
//! otherwise have, measured in the same run on the same server.
//!
//! ```sh
//! cargo run --release --example bench                       # full: 4 thread counts, 3 rounds, 2 s each
//! cargo run --release --example bench -- --secs 1 --rounds 1 --warmup 0 # quick look
//! cargo run --release --example bench -- --callgrind         # client instructions per query
//! cargo run --release --example bench -- --clients pgxkit,pgxkit-reads --threads 4,8
//! cargo run --release --example bench -- --checkout          # the pool alone, no statement
//! cargo run --release --example bench -- --sessions          # read-your-writes costs
//! cargo run --release --example bench -- --baseline /tmp/before/target/release/examples/bench
//!                                                            # this commit against another's build
//! ```
//!
//! Clients, each with one connection per thread at most:
//! - `prepared`: a `postgres::Client` per thread with a prepared statement
//!   (the driver's ceiling);
//! - `r2d2`: raw `r2d2_postgres` with default settings and `conn.query(sql)`
//!   (what a user writes without us; it pings on every checkout);
//! - `pgxkit`: a `Cluster` with default settings (max_conns 8), primary;
//! - `pgxkit+hook`: the same with one trivial `after_operation` hook;
//! - `pgxkit-reads`: `replica().query_one` over two replicas (default
//!   `ReadBalance::PerThread`);
//! - `pgxkit-reads-percall`: the same with `ReadBalance::PerCall`;
//! - `pgxkit-read1`: `replica().query_one` with one replica configured (reads
//!   from one node; the other replica still runs, so both layouts have the
//!   same server processes);
//! - `pgxkit-pinned`: each thread holds one pgxkit pooled connection for the
//!   whole run (`with_client`) and uses it exactly as `prepared` does: the
//!   difference to `prepared` is the connection and the process, the
//!   difference to `pgxkit` is pgxkit's per-query path;
//! - `pgbench`: `pgbench -M prepared` with the same query (libpq's ceiling).
//!
//! `client CPU µs/query`: user + system CPU of the client (every thread of
//! this process; for pgbench, of its process) per query, from `getrusage`.
//! `server CPU µs/query`: the same for every server process (primary and
//! replicas, their backends included), from `/proc`; it tells whether a
//! client's cost is its own or the server's.
//!
//! `--sessions`: what read-your-writes costs. Writes (`UPDATE` of a random
//! row) through the cluster against the same through a `Session` (which
//! then reads the primary's WAL position: the extra work per write); reads
//! (the point lookup) from `replica()` against a session whose position the
//! replicas have replayed (the extra work per read when the monitor already
//! knows); and write-then-read pairs, each pair in a new session, against
//! the same pair with the read on the primary (what a caller does without
//! sessions to read its own write).
//!
//! `--checkout`: checkouts per second with no statement (pgxkit's
//! `with_client` with an empty closure against r2d2's `get` without its
//! ping), to see the pool's own overhead and how it scales with threads.
//!
//! `--warmup SECS` (default 1): each thread of a cell runs queries this long
//! before the measured seconds (after 50 it always runs). On 2 cores shared
//! with the servers, a client thread and its backend take about a second
//! to end up on one CPU, and a 2 s cell straight after start-up measures
//! that as much as the client. pgbench cells get no warm-up (pgbench has
//! none).
//!
//! Ratios: `× pgxkit` is against pgxkit on the primary, `× read1` against
//! reads from one replica. `--clients a,b` runs only those clients (ratios to
//! clients left out print as `-`).
//!
//! Queries: `SELECT $1::int`, and a point lookup by primary key on a
//! 100,000-row table. Each cell is the median of the rounds; ratios are
//! medians of the per-round ratios. The machine is shared and noisy: read
//! ratios, not absolute numbers. Each measurement runs in a child process
//! of its own (as pgbench does), so no client inherits the heap, allocator
//! arenas or leftover threads of the clients measured before it.

use std::process::Command;
use std::sync::Arc;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use pgxkit::Cluster;
use pgxkit::testkit::LocalCluster;
use postgres::NoTls;

type AnyError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Client {
    Prepared,
    R2d2,
    Pgxkit,
    PgxkitHook,
    PgxkitReads,
    PgxkitReadsPerCall,
    PgxkitRead1,
    PgxkitPinned,
    Pgbench,
}

const CLIENTS: [Client; 9] = [
    Client::Prepared,
    Client::R2d2,
    Client::Pgxkit,
    Client::PgxkitHook,
    Client::PgxkitReads,
    Client::PgxkitReadsPerCall,
    Client::PgxkitRead1,
    Client::PgxkitPinned,
    Client::Pgbench,
];

impl Client {
    fn name(self) -> &'static str {
        match self {
            Client::Prepared => "prepared",
            Client::R2d2 => "r2d2",
            Client::Pgxkit => "pgxkit",
            Client::PgxkitHook => "pgxkit+hook",
            Client::PgxkitReads => "pgxkit-reads",
            Client::PgxkitReadsPerCall => "pgxkit-reads-percall",
            Client::PgxkitRead1 => "pgxkit-read1",
            Client::PgxkitPinned => "pgxkit-pinned",
            Client::Pgbench => "pgbench",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Query {
    Select1,
    PointLookup,
}

/// Every query, in the order of the report; a `--cell` child gets its index.
const QUERIES: [Query; 2] = [Query::Select1, Query::PointLookup];

impl Query {
    fn sql(self) -> &'static str {
        match self {
            Query::Select1 => "SELECT $1::int",
            Query::PointLookup => "SELECT v FROM bench WHERE id = $1",
        }
    }
    fn name(self) -> &'static str {
        match self {
            Query::Select1 => "SELECT $1::int",
            Query::PointLookup => "point lookup (100k rows)",
        }
    }
    fn pgbench_script(self) -> &'static str {
        match self {
            Query::Select1 => "\\set v random(1, 100000)\nSELECT :v::int;\n",
            Query::PointLookup => {
                "\\set id random(1, 100000)\nSELECT v FROM bench WHERE id = :id;\n"
            }
        }
    }
}

#[derive(Clone, Copy, Default)]
struct Cell {
    qps: f64,
    p50_us: f64,
    p99_us: f64,
    /// Client CPU (user + system, every thread of the client) per query.
    cpu_us: f64,
    /// Server CPU (every server process, replicas too) per query.
    server_us: f64,
}

/// CPU time used so far by this process (`who = RUSAGE_SELF`) or by its
/// waited-for children (`RUSAGE_CHILDREN`), in microseconds.
fn cpu_micros(who: libc::c_int) -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(who, &mut usage) } != 0 {
        return f64::NAN;
    }
    let micros = |t: libc::timeval| t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
    micros(usage.ru_utime) + micros(usage.ru_stime)
}

/// CPU time (user + system) used so far by the servers' process trees: each
/// postmaster, its live descendants, and the children they have reaped
/// (`cutime`, `cstime`), from `/proc`; 0 where `/proc` cannot be read.
fn server_cpu_micros(roots: &[u32]) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    // pid -> (parent, ticks); fields after "(comm) ": state ppid ... utime
    // stime cutime cstime at 0, 1, 11..=14.
    let procs: std::collections::HashMap<u32, (u32, u64)> = dir
        .filter_map(|e| {
            let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let fields: Vec<&str> = stat.rsplit_once(") ")?.1.split_whitespace().collect();
            let num = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok());
            let ticks = (11..=14).map(num).sum::<Option<u64>>()?;
            Some((pid, (u32::try_from(num(1)?).ok()?, ticks)))
        })
        .collect();
    let in_tree = |mut pid: u32| {
        for _ in 0..64 {
            if roots.contains(&pid) {
                return true;
            }
            match procs.get(&pid) {
                Some(&(parent, _)) if parent != 0 => pid = parent,
                _ => return false,
            }
        }
        false
    };
    let ticks: u64 = procs
        .iter()
        .filter(|(pid, _)| in_tree(**pid))
        .map(|(_, (_, t))| t)
        .sum();
    ticks as f64 / tick * 1e6
}

struct Setup {
    primary: String,
    replicas: Vec<String>,
    port: u16,
    pgbench: Option<std::path::PathBuf>,
    /// The postmasters' pids, for the server CPU column.
    servers: Vec<u32>,
    /// `--warmup`: passed to `--cell` children as `PGXKIT_BENCH_WARMUP`.
    warmup: Duration,
}

impl Setup {
    /// For a `--cell` child: one field per line.
    fn encode(&self) -> String {
        let pids: Vec<String> = self.servers.iter().map(u32::to_string).collect();
        [
            self.primary.clone(),
            self.replicas.join(" "),
            self.port.to_string(),
            pids.join(" "),
        ]
        .join("\n")
    }

    fn decode(text: &str) -> Result<Setup, AnyError> {
        let mut lines = text.lines();
        let mut next = |what: &str| {
            lines
                .next()
                .map(str::to_owned)
                .ok_or_else(|| format!("PGXKIT_BENCH_SETUP: no {what}"))
        };
        Ok(Setup {
            primary: next("primary")?,
            replicas: next("replicas")?
                .split_whitespace()
                .map(str::to_owned)
                .collect(),
            port: next("port")?.parse()?,
            pgbench: None,
            servers: next("server pids")?
                .split_whitespace()
                .map(str::parse)
                .collect::<Result<_, _>>()?,
            // A child reads it from its own variable (see `warmup`).
            warmup: Duration::ZERO,
        })
    }
}

/// `--cell CLIENT QUERY THREADS SECS` (QUERY 0 or 1): one cell, in this
/// fresh process, printed as `CELL qps p50 p99 cpu server`.
fn cell_child(args: &[String]) -> Result<(), AnyError> {
    let setup = Setup::decode(&std::env::var("PGXKIT_BENCH_SETUP")?)?;
    let client = *CLIENTS
        .iter()
        .find(|c| c.name() == args[2])
        .ok_or("--cell: unknown client")?;
    let query = *QUERIES
        .get(args[3].parse::<usize>()?)
        .ok_or("--cell: unknown query")?;
    let c = run(
        &setup,
        client,
        query,
        args[4].parse()?,
        seconds(&args[5]).ok_or("--cell: SECS is not a number of seconds")?,
    )?;
    println!(
        "CELL {} {} {} {} {}",
        c.qps, c.p50_us, c.p99_us, c.cpu_us, c.server_us
    );
    Ok(())
}

/// How long a `--cell` child may take beyond its measured duration.
const CELL_GRACE: Duration = Duration::from_secs(120);

/// One cell measured in a child process of its own (pgbench is one
/// anyway), so that no client runs in a process shaped by the clients
/// before it: their heaps, allocator arenas and leftover threads.
fn run_isolated(
    setup: &Setup,
    client: Client,
    query: Query,
    threads: usize,
    dur: Duration,
) -> Result<Cell, AnyError> {
    run_isolated_by(
        &std::env::current_exe()?,
        setup,
        client,
        query,
        threads,
        dur,
    )
}

/// [`run_isolated`] by the bench binary `exe` (this one, or `--baseline`'s
/// build of another commit, whose `--cell` speaks the same protocol).
fn run_isolated_by(
    exe: &std::path::Path,
    setup: &Setup,
    client: Client,
    query: Query,
    threads: usize,
    dur: Duration,
) -> Result<Cell, AnyError> {
    if client == Client::Pgbench {
        return run(setup, client, query, threads, dur);
    }
    let q = QUERIES.iter().position(|&q| q == query).unwrap_or(0);
    let mut child = Command::new(exe)
        .args(["--cell", client.name(), &q.to_string()])
        .arg(threads.to_string())
        .arg(dur.as_secs_f64().to_string())
        .env("PGXKIT_BENCH_SETUP", setup.encode())
        .env(
            "PGXKIT_BENCH_WARMUP",
            setup.warmup.as_secs_f64().to_string(),
        )
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    // Start-up, warm-up and the measured `dur` take seconds; a child still
    // running after this is stuck (a call that never returns: the clients
    // measured here have no statement timeout) and is killed. A worker that
    // fails early does not hold the others up (see `Start`): the child then
    // exits with its error, printed on stderr.
    let deadline = Instant::now() + dur + CELL_GRACE;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "{} cell did not finish within {:?}",
                client.name(),
                dur + CELL_GRACE
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // The child writes one short line: it fits the pipe, so it could not
    // block before exiting.
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut child.stdout.take().ok_or("no child stdout")?,
        &mut text,
    )?;
    let fields: Vec<f64> = text
        .lines()
        .find_map(|l| l.strip_prefix("CELL "))
        .ok_or_else(|| format!("{} cell failed ({status})", client.name()))?
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    match fields[..] {
        [qps, p50_us, p99_us, cpu_us, server_us] => Ok(Cell {
            qps,
            p50_us,
            p99_us,
            cpu_us,
            server_us,
        }),
        _ => Err(format!("{} cell: unexpected output {text:?}", client.name()).into()),
    }
}

fn main() -> Result<(), AnyError> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--loop") {
        return loop_for_callgrind(&args[2], args[3].parse()?);
    }
    if args.get(1).map(String::as_str) == Some("--cell") && args.len() == 6 {
        return cell_child(&args);
    }
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let secs = value("--secs")
        .map_or(Some(Duration::from_secs(2)), |v| seconds(&v))
        .ok_or("--secs: not a number of seconds")?;
    let rounds: usize = value("--rounds").map_or(Ok(3), |v| v.parse())?;
    let warmup = value("--warmup")
        .map_or(Some(Duration::from_secs(1)), |v| seconds(&v))
        .ok_or("--warmup: not a number of seconds")?;
    let threads: Vec<usize> = value("--threads")
        .unwrap_or_else(|| "1,2,4,8".into())
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let only: Option<Vec<String>> =
        value("--clients").map(|v| v.split(',').map(str::to_owned).collect());
    if let Some(names) = &only {
        for name in names {
            if !CLIENTS.iter().any(|c| c.name() == name) {
                return Err(format!("--clients: unknown client {name:?}").into());
            }
        }
    }
    let wanted = |c: Client| {
        only.as_ref()
            .is_none_or(|v| v.iter().any(|n| n == c.name()))
    };

    let local = LocalCluster::builder()
        .replicas(2)
        .setting("max_connections", "300")
        .setting("shared_buffers", "'128MB'")
        .start()?;
    let setup = Setup {
        primary: local.primary_dsn(),
        replicas: local.replica_dsns(),
        port: local.primary().port(),
        pgbench: Some(std::path::Path::new(&pgbench_path()).to_path_buf()).filter(|p| p.exists()),
        servers: std::iter::once(local.primary())
            .chain(local.replicas())
            .filter_map(|n| n.pid())
            .collect(),
        warmup,
    };
    let mut admin = local.primary().client()?;
    admin.batch_execute(
        "CREATE TABLE bench (id int PRIMARY KEY, v text NOT NULL);
         INSERT INTO bench SELECT i, md5(i::text) FROM generate_series(1, 100000) i;",
    )?;
    admin.batch_execute("VACUUM ANALYZE bench")?;
    local.wait_for_replicas_caught_up(Duration::from_secs(60))?;

    if args.iter().any(|a| a == "--callgrind") {
        return callgrind(&setup);
    }
    if args.iter().any(|a| a == "--checkout") {
        return checkout_only(&setup, &threads, rounds, secs);
    }
    if args.iter().any(|a| a == "--sessions") {
        return sessions(&setup, &threads, rounds, secs);
    }
    if let Some(baseline) = value("--baseline") {
        return against_baseline(
            std::path::Path::new(&baseline),
            &setup,
            &threads,
            rounds,
            secs,
        );
    }

    println!(
        "pgxkit benchmark: {} round(s) of {:?} per cell after {:?} of warm-up, threads {threads:?}, server on loopback",
        rounds, secs, warmup
    );
    for query in QUERIES {
        println!("\n## {}\n", query.name());
        println!(
            "| threads | client | queries/s | p50 µs | p99 µs | client CPU µs/query | server CPU µs/query | × prepared | × r2d2 | × pgxkit | × read1 | × pgbench |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
        for &t in &threads {
            // rounds × clients, interleaved so that noise spreads over all.
            let mut cells: Vec<Vec<Cell>> = vec![Vec::new(); CLIENTS.len()];
            for _ in 0..rounds {
                for (i, &client) in CLIENTS.iter().enumerate() {
                    if !wanted(client) || client == Client::Pgbench && setup.pgbench.is_none() {
                        continue;
                    }
                    cells[i].push(run_isolated(&setup, client, query, t, secs)?);
                }
            }
            let ratio = |i: usize, base: Client| -> String {
                let base = CLIENTS.iter().position(|&c| c == base).unwrap_or(i);
                let r: Vec<f64> = cells[i]
                    .iter()
                    .zip(&cells[base])
                    .map(|(a, b)| a.qps / b.qps)
                    .collect();
                if r.is_empty() {
                    "-".into()
                } else {
                    format!("{:.2}", median(r))
                }
            };
            for (i, client) in CLIENTS.iter().enumerate() {
                if cells[i].is_empty() {
                    continue;
                }
                let qps = median(cells[i].iter().map(|c| c.qps).collect());
                let p50 = median(cells[i].iter().map(|c| c.p50_us).collect());
                let p99 = median(cells[i].iter().map(|c| c.p99_us).collect());
                let cpu = median(cells[i].iter().map(|c| c.cpu_us).collect());
                let server = median(cells[i].iter().map(|c| c.server_us).collect());
                let lat = |v: f64| {
                    if v > 0.0 {
                        format!("{v:.0}")
                    } else {
                        "-".into()
                    }
                };
                println!(
                    "| {t} | {} | {qps:.0} | {} | {} | {cpu:.1} | {server:.1} | {} | {} | {} | {} | {} |",
                    client.name(),
                    lat(p50),
                    lat(p99),
                    ratio(i, Client::Prepared),
                    ratio(i, Client::R2d2),
                    ratio(i, Client::Pgxkit),
                    ratio(i, Client::PgxkitRead1),
                    ratio(i, Client::Pgbench),
                );
            }
        }
    }
    Ok(())
}

/// `--baseline EXE`: pgxkit's clients built by this commit against the same
/// clients built by another (`EXE`, that commit's `examples/bench`), cell
/// by cell in alternation on the same servers: queries/s of each and the
/// median of the per-round ratios (this / baseline). What a change on the
/// query path is judged by.
fn against_baseline(
    baseline: &std::path::Path,
    setup: &Setup,
    threads: &[usize],
    rounds: usize,
    secs: Duration,
) -> Result<(), AnyError> {
    let this = std::env::current_exe()?;
    println!(
        "this build against {}: {rounds} round(s) of {secs:?} per cell, alternating",
        baseline.display()
    );
    println!("\n| query | threads | client | baseline queries/s | this queries/s | × baseline |");
    println!("|---|---|---|---|---|---|");
    for query in QUERIES {
        for &t in threads {
            for client in [Client::Pgxkit, Client::PgxkitReads] {
                let (mut before, mut after, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
                for round in 0..rounds {
                    // Alternate which goes first, so neither always runs on
                    // a machine the other has just warmed.
                    let mut pair = [(baseline, 0.0), (this.as_path(), 0.0)];
                    if round % 2 == 1 {
                        pair.reverse();
                    }
                    for (exe, qps) in &mut pair {
                        *qps = run_isolated_by(exe, setup, client, query, t, secs)?.qps;
                    }
                    let (b, a) = if round % 2 == 1 {
                        (pair[1].1, pair[0].1)
                    } else {
                        (pair[0].1, pair[1].1)
                    };
                    before.push(b);
                    after.push(a);
                    ratios.push(a / b);
                }
                println!(
                    "| {} | {t} | {} | {:.0} | {:.0} | {:.3} |",
                    query.name(),
                    client.name(),
                    median(before),
                    median(after),
                    median(ratios)
                );
            }
        }
    }
    Ok(())
}

/// `--checkout`: the pool alone, no statement: each thread checks a
/// connection out and gives it back, as fast as it can. pgxkit
/// (`with_client` with an empty closure: in-flight count, breaker,
/// checkout, return) against raw r2d2 (`get` and drop, without its
/// checkout ping, so both do no round trip), medians over
/// `rounds`, and the ratio per round.
fn checkout_only(
    setup: &Setup,
    threads: &[usize],
    rounds: usize,
    dur: Duration,
) -> Result<(), AnyError> {
    println!(
        "pool checkout + return, no statement: {rounds} round(s) of {} s per cell\n",
        dur.as_secs_f64()
    );
    println!("| threads | r2d2 checkouts/s | pgxkit checkouts/s | pgxkit × r2d2 |");
    println!("|---|---|---|---|");
    for &t in threads {
        let (mut raw, mut ours, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            let manager =
                r2d2_postgres::PostgresConnectionManager::new(setup.primary.parse()?, NoTls);
            let pool = r2d2::Pool::builder()
                .max_size(8)
                .test_on_check_out(false)
                .build(manager)?;
            let a = spin(t, dur, move || pool.get().map(drop).map_err(Into::into))?;
            let cluster = Cluster::builder()
                .primary(&setup.primary)
                .max_conns(8)
                .build()?;
            let b = spin(t, dur, move || {
                cluster
                    .with_client(|_| Ok::<_, pgxkit::Error>(()))
                    .map_err(Into::into)
            })?;
            raw.push(a);
            ours.push(b);
            ratio.push(b / a);
        }
        println!(
            "| {t} | {:.0} | {:.0} | {:.2} |",
            median(raw),
            median(ours),
            median(ratio)
        );
    }
    Ok(())
}

/// Read-your-writes costs (see `--sessions` in the module's doc).
fn sessions(
    setup: &Setup,
    threads: &[usize],
    rounds: usize,
    dur: Duration,
) -> Result<(), AnyError> {
    println!(
        "read-your-writes sessions: {rounds} round(s) of {} s per cell, two replicas\n",
        dur.as_secs_f64()
    );
    println!(
        "| threads | writes/s | session writes/s | × | replica reads/s | session reads/s (replayed) | × | write + primary read pairs/s | session pairs/s | × |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    const WRITE: &str = "UPDATE bench SET v = v WHERE id = $1";
    const READ: &str = "SELECT v FROM bench WHERE id = $1";
    for &t in threads {
        let mut cols: Vec<Vec<f64>> = vec![Vec::new(); 6];
        for _ in 0..rounds {
            let cluster = setup
                .replicas
                .iter()
                .fold(Cluster::builder().primary(&setup.primary), |b, r| {
                    b.replica(r)
                })
                .build()?;
            // A position both replicas have replayed (the monitor's next
            // probe sees it there).
            let old = cluster.session();
            old.execute(WRITE, &[&1i32])?;
            let token = old.token().ok_or("no position")?;
            let id = || fastrand::i32(1..=100_000);
            let c = cluster.clone();
            let plain_write = move || c.execute(WRITE, &[&id()]).map(drop).map_err(Into::into);
            let c = cluster.clone();
            let session_write = move || {
                c.session()
                    .execute(WRITE, &[&id()])
                    .map(drop)
                    .map_err(Into::into)
            };
            let c = cluster.clone();
            let replica_read = move || {
                c.replica()
                    .query_one(READ, &[&id()])
                    .map(drop)
                    .map_err(Into::into)
            };
            let c = cluster.clone();
            let tok = token.clone();
            let session_read = move || {
                c.session_from_token(&tok)?.query_one(READ, &[&id()])?;
                Ok(())
            };
            let c = cluster.clone();
            let primary_pair = move || {
                let k = id();
                c.execute(WRITE, &[&k])?;
                c.query_one(READ, &[&k])?;
                Ok(())
            };
            let c = cluster.clone();
            let session_pair = move || {
                let k = id();
                let s = c.session();
                s.execute(WRITE, &[&k])?;
                s.query_one(READ, &[&k])?;
                Ok(())
            };
            let results = [
                spin(t, dur, plain_write)?,
                spin(t, dur, session_write)?,
                spin(t, dur, replica_read)?,
                spin(t, dur, session_read)?,
                spin(t, dur, primary_pair)?,
                spin(t, dur, session_pair)?,
            ];
            for (col, r) in cols.iter_mut().zip(results) {
                col.push(r);
            }
        }
        let ratio =
            |a: usize, b: usize| median(cols[b].iter().zip(&cols[a]).map(|(x, y)| x / y).collect());
        println!(
            "| {t} | {:.0} | {:.0} | {:.2} | {:.0} | {:.0} | {:.2} | {:.0} | {:.0} | {:.2} |",
            median(cols[0].clone()),
            median(cols[1].clone()),
            ratio(0, 1),
            median(cols[2].clone()),
            median(cols[3].clone()),
            ratio(2, 3),
            median(cols[4].clone()),
            median(cols[5].clone()),
            ratio(4, 5),
        );
    }
    Ok(())
}

/// Calls `op` on `threads` threads for `dur` (after 100 calls each to warm
/// up); calls per second.
fn spin(
    threads: usize,
    dur: Duration,
    op: impl Fn() -> Result<(), AnyError> + Send + Sync + 'static,
) -> Result<f64, AnyError> {
    let op = Arc::new(op);
    let start = Arc::new(Barrier::new(threads + 1));
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (op, start) = (Arc::clone(&op), Start::new(&start));
            std::thread::spawn(move || -> Result<u64, AnyError> {
                for _ in 0..100 {
                    op()?;
                }
                start.arrive();
                let until = Instant::now() + dur;
                let mut n = 0u64;
                while Instant::now() < until {
                    for _ in 0..64 {
                        op()?;
                    }
                    n += 64;
                }
                Ok(n)
            })
        })
        .collect();
    start.wait();
    let began = Instant::now();
    let mut total = 0;
    for w in workers {
        total += w.join().map_err(|_| "worker panicked")??;
    }
    Ok(total as f64 / began.elapsed().as_secs_f64())
}

fn pgbench_path() -> String {
    Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .map(|o| format!("{}/pgbench", String::from_utf8_lossy(&o.stdout).trim()))
        .unwrap_or_else(|| "/usr/lib/postgresql/15/bin/pgbench".into())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Runs `threads` workers of `client` for `dur`; queries/s and latency percentiles.
fn run(
    setup: &Setup,
    client: Client,
    query: Query,
    threads: usize,
    dur: Duration,
) -> Result<Cell, AnyError> {
    if client == Client::Pgbench {
        return pgbench(setup, query, threads, dur);
    }
    let cluster = match client {
        Client::Pgxkit
        | Client::PgxkitHook
        | Client::PgxkitReads
        | Client::PgxkitReadsPerCall
        | Client::PgxkitRead1
        | Client::PgxkitPinned => {
            let mut b = Cluster::builder().primary(&setup.primary).max_conns(8);
            let replicas = if client == Client::PgxkitRead1 {
                1
            } else {
                setup.replicas.len()
            };
            for r in setup.replicas.iter().take(replicas) {
                b = b.replica(r.clone());
            }
            if client == Client::PgxkitReadsPerCall {
                b = b.read_balance(pgxkit::ReadBalance::PerCall);
            }
            if client == Client::PgxkitHook {
                b = b.after_operation(|op| {
                    std::hint::black_box(op.duration());
                    Ok(())
                });
            }
            Some(b.build()?)
        }
        _ => None,
    };
    let r2d2 = if client == Client::R2d2 {
        let manager = r2d2_postgres::PostgresConnectionManager::new(setup.primary.parse()?, NoTls);
        Some(r2d2::Pool::new(manager)?)
    } else {
        None
    };
    let start = Arc::new(Barrier::new(threads + 1));
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let (cluster, r2d2, start) = (cluster.clone(), r2d2.clone(), Start::new(&start));
            let primary = setup.primary.clone();
            std::thread::spawn(move || -> Result<Vec<u32>, AnyError> {
                let sql = query.sql();
                let mut direct = match client {
                    Client::Prepared => {
                        let mut c: postgres::Client =
                            primary.parse::<postgres::Config>()?.connect(NoTls)?;
                        let stmt = c.prepare(sql)?;
                        Some((c, stmt))
                    }
                    _ => None,
                };
                let first_id = 1 + (t as i32 * 7919) % 100_000;
                if client == Client::PgxkitPinned {
                    let cluster = cluster.as_ref().ok_or("no cluster")?;
                    let mut lat = None;
                    cluster.with_client(|c| -> pgxkit::Result<_> {
                        let stmt = c.prepare(sql)?;
                        lat = Some(measure(&start, dur, first_id, &mut |id| {
                            c.query_one(&stmt, &[&id])?;
                            Ok(())
                        }));
                        Ok(())
                    })?;
                    return lat.ok_or("with_client did not run")?;
                }
                let mut one = |id: i32| -> Result<(), AnyError> {
                    match client {
                        Client::Prepared => {
                            let (c, stmt) = direct.as_mut().ok_or("no client")?;
                            c.query_one(&*stmt, &[&id])?;
                        }
                        Client::R2d2 => {
                            let mut conn = r2d2.as_ref().ok_or("no pool")?.get()?;
                            conn.query(sql, &[&id])?;
                        }
                        Client::Pgxkit | Client::PgxkitHook => {
                            cluster
                                .as_ref()
                                .ok_or("no cluster")?
                                .query_one(sql, &[&id])?;
                        }
                        Client::PgxkitReads | Client::PgxkitReadsPerCall | Client::PgxkitRead1 => {
                            cluster
                                .as_ref()
                                .ok_or("no cluster")?
                                .replica()
                                .query_one(sql, &[&id])?;
                        }
                        Client::PgxkitPinned | Client::Pgbench => {}
                    }
                    Ok(())
                };
                measure(&start, dur, first_id, &mut one)
            })
        })
        .collect();
    start.wait();
    // Every worker is past its warm-up.
    let cpu_before = cpu_micros(libc::RUSAGE_SELF);
    let server_before = server_cpu_micros(&setup.servers);
    let began = Instant::now();
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.join().map_err(|_| "worker panicked")??);
    }
    let elapsed = began.elapsed().as_secs_f64();
    let cpu = cpu_micros(libc::RUSAGE_SELF) - cpu_before;
    let server = server_cpu_micros(&setup.servers) - server_before;
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    Ok(Cell {
        qps: all.len() as f64 / elapsed,
        p50_us: f64::from(pct(0.50)),
        p99_us: f64::from(pct(0.99)),
        cpu_us: cpu / all.len().max(1) as f64,
        server_us: server / all.len().max(1) as f64,
    })
}

/// A worker's place at the start barrier: it arrives once, either when it
/// is ready or, if it fails or panics before that, when this is dropped, so
/// the other workers and the parent are never left waiting for it (the
/// failure then comes back through `join`).
struct Start {
    barrier: Arc<Barrier>,
    arrived: std::cell::Cell<bool>,
}

impl Start {
    fn new(barrier: &Arc<Barrier>) -> Self {
        Start {
            barrier: Arc::clone(barrier),
            arrived: std::cell::Cell::new(false),
        }
    }

    /// Waits for everyone else (once; later calls return at once).
    fn arrive(&self) {
        if !self.arrived.replace(true) {
            self.barrier.wait();
        }
    }
}

impl Drop for Start {
    fn drop(&mut self) {
        self.arrive();
    }
}

/// One worker's part of a cell: 50 calls of `one` to warm up (connections
/// open, statements prepared), then, once every worker is ready, calls for
/// `dur`; the latency of each, in µs.
/// Warm-up beyond the first 50 queries of each thread:
/// `PGXKIT_BENCH_WARMUP` seconds (a `--cell` child gets `--warmup`'s), else
/// none.
fn warmup() -> Result<Duration, AnyError> {
    match std::env::var("PGXKIT_BENCH_WARMUP") {
        Ok(v) => seconds(&v)
            .ok_or_else(|| format!("PGXKIT_BENCH_WARMUP: not a number of seconds: {v:?}").into()),
        Err(_) => Ok(Duration::ZERO),
    }
}

/// A non-negative number of seconds.
fn seconds(text: &str) -> Option<Duration> {
    text.parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
}

fn measure(
    start: &Start,
    dur: Duration,
    first_id: i32,
    one: &mut dyn FnMut(i32) -> Result<(), AnyError>,
) -> Result<Vec<u32>, AnyError> {
    let mut id = first_id;
    let warm = warmup().and_then(|extra| {
        (0..50).try_for_each(|_| one(id))?;
        let until = Instant::now() + extra;
        while Instant::now() < until {
            one(id)?;
        }
        Ok(())
    });
    // Arrive even after a failure (the error is returned below) so the
    // measured time starts for everyone together.
    start.arrive();
    warm?;
    let until = Instant::now() + dur;
    let mut lat = Vec::with_capacity(100_000);
    loop {
        let t0 = Instant::now();
        if t0 >= until {
            break;
        }
        id = id % 100_000 + 1;
        one(id)?;
        lat.push(u32::try_from(t0.elapsed().as_micros()).unwrap_or(u32::MAX));
    }
    Ok(lat)
}

fn pgbench(setup: &Setup, query: Query, threads: usize, dur: Duration) -> Result<Cell, AnyError> {
    let script = std::env::temp_dir().join(format!("pgxkit-bench-{}.sql", std::process::id()));
    std::fs::write(&script, query.pgbench_script())?;
    // The servers are children too, but are not waited for until the end.
    let cpu_before = cpu_micros(libc::RUSAGE_CHILDREN);
    let server_before = server_cpu_micros(&setup.servers);
    let out = Command::new(setup.pgbench.as_ref().ok_or("no pgbench")?)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &setup.port.to_string(),
            "-U",
            "postgres",
            "-n",
            "-M",
            "prepared",
        ])
        .args(["-c", &threads.to_string(), "-j", &threads.to_string()])
        .args(["-T", &format!("{}", dur.as_secs().max(1))])
        .arg("-f")
        .arg(&script)
        .arg("postgres")
        .output()?;
    let _ = std::fs::remove_file(&script);
    let text = String::from_utf8_lossy(&out.stdout);
    let tps = text
        .lines()
        .find(|l| l.starts_with("tps ="))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse::<f64>().ok())
        .ok_or_else(|| {
            format!(
                "no tps in pgbench output: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    let cpu = cpu_micros(libc::RUSAGE_CHILDREN) - cpu_before;
    let server = server_cpu_micros(&setup.servers) - server_before;
    let queries = text
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|v| v.split('/').next()?.trim().parse::<f64>().ok());
    Ok(Cell {
        qps: tps,
        cpu_us: queries.map_or(0.0, |n| cpu / n.max(1.0)),
        server_us: queries.map_or(0.0, |n| server / n.max(1.0)),
        ..Cell::default()
    })
}

/// `--loop CLIENT N`: N queries on one thread against `PGXKIT_BENCH_DSN`,
/// for callgrind (nothing else runs in the process meanwhile).
fn loop_for_callgrind(client: &str, n: u32) -> Result<(), AnyError> {
    let dsn = std::env::var("PGXKIT_BENCH_DSN")?;
    match client {
        "prepared" => {
            let mut c: postgres::Client = dsn.parse::<postgres::Config>()?.connect(NoTls)?;
            let stmt = c.prepare("SELECT $1::int")?;
            for i in 0..n as i32 {
                c.query_one(&stmt, &[&i])?;
            }
        }
        "pgxkit" | "pgxkit-hook" | "pgxkit-deadline" => {
            let mut builder = Cluster::builder()
                .primary(dsn)
                .health_check_period(Duration::from_secs(86_400));
            if client == "pgxkit-hook" {
                builder = builder.after_operation(|op| {
                    std::hint::black_box(op.duration());
                    Ok(())
                });
            }
            let mut cluster = builder.build()?;
            if client == "pgxkit-deadline" {
                cluster = cluster.with_timeout(Duration::from_secs(10));
            }
            for i in 0..n as i32 {
                cluster.query_one("SELECT $1::int", &[&i])?;
            }
        }
        "pgxkit-pinned" => {
            let cluster = Cluster::builder()
                .primary(dsn)
                .health_check_period(Duration::from_secs(86_400))
                .build()?;
            cluster.with_client(|c| -> pgxkit::Result<_> {
                let stmt = c.prepare("SELECT $1::int")?;
                for i in 0..n as i32 {
                    c.query_one(&stmt, &[&i])?;
                }
                Ok(())
            })?;
        }
        other => return Err(format!("unknown client {other}").into()),
    }
    Ok(())
}

/// Client instructions per query, from two callgrind runs of different
/// lengths (the difference cancels start-up costs).
fn callgrind(setup: &Setup) -> Result<(), AnyError> {
    let exe = std::env::current_exe()?;
    let (short, long) = (2_000u32, 12_000u32);
    // Per client: (instructions, simulated L1i misses) per query.
    let mut per_query = Vec::new();
    for client in [
        "prepared",
        "pgxkit-pinned",
        "pgxkit",
        "pgxkit-hook",
        "pgxkit-deadline",
    ] {
        let mut totals = Vec::new();
        for n in [short, long] {
            let out_file = std::env::temp_dir().join(format!("pgxkit-callgrind-{client}-{n}.out"));
            let status = Command::new("valgrind")
                .arg("--tool=callgrind")
                .arg("--cache-sim=yes")
                .arg(format!("--callgrind-out-file={}", out_file.display()))
                .arg(&exe)
                .args(["--loop", client, &n.to_string()])
                .env("PGXKIT_BENCH_DSN", &setup.primary)
                .stderr(std::process::Stdio::null())
                .status()?;
            if !status.success() {
                return Err(format!("valgrind failed for {client} {n}").into());
            }
            let text = std::fs::read_to_string(&out_file)?;
            let _ = std::fs::remove_file(&out_file);
            totals.push(callgrind_totals(&text).ok_or("no totals in the callgrind output")?);
        }
        let per = |i: usize| (totals[1][i] - totals[0][i]) as f64 / f64::from(long - short);
        let (ir, i1) = (per(0), per(1));
        println!(
            "{client}: {ir:.0} instructions and {i1:.0} L1i misses (simulated) per query \
             (callgrind, whole process)"
        );
        per_query.push((ir, i1));
    }
    let [prepared, pinned, pgxkit, hook, deadline] = per_query[..] else {
        return Err("callgrind: a client is missing".into());
    };
    println!(
        "pgxkit / prepared postgres::Client: {:.3}x instructions, {:+.0} L1i misses per query",
        pgxkit.0 / prepared.0,
        pgxkit.1 - prepared.1
    );
    println!(
        "pgxkit / pgxkit-pinned (pgxkit's per-query path): {:.3}x instructions, {:+.0} L1i misses",
        pgxkit.0 / pinned.0,
        pgxkit.1 - pinned.1
    );
    println!(
        "one trivial after_operation hook: {:+.1}% instructions per query",
        (hook.0 / pgxkit.0 - 1.0) * 100.0
    );
    println!(
        "a deadline (with_timeout) on every query: {:+.1}% instructions per query",
        (deadline.0 / pgxkit.0 - 1.0) * 100.0
    );
    Ok(())
}

/// Instructions (`Ir`) and L1 instruction-cache misses (`I1mr`) of a whole
/// callgrind run, from its `events:` and `summary:` (or `totals:`) lines.
fn callgrind_totals(text: &str) -> Option<[u64; 2]> {
    let events: Vec<&str> = text
        .lines()
        .find_map(|l| l.strip_prefix("events:"))?
        .split_whitespace()
        .collect();
    let values: Vec<u64> = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("summary:")
                .or_else(|| l.strip_prefix("totals:"))
        })?
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    let at = |name: &str| {
        events
            .iter()
            .position(|e| *e == name)
            .and_then(|i| values.get(i).copied())
    };
    Some([at("Ir")?, at("I1mr")?])
}
