//! The testkit's fault proxy against a real server: pass, latency,
//! bandwidth, silence (nothing lost once it passes again), resets, refusals,
//! and a drop that leaves no connection behind.

mod common;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::wait_for;
use pgxkit::postgres::{Client, NoTls};
use pgxkit::testkit::{Fault, FaultProxy, LocalCluster};

fn connect(proxy: &FaultProxy) -> Result<Client, pgxkit::postgres::Error> {
    pgxkit::postgres::Config::new()
        .host("127.0.0.1")
        .port(proxy.port())
        .user("postgres")
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(5))
        .connect(NoTls)
}

fn one(client: &mut Client) -> Result<i32, pgxkit::postgres::Error> {
    Ok(client.query_one("SELECT 1", &[])?.get(0))
}

/// Server backends of the test's own connections (not the kit's).
fn backends(local: &LocalCluster) -> i64 {
    local
        .primary()
        .client()
        .unwrap()
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' \
             AND client_addr IS NOT NULL",
            &[],
        )
        .unwrap()
        .get(0)
}

#[test]
fn passes_then_delays_then_limits_bandwidth() {
    let local = LocalCluster::start(0).unwrap();
    let proxy = local.primary().fault_proxy().unwrap();
    let mut client = connect(&proxy).unwrap();
    assert_eq!(one(&mut client).unwrap(), 1);
    assert_eq!(proxy.connections(), 1);

    proxy.set(Fault::Latency(Duration::from_millis(100)));
    let started = Instant::now();
    assert_eq!(one(&mut client).unwrap(), 1);
    // Each way at least once.
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "{:?}",
        started.elapsed()
    );

    proxy.set(Fault::Bandwidth(50_000));
    let started = Instant::now();
    let text: String = client
        .query_one("SELECT repeat('x', 100000)", &[])
        .unwrap()
        .get(0);
    assert_eq!(text.len(), 100_000);
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    proxy.set(Fault::Pass);
    assert_eq!(one(&mut client).unwrap(), 1);
}

#[test]
fn silence_holds_everything_and_loses_nothing() {
    let local = LocalCluster::start(0).unwrap();
    let proxy = local.primary().fault_proxy().unwrap();
    let mut client = connect(&proxy).unwrap();
    proxy.set(Fault::Silent);
    let (tx, rx) = mpsc::channel();
    let worker = std::thread::spawn(move || {
        let _ = tx.send(one(&mut client));
    });
    // The query was sent; nothing comes back while the proxy is silent.
    assert!(rx.recv_timeout(Duration::from_millis(500)).is_err());
    // A new connection is accepted, then hears nothing either.
    let (tx2, rx2) = mpsc::channel();
    let proxy_port = proxy.port();
    let connecting = std::thread::spawn(move || {
        let started = Instant::now();
        let result = pgxkit::postgres::Config::new()
            .host("127.0.0.1")
            .port(proxy_port)
            .user("postgres")
            .dbname("postgres")
            .connect(NoTls)
            .map(|_| ());
        let _ = tx2.send((result.is_ok(), started.elapsed()));
    });
    assert!(rx2.recv_timeout(Duration::from_millis(500)).is_err());
    // Back to passing: what was held flows on.
    proxy.set(Fault::Pass);
    assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap().unwrap(), 1);
    let (connected, _) = rx2.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(connected);
    worker.join().unwrap();
    connecting.join().unwrap();
}

#[test]
fn resets_and_refusals() {
    let local = LocalCluster::start(0).unwrap();
    let proxy = local.primary().fault_proxy().unwrap();
    let mut client = connect(&proxy).unwrap();
    assert_eq!(one(&mut client).unwrap(), 1);

    proxy.set(Fault::Reset);
    assert!(one(&mut client).is_err(), "an open connection is reset");
    assert!(connect(&proxy).is_err(), "and so is a new one");

    proxy.set(Fault::Pass);
    let mut kept = connect(&proxy).unwrap();
    proxy.set(Fault::Refuse);
    let Err(err) = connect(&proxy) else {
        panic!("a refusing proxy accepted a connection");
    };
    let refused = std::error::Error::source(&err)
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused);
    assert!(refused, "{err:?}");
    assert_eq!(one(&mut kept).unwrap(), 1, "open connections go on");

    proxy.set(Fault::Pass);
    let mut again = None;
    wait_for("the proxy to listen again", Duration::from_secs(5), || {
        again = connect(&proxy).ok();
        again.is_some()
    });
    assert_eq!(one(again.as_mut().unwrap()).unwrap(), 1);
}

#[test]
fn a_connection_reset_by_its_client_is_forgotten() {
    use nix::sys::socket::{setsockopt, sockopt::Linger};
    let local = LocalCluster::start(0).unwrap();
    let proxy = local.primary().fault_proxy().unwrap();
    let stream = std::net::TcpStream::connect(("127.0.0.1", proxy.port())).unwrap();
    wait_for(
        "the proxy to take the connection",
        Duration::from_secs(5),
        || proxy.connections() == 1,
    );
    // Closed with an RST: the proxy's socket then no longer knows its peer.
    let linger = nix::libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    setsockopt(&stream, Linger, &linger).unwrap();
    drop(stream);
    wait_for("the proxy to forget it", Duration::from_secs(5), || {
        proxy.connections() == 0
    });
}

