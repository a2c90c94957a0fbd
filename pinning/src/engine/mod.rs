//! The multithreaded job engine, after Linux's `padata_do_multithreaded`.
//!
//! A job covers `[start, start + size)`. It is cut into chunks that never split a backing
//! page (`align`) nor cross one of the job's `cuts` (where one memory file ends and the next
//! begins), and that are pulled from a shared cursor by the calling thread and its helpers,
//! so fast threads take more chunks and nobody waits on a fixed partition. The first error
//! wins: no new chunk starts, the failing chunk has already undone its own partial work (the
//! `ChunkWork` contract), and every completed chunk is undone, single-threaded and in
//! address order, before the error is returned. Cancellation works the same way, and so does
//! a panic in the work: it is caught on the thread that ran the chunk and becomes the job's
//! error, so a panicking helper can neither skip the undo nor take the process down.
//! Every undo call that fails (or panics) is counted in [`Undone`], which says what may
//! remain mapped or locked.
//!
//! [`parallel_for`] runs teardown on the same kind of crew (the caller plus helpers at nice
//! 19), with no cancellation: teardown always finishes, even past a panicking item.

use std::any::Any;
use std::fmt;
use std::ops::Range;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use serde::Serialize;

use crate::cancel::{CancelReason, CancelToken};
use crate::prio::{self, HelperBoard, Lending};
use crate::stats::JobStats;

/// Work done on one chunk.
///
/// `run` either completes the whole chunk or, on error, leaves nothing of it behind: the
/// engine only ever undoes chunks whose `run` returned `Ok`. `undo` does all it can and says
/// whether it all worked: an error means part of the chunk may remain done (mapped, locked),
/// and the engine counts it rather than stopping, so teardown always makes progress.
pub(crate) trait ChunkWork: Sync {
    type Error: Send + fmt::Display;
    fn run(&self, chunk: Range<u64>) -> Result<(), Self::Error>;
    fn undo(&self, chunk: Range<u64>) -> Result<(), Self::Error>;
}

/// What to do: a range, its backing page size, and how finely it may be cut.
#[derive(Clone, Debug)]
pub struct JobSpec {
    pub start: u64,
    pub size: u64,
    /// Backing page size; chunk cuts fall on multiples of it. A power of two.
    pub align: u64,
    /// The smallest chunk worth a thread (padata's `min_chunk`).
    pub min_chunk: u64,
    /// Upper bound from the work itself (1 for work the kernel serialises anyway).
    pub max_threads: usize,
    /// Sorted positions strictly inside the job (same space as `start`) where a chunk must
    /// end, such as where one memory file ends and the next begins: a chunk then never spans
    /// two files. Each segment between cuts is cut on its own, from its own start; empty
    /// means one segment.
    pub cuts: Vec<u64>,
}

/// Default smallest chunk: below this, starting a thread costs more than it saves.
pub(crate) const DEFAULT_MIN_CHUNK: u64 = 128 * crate::MIB;

/// Which limit decided the thread count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DecidedBy {
    /// The user's `--threads N`.
    Requested,
    /// The cgroup CPU quota (v1 or v2, this cgroup or an ancestor).
    Cgroup,
    /// The process's CPU affinity mask.
    Affinity,
    /// CPUs online on the host.
    Online,
    /// The work's own limit (a backend the kernel serialises).
    MaxThreads,
    /// Too little work: `ceil(size / min_chunk)` chunks.
    MinChunk,
}

impl DecidedBy {
    fn as_str(self) -> &'static str {
        match self {
            DecidedBy::Requested => "requested",
            DecidedBy::Cgroup => "cgroup",
            DecidedBy::Affinity => "affinity",
            DecidedBy::Online => "online",
            DecidedBy::MaxThreads => "max_threads",
            DecidedBy::MinChunk => "min_chunk",
        }
    }
}

impl std::fmt::Display for DecidedBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The thread limits that come from outside the job.
#[derive(Clone, Debug)]
pub struct ThreadCaps {
    pub requested: Option<usize>,
    pub cgroup: Option<usize>,
    pub affinity: usize,
    pub online: usize,
}

/// How a job will run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub threads: usize,
    pub decided_by: DecidedBy,
    /// The largest chunk; a segment's last chunk, or one that ends at a cut, may be smaller.
    pub chunk_size: u64,
    /// How many chunks `ranges` holds.
    pub chunks: u64,
    /// The chunks, in address order: the work loop hands out the next one.
    ranges: Vec<Range<u64>>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum SpecError {
    #[error("the pinning job's page size {0:#x} is not a power of two")]
    Align(u64),
    #[error(
        "the pinning job starts at {start:#x}, which is not aligned to its page size {align:#x}"
    )]
    Start { start: u64, align: u64 },
    #[error("the pinning job {start:#x}+{size:#x} runs past the end of the address space")]
    Overflow { start: u64, size: u64 },
    #[error("the pinning job allows no thread to run on (max_threads is 0)")]
    NoThreads,
    #[error("the pinning job's chunk cut at {cut:#x} is not after the previous cut and strictly inside the job {start:#x}+{size:#x}")]
    Cut { cut: u64, start: u64, size: u64 },
}

