//! pgxkit quickstart.
//!
//! ```sh
//! cargo run --example quickstart
//! ```
//!
//! With no configuration it starts a throw-away primary with two streaming
//! replicas (the testkit) and runs a small workload through a `Cluster`;
//! with `POSTGRES_HOST` set it uses your servers instead (`Cluster::from_env`,
//! replicas from `POSTGRES_REPLICA_HOSTS`) and works in a temporary table.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use pgxkit::Cluster;
use pgxkit::testkit::LocalCluster;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut _local = None;
    let cluster = if std::env::var_os("POSTGRES_HOST").is_some() {
        println!("using the servers from POSTGRES_* variables");
        Cluster::from_env()?
    } else {
        let started = Instant::now();
        let local = LocalCluster::start(2)?;
        println!(
            "started a throw-away primary and 2 replicas in {:.1?}",
            started.elapsed()
        );
        let builder = Cluster::builder()
            .primary(local.primary_dsn())
            .replica(local.replica_dsns()[0].clone())
            .replica(local.replica_dsns()[1].clone());
        _local = Some(local);
        builder.application_name("pgxkit-quickstart").build()?
    };
    for node in &cluster.stats().nodes {
        println!("  {}", node.node);
    }

    // Writes go to the primary.
    cluster.batch_execute(
        "DROP TABLE IF EXISTS quickstart_users;
         CREATE TABLE quickstart_users (id bigserial PRIMARY KEY, name text NOT NULL)",
    )?;
    let mut writes_by_port: BTreeMap<i32, u32> = BTreeMap::new();
    for name in ["ada", "grace", "edsger", "barbara", "donald"] {
        let row = cluster.query_one(
            "INSERT INTO quickstart_users (name) VALUES ($1) RETURNING inet_server_port()",
            &[&name],
        )?;
        *writes_by_port.entry(row.get(0)).or_default() += 1;
    }

    // Reads go to the replicas, once they have the rows.
    if let Some(local) = &_local {
        local.wait_for_replicas_caught_up(Duration::from_secs(10))?;
    } else {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cluster
            .replica()
            .query_opt("SELECT 1 FROM quickstart_users HAVING count(*) = 5", &[])
            .is_ok_and(|row| row.is_some())
        {
            if Instant::now() > deadline {
                return Err("the replicas did not catch up within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let read_port = |cluster: &Cluster| -> Result<i32, pgxkit::Error> {
        let row = cluster.replica().query_one(
            "SELECT inet_server_port(), count(*) FROM quickstart_users",
            &[],
        )?;
        Ok(row.get(0))
    };
    // One thread: all its reads go to one replica. The default balance
    // (ReadBalance::PerThread) keeps each thread on one replica, and so on
    // one server backend, which is what makes pooled reads as fast as a
    // dedicated connection; the threads are spread round-robin.
    let mut one_thread: BTreeMap<i32, u32> = BTreeMap::new();
    for _ in 0..100 {
        *one_thread.entry(read_port(&cluster)?).or_default() += 1;
    }
    // Four threads, 25 reads each: each new thread takes the next replica.
    let per_thread: Vec<BTreeMap<i32, u32>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    let mut seen: BTreeMap<i32, u32> = BTreeMap::new();
                    for _ in 0..25 {
                        *seen.entry(read_port(&cluster)?).or_default() += 1;
                    }
                    Ok::<_, pgxkit::Error>(seen)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("a reader thread panicked"))
            .collect::<Result<_, _>>()
    })?;
    cluster.batch_execute("DROP TABLE quickstart_users")?;

    println!("\nwrites by server port: {writes_by_port:?}");
    println!("100 reads from one thread, by server port: {one_thread:?}");
    println!("  (a thread stays on one replica: ReadBalance::PerThread, the default)");
    for (i, seen) in per_thread.iter().enumerate() {
        println!("25 reads from thread {}, by server port: {seen:?}", i + 1);
    }
    println!("  (threads are spread round-robin over the replicas;");
    println!("   .read_balance(ReadBalance::PerCall) alternates every read instead)");
    println!(
        "\n{:<10} {:>4} {:>6} {:>5} {:>9} {:>9}",
        "node", "max", "total", "idle", "acquires", "new conns"
    );
    for node in cluster.stats().nodes {
        let p = &node.pool;
        println!(
            "{:<10} {:>4} {:>6} {:>5} {:>9} {:>9}",
            node.node.name(),
            p.max_conns,
            p.total_conns,
            p.idle_conns,
            p.acquire_count,
            p.new_conns
        );
    }
    Ok(())
}
