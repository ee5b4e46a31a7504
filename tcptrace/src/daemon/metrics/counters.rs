//! Counters whose series keep their identity between scrapes, for Prometheus `rate()`.
//!
//! The table counts per process (and per destination), and a process's counts leave it when
//! the process does. A [`Ledger`] remembers what each source (a process, a destination) showed
//! at the last scrape and adds only the growth since then to the totals of the source's key
//! (comm and container, or the remote endpoint): a key's totals never go down, whichever
//! processes come and go. At most `cap` keys get their own totals, in the order they first
//! appear; later ones are summed into one `other` total, which never goes down either. A key
//! whose totals have not grown for [`IDLE_KEY`] is forgotten (its series ends), freeing its
//! slot; should it count again, its series starts again from 0, which Prometheus takes for
//! what it is, a counter that restarted.

use std::{collections::BTreeMap, hash::Hash, time::Duration, time::Instant};

use rustc_hash::FxHashMap as HashMap;

/// How long a key whose totals do not grow keeps them (and its series).
pub const IDLE_KEY: Duration = Duration::from_secs(600);

/// The counters of one source, or the totals of one key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub connects: u64,
    /// Failed connects by errno name.
    pub failed: BTreeMap<String, u64>,
    pub closed: u64,
    pub time_wait: u64,
}

impl Counts {
    /// Adds the growth from `before` to `now` (a count that shrank adds nothing); whether
    /// anything grew.
    fn add_growth(&mut self, now: &Counts, before: Option<&Counts>) -> bool {
        let was = self.clone();
        let zero = Counts::default();
        let before = before.unwrap_or(&zero);
        self.connects += now.connects.saturating_sub(before.connects);
        self.closed += now.closed.saturating_sub(before.closed);
        self.time_wait += now.time_wait.saturating_sub(before.time_wait);
        for (errno, &n) in &now.failed {
            let was = before.failed.get(errno).copied().unwrap_or(0);
            if n > was {
                *self.failed.entry(errno.clone()).or_default() += n - was;
            }
        }
        *self != was
    }
}

struct Kept {
    counts: Counts,
    /// When the totals last grew (or the key appeared).
    grown: Instant,
}

/// Totals by key, fed with the current counts of every source at each scrape.
pub struct Ledger<S, K> {
    last: HashMap<S, Counts>,
    totals: BTreeMap<K, Kept>,
    other: Option<Counts>,
}

impl<S, K> Default for Ledger<S, K> {
    fn default() -> Self {
        Self {
            last: HashMap::default(),
            totals: BTreeMap::new(),
            other: None,
        }
    }
}

impl<S: Hash + Eq, K: Ord> Ledger<S, K> {
    /// Takes the counts every source shows now, with its key. A source absent from `seen` is
    /// forgotten (what it counted stays in its key's totals). A key that does not grow is not
    /// created.
    pub fn record(
        &mut self,
        seen: impl IntoIterator<Item = (S, K, Counts)>,
        cap: usize,
        now: Instant,
    ) {
        self.totals
            .retain(|_, k| now.saturating_duration_since(k.grown) < IDLE_KEY);
        let mut last = HashMap::default();
        for (source, key, counts) in seen {
            let before = self.last.get(&source);
            let mut growth = Counts::default();
            if growth.add_growth(&counts, before) {
                let slot = if self.totals.contains_key(&key) || self.totals.len() < cap {
                    let kept = self.totals.entry(key).or_insert_with(|| Kept {
                        counts: Counts::default(),
                        grown: now,
                    });
                    kept.grown = now;
                    &mut kept.counts
                } else {
                    self.other.get_or_insert_with(Counts::default)
                };
                slot.add_growth(&growth, None);
            }
            last.insert(source, counts);
        }
        self.last = last;
    }

    /// Every key's totals, in key order.
    pub fn totals(&self) -> impl Iterator<Item = (&K, &Counts)> {
        self.totals.iter().map(|(k, kept)| (k, &kept.counts))
    }

    /// The sum of the keys past the cap, once there was one.
    pub fn other(&self) -> Option<&Counts> {
        self.other.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(connects: u64, refused: u64) -> Counts {
        Counts {
            connects,
            failed: if refused > 0 {
                [("ECONNREFUSED".to_string(), refused)].into()
            } else {
                BTreeMap::new()
            },
            ..Default::default()
        }
    }

    #[test]
    fn totals_grow_by_what_sources_add_and_survive_them() {
        let t0 = Instant::now();
        let mut l: Ledger<u32, &str> = Ledger::default();
        l.record([(1, "a", c(3, 1)), (2, "a", c(2, 0))], 10, t0);
        assert_eq!(l.totals().next(), Some((&"a", &c(5, 1))));
        // Process 1 exits: its counts stay; process 2 goes on; process 3 is new with the key.
        l.record([(2, "a", c(4, 0)), (3, "a", c(1, 2))], 10, t0);
        assert_eq!(l.totals().next(), Some((&"a", &c(8, 3))));
        // A source whose counts shrank (it cannot, but a reused id could) adds nothing.
        l.record([(2, "a", c(1, 0))], 10, t0);
        assert_eq!(l.totals().next(), Some((&"a", &c(8, 3))));
        assert!(l.other().is_none());
    }

    #[test]
    fn keys_past_the_cap_go_to_other_and_idle_keys_are_forgotten() {
        let t0 = Instant::now();
        let mut l: Ledger<u32, &str> = Ledger::default();
        l.record(
            [(1, "a", c(1, 0)), (2, "b", c(2, 0)), (3, "c", c(4, 0))],
            2,
            t0,
        );
        let keys: Vec<_> = l.totals().map(|(k, _)| *k).collect();
        assert_eq!(keys, ["a", "b"]);
        assert_eq!(l.other(), Some(&c(4, 0)));
        // Ranking does not matter: "c" stays in other even when it is the busiest.
        l.record(
            [(1, "a", c(2, 0)), (2, "b", c(2, 0)), (3, "c", c(40, 0))],
            2,
            t0 + IDLE_KEY / 2,
        );
        assert_eq!(l.other(), Some(&c(40, 0)));
        // "b" has not grown for IDLE_KEY: forgotten, its slot is free for "d"; a key that
        // does not grow ("e") takes no slot.
        l.record(
            [(1, "a", c(3, 0)), (5, "e", c(0, 0)), (4, "d", c(7, 0))],
            2,
            t0 + IDLE_KEY,
        );
        let keys: Vec<_> = l.totals().map(|(k, _)| *k).collect();
        assert_eq!(keys, ["a", "d"]);
        assert_eq!(l.totals().next(), Some((&"a", &c(3, 0))));
        assert_eq!(l.other(), Some(&c(40, 0)));
    }
}
