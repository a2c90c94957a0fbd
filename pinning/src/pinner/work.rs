//! The work the engine runs on each chunk of guest RAM: fault it in, in cancellable steps,
//! and hand it to the backend (or, for type1's first phase, only fault it in).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Mutex;

use crate::backend::{populate_range, BackendError, PinBackend};
use crate::cancel::CancelToken;
use crate::engine::{lock, ChunkWork, Undone};
use crate::region::{GuestRam, Piece};

/// Why a chunk stopped.
#[derive(Debug, thiserror::Error)]
pub(super) enum WorkError {
    #[error(transparent)]
    Backend(BackendError),
    /// Cancelled between two populate steps of a chunk.
    #[error("cancelled")]
    Cancelled,
}

/// Faulting in is cut into steps this large, with a cancellation check between them, so
/// Ctrl-C takes effect within a fraction of a second even with gigabyte chunks.
pub(super) const POPULATE_STEP: u64 = 64 * crate::MIB;

/// Where work reports the bytes it has just finished: the progress bar's counter.
pub(super) type Report<'a> = &'a (dyn Fn(u64) + Sync);

fn populate_in_steps(
    piece: &Piece,
    cancel: &CancelToken,
    progress: Report,
) -> Result<(), WorkError> {
    let mut done = 0;
    while done < piece.len {
        if cancel.is_cancelled() {
            return Err(WorkError::Cancelled);
        }
        let len = POPULATE_STEP.min(piece.len - done);
        let step = Piece {
            host_addr: piece.host_addr + done,
            guest_addr: piece.guest_addr + done,
            len,
            file: piece.file.as_ref().map(|(f, off)| (f.clone(), off + done)),
        };
        populate_range(&step).map_err(WorkError::Backend)?;
        progress(len);
        done += len;
    }
    Ok(())
}

/// One chunk: fault its pieces in (unless already done, or the backend doesn't), then hand
/// them to the backend. Progress counts populate steps, or mapped pieces when there is no
/// populating here, so each byte is counted once.
pub(super) struct MapWork<'a> {
    pub(super) backend: &'a dyn PinBackend,
    pub(super) ram: &'a GuestRam,
    pub(super) cancel: &'a CancelToken,
    pub(super) populate: bool,
    pub(super) progress: Report<'a>,
    /// Unmaps that failed while a failing chunk took its earlier pieces back: the engine
    /// never undoes that chunk, so they are counted here.
    pub(super) rollbacks: &'a Mutex<Undone>,
    /// How far each chunk whose `run` panicked had got, by the chunk's start, for
    /// `undo_panicked`.
    pub(super) panicked: Mutex<HashMap<u64, Reached>>,
}

/// How far a chunk's `run` got.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Reached {
    /// Pieces whose `map` returned `Ok`, from the chunk's first.
    mapped: usize,
    /// Whether the next piece's `map` was under way: it may have mapped any part of it.
    in_map: bool,
}

/// Keeps a chunk's [`Reached`] where `undo_panicked` finds it if `run` unwinds: it is only
/// written to the shared map on a panic, so the common path takes no lock per piece.
struct Tracker<'w, 'a> {
    work: &'w MapWork<'a>,
    chunk_start: u64,
    reached: Reached,
}

impl Tracker<'_, '_> {
    /// `mapped` pieces are mapped; `in_map`: the next one's `map` is under way.
    fn set(&mut self, mapped: usize, in_map: bool) {
        self.reached = Reached { mapped, in_map };
    }
}

impl Drop for Tracker<'_, '_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            lock(&self.work.panicked).insert(self.chunk_start, self.reached);
        }
    }
}

impl MapWork<'_> {
    /// Unmaps `pieces`, every one even after one fails; the first failure is returned, the
    /// others logged.
    fn unmap_each<'p>(&self, pieces: impl Iterator<Item = &'p Piece>) -> Result<(), WorkError> {
        let mut first = Ok(());
        for piece in pieces {
            if let Err(e) = self.backend.unmap(piece) {
                if first.is_ok() {
                    first = Err(WorkError::Backend(e));
                } else {
                    tracing::warn!("{e}");
                }
            }
        }
        first
    }
}

