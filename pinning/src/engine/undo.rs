//! Taking work back: what was undone after a failure, a cancellation or at teardown, and
//! what could not be.

use std::fmt;
use std::ops::Range;
use std::panic::{self, AssertUnwindSafe};

use serde::Serialize;

use super::work::{panic_message, ChunkWork};

/// How much was undone after a failure, a cancellation or at teardown, and what could not be.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Undone {
    /// Chunks undone (or tried: the failures below are among them).
    pub chunks: u64,
    pub bytes: u64,
    /// Of those, chunks whose work panicked, undone as far as the work had got.
    #[serde(skip_serializing_if = "is_zero")]
    pub panicked: u64,
    /// Undo calls that failed or panicked (an unmap, a DMA_UNMAP, a munlock): whatever each
    /// covered may remain mapped or locked.
    pub failed: u64,
    /// The bytes those calls covered.
    pub failed_bytes: u64,
    /// What the first failure said (each one is logged as a warning when it happens).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_failure: Option<String>,
    /// VmLck measured right after the undo, while guest RAM was still mapped (so munlock,
    /// not the unmap, is what brought it down), for backends that lock memory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub locked_after: Option<u64>,
}

impl Undone {
    /// Whether every undo call succeeded.
    pub fn is_clean(&self) -> bool {
        self.failed == 0
    }

    /// Counts one failed undo call over `bytes`.
    pub(crate) fn fail(&mut self, bytes: u64, what: impl fmt::Display) {
        tracing::warn!("undoing a pin of guest RAM: {what}");
        self.failed += 1;
        self.failed_bytes += bytes;
        if self.first_failure.is_none() {
            self.first_failure = Some(what.to_string());
        }
    }

    /// Adds the failures counted in `other` (its chunks were counted here already).
    pub(crate) fn add_failures(&mut self, other: Undone) {
        self.failed += other.failed;
        self.failed_bytes += other.failed_bytes;
        if self.first_failure.is_none() {
            self.first_failure = other.first_failure;
        }
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl fmt::Display for Undone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (chunks, bytes) = (self.chunks, self.bytes);
        let panicked = match self.panicked {
            0 => String::new(),
            n => format!(", {n} of them as far as the panicking work had got"),
        };
        if self.is_clean() {
            write!(
                f,
                "undid {chunks} chunks ({bytes} bytes{panicked}), so nothing is left pinned"
            )?;
        } else {
            write!(
                f,
                "undoing {chunks} chunks ({bytes} bytes{panicked}) left something behind: {} undo calls failed (the first: {}), so up to {} bytes may remain mapped or locked",
                self.failed,
                self.first_failure.as_deref().unwrap_or("no reason given"),
                self.failed_bytes
            )?;
        }
        if let Some(locked) = self.locked_after {
            write!(
                f,
                "; VmLck was {} kB right after the undo, with guest RAM still mapped",
                locked / 1024
            )?;
        }
        Ok(())
    }
}

/// Runs one undo call, catching a panic: `Err` says why some of its chunk may remain.
fn caught<E: fmt::Display>(undo: impl FnOnce() -> Result<(), E>) -> Result<(), String> {
    match panic::catch_unwind(AssertUnwindSafe(undo)) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(payload) => Err(format!(
            "the undo panicked: {}",
            panic_message(payload.as_ref())
        )),
    }
}

/// Undoes one completed chunk, catching a panic: `Err` says why some of it may remain.
pub(crate) fn undo_chunk<W: ChunkWork>(work: &W, chunk: &Range<u64>) -> Result<(), String> {
    caught(|| work.undo(chunk.clone()))
}

/// Undoes completed chunks one by one in address order, every one even if some fail, then
/// the chunks whose work panicked, as far as each had got. Those come last: the piece a
/// panic struck mid-call may never have been mapped, and its unmap, refused by the peer,
/// must not stand before the undo of work known to be done.
pub(super) fn undo_all<W: ChunkWork>(
    work: &W,
    completed: &[Range<u64>],
    panicked: &[Range<u64>],
) -> Undone {
    let mut undone = Undone::default();
    let calls = completed.iter().map(|c| (c, false));
    for (chunk, struck) in calls.chain(panicked.iter().map(|c| (c, true))) {
        let len = chunk.end - chunk.start;
        let result = if struck {
            caught(|| work.undo_panicked(chunk.clone()))
        } else {
            undo_chunk(work, chunk)
        };
        if let Err(e) = result {
            undone.fail(len, e);
        }
        undone.chunks += 1;
        undone.bytes += len;
        undone.panicked += u64::from(struck);
    }
    undone
}
