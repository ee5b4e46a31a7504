//! Records of all rings back in time order. Each CPU writes to its own ring, so one socket's
//! transitions can sit in different rings (a close in the application's context on one CPU, the
//! peer's ACK in softirq on another). [`Reorder`] holds what was read for a short while and
//! merges the rings by timestamp once no ring can still hand over an older record.
//!
//! A ring's stamps can go back: a program interrupted between reserving its record and
//! stamping it (an interrupt pending during the reservation's locked section is taken right
//! after it) by a softirq whose program reserves, stamps and commits a record of its own. The
//! two are different sockets' (the interrupted one's socket is locked by its owner, and a
//! softirq defers its work on it), and for one socket the stamps follow its transitions (each
//! is stamped while it happens, under the socket's lock). So a ring whose stamps went back is
//! sorted by stamp (stably) before the merge: merged by their first records alone, the later
//! records of the other socket could pass a record of the same socket from another ring.
//!
//! Why a fixed hold-back is enough: a program takes its record's timestamp after reserving the
//! record and commits it a few microseconds later; a record still being written blocks its ring
//! for the reader. So after a drain that started at time `t` (taken before the first ring is
//! read, not after the last: the reader can be preempted between rings), every record stamped
//! before `t - hold` has been read.

use std::collections::VecDeque;

use tcptrace_common::Event;

/// How long records are held back before release: far above the time a program takes to fill
/// and commit a record (microseconds), well under a refresh interval.
pub const HOLD_NS: u64 = 10_000_000;

/// Records read but not released yet, per ring, each in its ring's order.
#[derive(Debug, Default)]
pub struct Reorder {
    rings: Vec<VecDeque<Event>>,
    /// Per ring: a record was pushed with an older stamp than the one before it.
    unsorted: Vec<bool>,
    /// The merge's work space: (stamp, ring, position in ring) of each record released, kept
    /// between calls for its allocation.
    merge: Vec<(u64, u32, u32)>,
}

impl Reorder {
    pub fn new(rings: usize) -> Self {
        Self {
            rings: (0..rings.max(1))
                .map(|_| VecDeque::with_capacity(4096))
                .collect(),
            unsorted: vec![false; rings.max(1)],
            merge: Vec::new(),
        }
    }

    /// Adds one record of ring `ring`, in the order the ring gave it.
    pub fn push(&mut self, ring: usize, ev: Event) {
        let i = ring.min(self.rings.len() - 1);
        let r = &mut self.rings[i];
        if r.back().is_some_and(|b| b.ts_ns > ev.ts_ns) {
            self.unsorted[i] = true;
        }
        r.push_back(ev);
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
    ///
    /// The merge is one stable sort of the released records' stamps, ring after ring: the
    /// sort finds each ring's run already in order and merges the runs (n log k for k rings
    /// with records, instead of a look at every ring's first record for each record).
    pub fn release(&mut self, now_ns: u64, mut f: impl FnMut(&Event)) {
        if let [one] = self.rings.as_mut_slice() {
            one.iter().for_each(&mut f);
            one.clear();
            return;
        }
        for (r, unsorted) in self.rings.iter_mut().zip(self.unsorted.iter_mut()) {
            if std::mem::take(unsorted) {
                r.make_contiguous().sort_by_key(|e| e.ts_ns);
            }
        }
        let upto = if now_ns == u64::MAX {
            u64::MAX
        } else {
            now_ns.saturating_sub(HOLD_NS)
        };
        let counts: Vec<usize> = self
            .rings
            .iter()
            .map(|r| r.partition_point(|e| e.ts_ns <= upto))
            .collect();
        let mut with = counts.iter().enumerate().filter(|&(_, &n)| n > 0);
        match (with.next(), with.next()) {
            (None, _) => return,
            // One ring has records to release: they are in order already.
            (Some((i, &n)), None) => self.rings[i].range(..n).for_each(&mut f),
            _ => {
                let merge = &mut self.merge;
                merge.clear();
                for (i, (r, &n)) in self.rings.iter().zip(&counts).enumerate() {
                    merge.extend(
                        r.range(..n)
                            .enumerate()
                            .map(|(p, e)| (e.ts_ns, i as u32, p as u32)),
                    );
                }
                merge.sort_by_key(|&(ts, _, _)| ts);
                for &(_, i, p) in merge.iter() {
                    f(&self.rings[i as usize][p as usize]);
                }
            }
        }
        for (r, n) in self.rings.iter_mut().zip(counts) {
            r.drain(..n);
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
    fn a_ring_whose_stamps_go_back_is_sorted_before_the_merge_and_one_ring_is_not_held() {
        let mut r = Reorder::new(2);
        // Ring 0: the application's close of socket 1 reserved its record, a softirq then
        // made socket 2 ESTABLISHED (accepted) on the same CPU and stamped first; ring 1:
        // socket 2's CLOSE_WAIT on another CPU, between the two stamps. Merged by first
        // records only, socket 2's CLOSE_WAIT would come before its birth.
        r.push(0, ev(50, 1, 4));
        r.push(0, ev(40, 2, 1));
        r.push(1, ev(45, 2, 8));
        r.push(1, ev(60, 1, 5));
        let mut out = Vec::new();
        r.release(HOLD_NS + 60, |e| out.push((e.ts_ns, e.skaddr, e.newstate)));
        assert_eq!(out, vec![(40, 2, 1), (45, 2, 8), (50, 1, 4), (60, 1, 5)]);
        // Sorted once: later pushes in order leave the ring alone.
        r.push(0, ev(70, 1, 7));
        assert_eq!(released(&mut r, HOLD_NS + 70), vec![(70, 7)]);

        let mut one = Reorder::new(1);
        one.push(0, ev(10, 1, 2));
        one.push(0, ev(5, 1, 1));
        // A single ring is already in order: released at once, as read.
        assert_eq!(released(&mut one, 0), vec![(10, 2), (5, 1)]);
    }

    #[test]
    fn sixteen_rings_come_out_as_one_sort_by_stamp_then_ring_would_give() {
        // Records spread over 16 rings (each in order), stamps with ties between rings and
        // within a ring; released in three drains. Reference: everything sorted by (stamp,
        // ring), ring order kept within a ring.
        let mut r = Reorder::new(16);
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut stamps = [0u64; 16];
        let mut all = Vec::new();
        for n in 0..5_000u64 {
            let ring = (next() % 16) as usize;
            stamps[ring] += next() % 3 * 1_000;
            all.push((stamps[ring], ring, n));
            r.push(ring, ev(stamps[ring], n, 1));
        }
        let mut want = all.clone();
        want.sort_by_key(|&(ts, ring, _)| (ts, ring));
        let mut got = Vec::new();
        let max = *stamps.iter().max().unwrap();
        for now in [max / 3 + HOLD_NS, 2 * max / 3 + HOLD_NS, u64::MAX] {
            r.release(now, |e| got.push(e.skaddr));
        }
        assert!(r.is_empty());
        assert_eq!(got, want.iter().map(|&(_, _, n)| n).collect::<Vec<_>>());
    }
}
