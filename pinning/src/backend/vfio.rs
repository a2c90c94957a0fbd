//! Kernel VFIO backends over vfio-ioctls: a type1 container and an iommufd IOAS.
//!
//! type1: the kernel takes the container's lock for every VFIO_IOMMU_MAP_DMA, so mapping
//! from several threads buys nothing. What does parallelise is faulting pages in, so the
//! pinner populates all of RAM in parallel first, then maps serially in large chunks, which
//! pin already-present pages quickly and stay far below `dma_entry_limit` (65535 by default).
//!
//! iommufd: IOMMU_IOAS_MAP pins concurrently, so chunks are mapped in parallel. The device
//! must be attached to the IOAS before RAM is mapped, or the kernel pins everything again,
//! lazily and on one thread, at attach time.

use std::io;
use std::sync::Arc;

use vfio_ioctls::{VfioError, VfioOps};

use super::{BackendError, BackendInfo, BackendKind, PinBackend};
use crate::region::Piece;

/// The kernel's default for vfio_iommu_type1's `dma_entry_limit` module parameter.
const DEFAULT_DMA_ENTRY_LIMIT: u64 = 65535;

/// Something that maps host memory at an IOVA for a device: a VFIO container, an iommufd
/// IOAS, a vfio-user server, or the IOMMU model in tests.
pub trait DmaMapper: Send + Sync {
    /// Maps `[host_addr, +size)` at `iova`. Only called on guest RAM (see `GuestRam::new`).
    fn map(&self, iova: u64, size: u64, host_addr: u64) -> io::Result<()>;
    fn unmap(&self, iova: u64, size: u64) -> io::Result<()>;
}

/// A vfio-ioctls container or iommufd as a [`DmaMapper`].
pub struct VfioDma(pub Arc<dyn VfioOps>);

/// The errno behind a vfio-ioctls error where there is one, so callers can tell "nothing was
/// mapped there" (ENOENT) from a failure.
fn vfio_io_error(e: VfioError) -> io::Error {
    match &e {
        VfioError::IommuDmaMap(sys) | VfioError::IommuDmaUnmap(sys) => {
            io::Error::from_raw_os_error(sys.errno())
        }
        // The kernel unmapped less than asked. A piece is mapped whole by one call, which
        // the kernel does all or nothing, and unmapped exactly as mapped, so less is none:
        // type1 says so with size 0, where iommufd answers ENOENT itself.
        VfioError::InvalidDmaUnmapSize => io::Error::from_raw_os_error(libc::ENOENT),
        _ => {
            // iommufd's ioctl errors carry theirs one level down.
            let mut source = std::error::Error::source(&e);
            while let Some(inner) = source {
                if let Some(sys) = inner.downcast_ref::<vmm_sys_util::errno::Error>() {
                    return io::Error::from_raw_os_error(sys.errno());
                }
                source = inner.source();
            }
            io::Error::other(e.to_string())
        }
    }
}

impl DmaMapper for VfioDma {
    fn map(&self, iova: u64, size: u64, host_addr: u64) -> io::Result<()> {
        // SAFETY: host_addr is guest RAM, which GuestRam's contract says is only accessed
        // through raw pointers and volatile operations, as VfioOps requires once mapped.
        unsafe {
            self.0
                .vfio_dma_map(iova, size as usize, host_addr as *mut u8)
        }
        .map_err(vfio_io_error)
    }

    fn unmap(&self, iova: u64, size: u64) -> io::Result<()> {
        self.0
            .vfio_dma_unmap(iova, size as usize)
            .map_err(vfio_io_error)
    }
}

fn map_piece(mapper: &dyn DmaMapper, op: &'static str, piece: &Piece) -> Result<(), BackendError> {
    mapper
        .map(piece.guest_addr, piece.len, piece.host_addr)
        .map_err(|e| BackendError::new(op, piece, e))
}

fn unmap_piece(
    mapper: &dyn DmaMapper,
    op: &'static str,
    piece: &Piece,
) -> Result<(), BackendError> {
    mapper
        .unmap(piece.guest_addr, piece.len)
        .map_err(|e| BackendError::new(op, piece, e))
}

/// VFIO type1 container.
pub struct Type1Backend {
    mapper: Arc<dyn DmaMapper>,
    entry_limit: u64,
}

impl Type1Backend {
    pub fn new(mapper: Arc<dyn DmaMapper>, entry_limit: u64) -> Self {
        Self {
            mapper,
            entry_limit,
        }
    }

    /// The host's `dma_entry_limit`, or the kernel default if the module isn't loaded.
    pub fn host_entry_limit() -> u64 {
        std::fs::read_to_string("/sys/module/vfio_iommu_type1/parameters/dma_entry_limit")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(DEFAULT_DMA_ENTRY_LIMIT)
    }
}

impl PinBackend for Type1Backend {
    fn describe(&self) -> BackendInfo {
        BackendInfo {
            locks_memory: true,
            map_threads: Some(1),
            populate_first: true,
            max_mappings: Some(self.entry_limit),
            ..BackendInfo::new(BackendKind::Type1)
        }
    }
    fn map(&self, piece: &Piece) -> Result<(), BackendError> {
        map_piece(self.mapper.as_ref(), "VFIO_IOMMU_MAP_DMA", piece)
    }
    fn unmap(&self, piece: &Piece) -> Result<(), BackendError> {
        unmap_piece(self.mapper.as_ref(), "VFIO_IOMMU_UNMAP_DMA", piece)
    }
}

/// iommufd IOAS.
pub struct IommufdBackend {
    mapper: Arc<dyn DmaMapper>,
}

impl IommufdBackend {
    pub fn new(mapper: Arc<dyn DmaMapper>) -> Self {
        Self { mapper }
    }
}

impl PinBackend for IommufdBackend {
    fn describe(&self) -> BackendInfo {
        BackendInfo {
            locks_memory: true,
            ..BackendInfo::new(BackendKind::Iommufd)
        }
    }
    fn map(&self, piece: &Piece) -> Result<(), BackendError> {
        // The pinner faulted the piece in first: IOAS_MAP would otherwise fault each page
        // through GUP one at a time.
        map_piece(self.mapper.as_ref(), "IOMMU_IOAS_MAP", piece)
    }
    fn unmap(&self, piece: &Piece) -> Result<(), BackendError> {
        unmap_piece(self.mapper.as_ref(), "IOMMU_IOAS_UNMAP", piece)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unmap_that_found_nothing_reads_as_enoent() {
        let e = vfio_io_error(VfioError::InvalidDmaUnmapSize);
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        let sys = vmm_sys_util::errno::Error::new(libc::EINVAL);
        let e = vfio_io_error(VfioError::IommuDmaUnmap(sys));
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
    }
}
