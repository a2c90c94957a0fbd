//! The interface between a PCI function and the bus (and the VMM behind it).
//!
//! A write to configuration space or to a BAR can change what the VMM must do outside the
//! device: a BAR that moves needs its MMIO/PIO registration moved, and a changed MSI/MSI-X
//! vector needs its KVM GSI route and irqfd updated. Writes return those [`Effects`] instead
//! of calling back into the VMM, so a device never needs a handle on the VMM's buses.

use super::config::{Bar, BarChange};
use super::msi::RoutingChange;

/// What a guest write changed outside the device's own state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Effects {
    /// BARs whose decoded window changed (moved, or decoding switched on or off).
    pub bars: Vec<BarChange>,
    /// MSI routing change: re-read the device's MSI vectors.
    pub msi: RoutingChange,
    /// MSI-X routing change: re-read the device's MSI-X vectors.
    pub msix: RoutingChange,
}

impl Effects {
    /// Nothing for the VMM to do.
    pub fn is_empty(&self) -> bool {
        self.bars.is_empty() && !self.msi.is_changed() && !self.msix.is_changed()
    }

    /// Only BAR changes.
    pub fn bars(bars: Vec<BarChange>) -> Self {
        Effects {
            bars,
            ..Effects::default()
        }
    }
}

/// A PCI function on a [`super::bus::PciBus`]. Every input is guest-controlled: an
/// implementation must accept any register, offset, width and value without panicking.
pub trait PciDevice: Send {
    /// Configuration register `reg` (dword index; 0..64 standard, up to 1024 extended).
    fn config_read(&mut self, reg: usize) -> u32;

    /// A guest write of `data` (1, 2 or 4 bytes) at byte `offset` (0..=3) of register `reg`.
    fn config_write(&mut self, reg: usize, offset: u64, data: &[u8]) -> Effects;

    /// The registered BARs and where they are programmed now.
    fn bars(&self) -> Vec<Bar>;

    /// A guest read of `data.len()` bytes at `offset` inside BAR `bar`.
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);

    /// A guest write of `data` at `offset` inside BAR `bar`.
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) -> Effects;
}
