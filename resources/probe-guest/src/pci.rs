//! PCI bus 0 through configuration mechanism 1 (ports 0xcf8 / 0xcfc): enumeration with BAR
//! sizing, a first read of each BAR of functions the probe has no driver for, capability
//! lookup.

use guest_abi::epf::{DEVICE_ID_TI_DRA74X, VENDOR_ID_TI};
use guest_abi::probe::{BAR_READ, PCI_FUNCTION};

use crate::console::Line;
use crate::io::{inl, inw, outl, outw, phys};

const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;

/// Configuration space offsets and bits used here.
pub mod cfg {
    pub const VENDOR_DEVICE: u8 = 0x00;
    pub const COMMAND: u8 = 0x04;
    pub const STATUS: u8 = 0x06;
    pub const CLASS_REV: u8 = 0x08;
    pub const HEADER: u8 = 0x0c;
    pub const BAR0: u8 = 0x10;
    pub const CAP_PTR: u8 = 0x34;

    pub const CMD_IO: u16 = 1 << 0;
    pub const CMD_MEMORY: u16 = 1 << 1;
    pub const CMD_BUS_MASTER: u16 = 1 << 2;
    pub const CMD_INTX_DISABLE: u16 = 1 << 10;
    pub const STATUS_CAP_LIST: u16 = 1 << 4;
}

/// A function on bus 0.
#[derive(Clone, Copy)]
pub struct Bdf {
    pub dev: u8,
    pub func: u8,
}

impl Bdf {
    fn address(self, reg: u8) -> u32 {
        0x8000_0000
            | ((self.dev as u32) & 0x1f) << 11
            | ((self.func as u32) & 7) << 8
            | (reg as u32 & 0xfc)
    }

    pub fn read32(self, reg: u8) -> u32 {
        outl(CONFIG_ADDRESS, self.address(reg));
        inl(CONFIG_DATA)
    }

    pub fn read16(self, reg: u8) -> u16 {
        outl(CONFIG_ADDRESS, self.address(reg));
        inw(CONFIG_DATA + (reg as u16 & 2))
    }

    pub fn read8(self, reg: u8) -> u8 {
        (self.read16(reg & !1) >> ((reg & 1) * 8)) as u8
    }

    pub fn write32(self, reg: u8, value: u32) {
        outl(CONFIG_ADDRESS, self.address(reg));
        outl(CONFIG_DATA, value);
    }

    pub fn write16(self, reg: u8, value: u16) {
        outl(CONFIG_ADDRESS, self.address(reg));
        outw(CONFIG_DATA + (reg as u16 & 2), value);
    }

    /// `00:dd.f`.
    pub fn print(self, line: Line) -> Line {
        line.s("00:")
            .hexw(self.dev as u64, 2)
            .s(".")
            .hexw(self.func as u64, 1)
    }

    /// Offset of the first capability with `id`, walking at most 48 entries.
    pub fn find_capability(self, id: u8) -> Option<u8> {
        if self.read16(cfg::STATUS) & cfg::STATUS_CAP_LIST == 0 {
            return None;
        }
        let mut at = self.read8(cfg::CAP_PTR) & 0xfc;
        for _ in 0..48 {
            if at < 0x40 {
                return None;
            }
            let header = self.read16(at);
            if header as u8 == id {
                return Some(at);
            }
            at = (header >> 8) as u8 & 0xfc;
        }
        None
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    Io,
    Mem32,
    Mem64,
}

#[derive(Clone, Copy)]
pub struct Bar {
    pub kind: BarKind,
    pub addr: u64,
    pub size: u64,
    pub prefetchable: bool,
}

impl Bar {
    pub fn is_memory(&self) -> bool {
        self.kind != BarKind::Io
    }
}

/// A function found on bus 0.
#[derive(Clone, Copy)]
pub struct Function {
    pub bdf: Bdf,
    pub vendor: u16,
    pub device: u16,
    pub class: u32,
    /// Indexed by BAR number; the upper half of a 64-bit BAR is `None`.
    pub bars: [Option<Bar>; 6],
}

/// Memory ranges decoded by the BARs seen so far (for picking a free address).
const MAX_RANGES: usize = 32;
/// Functions whose identity is kept (for checking them again through ECAM).
const MAX_LISTED: usize = 32;

/// What enumeration found.
pub struct Bus {
    pub functions: u32,
    /// The first `MAX_LISTED` functions and their vendor/device dword, as read via 0xcf8.
    listed: [(Bdf, u32); MAX_LISTED],
    nlisted: usize,
    /// The first pci-epf-test function.
    pub epf: Option<Function>,
    ranges: [(u64, u64); MAX_RANGES],
    nranges: usize,
}

impl Bus {
    pub fn listed(&self) -> &[(Bdf, u32)] {
        // `get`: no slice-index panic path (and its formatting code) in the binary.
        self.listed.get(..self.nlisted).unwrap_or(&[])
    }

