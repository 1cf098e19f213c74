//! The testkit against real PostgreSQL servers: replication, crash and
//! restart, replay lag, promotion, clean-up, and bad input.

use std::net::{Ipv4Addr, TcpListener};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pgxkit::testkit::{LocalCluster, LocalNode};

const CATCH_UP: Duration = Duration::from_secs(30);

fn count(node: &LocalNode, sql: &str) -> i64 {
    node.client().unwrap().query_one(sql, &[]).unwrap().get(0)
}

fn lsn_behind(replica: &LocalNode, primary: &LocalNode) -> i64 {
    let primary_lsn: String = primary
        .client()
        .unwrap()
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .unwrap()
        .get(0);
    replica
        .client()
        .unwrap()
        .query_one(
            "SELECT pg_wal_lsn_diff($1::text::pg_lsn, pg_last_wal_replay_lsn())::bigint",
            &[&primary_lsn],
        )
        .unwrap()
        .get(0)
}

#[test]
fn a_row_written_on_the_primary_is_read_on_every_replica() {
    let cluster = LocalCluster::start(2).unwrap();
    assert_eq!(cluster.replica_dsns().len(), 2);
    cluster
        .primary()
        .client()
        .unwrap()
        .batch_execute("CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 100)")
        .unwrap();
    cluster.wait_for_replicas_caught_up(CATCH_UP).unwrap();
    for replica in cluster.replicas() {
        assert_eq!(
            count(replica, "SELECT count(*) FROM t"),
            100,
            "{}",
            replica.name()
        );
        let in_recovery: bool = replica
            .client()
            .unwrap()
            .query_one("SELECT pg_is_in_recovery()", &[])
            .unwrap()
            .get(0);
        assert!(in_recovery, "{} should be a standby", replica.name());
    }
}

#[test]
fn a_killed_replica_rejoins_and_streams_again() {
    let cluster = LocalCluster::start(1).unwrap();
    let replica = &cluster.replicas()[0];
    let pid = replica.pid().unwrap();
    replica.kill().unwrap();
    assert!(!replica.is_running());
    assert!(
        replica.client().is_err(),
        "a killed server must refuse connections"
    );
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists() || !is_live(pid));

    // Written while the replica was down: it must fetch this after restart.
    cluster
        .primary()
        .client()
        .unwrap()
        .batch_execute("CREATE TABLE after_crash AS SELECT 1 AS x")
        .unwrap();
    replica.start().unwrap();
    cluster.wait_for_replicas_caught_up(CATCH_UP).unwrap();
    assert_eq!(count(replica, "SELECT count(*) FROM after_crash"), 1);
    let streaming = count(
        cluster.primary(),
        "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
    );
    assert_eq!(streaming, 1);
}

fn is_live(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

#[test]
fn paused_replay_makes_real_lag_and_resume_catches_up() {
    let cluster = LocalCluster::start(1).unwrap();
    let primary = cluster.primary();
    let replica = &cluster.replicas()[0];
    replica.pause_replay().unwrap();
    primary
        .client()
        .unwrap()
        .batch_execute("CREATE TABLE lag AS SELECT generate_series(1, 10000) AS x")
        .unwrap();
    // Paused: the replica receives but does not apply, so it stays behind.
    assert!(lsn_behind(replica, primary) > 0);
    let visible = count(
        replica,
        "SELECT count(*) FROM pg_class WHERE relname = 'lag'",
    );
    assert_eq!(visible, 0, "a paused replica must not show the new table");

    replica.resume_replay().unwrap();
    cluster.wait_for_replicas_caught_up(CATCH_UP).unwrap();
    assert!(lsn_behind(replica, primary) <= 0);
    assert_eq!(count(replica, "SELECT count(*) FROM lag"), 10000);
}

#[test]
fn a_promoted_replica_accepts_writes() {
    let cluster = LocalCluster::start(1).unwrap();
    let replica = &cluster.replicas()[0];
    let write = |node: &LocalNode| {
        node.client()
            .unwrap()
            .batch_execute("CREATE TABLE w (x int)")
    };
    assert!(write(replica).is_err(), "a standby must refuse writes");
    replica.promote().unwrap();
    write(replica).unwrap();
    let in_recovery: bool = replica
        .client()
        .unwrap()
        .query_one("SELECT pg_is_in_recovery()", &[])
        .unwrap()
        .get(0);
    assert!(!in_recovery);
}

#[test]
fn stop_start_and_restart_keep_the_data() {
    let cluster = LocalCluster::start(0).unwrap();
    let primary = cluster.primary();
    primary
        .client()
        .unwrap()
        .batch_execute("CREATE TABLE kept (x int); INSERT INTO kept VALUES (1)")
        .unwrap();
    primary.stop().unwrap();
    assert!(primary.client().is_err());
    primary.start().unwrap();
    primary.restart().unwrap();
    assert_eq!(count(primary, "SELECT count(*) FROM kept"), 1);
    assert!(cluster.node(1).is_none());
    assert_eq!(cluster.node(0).unwrap().port(), primary.port());
}

#[test]
fn a_frozen_server_answers_nothing_until_thawed() {
    let cluster = LocalCluster::start(0).unwrap();
    let primary = cluster.primary();
    let mut client = primary.client().unwrap();
    primary.freeze().unwrap();
    assert!(primary.is_frozen() && primary.is_running());
    let (tx, rx) = std::sync::mpsc::channel();
    let worker = std::thread::spawn(move || {
        let _ = tx.send(
            client
                .query_one("SELECT 1", &[])
                .map(|r| r.get::<_, i32>(0)),
        );
    });
    // Sent, acknowledged by the kernel, and not answered.
    assert!(rx.recv_timeout(Duration::from_millis(500)).is_err());
    primary.thaw().unwrap();
    assert!(!primary.is_frozen());
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap(),
        1
    );
    worker.join().unwrap();
    // A frozen server still stops (it is thawed first).
    primary.freeze().unwrap();
    let started = Instant::now();
    primary.stop().unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(!primary.is_running());
}

