//! The passthrough model's own copy of the MSI and MSI-X state.
//!
//! The guest programs vectors (address/data, masks) into the MSI capability and the MSI-X
//! table; the VMM must turn them into KVM routes, so it keeps them here instead of in the
//! device: the MSI-X table and PBA are trapped, and the capability registers are shadowed
//! (and written through, so a device that looks at its own enable bits sees them).

use crate::pci::config::lanes;
use crate::pci::msix::Pba;
use crate::pci::MsiMessage;

/// MSI-X Message Control: enable and function mask.
const MSIX_ENABLE: u16 = 1 << 15;
const MSIX_FUNCTION_MASK: u16 = 1 << 14;
/// MSI Message Control: enable, 64-bit address, per-vector masking, multiple message enable.
const MSI_ENABLE: u16 = 1 << 0;
const MSI_64BIT: u16 = 1 << 7;
const MSI_PER_VECTOR_MASK: u16 = 1 << 8;
/// Vector Control bit 0 of an MSI-X table entry.
const ENTRY_MASKED: u32 = 1;

/// Whether a vector can fire now, which decides what becomes of its eventfd's signals.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VectorState {
    /// Enabled and unmasked: KVM delivers this message.
    Live(MsiMessage),
    /// Enabled but masked (its own mask bit, or the MSI-X function mask): a signal is held as
    /// pending and sent once unmasked.
    Masked,
    /// Disabled, or no such vector: a signal is dropped.
    Off,
}

impl VectorState {
    /// The message, if the vector is live.
    pub fn live(self) -> Option<MsiMessage> {
        match self {
            VectorState::Live(m) => Some(m),
            _ => None,
        }
    }
}

/// Where a table or PBA lives: BAR and offset (from the capability's BIR/offset dword).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarWindow {
    /// BAR index.
    pub bar: usize,
    /// Offset in the BAR.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

impl BarWindow {
    /// The offset of `[offset, offset + len)` inside this window, if it lies wholly inside.
    pub fn inner(&self, bar: usize, offset: u64, len: usize) -> Option<u64> {
        let end = offset.checked_add(len as u64)?;
        (bar == self.bar && offset >= self.offset && end <= self.offset + self.len)
            .then(|| offset - self.offset)
    }
}

/// The MSI-X capability and table as the guest programmed them.
#[derive(Debug)]
pub struct MsixShadow {
    /// Capability offset in config space.
    pub cap: usize,
    /// The vector table.
    pub table: BarWindow,
    /// The pending-bit array.
    pub pba: BarWindow,
    control: u16,
    entries: Vec<[u32; 4]>,
}

impl MsixShadow {
    /// From the capability's three dwords as the device reports them.
    pub fn new(cap: usize, dw0: u32, table: u32, pba: u32) -> Self {
        let control = (dw0 >> 16) as u16;
        let count = usize::from(control & 0x7ff) + 1;
        // Every entry starts masked (PCI spec reset state).
        let entries = vec![[0, 0, 0, ENTRY_MASKED]; count];
        MsixShadow {
            cap,
            table: BarWindow {
                bar: (table & 7) as usize,
                offset: u64::from(table & !7),
                len: count as u64 * 16,
            },
            pba: BarWindow {
                bar: (pba & 7) as usize,
                offset: u64::from(pba & !7),
                len: Pba::len_for(count),
            },
            control: control & !(MSIX_ENABLE | MSIX_FUNCTION_MASK),
            entries,
        }
    }

    /// Number of vectors.
    pub fn count(&self) -> usize {
        self.entries.len()
    }

    /// Whether MSI-X is enabled.
    pub fn enabled(&self) -> bool {
        self.control & MSIX_ENABLE != 0
    }

    /// Whether `reg` holds the Message Control word.
    pub fn is_control_reg(&self, reg: usize) -> bool {
        reg == self.cap / 4
    }

    /// The capability's first dword as the guest sees it: the device's, with our control bits.
    pub fn overlay(&self, device_dw0: u32) -> u32 {
        (device_dw0 & 0xffff) | (u32::from(self.control) << 16)
    }

    /// A guest write to the first dword; returns whether enable or function mask changed.
    pub fn write_control(&mut self, offset: u64, data: &[u8]) -> bool {
        let Some((value, mask)) = lanes(offset, data) else {
            return false;
        };
        let bits = u32::from(MSIX_ENABLE | MSIX_FUNCTION_MASK) << 16;
        let old = self.control;
        let dw = (u32::from(old) << 16 & !(mask & bits)) | (value & mask & bits);
        self.control = (old & !(MSIX_ENABLE | MSIX_FUNCTION_MASK)) | (dw >> 16) as u16;
        self.control != old
    }