    fn note_range(&mut self, bar: &Bar) {
        if let (true, Some(slot)) = (
            bar.is_memory() && bar.addr != 0,
            self.ranges.get_mut(self.nranges),
        ) {
            *slot = (bar.addr, bar.addr.saturating_add(bar.size));
            self.nranges += 1;
        }
    }

    /// The lowest `size`-aligned address from `from` up to `limit` that no BAR seen decodes.
    pub fn free_mmio(&self, from: u64, limit: u64, size: u64) -> Option<u64> {
        let size = size.max(4096);
        let mut at = from.next_multiple_of(size);
        'next: while at.saturating_add(size) <= limit {
            for &(start, end) in self.ranges.iter().take(self.nranges) {
                if at < end && start < at + size {
                    at = end.next_multiple_of(size);
                    continue 'next;
                }
            }
            return Some(at);
        }
        None
    }
}

/// Prints one line per function on bus 0 (identity, class, BARs) and returns what it found.
/// Functions other than a pci-epf-test one (which the DMA checks drive) get the first dword
/// of each BAR read and printed; `mapped` is where the identity map ends.
pub fn enumerate_bus0(mapped: u64) -> Bus {
    let mut bus = Bus {
        functions: 0,
        listed: [(Bdf { dev: 0, func: 0 }, 0); MAX_LISTED],
        nlisted: 0,
        epf: None,
        ranges: [(0, 0); MAX_RANGES],
        nranges: 0,
    };
    for dev in 0..32u8 {
        let id = Bdf { dev, func: 0 }.read32(cfg::VENDOR_DEVICE);
        if id & 0xffff == 0xffff {
            continue;
        }
        let multi = Bdf { dev, func: 0 }.read8(cfg::HEADER + 2) & 0x80 != 0;
        let funcs = if multi { 8 } else { 1 };
        for func in 0..funcs {
            let bdf = Bdf { dev, func };
            let id = if func == 0 {
                id
            } else {
                bdf.read32(cfg::VENDOR_DEVICE)
            };
            if id & 0xffff == 0xffff {
                continue;
            }
            let f = Function {
                bdf,
                vendor: id as u16,
                device: (id >> 16) as u16,
                class: bdf.read32(cfg::CLASS_REV) >> 8,
                bars: size_bars(bdf),
            };
            print(&f);
            for bar in f.bars.iter().flatten() {
                bus.note_range(bar);
            }
            if f.vendor == VENDOR_ID_TI && f.device == DEVICE_ID_TI_DRA74X {
                bus.epf = bus.epf.or(Some(f));
            } else {
                read_bars(&f, mapped);
            }
            if let Some(slot) = bus.listed.get_mut(bus.nlisted) {
                *slot = (bdf, id);
                bus.nlisted += 1;
            }
            bus.functions += 1;
        }
    }
    bus
}

fn kind_name(kind: BarKind) -> &'static str {
    match kind {
        BarKind::Io => " io ",
        BarKind::Mem32 => " mem32 ",
        BarKind::Mem64 => " mem64 ",
    }
}

