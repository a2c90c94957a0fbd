//! Fault guest RAM in with MADV_POPULATE_WRITE: the kernel allocates and zeroes each page
//! once, with no user-space touch, and reports a shortage (an exhausted hugetlb pool) as an
//! error instead of SIGBUS. On kernels before 5.14 (EINVAL) it falls back to touching one
//! byte per page through process_vm_readv/writev, which also turns SIGBUS into EFAULT.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

use super::{BackendError, BackendInfo, BackendKind, PinBackend};
use crate::region::Piece;
use crate::sys;

pub struct PopulateBackend;

static NO_POPULATE: AtomicBool = AtomicBool::new(false);

/// Faults `[piece.host_addr, +len)` in writable. Contents are unchanged.
pub fn populate_range(piece: &Piece) -> Result<(), BackendError> {
    if !NO_POPULATE.load(Ordering::Relaxed) {
        // SAFETY: the range is guest RAM (GuestRam's contract); populating keeps contents.
        match unsafe { sys::populate_write(piece.host_addr, piece.len) } {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::info!("MADV_POPULATE_WRITE unsupported; touching pages instead");
                NO_POPULATE.store(true, Ordering::Relaxed);
            }
            Err(e) => return Err(BackendError::new("populate", piece, e)),
        }
    }
    touch_pages(piece).map_err(|e| BackendError::new("touch", piece, e))
}

/// Reads and writes back one byte per 4 KiB through the kernel, so a page with nothing
/// behind it fails with EFAULT rather than killing the process.
fn touch_pages(piece: &Piece) -> io::Result<()> {
    let pid = std::process::id() as libc::pid_t;
    let mut addr = piece.host_addr;
    while addr < piece.host_addr + piece.len {
        let mut byte = 0u8;
        let local = libc::iovec {
            iov_base: (&mut byte as *mut u8).cast(),
            iov_len: 1,
        };
        let remote = libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: 1,
        };
        // SAFETY: `local` points at a live local byte; the kernel validates `remote`.
        if unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) } != 1 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above; writing back the byte just read leaves contents unchanged.
        if unsafe { libc::process_vm_writev(pid, &local, 1, &remote, 1, 0) } != 1 {
            return Err(io::Error::last_os_error());
        }
        addr += 4096;
    }
    Ok(())
}

impl PinBackend for PopulateBackend {
    fn describe(&self) -> BackendInfo {
        BackendInfo::new(BackendKind::Populate)
    }
    /// The pinner has faulted the piece in already: that is all this backend does.
    fn map(&self, _piece: &Piece) -> Result<(), BackendError> {
        Ok(())
    }
    /// Populated memory is simply resident: it is freed with the mapping, not before.
    fn unmap(&self, _piece: &Piece) -> Result<(), BackendError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::AnonMapping;

    fn resident_pages(addr: u64, len: u64) -> usize {
        let mut vec = vec![0u8; (len / 4096) as usize];
        // SAFETY: the range is a live mapping; vec has one byte per page.
        let r = unsafe { libc::mincore(addr as *mut libc::c_void, len as usize, vec.as_mut_ptr()) };
        assert_eq!(r, 0);
        vec.iter().filter(|b| **b & 1 == 1).count()
    }

    #[test]
    fn populate_makes_every_page_resident() {
        let m = AnonMapping::new(8 << 20).unwrap();
        let piece = Piece {
            host_addr: m.addr(),
            guest_addr: 0,
            len: m.len(),
            file: None,
        };
        assert_eq!(resident_pages(m.addr(), m.len()), 0);
        populate_range(&piece).unwrap();
        assert_eq!(resident_pages(m.addr(), m.len()), 2048);
    }

    #[test]
    fn touch_fallback_faults_pages_and_reports_holes() {
        let m = AnonMapping::new(1 << 20).unwrap();
        let piece = Piece {
            host_addr: m.addr(),
            guest_addr: 0,
            len: m.len(),
            file: None,
        };
        touch_pages(&piece).unwrap();
        assert_eq!(resident_pages(m.addr(), m.len()), 256);
        let hole = Piece {
            host_addr: 4096,
            guest_addr: 0,
            len: 4096,
            file: None,
        };
        assert_eq!(
            touch_pages(&hole).unwrap_err().raw_os_error(),
            Some(libc::EFAULT)
        );
    }
}
