//! What the VFIO-PCI passthrough model needs from the thing behind the device: regions (config
//! space, BARs), interrupts and reset. Kernel VFIO (a device fd from vfio-ioctls) and a
//! vfio-user server (a socket) both provide it, so one model ([`super::pci`]) serves both.
//!
//! DMA mapping is not here: the pinning engine maps guest RAM through its own backends
//! (`pinning::backend`), before the guest runs.

use std::os::fd::RawFd;

use pinning::class::{Classify, ErrorClass};
use vmm_sys_util::eventfd::EventFd;

use super::kernel::KernelVfioError;
use crate::vfio_user::ClientError;

/// Region indices of a VFIO PCI device (`VFIO_PCI_*_REGION_INDEX`).
pub mod region {
    /// BAR0..BAR5 are regions 0..=5.
    pub const BAR0: u32 = 0;
    /// Expansion ROM.
    pub const ROM: u32 = 6;
    /// Configuration space.
    pub const CONFIG: u32 = 7;
    /// Region flag: readable.
    pub const FLAG_READ: u32 = 1 << 0;
    /// Region flag: writable.
    pub const FLAG_WRITE: u32 = 1 << 1;
    /// Region flag: can be mmap'ed (some or all of it, see [`super::RegionInfo::mmap_areas`]).
    pub const FLAG_MMAP: u32 = 1 << 2;
}

/// Interrupt indices of a VFIO PCI device (`VFIO_PCI_*_IRQ_INDEX`).
pub mod irq {
    /// Legacy INTx.
    pub const INTX: u32 = 0;
    /// MSI.
    pub const MSI: u32 = 1;
    /// MSI-X.
    pub const MSIX: u32 = 2;
}

/// A part of a region that can be mapped into the guest directly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmapArea {
    /// Offset inside the region.
    pub offset: u64,
    /// Length.
    pub size: u64,
}

/// One region as the device describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionInfo {
    /// Region index.
    pub index: u32,
    /// `region::FLAG_*`.
    pub flags: u32,
    /// Size in bytes (0: the region does not exist).
    pub size: u64,
    /// Parts that can be mmap'ed; empty unless `FLAG_MMAP`. A region without a sparse-mmap
    /// capability but with `FLAG_MMAP` has one area covering all of it.
    pub mmap_areas: Vec<MmapArea>,
    /// Where to mmap it: a file descriptor (valid while the backend lives) and the file offset
    /// of the region's start.
    pub mmap_fd: Option<(RawFd, u64)>,
}

impl RegionInfo {
    /// A region the device serves by read and write only (nothing to mmap): readable and
    /// writable when `size` is not 0, absent when it is.
    pub fn trapped(index: u32, size: u64) -> Self {
        let flags = if size > 0 {
            region::FLAG_READ | region::FLAG_WRITE
        } else {
            0
        };
        Self {
            index,
            flags,
            size,
            mmap_areas: Vec::new(),
            mmap_fd: None,
        }
    }
}

/// One interrupt index as the device describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IrqInfo {
    /// Interrupt index.
    pub index: u32,
    /// `VFIO_IRQ_INFO_*` flags.
    pub flags: u32,
    /// Vectors offered (0: not supported).
    pub count: u32,
}

/// Why a backend request failed: the backend's own error, unchanged.
#[derive(Debug, thiserror::Error)]
pub enum VfioBackendError {
    #[error(transparent)]
    Kernel(#[from] KernelVfioError),
    #[error(transparent)]
    User(#[from] ClientError),
}

impl Classify for VfioBackendError {
    fn class(&self) -> ErrorClass {
        match self {
            VfioBackendError::Kernel(e) => e.class(),
            VfioBackendError::User(e) => e.class(),
        }
    }
}

/// The device side of a passthrough function.
pub trait VfioBackend: Send + Sync {
    /// How errors and logs name the device (sysfs path or socket path).
    fn name(&self) -> &str;
    /// Number of regions and interrupt indices the device has.
    fn counts(&self) -> Result<(u32, u32), VfioBackendError>;
    /// Region `index`.
    fn region_info(&self, index: u32) -> Result<RegionInfo, VfioBackendError>;
    /// Reads `data.len()` bytes at `offset` of region `index`.
    fn region_read(&self, index: u32, offset: u64, data: &mut [u8])
        -> Result<(), VfioBackendError>;
    /// Writes `data` at `offset` of region `index`.
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), VfioBackendError>;
    /// Interrupt index `index`.
    fn irq_info(&self, index: u32) -> Result<IrqInfo, VfioBackendError>;
    /// Makes vectors `0..fds.len()` of `index` signal these eventfds (a new call replaces the
    /// old set).
    fn enable_irq(&self, index: u32, fds: &[&EventFd]) -> Result<(), VfioBackendError>;
    /// Level-triggered INTx: `trigger` is signalled on assertion, and the device waits for a
    /// write to `unmask` (a KVM resample fd) before it can fire again.
    fn enable_intx(&self, trigger: &EventFd, unmask: &EventFd) -> Result<(), VfioBackendError>;
    /// Stops all vectors of `index`.
    fn disable_irq(&self, index: u32) -> Result<(), VfioBackendError>;
    /// Function-level reset.
    fn reset(&self) -> Result<(), VfioBackendError>;
}