fn round_up(value: u64, align: u64) -> u64 {
    value.div_ceil(align).saturating_mul(align)
}

impl JobSpec {
    pub(crate) fn validate(&self) -> Result<(), SpecError> {
        if !self.align.is_power_of_two() {
            return Err(SpecError::Align(self.align));
        }
        if self.start % self.align != 0 {
            return Err(SpecError::Start {
                start: self.start,
                align: self.align,
            });
        }
        if self.start.checked_add(self.size).is_none() {
            return Err(SpecError::Overflow {
                start: self.start,
                size: self.size,
            });
        }
        if self.max_threads == 0 {
            return Err(SpecError::NoThreads);
        }
        let mut after = self.start;
        for &cut in &self.cuts {
            if cut <= after || cut >= self.start + self.size {
                return Err(SpecError::Cut {
                    cut,
                    start: self.start,
                    size: self.size,
                });
            }
            after = cut;
        }
        Ok(())
    }

    /// The thread count (the tightest cap; on a tie the most deliberate limit is named) and
    /// the chunk size: `roundup(max(size / (threads * 4), min_chunk), align)`, so each thread
    /// gets about four chunks to even out speed differences.
    pub fn plan(&self, caps: &ThreadCaps) -> Plan {
        let min_chunk = round_up(self.min_chunk.max(1), self.align);
        let by_size = usize::try_from(self.size.div_ceil(min_chunk)).unwrap_or(usize::MAX);
        let candidates = [
            (DecidedBy::Requested, caps.requested),
            (DecidedBy::Cgroup, caps.cgroup),
            (DecidedBy::Affinity, Some(caps.affinity)),
            (DecidedBy::Online, Some(caps.online)),
            (DecidedBy::MaxThreads, Some(self.max_threads)),
            (DecidedBy::MinChunk, Some(by_size)),
        ];
        let (decided_by, threads) = candidates
            .into_iter()
            .filter_map(|(who, cap)| cap.map(|c| (who, c.max(1))))
            .fold((DecidedBy::Online, usize::MAX), |best, cand| {
                if cand.1 < best.1 {
                    cand
                } else {
                    best
                }
            });
        let share = self.size / (threads as u64 * 4);
        let chunk_size = round_up(share.max(min_chunk), self.align);
        let ranges = self.chunk_ranges(chunk_size);
        Plan {
            threads,
            decided_by,
            chunk_size,
            chunks: ranges.len() as u64,
            ranges,
        }
    }

    /// Cuts every segment (the job split at `cuts`) every `chunk_size` from the segment's
    /// own start, so a cut never shifts the chunks of the segments after it off their page
    /// boundaries. Cuts out of order or outside the job are skipped here; `validate` refuses
    /// them before any work.
    fn chunk_ranges(&self, chunk_size: u64) -> Vec<Range<u64>> {
        let end = self.start.saturating_add(self.size);
        let mut ranges = Vec::new();
        let mut segment = self.start;
        for segment_end in self.cuts.iter().copied().chain([end]) {
            if segment_end <= segment || segment_end > end {
                continue;
            }
            while segment < segment_end {
                let chunk_end = segment.saturating_add(chunk_size).min(segment_end);
                ranges.push(segment..chunk_end);
                segment = chunk_end;
            }
        }
        ranges
    }
}

/// How much was undone after a failure, a cancellation or at teardown, and what could not be.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Undone {
    /// Chunks undone (or tried: the failures below are among them).
    pub chunks: u64,
    pub bytes: u64,
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

