//! A type-0 PCI configuration space: 256 standard bytes plus 4 KiB of extended storage, with
//! per-bit write masks so that whatever the guest writes, read-only fields keep their value.
//!
//! The guest drives this space directly, so every write goes through [`ConfigSpace::write_reg`],
//! which applies the masks: writable bits take the new value, write-1-to-clear (W1C) bits are
//! cleared where a 1 is written, and every other bit stays. Device code updates read-only
//! fields through the `set_*` helpers, which bypass the masks.
//!
//! BARs (the `bar` module) are ordinary registers whose writable bits are the address bits above the size: a
//! guest that writes all ones reads back the size mask (BAR sizing) without any special case.
//! A BAR decodes only while its space (I/O or memory) is enabled in the COMMAND register;
//! [`ConfigSpace::write_reg`] reports every change of a BAR's decoded window so the VMM can
//! move its MMIO/PIO registration.

use std::fmt;

use pinning::class::{Classify, ErrorClass};

/// Bytes of configuration space a device has (PCI Express extended space).
pub const CONFIG_SPACE_SIZE: usize = 4096;
/// Bytes of the conventional space reachable through I/O ports 0xCF8/0xCFC.
pub const STANDARD_CONFIG_SIZE: usize = 256;
/// 32-bit registers in the whole space.
pub const NUM_REGS: usize = CONFIG_SPACE_SIZE / 4;
/// BARs in a type-0 header.
pub const NUM_BARS: usize = 6;

/// Byte offsets of type-0 header fields.
pub mod offset {
    /// Vendor ID (16 bits).
    pub const VENDOR_ID: usize = 0x00;
    /// Device ID (16 bits).
    pub const DEVICE_ID: usize = 0x02;
    /// COMMAND register (16 bits).
    pub const COMMAND: usize = 0x04;
    /// STATUS register (16 bits).
    pub const STATUS: usize = 0x06;
    /// Revision ID (8 bits), followed by the 24-bit class code.
    pub const REVISION_ID: usize = 0x08;
    /// Cache line size (8 bits).
    pub const CACHE_LINE_SIZE: usize = 0x0c;
    /// Latency timer (8 bits).
    pub const LATENCY_TIMER: usize = 0x0d;
    /// Header type (8 bits); bit 7 = multi-function.
    pub const HEADER_TYPE: usize = 0x0e;
    /// First BAR; BAR n is at `BAR0 + 4 * n`.
    pub const BAR0: usize = 0x10;
    /// Subsystem vendor ID (16 bits).
    pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
    /// Subsystem ID (16 bits).
    pub const SUBSYSTEM_ID: usize = 0x2e;
    /// Expansion ROM BAR; not implemented here, reads 0.
    pub const ROM_BAR: usize = 0x30;
    /// Offset of the first capability (8 bits).
    pub const CAPABILITIES_POINTER: usize = 0x34;
    /// Interrupt line (8 bits), scratch for the OS.
    pub const INTERRUPT_LINE: usize = 0x3c;
    /// Interrupt pin (8 bits): 0 none, 1..=4 INTA..INTD.
    pub const INTERRUPT_PIN: usize = 0x3d;
}

/// COMMAND register bits.
pub mod command {
    /// Decode the I/O BARs.
    pub const IO_SPACE: u16 = 1 << 0;
    /// Decode the memory BARs.
    pub const MEMORY_SPACE: u16 = 1 << 1;
    /// The function may issue DMA (and MSI writes).
    pub const BUS_MASTER: u16 = 1 << 2;
    /// Respond to parity errors.
    pub const PARITY_ERROR_RESPONSE: u16 = 1 << 6;
    /// Report system errors.
    pub const SERR: u16 = 1 << 8;
    /// Do not assert INTx.
    pub const INTX_DISABLE: u16 = 1 << 10;
}

/// STATUS register bits.
pub mod status {
    /// A capability list starts at the capabilities pointer.
    pub const CAPABILITIES_LIST: u16 = 1 << 4;
    /// The error bits software clears by writing 1 (parity, aborts, SERR, parity error).
    pub const W1C_ERRORS: u16 = 0xf900;
}

/// Bits of COMMAND the guest may change; the rest are reserved or for bridges.
const COMMAND_WRITABLE: u16 = command::IO_SPACE
    | command::MEMORY_SPACE
    | command::BUS_MASTER
    | command::PARITY_ERROR_RESPONSE
    | command::SERR
    | command::INTX_DISABLE;

