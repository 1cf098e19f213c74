//! Failover under a real HA manager: a 3-node Patroni cluster (etcd as its
//! DCS) with 4 writer and 4 reader threads on one `Cluster`: the leader
//! SIGKILLed (both configuration styles), a planned switchover, and
//! synchronous mode losing no acknowledged write.
//!
//! Its own harness (`harness = false`), as `tests/pgbouncer.rs`: the tests
//! run one at a time (each cluster is 3 Patroni processes, 3 servers and
//! etcd, on 2 cores), and without the `patroni` and `etcd` binaries they
//! are reported as ignored, with the reason; with `PGXKIT_REQUIRE_PATRONI`
//! set (as `.ci/run` does) a missing binary fails.

mod common;
#[path = "common/load.rs"]
mod load;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

use common::wait_for;
use load::Load;
use pgxkit::testkit::PatroniCluster;
use pgxkit::{Cluster, ClusterBuilder, ErrorKind, Role};

/// The health period of the clusters under test: writes must resume
/// within 1 s of the election, far less than this.
const PERIOD: Duration = Duration::from_secs(2);

fn nodes_style(ha: &PatroniCluster) -> ClusterBuilder {
    Cluster::builder().nodes(ha.dsns())
}

fn multi_host_style(ha: &PatroniCluster) -> ClusterBuilder {
    Cluster::builder().primary(format!(
        "{}?target_session_attrs=read-write",
        ha.multi_host_dsn()
    ))
}

fn rows_on(ha: &PatroniCluster, node: usize) -> Option<i64> {
    let mut client = postgres::Client::connect(&ha.node(node).dsn(), postgres::NoTls).ok()?;
    client
        .query_one(&format!("SELECT count(*) FROM {}", load::TABLE), &[])
        .ok()
        .map(|r| r.get(0))
}

/// SIGKILLs the leader (Patroni and its server) under load; writes must
/// resume on the new leader within 1 s of Patroni electing it.
fn leader_killed(ha: &PatroniCluster, builder: ClusterBuilder) {
    let cluster = builder.health_check_period(PERIOD).build().unwrap();
    load::create_table(&cluster);
    let old = ha.leader().unwrap();
    let running = Load::start(&cluster, 4, 4);
    wait_for("the first writes", Duration::from_secs(30), || {
        rows_on(ha, old).is_some_and(|n| n >= 100)
    });
    let killed = Instant::now();
    ha.node(old).kill().unwrap();
    let (new, elected) = ha.wait_for_leader(Some(old)).unwrap();
    let new_port = ha.node(new).port();
    let before = rows_on(ha, new).unwrap_or(0);
    wait_for("writes on the new leader", Duration::from_secs(30), || {
        rows_on(ha, new).is_some_and(|n| n >= before + 200)
    });
    let (writers, readers) = running.stop();

    let first = load::first_success_on_after(&writers, new_port, killed).unwrap();
    let resumed = (killed + first).saturating_duration_since(elected);
    let outage = load::longest_failing_stretch(&readers);
    println!(
        "leader killed: Patroni elected {} {:?} later; writes resumed {resumed:?} after the \
         election; writers' failures {:?}; readers' {:?}; longest read outage {outage:?}; \
         (longest call, calls): writers {:?}, readers {:?}",
        ha.node(new).name(),
        elected - killed,
        load::failures(&writers),
        load::failures(&readers),
        load::longest_call(&writers),
        load::longest_call(&readers),
    );
    assert!(
        resumed <= Duration::from_secs(1),
        "writes resumed {resumed:?} after the election"
    );
    assert!(outage <= PERIOD, "reads failed for {outage:?}");
    // While no leader was known, writes failed as NoPrimary, not on the
    // dead node's breaker.
    let circuit_open = writers
        .iter()
        .flat_map(|w| &w.calls)
        .filter(|c| c.at > killed + Duration::from_secs(1))
        .filter(|c| matches!(c.error, Some((ErrorKind::CircuitOpen, _))))
        .count();
    assert_eq!(circuit_open, 0, "{:?}", load::failures(&writers));
    let primary = cluster
        .health()
        .primary()
        .map(|p| p.node.address().to_owned());
    assert_eq!(primary, Some(format!("127.0.0.1:{new_port}")));
}

