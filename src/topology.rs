//! Which node is the primary, learnt from the servers themselves: every
//! health probe reads `pg_is_in_recovery()` and, on a server that is not
//! in recovery, its timeline (from the WAL file name of
//! `pg_current_wal_lsn()`, which moves at promotion, unlike the last
//! checkpoint's). After each probe the cluster decides again:
//!
//! - the primary is the node that answers and is not in recovery; when
//!   several claim it (split brain), the one on the newest timeline, the
//!   others get nothing (logged at `error`, and a warning in `health()`);
//! - the node believed primary that stops answering, or comes back in
//!   recovery, is primary no more: until another node claims the role,
//!   writes fail fast with [`ErrorKind::NoPrimary`](crate::ErrorKind::NoPrimary);
//! - every other node is a replica.
//!
//! A write that fails at the connection or with 25006 (read-only
//! transaction) asks the monitor for a probe round at once ([`Nodes::nudge`]).

use std::cmp::Reverse;
use std::sync::atomic::Ordering::{Acquire, Release};

use crate::info::Role;
use crate::node::{Node, Nodes};
use crate::sync::lock;

/// `Topology::primary` when no node is known to be primary.
pub(crate) const NO_PRIMARY: usize = usize::MAX;

/// What the monitor last learnt of one node, as the decision reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct View {
    /// Its last probe succeeded.
    pub(crate) up: bool,
    /// `pg_is_in_recovery()`, once a probe has read it.
    pub(crate) in_recovery: Option<bool>,
    /// Its timeline, when not in recovery.
    pub(crate) timeline: Option<u32>,
}

impl View {
    fn claims_primary(&self) -> bool {
        self.up && self.in_recovery == Some(false)
    }
}

/// The primary, given what each node showed and which one is primary now:
/// of the nodes that answer and are not in recovery, the one on the newest
/// timeline (on a tie, the current one, else the first); with none, the
/// current one only while nothing is known against it (up, its recovery
/// state not read yet: a cluster built with `lazy_connect`).
pub(crate) fn choose(current: Option<usize>, views: &[View]) -> Option<usize> {
    let best = views
        .iter()
        .enumerate()
        .filter(|(_, v)| v.claims_primary())
        .max_by_key(|&(i, v)| (v.timeline.unwrap_or(0), Some(i) == current, Reverse(i)));
    match best {
        Some((i, _)) => Some(i),
        None => current.filter(|&i| {
            views
                .get(i)
                .is_some_and(|v| v.up && v.in_recovery.is_none())
        }),
    }
}

fn timeline(view: View) -> String {
    view.timeline
        .map_or_else(|| "unknown".to_owned(), |t| t.to_string())
}

/// What the decisions remember between them.
#[derive(Debug, Default)]
pub(crate) struct Decisions {
    /// The nodes that last claimed the primary role together (logged once).
    split: Vec<usize>,
}

impl Nodes {
    /// The node writes go to now, if any.
    #[inline]
    pub(crate) fn primary(&self) -> Option<&Node> {
        self.nodes.get(self.primary.load(Acquire))
    }

    /// The index of the node writes go to now, if any.
    pub(crate) fn primary_index(&self) -> Option<usize> {
        let index = self.primary.load(Acquire);
        (index < self.nodes.len()).then_some(index)
    }

