//! The `pci_config` target's model of configuration space: the registers and their write
//! masks (writable, W1C, read-only) built from the PCI rules, the BARs and capabilities
//! added, and the checks that compare a [`ConfigSpace`] with it.

use devices::pci::config::{command, offset, NUM_BARS, NUM_REGS};
use devices::pci::{BarKind, BarSpec, ConfigSpace, MsiCap};

/// Guest-writable COMMAND bits: I/O, memory, bus master, parity, SERR, INTx disable.
const COMMAND_RW: u32 = 0x0547;
/// STATUS bits software clears by writing 1 (upper half of dword 1).
const STATUS_W1C: u32 = 0xf900 << 16;
/// STATUS.CAP_LIST, as a bit of dword 1.
pub(super) const CAP_LIST: u32 = 1 << 20;

/// The register model.
pub(super) struct Model {
    pub regs: Vec<u32>,
    pub writable: Vec<u32>,
    pub w1c: Vec<u32>,
    pub bars: [Option<BarSpec>; NUM_BARS],
    /// (id, offset, length) of each capability added.
    pub caps: Vec<(u8, usize, usize)>,
    pub next_cap: usize,
    /// Whether some `set_writable` opened a byte of the capability chain (pointer, IDs).
    pub chain_open: bool,
    /// Whether some `set_writable` changed the masks of a BAR register.
    pub bars_open: bool,
    pub msi: Option<(MsiCap, usize, u16, bool)>,
}

impl Model {
    pub fn new() -> Self {
        let mut writable = vec![0u32; NUM_REGS];
        let mut w1c = vec![0u32; NUM_REGS];
        writable[1] = COMMAND_RW;
        w1c[1] = STATUS_W1C;
        writable[offset::CACHE_LINE_SIZE / 4] = 0xffff;
        writable[offset::INTERRUPT_LINE / 4] = 0xff;
        Model {
            regs: vec![0; NUM_REGS],
            writable,
            w1c,
            bars: [None; NUM_BARS],
            caps: Vec::new(),
            next_cap: 0x40,
            chain_open: false,
            bars_open: false,
            msi: None,
        }
    }

    pub fn set_mask_byte(&mut self, at: usize, m: u8) {
        let shift = (at % 4) * 8;
        let r = at / 4;
        self.writable[r] = (self.writable[r] & !(0xff << shift)) | (u32::from(m) << shift);
        // A byte made writable or read-only by `set_writable` is no longer W1C anywhere.
        self.w1c[r] &= !(0xff << shift);
    }

    pub fn taken(&self, i: usize) -> bool {
        self.bars[i].is_some()
            || (i > 0 && self.bars[i - 1].is_some_and(|b| b.kind == BarKind::Memory64))
    }

    /// Whether `add_bar(index, spec)` is allowed by the PCI rules this crate implements.
    pub fn bar_allowed(&self, index: usize, spec: BarSpec) -> bool {
        let wide = spec.kind == BarKind::Memory64;
        if index >= NUM_BARS || (wide && index + 1 >= NUM_BARS) {
            return false;
        }
        if self.taken(index) || (wide && self.taken(index + 1)) {
            return false;
        }
        let (min, max) = match spec.kind {
            BarKind::Io => (4u64, 1u64 << 16),
            BarKind::Memory32 => (16, 1 << 31),
            BarKind::Memory64 => (16, 1 << 63),
        };
        !(spec.kind == BarKind::Io && spec.prefetchable)
            && spec.size.is_power_of_two()
            && (min..=max).contains(&spec.size)
    }

    pub fn add_bar(&mut self, index: usize, spec: BarSpec) {
        let reg = offset::BAR0 / 4 + index;
        let mask = !(spec.size - 1);
        let (flags, low) = match spec.kind {
            BarKind::Io => (0x1, 0xffff_fffc),
            BarKind::Memory32 => (0x0, 0xffff_fff0),
            BarKind::Memory64 => (0x4, 0xffff_fff0),
        };
        self.regs[reg] = flags | if spec.prefetchable { 0x8 } else { 0 };
        self.writable[reg] = mask as u32 & low;
        if spec.kind == BarKind::Memory64 {
            self.regs[reg + 1] = 0;
            self.writable[reg + 1] = (mask >> 32) as u32;
        }
        self.bars[index] = Some(spec);
    }

    pub fn bar_addr(&self, index: usize) -> Option<(BarSpec, u64)> {
        let spec = self.bars[index]?;
        let reg = offset::BAR0 / 4 + index;
        let addr = match spec.kind {
            BarKind::Io => u64::from(self.regs[reg] & !3),
            BarKind::Memory32 => u64::from(self.regs[reg] & !0xf),
            BarKind::Memory64 => {
                u64::from(self.regs[reg + 1]) << 32 | u64::from(self.regs[reg] & !0xf)
            }
        };
        Some((spec, addr))
    }

    pub fn decoded(&self) -> [Option<u64>; NUM_BARS] {
        let cmd = self.regs[1] as u16;
        std::array::from_fn(|i| {
            let (spec, addr) = self.bar_addr(i)?;
            let bit = if spec.kind == BarKind::Io {
                command::IO_SPACE
            } else {
                command::MEMORY_SPACE
            };
            (cmd & bit != 0).then_some(addr)
        })
    }

    /// A capability of `len` bytes fits below 0x100.
    pub fn cap_fits(&self, len: usize) -> bool {
        self.next_cap + len <= 0x100
    }

    pub fn add_cap(&mut self, id: u8, at: usize, len: usize) {
        assert_eq!(at, self.next_cap, "capability {id:#x} placed at {at:#x}");
        self.caps.push((id, at, len));
        self.next_cap = (at + len + 3) & !3;
    }

    /// A guest write through the masks; `None` if the access shape is not one a config
    /// cycle can have (ignored).
    pub fn guest_write(&mut self, reg: usize, off: u64, data: &[u8]) -> Option<()> {
        if !matches!(data.len(), 1 | 2 | 4) || off as usize + data.len() > 4 || reg >= NUM_REGS {
            return None;
        }
        let mut bytes = [0u8; 4];
        bytes[..data.len()].copy_from_slice(data);
        let shift = off * 8;
        let value = u32::from_le_bytes(bytes) << shift;
        let lanes = if data.len() == 4 {
            u32::MAX
        } else {
            ((1u32 << (data.len() * 8)) - 1) << shift
        };
        let w = self.writable[reg] & lanes;
        let c = self.w1c[reg] & lanes & value;
        self.regs[reg] = ((self.regs[reg] & !w) | (value & w)) & !c;
        Some(())
    }
}

/// Every register reads what the model says.
pub(super) fn check_regs(cs: &ConfigSpace, m: &Model, what: &str) {
    for (i, &want) in m.regs.iter().enumerate() {
        let got = cs.read_reg(i);
        assert_eq!(
            got,
            want,
            "{what}: register {:#x} reads {got:#010x}, the mask model says {want:#010x}",
            i * 4
        );
    }
}

/// The capability walk stays inside 0x40..0x100, and is the list added while the chain
/// is read-only.
pub(super) fn check_caps(cs: &ConfigSpace, m: &Model) {
    let walked = cs.capabilities();
    assert!(walked.len() <= 48, "capability walk of {}", walked.len());
    for &(_, at) in &walked {
        assert!(
            (0x40..0x100).contains(&at) && at % 4 == 0,
            "capability at {at:#x}"
        );
    }
    if !m.chain_open {
        let want: Vec<(u8, usize)> = m.caps.iter().map(|&(id, at, _)| (id, at)).collect();
        assert_eq!(walked, want, "capability list");
    }
}