impl ChunkWork for MapWork<'_> {
    type Error = WorkError;

    fn run(&self, chunk: Range<u64>) -> Result<(), WorkError> {
        let mut tracker = Tracker {
            work: self,
            chunk_start: chunk.start,
            reached: Reached::default(),
        };
        let pieces: Vec<_> = self.ram.pieces(chunk).collect();
        for (i, piece) in pieces.iter().enumerate() {
            let result = if self.populate {
                populate_in_steps(piece, self.cancel, self.progress)
            } else {
                Ok(())
            };
            let result = result.and_then(|()| {
                tracker.set(i, true);
                let mapped = self.backend.map(piece).map_err(WorkError::Backend);
                tracker.set(i + usize::from(mapped.is_ok()), false);
                mapped
            });
            if let Err(e) = result {
                // Leave nothing of this chunk behind: the engine only undoes whole chunks.
                for (j, done) in pieces[..i].iter().enumerate().rev() {
                    // Tried, so not tried again if a later unmap here panics.
                    tracker.set(j, false);
                    if let Err(failed) = self.backend.unmap(done) {
                        lock(self.rollbacks).fail(done.len, failed);
                    }
                }
                return Err(e);
            }
            if !self.populate {
                (self.progress)(piece.len);
            }
        }
        Ok(())
    }

    /// Unmaps every piece, even after one fails; the first failure is the chunk's.
    fn undo(&self, chunk: Range<u64>) -> Result<(), WorkError> {
        let pieces: Vec<_> = self.ram.pieces(chunk).collect();
        self.unmap_each(pieces.iter().rev())
    }

    /// Unmaps the pieces `run` mapped before it panicked, then the piece whose `map` the
    /// panic struck, if one did: that map may have done all, part or none of its work, so
    /// an unmap that finds nothing there (ENOENT, from iommufd and a vfio-user server) is not
    /// a failure. Pieces after it were never mapped and are left alone (a vfio-user server
    /// answers an unmap of those with an error).
    fn undo_panicked(&self, chunk: Range<u64>) -> Result<(), WorkError> {
        let Some(reached) = lock(&self.panicked).remove(&chunk.start) else {
            return Ok(());
        };
        let pieces: Vec<_> = self.ram.pieces(chunk).collect();
        let mapped = reached.mapped.min(pieces.len());
        let known = self.unmap_each(pieces[..mapped].iter().rev());
        let struck = match pieces.get(mapped).filter(|_| reached.in_map) {
            Some(piece) => match self.backend.unmap(piece) {
                Err(e) if e.errno() == Some(libc::ENOENT) => Ok(()),
                other => other.map_err(WorkError::Backend),
            },
            None => Ok(()),
        };
        match (known, struck) {
            (Err(e), Err(also)) => {
                tracing::warn!("{also}");
                Err(e)
            }
            (known, struck) => known.and(struck),
        }
    }
}

/// type1's first phase: fault all of RAM in, in parallel, before the serial map phase.
pub(super) struct PopulateWork<'a> {
    pub(super) ram: &'a GuestRam,
    pub(super) cancel: &'a CancelToken,
    pub(super) progress: Report<'a>,
}

impl ChunkWork for PopulateWork<'_> {
    type Error = WorkError;
    fn run(&self, chunk: Range<u64>) -> Result<(), WorkError> {
        self.ram
            .pieces(chunk)
            .try_for_each(|p| populate_in_steps(&p, self.cancel, self.progress))
    }
    /// Faulted-in memory is not a resource to give back; it goes with the mapping.
    fn undo(&self, _chunk: Range<u64>) -> Result<(), WorkError> {
        Ok(())
    }
    fn undo_panicked(&self, _chunk: Range<u64>) -> Result<(), WorkError> {
        Ok(())
    }
}
