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

mod info;
mod mlock;
mod populate;
mod several;
mod vfio;
mod vfio_user;

use std::io;

pub use info::{BackendInfo, BackendKind, KindSet};
pub use mlock::MlockBackend;
pub(crate) use populate::populate_range;
pub use populate::PopulateBackend;
pub use several::SeveralBackend;
pub use vfio::{DmaMapper, IommufdBackend, Type1Backend, VfioDma};
pub use vfio_user::{FdDmaMapper, VfioUserBackend};

use crate::region::{GuestRam, Piece};

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

    /// The errno behind the failure: the system call's, or the one a peer answered with
    /// ([`PeerErrno`]), so that callers can tell "nothing was mapped there" (ENOENT) apart.
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error().or_else(|| {
            let inner = self.source.get_ref()?;
            inner.downcast_ref::<PeerErrno>().map(|e| e.errno)
        })
    }
}

/// A peer's answer (a device server's error reply) carried whole in an `io::Error`: the peer's
/// own words for the message, and its errno for [`BackendError::errno`], which an
/// `io::Error` made from a message alone would lose.
#[derive(Debug, thiserror::Error)]
#[error("{answer}")]
pub struct PeerErrno {
    pub errno: i32,
    /// Displayed as this error, not chained behind it (a chain would print it twice).
    pub answer: Box<dyn std::error::Error + Send + Sync>,
}

impl PeerErrno {
    /// `source`, an answer with `errno`, as an `io::Error` of that errno's kind.
    pub fn into_io(
        errno: i32,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> io::Error {
        let kind = io::Error::from_raw_os_error(errno).kind();
        io::Error::new(
            kind,
            PeerErrno {
                errno,
                answer: source.into(),
            },
        )
    }
}

/// One way of preparing guest RAM. `map` runs on memory already faulted in (see
/// [`BackendInfo::populates`]) and must leave nothing behind when it fails. `unmap` and `end`
/// say when they fail (what they covered may then remain mapped or locked); the pinner counts
/// each failure, goes on with the rest, and reports them: teardown always finishes.
pub trait PinBackend: Send + Sync {
    /// What this backend is and needs. The pinner reads it once, when it is made; a
    /// wrapper passes its inner backend's on (changing what it must).
    fn describe(&self) -> BackendInfo;

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

    /// Undoes `map` of exactly this piece. Also called for a piece whose `map` panicked,
    /// which may have mapped all, part or none of it: answer ENOENT when nothing of it is
    /// mapped, and that is not counted as a failure there.
    fn unmap(&self, piece: &Piece) -> Result<(), BackendError>;
}

/// Does nothing: for guests without DMA-capable devices, and as a baseline.
pub struct NoneBackend;

impl PinBackend for NoneBackend {
    fn describe(&self) -> BackendInfo {
        BackendInfo {
            populates: false,
            ..BackendInfo::new(BackendKind::None)
        }
    }
    fn map(&self, _piece: &Piece) -> Result<(), BackendError> {
        Ok(())
    }
    fn unmap(&self, _piece: &Piece) -> Result<(), BackendError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peers_errno_survives_inside_its_whole_answer() {
        let piece = Piece {
            guest_addr: 0,
            host_addr: 0x1000,
            len: 0x1000,
            file: None,
        };
        let answer = PeerErrno::into_io(libc::ENOENT, "server.sock: DMA_UNMAP refused: ENOENT");
        let e = BackendError::new("DMA_UNMAP", &piece, answer);
        assert_eq!(e.errno(), Some(libc::ENOENT));
        assert!(
            e.to_string()
                .ends_with("server.sock: DMA_UNMAP refused: ENOENT"),
            "{e}"
        );
        let plain = BackendError::new("munlock", &piece, io::Error::other("no errno"));
        assert_eq!(plain.errno(), None);
    }
}