    /// The balancer's view of the replicas: how many turns there are, and
    /// the node of each (every node but the one with the primary role).
    #[inline]
    pub(crate) fn replica_slots<'n>(&'n self) -> (usize, impl Fn(usize) -> &'n Node + 'n) {
        let skip = self.primary_role.load(Acquire);
        let n = self.nodes.len() - usize::from(skip < self.nodes.len());
        (n, move |k: usize| {
            &self.nodes[if k >= skip { k + 1 } else { k }]
        })
    }

    /// Asks the monitor for a probe round now. Requests coalesce: one
    /// round at a time per cluster, however many writes fail.
    pub(crate) fn nudge(&self) {
        let _ = self.nudge.try_send(());
    }

    /// Decides again which node is primary (see the module's doc) and
    /// updates every node's role; logs, and runs the `on_role_change`
    /// hooks, for each change.
    pub(crate) fn decide(&self) {
        let mut decisions = lock(&self.decisions);
        let views: Vec<View> = self.nodes.iter().map(Node::view).collect();
        let current = self.primary_index();
        let chosen = choose(current, &views);

        let claims: Vec<usize> = (0..views.len())
            .filter(|&i| views[i].claims_primary())
            .collect();
        if claims.len() > 1 {
            if claims != decisions.split {
                let named = |i: usize| {
                    let info = &self.nodes[i].info;
                    format!("{} ({})", info.name(), info.address())
                };
                let who: Vec<String> = claims
                    .iter()
                    .map(|&i| format!("{} on timeline {}", named(i), timeline(views[i])))
                    .collect();
                let to = chosen.map_or_else(|| "none".to_owned(), named);
                log::error!(
                    "split brain: {} all claim to be primary (not in recovery); writes go to {to}, \
                     on the newest timeline; the others get neither writes nor reads",
                    who.join(", ")
                );
                decisions.split = claims;
            }
        } else if !decisions.split.is_empty() {
            log::warn!("split brain over: at most one node claims to be primary");
            decisions.split.clear();
        }

        // Roles first, so that a node becoming primary leaves reads before
        // it takes writes.
        for (i, node) in self.nodes.iter().enumerate() {
            let role = match chosen {
                Some(c) if c == i => Role::Primary,
                Some(_) => Role::Replica,
                None if views[i].in_recovery == Some(true) => Role::Replica,
                None => node.info.role(),
            };
            node.change_role(role);
        }
        let primary_role = self
            .nodes
            .iter()
            .position(|n| n.info.role() == Role::Primary)
            .unwrap_or(NO_PRIMARY);
        self.primary_role.store(primary_role, Release);
        if chosen != current {
            self.primary.store(chosen.unwrap_or(NO_PRIMARY), Release);
            match chosen {
                Some(c) => log::warn!(
                    "writes go to {} ({}) now, on timeline {}",
                    self.nodes[c].info.name(),
                    self.nodes[c].info.address(),
                    timeline(views[c])
                ),
                None => log::warn!(
                    "no node is known to be primary: writes fail with NoPrimary until a \
                     health probe finds one"
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOWN: View = View {
        up: false,
        in_recovery: None,
        timeline: None,
    };
    const UNKNOWN: View = View {
        up: true,
        in_recovery: None,
        timeline: None,
    };
    const REPLICA: View = View {
        up: true,
        in_recovery: Some(true),
        timeline: None,
    };
    fn primary(timeline: u32) -> View {
        View {
            up: true,
            in_recovery: Some(false),
            timeline: Some(timeline),
        }
    }

    #[test]
    fn the_node_not_in_recovery_is_primary() {
        assert_eq!(choose(Some(0), &[primary(1), REPLICA, REPLICA]), Some(0));
        assert_eq!(choose(None, &[REPLICA, primary(1), REPLICA]), Some(1));
        assert_eq!(choose(Some(0), &[REPLICA, REPLICA, primary(2)]), Some(2));
    }

    #[test]
    fn a_primary_that_is_down_or_in_recovery_is_none_until_another_claims() {
        assert_eq!(choose(Some(0), &[DOWN, REPLICA, REPLICA]), None);
        assert_eq!(choose(Some(0), &[REPLICA, REPLICA, REPLICA]), None);
        // Down, with what it was before: still not primary.
        let was_primary = View {
            up: false,
            ..primary(1)
        };
        assert_eq!(choose(Some(0), &[was_primary, REPLICA]), None);
        assert_eq!(choose(None, &[DOWN, DOWN]), None);
    }

    #[test]
    fn an_unprobed_primary_stays_until_something_is_known() {
        assert_eq!(choose(Some(0), &[UNKNOWN, UNKNOWN]), Some(0));
        assert_eq!(choose(None, &[UNKNOWN, UNKNOWN]), None);
        assert_eq!(choose(Some(0), &[UNKNOWN, primary(1)]), Some(1));
    }

    #[test]
    fn split_brain_goes_to_the_newest_timeline_then_the_current_one() {
        assert_eq!(choose(Some(0), &[primary(1), primary(2)]), Some(1));
        assert_eq!(choose(Some(1), &[primary(3), primary(2)]), Some(0));
        assert_eq!(choose(Some(1), &[primary(2), primary(2)]), Some(1));
        assert_eq!(choose(None, &[REPLICA, primary(2), primary(2)]), Some(1));
        // A down node's old claim counts for nothing.
        let stale = View {
            up: false,
            ..primary(9)
        };
        assert_eq!(choose(Some(0), &[stale, primary(2)]), Some(1));
    }
}