    /// Reads from the table at `offset` (relative to the table).
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        let (index, word) = ((offset / 16) as usize, (offset % 16 / 4) as usize);
        let Some(entry) = self.entries.get(index) else {
            return;
        };
        let within = (offset % 4) as usize;
        match data.len() {
            8 if within == 0 && word % 2 == 0 => {
                data[..4].copy_from_slice(&entry[word].to_le_bytes());
                data[4..].copy_from_slice(&entry[word + 1].to_le_bytes());
            }
            1 | 2 | 4 if within + data.len() <= 4 => {
                let bytes = entry[word].to_le_bytes();
                data.copy_from_slice(&bytes[within..within + data.len()]);
            }
            _ => {}
        }
    }

    /// Writes to the table; returns whether an entry changed.
    pub fn table_write(&mut self, offset: u64, data: &[u8]) -> bool {
        let (index, word) = ((offset / 16) as usize, (offset % 16 / 4) as usize);
        let Some(entry) = self.entries.get_mut(index) else {
            return false;
        };
        let old = *entry;
        if data.len() == 8 && offset % 8 == 0 {
            let (lo, hi) = data.split_at(4);
            let dword = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            entry[word] = dword(lo);
            entry[word + 1] = dword(hi);
        } else if let Some((value, mask)) = lanes(offset % 4, data) {
            entry[word] = (entry[word] & !mask) | (value & mask);
        }
        *entry != old
    }

    /// Whether vector `i` is live, masked (by its entry or the function mask) or off.
    pub fn state(&self, i: usize) -> VectorState {
        let Some(e) = self.entries.get(i).filter(|_| self.enabled()) else {
            return VectorState::Off;
        };
        if self.control & MSIX_FUNCTION_MASK != 0 || e[3] & ENTRY_MASKED != 0 {
            return VectorState::Masked;
        }
        VectorState::Live(MsiMessage {
            addr: u64::from(e[1]) << 32 | u64::from(e[0]),
            data: e[2],
            masked: false,
        })
    }
}

/// The MSI capability as the guest programmed it.
#[derive(Debug)]
pub struct MsiShadow {
    /// Capability offset in config space.
    pub cap: usize,
    /// Dwords of the capability: control, address (lo, hi), data, mask, pending.
    regs: [u32; 6],
}

impl MsiShadow {
    /// From the capability's first dword as the device reports it.
    pub fn new(cap: usize, dw0: u32) -> Self {
        let mut regs = [0; 6];
        regs[0] = dw0 & !(u32::from(MSI_ENABLE | 0x70) << 16);
        MsiShadow { cap, regs }
    }

    fn control(&self) -> u16 {
        (self.regs[0] >> 16) as u16
    }

    fn is_64(&self) -> bool {
        self.control() & MSI_64BIT != 0
    }

    /// Capability length in dwords.
    fn dwords(&self) -> usize {
        let base = if self.is_64() { 4 } else { 3 };
        base + if self.control() & MSI_PER_VECTOR_MASK != 0 {
            2
        } else {
            0
        }
    }

    /// Vectors the device offers.
    pub fn supported(&self) -> usize {
        1 << ((self.control() >> 1) & 7).min(5)
    }

    /// Vectors the guest enabled (0 when MSI is off).
    pub fn enabled_vectors(&self) -> usize {
        if self.control() & MSI_ENABLE == 0 {
            return 0;
        }
        (1usize << ((self.control() >> 4) & 7).min(5)).min(self.supported())
    }

    /// Whether `reg` is part of the capability.
    pub fn contains(&self, reg: usize) -> bool {
        (self.cap / 4..self.cap / 4 + self.dwords()).contains(&reg)
    }

    /// Register `reg` as the guest sees it (pending bits come from the device).
    pub fn read(&self, reg: usize, device: u32) -> u32 {
        let i = reg - self.cap / 4;
        let pending = self.dwords() - 1;
        if i == 0 {
            (device & 0xffff) | (self.regs[0] & 0xffff_0000)
        } else if self.control() & MSI_PER_VECTOR_MASK != 0 && i == pending {
            device
        } else {
            self.regs[self.slot(i)]
        }
    }

    /// Maps a dword index inside the capability to our register slot.
    fn slot(&self, i: usize) -> usize {
        match (i, self.is_64()) {
            (0, _) | (1, _) => i,
            (2, true) => 2,
            (2, false) | (3, true) => 3,
            (3, false) | (4, true) => 4,
            _ => 5,
        }
    }

    /// A guest write to register `reg`; returns whether delivery may have changed.
    pub fn write(&mut self, reg: usize, offset: u64, data: &[u8]) -> bool {
        let Some((value, mask)) = lanes(offset, data) else {
            return false;
        };
        let i = reg - self.cap / 4;
        let writable = match i {
            // Enable and Multiple Message Enable only.
            0 => u32::from(MSI_ENABLE | 0x70) << 16,
            1 => !3,
            _ => u32::MAX,
        };
        let slot = self.slot(i);
        let old = self.regs;
        let w = mask & writable;
        self.regs[slot] = (self.regs[slot] & !w) | (value & w);
        self.regs != old
    }

