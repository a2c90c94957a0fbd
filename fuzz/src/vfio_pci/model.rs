//! What the guest should see of the passthrough function, built from the PCI rules and the
//! fake device's raw config bytes (not from the model's shadow): BAR registers with their
//! write masks, the COMMAND bits that decode them, the capabilities the model must find and
//! the MSI-X table, masks and pending vectors.

use devices::pci::{BarChange, BarKind, BarSpec};

/// COMMAND bits the guest may change (PCI rules; the rest are reserved or for bridges).
pub const COMMAND_WRITABLE: u16 = 0x0547;
const IO_SPACE: u16 = 1;
const MEMORY_SPACE: u16 = 2;
pub const MSIX_ENABLE: u16 = 1 << 15;
pub const MSIX_FMASK: u16 = 1 << 14;
/// Dword index of BAR0 and of the expansion ROM BAR.
pub const BAR0_REG: usize = 4;
pub const ROM_REG: usize = 12;

#[derive(Clone, Copy, Debug)]
pub struct MBar {
    pub spec: BarSpec,
    /// The BAR's low register's read-only flag bits.
    pub flags: u32,
}

/// A table or PBA window: BAR, offset in it, length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub bar: usize,
    pub offset: u64,
    pub len: u64,
}

impl Window {
    /// The offset inside the window of an access that lies wholly inside it.
    pub fn inner(&self, bar: usize, offset: u64, len: usize) -> Option<u64> {
        let end = offset.checked_add(len as u64)?;
        (bar == self.bar && offset >= self.offset && end <= self.offset + self.len)
            .then(|| offset - self.offset)
    }
}

#[derive(Debug)]
pub struct MMsix {
    pub cap: usize,
    /// Message Control as the device reported it, enable and function mask cleared.
    pub control: u16,
    pub table: Window,
    pub pba: Window,
    pub enabled: bool,
    pub fmask: bool,
    pub entries: Vec<[u32; 4]>,
    /// Fired while masked and not delivered since.
    pub waiting: Vec<bool>,
}

impl MMsix {
    pub fn count(&self) -> usize {
        self.entries.len()
    }

    /// The message vector `v` sends now, if it is enabled and unmasked.
    pub fn live(&self, v: usize) -> Option<(u64, u32)> {
        let e = self.entries.get(v)?;
        (self.enabled && !self.fmask && e[3] & 1 == 0)
            .then(|| (u64::from(e[1]) << 32 | u64::from(e[0]), e[2]))
    }

    pub fn table_byte(&self, at: u64) -> u8 {
        let e = self.entries[(at / 16) as usize];
        (e[(at % 16 / 4) as usize] >> (at % 4 * 8)) as u8
    }
}

#[derive(Debug)]
pub struct Model {
    pub config_size: u64,
    pub bars: [Option<MBar>; 6],
    /// The BAR registers as the guest reads them.
    pub bar_regs: [u32; 6],
    pub bar_writable: [u32; 6],
    pub command: u16,
    pub msix: Option<MMsix>,
    /// The MSI capability's offset and length in dwords.
    pub msi: Option<(usize, usize)>,
}

fn dword(cfg: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([cfg[at], cfg[at + 1], cfg[at + 2], cfg[at + 3]])
}

impl Model {
    /// The model of a device with these config bytes (at least 256) and BAR region sizes, or
    /// `None` when the PCI rules leave no way to present it (a BAR of impossible size).
    pub fn new(config_size: u64, cfg: &[u8], sizes: [u64; 6]) -> Option<Model> {
        if config_size < 256 {
            return None;
        }
        let mut m = Model {
            config_size: config_size.min(4096),
            bars: [None; 6],
            bar_regs: [0; 6],
            bar_writable: [0; 6],
            command: 0,
            msix: None,
            msi: None,
        };
        let mut i = 0;
        while i < 6 {
            let reg = dword(cfg, 0x10 + 4 * i);
            let kind = match (reg & 1, reg & 6) {
                (1, _) => BarKind::Io,
                (_, 4) => BarKind::Memory64,
                _ => BarKind::Memory32,
            };
            let wide = kind == BarKind::Memory64;
            if sizes[i] > 0 {
                let size = sizes[i].checked_next_power_of_two()?;
                let (min, max) = match kind {
                    BarKind::Io => (4, 1 << 16),
                    BarKind::Memory32 => (16, 1 << 31),
                    BarKind::Memory64 => (16, 1 << 63),
                };
                if size < min || size > max || (wide && i == 5) {
                    return None;
                }
                let prefetchable = kind != BarKind::Io && reg & 8 != 0;
                let flags = match kind {
                    BarKind::Io => 1,
                    BarKind::Memory32 => 0,
                    BarKind::Memory64 => 4,
                } | if prefetchable { 8 } else { 0 };
                let mask = !(size - 1);
                m.bars[i] = Some(MBar {
                    spec: BarSpec {
                        kind,
                        size,
                        prefetchable,
                    },
                    flags,
                });
                m.bar_regs[i] = flags;
                let low = if kind == BarKind::Io { !3 } else { !0xf };
                m.bar_writable[i] = mask as u32 & low;
                if wide {
                    m.bar_writable[i + 1] = (mask >> 32) as u32;
                }
            }
            i += if wide { 2 } else { 1 };
        }

        // The capability list, walked as a driver would, with a bound against loops.
        let mut at = if dword(cfg, 4) >> 16 & 0x10 != 0 {
            usize::from(cfg[0x34] & !3)
        } else {
            0
        };
        for _ in 0..48 {
            if !(0x40..=0xfc).contains(&at) {
                break;
            }
            let dw0 = dword(cfg, at);
            let control = (dw0 >> 16) as u16;
            match dw0 as u8 {
                0x05 => {
                    let len = if control & 0x80 != 0 { 4 } else { 3 };
                    m.msi = Some((at, len + if control & 0x100 != 0 { 2 } else { 0 }));
                }
                0x11 if at <= 0xf4 => {
                    let n = usize::from(control & 0x7ff) + 1;
                    let window = |d: u32, len: u64| Window {
                        bar: (d & 7) as usize,
                        offset: u64::from(d & !7),
                        len,
                    };
                    m.msix = Some(MMsix {
                        cap: at,
                        control: control & !(MSIX_ENABLE | MSIX_FMASK),
                        table: window(dword(cfg, at + 4), n as u64 * 16),
                        pba: window(dword(cfg, at + 8), n.div_ceil(64) as u64 * 8),
                        enabled: false,
                        fmask: false,
                        entries: vec![[0, 0, 0, 1]; n],
                        waiting: vec![false; n],
                    });
                }
                _ => {}
            }
            at = usize::from((dw0 >> 8) as u8 & !3);
        }
        Some(m)
    }

