//! How a device model reaches guest memory: only through the regions that were mapped for
//! DMA, the way a real device only reaches what the IOMMU maps.
//!
//! Every DMA of the device models goes through [`DmaSpace`]. An access that is not entirely
//! inside mapped memory fails with a [`DmaFault`] and transfers nothing, so a missing IOMMU
//! mapping shows up as a failed device command, never as a silent success.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::{Arc, PoisonError, RwLock};

/// Which way a DMA goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmaDirection {
    /// The device reads memory.
    Read,
    /// The device writes memory.
    Write,
}

impl fmt::Display for DmaDirection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DmaDirection::Read => "read",
            DmaDirection::Write => "write",
        })
    }
}

/// A DMA the IOMMU (or its stand-in) refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "DMA {direction} of {len:#x} byte(s) at IOVA {iova:#x} faulted at {fault_iova:#x}: {reason}"
)]
pub struct DmaFault {
    pub direction: DmaDirection,
    pub iova: u64,
    pub len: u64,
    pub fault_iova: u64,
    pub reason: &'static str,
}

/// One device access being resolved: every fault it raises names the whole access.
#[derive(Clone, Copy)]
struct Access {
    direction: DmaDirection,
    iova: u64,
    len: u64,
}

impl Access {
    fn fault(&self, fault_iova: u64, reason: &'static str) -> DmaFault {
        DmaFault {
            direction: self.direction,
            iova: self.iova,
            len: self.len,
            fault_iova,
            reason,
        }
    }

    /// One past the last byte; an access that wraps the IOVA space is a fault.
    fn end(&self) -> Result<u64, DmaFault> {
        self.iova
            .checked_add(self.len)
            .ok_or_else(|| self.fault(self.iova, "the access wraps the IOVA space"))
    }
}

/// The device's view of memory: IOVAs in, bytes out. Implementations transfer all of an
/// access or nothing.
pub trait DmaSpace: Send + Sync {
    /// Reads `buf.len()` bytes at `iova` into `buf`.
    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaFault>;
    /// Writes `buf` at `iova`.
    fn write(&self, iova: u64, buf: &[u8]) -> Result<(), DmaFault>;
}

impl<T: DmaSpace + ?Sized> DmaSpace for Arc<T> {
    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaFault> {
        (**self).read(iova, buf)
    }
    fn write(&self, iova: u64, buf: &[u8]) -> Result<(), DmaFault> {
        (**self).write(iova, buf)
    }
}

/// Access rights of a mapped region, as in VFIO's DMA_MAP flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaProt {
    /// The device may read.
    pub read: bool,
    /// The device may write.
    pub write: bool,
}

impl DmaProt {
    /// Read and write.
    pub const READ_WRITE: DmaProt = DmaProt {
        read: true,
        write: true,
    };
    /// Read only.
    pub const READ_ONLY: DmaProt = DmaProt {
        read: true,
        write: false,
    };
}

/// Why a region could not be mapped or unmapped.
#[derive(Debug, thiserror::Error)]
pub enum DmaMapError {
    #[error("DMA region at IOVA {iova:#x} with length {len:#x} is empty or wraps")]
    InvalidRange { iova: u64, len: u64 },
    #[error(
        "DMA region {iova:#x}+{len:#x} overlaps the mapped region {existing:#x}+{existing_len:#x}"
    )]
    Overlap {
        iova: u64,
        len: u64,
        existing: u64,
        existing_len: u64,
    },
    #[error("no DMA region is mapped exactly at IOVA {iova:#x} with length {len:#x}")]
    NotMapped { iova: u64, len: u64 },
    #[error(
        "DMA region at IOVA {iova:#x} with length {len:#x} at file offset {offset:#x} runs past \
         the end of its {file_len:#x}-byte file"
    )]
    PastEnd {
        iova: u64,
        len: u64,
        offset: u64,
        file_len: u64,
    },
    #[error(
        "DMA region at IOVA {iova:#x} with length {len:#x}: {why}, so its sender could \
         truncate it under the mapping; send a memfd sealed with F_SEAL_SHRINK (F_ADD_SEALS)"
    )]
    Unsealed {
        iova: u64,
        len: u64,
        why: &'static str,
    },
    #[error("mmap of {len:#x} bytes for the DMA region at IOVA {iova:#x}: {source}")]
    Mmap {
        iova: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
}

