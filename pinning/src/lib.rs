//! Parallel, limit-aware preparation of guest RAM: fault it in, lock it, DMA-map it.
//!
//! A passthrough device may DMA anywhere in guest RAM, so before the guest runs every byte
//! must be resident, pinned and mapped in the device's IOMMU. For a large guest that is the
//! slowest part of start-up. This crate does it in parallel, in the style of Linux's padata
//! multithreaded jobs, while staying a good citizen:
//!
//! - [`limits`] finds how many CPUs the process may really use (affinity, online CPUs, the
//!   CPU quota of its cgroup and every ancestor, read by [`cgroup`] from the files
//!   [`procfs`] reads) and how much it may lock.
//! - [`admission`] refuses a job that would certainly fail, before any work.
//! - [`engine`] splits a job into chunks, none across a region boundary, pulled from a
//!   shared cursor by helper threads at nice 19 (the caller works too and lends its priority
//!   while it waits, see [`prio`]); the first error wins and everything done is undone, as
//!   is a job cancelled by SIGINT/SIGTERM ([`cancel`]) or one whose work panicked (the panic
//!   becomes the error). Undo calls that fail are counted ([`engine::Undone`]), never only
//!   logged. [`parallel_for`] runs teardown on the same threads, uncancellable.
//! - [`backend`] holds the ways of preparing memory behind one [`backend::PinBackend`] trait:
//!   `populate`, `mlock`, `none`, kernel VFIO `type1` / `iommufd` on vfio-ioctls, and
//!   `vfio-user`; each describes itself in one [`backend::BackendInfo`] value.
//! - [`pinner`] puts the pieces together over a [`region::GuestRam`], shows a progress bar
//!   on a terminal, and reports each job's [`JobStats`].
//! - [`class`] says who must act on an error; the errors that reach `vmm` implement
//!   [`class::Classify`], and `vmm` turns the class into the exit status.
//! - [`sys`] holds the crate's system-call wrappers; [`model`] is an IOMMU model for tests.
//! - [`topology`] reads the host's NUMA nodes and which of them this process may use.
//! - [`thread_hook`] runs the embedder's code on every helper thread as it starts (the VMM
//!   installs its seccomp filter there).

pub mod admission;
pub mod backend;
pub mod cancel;
pub mod cgroup;
pub mod class;
pub mod engine;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod limits;
/// An IOMMU model with the kernel's type1 rules, for tests here and in `devices` (feature
/// `test-util`); not part of the crate's API.
#[cfg(any(test, feature = "test-util"))]
pub mod model;
pub mod pinner;
pub mod prio;
pub mod procfs;
mod progress;
pub mod region;
pub mod sys;
pub mod thread_hook;
pub mod topology;

pub use admission::AdmissionError;
pub use backend::{BackendInfo, BackendKind, PinBackend};
pub use cancel::{CancelToken, SignalGuard};
pub use class::{Classify, ErrorClass};
pub use engine::{parallel_for, DecidedBy, JobSpec, JobStats, Undone};
pub use limits::Limits;
pub use pinner::{PinError, PinOptions, Pinned, Pinner, ThreadRequest};
pub use progress::{ProgressReading, ProgressSink};
pub use region::{GuestRam, Region};
pub use thread_hook::set_helper_start_hook;

/// Bytes in a KiB, MiB, GiB: named because sizes are everywhere here.
pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;
