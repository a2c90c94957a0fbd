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

use pinning::model::IommuModel;

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
    #[error("mmap of {len:#x} bytes for the DMA region at IOVA {iova:#x}: {source}")]
    Mmap {
        iova: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
}

/// Memory behind a region: borrowed from its owner, or an mmap the region owns.
#[derive(Debug)]
struct Region {
    len: u64,
    host: NonNull<u8>,
    prot: DmaProt,
    /// Whether `host` is an mmap of `len` bytes to unmap on drop.
    owned: bool,
}

impl Drop for Region {
    fn drop(&mut self) {
        if self.owned {
            // SAFETY: `host` came from a successful mmap of `len` bytes made by this region,
            // and no access is in flight: accesses hold the map's read lock, removal and drop
            // hold it for writing or own the map.
            unsafe { libc::munmap(self.host.as_ptr().cast(), self.len as usize) };
        }
    }
}

/// A list of mapped regions (IOVA, length, host memory), such as the guest-RAM pieces a
/// vfio-user client maps with DMA_MAP. Regions may be added and removed while devices use it.
#[derive(Debug, Default)]
pub struct MappedRegions {
    regions: RwLock<BTreeMap<u64, Region>>,
}

// SAFETY: the raw host pointers are only dereferenced under the map's lock, within the bounds
// their mappers guaranteed (see `insert_raw`), and the memory they point to is shared memory
// meant to be accessed from any thread.
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

    /// Maps `[iova, iova + len)` to host memory at `host`.
    ///
    /// # Safety
    ///
    /// `host..host + len` must stay valid for reads (and writes, if `prot.write`) until the
    /// region is removed or this list is dropped. Other parties (the guest) may access the
    /// memory concurrently; this list only copies through raw pointers.
    pub unsafe fn insert_raw(
        &self,
        iova: u64,
        len: u64,
        host: NonNull<u8>,
        prot: DmaProt,
    ) -> Result<(), DmaMapError> {
        self.insert(
            iova,
            Region {
                len,
                host,
                prot,
                owned: false,
            },
        )
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
        Ok(Region {
            len,
            host,
            prot,
            owned: true,
        })
    }

    /// Maps `[iova, iova + len)` to `len` bytes of `fd` at `offset`, shared (as a vfio-user
    /// server maps the memfd pieces a DMA_MAP message carries). The mapping is owned by the
    /// list and unmapped when the region is removed.
    pub fn insert_fd(
        &self,
        iova: u64,
        len: u64,
        fd: BorrowedFd<'_>,
        offset: u64,
        prot: DmaProt,
    ) -> Result<(), DmaMapError> {
        let region = Self::mmap(iova, len, prot, libc::MAP_SHARED, fd.as_raw_fd(), offset)?;
        self.insert(iova, region)
    }

    /// Maps `[iova, iova + len)` to fresh zeroed anonymous memory the list owns (for tests and
    /// for devices that only need scratch memory).
    pub fn insert_anonymous(&self, iova: u64, len: u64, prot: DmaProt) -> Result<(), DmaMapError> {
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

/// The IOMMU page size [`IommuModel`] enforces.
const IOMMU_PAGE: u64 = 4096;

/// DMA through the workspace's [`IommuModel`]: an access is translated page by page, as an
/// IOMMU does, so it succeeds only if every page it touches is mapped.
pub struct IommuDma {
    model: Arc<IommuModel>,
}

impl fmt::Debug for IommuDma {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IommuDma").finish_non_exhaustive()
    }
}

impl IommuDma {
    /// DMA through `model`'s mappings.
    ///
    /// # Safety
    ///
    /// Every host address `model` maps, now or later, must be valid for reads and writes of
    /// the mapping's size for as long as this adapter is used, even after it is unmapped
    /// from the model (a translation may race with an unmap). Guest RAM that outlives the
    /// device satisfies this.
    pub unsafe fn new(model: Arc<IommuModel>) -> Self {
        IommuDma { model }
    }

    fn pieces(
        &self,
        iova: u64,
        len: u64,
        direction: DmaDirection,
    ) -> Result<Vec<(u64, usize)>, DmaFault> {
        let access = Access {
            direction,
            iova,
            len,
        };
        let fault = |at, reason| access.fault(at, reason);
        // The model computes `iova + len` unchecked: refuse wrapping accesses first.
        let end = access.end()?;
        let mut pieces = Vec::new();
        let mut at = iova;
        while at < end {
            let page_end = (at / IOMMU_PAGE + 1).saturating_mul(IOMMU_PAGE);
            let n = page_end.min(end) - at;
            let host = self
                .model
                .translate(at, n)
                .ok_or_else(|| fault(at, "no IOMMU mapping"))?;
            pieces.push((host, n as usize));
            at += n;
        }
        Ok(pieces)
    }
}