/// Memory behind a region: an mmap the region owns.
#[derive(Debug)]
struct Region {
    len: u64,
    host: NonNull<u8>,
    prot: DmaProt,
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: `host` came from a successful mmap of `len` bytes made by this region, and
        // no access is in flight: accesses hold the map's read lock, removal and drop hold it
        // for writing or own the map.
        unsafe { libc::munmap(self.host.as_ptr().cast(), self.len as usize) };
    }
}

/// A list of mapped regions (IOVA, length, host memory), such as the guest-RAM pieces a
/// vfio-user client maps with DMA_MAP. Regions may be added and removed while devices use it.
#[derive(Debug, Default)]
pub struct MappedRegions {
    regions: RwLock<BTreeMap<u64, Region>>,
}

// SAFETY: the raw host pointers are only dereferenced under the map's lock, within the mmaps
// the regions own, and the memory they point to is shared memory meant to be accessed from
// any thread.
unsafe impl Send for MappedRegions {}
// SAFETY: as above; concurrent accessors copy through raw pointers, never through references.
unsafe impl Sync for MappedRegions {}

impl MappedRegions {
    /// No regions: every DMA faults.
    pub fn new() -> Self {
        Self::default()
    }

    fn insert(&self, iova: u64, region: Region) -> Result<(), DmaMapError> {
        let len = region.len;
        let end = iova
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(DmaMapError::InvalidRange { iova, len })?;
        let mut map = self.regions.write().unwrap_or_else(PoisonError::into_inner);
        let before = map.range(..end).next_back();
        if let Some((&existing, r)) = before.filter(|(&s, r)| s + r.len > iova) {
            return Err(DmaMapError::Overlap {
                iova,
                len,
                existing,
                existing_len: r.len,
            });
        }
        map.insert(iova, region);
        Ok(())
    }

    fn mmap(
        iova: u64,
        len: u64,
        prot: DmaProt,
        flags: libc::c_int,
        fd: libc::c_int,
        offset: u64,
    ) -> Result<Region, DmaMapError> {
        let size = usize::try_from(len)
            .ok()
            .filter(|&s| s > 0)
            .ok_or(DmaMapError::InvalidRange { iova, len })?;
        let off = libc::off_t::try_from(offset).map_err(|_| DmaMapError::Mmap {
            iova,
            len,
            source: io::Error::from_raw_os_error(libc::EINVAL),
        })?;
        let mut mprot = libc::PROT_NONE;
        if prot.read {
            mprot |= libc::PROT_READ;
        }
        if prot.write {
            mprot |= libc::PROT_WRITE;
        }
        // SAFETY: a fresh mapping chosen by the kernel (no fixed address), so no existing
        // memory is affected; the result is checked before use.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), size, mprot, flags, fd, off) };
        if ptr == libc::MAP_FAILED {
            return Err(DmaMapError::Mmap {
                iova,
                len,
                source: io::Error::last_os_error(),
            });
        }
        let host = NonNull::new(ptr.cast()).ok_or(DmaMapError::Mmap {
            iova,
            len,
            source: io::Error::from_raw_os_error(libc::EINVAL),
        })?;
        Ok(Region { len, host, prot })
    }