#[test]
fn dropping_the_proxy_closes_every_connection() {
    let local = LocalCluster::start(0).unwrap();
    let proxy = local.primary().fault_proxy().unwrap();
    let mut clients: Vec<Client> = (0..3).map(|_| connect(&proxy).unwrap()).collect();
    assert_eq!(backends(&local), 3);
    proxy.set(Fault::Silent);
    drop(proxy);
    wait_for("the server side to close", Duration::from_secs(5), || {
        backends(&local) == 0
    });
    assert!(one(&mut clients[0]).is_err());
}

#[test]
fn a_silent_replica_leaves_reads_and_stalls_no_other_probe() {
    use pgxkit::Cluster;
    const PERIOD: Duration = Duration::from_millis(200);
    let local = LocalCluster::start(2).unwrap();
    let silent = &local.replicas()[1];
    let proxy = silent.fault_proxy().unwrap();
    let cluster = Cluster::builder()
        .primary(local.primary_dsn())
        .replica(local.replica_dsns()[0].clone())
        .replica(proxy.dsn())
        .health_check_period(PERIOD)
        .build()
        .unwrap();
    let node = |name: &str| cluster.health().node(name).unwrap().clone();
    assert!(node("replica2").eligible_for_reads);

    proxy.set(Fault::Silent);
    let silenced = Instant::now();
    wait_for(
        "the silent replica out of reads",
        Duration::from_secs(10),
        || !node("replica2").eligible_for_reads,
    );
    let out_after = silenced.elapsed();
    // A probe is overdue after one period, at least 1 s; the next tick
    // notices.
    assert!(
        out_after <= PERIOD * 3 + Duration::from_secs(1),
        "{out_after:?}"
    );
    let why = node("replica2").last_error.unwrap_or_default();
    assert!(why.contains("no answer"), "{why}");

    // The other nodes keep being probed on their period meanwhile.
    for name in ["primary", "replica1"] {
        let before = node(name).last_check.unwrap();
        wait_for("another probe of a healthy node", PERIOD * 10, || {
            node(name).last_check.unwrap() > before
        });
        assert!(node(name).up);
    }
    // Reads from new threads go to the healthy replica only.
    for _ in 0..6 {
        assert_eq!(
            common::read_port_from_new_thread(&cluster),
            local.replicas()[0].port()
        );
    }

    // It comes back when it answers again.
    proxy.set(Fault::Pass);
    wait_for(
        "the replica back in rotation",
        Duration::from_secs(10),
        || node("replica2").eligible_for_reads,
    );
    eprintln!("silent replica out of reads after {out_after:?} (health period {PERIOD:?})");
}

#[test]
fn a_silent_node_delays_no_other_nodes_deadline() {
    use pgxkit::{Cluster, ErrorKind};
    let local = LocalCluster::start(1).unwrap();
    let proxy = local.replicas()[0].fault_proxy().unwrap();
    let cluster = Cluster::builder()
        .primary(local.primary_dsn())
        .replica(proxy.dsn())
        .health_check_period(Duration::from_secs(3600))
        .build()
        .unwrap();
    // A reader whose pooled connection to the replica (through the proxy)
    // is its own, parked for it: its next read runs on that connection.
    let (warm_tx, warm_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let stuck = {
        let cluster = cluster.clone();
        std::thread::spawn(move || {
            cluster.replica().query_one("SELECT 1", &[]).unwrap();
            warm_tx.send(()).unwrap();
            go_rx.recv().unwrap();
            // Hangs on the silent replica; at its deadline the cancel
            // request opens a connection to it, which hears nothing, and
            // the call's socket is shut down.
            let started = Instant::now();
            let result = cluster
                .with_timeout(Duration::from_millis(200))
                .replica()
                .query_one("SELECT 1", &[])
                .map(|_| ());
            (result, started.elapsed())
        })
    };
    warm_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let before = proxy.connections();
    proxy.set(Fault::Silent);
    go_tx.send(()).unwrap();
    wait_for(
        "the cancel request to reach the silent node",
        Duration::from_secs(5),
        || proxy.connections() > before,
    );
    // Meanwhile a deadline on the primary still cancels on time.
    let started = Instant::now();
    let err = cluster
        .with_timeout(Duration::from_millis(300))
        .execute("SELECT pg_sleep(5)", &[])
        .unwrap_err();
    let took = started.elapsed();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err:?}");
    assert!(
        took < Duration::from_secs(2),
        "the primary's deadline took {took:?}"
    );
    // The read on the silent node ended at its own deadline.
    let (result, stuck_for) = stuck.join().unwrap();
    assert_eq!(result.unwrap_err().kind(), ErrorKind::Timeout);
    assert!(stuck_for < Duration::from_secs(1), "{stuck_for:?}");
    proxy.set(Fault::Pass);
    eprintln!(
        "a 300 ms deadline on the primary returned after {took:?} while a replica was silent"
    );
}

