//! The pci-epf-test function (Linux drivers/pci/endpoint/functions/pci-epf-test.c; the VMM's
//! model is devices/src/epf.rs; registers and IDs in `guest_abi::epf`): BAR0 registers,
//! interrupt set-up (MSI-X, or MSI), and one transfer at a time, each ended by the device's
//! interrupt.

use guest_abi::epf::{command, irq_type, reg, REG_BAR};

use crate::apic::{self, Lapic, DEVICE_VECTOR};
use crate::console::Line;
use crate::io::phys;
use crate::pci::{cfg, Bar, BarKind, Bdf, Bus, Function};

const CAP_MSI: u8 = 0x05;
const CAP_MSIX: u8 = 0x11;
const MSI_ENABLE: u16 = 1 << 0;
const MSI_MME: u16 = 7 << 4;
const MSI_64BIT: u16 = 1 << 7;
const MSI_PER_VECTOR_MASK: u16 = 1 << 8;
const MSIX_ENABLE: u16 = 1 << 15;
pub const MSIX_FUNCTION_MASK: u16 = 1 << 14;
/// Vector Control of an MSI-X table entry (bit 0 masks it), after address and data.
pub const MSIX_VECTOR_CONTROL: u64 = 12;

/// Where the probe puts BAR0 when firmware left it at 0 (a free spot in the 32-bit hole, below
/// the IOAPIC).
const BAR0_DEFAULT: u64 = 0xe000_0000;
const MMIO32_LIMIT: u64 = 0xfec0_0000;

/// How long to wait for an interrupt: `pause` spins (about 4 instructions each; seconds under
/// the emulator, far beyond what a working device needs).
pub const IRQ_SPINS: u32 = 2_000_000;