impl fmt::Display for Undone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (chunks, bytes) = (self.chunks, self.bytes);
        if self.is_clean() {
            write!(
                f,
                "undid {chunks} chunks ({bytes} bytes), so nothing is left pinned"
            )?;
        } else {
            write!(
                f,
                "undoing {chunks} chunks ({bytes} bytes) left something behind: {} undo calls failed (the first: {}), so up to {} bytes may remain mapped or locked",
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

/// Undoes one chunk, catching a panic: `Err` says why some of it may remain.
pub(crate) fn undo_chunk<W: ChunkWork>(work: &W, chunk: &Range<u64>) -> Result<(), String> {
    match panic::catch_unwind(AssertUnwindSafe(|| work.undo(chunk.clone()))) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(payload) => Err(format!(
            "the undo panicked: {}",
            panic_message(payload.as_ref())
        )),
    }
}

/// Locks a mutex even if a thread panicked while holding it: the engine's state stays
/// meaningful (each update is one push or one assignment), and teardown must go on.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum JobError<E> {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("chunk {:#x}..{:#x} of the pinning job failed; {undone}", chunk.start, chunk.end)]
    Failed {
        chunk: Range<u64>,
        #[source]
        error: E,
        undone: Undone,
    },
    #[error("a pinning thread panicked on chunk {:#x}..{:#x}: {message}; {undone}", chunk.start, chunk.end)]
    Panicked {
        chunk: Range<u64>,
        message: String,
        undone: Undone,
    },
    #[error("the pinning job was cancelled by {reason}; {undone}")]
    Cancelled {
        reason: CancelReason,
        undone: Undone,
    },
    #[error("could not start a pinning helper thread: {0}")]
    Spawn(std::io::Error),
}

/// A finished job: its statistics and the chunks it completed, in address order (teardown
/// undoes exactly these).
#[derive(Debug)]
pub(crate) struct Completed {
    pub(crate) stats: JobStats,
    pub(crate) chunks: Vec<Range<u64>>,
}

/// Why a chunk did not complete.
enum Why<E> {
    Error(E),
    /// The work panicked; the message of the panic.
    Panic(String),
}

/// The chunk that stopped the job, and why.
struct ChunkFailure<E> {
    chunk: Range<u64>,
    why: Why<E>,
}

/// Shared state of one running job.
struct Shared<'a, W: ChunkWork> {
    plan: &'a Plan,
    work: &'a W,
    cancel: &'a CancelToken,
    next_chunk: AtomicUsize,
    stop: AtomicBool,
    failure: Mutex<Option<ChunkFailure<W::Error>>>,
    completed: Mutex<Vec<Range<u64>>>,
}

impl<W: ChunkWork> Shared<'_, W> {
    /// Pulls chunks until none are left, one fails or panics, or the job is cancelled. A
    /// panic is caught here, on the thread that ran the chunk, and stops the job like an error.
    fn work_loop(&self) {
        loop {
            if self.stop.load(Ordering::Acquire) || self.cancel.is_cancelled() {
                return;
            }
            let index = self.next_chunk.fetch_add(1, Ordering::AcqRel);
            let Some(chunk) = self.plan.ranges.get(index) else {
                return;
            };
            let run = panic::catch_unwind(AssertUnwindSafe(|| self.work.run(chunk.clone())));
            let why = match run {
                Ok(Ok(())) => {
                    lock(&self.completed).push(chunk.clone());
                    continue;
                }
                Ok(Err(error)) => Why::Error(error),
                Err(payload) => Why::Panic(panic_message(payload.as_ref())),
            };
            self.stop.store(true, Ordering::Release);
            let mut first = lock(&self.failure);
            if first.is_none() {
                let chunk = chunk.clone();
                *first = Some(ChunkFailure { chunk, why });
            }
            return;
        }
    }
}

/// Runs `work` over the job with `plan.threads` threads (the caller is one of them).
///
/// Progress is the work's to report: it knows finer steps than whole chunks.
pub(crate) fn run_job<W: ChunkWork>(
    spec: &JobSpec,
    plan: &Plan,
    work: &W,
    cancel: &CancelToken,
) -> Result<Completed, JobError<W::Error>> {
    spec.validate()?;
    let started = Instant::now();
    let shared = Shared {
        plan,
        work,
        cancel,
        next_chunk: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        failure: Mutex::new(None),
        completed: Mutex::new(Vec::new()),
    };
    // A job short of a helper would report a thread count it did not have: stop it before
    // anyone starts and say so.
    let crew = crew(plan.threads, "pin-helper", &|| shared.work_loop(), || {
        shared.stop.store(true, Ordering::Release)
    });
    if let Some(e) = crew.spawn_error {
        return Err(JobError::Spawn(e));
    }
    let lending = crew.lending;
    let elapsed = started.elapsed();

    let mut completed = shared
        .completed
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner);
    completed.sort_by_key(|c| c.start);
    let failure = shared
        .failure
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner);
    let done_bytes: u64 = completed.iter().map(|c| c.end - c.start).sum();
    // The failure path undoes on this thread alone, in address order: it is rare, and a fixed
    // order keeps what happens after an error reproducible. Undoing a pin that succeeded, the
    // common and large case, is parallel (`parallel_for`).
    // A panicked chunk is treated like a failed one: whatever it did before panicking is
    // unknown, and only the backend's whole-RAM `end` can cover it.
    if let Some(ChunkFailure { chunk, why }) = failure {
        let undone = undo_all(work, &completed);
        tracing::debug!(?chunk, ?undone, "job failed and was undone");
        return Err(match why {
            Why::Error(error) => JobError::Failed {
                chunk,
                error,
                undone,
            },
            Why::Panic(message) => JobError::Panicked {
                chunk,
                message,
                undone,
            },
        });
    }
    if done_bytes < spec.size {
        // Nothing failed, so the workers stopped early because the job was cancelled.
        let reason = cancel.reason().unwrap_or(CancelReason::Requested);
        let undone = undo_all(work, &completed);
        return Err(JobError::Cancelled { reason, undone });
    }
    Ok(Completed {
        stats: JobStats {
            threads: plan.threads,
            decided_by: plan.decided_by,
            chunk_size: plan.chunk_size,
            chunks: completed.len() as u64,
            bytes: done_bytes,
            elapsed,
            lending,
        },
        chunks: completed,
    })
}