    /// The dword index (in config space) of the Pending Bits register, if the capability has
    /// per-vector masking.
    pub fn pending_reg(&self) -> Option<usize> {
        (self.control() & MSI_PER_VECTOR_MASK != 0).then(|| self.cap / 4 + self.dwords() - 1)
    }

    /// Whether vector `i` is live, masked or off.
    pub fn state(&self, i: usize) -> VectorState {
        if i >= self.enabled_vectors() {
            return VectorState::Off;
        }
        if self.control() & MSI_PER_VECTOR_MASK != 0 && self.regs[4] >> i & 1 != 0 {
            return VectorState::Masked;
        }
        let hi = if self.is_64() { self.regs[2] } else { 0 };
        // Multiple-message MSI: vector i sends data with its low bits replaced by i.
        let width = self.enabled_vectors().trailing_zeros();
        let low = (1u32 << width) - 1;
        VectorState::Live(MsiMessage {
            addr: u64::from(hi) << 32 | u64::from(self.regs[1]),
            data: (self.regs[3] & 0xffff & !low) | (i as u32 & low),
            masked: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msix_entries_start_masked_and_fire_only_when_enabled_and_unmasked() {
        // 4 vectors (table size field 3), table in BAR0 at 0x400, PBA at 0x800.
        let mut m = MsixShadow::new(0x40, 0x0003_0011 | 0x8000 << 16, 0x400, 0x800);
        assert_eq!(m.count(), 4);
        assert!(!m.enabled(), "the device's own enable bit is not trusted");
        assert_eq!(m.table.inner(0, 0x410, 4), Some(0x10));
        assert_eq!(m.table.inner(0, 0x43c, 8), None, "past the table");
        assert!(m.table_write(0x10, &0xfee0_0000u32.to_le_bytes()));
        assert!(m.table_write(0x18, &0x41u32.to_le_bytes()));
        assert_eq!(m.state(1), VectorState::Off, "MSI-X is off");
        assert!(m.table_write(0x1c, &0u32.to_le_bytes()));
        assert_eq!(m.state(1), VectorState::Off, "MSI-X not enabled yet");
        assert!(m.write_control(2, &0x8000u16.to_le_bytes()));
        let msg = m.state(1).live().unwrap();
        assert_eq!(m.state(2), VectorState::Masked, "masked at reset");
        assert_eq!((msg.addr, msg.data), (0xfee0_0000, 0x41));
        assert!(m.write_control(2, &0xc000u16.to_le_bytes()));
        assert_eq!(m.state(1), VectorState::Masked, "function mask");
        let mut b = [0u8; 4];
        m.table_read(0x18, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x41);
        assert_eq!(m.overlay(0x1234_0011) >> 16, 0xc003);
    }

    #[test]
    fn msix_accepts_any_offset_and_width_without_panicking() {
        let mut m = MsixShadow::new(0x40, 0x0000_0011, 0x0, 0x800);
        for off in 0..40u64 {
            for len in [1usize, 2, 3, 4, 8, 16] {
                let mut buf = vec![0u8; len];
                m.table_read(off, &mut buf);
                m.table_write(off, &buf);
            }
        }
        m.write_control(3, &[1, 2]);
    }

    #[test]
    fn msi_multiple_message_vectors_and_masking() {
        // 64-bit, per-vector masking, 4 vectors supported (MMC = 2).
        let control = u32::from(MSI_64BIT | MSI_PER_VECTOR_MASK | 2 << 1);
        let mut m = MsiShadow::new(0x50, control << 16 | 0x05);
        assert_eq!(m.supported(), 4);
        assert!(m.contains(0x50 / 4 + 5) && !m.contains(0x50 / 4 + 6));
        m.write(0x14 + 1, 0, &0xfee0_0000u32.to_le_bytes());
        m.write(0x14 + 3, 0, &0x60u32.to_le_bytes());
        assert_eq!(m.state(0), VectorState::Off, "disabled");
        // Enable with MME = 2 (4 vectors).
        assert!(m.write(0x14, 2, &(1u16 | 2 << 4).to_le_bytes()));
        assert_eq!(m.enabled_vectors(), 4);
        assert_eq!(m.state(3).live().unwrap().data, 0x63);
        m.write(0x14 + 4, 0, &0b1000u32.to_le_bytes());
        assert_eq!(m.state(3), VectorState::Masked, "vector 3 masked");
        assert_eq!(m.pending_reg(), Some(0x14 + 5));
        assert_eq!(m.read(0x14 + 3, 0), 0x60);
        assert_eq!(m.read(0x14, 0xabcd) & 0xffff, 0xabcd);
    }
}
