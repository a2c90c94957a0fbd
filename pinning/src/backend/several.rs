//! Several devices, one job: each chunk of guest RAM is mapped for every device before the
//! next chunk starts, so the engine's guarantees (first error wins, undo of exactly the
//! completed work, cancellation) hold for all of them at once.

use std::sync::{Arc, Mutex};

use super::{BackendError, BackendInfo, PinBackend};
use crate::region::{GuestRam, Piece};

/// The backends of several DMA-capable devices as one.
pub struct SeveralBackend {
    parts: Vec<Arc<dyn PinBackend>>,
    /// The parts' descriptions combined, once.
    info: BackendInfo,
    /// Unmaps that failed while a failed `map` took a piece back from the parts before the
    /// failing one: nobody undoes that piece again, so `end` reports them.
    stuck: Mutex<Vec<BackendError>>,
}

impl SeveralBackend {
    /// `parts` in the order chunks are mapped (and the reverse of the order they are undone).
    pub fn new(parts: Vec<Arc<dyn PinBackend>>) -> Self {
        Self {
            info: BackendInfo::combine(parts.iter().map(|p| p.describe())),
            parts,
            stuck: Mutex::new(Vec::new()),
        }
    }

    fn stuck(&self) -> std::sync::MutexGuard<'_, Vec<BackendError>> {
        self.stuck.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl PinBackend for SeveralBackend {
    /// The first device's kind (the report names one backend per job), and as few map
    /// threads as the most serial part allows (type1's container map is serial).
    fn describe(&self) -> BackendInfo {
        self.info
    }
    fn begin(&self, ram: &GuestRam) -> Result<(), BackendError> {
        for (i, p) in self.parts.iter().enumerate() {
            if let Err(e) = p.begin(ram) {
                for failed in self.parts[..i].iter().rev().flat_map(|q| q.end(ram)) {
                    tracing::error!("{failed}");
                }
                return Err(e);
            }
        }
        Ok(())
    }
    fn end(&self, ram: &GuestRam) -> Vec<BackendError> {
        let mut failed = std::mem::take(&mut *self.stuck());
        failed.extend(self.parts.iter().rev().flat_map(|p| p.end(ram)));
        failed
    }
    fn map(&self, piece: &Piece) -> Result<(), BackendError> {
        for (i, p) in self.parts.iter().enumerate() {
            if let Err(e) = p.map(piece) {
                // Leave nothing behind: the devices already mapped give the piece back.
                for q in self.parts[..i].iter().rev() {
                    if let Err(failed) = q.unmap(piece) {
                        self.stuck().push(failed);
                    }
                }
                return Err(e);
            }
        }
        Ok(())
    }
    /// Every device gives the piece back, even after one fails; the first failure is the
    /// piece's (the bytes are the same whichever device keeps them). A device that had
    /// nothing there (ENOENT) only speaks for the piece when no other failed otherwise: after
    /// a panic in `map`, the caller learns of a device that kept the piece, not of the one
    /// that never got it.
    fn unmap(&self, piece: &Piece) -> Result<(), BackendError> {
        let mut failed: Vec<BackendError> = self
            .parts
            .iter()
            .rev()
            .filter_map(|p| p.unmap(piece).err())
            .collect();
        if failed.is_empty() {
            return Ok(());
        }
        let stands = failed
            .iter()
            .position(|e| e.errno() != Some(libc::ENOENT))
            .unwrap_or(0);
        let first = failed.remove(stands);
        for e in failed {
            tracing::warn!("{e}");
        }
        Err(first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{BackendKind, IommufdBackend, Type1Backend};
    use crate::model::IommuModel;

    fn piece(guest_addr: u64) -> Piece {
        Piece {
            host_addr: 0x7f00_0000_0000 + guest_addr,
            guest_addr,
            len: 0x20_0000,
            file: None,
        }
    }

    #[test]
    fn maps_every_device_and_a_failure_leaves_none_mapped() {
        let a = Arc::new(IommuModel::new(65535, None));
        // The second device refuses its second map call.
        let b = Arc::new(IommuModel::new(65535, None).failing_call(1));
        let several = SeveralBackend::new(vec![
            Arc::new(Type1Backend::new(a.clone(), 65535)),
            Arc::new(IommufdBackend::new(b.clone())),
        ]);
        let info = several.describe();
        assert_eq!(info.kind, BackendKind::Type1);
        assert_eq!(
            info.kinds.iter().collect::<Vec<_>>(),
            [BackendKind::Type1, BackendKind::Iommufd]
        );
        assert_eq!(info.map_threads, Some(1), "type1 maps serially");
        assert_eq!(info.max_mappings, Some(65535));
        assert!(info.locks_memory && info.populate_first);
        several.map(&piece(0)).unwrap();
        assert_eq!((a.mappings().len(), b.mappings().len()), (1, 1));
        assert!(several.map(&piece(0x20_0000)).is_err());
        assert_eq!(
            (a.mappings().len(), b.mappings().len()),
            (1, 1),
            "the failed piece was taken back from the first device"
        );
        several.unmap(&piece(0)).unwrap();
        assert!(a.mappings().is_empty() && b.mappings().is_empty());
    }

    /// Refuses every unmap.
    struct Sticky;

    impl crate::backend::DmaMapper for Sticky {
        fn map(&self, _iova: u64, _size: u64, _host_addr: u64) -> std::io::Result<()> {
            Ok(())
        }
        fn unmap(&self, _iova: u64, _size: u64) -> std::io::Result<()> {
            Err(std::io::Error::from_raw_os_error(libc::EBUSY))
        }
    }

    /// Answers every unmap with ENOENT, as a vfio-user server or iommufd does for a range
    /// with nothing mapped.
    struct Absent;

    impl crate::backend::DmaMapper for Absent {
        fn map(&self, _iova: u64, _size: u64, _host_addr: u64) -> std::io::Result<()> {
            Ok(())
        }
        fn unmap(&self, _iova: u64, _size: u64) -> std::io::Result<()> {
            Err(std::io::Error::from_raw_os_error(libc::ENOENT))
        }
    }

    #[test]
    fn a_device_that_kept_the_piece_speaks_before_one_that_never_had_it() {
        let several = SeveralBackend::new(vec![
            Arc::new(IommufdBackend::new(Arc::new(Sticky))),
            Arc::new(IommufdBackend::new(Arc::new(Absent))),
        ]);
        let e = several.unmap(&piece(0)).unwrap_err();
        assert_eq!(e.errno(), Some(libc::EBUSY), "{e}");
        let several = SeveralBackend::new(vec![
            Arc::new(IommufdBackend::new(Arc::new(IommuModel::new(65535, None)))),
            Arc::new(IommufdBackend::new(Arc::new(Absent))),
        ]);
        let e = several.unmap(&piece(0)).unwrap_err();
        assert_eq!(e.errno(), Some(libc::ENOENT), "{e}");
    }

    #[test]
    fn a_piece_a_device_would_not_give_back_is_reported_at_end() {
        let refusing = Arc::new(IommuModel::new(65535, None).failing_call(0));
        let several = SeveralBackend::new(vec![
            Arc::new(IommufdBackend::new(Arc::new(Sticky))),
            Arc::new(IommufdBackend::new(refusing)),
        ]);
        assert!(several.map(&piece(0)).is_err());
        let region = crate::region::Region {
            host_addr: 0x7f00_0000_0000,
            guest_addr: 0,
            size: 0x20_0000,
            page_size: 4096,
            file: None,
        };
        // SAFETY: nothing dereferences the region: both parts are models.
        let ram = unsafe { GuestRam::new(vec![region]) }.unwrap();
        let stuck = several.end(&ram);
        assert_eq!(stuck.len(), 1);
        assert_eq!((stuck[0].op, stuck[0].len), ("IOMMU_IOAS_UNMAP", 0x20_0000));
        assert_eq!(stuck[0].errno(), Some(libc::EBUSY));
        assert!(several.end(&ram).is_empty(), "reported once");
        assert!(several.unmap(&piece(0)).is_err());
    }
}
