//! VFIO-PCI passthrough: one device model ([`pci`]) over a [`VfioBackend`], which kernel VFIO
//! ([`kernel`]) and vfio-user ([`user`]) both implement. The data they describe a device with
//! is in [`types`], below all of them (and below both sides of `crate::vfio_user`).

pub mod backend;
mod irqs;
pub mod kernel;
pub mod pci;
pub mod types;
pub mod user;

pub use backend::{VfioBackend, VfioBackendError};
pub use pci::{BarMmap, IrqVector, VfioPciDevice, VfioPciError};
pub use types::{irq, region, IrqInfo, MmapArea, RegionInfo};
