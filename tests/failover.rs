//! Roles follow the servers, through the testkit's own `promote` (no HA
//! manager): a primary killed and a replica promoted under 4 writers and
//! 4 readers, for both configuration styles; writes while no primary is
//! known; split brain; the node list and multi-host DSNs.

mod common;
#[path = "common/load.rs"]
mod load;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{builder_for, wait_for};
use load::Load;
use pgxkit::testkit::LocalCluster;
use pgxkit::{Cluster, ClusterBuilder, ErrorKind, RetryPolicy, Role};

/// Long against the 1 s the tests allow for writes to resume: only the
/// re-probe a failing write asks for can find the new primary in time.
const PERIOD: Duration = Duration::from_secs(5);

/// Role changes seen by the hook; how many operations its after hook saw
/// fail with `NoPrimary`.
#[derive(Default)]
struct Seen {
    changes: Mutex<Vec<(String, Role, Role)>>,
    no_primary: std::sync::atomic::AtomicUsize,
}

type Changes = Arc<Seen>;

fn recording(builder: ClusterBuilder) -> (ClusterBuilder, Changes) {
    let seen: Changes = Arc::default();
    let (changes, ops) = (Arc::clone(&seen), Arc::clone(&seen));
    let builder = builder
        .health_check_period(PERIOD)
        .on_role_change(move |ev| {
            let (from, to) = ev.role_change().unwrap();
            changes
                .changes
                .lock()
                .unwrap()
                .push((ev.node().name().to_owned(), from, to));
        })
        .after_operation(move |op| {
            if op.error().is_some_and(|e| e.kind() == ErrorKind::NoPrimary) {
                ops.no_primary
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(())
        });
    (builder, seen)
}

fn rows_on(local: &LocalCluster, node: usize) -> i64 {
    let mut client = local.node(node).unwrap().client().unwrap();
    client
        .query_one(&format!("SELECT count(*) FROM {}", load::TABLE), &[])
        .unwrap()
        .get(0)
}

/// Kills the primary under load, checks that writes fail fast with
/// `NoPrimary`, promotes the first replica, and checks that writes resume
/// on it within 1 s, through the same `Cluster`.
fn primary_killed_replica_promoted(local: &LocalCluster, cluster: &Cluster, changes: &Changes) {
    let new_primary = local.replicas()[0].port();
    load::create_table(cluster);
    local
        .wait_for_replicas_caught_up(Duration::from_secs(30))
        .unwrap();
    let running = Load::start(cluster, 4, 4);
    wait_for("the first writes", Duration::from_secs(30), || {
        rows_on(local, 0) >= 100
    });

    let killed = Instant::now();
    local.primary().kill().unwrap();
    wait_for(
        "writes to fail with NoPrimary",
        Duration::from_secs(10),
        || {
            cluster
                .execute("SELECT 1", &[])
                .is_err_and(|e| e.kind() == ErrorKind::NoPrimary)
        },
    );
    let fast_fail = Instant::now();
    let started = Instant::now();
    let err = cluster.execute("SELECT 1", &[]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NoPrimary, "{err}");
    assert!(
        started.elapsed() < Duration::from_millis(50),
        "not fast: {:?}",
        started.elapsed()
    );
    assert!(err.to_string().contains("down"), "{err}");
    assert!(cluster.health().primary().is_none());
    assert_eq!(cluster.health().status, pgxkit::HealthStatus::Unhealthy);

    local.replicas()[0].promote().unwrap();
    let promoted = Instant::now();
    let before = rows_on(local, 1);
    wait_for(
        "writes on the promoted replica",
        Duration::from_secs(30),
        || rows_on(local, 1) >= before + 200,
    );
    let (writers, readers) = running.stop();

    let resumed = load::first_success_on_after(&writers, new_primary, promoted)
        .expect("no write reached the promoted replica");
    println!(
        "writes resumed {resumed:?} after the promotion; NoPrimary {:?} after the kill; \
         failures: writers {:?}, readers {:?}; longest read outage {:?}",
        fast_fail - killed,
        load::failures(&writers),
        load::failures(&readers),
        load::longest_failing_stretch(&readers),
    );
    assert!(
        resumed <= Duration::from_secs(1),
        "writes resumed {resumed:?} after the promotion"
    );
    // After the first second, a write fails only for want of a primary:
    // never by going to the dead node.
    for call in writers.iter().flat_map(|w| &w.calls) {
        if call.at > killed + Duration::from_secs(1) {
            if let Some((kind, _)) = &call.error {
                assert_eq!(*kind, ErrorKind::NoPrimary, "{call:?}");
            }
        }
        if call.at > promoted + resumed {
            if let Some(port) = call.port {
                assert_eq!(
                    port,
                    i32::from(new_primary),
                    "a write after failover elsewhere"
                );
            }
        }
    }
    let outage = load::longest_failing_stretch(&readers);
    assert!(outage <= PERIOD, "reads failed for {outage:?}");

    let report = cluster.health();
    let primary = report.primary().expect("a primary after the promotion");
    assert_eq!(primary.node.address(), format!("127.0.0.1:{new_primary}"));
    assert_eq!(primary.node.role(), Role::Primary);
    assert!(primary.timeline.is_some_and(|t| t >= 2), "{primary:?}");
    let old = report
        .nodes
        .iter()
        .find(|n| n.node.address() == format!("127.0.0.1:{}", local.primary().port()))
        .unwrap();
    assert!(!old.up && old.node.role() == Role::Replica, "{old:?}");
    // The hooks (and so the metrics) saw the writes that found no primary.
    let no_primary = changes
        .no_primary
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(no_primary > 0, "no NoPrimary failure reached the hooks");
    let changes = changes.changes.lock().unwrap();
    let names = |port: u16| {
        report
            .nodes
            .iter()
            .find(|n| n.node.address() == format!("127.0.0.1:{port}"))
            .unwrap()
            .node
            .name()
            .to_owned()
    };
    assert!(
        changes.contains(&(names(new_primary), Role::Replica, Role::Primary)),
        "{changes:?}"
    );
    assert!(
        changes.contains(&(names(local.primary().port()), Role::Primary, Role::Replica)),
        "{changes:?}"
    );
}

#[test]
fn writes_follow_a_promoted_replica_configured_as_primary_and_replicas() {
    let local = LocalCluster::start(2).unwrap();
    let (builder, changes) = recording(builder_for(&local));
    #[cfg(feature = "prometheus")]
    let registry = prometheus::Registry::new();
    #[cfg(feature = "prometheus")]
    let builder = builder.prometheus(&registry);
    let cluster = builder.build().unwrap();
    primary_killed_replica_promoted(&local, &cluster, &changes);
    // The metrics' role label follows: replica1 is the primary now.
    #[cfg(feature = "prometheus")]
    {
        use prometheus::Encoder;
        let mut out = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&registry.gather(), &mut out)
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains(r#"pgxkit_node_up{node="replica1",role="primary"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"pgxkit_node_up{node="primary",role="replica"} 0"#),
            "{text}"
        );
        assert!(
            !text.contains(r#"node="replica1",role="replica""#),
            "{text}"
        );
    }
}

#[test]
fn writes_follow_a_promoted_replica_configured_as_a_multi_host_dsn() {
    let local = LocalCluster::start(2).unwrap();
    let hosts: Vec<String> = local
        .nodes()
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.port()))
        .collect();
    let dsn = format!(
        "postgres://postgres@{}/postgres?target_session_attrs=read-write",
        hosts.join(",")
    );
    let (builder, changes) = recording(Cluster::builder().primary(dsn));
    let cluster = builder.build().unwrap();
    // Each host is its own node, labelled with its own address.
    let stats = cluster.stats();
    let names: Vec<(&str, &str, Role)> = stats
        .nodes
        .iter()
        .map(|n| (n.node.name(), n.node.address(), n.node.role()))
        .collect();
    assert_eq!(
        names,
        vec![
            ("primary-1", hosts[0].as_str(), Role::Primary),
            ("primary-2", hosts[1].as_str(), Role::Replica),
            ("primary-3", hosts[2].as_str(), Role::Replica),
        ]
    );
    primary_killed_replica_promoted(&local, &cluster, &changes);
}

