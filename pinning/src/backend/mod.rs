//! The ways of preparing guest RAM, behind one trait the pinner drives.
//!
//! | backend | per chunk | parallel | locks |
//! |---|---|---|---|
//! | `none` | nothing | - | no |
//! | `populate` | MADV_POPULATE_WRITE | yes | no |
//! | `mlock` | MADV_POPULATE_WRITE inside one `mlock2(MLOCK_ONFAULT)` | yes | yes |
//! | `type1` | populate (parallel), then VFIO_IOMMU_MAP_DMA in large chunks | map is serial | yes |
//! | `iommufd` | IOMMU_IOAS_MAP | yes | yes |
//! | `vfio-user` | populate, then a DMA_MAP message with the memfd and offset | yes | no |
//!
//! `mlock` does not lock per chunk: `mlock`/`MAP_POPULATE` from several threads serialise
//! on the mm lock and stall every other mmap user meanwhile (measured here: 3.2 GiB/s on
//! one thread, 2.8 on two). One `mlock2(MLOCK_ONFAULT)` marks the whole range, and the
//! parallel populate then locks pages as they fault (3.2 -> 5.1 GiB/s).

mod mlock;
mod populate;
mod several;
mod vfio;
mod vfio_user;

use std::io;

pub use mlock::MlockBackend;
pub(crate) use populate::populate_range;
pub use populate::PopulateBackend;
pub use several::SeveralBackend;
pub use vfio::{DmaMapper, IommufdBackend, Type1Backend, VfioDma};
pub use vfio_user::{FdDmaMapper, VfioUserBackend};

use crate::region::{GuestRam, Piece};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    None,
    Populate,
    Mlock,
    Type1,
    Iommufd,
    VfioUser,
}

impl BackendKind {
    /// Every kind, in the order the command line lists them.
    pub const ALL: [BackendKind; 6] = [
        BackendKind::None,
        BackendKind::Populate,
        BackendKind::Mlock,
        BackendKind::Type1,
        BackendKind::Iommufd,
        BackendKind::VfioUser,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::None => "none",
            BackendKind::Populate => "populate",
            BackendKind::Mlock => "mlock",
            BackendKind::Type1 => "type1",
            BackendKind::Iommufd => "iommufd",
            BackendKind::VfioUser => "vfio-user",
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed backend operation, with the memory it was about.
#[derive(Debug, thiserror::Error)]
#[error("{op} of {len:#x} bytes at guest {guest_addr:#x} (host {host_addr:#x}) failed: {source}")]
pub struct BackendError {
    pub op: &'static str,
    pub guest_addr: u64,
    pub host_addr: u64,
    pub len: u64,
    #[source]
    pub source: io::Error,
}

impl BackendError {
    pub fn new(op: &'static str, piece: &Piece, source: io::Error) -> Self {
        Self {
            op,
            guest_addr: piece.guest_addr,
            host_addr: piece.host_addr,
            len: piece.len,
            source,
        }
    }

    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

/// One way of preparing guest RAM. `map` runs on memory already faulted in (see
/// [`PinBackend::populates`]) and must leave nothing behind when it fails. `unmap` and `end`
/// say when they fail (what they covered may then remain mapped or locked); the pinner counts
/// each failure, goes on with the rest, and reports them: teardown always finishes.
pub trait PinBackend: Send + Sync {
    fn kind(&self) -> BackendKind;

    /// Every kind this backend maps through (several for several devices).
    fn kinds(&self) -> Vec<BackendKind> {
        vec![self.kind()]
    }

    /// Whether the mapped bytes count against RLIMIT_MEMLOCK.
    fn locks_memory(&self) -> bool;

    /// Whether RAM must be faulted in before `map` (counts against the memory cgroup). The
    /// pinner does the faulting, in cancellable steps, so `map` only locks or maps.
    fn populates(&self) -> bool {
        true
    }

    /// How many threads `map` may usefully run on; `Some(1)` where the kernel serialises.
    fn map_threads(&self) -> Option<usize> {
        None
    }

    /// Populate all of RAM in parallel before the (serial) map phase.
    fn populate_first(&self) -> bool {
        false
    }

    /// How many separate mappings the backend can hold (type1's `dma_entry_limit`).
    fn max_mappings(&self) -> Option<u64> {
        None
    }

    /// A whole-RAM step before any chunk.
    fn begin(&self, _ram: &GuestRam) -> Result<(), BackendError> {
        Ok(())
    }

    /// Undoes `begin`, after every chunk has been unmapped: all of it, even past a failure.
    /// Returns every failure (none when all went well), and anything else the backend could
    /// not undo since `begin` (see [`SeveralBackend`]).
    fn end(&self, _ram: &GuestRam) -> Vec<BackendError> {
        Vec::new()
    }

    fn map(&self, piece: &Piece) -> Result<(), BackendError>;

    /// Undoes `map` of exactly this piece.
    fn unmap(&self, piece: &Piece) -> Result<(), BackendError>;
}

/// Does nothing: for guests without DMA-capable devices, and as a baseline.
pub struct NoneBackend;

impl PinBackend for NoneBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::None
    }
    fn locks_memory(&self) -> bool {
        false
    }
    fn populates(&self) -> bool {
        false
    }
    fn map(&self, _piece: &Piece) -> Result<(), BackendError> {
        Ok(())
    }
    fn unmap(&self, _piece: &Piece) -> Result<(), BackendError> {
        Ok(())
    }
}
