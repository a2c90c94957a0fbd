//! The `vmm` library: everything `vmm run` and `vmm device` do. The binary in `main.rs` parses
//! the command line ([`cli`]), calls in here, and turns the outcome into an exit status. The
//! benchmarks (`vmm pin-bench`, `vmm bench`) are the `vmm-bench` crate, above this library; the
//! `vmm` binary runs its binary for them.
//!
//! `vmm run` is [`builder`]: stages that each take what they need and return what they built
//! ([`vstate`] for KVM and the vCPUs, [`memory`] for guest RAM and its layout, [`platform`] and
//! [`pci`] for what the guest sees, [`passthrough`] for the devices, [`pin`] for how RAM is
//! prepared, [`loader`] and [`arch`] for booting, [`run`] for the loop that runs the vCPUs), and
//! [`seccomp`] for the system-call filters every thread runs under once the guest does.

pub mod allocator;
pub mod arch;
pub mod builder;
pub mod cli;
pub mod control;
pub mod loader;
pub mod memory;
pub mod passthrough;
pub mod pci;
pub mod pin;
pub mod placement;
pub mod platform;
pub mod run;
pub mod seccomp;
pub mod size;
pub mod timeline;
pub mod vstate;
