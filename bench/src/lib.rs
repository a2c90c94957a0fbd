//! The `vmm-bench` library: the benchmarks of the `vmm` VMM, in a crate of their own above the
//! `vmm` library so that the VMM carries none of their code (QEMU launching included).
//!
//! [`pin`] measures how fast guest RAM is prepared (populated or locked) thread count by
//! thread count, in this process; [`startup`] boots the probe guest through the `vmm` binary,
//! configuration by configuration, with QEMU side by side; [`api_latency`] times the machine
//! API of `vmm serve`, idle and while a VM pins its RAM. [`cli`] is the command line of the
//! `vmm-bench` binary, which `vmm pin-bench` and `vmm bench` run in their place.

pub mod api_latency;
pub mod cli;
pub mod pin;
pub mod startup;
