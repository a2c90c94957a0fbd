//! The contract between the VMM and the probe guest, in one place: both sides build this crate
//! (the VMM, its devices and tests as a normal dependency; the freestanding probe guest in
//! `resources/probe-guest` as a path dependency), so a value changed here changes on both
//! sides at once.
//!
//! - [`ports`]: the I/O ports the guest talks to (COM1, boot marks, debug exit, i8042);
//! - [`marks`]: the bytes written to the boot-marks port;
//! - [`exit`]: the status bytes written to the debug-exit port;
//! - [`epf`]: the pci-epf-test function: IDs, register map, and the data pattern and checksum
//!   this project's model uses;
//! - [`probe`]: the probe's command-line options and the output lines the VMM and tests match.
//!
//! How the probe boots and what it checks is described in the `vmm-resources` crate, which
//! builds and embeds it. `no_std` and without dependencies, because the probe is a kernel.

#![no_std]

pub mod epf;
pub mod exit;
pub mod marks;
pub mod ports;
pub mod probe;