impl DmaSpace for IommuDma {
    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaFault> {
        let mut done = 0;
        for (host, n) in self.pieces(iova, buf.len() as u64, DmaDirection::Read)? {
            // SAFETY: `new`'s contract makes every translated host range valid memory.
            unsafe {
                std::ptr::copy_nonoverlapping(host as *const u8, buf[done..].as_mut_ptr(), n)
            };
            done += n;
        }
        Ok(())
    }

    fn write(&self, iova: u64, buf: &[u8]) -> Result<(), DmaFault> {
        let mut done = 0;
        for (host, n) in self.pieces(iova, buf.len() as u64, DmaDirection::Write)? {
            // SAFETY: as in `read`.
            unsafe { std::ptr::copy_nonoverlapping(buf[done..].as_ptr(), host as *mut u8, n) };
            done += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pinning::backend::DmaMapper;

    #[test]
    fn anonymous_regions_round_trip() {
        let dma = MappedRegions::new();
        dma.insert_anonymous(0x10000, 0x2000, DmaProt::READ_WRITE)
            .unwrap();
        dma.write(0x11ff0, &[7; 16]).unwrap();
        let mut buf = [0u8; 20];
        dma.read(0x11fec, &mut buf).unwrap();
        assert_eq!(&buf[..4], &[0; 4]);
        assert_eq!(&buf[4..], &[7; 16]);
        assert_eq!(dma.regions(), [(0x10000, 0x2000)]);
    }

    #[test]
    fn unmapped_and_straddling_accesses_fault_and_transfer_nothing() {
        let dma = MappedRegions::new();
        dma.insert_anonymous(0x10000, 0x1000, DmaProt::READ_WRITE)
            .unwrap();
        // Entirely outside.
        let err = dma.write(0x20000, &[1; 4]).unwrap_err();
        assert_eq!(err.fault_iova, 0x20000);
        assert_eq!(err.direction, DmaDirection::Write);
        // Before the start.
        let mut buf = [0u8; 8];
        assert_eq!(dma.read(0xfffc, &mut buf).unwrap_err().fault_iova, 0xfffc);
        // Straddling the end: faults at the first unmapped byte and writes nothing.
        let err = dma.write(0x10ffc, &[9; 8]).unwrap_err();
        assert_eq!(err.fault_iova, 0x11000);
        assert_eq!(
            err.to_string(),
            "DMA write of 0x8 byte(s) at IOVA 0x10ffc faulted at 0x11000: not mapped"
        );
        dma.read(0x10ff8, &mut buf).unwrap();
        assert_eq!(buf, [0; 8]);
        // Wrapping the address space.
        let err = dma.read(u64::MAX - 2, &mut buf).unwrap_err();
        assert_eq!(err.reason, "the access wraps the IOVA space");
        // A zero-length access touches nothing and succeeds anywhere.
        dma.read(0x90000, &mut []).unwrap();
    }

    #[test]
    fn adjacent_regions_join_and_gaps_fault() {
        let dma = MappedRegions::new();
        dma.insert_anonymous(0x1000, 0x1000, DmaProt::READ_WRITE)
            .unwrap();
        dma.insert_anonymous(0x2000, 0x1000, DmaProt::READ_WRITE)
            .unwrap();
        dma.insert_anonymous(0x4000, 0x1000, DmaProt::READ_WRITE)
            .unwrap();
        let data: Vec<u8> = (0..32).collect();
        dma.write(0x1ff0, &data).unwrap();
        let mut back = vec![0u8; 32];
        dma.read(0x1ff0, &mut back).unwrap();
        assert_eq!(back, data);
        // 0x3000..0x4000 is a hole.
        let err = dma.write(0x2ff0, &data).unwrap_err();
        assert_eq!(err.fault_iova, 0x3000);
    }

    #[test]
    fn map_rules() {
        let dma = MappedRegions::new();
        dma.insert_anonymous(0x10000, 0x1000, DmaProt::READ_WRITE)
            .unwrap();
        assert!(matches!(
            dma.insert_anonymous(0x10800, 0x1000, DmaProt::READ_WRITE),
            Err(DmaMapError::Overlap {
                existing: 0x10000,
                ..
            })
        ));
        assert!(matches!(
            dma.insert_anonymous(0xf000, 0x1001, DmaProt::READ_WRITE),
            Err(DmaMapError::Overlap { .. })
        ));
        assert!(matches!(
            dma.insert_anonymous(0x20000, 0, DmaProt::READ_WRITE),
            Err(DmaMapError::InvalidRange { .. })
        ));
        assert!(matches!(
            dma.insert_anonymous(u64::MAX - 0xfff, 0x1000, DmaProt::READ_WRITE),
            Err(DmaMapError::InvalidRange { .. })
        ));
        assert!(matches!(
            dma.remove(0x10000, 0x800),
            Err(DmaMapError::NotMapped { .. })
        ));
        dma.remove(0x10000, 0x1000).unwrap();
        assert!(dma.regions().is_empty());
        let mut b = [0u8; 1];
        assert!(dma.read(0x10000, &mut b).is_err());
    }

    #[test]
    fn read_only_regions_refuse_device_writes() {
        let dma = MappedRegions::new();
        dma.insert_anonymous(0x10000, 0x1000, DmaProt::READ_ONLY)
            .unwrap();
        let mut b = [0u8; 4];
        dma.read(0x10000, &mut b).unwrap();
        let err = dma.write(0x10000, &b).unwrap_err();
        assert_eq!(err.reason, "the mapping does not allow it");
    }

    #[test]
    fn memfd_regions_share_memory_with_their_owner() {
        // SAFETY: a plain memfd_create call with a valid NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"dma-test".as_ptr(), 0) };
        assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
        // SAFETY: `fd` was just created and is owned by nobody else.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // SAFETY: `fd` is a valid memfd.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), 0x3000) }, 0);
        let dma = MappedRegions::new();
        // The second page of the memfd at IOVA 0x8000_0000.
        use std::os::fd::AsFd;
        dma.insert_fd(0x8000_0000, 0x1000, fd.as_fd(), 0x1000, DmaProt::READ_WRITE)
            .unwrap();
        dma.write(0x8000_0010, b"hello").unwrap();
        let mut back = [0u8; 5];
        // SAFETY: reading 5 bytes of the memfd at 0x1010 into our buffer.
        let n =
            unsafe { libc::pread(fd.as_raw_fd(), back.as_mut_ptr().cast(), back.len(), 0x1010) };
        assert_eq!(n, 5);
        assert_eq!(&back, b"hello");
    }

    #[test]
    fn raw_regions_borrow_memory() {
        let mut mem = vec![0u8; 0x100];
        let dma = MappedRegions::new();
        // SAFETY: `mem` outlives `dma` (dropped first below) and is not otherwise accessed
        // while `dma` may write it.
        unsafe {
            dma.insert_raw(
                0x5000,
                0x100,
                NonNull::new(mem.as_mut_ptr()).unwrap(),
                DmaProt::READ_WRITE,
            )
        }
        .unwrap();
        dma.write(0x50fe, &[1, 2]).unwrap();
        assert!(dma.write(0x50ff, &[1, 2]).is_err());
        drop(dma);
        assert_eq!(&mem[0xfe..], &[1, 2]);
    }

    #[test]
    fn iommu_model_adapter_translates_per_page() {
        let mut mem = vec![0u8; 0x4000];
        // Page-align the host side as the model demands.
        let base = (mem.as_mut_ptr() as u64 + 0xfff) & !0xfff;
        let model = Arc::new(IommuModel::new(16, None));
        model.map(0x10_0000, 0x1000, base).unwrap();
        model.map(0x10_1000, 0x1000, base + 0x2000).unwrap();
        // SAFETY: both mappings point into `mem`, which outlives `dma` and is only accessed
        // through `dma` meanwhile.
        let dma = unsafe { IommuDma::new(model.clone()) };
        // Crosses from the first mapping into the second, whose host page is not adjacent.
        dma.write(0x10_0ffe, &[1, 2, 3, 4]).unwrap();
        let mut back = [0u8; 4];
        dma.read(0x10_0ffe, &mut back).unwrap();
        assert_eq!(back, [1, 2, 3, 4]);
        let off = (base - mem.as_ptr() as u64) as usize;
        assert_eq!(&mem[off + 0xffe..off + 0x1000], &[1, 2]);
        assert_eq!(&mem[off + 0x2000..off + 0x2002], &[3, 4]);
        // Past the second mapping, and wrapping.
        let err = dma.write(0x10_1ffe, &[0; 4]).unwrap_err();
        assert_eq!(err.fault_iova, 0x10_2000);
        assert!(dma.read(u64::MAX - 1, &mut back).is_err());
        assert!(dma.read(u64::MAX - 3, &mut back).is_err());
    }
}
