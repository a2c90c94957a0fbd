//! The plan of a job: how many threads (and which limit decided it), how large a chunk, and
//! the chunks themselves, cut so none splits a backing page or crosses a memory file's end;
//! and the shapes of a job's zones and their plans (`zones` splits the threads across them).
//! The bottom of the engine: it imports nothing from the rest of it, so the job statistics
//! can name `DecidedBy` without importing the engine that fills them in.

use std::ops::Range;

use serde::Serialize;

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

/// A part of a job and the CPUs its helpers may run on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JobZone {
    /// Names the zone in the stats.
    pub id: String,
    /// What it covers, in the job's space (that of `JobSpec::start`). The zones' ranges
    /// together cover the job exactly once; their borders become chunk cuts.
    pub ranges: Vec<Range<u64>>,
    /// Where its helpers run, already within the process's affinity. Empty: anywhere the
    /// process may run (no restriction, or a node with no CPUs of its own).
    pub cpus: Vec<usize>,
}

/// How one zone's part of a job will run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZonePlan {
    pub id: String,
    /// Sorted, each once; empty: anywhere the process may run.
    pub cpus: Vec<usize>,
    /// Helpers that fill this zone (taking turns with other zones when `Plan::threads` is
    /// smaller than the count of zones with work).
    pub threads: usize,
    /// What decided `threads`: the job's own cap, the zone's CPU count (`ZoneCpus`) or its
    /// chunk count (`MinChunk`).
    pub decided_by: DecidedBy,
    pub bytes: u64,
    /// The zone's queue: indices into the plan's chunks, in address order.
    pub(crate) chunks: Vec<usize>,
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
    /// Too little work: `ceil(size / min_chunk)` chunks (for a zone: its chunks).
    MinChunk,
    /// A zone's CPU count (its helpers run only there).
    ZoneCpus,
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
            DecidedBy::ZoneCpus => "zone_cpus",
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
    pub(crate) ranges: Vec<Range<u64>>,
    /// The job's zones and how each runs ([`JobSpec::plan_zoned`]); empty without zones.
    pub zones: Vec<ZonePlan>,
    /// The zone each helper serves, taken in order; empty: one shared queue, as without
    /// zones.
    pub(crate) seats: Vec<usize>,
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
    #[error("the pinning job's zones do not cover {start:#x}+{size:#x} exactly once (a gap or an overlap at {at:#x}): give every byte of the job to one zone")]
    Zones { at: u64, start: u64, size: u64 },
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
        let ranges = self.chunk_ranges(chunk_size, &self.cuts);
        Plan {
            threads,
            decided_by,
            chunk_size,
            chunks: ranges.len() as u64,
            ranges,
            zones: Vec::new(),
            seats: Vec::new(),
        }
    }

    /// Cuts every segment (the job split at `cuts`, sorted) every `chunk_size` from the segment's
    /// own start, so a cut never shifts the chunks of the segments after it off their page
    /// boundaries. Cuts out of order or outside the job are skipped here; `validate` refuses
    /// them before any work.
    pub(super) fn chunk_ranges(&self, chunk_size: u64, cuts: &[u64]) -> Vec<Range<u64>> {
        let end = self.start.saturating_add(self.size);
        let mut ranges = Vec::new();
        let mut segment = self.start;
        for segment_end in cuts.iter().copied().chain([end]) {
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
