//! Puts the pieces together: admission, the whole-RAM step, the parallel job(s), and the
//! guard that undoes it all when dropped.

use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::admission::{self, AdmissionError};
use crate::backend::{populate_range, BackendError, BackendKind, PinBackend};
use crate::cancel::{CancelReason, CancelToken};
use crate::class::{Classify, ErrorClass};
use crate::engine::{
    self, lock, ChunkWork, DecidedBy, JobError, JobSpec, Undone, DEFAULT_MIN_CHUNK,
};
use crate::limits::Limits;
use crate::procfs::ProcStatus;
use crate::progress::Progress;
use crate::region::{GuestRam, Piece};
use crate::stats::{as_millis, gibps, JobStats};
use crate::GIB;

/// How many threads the user wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadRequest {
    /// As many as the limits and the job allow.
    Auto,
    /// At most this many (still subject to the limits).
    AtMost(usize),
}

impl ThreadRequest {
    /// The most threads one may ask for: far above any host's CPU count, far below what
    /// would exhaust the process's threads or stacks.
    pub const MAX: usize = 4096;
}

impl std::str::FromStr for ThreadRequest {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "auto" {
            return Ok(ThreadRequest::Auto);
        }
        match s.parse::<usize>() {
            Ok(n) if (1..=Self::MAX).contains(&n) => Ok(ThreadRequest::AtMost(n)),
            _ => Err(format!(
                "`{s}` is not a thread count: use `auto` or a number from 1 to {}",
                Self::MAX
            )),
        }
    }
}

impl std::fmt::Display for ThreadRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ThreadRequest::Auto => f.write_str("auto"),
            ThreadRequest::AtMost(n) => write!(f, "{n}"),
        }
    }
}

#[derive(Clone, Debug)]
pub struct PinOptions {
    pub threads: ThreadRequest,
    pub min_chunk: u64,
    /// Show a progress bar on a terminal for jobs over a second.
    pub progress: bool,
}

impl Default for PinOptions {
    fn default() -> Self {
        Self {
            threads: ThreadRequest::Auto,
            min_chunk: DEFAULT_MIN_CHUNK,
            progress: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error(transparent)]
    Admission(#[from] AdmissionError),
    #[error("the {backend} backend could not start pinning guest RAM: {source}")]
    Begin {
        backend: BackendKind,
        #[source]
        source: BackendError,
    },
    #[error("the {backend} backend failed to pin guest RAM: {source}; {undone}")]
    Failed {
        backend: BackendKind,
        #[source]
        source: BackendError,
        undone: Box<Undone>,
    },
    #[error("pinning guest RAM with the {backend} backend stopped: a pinning thread panicked on bytes {:#x}..{:#x} of guest RAM ({message}); {undone}", chunk.start, chunk.end)]
    Panicked {
        backend: BackendKind,
        /// The chunk, as offsets into guest RAM (not guest addresses).
        chunk: Range<u64>,
        message: String,
        undone: Box<Undone>,
    },
    #[error("pinning cancelled by {reason}; {undone}")]
    Cancelled {
        reason: CancelReason,
        undone: Box<Undone>,
    },
    /// A `JobError` the pinner has no variant for (a bad spec, a helper that would not
    /// start), already a full message.
    #[error("{0}")]
    Engine(String),
}

impl Classify for PinError {
    /// A backend that fails after admission is the host refusing what should have worked; a
    /// panic is a bug; a cancellation is the signal's, unless its undo left something behind.
    fn class(&self) -> ErrorClass {
        match self {
            PinError::Admission(e) => e.class(),
            PinError::Cancelled { reason, undone } if undone.is_clean() => reason.class(),
            PinError::Cancelled { .. }
            | PinError::Begin { .. }
            | PinError::Failed { .. }
            | PinError::Panicked { .. }
            | PinError::Engine(_) => ErrorClass::Internal,
        }
    }
}

impl PinError {
    pub fn cancel_reason(&self) -> Option<CancelReason> {
        match self {
            PinError::Cancelled { reason, .. } => Some(*reason),
            _ => None,
        }
    }

    /// What was undone, for an error that stopped a job under way.
    pub fn undone(&self) -> Option<&Undone> {
        match self {
            PinError::Failed { undone, .. }
            | PinError::Panicked { undone, .. }
            | PinError::Cancelled { undone, .. } => Some(undone.as_ref()),
            _ => None,
        }
    }

    fn undone_mut(&mut self) -> Option<&mut Undone> {
        match self {
            PinError::Failed { undone, .. }
            | PinError::Panicked { undone, .. }
            | PinError::Cancelled { undone, .. } => Some(undone.as_mut()),
            _ => None,
        }
    }

    /// Whether the job's undo left something mapped or locked (which makes it the VMM's
    /// problem, whatever stopped the job).
    pub fn left_something_behind(&self) -> bool {
        self.undone().is_some_and(|u| !u.is_clean())
    }
}

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
    backend: Arc<dyn PinBackend>,
    ram: Arc<GuestRam>,
    chunks: Vec<Range<u64>>,
    /// The undo's thread count, fixed at pin time: see `Pinner::pin`.
    undo_threads: usize,
    progress: bool,
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
        end(self.backend.as_ref(), &self.ram, &mut undone);
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
fn end(backend: &dyn PinBackend, ram: &GuestRam, undone: &mut Undone) {
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
                "the {} backend's end panicked: {}",
                backend.kind(),
                engine::panic_message(payload.as_ref())
            ),
        ),
    }
}