    /// Maps `[iova, iova + len)` to `len` bytes of `fd` at `offset`, shared (as a vfio-user
    /// server maps the memfd pieces a DMA_MAP message carries). The mapping is owned by the
    /// list and unmapped when the region is removed.
    ///
    /// The file must be sealed against shrinking (F_SEAL_SHRINK) and the range must lie inside
    /// it: a mapping past the end of a file maps, but the first DMA there is a SIGBUS that
    /// kills the process, and without the seal the sender could shrink the file afterwards.
    pub fn insert_fd(
        &self,
        iova: u64,
        len: u64,
        fd: BorrowedFd<'_>,
        offset: u64,
        prot: DmaProt,
    ) -> Result<(), DmaMapError> {
        // SAFETY: F_GET_SEALS takes no argument and only returns an int; `fd` is open.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        let why = match seals {
            s if s < 0 => {
                Some("its file takes no seals (it is not a memfd, tmpfs or hugetlbfs file)")
            }
            s if s & libc::F_SEAL_SHRINK == 0 => Some("its file is not sealed against shrinking"),
            _ => None,
        };
        if let Some(why) = why {
            return Err(DmaMapError::Unsealed { iova, len, why });
        }
        // SAFETY: `stat` is plain data, for which all zeroes is a valid value.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat writes only into `st`, which we own; `fd` is open for the call.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(DmaMapError::Mmap {
                iova,
                len,
                source: io::Error::last_os_error(),
            });
        }
        let file_len = u64::try_from(st.st_size).unwrap_or(0);
        let inside = offset.checked_add(len).is_some_and(|end| end <= file_len);
        // Only regular files take seals, so the size is the file's.
        if !inside {
            return Err(DmaMapError::PastEnd {
                iova,
                len,
                offset,
                file_len,
            });
        }
        let region = Self::mmap(iova, len, prot, libc::MAP_SHARED, fd.as_raw_fd(), offset)?;
        self.insert(iova, region)
    }

    /// Maps `[iova, iova + len)` to fresh zeroed anonymous memory the list owns: guest RAM
    /// for device models tested without a VMM.
    #[cfg(test)]
    pub(crate) fn insert_anonymous(
        &self,
        iova: u64,
        len: u64,
        prot: DmaProt,
    ) -> Result<(), DmaMapError> {
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        let region = Self::mmap(iova, len, prot, flags, -1, 0)?;
        self.insert(iova, region)
    }

    /// Unmaps the region mapped exactly at `[iova, iova + len)`; waits for accesses in flight.
    pub fn remove(&self, iova: u64, len: u64) -> Result<(), DmaMapError> {
        let mut map = self.regions.write().unwrap_or_else(PoisonError::into_inner);
        match map.get(&iova) {
            Some(r) if r.len == len => {
                map.remove(&iova);
                Ok(())
            }
            _ => Err(DmaMapError::NotMapped { iova, len }),
        }
    }

    /// How many regions are mapped.
    pub fn len(&self) -> usize {
        self.regions
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether no region is mapped.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The mapped regions as (IOVA, length).
    pub fn regions(&self) -> Vec<(u64, u64)> {
        let map = self.regions.read().unwrap_or_else(PoisonError::into_inner);
        map.iter().map(|(&iova, r)| (iova, r.len)).collect()
    }

    /// Splits `[iova, iova + len)` into (host pointer, length) pieces, one per region crossed
    /// (adjacent regions join, as IOMMU pages do), or the first IOVA that is not reachable.
    fn resolve(
        map: &BTreeMap<u64, Region>,
        iova: u64,
        len: u64,
        direction: DmaDirection,
    ) -> Result<Vec<(*mut u8, usize)>, DmaFault> {
        let access = Access {
            direction,
            iova,
            len,
        };
        let fault = |at, reason| access.fault(at, reason);
        let end = access.end()?;
        let mut pieces = Vec::new();
        let mut at = iova;
        while at < end {
            let (&start, region) = map
                .range(..=at)
                .next_back()
                .filter(|(&s, r)| at - s < r.len)
                .ok_or_else(|| fault(at, "not mapped"))?;
            let allowed = match direction {
                DmaDirection::Read => region.prot.read,
                DmaDirection::Write => region.prot.write,
            };
            if !allowed {
                return Err(fault(at, "the mapping does not allow it"));
            }
            let offset = at - start;
            let n = (region.len - offset).min(end - at);
            // SAFETY: offset < region.len, so the pointer stays inside the mapped range the
            // region's creator vouched for.
            let ptr = unsafe { region.host.as_ptr().add(offset as usize) };
            pieces.push((ptr, n as usize));
            at += n;
        }
        Ok(pieces)
    }
}

impl DmaSpace for MappedRegions {
    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaFault> {
        let map = self.regions.read().unwrap_or_else(PoisonError::into_inner);
        let pieces = Self::resolve(&map, iova, buf.len() as u64, DmaDirection::Read)?;
        let mut done = 0;
        for (ptr, n) in pieces {
            // SAFETY: `ptr..ptr + n` is inside a readable region (checked by `resolve`), which
            // cannot be unmapped while we hold the read lock; `buf` is our own memory, so the
            // ranges do not overlap.
            unsafe { std::ptr::copy_nonoverlapping(ptr, buf[done..].as_mut_ptr(), n) };
            done += n;
        }
        Ok(())
    }

    fn write(&self, iova: u64, buf: &[u8]) -> Result<(), DmaFault> {
        let map = self.regions.read().unwrap_or_else(PoisonError::into_inner);
        let pieces = Self::resolve(&map, iova, buf.len() as u64, DmaDirection::Write)?;
        let mut done = 0;
        for (ptr, n) in pieces {
            // SAFETY: as in `read`, for a writable region.
            unsafe { std::ptr::copy_nonoverlapping(buf[done..].as_ptr(), ptr, n) };
            done += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod iommu_model;
#[cfg(test)]
pub(crate) use iommu_model::IommuDma;

#[cfg(test)]
mod tests;
