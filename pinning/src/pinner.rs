//! Puts the pieces together: admission, the whole-RAM step, the parallel job(s), and the
//! guard that undoes it all when dropped.
//!
//! The parts: `options` (what the caller asks), `error` (why a pin failed), `work` (what
//! runs on each chunk) and `pinned` (the guard, which undoes with that same work). This file
//! is the pin itself, from admission to the guard or the error.

mod error;
mod options;
mod pinned;
mod work;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use error::PinError;
pub use options::{PinOptions, PinZone, ThreadRequest};
use pinned::end;
pub use pinned::{PinStats, Pinned, UnpinStats};
use work::{MapWork, PopulateWork, WorkError};

use crate::admission;
use crate::backend::{BackendInfo, PinBackend};
use crate::cancel::{CancelReason, CancelToken};
use crate::engine::stats::gibps;
use crate::engine::{self, JobError, JobSpec, JobZone, Undone};
use crate::limits::Limits;
use crate::procfs::ProcStatus;
use crate::progress::{Progress, ProgressSink};
use crate::region::GuestRam;
use crate::GIB;

/// Pins guest RAM through one backend, within the process's limits.
pub struct Pinner {
    backend: Arc<dyn PinBackend>,
    /// The backend's description, read once.
    info: BackendInfo,
    limits: Limits,
    options: PinOptions,
    sink: Option<Arc<ProgressSink>>,
}

impl Pinner {
    pub fn new(backend: Arc<dyn PinBackend>, limits: Limits, options: PinOptions) -> Self {
        Self {
            info: backend.describe(),
            backend,
            limits,
            options,
            sink: None,
        }
    }

    /// Counts each job's progress into `sink` too, for a reader in another thread.
    pub fn with_progress_sink(mut self, sink: Arc<ProgressSink>) -> Self {
        self.sink = Some(sink);
        self
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
        let max_threads = if self.info.populate_first {
            usize::MAX
        } else {
            self.info.map_threads.unwrap_or(usize::MAX)
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
        let budget = self.info.max_mappings.unwrap_or(u64::MAX);
        // Each chunk is one mapping, and each region or zone boundary can split one chunk in
        // two; keep half the budget for other users of the container.
        let per = (budget / 2)
            .saturating_sub(ram.regions().len() as u64 + self.options.zones.len() as u64)
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

    /// The zones of the options as parts of the job (offsets into `ram`), warning about each
    /// one on a host node whose helpers can run anywhere: a node with no CPUs of its own
    /// (memory only, as CXL memory is) or none within the process's affinity.
    fn job_zones(&self, ram: &GuestRam) -> Result<Vec<JobZone>, PinError> {
        let mut zones = Vec::with_capacity(self.options.zones.len());
        for zone in &self.options.zones {
            let mut ranges = Vec::new();
            for guest in &zone.ranges {
                let linear = ram.linear_ranges(guest.clone());
                let held: u64 = linear.iter().map(|r| r.end - r.start).sum();
                if held != guest.end.saturating_sub(guest.start) {
                    return Err(PinError::ZoneOutsideRam {
                        id: zone.id.clone(),
                        start: guest.start,
                        end: guest.end,
                    });
                }
                ranges.extend(linear);
            }
            if let (Some(node), true) = (zone.host_numa_node, zone.cpus.is_empty()) {
                tracing::warn!(
                    "memory zone `{}` is on host node {node}, which has no CPU this process may run on; its pinning helpers run on any CPU the process may use",
                    zone.id
                );
            }
            zones.push(JobZone {
                id: zone.id.clone(),
                ranges,
                cpus: zone.cpus.clone(),
            });
        }
        Ok(zones)
    }

    /// Pins all of `ram`. On any error or cancellation nothing stays mapped or locked.
    pub fn pin(&self, ram: Arc<GuestRam>, cancel: &CancelToken) -> Result<Pinned, PinError> {
        let backend = self.backend.as_ref();
        let info = self.info;
        let size = ram.size();
        admission::check(
            &self.limits,
            if info.locks_memory { size } else { 0 },
            if info.populates { size } else { 0 },
        )?;
        let started = Instant::now();
        let caps = self.limits.thread_caps(self.requested());
        // Both jobs are planned before anything begins, so bad zones leave nothing to undo.
        let zones = self.job_zones(&ram)?;
        let plan = |spec: JobSpec| match spec.plan_zoned(&caps, &zones) {
            Ok(plan) => Ok((spec, plan)),
            Err(e) => Err(PinError::Engine(e.to_string())),
        };
        let populate_job = match info.populate_first {
            true => Some(plan(self.parallel_spec(&ram))?),
            false => None,
        };
        let (spec, plan) = plan(if info.populate_first {
            self.serial_map_spec(&ram)
        } else {
            self.parallel_spec(&ram)
        })?;
        backend.begin(&ram).map_err(|source| PinError::Begin {
            backend: info.kind,
            source,
        })?;
        let mut populate_stats = None;
        if let Some((spec, plan)) = populate_job {
            let progress = Progress::start_with_sink(
                "populating guest RAM",
                size,
                self.options.progress,
                self.sink.clone(),
            );
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
        let progress = Progress::start_with_sink(
            "pinning guest RAM",
            size,
            self.options.progress,
            self.sink.clone(),
        );
        let populate = info.populates && !info.populate_first;
        let rollbacks = Mutex::new(Undone::default());
        let work = MapWork {
            backend,
            ram: &ram,
            cancel,
            populate,
            progress: &|bytes| progress.add(bytes),
            rollbacks: &rollbacks,
            panicked: Mutex::default(),
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
        let undo_threads = headline.threads.min(info.map_threads.unwrap_or(usize::MAX));
        let stats = PinStats {
            backend: info.kind,
            threads: headline.threads,
            decided_by: headline.decided_by,
            chunks: done.stats.chunks,
            bytes: size,
            elapsed_ms: ms(elapsed),
            gibps: gibps(size, elapsed),
            zones: headline.zones.clone(),
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
        let backend = self.info.kind;
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
        end(self.backend.as_ref(), backend, ram, &mut left);
        if let Some(undone) = error.undone_mut() {
            undone.add_failures(left);
            if self.info.locks_memory {
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
