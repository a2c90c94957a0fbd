//! PCI bus 0, reached through configuration mechanism #1 (I/O ports 0xCF8..0xCFF), with a
//! host bridge at 00:00.0.
//!
//! [`PciConfigIo`] is the [`BusDevice`] for the ports: the guest writes an address (enable bit
//! 31, bus, device, function, register) as a dword to 0xCF8, then reads or writes 1, 2 or 4
//! bytes at 0xCFC..0xCFF. [`PciBarRegion`] is the [`BusDevice`] the VMM inserts on its MMIO
//! (or PIO) bus for each decoding BAR. Both hand what a write changed ([`Effects`]) to an
//! [`EffectsHandler`] after the device lock is released, so the handler may move BAR
//! registrations or KVM routes.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use pinning::class::{Classify, ErrorClass};

use super::config::{Bar, ConfigSpace, PciHeader};
use super::device::{Effects, PciDevice};
use crate::bus::BusDevice;

/// First I/O port of configuration mechanism #1 (CONFIG_ADDRESS).
pub const CONFIG_IO_BASE: u16 = 0xcf8;
/// Ports it spans: CONFIG_ADDRESS (0xCF8) and CONFIG_DATA (0xCFC..0xCFF).
pub const CONFIG_IO_LEN: u16 = 8;
/// Device numbers on a bus.
pub const NUM_SLOTS: u8 = 32;

/// CONFIG_ADDRESS bit 31: the next CONFIG_DATA access is a configuration cycle.
const ADDRESS_ENABLE: u32 = 1 << 31;
/// Bits of CONFIG_ADDRESS that are stored: enable, bus, device, function, register. Bits
/// 30:24 are reserved and 1:0 are always 0 for type-0 cycles.
const ADDRESS_MASK: u32 = 0x80ff_fffc;

/// Host bridge identity (Intel's virtual host bridge ID, as other VMMs use).
pub const HOST_BRIDGE_VENDOR_ID: u16 = 0x8086;
/// Host bridge device ID.
pub const HOST_BRIDGE_DEVICE_ID: u16 = 0x0d57;
/// Class code of a host bridge: bridge (0x06), host (0x00).
pub const HOST_BRIDGE_CLASS: u32 = 0x06_00_00;

/// A device shared by the bus and the VMM (which maps its BARs).
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// Called with what a guest write changed; runs on the vCPU thread that made the write, with
/// no device lock held.
pub type EffectsHandler = Arc<dyn Fn(PciAddress, Effects) + Send + Sync>;

/// Bus, device and function numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PciAddress {
    /// Bus number.
    pub bus: u8,
    /// Device (slot) number, 0..32.
    pub device: u8,
    /// Function number, 0..8.
    pub function: u8,
}

impl PciAddress {
    /// Function 0 of `device` on bus 0.
    pub fn slot(device: u8) -> Self {
        PciAddress {
            bus: 0,
            device,
            function: 0,
        }
    }

    /// The address and register index a CONFIG_ADDRESS value selects.
    fn decode(config_address: u32) -> (PciAddress, usize) {
        let addr = PciAddress {
            bus: (config_address >> 16) as u8,
            device: ((config_address >> 11) & 0x1f) as u8,
            function: ((config_address >> 8) & 0x7) as u8,
        };
        (addr, ((config_address & 0xfc) >> 2) as usize)
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.device, self.function)
    }
}

/// Why a device could not be added.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciBusError {
    #[error("PCI bus 0 is full: all {NUM_SLOTS} slots are taken; pass fewer devices")]
    Full,
}

impl Classify for PciBusError {
    fn class(&self) -> ErrorClass {
        match self {
            // One device too many on the command line.
            PciBusError::Full => ErrorClass::User,
        }
    }
}

// A device that panicked poisons its lock; keep serving the bus rather than turning one
// device bug into a panic on every vCPU.
fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The host bridge at 00:00.0: an identity and nothing else, so that OSes that look for one
/// before trusting mechanism #1 (Linux's `pci_sanity_check`) find it.
#[derive(Debug)]
pub struct HostBridge {
    config: ConfigSpace,
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl HostBridge {
    /// A host bridge with the IDs above.
    pub fn new() -> Self {
        HostBridge {
            config: ConfigSpace::new(&PciHeader {
                vendor_id: HOST_BRIDGE_VENDOR_ID,
                device_id: HOST_BRIDGE_DEVICE_ID,
                class_code: HOST_BRIDGE_CLASS,
                ..PciHeader::default()
            }),
        }
    }
}

impl PciDevice for HostBridge {
    fn config_read(&mut self, reg: usize) -> u32 {
        self.config.read_reg(reg)
    }

    fn config_write(&mut self, reg: usize, offset: u64, data: &[u8]) -> Effects {
        Effects::bars(self.config.write_reg(reg, offset, data))
    }

    fn bars(&self) -> Vec<Bar> {
        Vec::new()
    }

    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) -> Effects {
        Effects::default()
    }
}

/// Bus 0: up to 32 single-function devices.
pub struct PciBus {
    slots: RwLock<Vec<Option<SharedPciDevice>>>,
}

impl fmt::Debug for PciBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let used: Vec<String> = self.devices().iter().map(|(a, _)| a.to_string()).collect();
        f.debug_struct("PciBus").field("devices", &used).finish()
    }
}

impl Default for PciBus {
    fn default() -> Self {
        Self::new()
    }
}

impl PciBus {
    /// A bus with the host bridge at 00:00.0.
    pub fn new() -> Self {
        let mut slots: Vec<Option<SharedPciDevice>> = vec![None; usize::from(NUM_SLOTS)];
        slots[0] = Some(Arc::new(Mutex::new(HostBridge::new())));
        PciBus {
            slots: RwLock::new(slots),
        }
    }

