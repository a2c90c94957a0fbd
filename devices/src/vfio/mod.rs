//! VFIO-PCI passthrough: one device model ([`pci`]) over a [`VfioBackend`], which kernel VFIO
//! and vfio-user both implement.

pub mod backend;
mod irqs;
pub mod kernel;
pub mod pci;
pub mod types;
pub mod user;

pub use backend::{VfioBackend, VfioBackendError};
pub use pci::{BarMmap, IrqVector, VfioPciDevice, VfioPciError};
pub use types::{irq, region, IrqInfo, MmapArea, RegionInfo};
