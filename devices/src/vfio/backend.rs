//! What the VFIO-PCI passthrough model needs from the thing behind the device: regions (config
//! space, BARs), interrupts and reset. Kernel VFIO (a device fd from vfio-ioctls) and a
//! vfio-user server (a socket) both provide it, so one model ([`super::pci`]) serves both.
//!
//! DMA mapping is not here: the pinning engine maps guest RAM through its own backends
//! (`pinning::backend`), before the guest runs.

use std::error::Error;
use std::fmt;

use pinning::class::{Classify, ErrorClass};
use vmm_sys_util::eventfd::EventFd;

use super::types::{IrqInfo, RegionInfo};

/// A backend request that failed: the implementer's own error (which names the device and says
/// the fix), kept whole behind its [`ErrorClass`], so this trait names no implementer. It reads
/// and chains exactly as the error it carries.
#[derive(Debug)]
pub struct VfioBackendError {
    class: ErrorClass,
    source: Box<dyn Error + Send + Sync>,
}

impl VfioBackendError {
    /// Carries `e`, whose class is kept.
    pub fn new<E: Classify + Error + Send + Sync + 'static>(e: E) -> Self {
        Self {
            class: e.class(),
            source: Box::new(e),
        }
    }

    /// The implementer's error, if it is an `E`.
    pub fn downcast_ref<E: Error + 'static>(&self) -> Option<&E> {
        self.source.downcast_ref()
    }
}

impl fmt::Display for VfioBackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.source, f)
    }
}

// Transparent: the carried error's own source comes next in a chain, so nothing is said twice.
impl Error for VfioBackendError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.source.source()
    }
}

impl Classify for VfioBackendError {
    fn class(&self) -> ErrorClass {
        self.class
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
