//! Records of all rings back in time order. Each CPU writes to its own ring, so one socket's
//! transitions can sit in different rings (a close in the application's context on one CPU, the
//! peer's ACK in softirq on another). [`Reorder`] holds what was read for a short while and
//! merges the rings by timestamp once no ring can still hand over an older record; each ring's
//! records stay in ring order (no sort, no copies beyond one in and one out).
//!
//! Why a fixed hold-back is enough: a program takes its record's timestamp after reserving the
//! record and commits it a few microseconds later; a record still being written blocks its ring
//! for the reader. So once a drain has passed time `t`, every record stamped before
//! `t - hold` has been read.

use std::collections::VecDeque;

use tcptrace_common::Event;

/// How long records are held back before release: far above the time a program takes to fill
/// and commit a record (microseconds), well under a refresh interval.
pub const HOLD_NS: u64 = 10_000_000;

/// Records read but not released yet, per ring, each in its ring's order.
#[derive(Debug, Default)]
pub struct Reorder {
    rings: Vec<VecDeque<Event>>,
}

impl Reorder {
    pub fn new(rings: usize) -> Self {
        Self {
            rings: (0..rings.max(1))
                .map(|_| VecDeque::with_capacity(4096))
                .collect(),
        }
    }

    /// Adds one record of ring `ring`, in the order the ring gave it.
    pub fn push(&mut self, ring: usize, ev: Event) {
        let last = self.rings.len() - 1;
        self.rings[ring.min(last)].push_back(ev);
    }

    pub fn len(&self) -> usize {
        self.rings.iter().map(VecDeque::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.rings.iter().all(VecDeque::is_empty)
    }

    /// Calls `f` with every record stamped at or before `now_ns - HOLD_NS` (every record with a
    /// single ring, or with `now_ns` u64::MAX), and forgets them: the rings merged by
    /// timestamp, each ring's records in ring order (the order they were reserved in, which for
    /// one socket is the order its transitions happened). Ties go to the lower ring.
    pub fn release(&mut self, now_ns: u64, mut f: impl FnMut(&Event)) {
        if let [one] = self.rings.as_mut_slice() {
            one.iter().for_each(&mut f);
            one.clear();
            return;
        }
        let upto = if now_ns == u64::MAX {
            u64::MAX
        } else {
            now_ns.saturating_sub(HOLD_NS)
        };
        loop {
            let mut next: Option<(usize, u64)> = None;
            for (i, r) in self.rings.iter().enumerate() {
                if let Some(e) = r.front()
                    && e.ts_ns <= upto
                    && next.is_none_or(|(_, t)| e.ts_ns < t)
                {
                    next = Some((i, e.ts_ns));
                }
            }
            let Some((i, _)) = next else { break };
            if let Some(e) = self.rings[i].pop_front() {
                f(&e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(ts_ns: u64, skaddr: u64, newstate: u8) -> Event {
        Event {
            ts_ns,
            skaddr,
            newstate,
            ..Event::default()
        }
    }

    fn released(r: &mut Reorder, now: u64) -> Vec<(u64, u8)> {
        let mut out = Vec::new();
        r.release(now, |e| out.push((e.ts_ns, e.newstate)));
        out
    }

    #[test]
    fn one_sockets_transitions_from_two_rings_come_out_in_order() {
        let mut r = Reorder::new(2);
        // Ring 1 (softirq CPU) drained first: FIN_WAIT2 then CLOSE; ring 0 holds the
        // application's ESTABLISHED -> FIN_WAIT1, which happened before.
        r.push(1, ev(2_000, 7, 5));
        r.push(1, ev(3_000, 7, 7));
        r.push(0, ev(1_000, 7, 4));
        let out = released(&mut r, 3_000 + HOLD_NS);
        assert_eq!(out, vec![(1_000, 4), (2_000, 5), (3_000, 7)]);
        assert!(r.is_empty());
    }

    #[test]
    fn records_newer_than_the_hold_back_wait_for_the_next_drain() {
        let mut r = Reorder::new(4);
        r.push(0, ev(100, 1, 2));
        r.push(3, ev(HOLD_NS + 500, 1, 1));
        // At HOLD_NS + 100 only the first is old enough.
        assert_eq!(released(&mut r, HOLD_NS + 100), vec![(100, 2)]);
        assert_eq!(r.len(), 1);
        // A record read later but stamped earlier than the held one goes first.
        r.push(2, ev(HOLD_NS + 200, 2, 10));
        assert_eq!(
            released(&mut r, 3 * HOLD_NS),
            vec![(HOLD_NS + 200, 10), (HOLD_NS + 500, 1)]
        );
    }

    #[test]
    fn a_rings_order_is_kept_and_one_ring_is_not_held() {
        let mut r = Reorder::new(2);
        // Within a ring, ring order wins over stamps (a program interrupted between reserving
        // and stamping its record by one that reserved after it).
        r.push(0, ev(50, 1, 4));
        r.push(0, ev(40, 1, 5));
        r.push(1, ev(45, 2, 1));
        r.push(1, ev(50, 2, 2));
        assert_eq!(
            released(&mut r, HOLD_NS + 50),
            vec![(45, 1), (50, 4), (40, 5), (50, 2)]
        );

        let mut one = Reorder::new(1);
        one.push(0, ev(10, 1, 2));
        one.push(0, ev(5, 1, 1));
        // A single ring is already in order: released at once, as read.
        assert_eq!(released(&mut one, 0), vec![(10, 2), (5, 1)]);
    }
}