#[test]
fn a_node_list_learns_every_role_and_reads_skip_the_primary() {
    let local = LocalCluster::start(2).unwrap();
    // The primary listed last: the order says nothing of the roles.
    let mut dsns: Vec<String> = local.replica_dsns();
    dsns.push(local.primary_dsn());
    let cluster = Cluster::builder().nodes(dsns).build().unwrap();
    let stats = cluster.stats();
    let roles: Vec<(&str, Role)> = stats
        .nodes
        .iter()
        .map(|n| (n.node.name(), n.node.role()))
        .collect();
    assert_eq!(
        roles,
        vec![
            ("node1", Role::Replica),
            ("node2", Role::Replica),
            ("node3", Role::Primary)
        ]
    );
    let port: i32 = cluster
        .query_one("SELECT inet_server_port()", &[])
        .unwrap()
        .get(0);
    assert_eq!(port as u16, local.primary().port());
    for _ in 0..20 {
        let port: i32 = cluster
            .replica()
            .query_one("SELECT inet_server_port()", &[])
            .unwrap()
            .get(0);
        assert_ne!(port as u16, local.primary().port(), "a read on the primary");
    }
    assert_eq!(cluster.health().status, pgxkit::HealthStatus::Healthy);
}

#[test]
fn a_node_list_needs_one_node_to_answer() {
    // Two ports nothing listens on.
    let dead: Vec<String> = (0..2)
        .map(|_| {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!(
                "postgres://postgres@127.0.0.1:{}/postgres?connect_timeout=2",
                l.local_addr().unwrap().port()
            )
        })
        .collect();
    let err = Cluster::builder().nodes(dead.clone()).build().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connect, "{err}");
    assert!(err.to_string().contains("none of the 2 nodes"), "{err}");
    // Lazily: built, and every write says there is no primary.
    let cluster = Cluster::builder()
        .nodes(dead)
        .lazy_connect(true)
        .build()
        .unwrap();
    let err = cluster.execute("SELECT 1", &[]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NoPrimary, "{err}");
    assert!(err.is_retryable());
}

