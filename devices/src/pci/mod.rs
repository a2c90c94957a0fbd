//! PCI for passthrough and emulated functions: a type-0 configuration space with write
//! masks ([`config`]), MSI and MSI-X state ([`msi`], [`msix`]), the [`PciDevice`] trait,
//! bus 0 behind configuration mechanism #1 ([`bus`]) and ECAM ([`ecam`]), and the DMA view
//! device models use ([`dma`]).
//!
//! Nothing here talks to KVM or VFIO: guest writes return [`Effects`] (BAR moves, MSI routing
//! changes) for the VMM to apply.

pub mod bus;
pub mod config;
pub mod device;
pub mod dma;
pub mod ecam;
pub mod msi;
pub mod msix;

pub use bus::{
    EffectsHandler, HostBridge, PciAddress, PciBarRegion, PciBus, PciBusError, PciConfigIo,
    SharedPciDevice,
};
pub use config::{Bar, BarChange, BarKind, BarSpec, ConfigError, ConfigSpace, PciHeader};
pub use device::{Effects, PciDevice};
pub use dma::{DmaDirection, DmaFault, DmaMapError, DmaProt, DmaSpace, MappedRegions};
pub use ecam::{PciEcam, ECAM_BUS_SIZE};
pub use msi::{MsiCap, MsiError, MsiMessage, RoutingChange};
pub use msix::{Delivery, MsixCap, MsixError, MsixLocation};
