//! Measures how long `LocalCluster::start(2)` takes (median of 5 runs).
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let cluster = pgxkit::testkit::LocalCluster::start(2)?;
        times.push(t.elapsed());
        drop(cluster);
    }
    times.sort();
    println!(
        "LocalCluster::start(2): median {:?}, min {:?}, max {:?}",
        times[2], times[0], times[4]
    );
    Ok(())
}