#[test]
fn a_retrying_transaction_waits_for_the_new_primary() {
    let local = LocalCluster::start(1).unwrap();
    let cluster = builder_for(&local)
        .health_check_period(PERIOD)
        .build()
        .unwrap();
    cluster.batch_execute("CREATE TABLE t (x int)").unwrap();
    local
        .wait_for_replicas_caught_up(Duration::from_secs(30))
        .unwrap();
    local.primary().kill().unwrap();
    wait_for("NoPrimary", Duration::from_secs(10), || {
        cluster
            .execute("INSERT INTO t VALUES (0)", &[])
            .is_err_and(|e| e.kind() == ErrorKind::NoPrimary)
    });
    let policy = RetryPolicy::default()
        .max_retries(1000)
        .base_delay(Duration::from_millis(20))
        .max_delay(Duration::from_millis(100))
        .deadline(Duration::from_secs(30));
    std::thread::scope(|s| {
        let promoter = s.spawn(|| {
            std::thread::sleep(Duration::from_millis(500));
            local.replicas()[0].promote().unwrap();
        });
        let port: i32 = cluster
            .build_transaction()
            .retry(&policy)
            .run(|tx| {
                tx.execute("INSERT INTO t VALUES (1)", &[])?;
                Ok::<_, pgxkit::Error>(tx.query_one("SELECT inet_server_port()", &[])?.get(0))
            })
            .unwrap();
        promoter.join().unwrap();
        assert_eq!(port as u16, local.replicas()[0].port());
    });
}