/// Where the capability list may live: after the header, below the extended space.
const FIRST_CAPABILITY: usize = 0x40;

/// Standard capability IDs used by this crate.
pub mod cap_id {
    /// Message Signalled Interrupts.
    pub const MSI: u8 = 0x05;
    /// Vendor-specific.
    pub const VENDOR: u8 = 0x09;
    /// MSI-X.
    pub const MSIX: u8 = 0x11;
}

/// Identity of a function: what goes into the read-only part of the header. Fields left at
/// their default are zero (no subsystem IDs, no interrupt pin).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PciHeader {
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// Class code: base class << 16 | subclass << 8 | programming interface.
    pub class_code: u32,
    /// Revision ID.
    pub revision_id: u8,
    /// Subsystem vendor ID.
    pub subsystem_vendor_id: u16,
    /// Subsystem ID.
    pub subsystem_id: u16,
    /// Interrupt pin: 0 none, 1 INTA .. 4 INTD.
    pub interrupt_pin: u8,
}

/// Why a BAR or capability could not be registered or placed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("BAR{index} does not exist (a type-0 header has BAR0..BAR5)")]
    BarIndex { index: usize },
    #[error("BAR{index}: a 64-bit BAR needs BAR{index} and the next register, BAR5 has none")]
    Bar64AtEnd { index: usize },
    #[error("BAR{index} is already registered (or is the upper half of a 64-bit BAR)")]
    BarInUse { index: usize },
    #[error("BAR{index}: {kind} size {size:#x} is invalid: {reason}")]
    BarSize {
        index: usize,
        kind: BarKind,
        size: u64,
        reason: &'static str,
    },
    #[error("BAR{index}: an I/O BAR cannot be prefetchable")]
    PrefetchableIo { index: usize },
    #[error("BAR{index} is not registered")]
    BarNotRegistered { index: usize },
    #[error(
        "BAR{index}: {kind} BAR of size {size:#x} cannot be placed at {addr:#x}: the address \
         must be a multiple of the size and within the reach of its kind"
    )]
    BarAddress {
        index: usize,
        kind: BarKind,
        size: u64,
        addr: u64,
    },
    #[error("capability {id:#04x} of {len} bytes does not fit: {free} bytes left below 0x100")]
    CapabilitySpace {
        id: u8,
        /// Including the 2-byte ID/next header.
        len: usize,
        free: usize,
    },
    #[error(
        "{len} bytes at config offset {offset:#x} run past the {CONFIG_SPACE_SIZE}-byte space"
    )]
    OutOfRange { offset: usize, len: usize },
}

impl Classify for ConfigError {
    fn class(&self) -> ErrorClass {
        // The device models and the VMM's BAR placement choose every value checked here;
        // a passthrough device's own BAR sizes come wrapped in `VfioPciError`.
        ErrorClass::Internal
    }
}

/// A type-0 configuration space with write masks.
#[derive(Clone)]
pub struct ConfigSpace {
    regs: Box<[u32]>,
    /// Bits the guest may change.
    writable: Box<[u32]>,
    /// Bits the guest clears by writing 1.
    w1c: Box<[u32]>,
    bars: [Option<BarSpec>; NUM_BARS],
    /// Offset of the last capability, whose next pointer a new one is chained to.
    last_cap: Option<usize>,
    /// Where the next capability goes.
    next_cap: usize,
}

impl fmt::Debug for ConfigSpace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConfigSpace")
            .field("vendor_id", &format_args!("{:#06x}", self.read_u16(0)))
            .field("device_id", &format_args!("{:#06x}", self.read_u16(2)))
            .field("bars", &self.bars().collect::<Vec<_>>())
            .field("capabilities", &self.capabilities())
            .finish()
    }
}

/// Byte-enable mask and shifted value for a 1/2/4-byte access at `offset` inside a dword,
/// or `None` for an access that is not one of those or crosses the dword.
pub(crate) fn lanes(offset: u64, data: &[u8]) -> Option<(u32, u32)> {
    let fits = offset
        .checked_add(data.len() as u64)
        .is_some_and(|end| end <= 4);
    if !matches!(data.len(), 1 | 2 | 4) || !fits {
        return None;
    }
    let shift = offset as u32 * 8;
    let mut bytes = [0u8; 4];
    bytes[..data.len()].copy_from_slice(data);
    let value = u32::from_le_bytes(bytes) << shift;
    let mask = if data.len() == 4 {
        u32::MAX
    } else {
        ((1u32 << (data.len() * 8)) - 1) << shift
    };
    Some((value, mask))
}

