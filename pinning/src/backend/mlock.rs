//! Lock guest RAM: one `mlock2(MLOCK_ONFAULT)` over each region, then parallel populate, so
//! pages are locked as they fault in. See the module table in `backend` for why not
//! `mlock` per chunk.

use super::{BackendError, BackendInfo, BackendKind, PinBackend};
use crate::region::{GuestRam, Piece, Region};
use crate::sys;

pub struct MlockBackend;

impl PinBackend for MlockBackend {
    fn describe(&self) -> BackendInfo {
        BackendInfo {
            locks_memory: true,
            ..BackendInfo::new(BackendKind::Mlock)
        }
    }

    fn begin(&self, ram: &GuestRam) -> Result<(), BackendError> {
        for (i, r) in ram.regions().iter().enumerate() {
            if let Err(e) = sys::mlock2(r.host_addr, r.size, sys::MLOCK_ONFAULT) {
                for failed in munlock_all(&ram.regions()[..i]) {
                    tracing::error!("{failed}");
                }
                return Err(BackendError::new("mlock2(MLOCK_ONFAULT)", &whole(r), e));
            }
        }
        Ok(())
    }

    fn end(&self, ram: &GuestRam) -> Vec<BackendError> {
        munlock_all(ram.regions())
    }

    /// The pinner faulted the piece in inside the MLOCK_ONFAULT range: it is locked.
    fn map(&self, _piece: &Piece) -> Result<(), BackendError> {
        Ok(())
    }

    /// Unlocking is done once for the whole range in `end`: munlock per chunk and then again
    /// for the whole would walk the pages twice.
    fn unmap(&self, _piece: &Piece) -> Result<(), BackendError> {
        Ok(())
    }
}

/// A whole region as a piece, for errors about it.
fn whole(r: &Region) -> Piece {
    Piece {
        host_addr: r.host_addr,
        guest_addr: r.guest_addr,
        len: r.size,
        file: None,
    }
}

/// munlock of every region, even past a failure; returns the failures.
fn munlock_all(regions: &[Region]) -> Vec<BackendError> {
    regions
        .iter()
        .filter_map(|r| {
            sys::munlock(r.host_addr, r.size)
                .err()
                .map(|e| BackendError::new("munlock", &whole(r), e))
        })
        .collect()
}
