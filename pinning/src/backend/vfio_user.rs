//! vfio-user: the device lives in another process, so it cannot reach guest RAM through an
//! IOMMU. Each chunk is faulted in here (in parallel), then sent as a DMA_MAP message carrying
//! the file descriptor of the shared memory behind it and the offset; the server mmaps that.
//! Messages go out from every pinning thread at once, so the client must pipeline them.

use std::io;
use std::sync::Arc;

use super::{BackendError, BackendInfo, BackendKind, PinBackend};
use crate::region::{Piece, RamFile};

/// Something that maps guest RAM into a device by file descriptor (a vfio-user client).
pub trait FdDmaMapper: Send + Sync {
    /// Maps `[iova, iova + size)` to `size` bytes of `file` at `offset`.
    fn map_fd(&self, iova: u64, size: u64, file: &RamFile, offset: u64) -> io::Result<()>;
    /// Unmaps `[iova, iova + size)`, exactly as mapped.
    fn unmap(&self, iova: u64, size: u64) -> io::Result<()>;
}

/// DMA_MAP over a vfio-user socket.
pub struct VfioUserBackend {
    mapper: Arc<dyn FdDmaMapper>,
}

impl VfioUserBackend {
    pub fn new(mapper: Arc<dyn FdDmaMapper>) -> Self {
        Self { mapper }
    }
}

impl PinBackend for VfioUserBackend {
    /// The server maps the pages; nothing is locked in this process.
    fn describe(&self) -> BackendInfo {
        BackendInfo::new(BackendKind::VfioUser)
    }
    fn map(&self, piece: &Piece) -> Result<(), BackendError> {
        let (file, offset) = piece.file.as_ref().ok_or_else(|| {
            BackendError::new(
                "VFIO_USER_DMA_MAP",
                piece,
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "guest RAM is not backed by a shareable file (use --backing memfd)",
                ),
            )
        })?;
        self.mapper
            .map_fd(piece.guest_addr, piece.len, file, *offset)
            .map_err(|e| BackendError::new("VFIO_USER_DMA_MAP", piece, e))
    }
    fn unmap(&self, piece: &Piece) -> Result<(), BackendError> {
        self.mapper
            .unmap(piece.guest_addr, piece.len)
            .map_err(|e| BackendError::new("VFIO_USER_DMA_UNMAP", piece, e))
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::sync::Mutex;

    use super::*;

    #[derive(Default)]
    struct Recorder {
        maps: Mutex<Vec<(u64, u64, RamFile, u64)>>,
        unmaps: Mutex<Vec<(u64, u64)>>,
    }

    impl FdDmaMapper for Recorder {
        fn map_fd(&self, iova: u64, size: u64, file: &RamFile, offset: u64) -> io::Result<()> {
            if iova == 0xdead_0000 {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            self.maps
                .lock()
                .unwrap()
                .push((iova, size, file.clone(), offset));
            Ok(())
        }
        fn unmap(&self, iova: u64, size: u64) -> io::Result<()> {
            self.unmaps.lock().unwrap().push((iova, size));
            Ok(())
        }
    }

    fn piece(guest_addr: u64, file: Option<(RamFile, u64)>) -> Piece {
        Piece {
            host_addr: 0x7f00_0000_0000 + guest_addr,
            guest_addr,
            len: 0x20_0000,
            file,
        }
    }

    #[test]
    fn maps_by_fd_and_offset_and_refuses_private_memory() {
        let rec = Arc::new(Recorder::default());
        let b = VfioUserBackend::new(rec.clone());
        let file = RamFile::new(File::open("/dev/null").unwrap());
        b.map(&piece(0x1_0000_0000, Some((file.clone(), 0xc000_0000))))
            .unwrap();
        assert_eq!(
            rec.maps.lock().unwrap()[..],
            [(0x1_0000_0000, 0x20_0000, file.clone(), 0xc000_0000)]
        );
        let e = b.map(&piece(0, None)).unwrap_err();
        assert!(e.to_string().contains("--backing memfd"), "{e}");
        let e = b
            .map(&piece(0xdead_0000, Some((file.clone(), 0))))
            .unwrap_err();
        assert_eq!(e.errno(), Some(libc::ENOSPC));
        b.unmap(&piece(0x1_0000_0000, Some((file.clone(), 0))))
            .unwrap();
        assert_eq!(rec.unmaps.lock().unwrap()[..], [(0x1_0000_0000, 0x20_0000)]);
        assert!(!b.describe().locks_memory);
    }
}
