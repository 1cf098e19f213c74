//! Every call is bounded, whatever the node does: a statement in flight on a
//! node that goes silent ends at its deadline (plus the shutdown grace), a
//! call without a deadline fails within the documented detection time, and
//! a connect the node never answers ends at the connect timeout. The node
//! goes silent behind the testkit's fault proxy: it keeps every socket open
//! and the kernel acknowledges everything, so neither TCP nor the cancel
//! request can end the call.

mod common;

use std::time::{Duration, Instant};

use pgxkit::testkit::{Fault, LocalCluster};
use pgxkit::{Cluster, ErrorKind};

/// The margin a call may run past its deadline.
const MARGIN: Duration = Duration::from_millis(50);

/// Runs `call` on a thread of its own; panics if it has not returned
/// within `limit` (so a call that is not bounded fails the test rather than
/// hanging it).
fn within<T: Send + 'static>(limit: Duration, call: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(call());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("the call was still blocked after {limit:?}"))
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[test]
fn a_statement_in_flight_on_a_node_gone_silent_ends_at_its_deadline() {
    within(Duration::from_secs(60), || {
        const DEADLINE: Duration = Duration::from_millis(300);
        let local = LocalCluster::start(0).unwrap();
        let proxy = local.primary().fault_proxy().unwrap();
        let cluster = Cluster::builder()
            .primary(proxy.dsn())
            .health_check_period(Duration::from_secs(3600))
            .build()
            .unwrap();
        let mut took = Vec::new();
        for round in 0..5 {
            proxy.set(Fault::Pass);
            // This thread's connection, parked for it: the next call runs on it.
            let _: i32 = cluster.query_one("SELECT 1", &[]).unwrap().get(0);
            let broken_before = cluster.stats().primary().unwrap().pool.closed_broken;
            proxy.set(Fault::Silent);
            let started = Instant::now();
            let err = cluster
                .with_timeout(DEADLINE)
                .query_one("SELECT 1", &[])
                .unwrap_err();
            let elapsed = started.elapsed();
            assert_eq!(err.kind(), ErrorKind::Timeout, "round {round}: {err:?}");
            // Never unbounded (the old behaviour: blocked until the proxy passed).
            assert!(
                elapsed < DEADLINE + Duration::from_millis(500),
                "round {round}: {elapsed:?}"
            );
            took.push(elapsed);
            // The connection is discarded, not handed to the next call.
            common::wait_for("the connection discarded", Duration::from_secs(5), || {
                cluster.stats().primary().unwrap().pool.closed_broken > broken_before
            });
        }
        let median = median(took.clone());
        eprintln!("a {DEADLINE:?} deadline on a silent node returned after {took:?}");
        assert!(median < DEADLINE + MARGIN, "median {median:?} of {took:?}");
        // Back to passing, the cluster works at once.
        proxy.set(Fault::Pass);
        let _: i32 = cluster.query_one("SELECT 1", &[]).unwrap().get(0);
    });
}

#[test]
fn a_call_without_a_deadline_fails_within_the_detection_time() {
    within(Duration::from_secs(60), || {
        // Detection: a health period, plus twice the overdue time (1 s at
        // this period), plus the monitor's upkeep tick.
        const PERIOD: Duration = Duration::from_millis(200);
        const DETECTION: Duration = Duration::from_millis(200 + 2_000 + 1_000);
        let local = LocalCluster::start(1).unwrap();
        let proxy = local.primary().fault_proxy().unwrap();
        let cluster = Cluster::builder()
            .primary(proxy.dsn())
            .replica(local.replica_dsns()[0].clone())
            .health_check_period(PERIOD)
            .build()
            .unwrap();
        let _: i32 = cluster.query_one("SELECT 1", &[]).unwrap().get(0);
        proxy.set(Fault::Silent);
        let started = Instant::now();
        let err = cluster.query_one("SELECT 1", &[]).unwrap_err();
        let took = started.elapsed();
        eprintln!("a call without a deadline on a silent node failed after {took:?}: {err}");
        assert!(
            matches!(err.kind(), ErrorKind::Closed | ErrorKind::Connect),
            "{err:?}"
        );
        assert!(took < DETECTION, "{took:?}");
        // Not ended early either: the node had to be silent for the limit.
        assert!(took >= Duration::from_secs(2), "{took:?}");
        // Meanwhile the replica was never touched: it still answers.
        let _: i32 = cluster.replica().query_one("SELECT 1", &[]).unwrap().get(0);
        proxy.set(Fault::Pass);
        common::wait_for("the primary back", Duration::from_secs(10), || {
            cluster.query_one("SELECT 1", &[]).is_ok()
        });
    });
}

#[test]
fn a_connect_the_node_never_answers_ends_at_the_connect_timeout() {
    within(Duration::from_secs(60), || {
        let local = LocalCluster::start(0).unwrap();
        let proxy = local.primary().fault_proxy().unwrap();
        let cluster = Cluster::builder()
            .primary(proxy.dsn())
            .lazy_connect(true)
            .connect_timeout(Duration::from_secs(1))
            .checkout_timeout(Duration::from_secs(3))
            .health_check_period(Duration::from_secs(3600))
            .build()
            .unwrap();
        proxy.set(Fault::Silent);
        let started = Instant::now();
        let err = cluster.query_one("SELECT 1", &[]).unwrap_err();
        let took = started.elapsed();
        // The pool's connect ended at its timeout and said why (without the
        // bound the checkout only knew it had waited).
        assert!(err.to_string().contains("start-up handshake"), "{err}");
        assert!(took < Duration::from_millis(3500), "{took:?}");
        // The pool's connect threads are free again: once the node answers, a
        // connection opens at once.
        proxy.set(Fault::Pass);
        let started = Instant::now();
        let _: i32 = cluster.query_one("SELECT 1", &[]).unwrap().get(0);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    });
}