#[test]
fn split_brain_writes_go_to_the_newest_timeline_and_health_says_so() {
    common::logs();
    let local = LocalCluster::start(1).unwrap();
    let cluster = Cluster::builder()
        .nodes([local.primary_dsn(), local.replica_dsns()[0].clone()])
        .health_check_period(Duration::from_millis(200))
        .build()
        .unwrap();
    assert_eq!(cluster.health().primary().unwrap().node.name(), "node1");
    // Promoted while the old primary still runs: both claim the role.
    local.replicas()[0].promote().unwrap();
    wait_for(
        "writes on the promoted node",
        Duration::from_secs(10),
        || {
            cluster
                .health()
                .primary()
                .is_some_and(|p| p.node.name() == "node2")
        },
    );
    let port: i32 = cluster
        .query_one("SELECT inet_server_port()", &[])
        .unwrap()
        .get(0);
    assert_eq!(port as u16, local.replicas()[0].port());
    let report = cluster.health();
    let (old, new) = (report.node("node1").unwrap(), report.node("node2").unwrap());
    assert_eq!(
        (old.in_recovery, new.in_recovery),
        (Some(false), Some(false))
    );
    assert!(new.timeline > old.timeline, "{old:?} {new:?}");
    assert!(!old.eligible_for_reads);
    assert!(
        old.warnings.iter().any(|w| w.contains("split brain")),
        "{:?}",
        old.warnings
    );
    assert_eq!(report.status, pgxkit::HealthStatus::Degraded);
    // Logged: the role changes at warn, the split brain at error.
    let address = format!("127.0.0.1:{}", local.replicas()[0].port());
    let promoted = common::log_lines(&format!("node2 ({address}) was replica: it is primary now"));
    assert!(
        promoted.iter().any(|(level, _)| *level == log::Level::Warn),
        "{promoted:?}"
    );
    let split = common::log_lines("split brain:");
    assert!(
        split.iter().any(|(level, line)| *level == log::Level::Error
            && line.contains("writes go to node2")),
        "{split:?}"
    );
    // Neither reads nor writes reach the old primary.
    for _ in 0..20 {
        let port: i32 = cluster
            .replica()
            .query_one("SELECT inet_server_port()", &[])
            .unwrap()
            .get(0);
        assert_eq!(port as u16, local.replicas()[0].port());
    }
}

#[test]
fn failing_writes_ask_for_at_most_one_probe_round_per_100_ms() {
    // Every statement a replica runs goes to its log: the probes are the
    // ones that call pg_is_in_recovery().
    let local = LocalCluster::builder()
        .replicas(1)
        .setting("log_statement", "'all'")
        .start()
        .unwrap();
    let cluster = builder_for(&local)
        .health_check_period(Duration::from_secs(3600))
        .build()
        .unwrap();
    let probes = || {
        std::fs::read_to_string(local.replicas()[0].log_path())
            .unwrap()
            .matches("pg_is_in_recovery()")
            .count()
            / 3 // the probe names it three times
    };
    local.primary().kill().unwrap();
    let before = probes();
    let started = Instant::now();
    let hammer = Duration::from_secs(2);
    let failed: usize = std::thread::scope(|s| {
        let threads: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    let mut n = 0;
                    while started.elapsed() < hammer {
                        assert!(cluster.execute("SELECT 1", &[]).is_err());
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).sum()
    });
    let elapsed = started.elapsed();
    // The last round may still be writing its line.
    wait_for("the last probe logged", Duration::from_secs(5), || {
        probes() > before
    });
    let rounds = probes() - before;
    let most = (elapsed.as_millis() / 100 + 2) as usize;
    println!(
        "{failed} failed writes in {elapsed:?} asked for {rounds} probe rounds (at most {most})"
    );
    assert!(failed > 1000, "only {failed} writes");
    assert!(rounds >= 5, "{rounds} rounds: the writes did not ask");
    assert!(rounds <= most, "{rounds} rounds in {elapsed:?}");
}
