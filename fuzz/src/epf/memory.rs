//! The memory behind the `epf` target's device: a memfd the harness maps as DMA regions, and
//! the harness's own model of that map, against which every DMA the device makes is checked.

use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use devices::pci::{DmaDirection, DmaFault, DmaProt, DmaSpace, MappedRegions};

use crate::Input;

/// Bytes of the memfd behind every region.
pub(super) const MEM: usize = 256 << 10;

/// A region as the harness mapped it: IOVA, length, memfd offset, rights.
#[derive(Clone, Copy, Debug)]
pub(super) struct Region {
    pub iova: u64,
    pub len: u64,
    pub off: u64,
    pub prot: DmaProt,
}

/// The harness's model: what is mapped, what memory must hold, and every DMA the device made.
#[derive(Default)]
pub(super) struct State {
    pub regions: Vec<Region>,
    /// What memory must hold.
    pub shadow: Vec<u8>,
    /// (direction, IOVA, length, succeeded) of every DMA.
    pub log: Vec<(DmaDirection, u64, u64, bool)>,
}

impl State {
    /// The memfd offsets `[iova, iova + len)` covers, piece by piece, if all of it is mapped
    /// with the right.
    pub fn resolve(&self, iova: u64, len: u64, dir: DmaDirection) -> Option<Vec<(usize, usize)>> {
        let end = iova.checked_add(len)?;
        let mut at = iova;
        let mut pieces = Vec::new();
        while at < end {
            let r = self
                .regions
                .iter()
                .find(|r| at >= r.iova && at - r.iova < r.len)?;
            let allowed = match dir {
                DmaDirection::Read => r.prot.read,
                DmaDirection::Write => r.prot.write,
            };
            if !allowed {
                return None;
            }
            let n = (r.len - (at - r.iova)).min(end - at);
            pieces.push(((r.off + (at - r.iova)) as usize, n as usize));
            at += n;
        }
        Some(pieces)
    }
}

/// The DMA space the device gets: the real map, checked against the harness's model.
pub(super) struct Checked {
    pub map: Arc<MappedRegions>,
    pub state: Arc<Mutex<State>>,
}

impl DmaSpace for Checked {
    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaFault> {
        let res = self.map.read(iova, buf);
        let mut st = self.state.lock().unwrap();
        let want = st.resolve(iova, buf.len() as u64, DmaDirection::Read);
        assert_eq!(
            res.is_ok(),
            want.is_some(),
            "DMA read of {:#x} bytes at {iova:#x}: {res:?}",
            buf.len()
        );
        if let Some(pieces) = want {
            let mut done = 0;
            for (off, n) in pieces {
                assert_eq!(
                    buf[done..done + n],
                    st.shadow[off..off + n],
                    "DMA read data"
                );
                done += n;
            }
        }
        st.log
            .push((DmaDirection::Read, iova, buf.len() as u64, res.is_ok()));
        res
    }

    fn write(&self, iova: u64, buf: &[u8]) -> Result<(), DmaFault> {
        let res = self.map.write(iova, buf);
        let mut st = self.state.lock().unwrap();
        let want = st.resolve(iova, buf.len() as u64, DmaDirection::Write);
        assert_eq!(
            res.is_ok(),
            want.is_some(),
            "DMA write of {:#x} bytes at {iova:#x}: {res:?}",
            buf.len()
        );
        if let Some(pieces) = want {
            let mut done = 0;
            for (off, n) in pieces {
                st.shadow[off..off + n].copy_from_slice(&buf[done..done + n]);
                done += n;
            }
        }
        st.log
            .push((DmaDirection::Write, iova, buf.len() as u64, res.is_ok()));
        res
    }
}

/// The memfd and the harness's own view of it.
pub(super) struct Memory {
    fd: OwnedFd,
    host: *mut u8,
}

impl Memory {
    pub fn new() -> Memory {
        // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked.
        let raw = unsafe {
            libc::memfd_create(
                c"epf-fuzz".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        assert!(raw >= 0, "memfd_create");
        // SAFETY: `raw` is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate on our own memfd.
        assert_eq!(unsafe { libc::ftruncate(raw, MEM as libc::off_t) }, 0);
        // Sealed as the VMM seals guest RAM: servers map nothing else.
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: F_ADD_SEALS on our own memfd takes an int and touches no memory.
        assert_eq!(unsafe { libc::fcntl(raw, libc::F_ADD_SEALS, seals) }, 0);
        // SAFETY: a fresh shared mapping of the whole memfd, checked below.
        let host = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MEM,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                raw,
                0,
            )
        };
        assert_ne!(host, libc::MAP_FAILED);
        Memory {
            fd,
            host: host.cast(),
        }
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `host` maps MEM bytes for as long as `self` lives; DMA only happens on
        // this thread, inside calls that have returned.
        unsafe { std::slice::from_raw_parts(self.host, MEM) }
    }
}

impl Drop for Memory {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`.
        unsafe { libc::munmap(self.host.cast(), MEM) };
    }
}

/// A region to map, from the input: anywhere in the IOVA space (near 0, below 4 GiB, at the
/// top, anywhere), any length up to 64 KiB, with any rights.
pub(super) fn region(input: &mut Input<'_>) -> Region {
    let iova = match input.u8() % 4 {
        0 => u64::from(input.u16()) << 12,
        1 => u64::from(input.u32()),
        2 => u64::MAX - (u64::from(input.u16()) << 12) - 0xfff,
        _ => input.u64(),
    };
    let len = match input.u8() % 3 {
        0 => u64::from(input.u8() % 16 + 1) << 12,
        _ => u64::from(input.u16()) + 1,
    };
    let off = ((u64::from(input.u8()) << 12) % (MEM as u64 - len + 1)) & !0xfff;
    let prot = match input.u8() % 4 {
        0 => DmaProt::READ_ONLY,
        1 => DmaProt {
            read: false,
            write: true,
        },
        2 => DmaProt {
            read: false,
            write: false,
        },
        _ => DmaProt::READ_WRITE,
    };
    Region {
        iova,
        len,
        off,
        prot,
    }
}

/// Maps `r`, which must succeed exactly when it neither overlaps a mapped region nor wraps.
pub(super) fn map(mem: &Memory, map: &MappedRegions, state: &Mutex<State>, r: Region) {
    let mut st = state.lock().unwrap();
    let overlaps = st
        .regions
        .iter()
        .any(|o| r.iova < o.iova.saturating_add(o.len) && o.iova < r.iova.saturating_add(r.len));
    let wraps = r.iova.checked_add(r.len).is_none();
    let res = map.insert_fd(r.iova, r.len, mem.fd.as_fd(), r.off, r.prot);
    assert_eq!(res.is_ok(), !overlaps && !wraps, "mapping {r:?}: {res:?}");
    if res.is_ok() {
        st.regions.push(r);
    }
}
