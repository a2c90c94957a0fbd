//! vfio-user: a PCI function served by another process over a Unix socket
//! (QEMU `docs/interop/vfio-user.rst`, protocol version 0.1).
//!
//! Our own implementation replaces the `vfio_user` crate, whose client took error replies to
//! DMA_MAP for success and could wait forever after one. Here:
//! - [`Client`] is the VMM side: pipelined (many threads may have requests in flight; a
//!   reader thread hands each reply to its waiter by message id), every request has a
//!   timeout, an error reply is an error with its errno, and a malformed reply, a timeout or
//!   a lost connection marks the client broken so later calls fail at once instead of
//!   waiting again;
//! - [`server`] serves any [`server::UserDevice`] to one client, applying DMA_MAP/UNMAP to a
//!   [`crate::pci::MappedRegions`] the device does its DMA through;
//! - [`epf`] serves the pci-epf-test model ([`crate::epf::EpfTest`]) that way, for
//!   `vmm device epf --socket PATH`;
//! - [`wire`] is the message format, shared by both sides;
//! - [`UserBackend`] is a [`Client`] as the passthrough model's [`crate::vfio::VfioBackend`]
//!   and as the pinning engine's `FdDmaMapper`.
//!
//! Each side has its own error: [`ClientError`] (what the VMM sees, carried whole in a
//! [`crate::vfio::VfioBackendError`] by the passthrough backend), [`ServerError`] and, for the
//! process entry point, [`EpfServerError`].

pub mod backend;
pub mod client;
pub mod epf;
pub mod server;
pub mod wire;

#[cfg(test)]
mod tests;

pub use backend::UserBackend;
pub use client::{Client, ClientError, DmaMemory};
pub use epf::{run_epf_server, run_epf_server_on_fd, EpfServerError, EpfUserDevice};
pub use server::{serve, serve_with, ServerError, ServerLimits, UserDevice};
