//! Picks the replica for a read: round-robin over the eligible ones.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// Round-robin over whichever of `n` candidates are eligible at the moment.
#[derive(Debug, Default)]
pub(crate) struct RoundRobin {
    next: AtomicUsize,
}

impl RoundRobin {
    /// The index of the next eligible candidate, or `None` when none is.
    /// Turns are counted over the eligible ones, so when one of three
    /// replicas is out the other two still share reads evenly.
    pub(crate) fn pick(&self, n: usize, eligible: impl Fn(usize) -> bool) -> Option<usize> {
        let count = (0..n).filter(|&i| eligible(i)).count();
        if count == 0 {
            return None;
        }
        let turn = self.next.fetch_add(1, Relaxed) % count;
        (0..n).filter(|&i| eligible(i)).nth(turn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tally(rr: &RoundRobin, n: usize, eligible: &[bool], picks: usize) -> Vec<usize> {
        let mut counts = vec![0; n];
        for _ in 0..picks {
            counts[rr.pick(n, |i| eligible[i]).unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn spreads_evenly_over_all() {
        assert_eq!(
            tally(&RoundRobin::default(), 3, &[true; 3], 300),
            [100, 100, 100]
        );
    }

    #[test]
    fn skips_ineligible_and_stays_even() {
        let counts = tally(&RoundRobin::default(), 3, &[false, true, true], 300);
        assert_eq!(counts, [0, 150, 150]);
    }

    #[test]
    fn none_when_nothing_is_eligible() {
        let rr = RoundRobin::default();
        assert_eq!(rr.pick(2, |_| false), None);
        assert_eq!(rr.pick(0, |_| true), None);
    }
}
