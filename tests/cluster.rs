//! The Cluster against real servers: routing, concurrency and stats, pool
//! behaviour (validation, broken connections, lifetime jitter), start-up.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use common::{builder_for, read_port, read_port_from_new_thread, wait_for};
use pgxkit::testkit::LocalCluster;
use pgxkit::{Cluster, ErrorKind, ReadBalance, Role};

#[test]
fn cluster_is_clone_send_sync() {
    fn assert_clone_send_sync<T: Clone + Send + Sync + 'static>() {}
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    assert_clone_send_sync::<Cluster>();
    assert_send_sync::<pgxkit::Error>();
}

#[test]
fn reads_spread_evenly_over_replicas_and_writes_hit_the_primary() {
    let local = LocalCluster::start(2).unwrap();
    let cluster = builder_for(&local)
        .read_balance(ReadBalance::PerCall)
        .build()
        .unwrap();
    let mut per_port: HashMap<u16, usize> = HashMap::new();
    for _ in 0..200 {
        *per_port.entry(read_port(&cluster)).or_default() += 1;
    }
    let replicas: Vec<u16> = local.replicas().iter().map(|r| r.port()).collect();
    assert_eq!(
        per_port.get(&local.primary().port()),
        None,
        "a read reached the primary"
    );
    assert_eq!(per_port[&replicas[0]], 100);
    assert_eq!(per_port[&replicas[1]], 100);

    // Also through with_replica, and read_query / read_query_opt.
    let port: i32 = cluster
        .replica()
        .with_client(|c| {
            c.query_one("SELECT inet_server_port()", &[])
                .map_err(pgxkit::Error::from)
        })
        .unwrap()
        .get(0);
    assert!(replicas.contains(&(port as u16)));
    let rows = cluster
        .replica()
        .query("SELECT inet_server_port()", &[])
        .unwrap();
    assert!(replicas.contains(&(rows[0].get::<_, i32>(0) as u16)));

    // Everything not marked read goes to the primary.
    cluster
        .batch_execute("CREATE TABLE served (port int)")
        .unwrap();
    for _ in 0..10 {
        cluster
            .execute("INSERT INTO served VALUES (inet_server_port())", &[])
            .unwrap();
    }
    let ports: Vec<i32> = cluster
        .query("SELECT DISTINCT port FROM served", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ports, [i32::from(local.primary().port())]);
    let primary_port = i32::from(local.primary().port());
    for _ in 0..5 {
        let port: i32 = cluster
            .query_one("SELECT inet_server_port()", &[])
            .unwrap()
            .get(0);
        assert_eq!(port, primary_port);
        let port: i32 = cluster
            .with_client(|c| {
                c.query_one("SELECT inet_server_port()", &[])
                    .map_err(pgxkit::Error::from)
            })
            .unwrap()
            .get(0);
        assert_eq!(port, primary_port);
    }

    let stats = cluster.stats();
    assert_eq!(stats.primary().unwrap().node.role(), Role::Primary);
    assert_eq!(stats.replicas().count(), 2);
    let replica_reads: u64 = stats.replicas().map(|n| n.pool.acquire_count).sum();
    assert_eq!(replica_reads, 202);
}

#[test]
fn the_first_two_reading_threads_take_the_two_replicas() {
    // Turns are counted over the replicas, not over every node: the
    // primary's place in the node list takes no turn.
    let local = LocalCluster::start(2).unwrap();
    let cluster = builder_for(&local).build().unwrap();
    let mut ports: Vec<u16> = (0..2)
        .map(|_| read_port_from_new_thread(&cluster))
        .collect();
    ports.sort_unstable();
    let mut replicas: Vec<u16> = local.replicas().iter().map(|r| r.port()).collect();
    replicas.sort_unstable();
    assert_eq!(ports, replicas);
}

