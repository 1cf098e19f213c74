//! The health monitor: one background thread per cluster that probes every
//! node each `health_check_period` and records whether it is up.
//!
//! It holds only a `Weak` reference to the cluster and stops when the
//! cluster is dropped (the stop channel disconnects) or shut down.

use std::sync::Weak;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam_channel::{Receiver, select, tick};

use crate::cluster::Inner;
use crate::node::Node;

/// Bound on one probe's round trip (beside the connect timeout for a new
/// probe connection).
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) fn spawn(
    cluster: Weak<Inner>,
    period: Duration,
    stop: Receiver<()>,
) -> std::io::Result<JoinHandle<()>> {
    thread::Builder::new()
        .name("pgxkit-health".to_owned())
        .spawn(move || run(&cluster, period, &stop))
}

fn run(cluster: &Weak<Inner>, period: Duration, stop: &Receiver<()>) {
    let ticker = tick(period);
    // One probe connection per node, kept between rounds.
    let mut probes: Vec<Option<postgres::Client>> = Vec::new();
    loop {
        select! {
            recv(stop) -> _ => return,
            recv(ticker) -> _ => {}
        }
        let Some(inner) = cluster.upgrade() else {
            return;
        };
        let nodes: Vec<&Node> = inner.nodes().collect();
        probes.resize_with(nodes.len(), || None);
        for (node, probe) in nodes.into_iter().zip(probes.iter_mut()) {
            let ok = check(node, probe);
            if node.set_up(ok) != ok {
                if ok {
                    log::info!("{} is up again", node.info);
                } else {
                    log::warn!("{} is down", node.info);
                }
            }
        }
    }
}

/// One probe: reuse or open the node's probe connection, then a round trip.
fn check(node: &Node, probe: &mut Option<postgres::Client>) -> bool {
    if probe.is_none() {
        match node.connect_direct() {
            Ok(client) => *probe = Some(client),
            Err(e) => {
                log::debug!("health probe of {}: {e}", node.info);
                return false;
            }
        }
    }
    let ok = probe
        .as_mut()
        .is_some_and(|client| client.is_valid(PROBE_TIMEOUT).is_ok());
    if !ok {
        *probe = None;
    }
    ok
}
