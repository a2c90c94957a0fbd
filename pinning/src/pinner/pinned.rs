//! Guest RAM once pinned: what the pin did, and the guard that undoes it, in parallel and
//! uncancellably, when asked or dropped.

use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::work::MapWork;
use crate::backend::{BackendKind, PinBackend};
use crate::cancel::CancelToken;
use crate::engine::stats::{as_millis, JobStats, ZoneStats};
use crate::engine::{self, lock, DecidedBy, Undone};
use crate::progress::Progress;
use crate::region::GuestRam;

/// What a pinning run did, for the report.
#[derive(Clone, Debug, Serialize)]
pub struct PinStats {
    pub backend: BackendKind,
    pub threads: usize,
    pub decided_by: DecidedBy,
    pub chunks: u64,
    pub bytes: u64,
    pub elapsed_ms: f64,
    pub gibps: f64,
    /// Per memory zone, from the job that fills RAM (type1's populate, else the map); empty
    /// without zones.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub zones: Vec<ZoneStats>,
    /// The parallel populate phase of type1, when there is one.
    pub populate: Option<JobStats>,
    pub map: JobStats,
}

/// What undoing a pin did; `undone` counts the undo calls that failed.
#[derive(Clone, Debug, Serialize)]
pub struct UnpinStats {
    pub undone: Undone,
    pub threads: usize,
    #[serde(rename = "elapsed_ms", serialize_with = "as_millis")]
    pub elapsed: Duration,
}

/// Guest RAM pinned through a backend; dropping it undoes everything.
pub struct Pinned {
    pub(super) backend: Arc<dyn PinBackend>,
    pub(super) ram: Arc<GuestRam>,
    pub(super) chunks: Vec<Range<u64>>,
    /// The undo's thread count, fixed at pin time: see `Pinner::pin`.
    pub(super) undo_threads: usize,
    pub(super) progress: bool,
    pub stats: PinStats,
}

impl Pinned {
    /// Undoes the pinning now (also done on drop) and says how it went: `undone.failed`
    /// counts the undo calls that failed, whose memory may remain mapped or locked.
    pub fn unpin(mut self) -> UnpinStats {
        self.undo()
    }

    /// Undoes every chunk, in parallel, then the backend's whole-RAM step. Not cancellable:
    /// nothing here looks at a signal, so a Ctrl-C during teardown cannot leave memory pinned;
    /// a failing or panicking undo call is counted and the rest go on.
    fn undo(&mut self) -> UnpinStats {
        let started = Instant::now();
        let chunks = std::mem::take(&mut self.chunks);
        let bytes = chunks.iter().map(|c| c.end - c.start).sum();
        let progress = Progress::start("releasing guest RAM", bytes, self.progress);
        let never = CancelToken::new();
        let rollbacks = Mutex::new(Undone::default());
        let work = MapWork {
            backend: self.backend.as_ref(),
            ram: &self.ram,
            cancel: &never,
            populate: false,
            progress: &|_| {},
            rollbacks: &rollbacks,
            panicked: Mutex::default(),
        };
        let undone = Mutex::new(Undone {
            chunks: chunks.len() as u64,
            bytes,
            ..Undone::default()
        });
        let threads = engine::parallel_for(&chunks, self.undo_threads, "unpin", |chunk| {
            let len = chunk.end - chunk.start;
            if let Err(e) = engine::undo_chunk(&work, chunk) {
                lock(&undone).fail(len, e);
            }
            progress.add(len);
        });
        drop(progress);
        let mut undone = undone.into_inner().unwrap_or_else(|e| e.into_inner());
        end(
            self.backend.as_ref(),
            self.stats.backend,
            &self.ram,
            &mut undone,
        );
        let stats = UnpinStats {
            undone,
            threads,
            elapsed: started.elapsed(),
        };
        tracing::debug!(?stats, "guest RAM unpinned");
        stats
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        if !self.chunks.is_empty() {
            // Only a failed start drops a pin unreleased; `unpin` reports, this can only log.
            let stats = self.undo();
            if !stats.undone.is_clean() {
                tracing::error!("releasing guest RAM: {}", stats.undone);
            }
        }
    }
}

/// The backend's whole-RAM undo (munlock for mlock), after every chunk's: its failures are
/// counted in `undone` with the rest.
pub(super) fn end(
    backend: &dyn PinBackend,
    kind: BackendKind,
    ram: &GuestRam,
    undone: &mut Undone,
) {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| backend.end(ram)));
    match result {
        Ok(failures) => {
            for e in failures {
                undone.fail(e.len, e);
            }
        }
        Err(payload) => undone.fail(
            ram.size(),
            format_args!(
                "the {kind} backend's end panicked: {}",
                engine::panic_message(payload.as_ref())
            ),
        ),
    }
}
