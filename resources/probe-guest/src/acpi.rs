//! ACPI, just far enough to find PCI ECAM and the NUMA tables: the RSDP the boot protocol
//! passed, its XSDT (or RSDT for revision 0), a table by signature among its entries (MCFG
//! here, SRAT and SLIT for numa.rs). Then every function enumeration
//! listed is read again through ECAM and must show the same vendor/device as through 0xcf8,
//! and one extended-space dword (0x100) is read, which mechanism #1 cannot reach.
//!
//! Only the RSDP, the root table and the tables looked for are checksummed: a few hundred
//! bytes.

use crate::console::Line;
use crate::io::phys;
use crate::pci::{self, Bdf};

const RSDP_SIGNATURE: u64 = u64::from_le_bytes(*b"RSD PTR ");
const XSDT: u32 = u32::from_le_bytes(*b"XSDT");
const RSDT: u32 = u32::from_le_bytes(*b"RSDT");
const MCFG: u32 = u32::from_le_bytes(*b"MCFG");
/// The common table header's length.
pub const HEADER: u64 = 36;
/// MCFG: header, 8 reserved bytes, then 16-byte allocations.
const MCFG_FIRST: u64 = HEADER + 8;
const MCFG_ENTRY: u64 = 16;
/// Tables larger than this are not believed (ours are well under 4 KiB).
const MAX_TABLE: u64 = 1 << 16;
/// Root table entries looked at.
const MAX_ENTRIES: u64 = 64;
/// The extended-space register read through ECAM.
const EXTENDED_REG: u64 = 0x100;

/// A bus-0 ECAM window from MCFG.
pub struct Ecam {
    pub base: u64,
    pub first_bus: u8,
    pub last_bus: u8,
}

impl Ecam {
    fn addr(&self, bdf: Bdf, reg: u64) -> u64 {
        self.base + ((bdf.dev as u64 & 0x1f) << 15 | (bdf.func as u64 & 7) << 12 | reg)
    }
}

/// What went wrong, for `check failed:`.
#[derive(Clone, Copy)]
pub enum Error {
    /// ECAM and 0xcf8 disagree on a function's vendor/device.
    Mismatch { bdf: Bdf, ecam: u32, port: u32 },
    /// MCFG's window does not cover bus 0 inside the mapped space.
    Unusable(u64),
}

impl Error {
    pub fn describe(self, line: Line) -> Line {
        match self {
            Error::Mismatch { bdf, ecam, port } => bdf
                .print(line.s("ecam "))
                .s(" vendor/device ")
                .hex(ecam as u64)
                .s(", via 0xcf8 ")
                .hex(port as u64),
            Error::Unusable(base) => line
                .s("ecam window at ")
                .hex(base)
                .s(" does not start at bus 0 in mapped memory"),
        }
    }
}

fn checksum_ok(start: u64, len: u64) -> bool {
    let mut sum = 0u8;
    for i in 0..len {
        sum = sum.wrapping_add(phys::u8(start + i));
    }
    sum == 0
}

/// The length of the table at `addr` when it is mapped, has `signature` and sums to 0.
fn table(addr: u64, signature: u32, mapped: u64) -> Option<u64> {
    if addr == 0 || addr.saturating_add(HEADER) > mapped || phys::u32(addr) != signature {
        return None;
    }
    let len = phys::u32(addr + 4) as u64;
    let fits = (HEADER..=MAX_TABLE).contains(&len) && addr + len <= mapped;
    (fits && checksum_ok(addr, len)).then_some(len)
}

/// Where the search stopped.
pub enum Found {
    Ecam(Ecam),
    /// The boot protocol gave no (valid) RSDP.
    NoRsdp,
    /// No MCFG, or none with a segment 0 allocation.
    NoMcfg,
}

/// Calls `found` with the address and length of each valid table with `signature` that the
/// root table of `rsdp` lists, until it returns something. `Err` when there is no valid RSDP.
pub fn find_table<T>(
    rsdp: u64,
    mapped: u64,
    signature: u32,
    mut found: impl FnMut(u64, u64) -> Option<T>,
) -> Result<Option<T>, ()> {
    let valid = rsdp != 0
        && rsdp.saturating_add(36) <= mapped
        && phys::u64(rsdp) == RSDP_SIGNATURE
        && checksum_ok(rsdp, 20);
    if !valid {
        return Err(());
    }
    let xsdt = phys::u64(rsdp + 24);
    let (root, root_signature, entry) = if phys::u8(rsdp + 15) >= 2 && xsdt != 0 {
        (xsdt, XSDT, 8)
    } else {
        (phys::u32(rsdp + 16) as u64, RSDT, 4)
    };
    let Some(len) = table(root, root_signature, mapped) else {
        return Ok(None);
    };
    for i in 0..((len - HEADER) / entry).min(MAX_ENTRIES) {
        let at = root + HEADER + i * entry;
        let addr = if entry == 8 {
            phys::u64(at)
        } else {
            phys::u32(at) as u64
        };
        if let Some(t) = table(addr, signature, mapped).and_then(|len| found(addr, len)) {
            return Ok(Some(t));
        }
    }
    Ok(None)
}

/// Follows `rsdp` to the first segment 0 allocation of MCFG.
pub fn find_ecam(rsdp: u64, mapped: u64) -> Found {
    let ecam = find_table(rsdp, mapped, MCFG, |addr, len| {
        let mut e = addr + MCFG_FIRST;
        while e + MCFG_ENTRY <= addr + len {
            if phys::u16(e + 8) == 0 {
                return Some(Ecam {
                    base: phys::u64(e),
                    first_bus: phys::u8(e + 10),
                    last_bus: phys::u8(e + 11),
                });
            }
            e += MCFG_ENTRY;
        }
        None
    });
    match ecam {
        Err(()) => Found::NoRsdp,
        Ok(None) => Found::NoMcfg,
        Ok(Some(e)) => Found::Ecam(e),
    }
}

/// Prints the `ecam` line; with a window, checks every function `bus` listed through it and
/// reads one extended-space dword.
pub fn check(rsdp: u64, mapped: u64, bus: &pci::Bus) -> Result<(), Error> {
    let ecam = match find_ecam(rsdp, mapped) {
        Found::Ecam(e) => e,
        Found::NoRsdp => {
            Line::new().s("ecam none (no rsdp)").end();
            return Ok(());
        }
        Found::NoMcfg => {
            Line::new().s("ecam none (no mcfg)").end();
            return Ok(());
        }
    };
    Line::new()
        .s("ecam ")
        .hex(ecam.base)
        .s(" buses ")
        .dec(ecam.first_bus as u64)
        .s("-")
        .dec(ecam.last_bus as u64)
        .s(" (mcfg)")
        .end();
    if ecam.first_bus != 0 || ecam.base.saturating_add(1 << 20) > mapped {
        return Err(Error::Unusable(ecam.base));
    }
    let mut last = None;
    for &(bdf, port) in bus.listed() {
        let id = phys::read32(ecam.addr(bdf, 0));
        if id != port {
            return Err(Error::Mismatch {
                bdf,
                ecam: id,
                port,
            });
        }
        last = Some(bdf);
    }
    // Any value will do (all ones if the function has no extended space): it must not fault.
    if let Some(bdf) = last {
        phys::read32(ecam.addr(bdf, EXTENDED_REG));
    }
    Ok(())
}
