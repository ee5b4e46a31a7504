//! Kernel bytes read in one go into per-CPU scratch space (a tracepoint record, or the start of
//! a `struct sock`), and their fields at the offsets userspace found (tracefs, BTF).

use aya_ebpf::{EbpfContext as _, helpers::bpf_probe_read_kernel_buf, programs::TracePointContext};
use tcptrace_common::{AF_INET6, Event, SOCK_CHUNK, TP_RECORD_MAX};

use crate::SCRATCH;

/// `N` bytes copied to per-CPU scratch space in one read; fields are then plain loads at the
/// offsets from userspace (constants to the verifier: they live in read-only global data).
/// A field beyond `N` reads as zeros.
pub(crate) struct Record<const N: usize>(*const [u8; SOCK_CHUNK]);

impl Record<TP_RECORD_MAX> {
    /// The tracepoint record of `ctx`, into scratch slot `slot` (one per program: a program
    /// can run nested in another, never in itself).
    #[inline(always)]
    pub(crate) fn read(ctx: &TracePointContext, slot: u32) -> Result<Self, i32> {
        let buf = SCRATCH.get_ptr_mut(slot).ok_or(-1)?;
        // SAFETY: per-CPU slot of one program; the record is read with bpf_probe_read_kernel.
        unsafe {
            bpf_probe_read_kernel_buf(ctx.as_ptr() as *const u8, &mut (&mut *buf)[..TP_RECORD_MAX])?
        };
        Ok(Record(buf))
    }
}

impl Record<SOCK_CHUNK> {
    /// The first [`SOCK_CHUNK`] bytes of the `struct sock` at `sk` (its `sock_common`).
    #[inline(always)]
    pub(crate) fn read_sock(sk: u64, slot: u32) -> Result<Self, i32> {
        let buf = SCRATCH.get_ptr_mut(slot).ok_or(-1)?;
        // SAFETY: as in `read`; kernel memory read with bpf_probe_read_kernel.
        unsafe { bpf_probe_read_kernel_buf(sk as *const u8, &mut *buf)? };
        Ok(Record(buf))
    }
}

impl<const LEN: usize> Record<LEN> {
    #[inline(always)]
    pub(crate) fn bytes<const N: usize>(&self, off: u16) -> [u8; N] {
        // SAFETY: points to the per-CPU slot filled by `read`.
        let rec = unsafe { &*self.0 };
        let o = off as usize;
        let mut out = [0u8; N];
        if o + N > LEN {
            return out;
        }
        if N % 8 == 0 && o % 8 == 0 {
            // Word copies where the layout allows (the usual case for the address arrays).
            let mut i = 0;
            while i < N {
                // SAFETY: in bounds (checked above) and 8-byte aligned (map values are).
                let w = unsafe { core::ptr::read(rec.as_ptr().add(o + i) as *const u64) };
                out[i..i + 8].copy_from_slice(&w.to_ne_bytes());
                i += 8;
            }
        } else {
            let mut i = 0;
            while i < N {
                out[i] = rec[o + i];
                i += 1;
            }
        }
        out
    }

    #[inline(always)]
    pub(crate) fn u16(&self, off: u16) -> u16 {
        u16::from_ne_bytes(self.bytes::<2>(off))
    }

    #[inline(always)]
    pub(crate) fn i32(&self, off: u16) -> i32 {
        i32::from_ne_bytes(self.bytes::<4>(off))
    }

    #[inline(always)]
    pub(crate) fn u64(&self, off: u16) -> u64 {
        u64::from_ne_bytes(self.bytes::<8>(off))
    }

    #[inline(always)]
    pub(crate) fn proto(&self, off: u16, size: u16) -> u16 {
        if size == 1 {
            self.bytes::<1>(off)[0] as u16
        } else {
            self.u16(off)
        }
    }

    /// The address pair of a socket of `family` into `ev` (v4 into the first 4 bytes). A raw
    /// pointer: `ev` may be a compact record, which ends after the addresses.
    ///
    /// # Safety
    /// `ev` points to at least the first `COMPACT_LEN` bytes of an `Event`, writable.
    #[inline(always)]
    pub(crate) unsafe fn addrs(&self, ev: *mut Event, family: u8, v4: (u16, u16), v6: (u16, u16)) {
        let (saddr, daddr) = if family == AF_INET6 {
            (self.bytes::<16>(v6.0), self.bytes::<16>(v6.1))
        } else {
            let mut s = [0u8; 16];
            let mut d = [0u8; 16];
            s[..4].copy_from_slice(&self.bytes::<4>(v4.0));
            d[..4].copy_from_slice(&self.bytes::<4>(v4.1));
            (s, d)
        };
        // SAFETY: both fields lie in the compact prefix the caller guarantees.
        unsafe {
            (*ev).saddr = saddr;
            (*ev).daddr = daddr;
        }
    }
}
