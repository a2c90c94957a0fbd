//! A model of Linux's pci-epf-test endpoint function, the device the host driver
//! `pci_endpoint_test` (drivers/misc/pci_endpoint_test.c) tests PCI with: a register block in
//! BAR0, commands that DMA to and from host (here: guest) memory, and an interrupt when a
//! command is done.
//!
//! The IDs, register offsets and bit values, the checksum and the WRITE pattern are the guest
//! ABI ([`guest_abi::epf`]), shared with the probe guest that drives this model.
//!
//! Commands run as on the real endpoint, whose command handler polls COMMAND from a work item:
//! the guest's write to COMMAND returns promptly, and the device sets STATUS and raises its
//! interrupt when the command is done. A transfer (READ, WRITE, COPY) of up to
//! [`INLINE_BYTES`] completes before that write returns; a larger one (SIZE goes up to
//! 4 GiB) continues in steps on the device's DMA thread, so no single register access, and
//! no vfio-user REGION_WRITE, waits for it.
//!
//! A COMMAND written while a transfer runs is what the real device does with it too: it stays
//! in the COMMAND register (the guest reads it back) and starts when the running one is done,
//! reading its parameters then; a second such write replaces the first. A reset (a new model)
//! stops a running transfer between two steps, with no STATUS and no interrupt.
//!
//! Differences from the real endpoint, on purpose:
//! - WRITE fills the buffer with a deterministic pattern seeded from the destination address
//!   ([`fill_pattern`], [`guest_abi::epf::pattern`]) instead of random bytes, so runs are
//!   reproducible;
//! - every DMA goes through a [`DmaSpace`](crate::pci::DmaSpace), so an address the IOMMU (or the vfio-user DMA
//!   map) does not cover fails the command with SRC/DST_ADDR_INVALID: a missing mapping is a
//!   failed test, not a silent success. DMA also fails while bus mastering is off;
//! - FLAGS.USE_DMA is accepted and ignored (every transfer is DMA here); the doorbell
//!   commands answer with their FAIL status.
//!
//! Interrupts go to an [`IrqSink`] as (type, zero-based vector); the sink owns delivery and
//! masking (irqfds in the VMM, or eventfds of a vfio-user server).

mod data;
mod function;
mod transfer;

pub use data::{checksum, crc32_le, fill_pattern};
pub use function::{
    EpfConfig, EpfError, EpfTest, MAX_MSIX_VECTORS, MSIX_PBA_OFFSET, MSIX_TABLE_OFFSET,
    REG_BAR_SIZE,
};
pub use transfer::{EpfIrq, IrqSink, INLINE_BYTES};

#[cfg(test)]
mod tests;
