//! VFIO-PCI passthrough: one device model ([`pci`]) over a [`VfioBackend`], which kernel VFIO
//! ([`kernel`]) and vfio-user ([`crate::vfio_user::UserBackend`]) both implement. The data they
//! describe a device with is in [`types`], below all of them (and below both sides of
//! `crate::vfio_user`). The vfio-user implementation lives with its transport, so that
//! `vfio_user` imports from here and this module never imports `vfio_user` back.

pub mod backend;
mod irqs;
pub mod kernel;
pub mod pci;
pub mod types;

pub use backend::{VfioBackend, VfioBackendError};
pub use pci::{BarMmap, IrqVector, VfioPciDevice, VfioPciError};
pub use types::{irq, region, IrqInfo, MmapArea, RegionInfo};
