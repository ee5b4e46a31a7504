//! Remote endpoints this host connects to: connects by outcome, per process and host-wide.

use std::{collections::BTreeMap, net::SocketAddr};

use super::table::Table;
use crate::kernel::errno;

/// Host-wide destinations kept.
const MAX_DESTS: usize = 4096;

/// Counts of errors by errno, small and allocation-light.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ErrCounts(Vec<(i32, u64)>);

impl ErrCounts {
    pub fn add(&mut self, errno: i32, n: u64) {
        match self.0.iter_mut().find(|(e, _)| *e == errno) {
            Some((_, c)) => *c += n,
            None => self.0.push((errno, n)),
        }
    }
    pub fn total(&self) -> u64 {
        self.0.iter().map(|(_, c)| c).sum()
    }
    pub(super) fn by_name(&self) -> BTreeMap<String, u64> {
        self.0
            .iter()
            .filter(|(_, c)| *c > 0)
            .map(|&(e, c)| (errno::name(e).into_owned(), c))
            .collect()
    }
}

#[derive(Clone, Debug, Default)]
pub(super) struct DestStats {
    pub(super) ok: u64,
    pub(super) failed: ErrCounts,
}

impl Table {
    pub(super) fn host_dest(&mut self, netns: u64, remote: SocketAddr) -> Option<&mut DestStats> {
        let key = (netns, remote);
        if !self.dests.contains_key(&key) && self.dests.len() >= MAX_DESTS {
            return None;
        }
        Some(self.dests.entry(key).or_default())
    }
}
