//! Records of all rings back in time order. Each CPU writes to its own ring, so one socket's
//! transitions can sit in different rings (a close in the application's context on one CPU, the
//! peer's ACK in softirq on another). [`Reorder`] holds what was read for a short while and
//! releases records in timestamp order once no ring can still hand over an older one.
//!
//! Why a fixed hold-back is enough: a program takes its record's timestamp after reserving the
//! record and commits it a few microseconds later; a record still being written blocks its ring
//! for the reader. So once a drain has passed time `t`, every record stamped before
//! `t - hold` has been read.

use tcptrace_common::Event;

/// How long records are held back before release: far above the time a program takes to fill
/// and commit a record (microseconds), well under a refresh interval.
pub const HOLD_NS: u64 = 10_000_000;

/// Records read but not released yet.
#[derive(Debug, Default)]
pub struct Reorder {
    pending: Vec<Event>,
    /// One ring (one CPU): records are already in order and are released at once.
    single: bool,
}

impl Reorder {
    pub fn new(rings: usize) -> Self {
        Self {
            pending: Vec::with_capacity(4096),
            single: rings <= 1,
        }
    }

    /// Adds one record, in the order its ring gave it.
    pub fn push(&mut self, ev: Event) {
        self.pending.push(ev);
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Calls `f`, in timestamp order, with every record stamped at or before `now_ns - HOLD_NS`
    /// (every record with a single ring, or with `now_ns` u64::MAX), and forgets them. Records with equal timestamps keep
    /// the order they were pushed in.
    pub fn release(&mut self, now_ns: u64, mut f: impl FnMut(&Event)) {
        if self.pending.is_empty() {
            return;
        }
        if self.single {
            self.pending.iter().for_each(&mut f);
            self.pending.clear();
            return;
        }
        // Stable: one ring's records with equal stamps stay in ring order.
        self.pending.sort_by_key(|e| e.ts_ns);
        let upto = if now_ns == u64::MAX {
            u64::MAX
        } else {
            now_ns.saturating_sub(HOLD_NS)
        };
        let n = self.pending.partition_point(|e| e.ts_ns <= upto);
        self.pending[..n].iter().for_each(&mut f);
        self.pending.drain(..n);
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
        r.push(ev(2_000, 7, 5));
        r.push(ev(3_000, 7, 7));
        r.push(ev(1_000, 7, 4));
        let out = released(&mut r, 3_000 + HOLD_NS);
        assert_eq!(out, vec![(1_000, 4), (2_000, 5), (3_000, 7)]);
        assert!(r.is_empty());
    }

    #[test]
    fn records_newer_than_the_hold_back_wait_for_the_next_drain() {
        let mut r = Reorder::new(4);
        r.push(ev(100, 1, 2));
        r.push(ev(HOLD_NS + 500, 1, 1));
        // At HOLD_NS + 100 only the first is old enough.
        assert_eq!(released(&mut r, HOLD_NS + 100), vec![(100, 2)]);
        assert_eq!(r.len(), 1);
        // A record read later but stamped earlier than the held one goes first.
        r.push(ev(HOLD_NS + 200, 2, 10));
        assert_eq!(
            released(&mut r, 3 * HOLD_NS),
            vec![(HOLD_NS + 200, 10), (HOLD_NS + 500, 1)]
        );
    }

    #[test]
    fn equal_stamps_keep_ring_order_and_one_ring_is_not_held() {
        let mut r = Reorder::new(2);
        r.push(ev(50, 1, 4));
        r.push(ev(50, 1, 5));
        assert_eq!(released(&mut r, HOLD_NS + 50), vec![(50, 4), (50, 5)]);

        let mut one = Reorder::new(1);
        one.push(ev(10, 1, 2));
        one.push(ev(5, 1, 1));
        // A single ring is already in order: released at once, as read.
        assert_eq!(released(&mut one, 0), vec![(10, 2), (5, 1)]);
    }
}
