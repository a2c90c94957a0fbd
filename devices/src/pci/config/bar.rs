//! BARs of a [`ConfigSpace`]: their registration, their placement by firmware (the VMM) and
//! which windows decode, from which [`ConfigSpace::write_reg`] reports changes.

use std::fmt;

use super::{command, offset, ConfigError, ConfigSpace, NUM_BARS};

/// What a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// I/O ports.
    Io,
    /// Memory below 4 GiB (one register).
    Memory32,
    /// Memory anywhere (this register and the next one).
    Memory64,
}

impl BarKind {
    pub(super) fn is_memory(self) -> bool {
        !matches!(self, BarKind::Io)
    }
}

impl fmt::Display for BarKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BarKind::Io => "I/O",
            BarKind::Memory32 => "32-bit memory",
            BarKind::Memory64 => "64-bit memory",
        })
    }
}

/// A BAR to register: its kind and size (a power of two).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarSpec {
    /// I/O or memory, 32 or 64 bits.
    pub kind: BarKind,
    /// Bytes decoded; a power of two.
    pub size: u64,
    /// Memory may be prefetched (no read side effects). Memory BARs only.
    pub prefetchable: bool,
}

/// A registered BAR and the address the guest (or VMM) last programmed into it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bar {
    /// BAR number (0..=5); a 64-bit BAR also uses `index + 1`.
    pub index: usize,
    /// Kind and size.
    pub spec: BarSpec,
    /// Programmed base address (flag bits stripped). During sizing this is the size mask.
    pub addr: u64,
    /// Whether the BAR decodes now (its space is enabled in COMMAND).
    pub decoding: bool,
}

/// A BAR whose decoded window changed: it moved, or decoding was switched on or off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarChange {
    /// BAR number.
    pub index: usize,
    /// Kind and size.
    pub spec: BarSpec,
    /// Base the BAR decoded at before the write, if it decoded.
    pub old: Option<u64>,
    /// Base it decodes at now, if it decodes. Guest-controlled: may be any aligned address,
    /// including the sizing pattern, and may overlap other devices.
    pub new: Option<u64>,
}

impl ConfigSpace {
    /// Registers BAR `index`. Its address starts at 0 and its writable bits become the
    /// address bits above `spec.size`, so sizing works through ordinary writes.
    pub fn add_bar(&mut self, index: usize, spec: BarSpec) -> Result<(), ConfigError> {
        if index >= NUM_BARS {
            return Err(ConfigError::BarIndex { index });
        }
        let wide = spec.kind == BarKind::Memory64;
        if wide && index + 1 >= NUM_BARS {
            return Err(ConfigError::Bar64AtEnd { index });
        }
        let taken = |i: usize| {
            self.bars[i].is_some()
                || (i > 0 && self.bars[i - 1].is_some_and(|b| b.kind == BarKind::Memory64))
        };
        if taken(index) || (wide && taken(index + 1)) {
            return Err(ConfigError::BarInUse { index });
        }
        if spec.kind == BarKind::Io && spec.prefetchable {
            return Err(ConfigError::PrefetchableIo { index });
        }
        let (min, max, what) = match spec.kind {
            BarKind::Io => (4, 1 << 16, "I/O BARs span 4 bytes to 64 KiB"),
            BarKind::Memory32 => (16, 1 << 31, "32-bit memory BARs span 16 bytes to 2 GiB"),
            BarKind::Memory64 => (16, 1 << 63, "memory BARs span at least 16 bytes"),
        };
        let reason = if !spec.size.is_power_of_two() {
            Some("not a power of two")
        } else if spec.size < min || spec.size > max {
            Some(what)
        } else {
            None
        };
        if let Some(reason) = reason {
            return Err(ConfigError::BarSize {
                index,
                kind: spec.kind,
                size: spec.size,
                reason,
            });
        }

        let addr_mask = !(spec.size - 1);
        let reg = offset::BAR0 / 4 + index;
        let (flags, low_mask) = match spec.kind {
            BarKind::Io => (0x1, 0xffff_fffc),
            BarKind::Memory32 => (0x0, 0xffff_fff0),
            BarKind::Memory64 => (0x4, 0xffff_fff0),
        };
        let prefetch = if spec.prefetchable { 0x8 } else { 0 };
        self.regs[reg] = flags | prefetch;
        self.writable[reg] = addr_mask as u32 & low_mask;
        if wide {
            self.regs[reg + 1] = 0;
            self.writable[reg + 1] = (addr_mask >> 32) as u32;
        }
        self.bars[index] = Some(spec);
        Ok(())
    }