    /// Where each BAR decodes now: its base while its space is enabled in COMMAND.
    fn decoded(&self) -> [Option<u64>; 6] {
        let mut out = [None; 6];
        for (i, b) in self.bars.iter().enumerate() {
            let Some(b) = b else { continue };
            let space = if b.spec.kind == BarKind::Io {
                IO_SPACE
            } else {
                MEMORY_SPACE
            };
            out[i] = (self.command & space != 0).then(|| self.bar_addr(i));
        }
        out
    }

    /// BAR `i`'s programmed base (flag bits stripped).
    pub fn bar_addr(&self, i: usize) -> u64 {
        let b = self.bars[i].expect("a registered BAR");
        let low = if b.spec.kind == BarKind::Io { !3 } else { !0xf };
        let lo = u64::from(self.bar_regs[i] & low);
        match b.spec.kind {
            BarKind::Memory64 => u64::from(self.bar_regs[i + 1]) << 32 | lo,
            _ => lo,
        }
    }

    pub fn decodes(&self, i: usize) -> bool {
        self.decoded()[i].is_some()
    }

    fn changes(&self, before: [Option<u64>; 6]) -> Vec<BarChange> {
        let after = self.decoded();
        (0..6)
            .filter(|&i| before[i] != after[i])
            .map(|i| BarChange {
                index: i,
                spec: self.bars[i].expect("only registered BARs decode").spec,
                old: before[i],
                new: after[i],
            })
            .collect()
    }

    /// A guest write through `value`/`lanes` (see [`lanes`]) to BAR register `i`.
    pub fn write_bar_reg(&mut self, i: usize, value: u32, lanes: u32) -> Vec<BarChange> {
        let before = self.decoded();
        let w = self.bar_writable[i] & lanes;
        self.bar_regs[i] = (self.bar_regs[i] & !w) | (value & w);
        self.changes(before)
    }

    /// A guest write to the COMMAND/STATUS dword.
    pub fn write_command(&mut self, value: u32, lanes: u32) -> Vec<BarChange> {
        let before = self.decoded();
        let w = u32::from(COMMAND_WRITABLE) & lanes;
        self.command = ((u32::from(self.command) & !w) | (value & w)) as u16;
        self.changes(before)
    }

    /// Firmware placing BAR `i` at `addr`: refused (`None`) unless aligned and in its space.
    pub fn place(&mut self, i: usize, addr: u64) -> Option<()> {
        let b = self.bars.get(i).copied().flatten()?;
        let size = b.spec.size;
        let limit = match b.spec.kind {
            BarKind::Io => 1 << 16,
            BarKind::Memory32 => 1 << 32,
            BarKind::Memory64 => u128::from(u64::MAX) + 1,
        };
        if !addr.is_multiple_of(size) || u128::from(addr) + u128::from(size) > limit {
            return None;
        }
        self.bar_regs[i] = b.flags | (addr as u32 & self.bar_writable[i]);
        if b.spec.kind == BarKind::Memory64 {
            self.bar_regs[i + 1] = (addr >> 32) as u32;
        }
        self.command |= if b.spec.kind == BarKind::Io {
            IO_SPACE
        } else {
            MEMORY_SPACE
        };
        Some(())
    }

    /// Whether config register `reg` is the MSI-X control dword or inside MSI: the model
    /// shadows those and writes them through.
    pub fn irq_reg(&self, reg: usize) -> bool {
        self.msix.as_ref().is_some_and(|m| reg == m.cap / 4)
            || self
                .msi
                .is_some_and(|(cap, len)| (cap / 4..cap / 4 + len).contains(&reg))
    }
}

/// Value and byte-lane mask of a 1/2/4-byte access at `offset` inside a dword, or `None` for
/// any other shape (which config space ignores).
pub fn lanes(offset: u64, data: &[u8]) -> Option<(u32, u32)> {
    if !matches!(data.len(), 1 | 2 | 4) || offset >= 4 || offset as usize + data.len() > 4 {
        return None;
    }
    let mut v = 0u32;
    let mut mask = 0u32;
    for (i, &b) in data.iter().enumerate() {
        let shift = (offset as usize + i) * 8;
        v |= u32::from(b) << shift;
        mask |= 0xff << shift;
    }
    Some((v, mask))
}
