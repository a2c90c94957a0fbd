//! VFIO-PCI passthrough: one device model ([`pci`]) over a [`VfioBackend`], which kernel VFIO
//! and vfio-user both implement.

pub mod backend;
mod irqs;
pub mod kernel;
pub mod pci;
pub mod user;

pub use backend::{IrqInfo, MmapArea, RegionInfo, VfioBackend, VfioBackendError};
pub use pci::{BarMmap, IrqVector, VfioPciDevice, VfioPciError};