fn leader_killed_primary_and_replicas() {
    let ha = PatroniCluster::builder().start().unwrap();
    // The README's first style: the leader as the primary, the others as
    // replicas; roles are learnt all the same.
    let leader = ha.leader().unwrap();
    let builder = (0..ha.nodes().len())
        .filter(|&i| i != leader)
        .fold(Cluster::builder().primary(ha.node(leader).dsn()), |b, i| {
            b.replica(ha.node(i).dsn())
        });
    leader_killed(&ha, builder);
}

fn leader_killed_node_list() {
    let ha = PatroniCluster::builder().start().unwrap();
    leader_killed(&ha, nodes_style(&ha));
}

fn leader_killed_multi_host_dsn() {
    let ha = PatroniCluster::builder().start().unwrap();
    leader_killed(&ha, multi_host_style(&ha));
}

/// A planned switchover: writes resume within 1 s of the new leader, and
/// no writer sends more than one write to the demoted node.
fn planned_switchover() {
    let ha = PatroniCluster::builder().start().unwrap();
    let cluster = nodes_style(&ha)
        .health_check_period(PERIOD)
        .build()
        .unwrap();
    load::create_table(&cluster);
    let old = ha.leader().unwrap();
    let candidate = (old + 1) % ha.nodes().len();
    let running = Load::start(&cluster, 4, 4);
    wait_for("the first writes", Duration::from_secs(30), || {
        rows_on(&ha, old).is_some_and(|n| n >= 100)
    });
    let asked = Instant::now();
    ha.switchover(candidate).unwrap();
    let (new, elected) = ha.wait_for_leader(Some(old)).unwrap();
    assert_eq!(new, candidate);
    let new_port = ha.node(new).port();
    // The demoted node comes back as a replica of the new leader.
    ha.wait_for_replicas().unwrap();
    let before = rows_on(&ha, new).unwrap_or(0);
    wait_for("writes on the new leader", Duration::from_secs(30), || {
        rows_on(&ha, new).is_some_and(|n| n >= before + 200)
    });
    let (writers, readers) = running.stop();

    let first = load::first_success_on_after(&writers, new_port, asked).unwrap();
    let resumed = (asked + first).saturating_duration_since(elected);
    let refusals = load::read_only_refusals(&writers);
    println!(
        "switchover: new leader {:?} after asking; writes resumed {resumed:?} after it; \
         writes refused as read-only per writer {refusals:?}; writers' failures {:?}; \
         readers' {:?}",
        elected - asked,
        load::failures(&writers),
        load::failures(&readers),
    );
    assert!(
        resumed <= Duration::from_secs(1),
        "writes resumed {resumed:?} after the new leader"
    );
    assert!(refusals.iter().all(|&n| n <= 1), "{refusals:?}");
    let report = cluster.health();
    assert_eq!(
        report.primary().map(|p| p.node.address().to_owned()),
        Some(format!("127.0.0.1:{new_port}"))
    );
    let demoted = &report.nodes[old];
    assert_eq!(demoted.node.role(), Role::Replica);
    wait_for(
        "the demoted node back in reads",
        Duration::from_secs(30),
        || cluster.health().nodes[old].eligible_for_reads,
    );
}

