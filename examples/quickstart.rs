//! pgxkit quickstart: starts a throw-away primary with two streaming replicas
//! and shows replication working.
//!
//! ```sh
//! cargo run --example quickstart
//! ```

use std::time::{Duration, Instant};

use pgxkit::testkit::LocalCluster;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let started = Instant::now();
    let cluster = LocalCluster::start(2)?;
    println!(
        "started a primary and 2 replicas in {:.1?}",
        started.elapsed()
    );
    for node in cluster.nodes() {
        println!("  {:<9} {}", node.name(), node.dsn());
    }

    let mut primary = cluster.primary().client()?;
    primary.batch_execute(
        "CREATE TABLE greetings (id serial PRIMARY KEY, text text NOT NULL);
         INSERT INTO greetings (text) VALUES ('hello'), ('from'), ('the primary');",
    )?;
    cluster.wait_for_replicas_caught_up(Duration::from_secs(10))?;
    for replica in cluster.replicas() {
        let mut client = replica.client()?;
        let row = client.query_one(
            "SELECT string_agg(text, ' ' ORDER BY id), inet_server_port() FROM greetings",
            &[],
        )?;
        let text: String = row.get(0);
        let port: i32 = row.get(1);
        println!("{} (port {port}) reads: {text}", replica.name());
    }
    Ok(())
}