#[test]
fn by_default_each_thread_stays_on_one_replica_and_threads_spread_evenly() {
    const THREADS: usize = 6;
    let local = LocalCluster::start(2).unwrap();
    let cluster = builder_for(&local).build().unwrap();
    let per_thread: Vec<HashMap<u16, usize>> = thread::scope(|s| {
        let workers: Vec<_> = (0..THREADS)
            .map(|_| {
                s.spawn(|| {
                    let mut ports: HashMap<u16, usize> = HashMap::new();
                    for _ in 0..50 {
                        *ports.entry(read_port(&cluster)).or_default() += 1;
                    }
                    ports
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let mut threads_per_port: HashMap<u16, usize> = HashMap::new();
    for ports in &per_thread {
        assert_eq!(
            ports.len(),
            1,
            "a thread's reads went to several nodes: {ports:?}"
        );
        let (&port, &reads) = ports.iter().next().unwrap();
        assert_eq!(reads, 50);
        *threads_per_port.entry(port).or_default() += 1;
    }
    let expected: HashMap<u16, usize> = local
        .replicas()
        .iter()
        .map(|r| (r.port(), THREADS / 2))
        .collect();
    assert_eq!(threads_per_port, expected);
}

#[test]
fn with_no_replicas_reads_go_to_the_primary() {
    let local = LocalCluster::start(0).unwrap();
    let cluster = Cluster::connect(&local.primary_dsn()).unwrap();
    for _ in 0..10 {
        assert_eq!(read_port(&cluster), local.primary().port());
    }
}

#[test]
fn connect_read_write_splits_reads_and_writes() {
    let local = LocalCluster::start(1).unwrap();
    let read = format!("{}?pool_max_conns=7", local.replicas()[0].dsn());
    let write = format!("{}?pool_max_conns=3", local.primary_dsn());
    let cluster = Cluster::connect_read_write(&read, &write).unwrap();
    assert_eq!(read_port(&cluster), local.replicas()[0].port());
    let stats = cluster.stats();
    assert_eq!(stats.primary().unwrap().pool.max_conns, 3);
    assert_eq!(stats.node("replica1").unwrap().pool.max_conns, 7);
}

#[test]
fn sixteen_threads_of_mixed_operations_add_up() {
    const THREADS: usize = 16;
    const OPS: usize = 2_000;
    let local = LocalCluster::start(2).unwrap();
    let cluster = builder_for(&local).max_conns(8).build().unwrap();
    cluster
        .batch_execute("CREATE TABLE events (thread int, n int, PRIMARY KEY (thread, n))")
        .unwrap();
    let setup_acquires = cluster.stats().total_acquire_count();

    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let cluster = cluster.clone();
            thread::spawn(move || {
                let t = t as i32;
                for n in 0..OPS as i32 {
                    match n % 4 {
                        0 => {
                            cluster
                                .execute("INSERT INTO events VALUES ($1, $2)", &[&t, &n])
                                .unwrap();
                        }
                        1 => {
                            cluster
                                .replica()
                                .query("SELECT 1 FROM pg_class LIMIT 3", &[])
                                .unwrap();
                        }
                        2 => {
                            let v: i32 = cluster
                                .replica()
                                .query_one("SELECT $1::int", &[&n])
                                .unwrap()
                                .get(0);
                            assert_eq!(v, n);
                        }
                        _ => {
                            let row = cluster
                                .query_opt(
                                    "SELECT n FROM events WHERE thread = $1 AND n = $2",
                                    &[&t, &(n - 3)],
                                )
                                .unwrap();
                            assert_eq!(row.map(|r| r.get::<_, i32>(0)), Some(n - 3));
                        }
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }

    let stats = cluster.stats();
    assert_eq!(
        stats.total_acquire_count() - setup_acquires,
        (THREADS * OPS) as u64,
        "one checkout per operation"
    );
    assert_eq!(stats.total_in_use(), 0, "a connection was left checked out");
    for node in &stats.nodes {
        assert!(node.pool.total_conns <= 8, "{}: {:?}", node.node, node.pool);
        assert_eq!(node.pool.checkout_timeouts, 0);
    }
    let writes: i64 = cluster
        .query_one("SELECT count(*) FROM events", &[])
        .unwrap()
        .get(0);
    assert_eq!(writes, (THREADS * OPS / 4) as i64);
    // Reads were shared by the replicas; the primary saw only the writes and query_opt.
    let primary = stats.primary().unwrap().pool.acquire_count - setup_acquires;
    assert_eq!(primary, (THREADS * OPS / 2) as u64);
}

#[test]
fn query_one_and_query_opt_count_rows() {
    let local = LocalCluster::start(0).unwrap();
    let cluster = Cluster::connect(&local.primary_dsn()).unwrap();
    let none = cluster.query_one("SELECT 1 WHERE false", &[]).unwrap_err();
    assert_eq!(none.kind(), ErrorKind::NotFound);
    assert_eq!(none.node().unwrap().name(), "primary");
    let many = cluster
        .query_one("SELECT generate_series(1, 2)", &[])
        .unwrap_err();
    assert_eq!(many.kind(), ErrorKind::TooManyRows);
    assert_eq!(
        cluster
            .query_opt("SELECT 1 WHERE false", &[])
            .unwrap()
            .map(|_| ()),
        None
    );
    assert_eq!(
        cluster
            .replica()
            .query_opt("SELECT generate_series(1, 3)", &[])
            .unwrap_err()
            .kind(),
        ErrorKind::TooManyRows
    );
    assert_eq!(
        cluster
            .replica()
            .query_one("SELECT 1 WHERE false", &[])
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound
    );

    // query_one stops reading at the second row; the rest is discarded and
    // the one connection serves the next statements, in and out of a
    // transaction, with nothing counted against the node.
    let one = Cluster::builder()
        .primary(local.primary_dsn())
        .max_conns(1)
        .build()
        .unwrap();
    for i in 0..3 {
        let many = one
            .query_one("SELECT generate_series(1, 10000)", &[])
            .unwrap_err();
        assert_eq!(many.kind(), ErrorKind::TooManyRows, "{many:?}");
        let row = one.query_one("SELECT $1::int", &[&i]).unwrap();
        assert_eq!(row.get::<_, i32>(0), i);
    }
    one.transaction(|tx| -> pgxkit::Result<_> {
        let many = tx
            .query_opt("SELECT generate_series(1, 10000)", &[])
            .unwrap_err();
        assert_eq!(many.kind(), ErrorKind::TooManyRows);
        assert_eq!(tx.query_one("SELECT 5", &[])?.get::<_, i32>(0), 5);
        Ok(())
    })
    .unwrap();
    let stats = one.stats();
    let pool = &stats.primary().unwrap().pool;
    assert_eq!((pool.new_conns, pool.closed_broken), (1, 0), "{pool:?}");
    assert_eq!(
        stats.primary().unwrap().breaker,
        pgxkit::BreakerState::Closed
    );
}

#[test]
fn server_errors_carry_code_node_and_source() {
    let local = LocalCluster::start(0).unwrap();
    let cluster = Cluster::connect(&local.primary_dsn()).unwrap();
    cluster
        .batch_execute("CREATE TABLE u (id int PRIMARY KEY)")
        .unwrap();
    cluster.execute("INSERT INTO u VALUES (1)", &[]).unwrap();
    let err = cluster
        .execute("INSERT INTO u VALUES (1)", &[])
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Db);
    assert_eq!(
        err.code(),
        Some(&pgxkit::postgres::error::SqlState::UNIQUE_VIOLATION)
    );
    assert!(!err.is_connection_error() && !err.is_retryable());
    assert!(
        err.as_db_error()
            .unwrap()
            .message()
            .contains("duplicate key")
    );
    assert!(std::error::Error::source(&err).is_some());
    let text = err.to_string();
    assert!(text.contains("23505") && text.contains("primary"), "{text}");
    // Debug (what `main` prints for an `Err`) carries the server's words.
    assert!(
        format!("{err:?}").contains("duplicate key value"),
        "{err:?}"
    );
    // The failed statement did not break the connection.
    assert_eq!(cluster.stats().primary().unwrap().pool.closed_broken, 0);
    let syntax = cluster.execute("SELEC 1", &[]).unwrap_err();
    assert_eq!(
        syntax.code(),
        Some(&pgxkit::postgres::error::SqlState::SYNTAX_ERROR)
    );
}

#[test]
fn an_unreachable_replica_does_not_fail_build_and_rejoins_when_it_answers() {
    let local = LocalCluster::start(2).unwrap();
    let (alive, down) = (&local.replicas()[0], &local.replicas()[1]);
    down.stop().unwrap();
    let cluster = builder_for(&local)
        .health_check_period(Duration::from_millis(100))
        .build()
        .unwrap();
    assert!(!cluster.stats().node("replica2").unwrap().up);
    for _ in 0..20 {
        assert_eq!(read_port(&cluster), alive.port());
    }
    down.start().unwrap();
    wait_for(
        "replica2 to get reads again",
        Duration::from_secs(10),
        || read_port_from_new_thread(&cluster) == down.port(),
    );
    assert!(cluster.stats().node("replica2").unwrap().up);
}

#[test]
fn an_unreachable_primary_fails_build_unless_lazy() {
    let local = LocalCluster::start(0).unwrap();
    let dsn = format!("{}?connect_timeout=5", local.primary_dsn());
    local.primary().stop().unwrap();
    let started = Instant::now();
    let err = Cluster::connect(&dsn).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connect);
    assert_eq!(err.node().unwrap().role(), Role::Primary);
    assert!(err.is_connection_error());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refused connections must fail fast"
    );

    let cluster = Cluster::builder()
        .primary(&dsn)
        .lazy_connect(true)
        .checkout_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let err = cluster.execute("SELECT 1", &[]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connect, "{err}");
    assert!(err.to_string().contains("primary"), "{err}");
    assert_eq!(cluster.stats().primary().unwrap().pool.checkout_timeouts, 1);
    local.primary().start().unwrap();
    cluster.execute("SELECT 1", &[]).unwrap();
}

#[test]
fn busy_pool_times_out_with_pool_timeout() {
    let local = LocalCluster::start(0).unwrap();
    let cluster = Cluster::builder()
        .primary(local.primary_dsn())
        .max_conns(1)
        .checkout_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let inner = cluster.clone();
    let err = cluster
        .with_client(move |_held| -> pgxkit::Result<_> {
            let started = Instant::now();
            let err = inner.execute("SELECT 1", &[]).unwrap_err();
            let waited = started.elapsed();
            assert!(
                waited >= Duration::from_millis(200) && waited < Duration::from_secs(2),
                "{waited:?}"
            );
            Ok(err)
        })
        .unwrap();
    assert_eq!(err.kind(), ErrorKind::PoolTimeout, "{err}");
    assert!(err.to_string().contains("all 1 connections busy"), "{err}");
}

#[test]
fn checkout_validates_only_connections_idle_past_the_threshold() {
    let local = LocalCluster::start(0).unwrap();
    let cluster = Cluster::builder()
        .primary(local.primary_dsn())
        .max_conns(1)
        .validate_after_idle(Duration::from_millis(300))
        .build()
        .unwrap();
    cluster.execute("SELECT 1", &[]).unwrap();
    let before = cluster.stats().primary().unwrap().pool.validations;
    for _ in 0..500 {
        cluster.execute("SELECT 1", &[]).unwrap();
    }
    assert_eq!(
        cluster.stats().primary().unwrap().pool.validations,
        before,
        "busy checkouts must not ping"
    );

    // A backend killed while the connection idles: the validation on the
    // next checkout finds it dead, discards it and opens a new one, and the
    // caller never sees the failure.
    let pid = common::terminate_pooled_backend(&cluster, &local);
    let idle_from = Instant::now();
    wait_for("the idle threshold to pass", Duration::from_secs(5), || {
        idle_from.elapsed() > Duration::from_millis(350)
    });
    let new_pid: i32 = cluster
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap()
        .get(0);
    assert_ne!(new_pid, pid);
    let pool = cluster.stats().primary().unwrap().pool.clone();
    assert_eq!(pool.validations, before + 1);
    assert_eq!(pool.closed_broken, 1);
}

#[test]
fn a_connection_broken_mid_use_is_discarded() {
    let local = LocalCluster::start(0).unwrap();
    let cluster = Cluster::builder()
        .primary(local.primary_dsn())
        .max_conns(1)
        .validate_after_idle(Duration::from_secs(3600))
        .build()
        .unwrap();
    common::terminate_pooled_backend(&cluster, &local);
    // No validation (the threshold is an hour): the statement meets the dead connection.
    let err = cluster.execute("SELECT 1", &[]).unwrap_err();
    assert!(err.is_connection_error(), "{err:?}");
    assert_eq!(cluster.stats().primary().unwrap().pool.closed_broken, 1);
    cluster.execute("SELECT 1", &[]).unwrap();
}

#[test]
fn lifetime_jitter_spreads_expiry() {
    const CONNS: usize = 8;
    let local = LocalCluster::start(0).unwrap();
    let app = "jitter_test";
    let cluster = Cluster::builder()
        .primary(local.primary_dsn())
        .max_conns(CONNS as u32)
        .max_conn_lifetime(Duration::from_millis(500))
        .max_conn_lifetime_jitter(Duration::from_secs(3))
        .validate_after_idle(Duration::from_secs(3600))
        .application_name(app)
        .build()
        .unwrap();
    let mut admin = local.primary().client().unwrap();
    // Each closed connection's lifetime lies between its age when last seen
    // and its age at the first look it was gone. Bounds, not the last age
    // alone: on a loaded machine a round can take most of a second, and the
    // last ages then measure the rounds, not the lifetimes.
    let mut last_seen: HashMap<i32, (f64, f64)> = HashMap::new(); // pid -> (start, age)
    let mut bounds: Vec<(f64, f64)> = Vec::new();
    let spread = |bounds: &[(f64, f64)]| {
        let lowest_upper = bounds.iter().map(|b| b.1).fold(f64::MAX, f64::min);
        let highest_lower = bounds.iter().map(|b| b.0).fold(0.0, f64::max);
        highest_lower - lowest_upper
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while (bounds.len() < CONNS || spread(&bounds) <= 0.5) && Instant::now() < deadline {
        // Check out every connection at once, so each is looked at each round.
        let barrier = Arc::new(Barrier::new(CONNS));
        let holders: Vec<_> = (0..CONNS)
            .map(|_| {
                let (cluster, barrier) = (cluster.clone(), Arc::clone(&barrier));
                thread::spawn(move || {
                    cluster
                        .with_client(|_| -> pgxkit::Result<_> {
                            barrier.wait();
                            Ok(())
                        })
                        .unwrap()
                })
            })
            .collect();
        for h in holders {
            h.join().unwrap();
        }
        let now: f64 = admin
            .query_one("SELECT extract(epoch FROM clock_timestamp())::float8", &[])
            .unwrap()
            .get(0);
        let rows = admin
            .query(
                "SELECT pid, extract(epoch FROM backend_start)::float8 \
                 FROM pg_stat_activity WHERE application_name = $1",
                &[&app],
            )
            .unwrap();
        let alive: HashSet<i32> = rows.iter().map(|r| r.get(0)).collect();
        for (pid, (start, age)) in &last_seen {
            if !alive.contains(pid) {
                bounds.push((*age, now - start));
            }
        }
        last_seen = rows
            .iter()
            .map(|r| {
                let start: f64 = r.get(1);
                (r.get(0), (start, now - start))
            })
            .collect();
        thread::sleep(Duration::from_millis(30));
    }
    assert!(
        bounds.len() >= CONNS,
        "only {} connections expired",
        bounds.len()
    );
    // Without jitter every lifetime would be 0.5 s: here one connection
    // provably lived more than 0.5 s longer than another.
    assert!(
        spread(&bounds) > 0.5,
        "lifetimes (lower, upper bound) of {} connections, first {:?}, are not provably spread",
        bounds.len(),
        &bounds[..bounds.len().min(12)]
    );
    assert!(
        bounds.iter().all(|b| b.1 >= 0.45),
        "a connection closed before its lifetime: {:?}",
        bounds.iter().find(|b| b.1 < 0.45)
    );
    assert!(cluster.stats().primary().unwrap().pool.closed_lifetime >= CONNS as u64);
}

/// The backend of each of `threads` threads' `queries` queries, run at
/// once on a fresh primary with one connection per thread at most.
fn backends_seen_by_each_thread(threads: usize, queries: usize) -> Vec<Vec<i32>> {
    let local = LocalCluster::start(0).unwrap();
    let cluster = Cluster::builder()
        .primary(local.primary_dsn())
        .max_conns(threads as u32)
        .build()
        .unwrap();
    assert_eq!(
        cluster.stats().primary().unwrap().pool.total_conns,
        0,
        "starts empty"
    );
    let barrier = Arc::new(Barrier::new(threads));
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (cluster, barrier) = (cluster.clone(), barrier.clone());
            thread::spawn(move || {
                barrier.wait();
                (0..queries)
                    .map(|_| {
                        cluster
                            .query_one("SELECT pg_backend_pid()", &[])
                            .unwrap()
                            .get::<_, i32>(0)
                    })
                    .collect::<Vec<i32>>()
            })
        })
        .collect();
    workers.into_iter().map(|w| w.join().unwrap()).collect()
}

#[test]
fn each_thread_keeps_its_own_connection() {
    for pids in backends_seen_by_each_thread(4, 400) {
        // A thread gets back the connection it used last.
        let late: HashSet<i32> = pids[200..].iter().copied().collect();
        assert_eq!(late.len(), 1, "a thread switched backends: {late:?}");
    }
}

#[test]
fn while_the_pool_fills_each_thread_keeps_the_first_connection_it_gets() {
    const THREADS: usize = 6;
    let seen: Vec<HashSet<i32>> = backends_seen_by_each_thread(THREADS, 200)
        .into_iter()
        .map(|pids| pids.into_iter().collect())
        .collect();
    // Each thread waited for a connection of its own to be opened rather
    // than for another thread's to be handed over.
    assert!(
        seen.iter().all(|pids| pids.len() == 1),
        "backends seen by each thread: {seen:?}"
    );
    let all: HashSet<i32> = seen.into_iter().flatten().collect();
    assert_eq!(all.len(), THREADS, "one connection per thread");
}

#[test]
fn a_checkout_the_server_refuses_a_new_connection_for_is_served_by_a_release() {
    const THREADS: usize = 3;
    let local = LocalCluster::start(0).unwrap();
    Cluster::connect(&local.primary_dsn())
        .unwrap()
        .batch_execute("CREATE ROLE limited LOGIN CONNECTION LIMIT 3")
        .unwrap();
    // Room for three in the pool, two on the server (the health monitor's
    // probe connection, opened at build, takes the third): the third
    // connection the pool tries to open is refused.
    let cluster = Cluster::builder()
        .primary(local.primary_dsn().replacen("postgres@", "limited@", 1))
        .max_conns(THREADS as u32)
        .checkout_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let barrier = Arc::new(Barrier::new(THREADS));
    let workers: Vec<_> = (0..THREADS)
        .map(|_| {
            let (cluster, barrier) = (cluster.clone(), barrier.clone());
            thread::spawn(move || {
                barrier.wait();
                (0..100)
                    .map(|_| cluster.query_one("SELECT 1", &[]).map(|_| ()))
                    .collect::<Result<Vec<()>, _>>()
            })
        })
        .collect();
    for w in workers {
        if let Err(e) = w.join().unwrap() {
            panic!("a query failed: {e}");
        }
    }
    let pool = cluster.stats().primary().unwrap().pool.clone();
    assert!(
        pool.connect_failures >= 1,
        "the server never refused: {pool:?}"
    );
    assert_eq!(pool.total_conns, 2, "{pool:?}");
}

#[test]
fn many_threads_share_few_connections_without_starving() {
    const THREADS: usize = 64;
    let local = LocalCluster::start(0).unwrap();
    let cluster = Cluster::builder()
        .primary(local.primary_dsn())
        .max_conns(8)
        .build()
        .unwrap();
    let workers: Vec<_> = (0..THREADS)
        .map(|_| {
            let cluster = cluster.clone();
            thread::spawn(move || {
                let mut worst = Duration::ZERO;
                for _ in 0..100 {
                    let started = Instant::now();
                    cluster.execute("SELECT 1", &[]).unwrap();
                    worst = worst.max(started.elapsed());
                }
                worst
            })
        })
        .collect();
    let worst = workers
        .into_iter()
        .map(|w| w.join().unwrap())
        .max()
        .unwrap();
    let stats = cluster.stats().primary().unwrap().pool.clone();
    assert_eq!(stats.checkout_timeouts, 0);
    assert_eq!(stats.acquire_count, (THREADS * 100) as u64);
    assert!(stats.total_conns <= 8);
    assert!(
        worst < Duration::from_secs(2),
        "a thread waited {worst:?} for one operation"
    );
}

#[test]
fn idle_connections_close_after_max_conn_idle_time() {
    const IDLE: Duration = Duration::from_secs(1);
    let local = LocalCluster::start(0).unwrap();
    let cluster = Cluster::builder()
        .primary(local.primary_dsn())
        .max_conns(3)
        .max_conn_idle_time(IDLE)
        .build()
        .unwrap();
    // Three connections at once, from three threads.
    let barrier = Barrier::new(3);
    thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| {
                cluster
                    .with_client(|c| -> pgxkit::Result<_> {
                        barrier.wait();
                        Ok(c.query_one("SELECT 1", &[])?)
                    })
                    .unwrap()
            });
        }
    });
    let released = Instant::now();
    assert_eq!(cluster.stats().primary().unwrap().pool.total_conns, 3);
    let backends = || -> i64 {
        local
            .primary()
            .client()
            .unwrap()
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgxkit'",
                &[],
            )
            .unwrap()
            .get(0)
    };
    assert_eq!(backends(), 3);
    wait_for("idle connections to close", IDLE * 3, || {
        cluster.stats().primary().unwrap().pool.total_conns == 0
    });
    // Not before their idle time (a delayed test thread only sees it later).
    assert!(
        released.elapsed() >= IDLE - Duration::from_millis(100),
        "closed after {:?}",
        released.elapsed()
    );
    assert_eq!(cluster.stats().primary().unwrap().pool.closed_idle, 3);
    wait_for("their backends to end", Duration::from_secs(5), || {
        backends() == 0
    });
}