    /// Programs BAR `index` to `addr`, as firmware would (the guest can still move it).
    pub fn set_bar_addr(&mut self, index: usize, addr: u64) -> Result<(), ConfigError> {
        let spec = self
            .bars
            .get(index)
            .copied()
            .flatten()
            .ok_or(ConfigError::BarNotRegistered { index })?;
        let limit: u64 = match spec.kind {
            BarKind::Io => 1 << 16,
            BarKind::Memory32 => 1 << 32,
            BarKind::Memory64 => u64::MAX,
        };
        let fits = addr
            .checked_add(spec.size - 1)
            .is_some_and(|last| last < limit || spec.kind == BarKind::Memory64);
        if addr % spec.size != 0 || !fits {
            return Err(ConfigError::BarAddress {
                index,
                kind: spec.kind,
                size: spec.size,
                addr,
            });
        }
        let reg = offset::BAR0 / 4 + index;
        let flag_bits = if spec.kind == BarKind::Io { 0x3 } else { 0xf };
        self.regs[reg] = (self.regs[reg] & flag_bits) | (addr as u32 & !flag_bits);
        if spec.kind == BarKind::Memory64 {
            self.regs[reg + 1] = (addr >> 32) as u32;
        }
        Ok(())
    }

    /// BAR `index` if registered, with its programmed address.
    pub fn bar(&self, index: usize) -> Option<Bar> {
        let spec = self.bars.get(index).copied().flatten()?;
        let reg = offset::BAR0 / 4 + index;
        let low = self.regs[reg];
        let addr = match spec.kind {
            BarKind::Io => u64::from(low & !0x3),
            BarKind::Memory32 => u64::from(low & !0xf),
            BarKind::Memory64 => u64::from(self.regs[reg + 1]) << 32 | u64::from(low & !0xf),
        };
        let space = if spec.kind.is_memory() {
            command::MEMORY_SPACE
        } else {
            command::IO_SPACE
        };
        Some(Bar {
            index,
            spec,
            addr,
            decoding: self.command() & space != 0,
        })
    }

    /// All registered BARs, in index order.
    pub fn bars(&self) -> impl Iterator<Item = Bar> + '_ {
        (0..NUM_BARS).filter_map(|i| self.bar(i))
    }

    pub(super) fn decoded_bars(&self) -> [Option<u64>; NUM_BARS] {
        let mut out = [None; NUM_BARS];
        for b in self.bars() {
            out[b.index] = b.decoding.then_some(b.addr);
        }
        out
    }

    pub(super) fn bar_changes(&self, before: &[Option<u64>; NUM_BARS]) -> Vec<BarChange> {
        let after = self.decoded_bars();
        self.bars()
            .filter(|b| before[b.index] != after[b.index])
            .map(|b| BarChange {
                index: b.index,
                spec: b.spec,
                old: before[b.index],
                new: after[b.index],
            })
            .collect()
    }
}

/// A space with `header`'s identity and one 32-bit memory BAR0 of `size` bytes: the
/// smallest device the bus, ECAM and passthrough tests need.
#[cfg(test)]
pub(crate) fn with_mem_bar0(header: &super::PciHeader, size: u64) -> ConfigSpace {
    let mut config = ConfigSpace::new(header);
    config
        .add_bar(
            0,
            BarSpec {
                kind: BarKind::Memory32,
                size,
                prefetchable: false,
            },
        )
        .expect("a 32-bit memory BAR0 of a power-of-two size");
    config
}