#[test]
fn build_is_bounded_by_the_connect_timeout_when_a_node_never_answers() {
    use pgxkit::{Cluster, ErrorKind};
    let local = LocalCluster::start(1).unwrap();
    let primary = local.primary().fault_proxy().unwrap();
    let replica = local.replicas()[0].fault_proxy().unwrap();
    primary.set(Fault::Silent);
    replica.set(Fault::Silent);
    let started = Instant::now();
    let err = Cluster::builder()
        .primary(primary.dsn())
        .replica(replica.dsn())
        .connect_timeout(Duration::from_secs(1))
        .build()
        .unwrap_err();
    let took = started.elapsed();
    assert_eq!(err.kind(), ErrorKind::Connect, "{err:?}");
    assert!(err.to_string().contains("start-up handshake"), "{err}");
    assert!(took < Duration::from_millis(1500), "build took {took:?}");
    // A silent replica alone does not fail the build; it is reported down.
    primary.set(Fault::Pass);
    let started = Instant::now();
    let cluster = Cluster::builder()
        .primary(primary.dsn())
        .replica(replica.dsn())
        .connect_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    let report = cluster.health();
    let node = report.node("replica1").unwrap();
    assert!(!node.up && !node.eligible_for_reads, "{node:?}");
}

#[test]
fn a_node_whose_connects_hang_blocks_no_other_nodes_pool() {
    use pgxkit::Cluster;
    let local = LocalCluster::start(1).unwrap();
    let proxy = local.primary().fault_proxy().unwrap();
    let cluster = Cluster::builder()
        .primary(proxy.dsn())
        .replica(local.replica_dsns()[0].clone())
        .lazy_connect(true)
        .max_conns(8)
        .build()
        .unwrap();
    proxy.set(Fault::Silent);
    // Eight checkouts on the primary: each makes its pool open a connection,
    // and each connect hangs in the start-up exchange.
    let writers: Vec<_> = (0..8)
        .map(|_| {
            let cluster = cluster.clone();
            std::thread::spawn(move || {
                let _ = cluster
                    .with_timeout(Duration::from_millis(300))
                    .execute("SELECT 1", &[]);
            })
        })
        .collect();
    // (Connects to one address are made one at a time, so one hangs and
    // the pool's other connect thread waits for it.)
    wait_for(
        "the primary's connects to hang",
        Duration::from_secs(5),
        || proxy.connections() >= 1,
    );
    // The replica's pool still opens its first connection at once.
    let started = Instant::now();
    let port: i32 = cluster
        .with_timeout(Duration::from_secs(3))
        .replica()
        .query_one("SELECT inet_server_port()", &[])
        .unwrap()
        .get(0);
    assert_eq!(port, i32::from(local.replicas()[0].port()));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    for w in writers {
        w.join().unwrap();
    }
    proxy.set(Fault::Pass);
}

#[test]
fn a_lagging_replica_stays_out_while_the_primary_does_not_answer() {
    use pgxkit::Cluster;
    const PERIOD: Duration = Duration::from_millis(100);
    let local = LocalCluster::start(2).unwrap();
    let primary = local.primary().fault_proxy().unwrap();
    let cluster = Cluster::builder()
        .primary(primary.dsn())
        .replica(local.replica_dsns()[0].clone())
        .replica(local.replica_dsns()[1].clone())
        .health_check_period(PERIOD)
        .max_replica_lag_bytes(1_000_000)
        .build()
        .unwrap();
    let node = |name: &str| cluster.health().node(name).unwrap().clone();
    local.replicas()[1].pause_replay().unwrap();
    cluster
        .batch_execute(
            "CREATE TABLE filler AS SELECT repeat('x', 800) AS pad FROM generate_series(1, 10000)",
        )
        .unwrap();
    wait_for(
        "the paused replica out of reads",
        Duration::from_secs(10),
        || !node("replica2").eligible_for_reads,
    );
    // The primary stops answering: its probes are overdue, the replicas are
    // probed without its WAL position, and must not be taken for caught up.
    primary.set(Fault::Silent);
    wait_for("the primary marked down", Duration::from_secs(10), || {
        !node("primary").up
    });
    for _ in 0..3 {
        let before = node("replica2").last_check.unwrap();
        wait_for(
            "another probe of the paused replica",
            Duration::from_secs(10),
            || node("replica2").last_check.unwrap() > before,
        );
        let replica = node("replica2");
        assert!(!replica.eligible_for_reads, "{replica:?}");
        assert!(
            replica.lag_bytes.is_some_and(|b| b > 1_000_000),
            "{replica:?}"
        );
    }
    primary.set(Fault::Pass);
    local.replicas()[1].resume_replay().unwrap();
}