#[test]
fn fault_proxies_sit_in_front_of_every_node() {
    use pgxkit::testkit::Fault;
    let cluster = LocalCluster::builder()
        .replicas(1)
        .fault_proxies(true)
        .start()
        .unwrap();
    let port_of = |dsn: &str| -> i32 {
        let mut client = pgxkit::postgres::Client::connect(dsn, pgxkit::postgres::NoTls).unwrap();
        client
            .query_one("SELECT inet_server_port()", &[])
            .unwrap()
            .get(0)
    };
    // Through the proxies, to the right servers.
    assert_ne!(cluster.primary_dsn(), cluster.primary().dsn());
    assert_eq!(
        port_of(&cluster.primary_dsn()),
        i32::from(cluster.primary().port())
    );
    let replica_dsn = cluster.replica_dsns()[0].clone();
    assert_eq!(
        port_of(&replica_dsn),
        i32::from(cluster.replicas()[0].port())
    );
    assert!(cluster.proxy(2).is_none());
    cluster.proxy(1).unwrap().set(Fault::Refuse);
    assert!(pgxkit::postgres::Client::connect(&replica_dsn, pgxkit::postgres::NoTls).is_err());
    // Without the option, no proxies.
    let plain = LocalCluster::start(0).unwrap();
    assert!(plain.proxy(0).is_none());
    assert_eq!(plain.primary_dsn(), plain.primary().dsn());
}

/// What a dropped cluster must leave no trace of.
struct Traces {
    dir: PathBuf,
    pids: Vec<u32>,
}

fn traces(cluster: &LocalCluster) -> Traces {
    let mut pids: Vec<u32> = cluster.nodes().iter().filter_map(LocalNode::pid).collect();
    // The backends and helpers too, not only the postmasters.
    for node in cluster.nodes() {
        let postmaster = node.pid().unwrap();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let ppid = stat
                .rsplit(')')
                .next()
                .unwrap()
                .split_whitespace()
                .nth(1)
                .unwrap();
            if ppid == postmaster.to_string() {
                pids.push(pid);
            }
        }
    }
    assert!(
        pids.len() > cluster.nodes().len(),
        "expected backends beside the postmasters"
    );
    Traces {
        dir: cluster.dir().to_path_buf(),
        pids,
    }
}

fn assert_no_traces(t: &Traces) {
    // Drop waits for the processes to exit, so this holds at once.
    let live: Vec<u32> = t.pids.iter().copied().filter(|&p| is_live(p)).collect();
    assert!(live.is_empty(), "processes left behind: {live:?}");
    assert!(
        !t.dir.exists(),
        "directory left behind: {}",
        t.dir.display()
    );
}

#[test]
fn drop_leaves_no_process_and_no_directory() {
    let cluster = LocalCluster::start(1).unwrap();
    let t = traces(&cluster);
    assert!(t.dir.exists());
    drop(cluster);
    assert_no_traces(&t);
}

