//! Running a job: the chunks of its plan pulled by a crew until done, failed, panicked or
//! cancelled, and on anything but done, every completed chunk undone before the error returns.
//! A job with zones runs its helpers on seats: each pins itself to its seat's zone's CPUs and
//! pulls only that zone's chunks (see `zones`).

use std::ops::Range;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use super::crew::crew;
use super::plan::{JobSpec, Plan, SpecError};
use super::stats::{gibps, JobStats, ZoneStats};
use super::undo::{undo_all, Undone};
use super::work::{lock, panic_message, ChunkWork};
use crate::cancel::{CancelReason, CancelToken};
use crate::sys;

/// How a helper pins itself to CPUs: `sys::set_affinity`, or in tests a stand-in that plans
/// for CPUs this host does not have.
pub(crate) type SetAffinity = fn(&[usize]) -> std::io::Result<()>;

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
    /// The next seat a helper of a zoned job takes.
    next_seat: AtomicUsize,
    /// Per zone of the plan.
    zones: Vec<ZoneState>,
    /// The caller's CPUs, for a helper that moves on from a pinned zone to one without CPUs.
    allowed: Vec<usize>,
    set_affinity: SetAffinity,
    started: Instant,
}

/// A zone's queue cursor and what its helpers did.
struct ZoneState {
    next: AtomicUsize,
    /// Nanoseconds since the job started: its first chunk's start and its last one's end.
    first_ns: AtomicU64,
    last_ns: AtomicU64,
    unpinned: AtomicUsize,
}

impl<W: ChunkWork> Shared<'_, W> {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire) || self.cancel.is_cancelled()
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// A helper of a zoned job: takes seats until none are left, pins itself to each seat's
    /// zone's CPUs and pulls that zone's chunks. One that cannot be pinned says so and
    /// fills the zone from where it is (the zone's memory policy, not the thread, binds the
    /// pages), counted in the zone's stats.
    fn zoned_loop(&self) {
        let mut pinned = false;
        while let Some(&zone) = self
            .plan
            .seats
            .get(self.next_seat.fetch_add(1, Ordering::AcqRel))
        {
            let cpus = &self.plan.zones[zone].cpus;
            let target = match (cpus.is_empty(), pinned) {
                (false, _) => cpus.as_slice(),
                (true, true) => self.allowed.as_slice(),
                (true, false) => &[],
            };
            if !target.is_empty() {
                match (self.set_affinity)(target) {
                    Ok(()) => pinned = !cpus.is_empty(),
                    Err(e) => {
                        tracing::warn!(
                            "could not pin a helper of memory zone `{}` to CPUs {target:?} ({e}); it fills the zone from the CPUs it has",
                            self.plan.zones[zone].id
                        );
                        self.zones[zone].unpinned.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            self.work_loop(Some(zone));
            if self.stopped() {
                return;
            }
        }
    }

    /// Pulls chunks (from `zone`'s queue, or the shared one) until none are left, one fails
    /// or panics, or the job is cancelled. A panic is caught here, on the thread that ran the
    /// chunk, and stops the job like an error.
    fn work_loop(&self, zone: Option<usize>) {
        loop {
            if self.stopped() {
                return;
            }
            let index = match zone {
                None => self.next_chunk.fetch_add(1, Ordering::AcqRel),
                Some(z) => {
                    let taken = self.zones[z].next.fetch_add(1, Ordering::AcqRel);
                    match self.plan.zones[z].chunks.get(taken) {
                        Some(&index) => index,
                        None => return,
                    }
                }
            };
            let Some(chunk) = self.plan.ranges.get(index) else {
                return;
            };
            let began = self.now_ns();
            let run = panic::catch_unwind(AssertUnwindSafe(|| self.work.run(chunk.clone())));
            let why = match run {
                Ok(Ok(())) => {
                    lock(&self.completed).push(chunk.clone());
                    if let Some(state) = zone.map(|z| &self.zones[z]) {
                        state.first_ns.fetch_min(began, Ordering::Relaxed);
                        state.last_ns.fetch_max(self.now_ns(), Ordering::Relaxed);
                    }
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

/// Runs `work` over the job with `plan.threads` threads (the caller is one of them, unless
/// the job has seats: then `plan.threads` helpers pin themselves to their zones' CPUs).
///
/// Progress is the work's to report: it knows finer steps than whole chunks.
pub(crate) fn run_job<W: ChunkWork>(
    spec: &JobSpec,
    plan: &Plan,
    work: &W,
    cancel: &CancelToken,
) -> Result<Completed, JobError<W::Error>> {
    run_job_with(spec, plan, work, cancel, sys::set_affinity)
}

/// [`run_job`], with helpers pinned through `set_affinity`.
pub(crate) fn run_job_with<W: ChunkWork>(
    spec: &JobSpec,
    plan: &Plan,
    work: &W,
    cancel: &CancelToken,
    set_affinity: SetAffinity,
) -> Result<Completed, JobError<W::Error>> {
    spec.validate()?;
    let started = Instant::now();
    let zoned = !plan.seats.is_empty();
    let shared = Shared {
        plan,
        work,
        cancel,
        next_chunk: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        failure: Mutex::new(None),
        completed: Mutex::new(Vec::new()),
        panicked: Mutex::new(Vec::new()),
        next_seat: AtomicUsize::new(0),
        zones: (0..plan.zones.len())
            .map(|_| ZoneState {
                next: AtomicUsize::new(0),
                first_ns: AtomicU64::new(u64::MAX),
                last_ns: AtomicU64::new(0),
                unpinned: AtomicUsize::new(0),
            })
            .collect(),
        // Read only when needed: a failure leaves a helper that moves on where it was.
        allowed: if zoned {
            sys::affinity_cpus().unwrap_or_default()
        } else {
            Vec::new()
        },
        set_affinity,
        started,
    };
    // A job short of a helper would report a thread count it did not have: stop it before
    // anyone starts and say so.
    let work_loop = || {
        if zoned {
            shared.zoned_loop()
        } else {
            shared.work_loop(None)
        }
    };
    let crew = crew(plan.threads, !zoned, "pin-helper", &work_loop, || {
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
    let zones = plan
        .zones
        .iter()
        .zip(&shared.zones)
        .map(|(zone, state)| {
            let elapsed = if zoned {
                let first = state.first_ns.load(Ordering::Relaxed);
                let last = state.last_ns.load(Ordering::Relaxed);
                std::time::Duration::from_nanos(last.saturating_sub(first))
            } else {
                elapsed
            };
            ZoneStats {
                id: zone.id.clone(),
                cpus: zone.cpus.clone(),
                threads: zone.threads,
                decided_by: zone.decided_by,
                chunks: zone.chunks.len() as u64,
                bytes: zone.bytes,
                elapsed,
                gibps: gibps(zone.bytes, elapsed),
                unpinned: state.unpinned.load(Ordering::Relaxed),
            }
        })
        .collect();
    Ok(Completed {
        stats: JobStats {
            threads: plan.threads,
            decided_by: plan.decided_by,
            chunk_size: plan.chunk_size,
            chunks: completed.len() as u64,
            bytes: done_bytes,
            elapsed,
            lending,
            zones,
        },
        chunks: completed,
    })
}