/// Why a chunk stopped.
#[derive(Debug, thiserror::Error)]
enum WorkError {
    #[error(transparent)]
    Backend(BackendError),
    /// Cancelled between two populate steps of a chunk.
    #[error("cancelled")]
    Cancelled,
}

/// Faulting in is cut into steps this large, with a cancellation check between them, so
/// Ctrl-C takes effect within a fraction of a second even with gigabyte chunks.
const POPULATE_STEP: u64 = 64 * crate::MIB;

/// Where work reports the bytes it has just finished: the progress bar's counter.
type Report<'a> = &'a (dyn Fn(u64) + Sync);

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
struct MapWork<'a> {
    backend: &'a dyn PinBackend,
    ram: &'a GuestRam,
    cancel: &'a CancelToken,
    populate: bool,
    progress: Report<'a>,
    /// Unmaps that failed while a failing chunk took its earlier pieces back: the engine
    /// never undoes that chunk, so they are counted here.
    rollbacks: &'a Mutex<Undone>,
}

impl ChunkWork for MapWork<'_> {
    type Error = WorkError;

    fn run(&self, chunk: Range<u64>) -> Result<(), WorkError> {
        let pieces: Vec<_> = self.ram.pieces(chunk).collect();
        for (i, piece) in pieces.iter().enumerate() {
            let result = if self.populate {
                populate_in_steps(piece, self.cancel, self.progress)
            } else {
                Ok(())
            };
            if let Err(e) =
                result.and_then(|()| self.backend.map(piece).map_err(WorkError::Backend))
            {
                // Leave nothing of this chunk behind: the engine only undoes whole chunks.
                for done in pieces[..i].iter().rev() {
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
        let mut first = Ok(());
        for piece in self.ram.pieces(chunk).rev() {
            if let Err(e) = self.backend.unmap(&piece) {
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

/// type1's first phase: fault all of RAM in, in parallel, before the serial map phase.
struct PopulateWork<'a> {
    ram: &'a GuestRam,
    cancel: &'a CancelToken,
    progress: Report<'a>,
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
}

pub struct Pinner {
    backend: Arc<dyn PinBackend>,
    limits: Limits,
    options: PinOptions,
}

impl Pinner {
    pub fn new(backend: Arc<dyn PinBackend>, limits: Limits, options: PinOptions) -> Self {
        Self {
            backend,
            limits,
            options,
        }
    }

    fn requested(&self) -> Option<usize> {
        match self.options.threads {
            ThreadRequest::Auto => None,
            ThreadRequest::AtMost(n) => Some(n),
        }
    }

    /// The parallel phase's spec: populate for type1 (faulting in is not what the kernel
    /// serialises, so it takes any number of threads), map for the others (as many threads as
    /// their map allows).
    fn parallel_spec(&self, ram: &GuestRam) -> JobSpec {
        let max_threads = if self.backend.populate_first() {
            usize::MAX
        } else {
            self.backend.map_threads().unwrap_or(usize::MAX)
        };
        JobSpec {
            start: 0,
            size: ram.size(),
            align: ram.page_size(),
            min_chunk: self.options.min_chunk,
            max_threads,
            cuts: ram.region_cuts(),
        }
    }

    /// The serial map phase of type1: large chunks, few mappings, below the entry limit.
    fn serial_map_spec(&self, ram: &GuestRam) -> JobSpec {
        let budget = self.backend.max_mappings().unwrap_or(u64::MAX);
        // Each chunk is one mapping, and each region boundary can split one chunk in two;
        // keep half the budget for other users of the container.
        let per = (budget / 2)
            .saturating_sub(ram.regions().len() as u64)
            .max(1);
        JobSpec {
            start: 0,
            size: ram.size(),
            align: ram.page_size(),
            min_chunk: GIB.max(ram.size().div_ceil(per)),
            max_threads: 1,
            cuts: ram.region_cuts(),
        }
    }

    /// Pins all of `ram`. On any error or cancellation nothing stays mapped or locked.
    pub fn pin(&self, ram: Arc<GuestRam>, cancel: &CancelToken) -> Result<Pinned, PinError> {
        let backend = self.backend.as_ref();
        let size = ram.size();
        admission::check(
            &self.limits,
            if backend.locks_memory() { size } else { 0 },
            if backend.populates() { size } else { 0 },
        )?;
        let started = Instant::now();
        let caps = self.limits.thread_caps(self.requested());
        backend.begin(&ram).map_err(|source| PinError::Begin {
            backend: backend.kind(),
            source,
        })?;
        let mut populate_stats = None;
        if backend.populate_first() {
            let spec = self.parallel_spec(&ram);
            let plan = spec.plan(&caps);
            let progress = Progress::start("populating guest RAM", size, self.options.progress);
            let work = PopulateWork {
                ram: &ram,
                cancel,
                progress: &|bytes| progress.add(bytes),
            };
            match engine::run_job(&spec, &plan, &work, cancel) {
                Ok(done) => populate_stats = Some(done.stats),
                Err(e) => return Err(self.job_error(e, &ram, Undone::default(), cancel)),
            }
        }
        let spec = if backend.populate_first() {
            self.serial_map_spec(&ram)
        } else {
            self.parallel_spec(&ram)
        };
        let plan = spec.plan(&caps);
        let progress = Progress::start("pinning guest RAM", size, self.options.progress);
        let populate = backend.populates() && !backend.populate_first();
        let rollbacks = Mutex::new(Undone::default());
        let work = MapWork {
            backend,
            ram: &ram,
            cancel,
            populate,
            progress: &|bytes| progress.add(bytes),
            rollbacks: &rollbacks,
        };
        let done = match engine::run_job(&spec, &plan, &work, cancel) {
            Ok(done) => done,
            Err(e) => {
                drop(progress);
                let rollbacks = rollbacks.into_inner().unwrap_or_else(|e| e.into_inner());
                return Err(self.job_error(e, &ram, rollbacks, cancel));
            }
        };
        drop(progress);
        let elapsed = started.elapsed();
        let headline = populate_stats.as_ref().unwrap_or(&done.stats);
        // Undo is the map run backwards: as many threads as the pin used and no more than
        // the backend's map allows (type1 unmaps as serially as it maps).
        let undo_threads = headline
            .threads
            .min(backend.map_threads().unwrap_or(usize::MAX));
        let stats = PinStats {
            backend: backend.kind(),
            threads: headline.threads,
            decided_by: headline.decided_by,
            chunks: done.stats.chunks,
            bytes: size,
            elapsed_ms: ms(elapsed),
            gibps: gibps(size, elapsed),
            populate: populate_stats,
            map: done.stats,
        };
        Ok(Pinned {
            backend: self.backend.clone(),
            ram,
            chunks: done.chunks,
            undo_threads,
            progress: self.options.progress,
            stats,
        })
    }

    /// The error a failed job ends the pin with, once the backend's whole-RAM step has been
    /// undone too: every undo failure counted (the engine's, `rollbacks` and `end`'s), and
    /// VmLck read while guest RAM is still mapped, for a backend that locks it.
    fn job_error(
        &self,
        e: JobError<WorkError>,
        ram: &GuestRam,
        rollbacks: Undone,
        cancel: &CancelToken,
    ) -> PinError {
        let backend = self.backend.kind();
        let mut error = match e {
            JobError::Failed {
                error: WorkError::Backend(source),
                undone,
                ..
            } => PinError::Failed {
                backend,
                source,
                undone: Box::new(undone),
            },
            JobError::Failed {
                error: WorkError::Cancelled,
                undone,
                ..
            } => PinError::Cancelled {
                reason: cancel.reason().unwrap_or(CancelReason::Requested),
                undone: Box::new(undone),
            },
            JobError::Panicked {
                chunk,
                message,
                undone,
            } => PinError::Panicked {
                backend,
                chunk,
                message,
                undone: Box::new(undone),
            },
            JobError::Cancelled { reason, undone } => PinError::Cancelled {
                reason,
                undone: Box::new(undone),
            },
            other => PinError::Engine(other.to_string()),
        };
        let mut left = rollbacks;
        end(self.backend.as_ref(), ram, &mut left);
        if let Some(undone) = error.undone_mut() {
            undone.add_failures(left);
            if self.backend.locks_memory() {
                undone.locked_after = ProcStatus::read(std::path::Path::new("/"))
                    .ok()
                    .map(|s| s.locked);
            }
        } else if !left.is_clean() {
            tracing::error!("after the pinning job failed: {left}");
        }
        error
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests;
