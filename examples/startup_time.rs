//! Start-up costs, medians of 5 runs: `LocalCluster::start(2)`, and
//! `Cluster::build()` over a primary and two replicas (lazy, so no
//! connection is opened) with `sslmode=disable` and `sslmode=prefer`.
//!
//! ```sh
//! cargo run --release --example startup_time
//! ```
use std::time::{Duration, Instant};

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let cluster = pgxkit::testkit::LocalCluster::start(2)?;
        times.push(t.elapsed());
        drop(cluster);
    }
    let min = times.iter().min().copied().unwrap_or_default();
    let max = times.iter().max().copied().unwrap_or_default();
    println!(
        "LocalCluster::start(2): median {:?}, min {min:?}, max {max:?}",
        median(times)
    );

    let local = pgxkit::testkit::LocalCluster::start(2)?;
    for mode in ["disable", "prefer"] {
        let dsn = |dsn: String| format!("{dsn}?sslmode={mode}");
        let mut times = Vec::new();
        for _ in 0..5 {
            let mut builder = pgxkit::Cluster::builder()
                .primary(dsn(local.primary_dsn()))
                .lazy_connect(true);
            for replica in local.replica_dsns() {
                builder = builder.replica(dsn(replica));
            }
            let t = Instant::now();
            let cluster = builder.build()?;
            times.push(t.elapsed());
            drop(cluster);
        }
        println!(
            "Cluster::build(), 3 nodes, sslmode={mode}: median {:?}",
            median(times)
        );
    }
    Ok(())
}