impl ConfigSpace {
    /// A space with `header`'s identity, no BARs and no capabilities.
    pub fn new(header: &PciHeader) -> Self {
        let mut cs = ConfigSpace {
            regs: vec![0; NUM_REGS].into_boxed_slice(),
            writable: vec![0; NUM_REGS].into_boxed_slice(),
            w1c: vec![0; NUM_REGS].into_boxed_slice(),
            bars: [None; NUM_BARS],
            last_cap: None,
            next_cap: FIRST_CAPABILITY,
        };
        cs.set_u16(offset::VENDOR_ID, header.vendor_id);
        cs.set_u16(offset::DEVICE_ID, header.device_id);
        cs.set_u32(
            offset::REVISION_ID,
            (header.class_code & 0x00ff_ffff) << 8 | u32::from(header.revision_id),
        );
        cs.set_u16(offset::SUBSYSTEM_VENDOR_ID, header.subsystem_vendor_id);
        cs.set_u16(offset::SUBSYSTEM_ID, header.subsystem_id);
        cs.set_u8(offset::INTERRUPT_PIN, header.interrupt_pin);
        cs.writable[offset::COMMAND / 4] = u32::from(COMMAND_WRITABLE);
        cs.w1c[offset::STATUS / 4] = u32::from(status::W1C_ERRORS) << 16;
        // Cache line size and latency timer are scratch registers for the OS.
        cs.writable[offset::CACHE_LINE_SIZE / 4] = 0x0000_ffff;
        cs.writable[offset::INTERRUPT_LINE / 4] = 0x0000_00ff;
        cs
    }

    /// Register `reg` (a dword index, 0..1024). Beyond the space reads all ones.
    pub fn read_reg(&self, reg: usize) -> u32 {
        self.regs.get(reg).copied().unwrap_or(u32::MAX)
    }

    /// A guest write of `data` (1, 2 or 4 bytes) at byte `offset` (0..=3) of register `reg`,
    /// through the write masks. Any other shape of access is ignored, as is a register beyond
    /// the space. Returns the BARs whose decoded window changed.
    pub fn write_reg(&mut self, reg: usize, offset: u64, data: &[u8]) -> Vec<BarChange> {
        let Some((value, lanes)) = lanes(offset, data) else {
            crate::debug_limited!(
                "ignoring a malformed config space write of {} byte(s) at register {reg} \
                 offset {offset}",
                data.len()
            );
            return Vec::new();
        };
        let Some(old) = self.regs.get(reg).copied() else {
            return Vec::new();
        };
        // Only COMMAND and the BAR registers change what a BAR decodes.
        let bar_regs = offset::BAR0 / 4..offset::BAR0 / 4 + NUM_BARS;
        let affects_bars = reg == offset::COMMAND / 4 || bar_regs.contains(&reg);
        let before = affects_bars.then(|| self.decoded_bars());

        let writable = self.writable[reg] & lanes;
        let cleared = value & self.w1c[reg] & lanes;
        self.regs[reg] = ((old & !writable) | (value & writable)) & !cleared;

        match before {
            Some(before) => self.bar_changes(&before),
            None => Vec::new(),
        }
    }

