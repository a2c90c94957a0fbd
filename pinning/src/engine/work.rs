//! The contract between the engine and the work it runs on every chunk, and how a panic in
//! that work is kept from taking the job (or the process) down with it.

use std::any::Any;
use std::fmt;
use std::ops::Range;
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Work done on one chunk.
///
/// `run` either completes the whole chunk or, on error, leaves nothing of it behind: the
/// engine undoes chunks whose `run` returned `Ok` with `undo`. A `run` that panicked may have
/// done any part of its chunk, so the engine undoes that chunk with `undo_panicked`, which
/// takes back what `run` got to and nothing else (the work keeps track: an unmap of memory
/// never mapped is an error for some backends). Both do all they can and say whether it all
/// worked: an error means part of the chunk may remain done (mapped, locked), and the engine
/// counts it rather than stopping, so teardown always makes progress.
pub(crate) trait ChunkWork: Sync {
    type Error: Send + fmt::Display;
    fn run(&self, chunk: Range<u64>) -> Result<(), Self::Error>;
    fn undo(&self, chunk: Range<u64>) -> Result<(), Self::Error>;
    fn undo_panicked(&self, chunk: Range<u64>) -> Result<(), Self::Error>;
}

/// The text of a panic's payload (what `panic!` was given), for the error that reports it.
pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with no message".to_string()
    }
}

/// Locks a mutex even if a thread panicked while holding it: the engine's state stays
/// meaningful (each update is one push or one assignment), and teardown must go on.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
