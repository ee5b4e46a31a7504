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

/// Fields at byte offsets, wherever they are read from: a [`Record`] copied to scratch space,
/// or a [`Sock`] read in place.
pub(crate) trait Fields {
    /// `N` bytes at `off` (zeros where they cannot be read).
    fn bytes<const N: usize>(&self, off: u16) -> [u8; N];

    #[inline(always)]
    fn u16(&self, off: u16) -> u16 {
        u16::from_ne_bytes(self.bytes::<2>(off))
    }

    #[inline(always)]
    fn i32(&self, off: u16) -> i32 {
        i32::from_ne_bytes(self.bytes::<4>(off))
    }

    #[inline(always)]
    fn u64(&self, off: u16) -> u64 {
        u64::from_ne_bytes(self.bytes::<8>(off))
    }

    #[inline(always)]
    fn proto(&self, off: u16, size: u16) -> u16 {
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
    unsafe fn addrs(&self, ev: *mut Event, family: u8, v4: (u16, u16), v6: (u16, u16)) {
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

impl<const LEN: usize> Fields for Record<LEN> {
    #[inline(always)]
    fn bytes<const N: usize>(&self, off: u16) -> [u8; N] {
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
}

/// A `struct sock` read in place, field by field, by a BTF tracepoint program: the verifier
/// knows the pointer's type and turns each load into a guarded one (a bad address reads as
/// zeros), with no helper call. Offsets must be constants to the verifier (read-only data) and
/// lie inside `struct sock`.
pub(crate) struct Sock(pub(crate) *const u8);

impl Fields for Sock {
    #[inline(always)]
    fn bytes<const N: usize>(&self, off: u16) -> [u8; N] {
        let mut out = [0u8; N];
        // SAFETY: typed loads the verifier checks against the socket's BTF layout.
        unsafe {
            let at = self.0.add(off as usize);
            match N {
                1 => out[0] = core::ptr::read_volatile(at),
                2 => out[..2]
                    .copy_from_slice(&core::ptr::read_volatile(at as *const u16).to_ne_bytes()),
                4 => out[..4]
                    .copy_from_slice(&core::ptr::read_volatile(at as *const u32).to_ne_bytes()),
                8 => out[..8]
                    .copy_from_slice(&core::ptr::read_volatile(at as *const u64).to_ne_bytes()),
                16 => {
                    out[..8]
                        .copy_from_slice(&core::ptr::read_volatile(at as *const u64).to_ne_bytes());
                    out[8..16].copy_from_slice(
                        &core::ptr::read_volatile(at.add(8) as *const u64).to_ne_bytes(),
                    );
                }
                _ => {}
            }
        }
        out
    }
}