#[test]
fn a_panicking_test_still_cleans_up() {
    let seen: Mutex<Option<Traces>> = Mutex::new(None);
    let outcome = std::panic::catch_unwind(|| {
        let cluster = LocalCluster::start(1).unwrap();
        *seen.lock().unwrap() = Some(traces(&cluster));
        panic!("the test body fails");
    });
    assert!(outcome.is_err());
    assert_no_traces(seen.lock().unwrap().as_ref().unwrap());
}

#[test]
fn a_missing_binaries_dir_is_a_clear_error() {
    let err = LocalCluster::builder()
        .bin_dir("/nonexistent/pg/bin")
        .start()
        .unwrap_err();
    assert_eq!(err.step(), "find binaries");
    let text = err.to_string();
    assert!(
        text.contains("/nonexistent/pg/bin") && text.contains("apt-get install postgresql"),
        "{text}"
    );
}

#[test]
fn an_unwritable_temp_root_is_a_clear_error() {
    // A path below a regular file cannot be created, even by root.
    let file = tempfile::NamedTempFile::new().unwrap();
    let root = file.path().join("sub");
    let started = Instant::now();
    let err = LocalCluster::builder()
        .temp_root(&root)
        .start()
        .unwrap_err();
    assert_eq!(err.step(), "create directory");
    assert!(err.to_string().contains(&*root.to_string_lossy()), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_port_in_use_is_a_clear_error() {
    let taken = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = taken.local_addr().unwrap().port();
    let started = Instant::now();
    let err = LocalCluster::builder().port(port).start().unwrap_err();
    assert_eq!(err.step(), "choose ports");
    assert_eq!(err.node(), Some("primary"));
    assert!(err.to_string().contains(&format!("port {port}")), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_server_that_cannot_start_reports_its_log() {
    // An invalid setting makes the postmaster exit at once: the error must
    // come quickly and carry the server's own complaint.
    let started = Instant::now();
    let err = LocalCluster::builder()
        .setting("shared_buffers", "'not a size'")
        .start()
        .unwrap_err();
    assert_eq!(err.step(), "start");
    assert_eq!(err.node(), Some("primary"));
    assert!(
        err.log_tail().unwrap_or("").contains("shared_buffers"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
}

/// Whether `pid` is a live process (a zombie counts as gone).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let state = stat[stat.rfind(')').unwrap() + 1..]
            .split_whitespace()
            .next();
        state != Some("Z")
    })
}

/// A process killed while it owns a cluster (SIGKILL: no destructor runs)
/// leaves its server running; the next start under the same temporary root
/// stops it and removes the directory.
#[test]
fn a_cluster_orphaned_by_a_killed_process_is_reaped_by_the_next_start() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::fs::PermissionsExt;
    use std::process::{Command, Stdio};

    const CHILD: &str = "PGXKIT_ORPHAN_CHILD_ROOT";
    const NAME: &str = "a_cluster_orphaned_by_a_killed_process_is_reaped_by_the_next_start";
    if let Ok(root) = std::env::var(CHILD) {
        let local = LocalCluster::builder().temp_root(root).start().unwrap();
        println!("ORPHAN-READY {}", local.dir().display());
        // The parent kills this process long before the sleep ends.
        std::thread::sleep(Duration::from_secs(60));
        return;
    }
    let root = tempfile::Builder::new()
        .prefix("orphan-test-")
        .tempdir()
        .unwrap();
    // The server's OS user must reach the cluster directory below it.
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
        .env(CHILD, root.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // The harness's "test NAME ... " precedes it on the same line.
            if let Some((_, dir)) = line.split_once("ORPHAN-READY ") {
                let _ = tx.send(PathBuf::from(dir));
                return;
            }
        }
    });
    let dir = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(dir) => dir,
        Err(e) => {
            let _ = child.kill();
            panic!("the child did not start its cluster: {e}");
        }
    };
    let pid_file = std::fs::read_to_string(dir.join("primary/postmaster.pid")).unwrap();
    let postmaster: u32 = pid_file.lines().next().unwrap().trim().parse().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        alive(postmaster),
        "the server of the killed process should still be running"
    );

    let next = LocalCluster::builder()
        .temp_root(root.path())
        .start()
        .unwrap();
    assert!(!alive(postmaster), "the orphaned server was not stopped");
    assert!(!dir.exists(), "the orphaned directory was not removed");
    assert_eq!(count(next.primary(), "SELECT 1::bigint"), 1);
}