/// Why the device could not be set up.
#[derive(Clone, Copy)]
pub enum Error {
    NoBar0,
    NoRoomForBar0(u64),
    Unmapped(&'static str, u64),
    Magic { addr: u64, wrote: u32, read: u32 },
    NoIrqCapability,
    MsixBar(u8),
}

impl Error {
    pub fn describe(self, line: Line) -> Line {
        match self {
            Error::NoBar0 => line.s("BAR0 is not a memory BAR"),
            Error::NoRoomForBar0(size) => line.s("no free MMIO space for BAR0 of size ").hex(size),
            Error::Unmapped(what, a) => line
                .s(what)
                .s(" at ")
                .hex(a)
                .s(" is beyond the page tables"),
            Error::Magic { addr, wrote, read } => line
                .s("BAR0 ")
                .hex(addr)
                .s(": MAGIC reads ")
                .hex(read as u64)
                .s(" after writing ")
                .hex(wrote as u64),
            Error::NoIrqCapability => line.s("no MSI-X or MSI capability"),
            Error::MsixBar(b) => line
                .s("the MSI-X table is in BAR")
                .dec(b as u64)
                .s(", not a memory BAR"),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum IrqMode {
    Msix,
    Msi,
}

/// A set-up device: decoding and bus mastering on, interrupt programmed.
pub struct Epf {
    regs: u64,
    msix: Option<Msix>,
}

/// Where the MSI-X state of a device set up with MSI-X is.
#[derive(Clone, Copy)]
pub struct Msix {
    pub bdf: Bdf,
    /// The capability's offset in config space.
    pub cap: u8,
    /// Table entry 0.
    pub entry: u64,
    /// The Pending Bit Array.
    pub pba: u64,
}

/// Turns on memory decoding and bus mastering (INTx off), checks that BAR0 answers, and
/// programs MSI-X entry 0 (or MSI, if asked for or there is no MSI-X) to send
/// `DEVICE_VECTOR` to `lapic`; IRQ_TYPE and IRQ_NUMBER = 1 follow.
pub fn setup(
    f: &Function,
    bus: &Bus,
    lapic: &Lapic,
    mapped: u64,
    prefer_msi: bool,
) -> Result<Epf, Error> {
    let bdf = f.bdf;
    let mut bars = f.bars;
    let bar0 = match bars[REG_BAR] {
        Some(bar) if bar.is_memory() => bar,
        _ => return Err(Error::NoBar0),
    };
    if bar0.addr == 0 {
        let at = bus
            .free_mmio(BAR0_DEFAULT, MMIO32_LIMIT, bar0.size)
            .ok_or(Error::NoRoomForBar0(bar0.size))?;
        let bar_reg = cfg::BAR0 + 4 * REG_BAR as u8;
        bdf.write32(bar_reg, at as u32);
        if bar0.kind == BarKind::Mem64 {
            bdf.write32(bar_reg + 4, 0);
        }
        bars[REG_BAR] = Some(Bar { addr: at, ..bar0 });
        bdf.print(Line::new().s("pci "))
            .s(" bar0 assigned ")
            .hex(at)
            .end();
    }
    let regs = bars[REG_BAR].map_or(0, |b| b.addr);
    if regs.saturating_add(bar0.size.max(0x1000)) > mapped {
        return Err(Error::Unmapped("BAR0", regs));
    }
    let command = bdf.read16(cfg::COMMAND);
    bdf.write16(
        cfg::COMMAND,
        command | cfg::CMD_MEMORY | cfg::CMD_BUS_MASTER | cfg::CMD_INTX_DISABLE,
    );

    const MAGIC: u32 = 0x5eed_c0de;
    phys::write32(regs + reg::MAGIC, MAGIC);
    let read = phys::read32(regs + reg::MAGIC);
    if read != MAGIC {
        return Err(Error::Magic {
            addr: regs,
            wrote: MAGIC,
            read,
        });
    }

    let msix = bdf.find_capability(CAP_MSIX);
    let msi = bdf.find_capability(CAP_MSI);
    let (mode, irq_type, msix) = match (msix, msi) {
        (Some(cap), None) => {
            let msix = enable_msix(f, &bars, cap, lapic, mapped)?;
            (IrqMode::Msix, irq_type::MSIX, Some(msix))
        }
        (Some(cap), Some(msi)) if !prefer_msi => {
            let ctl = bdf.read16(msi + 2);
            bdf.write16(msi + 2, ctl & !MSI_ENABLE);
            let msix = enable_msix(f, &bars, cap, lapic, mapped)?;
            (IrqMode::Msix, irq_type::MSIX, Some(msix))
        }
        (msix, Some(cap)) => {
            if let Some(msix) = msix {
                let ctl = bdf.read16(msix + 2);
                bdf.write16(msix + 2, ctl & !MSIX_ENABLE);
            }
            enable_msi(f, cap, lapic);
            (IrqMode::Msi, irq_type::MSI, None)
        }
        (None, None) => return Err(Error::NoIrqCapability),
    };
    let epf = Epf { regs, msix };
    epf.write(reg::IRQ_TYPE, irq_type);
    epf.write(reg::IRQ_NUMBER, 1);
    bdf.print(Line::new().s("epf "))
        .s(" bar0 ")
        .hex(regs)
        .s(match mode {
            IrqMode::Msix => " msix",
            IrqMode::Msi => " msi",
        })
        .s(" vector ")
        .hex(DEVICE_VECTOR as u64)
        .s(" apic ")
        .dec(lapic.id as u64)
        .end();
    Ok(epf)
}

/// Where the capability dword at `cap + at` (table or PBA: BIR and offset) points.
fn msix_place(
    f: &Function,
    bars: &[Option<Bar>; 6],
    cap: u8,
    at: u8,
    what: &'static str,
    mapped: u64,
) -> Result<u64, Error> {
    let place = f.bdf.read32(cap + at);
    let bir = (place & 7) as u8;
    let bar = bars
        .get(bir as usize)
        .copied()
        .flatten()
        .filter(Bar::is_memory)
        .ok_or(Error::MsixBar(bir))?;
    let addr = bar.addr + (place & !7) as u64;
    if addr.saturating_add(16) > mapped {
        return Err(Error::Unmapped(what, addr));
    }
    Ok(addr)
}

/// Entry 0 of the table: the LAPIC's address, data = vector (fixed, edge), unmasked; enabled
/// under the function mask, which is then lifted.
fn enable_msix(
    f: &Function,
    bars: &[Option<Bar>; 6],
    cap: u8,
    lapic: &Lapic,
    mapped: u64,
) -> Result<Msix, Error> {
    let bdf = f.bdf;
    let ctl = bdf.read16(cap + 2);
    let entry = msix_place(f, bars, cap, 4, "MSI-X table", mapped)?;
    let pba = msix_place(f, bars, cap, 8, "MSI-X PBA", mapped)?;
    bdf.write16(cap + 2, ctl | MSIX_ENABLE | MSIX_FUNCTION_MASK);
    let addr = lapic.msi_address();
    phys::write32(entry, addr as u32);
    phys::write32(entry + 4, (addr >> 32) as u32);
    phys::write32(entry + 8, DEVICE_VECTOR as u32);
    phys::write32(entry + MSIX_VECTOR_CONTROL, 0);
    bdf.write16(cap + 2, (ctl | MSIX_ENABLE) & !MSIX_FUNCTION_MASK);
    Ok(Msix {
        bdf,
        cap,
        entry,
        pba,
    })
}

/// One vector (MME 0) to the LAPIC, unmasked.
fn enable_msi(f: &Function, cap: u8, lapic: &Lapic) {
    let bdf = f.bdf;
    let ctl = bdf.read16(cap + 2);
    let addr = lapic.msi_address();
    bdf.write32(cap + 4, addr as u32);
    let (data, mask) = if ctl & MSI_64BIT != 0 {
        bdf.write32(cap + 8, (addr >> 32) as u32);
        (cap + 0xc, cap + 0x10)
    } else {
        (cap + 8, cap + 0xc)
    };
    bdf.write16(data, DEVICE_VECTOR as u16);
    if ctl & MSI_PER_VECTOR_MASK != 0 {
        bdf.write32(mask, 0);
    }
    bdf.write16(cap + 2, (ctl & !MSI_MME) | MSI_ENABLE);
}

impl Epf {
    fn write(&self, r: u64, v: u32) {
        phys::write32(self.regs + r, v);
    }

    fn read(&self, r: u64) -> u32 {
        phys::read32(self.regs + r)
    }

    /// Where its MSI-X state is, if it was set up with MSI-X.
    pub fn msix(&self) -> Option<Msix> {
        self.msix
    }

    /// Has the device raise its interrupt (MSI-X/MSI number 1) with no transfer; returns
    /// STATUS, which has IRQ_RAISED once the device sent it.
    pub fn raise(&self) -> u32 {
        self.write(reg::STATUS, 0);
        let cmd = match self.msix {
            Some(_) => command::RAISE_MSIX_IRQ,
            None => command::RAISE_MSI_IRQ,
        };
        self.write(reg::COMMAND, cmd);
        self.read(reg::STATUS)
    }

    /// The CHECKSUM register (WRITE's result).
    pub fn checksum(&self) -> u32 {
        self.read(reg::CHECKSUM)
    }

    /// Runs `cmd` over `size` bytes and waits for its interrupt. `Ok(STATUS)` once the
    /// interrupt came, `Err(STATUS)` if it never did.
    pub fn transfer(
        &self,
        cmd: u32,
        src: u64,
        dst: u64,
        size: u32,
        checksum: u32,
    ) -> Result<u32, u32> {
        self.write(reg::STATUS, 0);
        self.write(reg::SRC_ADDR_LO, src as u32);
        self.write(reg::SRC_ADDR_HI, (src >> 32) as u32);
        self.write(reg::DST_ADDR_LO, dst as u32);
        self.write(reg::DST_ADDR_HI, (dst >> 32) as u32);
        self.write(reg::SIZE, size);
        self.write(reg::CHECKSUM, checksum);
        let seen = apic::irq_count();
        self.write(reg::COMMAND, cmd);
        let came = apic::wait_irq(seen, IRQ_SPINS);
        let status = self.read(reg::STATUS);
        if came {
            Ok(status)
        } else {
            Err(status)
        }
    }
}