    /// Puts `device` in the first free slot.
    pub fn add_device(&self, device: SharedPciDevice) -> Result<PciAddress, PciBusError> {
        let mut slots = self.slots.write().unwrap_or_else(PoisonError::into_inner);
        let slot = slots
            .iter()
            .position(Option::is_none)
            .ok_or(PciBusError::Full)?;
        slots[slot] = Some(device);
        Ok(PciAddress::slot(slot as u8))
    }

    /// The device at `addr`; only function 0 of bus 0 exists.
    pub fn device(&self, addr: PciAddress) -> Option<SharedPciDevice> {
        if addr.bus != 0 || addr.function != 0 {
            return None;
        }
        let slots = self.slots.read().unwrap_or_else(PoisonError::into_inner);
        slots.get(usize::from(addr.device))?.clone()
    }

    /// Every device and its address.
    pub fn devices(&self) -> Vec<(PciAddress, SharedPciDevice)> {
        let slots = self.slots.read().unwrap_or_else(PoisonError::into_inner);
        slots
            .iter()
            .enumerate()
            .filter_map(|(i, d)| Some((PciAddress::slot(i as u8), d.clone()?)))
            .collect()
    }

    /// Configuration register `reg` of `addr`; an absent function reads all ones, which is
    /// how an OS learns that nothing is there.
    pub fn config_read(&self, addr: PciAddress, reg: usize) -> u32 {
        match self.device(addr) {
            Some(dev) => lock(&dev).config_read(reg),
            None => u32::MAX,
        }
    }

    /// A configuration write to `addr`; dropped if nothing is there.
    pub fn config_write(&self, addr: PciAddress, reg: usize, offset: u64, data: &[u8]) -> Effects {
        match self.device(addr) {
            Some(dev) => lock(&dev).config_write(reg, offset, data),
            None => Effects::default(),
        }
    }
}

/// Configuration mechanism #1 on I/O ports 0xCF8..0xCFF.
pub struct PciConfigIo {
    bus: Arc<PciBus>,
    address: u32,
    on_effects: Option<EffectsHandler>,
}

impl fmt::Debug for PciConfigIo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PciConfigIo")
            .field("bus", &self.bus)
            .field("address", &format_args!("{:#010x}", self.address))
            .finish()
    }
}

impl PciConfigIo {
    /// The ports for `bus`; what config writes change is dropped until a handler is set.
    pub fn new(bus: Arc<PciBus>) -> Self {
        PciConfigIo {
            bus,
            address: 0,
            on_effects: None,
        }
    }

    /// Hands what config writes change to `handler`.
    pub fn with_effects_handler(mut self, handler: EffectsHandler) -> Self {
        self.on_effects = Some(handler);
        self
    }

    /// The target of a CONFIG_DATA access at byte `offset` (0..=3) of `len` bytes, if the
    /// address is enabled and the access stays within the dword.
    fn target(&self, offset: u64, len: usize) -> Option<(PciAddress, usize)> {
        let shaped = matches!(len, 1 | 2 | 4) && offset + len as u64 <= 4;
        (shaped && self.address & ADDRESS_ENABLE != 0).then(|| PciAddress::decode(self.address))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            // Only a dword access reaches CONFIG_ADDRESS; narrower ones at 0xCF8..0xCFB are
            // other chipset registers (0xCF9 is the reset control on Intel chipsets).
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            4..=7 => {
                let at = offset - 4;
                match self.target(at, data.len()) {
                    Some((addr, reg)) => {
                        let value = self.bus.config_read(addr, reg).to_le_bytes();
                        data.copy_from_slice(&value[at as usize..at as usize + data.len()]);
                    }
                    None => data.fill(0xff),
                }
            }
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            0 => {
                if let Ok(dword) = <[u8; 4]>::try_from(data) {
                    self.address = u32::from_le_bytes(dword) & ADDRESS_MASK;
                }
            }
            4..=7 => {
                let at = offset - 4;
                if let Some((addr, reg)) = self.target(at, data.len()) {
                    let effects = self.bus.config_write(addr, reg, at, data);
                    if let Some(handler) = self.on_effects.as_ref().filter(|_| !effects.is_empty())
                    {
                        handler(addr, effects);
                    }
                }
            }
            _ => {}
        }
    }
}

/// One BAR of one device, as a [`BusDevice`] for the VMM's MMIO or PIO bus: offsets are
/// relative to the BAR's base.
pub struct PciBarRegion {
    address: PciAddress,
    device: SharedPciDevice,
    bar: usize,
    on_effects: Option<EffectsHandler>,
}

impl fmt::Debug for PciBarRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PciBarRegion")
            .field("address", &self.address)
            .field("bar", &self.bar)
            .finish()
    }
}

impl PciBarRegion {
    /// BAR `bar` of `device` at `address`; writes' effects (MSI-X table changes) go to
    /// `on_effects`.
    pub fn new(
        address: PciAddress,
        device: SharedPciDevice,
        bar: usize,
        on_effects: Option<EffectsHandler>,
    ) -> Self {
        PciBarRegion {
            address,
            device,
            bar,
            on_effects,
        }
    }
}

impl BusDevice for PciBarRegion {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.device).bar_read(self.bar, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let effects = lock(&self.device).bar_write(self.bar, offset, data);
        if let Some(handler) = self.on_effects.as_ref().filter(|_| !effects.is_empty()) {
            handler(self.address, effects);
        }
    }
}

#[cfg(test)]
mod tests;
