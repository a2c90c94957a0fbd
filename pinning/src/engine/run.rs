//! Running a job: the chunks of its plan pulled by a crew until done, failed, panicked or
//! cancelled, and on anything but done, every completed chunk undone before the error returns.

use std::ops::Range;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use super::crew::crew;
use super::plan::{JobSpec, Plan, SpecError};
use super::stats::JobStats;
use super::undo::{undo_all, Undone};
use super::work::{lock, panic_message, ChunkWork};
use crate::cancel::{CancelReason, CancelToken};

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
    /// Every chunk whose work panicked, not only the first failure's: each may have done
    /// part of its work before the panic, and all of it is undone.
    panicked: Mutex<Vec<Range<u64>>>,
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
                Err(payload) => {
                    lock(&self.panicked).push(chunk.clone());
                    Why::Panic(panic_message(payload.as_ref()))
                }
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
        panicked: Mutex::new(Vec::new()),
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
    let mut panicked = shared
        .panicked
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner);
    panicked.sort_by_key(|c| c.start);
    let done_bytes: u64 = completed.iter().map(|c| c.end - c.start).sum();
    // The failure path undoes on this thread alone, in address order: it is rare, and a fixed
    // order keeps what happens after an error reproducible. Undoing a pin that succeeded, the
    // common and large case, is parallel (`parallel_for`).
    // A chunk whose work panicked did an unknown part of it: the work knows how far it got
    // and undoes that much (`ChunkWork::undo_panicked`), after the completed chunks.
    if let Some(ChunkFailure { chunk, why }) = failure {
        let undone = undo_all(work, &completed, &panicked);
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
        let undone = undo_all(work, &completed, &[]);
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
