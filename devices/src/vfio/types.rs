//! The plain data a VFIO backend describes its device with (regions, interrupts, the mmap-able
//! parts of a region) and the VFIO index and flag numbers: shared by the passthrough model, the
//! kernel VFIO backend and both sides of vfio-user, so it imports nothing from them.

use std::os::fd::RawFd;

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