    /// Reads `data.len()` bytes at byte `offset`; bytes beyond the space read 0xff.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset.saturating_add(i);
            *b = match self.regs.get(at / 4) {
                Some(r) => (r >> ((at % 4) * 8)) as u8,
                None => 0xff,
            };
        }
    }

    /// The byte at `offset` (0xff beyond the space).
    pub fn read_u8(&self, offset: usize) -> u8 {
        let mut b = [0u8; 1];
        self.read(offset, &mut b);
        b[0]
    }

    /// The little-endian u16 at `offset`.
    pub fn read_u16(&self, offset: usize) -> u16 {
        let mut b = [0u8; 2];
        self.read(offset, &mut b);
        u16::from_le_bytes(b)
    }

    /// The little-endian u32 at `offset`.
    pub fn read_u32(&self, offset: usize) -> u32 {
        let mut b = [0u8; 4];
        self.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// Device-side store of `data` at `offset`, ignoring the write masks (for read-only fields
    /// the device itself maintains). Bytes beyond the space are dropped.
    pub fn set(&mut self, offset: usize, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            let at = offset.saturating_add(i);
            if let Some(r) = self.regs.get_mut(at / 4) {
                let shift = (at % 4) * 8;
                *r = (*r & !(0xff << shift)) | (u32::from(b) << shift);
            }
        }
    }

    /// Device-side store of a byte.
    pub fn set_u8(&mut self, offset: usize, v: u8) {
        self.set(offset, &[v]);
    }

    /// Device-side store of a little-endian u16.
    pub fn set_u16(&mut self, offset: usize, v: u16) {
        self.set(offset, &v.to_le_bytes());
    }

    /// Device-side store of a little-endian u32.
    pub fn set_u32(&mut self, offset: usize, v: u32) {
        self.set(offset, &v.to_le_bytes());
    }

    fn check_range(offset: usize, len: usize) -> Result<(), ConfigError> {
        match offset.checked_add(len) {
            Some(end) if end <= CONFIG_SPACE_SIZE => Ok(()),
            _ => Err(ConfigError::OutOfRange { offset, len }),
        }
    }

    fn set_mask(
        masks: &mut [u32],
        offset: usize,
        mask: &[u8],
        other: &mut [u32],
    ) -> Result<(), ConfigError> {
        Self::check_range(offset, mask.len())?;
        for (i, &m) in mask.iter().enumerate() {
            let at = offset + i;
            let shift = (at % 4) * 8;
            masks[at / 4] = (masks[at / 4] & !(0xff << shift)) | (u32::from(m) << shift);
            // A bit is either writable or W1C, never both.
            other[at / 4] &= !(u32::from(m) << shift);
        }
        Ok(())
    }

    /// Makes the bits set in `mask` (bytes from `offset`) guest-writable, and the others in
    /// those bytes read-only.
    pub fn set_writable(&mut self, offset: usize, mask: &[u8]) -> Result<(), ConfigError> {
        Self::set_mask(&mut self.writable, offset, mask, &mut self.w1c)
    }

    /// The COMMAND register.
    pub fn command(&self) -> u16 {
        self.read_u16(offset::COMMAND)
    }

    /// The STATUS register.
    pub fn status(&self) -> u16 {
        self.read_u16(offset::STATUS)
    }

    /// Whether the function may master the bus (DMA, MSI writes).
    pub fn bus_master(&self) -> bool {
        self.command() & command::BUS_MASTER != 0
    }

    /// Appends a capability with ID `id`; `body` is what follows the 2-byte ID/next header.
    /// All of it is read-only until [`ConfigSpace::set_writable`] says otherwise. Returns the
    /// capability's offset.
    pub fn add_capability(&mut self, id: u8, body: &[u8]) -> Result<usize, ConfigError> {
        let len = body.len() + 2;
        let at = self.next_cap;
        if at + len > STANDARD_CONFIG_SIZE {
            return Err(ConfigError::CapabilitySpace {
                id,
                len,
                free: STANDARD_CONFIG_SIZE - at,
            });
        }
        self.set(at, &[id, 0]);
        self.set(at + 2, body);
        match self.last_cap {
            Some(prev) => self.set_u8(prev + 1, at as u8),
            None => self.set_u8(offset::CAPABILITIES_POINTER, at as u8),
        }
        let status = self.status() | status::CAPABILITIES_LIST;
        self.set_u16(offset::STATUS, status);
        self.last_cap = Some(at);
        // Capabilities are dword aligned (the low two pointer bits are reserved).
        self.next_cap = (at + len + 3) & !3;
        Ok(at)
    }

    /// The capability list as (ID, offset), walked the way a guest would. Stops at a loop or
    /// a pointer outside the capability area.
    pub fn capabilities(&self) -> Vec<(u8, usize)> {
        let mut out = Vec::new();
        if self.status() & status::CAPABILITIES_LIST == 0 {
            return out;
        }
        let mut at = usize::from(self.read_u8(offset::CAPABILITIES_POINTER) & !3);
        // At most 48 dword-aligned slots fit between 0x40 and 0x100.
        while at >= FIRST_CAPABILITY && out.len() < 48 {
            out.push((self.read_u8(at), at));
            at = usize::from(self.read_u8(at + 1) & !3);
        }
        out
    }
}

mod bar;

#[cfg(test)]
pub(crate) use bar::with_mem_bar0;
pub use bar::{Bar, BarChange, BarKind, BarSpec};

#[cfg(test)]
mod tests;