fn print(f: &Function) {
    let mut line = f
        .bdf
        .print(Line::new().s(PCI_FUNCTION))
        .s(" ")
        .hexw(f.vendor as u64, 4)
        .s(":")
        .hexw(f.device as u64, 4)
        .s(" class ")
        .hexw(f.class as u64, 6);
    for (i, bar) in f.bars.iter().enumerate() {
        let Some(bar) = bar else { continue };
        line = line.s(" bar").dec(i as u64).s(kind_name(bar.kind));
        if bar.prefetchable {
            line = line.s("pref ");
        }
        line = line.hex(bar.addr).s(" size ").hex(bar.size);
    }
    line.end()
}

/// One line per BAR of `f` with the dword at its start, as a driver's first register read
/// sees it, or why it was not read.
fn read_bars(f: &Function, mapped: u64) {
    let command = f.bdf.read16(cfg::COMMAND);
    for (i, bar) in f.bars.iter().enumerate() {
        let Some(bar) = bar else { continue };
        let line = f
            .bdf
            .print(Line::new().s(BAR_READ))
            .s(" bar")
            .dec(i as u64)
            .s(kind_name(bar.kind))
            .hex(bar.addr);
        let (decode, limit) = match bar.kind {
            BarKind::Io => (cfg::CMD_IO, 1 << 16),
            BarKind::Mem32 | BarKind::Mem64 => (cfg::CMD_MEMORY, mapped),
        };
        if bar.addr == 0 {
            line.s(": not placed").end();
        } else if command & decode == 0 {
            line.s(": decoding off").end();
        } else if bar.addr.saturating_add(4) > limit {
            line.s(": not mapped").end();
        } else {
            let value = match bar.kind {
                BarKind::Io => inl(bar.addr as u16),
                BarKind::Mem32 | BarKind::Mem64 => phys::read32(bar.addr),
            };
            line.s(": ").hex(value.into()).end();
        }
    }
}

/// Sizes the BARs the standard way (all ones, read back, restore) with decoding off.
fn size_bars(bdf: Bdf) -> [Option<Bar>; 6] {
    let mut bars = [None; 6];
    let count = match bdf.read8(cfg::HEADER + 2) & 0x7f {
        0 => 6,
        1 => 2,
        _ => return bars,
    };
    let command = bdf.read16(cfg::COMMAND);
    bdf.write16(cfg::COMMAND, command & !(cfg::CMD_IO | cfg::CMD_MEMORY));
    let probe = |reg: u8| {
        let old = bdf.read32(reg);
        bdf.write32(reg, u32::MAX);
        let mask = bdf.read32(reg);
        bdf.write32(reg, old);
        (old, mask)
    };
    let mut i = 0;
    while i < count {
        let reg = cfg::BAR0 + 4 * i as u8;
        let (old, mask) = probe(reg);
        if mask == 0 {
            i += 1;
            continue;
        }
        if old & 1 != 0 {
            // I/O: the upper 16 bits may be hardwired to 0.
            let mut m = mask & !3;
            if m & 0xffff_0000 == 0 {
                m |= 0xffff_0000;
            }
            bars[i] = Some(Bar {
                kind: BarKind::Io,
                addr: (old & !3) as u64,
                size: (!m).wrapping_add(1) as u64,
                prefetchable: false,
            });
            i += 1;
            continue;
        }
        let prefetchable = old & 8 != 0;
        if (old >> 1) & 3 == 2 && i + 1 < count {
            let (old_hi, mask_hi) = probe(reg + 4);
            let m = (mask_hi as u64) << 32 | (mask & !0xf) as u64;
            bars[i] = Some(Bar {
                kind: BarKind::Mem64,
                addr: (old_hi as u64) << 32 | (old & !0xf) as u64,
                size: (!m).wrapping_add(1),
                prefetchable,
            });
            i += 2;
        } else {
            bars[i] = Some(Bar {
                kind: BarKind::Mem32,
                addr: (old & !0xf) as u64,
                size: (!(mask & !0xf)).wrapping_add(1) as u64,
                prefetchable,
            });
            i += 1;
        }
    }
    bdf.write16(cfg::COMMAND, command);
    bars
}
