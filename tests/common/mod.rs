//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use pgxkit::testkit::LocalCluster;
use pgxkit::{Cluster, ClusterBuilder};

/// A builder for `local`: its primary and every replica.
pub fn builder_for(local: &LocalCluster) -> ClusterBuilder {
    local
        .replica_dsns()
        .into_iter()
        .fold(Cluster::builder().primary(local.primary_dsn()), |b, dsn| {
            b.replica(dsn)
        })
}

/// The port of the server that ran a read.
pub fn read_port(cluster: &Cluster) -> u16 {
    let port: i32 = cluster
        .read_query_one("SELECT inet_server_port()", &[])
        .unwrap()
        .get(0);
    port as u16
}

/// Polls `condition` until it holds or `timeout` passes; panics with `what` then.
pub fn wait_for(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
