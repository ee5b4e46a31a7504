//! The reader's cost per record, by hand (ignored tests): FIN churn as the kernel sends it, in
//! ring-buffer bytes spread over the rings, through what the reader does with each record
//! (copy out of the ring, [`Reorder`], [`decode`], [`Table::apply`]), drain by drain.
//! `cargo test --release -p tcptrace --lib reader_rate -- --ignored --nocapture --test-threads=1`
//!
//! One reader thread serves every CPU: its cost per record bounds the transitions per second a
//! host can make before its rings fill (on 16 cores the benchmark's RST churn makes 1.6 M/s).

use std::time::Instant;

use tcptrace_common::{AF_INET, COMPACT_LEN, Event, FLAG_OWNER_CURRENT, KIND_STATE};

use super::apply_released;
use crate::{
    kernel::{
        event::{TcpState, decode},
        order::{HOLD_NS, Reorder},
        probes::record,
    },
    state::{ProcMeta, ProcSource, Table, TableConfig},
};

struct Procs;

impl ProcSource for Procs {
    fn start_time(&mut self, _pid: u32) -> Option<u64> {
        Some(1)
    }
    fn meta(&mut self, _pid: u32) -> Option<ProcMeta> {
        Some(ProcMeta {
            comm: "churn".into(),
            ..ProcMeta::default()
        })
    }
}

/// One record as the ring holds it: a whole one with an owner, a compact one without.
fn bytes(ev: &Event) -> Vec<u8> {
    let len = if ev.pid != 0 {
        size_of::<Event>()
    } else {
        COMPACT_LEN
    };
    // SAFETY: Event is plain old data without padding; `len` bytes are within it.
    unsafe { std::slice::from_raw_parts((ev as *const Event).cast::<u8>(), len) }.to_vec()
}

/// Client ports (1024-65535) times listeners: the (local, remote) pairs of the benchmark's FIN
/// workload, each in TIME_WAIT until its next connection reuses it (tcp_tw_reuse).
const PAIRS: u64 = 64_512 * 4;

/// `conns` FIN connections, one every `every_ns`, 9 records each (the client's end into
/// TIME_WAIT, the server's through LAST_ACK; LISTEN -> SYN_RECV is not sent), socket
/// addresses reused from a pool of 4096 as the kernel reuses freed sockets, the pairs of the
/// benchmark's 4 listeners and 64,512 client ports in turn; each record on a ring picked at
/// random (where a transition runs: the application's CPU, or the softirq's).
fn fin_churn(conns: u64, every_ns: u64, rings: usize) -> Vec<(usize, Vec<u8>)> {
    use TcpState::*;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut ring = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % rings as u64) as usize
    };
    let lo = [127, 0, 0, 1];
    let mut out = Vec::new();
    for i in 0..conns {
        let k = i % 4096;
        let (csk, ssk) = (0xffff_0000_0000 + k * 2, 0xffff_0000_0001 + k * 2);
        let (cport, sport) = (1024 + (i / 4 % 64_512) as u16, 5000 + (i % 4) as u16);
        let steps: [(u64, TcpState, TcpState, u16, u16, u32); 9] = [
            (csk, Close, SynSent, 0, sport, 1),
            (ssk, SynRecv, Established, sport, cport, 0),
            (csk, SynSent, Established, cport, sport, 0),
            (csk, Established, FinWait1, cport, sport, 1),
            (ssk, Established, CloseWait, sport, cport, 0),
            (csk, FinWait1, FinWait2, cport, sport, 0),
            (csk, FinWait2, Close, cport, sport, 0),
            (ssk, CloseWait, LastAck, sport, cport, 2),
            (ssk, LastAck, Close, sport, cport, 0),
        ];
        for (j, (sk, old, new, sp, dp, pid)) in steps.into_iter().enumerate() {
            let mut ev = Event {
                ts_ns: 1_000 + i * every_ns + j as u64 * (every_ns / 9),
                skaddr: sk,
                netns: 4026531840,
                kind: KIND_STATE,
                oldstate: old as u8,
                newstate: new as u8,
                family: AF_INET,
                sport: sp,
                dport: dp,
                pid,
                ..Event::default()
            };
            ev.saddr[..4].copy_from_slice(&lo);
            ev.daddr[..4].copy_from_slice(&lo);
            if pid != 0 {
                ev.flags = FLAG_OWNER_CURRENT;
                ev.comm[..5].copy_from_slice(b"churn");
            }
            out.push((ring(), bytes(&ev)));
        }
    }
    out
}

/// What runs on each record.
#[derive(Clone, Copy, PartialEq)]
enum Stage {
    /// Copy out of the ring and put the rings back in order.
    Reorder,
    /// ... and decode.
    Decode,
    /// ... and apply to the table: the whole reader.
    Table,
}

/// Runs the records through the reader's stages drain by drain (a drain every 10 ms of
/// stamps), the first `warm` untimed (they fill the TIME_WAIT pool); returns ns per timed
/// record and the table.
fn run(records: &[(usize, Vec<u8>)], warm: usize, rings: usize, stage: Stage) -> (f64, Table) {
    let mut table = Table::new(TableConfig::default(), Box::new(Procs));
    let mut reorder = Reorder::new(rings);
    let drain_every = 10_000_000u64;
    assert!(HOLD_NS <= drain_every);
    let mut released = 0usize;
    let mut start = Instant::now();
    let mut next_drain = drain_every;
    let mut drain = |reorder: &mut Reorder, upto: u64| match stage {
        Stage::Reorder => reorder.release(upto, |_| released += 1),
        Stage::Decode => reorder.release(upto, |raw| {
            released += std::hint::black_box(decode(raw)).is_some() as usize
        }),
        Stage::Table => {
            let before = reorder.len();
            apply_released(reorder, upto, &mut table, &mut None);
            released += before - reorder.len();
        }
    };
    for (n, (ring, item)) in records.iter().enumerate() {
        if n == warm {
            start = Instant::now();
        }
        if let Some(ev) = record(item) {
            if ev.ts_ns >= next_drain {
                drain(&mut reorder, next_drain);
                next_drain += drain_every;
            }
            reorder.push(*ring, ev);
        }
    }
    drain(&mut reorder, u64::MAX);
    let ns = start.elapsed().as_nanos() as f64 / (records.len() - warm) as f64;
    assert_eq!(released, records.len());
    (ns, table)
}

#[test]
#[ignore]
fn reader_rate() {
    let conns = 300_000;
    for rings in [2, 16] {
        let records = fin_churn(PAIRS + conns, 20_000, rings);
        let warm = PAIRS as usize * 9;
        let mut line = format!(
            "FIN churn, {rings:>2} rings, {} records after {warm}:",
            records.len() - warm
        );
        for (stage, name) in [
            (Stage::Reorder, "ring copy + reorder"),
            (Stage::Decode, "+ decode"),
            (Stage::Table, "+ table (whole reader)"),
        ] {
            let (ns, table) = run(&records, warm, rings, stage);
            if stage == Stage::Table {
                let stats = table.stats();
                assert_eq!(stats.transitions, records.len() as u64);
                assert_eq!((stats.gaps, stats.stale), (0, 0));
                let tw = table
                    .snapshot(u64::MAX / 2, &Default::default())
                    .host
                    .time_wait;
                line += &format!(" {ns:.0} ns/record (TIME_WAIT {tw});");
            } else {
                line += &format!(" {name} {ns:.0} ns/record;");
            }
        }
        println!("{line}");
    }
}