/// Undoes completed chunks one by one in address order, every one even if some fail.
fn undo_all<W: ChunkWork>(work: &W, completed: &[Range<u64>]) -> Undone {
    let mut undone = Undone::default();
    for chunk in completed {
        let len = chunk.end - chunk.start;
        if let Err(e) = undo_chunk(work, chunk) {
            undone.fail(len, e);
        }
        undone.chunks += 1;
        undone.bytes += len;
    }
    undone
}

/// Runs `f` on every item once, on up to `threads` threads: the caller and helpers at nice
/// 19 (named `{label}-N`), each pulling the next item from a shared cursor. For teardown
/// (unpinning, closing memory files, unmapping), so it cannot be cancelled, a helper that
/// cannot be started only means fewer hands, and an item whose `f` panics is logged and
/// skipped while the rest go on (an `f` that must know catches its own panics). Returns how
/// many threads took part: at most `threads`, at most one per item, 0 for no items.
pub fn parallel_for<T: Sync>(
    items: &[T],
    threads: usize,
    label: &'static str,
    f: impl Fn(&T) + Sync,
) -> usize {
    if items.is_empty() {
        return 0;
    }
    let next = AtomicUsize::new(0);
    let work = || {
        while let Some(item) = items.get(next.fetch_add(1, Ordering::Relaxed)) {
            if let Err(payload) = panic::catch_unwind(AssertUnwindSafe(|| f(item))) {
                tracing::error!(
                    "a {label} item panicked and was skipped: {}",
                    panic_message(payload.as_ref())
                );
            }
        }
    };
    let crew = crew(threads.clamp(1, items.len()), label, &work, || {});
    if let Some(e) = crew.spawn_error {
        tracing::warn!(
            "could not start every {label} thread ({e}); {} threads do the work",
            crew.threads
        );
    }
    crew.threads
}

/// The threads that ran a piece of work, and how the caller's priority was lent to them.
struct Crew {
    threads: usize,
    lending: Lending,
    /// Set when a helper could not be started; the crew ran without it and the rest.
    spawn_error: Option<std::io::Error>,
}

/// Runs `work` on the caller and on `threads - 1` helpers at nice 19, and returns once all
/// have returned. `work` pulls its own items, so it is the same closure everywhere. If a
/// helper cannot be started, `short_handed` runs before anyone starts and the crew goes on
/// without it.
fn crew(threads: usize, name: &str, work: &(dyn Fn() + Sync), short_handed: impl FnOnce()) -> Crew {
    let helpers = threads.saturating_sub(1);
    let board = HelperBoard::new(helpers);
    std::thread::scope(|scope| {
        let mut spawned = 0;
        let mut spawn_error = None;
        for index in 0..helpers {
            let board = &board;
            let started = std::thread::Builder::new()
                .name(format!("{name}-{index}"))
                .spawn_scoped(scope, move || {
                    // Counted as finished even if `work` panics, or the caller waits forever.
                    let _finished = Finished { board, index };
                    crate::thread_hook::helper_started();
                    board.register(index);
                    prio::become_background();
                    board.wait_for_start();
                    work();
                });
            match started {
                Ok(_) => spawned += 1,
                Err(e) => {
                    spawn_error = Some(e);
                    break;
                }
            }
        }
        if spawn_error.is_some() {
            for index in spawned..helpers {
                board.finish(index);
            }
            short_handed();
        }
        // Every thread is created before any starts: thread stacks are mmaps, and mmap
        // contends with page faults on the mm lock, so spawning while others fault is slow.
        board.start();
        work();
        Crew {
            threads: spawned + 1,
            lending: board.lend_until_done(),
            spawn_error,
        }
    })
}

struct Finished<'a> {
    board: &'a HelperBoard,
    index: usize,
}

impl Drop for Finished<'_> {
    fn drop(&mut self) {
        self.board.finish(self.index);
    }
}

#[cfg(test)]
mod tests;
