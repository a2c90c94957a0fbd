//! Several devices, one job: each chunk of guest RAM is mapped for every device before the
//! next chunk starts, so the engine's guarantees (first error wins, undo of exactly the
//! completed work, cancellation) hold for all of them at once.

use std::sync::Arc;

use super::{BackendError, BackendKind, PinBackend};
use crate::region::{GuestRam, Piece};

/// The backends of several DMA-capable devices as one.
pub struct SeveralBackend {
    parts: Vec<Arc<dyn PinBackend>>,
}

impl SeveralBackend {
    /// `parts` in the order chunks are mapped (and the reverse of the order they are undone).
    pub fn new(parts: Vec<Arc<dyn PinBackend>>) -> Self {
        Self { parts }
    }
}

impl PinBackend for SeveralBackend {
    /// The first device's kind: the report names one backend per job.
    fn kind(&self) -> BackendKind {
        self.parts.first().map_or(BackendKind::None, |p| p.kind())
    }
    fn kinds(&self) -> Vec<BackendKind> {
        self.parts.iter().flat_map(|p| p.kinds()).collect()
    }
    fn locks_memory(&self) -> bool {
        self.parts.iter().any(|p| p.locks_memory())
    }
    fn populates(&self) -> bool {
        self.parts.iter().any(|p| p.populates())
    }
    /// As few as the most serial part allows (type1's container map is serial).
    fn map_threads(&self) -> Option<usize> {
        self.parts.iter().filter_map(|p| p.map_threads()).min()
    }
    fn populate_first(&self) -> bool {
        self.parts.iter().any(|p| p.populate_first())
    }
    fn max_mappings(&self) -> Option<u64> {
        self.parts.iter().filter_map(|p| p.max_mappings()).min()
    }
    fn begin(&self, ram: &GuestRam) -> Result<(), BackendError> {
        for (i, p) in self.parts.iter().enumerate() {
            if let Err(e) = p.begin(ram) {
                self.parts[..i].iter().rev().for_each(|q| q.end(ram));
                return Err(e);
            }
        }
        Ok(())
    }
    fn end(&self, ram: &GuestRam) {
        self.parts.iter().rev().for_each(|p| p.end(ram));
    }
    fn map(&self, piece: &Piece) -> Result<(), BackendError> {
        for (i, p) in self.parts.iter().enumerate() {
            if let Err(e) = p.map(piece) {
                // Leave nothing behind: the devices already mapped give the piece back.
                self.parts[..i].iter().rev().for_each(|q| q.unmap(piece));
                return Err(e);
            }
        }
        Ok(())
    }
    fn unmap(&self, piece: &Piece) {
        self.parts.iter().rev().for_each(|p| p.unmap(piece));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{IommufdBackend, Type1Backend};
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
        assert_eq!(several.kind(), BackendKind::Type1);
        assert_eq!(several.kinds(), [BackendKind::Type1, BackendKind::Iommufd]);
        assert_eq!(several.map_threads(), Some(1), "type1 maps serially");
        assert!(several.locks_memory() && several.populate_first());
        several.map(&piece(0)).unwrap();
        assert_eq!((a.mappings().len(), b.mappings().len()), (1, 1));
        assert!(several.map(&piece(0x20_0000)).is_err());
        assert_eq!(
            (a.mappings().len(), b.mappings().len()),
            (1, 1),
            "the failed piece was taken back from the first device"
        );
        several.unmap(&piece(0));
        assert!(a.mappings().is_empty() && b.mappings().is_empty());
    }
}
