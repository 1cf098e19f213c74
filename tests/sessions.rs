//! Read-your-writes sessions against real replicas, one of them with its
//! replay paused: every read sees its own write, and the paused replica
//! gets none of those reads.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{builder_for, wait_for};
use pgxkit::ErrorKind;
use pgxkit::testkit::LocalCluster;

const THREADS: i32 = 8;
const PAIRS: i32 = 1_250; // x 8 threads = 10,000 write-then-read pairs

#[test]
fn ten_thousand_write_then_read_pairs_see_their_write_and_skip_the_paused_replica() {
    let local = LocalCluster::start(2).unwrap();
    let cluster = builder_for(&local)
        .health_check_period(Duration::from_millis(500))
        .max_conns(THREADS as u32)
        .build()
        .unwrap();
    cluster
        .batch_execute("CREATE TABLE ryw (t int, i int, PRIMARY KEY (t, i))")
        .unwrap();
    local
        .wait_for_replicas_caught_up(Duration::from_secs(30))
        .unwrap();
    let paused = local.replicas()[1].port();
    local.replicas()[1].pause_replay().unwrap();

    // Without a session a thread reading from the paused replica misses its
    // write: what the sessions below must never do.
    let missed_without = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let cluster = &cluster;
                s.spawn(move || {
                    (0..20)
                        .filter(|&i| {
                            cluster
                                .execute("INSERT INTO ryw VALUES ($1, $2)", &[&(100 + t), &i])
                                .unwrap();
                            let n: i64 = cluster
                                .replica()
                                .query_one(
                                    "SELECT count(*) FROM ryw WHERE t = $1 AND i = $2",
                                    &[&(100 + t), &i],
                                )
                                .unwrap()
                                .get(0);
                            n == 0
                        })
                        .count()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .sum::<usize>()
    });
    assert!(
        missed_without > 0,
        "plain replica reads all saw their write: the test proves nothing"
    );

    let per_port: HashMap<i32, usize> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let cluster = &cluster;
                s.spawn(move || {
                    let session = cluster.session().wait(Duration::from_millis(20));
                    let mut ports: HashMap<i32, usize> = HashMap::new();
                    for i in 0..PAIRS {
                        session
                            .execute("INSERT INTO ryw VALUES ($1, $2)", &[&t, &i])
                            .unwrap();
                        let row = session
                            .query_one(
                                "SELECT count(*), inet_server_port() FROM ryw WHERE t = $1 AND i = $2",
                                &[&t, &i],
                            )
                            .unwrap();
                        let (n, port): (i64, i32) = (row.get(0), row.get(1));
                        assert_eq!(n, 1, "thread {t} pair {i}: its write not seen on port {port}");
                        *ports.entry(port).or_default() += 1;
                    }
                    ports
                })
            })
            .collect();
        let mut all = HashMap::new();
        for h in handles {
            for (port, n) in h.join().unwrap() {
                *all.entry(port).or_default() += n;
            }
        }
        all
    });
    println!(
        "reads by port: {per_port:?} (primary {}, replica {}, paused {paused}); \
         {missed_without} of 80 plain reads missed their write",
        local.primary().port(),
        local.replicas()[0].port()
    );
    assert_eq!(per_port.values().sum::<usize>(), (THREADS * PAIRS) as usize);
    assert_eq!(
        per_port.get(&i32::from(paused)),
        None,
        "a read on the paused replica"
    );
    assert!(
        per_port.contains_key(&i32::from(local.replicas()[0].port())),
        "no read went to the live replica: {per_port:?}"
    );
    local.replicas()[1].resume_replay().unwrap();
}

#[test]
fn a_token_carries_the_position_to_another_session() {
    let local = LocalCluster::start(1).unwrap();
    let cluster = builder_for(&local).build().unwrap();
    cluster
        .batch_execute("CREATE TABLE carts (id int)")
        .unwrap();
    local
        .wait_for_replicas_caught_up(Duration::from_secs(30))
        .unwrap();
    let first = cluster.session();
    assert_eq!(first.token(), None);
    local.replicas()[0].pause_replay().unwrap();
    first.execute("INSERT INTO carts VALUES (1)", &[]).unwrap();
    let token = first.token().unwrap();
    assert!(token.contains('/'), "{token}");

    // Another request, another session: it still sees the write.
    let second = cluster.session_from_token(&token).unwrap();
    assert_eq!(second.token().as_deref(), Some(token.as_str()));
    let n: i64 = second
        .query_one("SELECT count(*) FROM carts", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    // A fresh session (no position) reads the lagging replica.
    let n: i64 = cluster
        .session()
        .query_one("SELECT count(*) FROM carts", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 0);

    // Once the replica caught up, the read goes there.
    local.replicas()[0].resume_replay().unwrap();
    wait_for(
        "the replica to serve the session",
        Duration::from_secs(10),
        || {
            let port: i32 = second
                .query_one("SELECT inet_server_port()", &[])
                .unwrap()
                .get(0);
            port as u16 == local.replicas()[0].port()
        },
    );
    // Transactions count as writes.
    second
        .transaction(|tx| tx.execute("INSERT INTO carts VALUES (2)", &[]))
        .unwrap();
    assert!(second.token().unwrap() != token);

    for bad in ["", "16B3748", "0/xyz", "0/1/2", "100000000/0"] {
        let err = cluster.session_from_token(bad).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(err.to_string().contains("session token"), "{err}");
    }
}