/// Synchronous mode: after the leader is killed, every write the cluster
/// acknowledged is on the new leader.
fn synchronous_mode_loses_no_acknowledged_write() {
    let ha = PatroniCluster::builder().synchronous(true).start().unwrap();
    let cluster = nodes_style(&ha)
        .health_check_period(PERIOD)
        .build()
        .unwrap();
    load::create_table(&cluster);
    let old = ha.leader().unwrap();
    ha.wait_for_sync_standby().unwrap();
    let running = Load::start(&cluster, 4, 4);
    wait_for("the first writes", Duration::from_secs(30), || {
        rows_on(&ha, old).is_some_and(|n| n >= 100)
    });
    let killed = Instant::now();
    ha.node(old).kill().unwrap();
    let (new, elected) = ha.wait_for_leader(Some(old)).unwrap();
    let before = rows_on(&ha, new).unwrap_or(0);
    wait_for("writes on the new leader", Duration::from_secs(30), || {
        rows_on(&ha, new).is_some_and(|n| n >= before + 200)
    });
    let (writers, _) = running.stop();
    let acked = load::acknowledged(&writers);
    let mut client = postgres::Client::connect(&ha.node(new).dsn(), postgres::NoTls).unwrap();
    let on_new: std::collections::HashSet<(i32, i32)> = client
        .query(&format!("SELECT writer, seq FROM {}", load::TABLE), &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let missing: Vec<_> = acked.iter().filter(|r| !on_new.contains(r)).collect();
    println!(
        "synchronous: {} writes acknowledged, {} missing on the new leader (elected {:?} \
         after the kill)",
        acked.len(),
        missing.len(),
        elected - killed
    );
    assert!(acked.len() > 200);
    assert!(missing.is_empty(), "acknowledged but lost: {missing:?}");
}

const TESTS: &[(&str, fn())] = &[
    (
        "leader_killed_primary_and_replicas",
        leader_killed_primary_and_replicas,
    ),
    ("leader_killed_node_list", leader_killed_node_list),
    ("leader_killed_multi_host_dsn", leader_killed_multi_host_dsn),
    ("planned_switchover", planned_switchover),
    (
        "synchronous_mode_loses_no_acknowledged_write",
        synchronous_mode_loses_no_acknowledged_write,
    ),
];

fn installed() -> Result<(), String> {
    for (name, package) in [("patroni", "patroni"), ("etcd", "etcd-server")] {
        let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .chain(["/usr/bin".into()])
            .any(|d| d.join(name).is_file());
        if !found {
            return Err(format!("no {name} binary (apt-get install {package})"));
        }
    }
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        for (name, _) in TESTS {
            println!("{name}: test");
        }
        return;
    }
    let exact = args.iter().any(|a| a == "--exact");
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let selected: Vec<&(&str, fn())> = TESTS
        .iter()
        .filter(|(name, _)| {
            filters.is_empty()
                || filters.iter().any(|f| {
                    if exact {
                        f.as_str() == *name
                    } else {
                        name.contains(f.as_str())
                    }
                })
        })
        .collect();
    let filtered = TESTS.len() - selected.len();
    println!("\nrunning {} tests", selected.len());
    if let Err(why) = installed() {
        assert!(
            std::env::var_os("PGXKIT_REQUIRE_PATRONI").is_none(),
            "PGXKIT_REQUIRE_PATRONI is set: {why}"
        );
        for (name, _) in &selected {
            println!("test {name} ... ignored, {why}");
        }
        println!(
            "\ntest result: ok. 0 passed; 0 failed; {} ignored; 0 measured; {filtered} filtered out\n",
            selected.len()
        );
        return;
    }
    let mut failed = Vec::new();
    for (name, test) in &selected {
        let started = Instant::now();
        let outcome = catch_unwind(AssertUnwindSafe(test));
        let took = started.elapsed();
        match outcome {
            Ok(()) => println!("test {name} ... ok ({took:.1?})"),
            Err(_) => {
                println!("test {name} ... FAILED ({took:.1?})");
                failed.push(*name);
            }
        }
    }
    let passed = selected.len() - failed.len();
    if failed.is_empty() {
        println!(
            "\ntest result: ok. {passed} passed; 0 failed; 0 ignored; 0 measured; {filtered} filtered out\n"
        );
    } else {
        println!("\nfailures:\n    {}", failed.join("\n    "));
        println!(
            "\ntest result: FAILED. {passed} passed; {} failed; 0 ignored; 0 measured; {filtered} filtered out\n",
            failed.len()
        );
        std::process::exit(101);
    }
}
