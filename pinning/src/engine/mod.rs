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
//! error, so a panicking helper can neither skip the undo nor take the process down, and
//! every chunk that panicked is undone too, as far as its work had got (`undo_panicked`).
//! Every undo call that fails (or panics) is counted in [`Undone`], which says what may
//! remain mapped or locked.
//!
//! [`parallel_for`] runs teardown on the same kind of crew (the caller plus helpers at nice
//! 19), with no cancellation: teardown always finishes, even past a panicking item.
//!
//! A job may be given zones (parts of it whose chunks must be filled from given CPUs, for
//! NUMA placement): see `zones`, which splits the threads across them, and `run`, whose
//! helpers then pin themselves to their zone's CPUs and take only its chunks.
//!
//! The parts, each importing only those above it in this list: `plan` (thread count and
//! chunks), `zones` (the split across zones), `stats` (what a finished job did), `work` (the
//! `ChunkWork` contract and panics), `undo`, `crew` (the threads) and `run` (a job from
//! start to its error or its stats).

mod crew;
pub(crate) mod plan;
mod run;
pub(crate) mod stats;
mod undo;
mod work;
mod zones;

pub use crew::parallel_for;
pub(crate) use plan::DEFAULT_MIN_CHUNK;
pub use plan::{DecidedBy, JobSpec, JobZone, Plan, ThreadCaps, ZonePlan};
pub(crate) use run::{run_job, JobError};
pub use stats::{JobStats, ZoneStats};
pub(crate) use undo::undo_chunk;
pub use undo::Undone;
pub(crate) use work::{lock, panic_message, ChunkWork};

#[cfg(test)]
mod tests;
#[cfg(test)]
mod zone_tests;
