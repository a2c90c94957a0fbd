//! ACPI tables, so a guest learns the CPUs, the interrupt controllers, the PCI host bridge and
//! its ECAM window (MCFG) without a firmware: RSDP (revision 2) -> XSDT -> FADT (-> DSDT),
//! MADT, MCFG, and with a guest NUMA topology SRAT and SLIT ([`numa`]). Written at [`ACPI_START`] in the E820-reserved BIOS area, the RSDP first,
//! where Linux scans for it; both boot protocols also pass its address. The `acpi_tables`
//! crate encodes them ([`tables`], [`dsdt`]); this module places them and writes them.
//!
//! The platform is described as ACPI "hardware-reduced": there is no PM1 block, PM timer,
//! SCI or FACS to emulate, which a classic FADT would promise (Firecracker and Cloud
//! Hypervisor do the same). Because the OS then enumerates PCI and the legacy serial port
//! through the namespace rather than by probing, the DSDT declares the PCI host bridge and
//! COM1.
//!
//! The MADT's ISA interrupts are identity-mapped (no source override), as in the MP table and
//! in the VMM's GSI routing, where GSI 0 (the PIT) reaches IOAPIC pin 0.

mod dsdt;
mod numa;
mod tables;

use acpi_tables::rsdp::Rsdp;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use super::mptable::{PciIntx, MAX_CPUS};
use crate::memory::layout::{ACPI_END, ACPI_RSDP_ADDR, ACPI_START};
use crate::memory::MemoryLayout;
use tables::{oem_table_id, OEM_ID};

pub use numa::{GuestNuma, GuestNumaDesc, NumaError};

/// ACPI table errors.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables: {0} CPUs requested, supported 1..={MAX_CPUS}")]
    CpuCount(u8),
    #[error("ACPI tables: {len} bytes do not fit {ACPI_START:#x}..{ACPI_END:#x}")]
    TooBig { len: usize },
    #[error(transparent)]
    Numa(#[from] NumaError),
    #[error("ACPI tables: writing {len} bytes at {addr:#x} failed: {source}")]
    Write {
        addr: u64,
        len: usize,
        source: GuestMemoryError,
    },
}

/// Where each table went (guest-physical addresses), for tests and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiTables {
    /// Everything from [`ACPI_START`] on, as written.
    pub bytes: Vec<u8>,
    /// The RSDP.
    pub rsdp: u64,
    /// The XSDT.
    pub xsdt: u64,
    /// The FADT.
    pub fadt: u64,
    /// The DSDT.
    pub dsdt: u64,
    /// The MADT.
    pub madt: u64,
    /// The MCFG.
    pub mcfg: u64,
    /// The SRAT, with a NUMA topology.
    pub srat: Option<u64>,
    /// The SLIT, with a NUMA topology.
    pub slit: Option<u64>,
}

/// The table area as it fills from [`ACPI_START`]: the RSDP first, then each table 16-byte
/// aligned after the one before.
struct Area {
    bytes: Vec<u8>,
}

// The RSDP goes first, where both boot protocols say it is.
const _: () = assert!(ACPI_RSDP_ADDR == ACPI_START);

impl Area {
    fn new() -> Self {
        Area {
            bytes: vec![0; Rsdp::len()],
        }
    }

    /// Appends `table`; returns its guest address.
    fn place(&mut self, table: &dyn Aml) -> u64 {
        self.bytes.resize(self.bytes.len().next_multiple_of(16), 0);
        let addr = ACPI_START + self.bytes.len() as u64;
        table.to_aml_bytes(&mut self.bytes);
        addr
    }

    /// Puts the RSDP, pointing at `xsdt`, in the room kept for it.
    fn finish(mut self, xsdt: u64) -> Vec<u8> {
        let rsdp = tables::bytes(&Rsdp::new(OEM_ID, xsdt));
        self.bytes[..rsdp.len()].copy_from_slice(&rsdp);
        self.bytes
    }
}

fn xsdt(entries: &[u64]) -> XSDT {
    let mut xsdt = XSDT::new(OEM_ID, oem_table_id(b"XSDT"), 1);
    for &entry in entries {
        xsdt.add_entry(entry);
    }
    xsdt
}

/// Builds every table for `cpus` CPUs, the 64-bit PCI window of `layout`, the INTx lines
/// in `intx` and, when given, the guest NUMA topology `numa`, laid out from [`ACPI_START`].
pub fn build(
    cpus: u8,
    layout: &MemoryLayout,
    intx: &[PciIntx],
    numa: Option<&GuestNuma>,
) -> Result<AcpiTables, AcpiError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(AcpiError::CpuCount(cpus));
    }
    if let Some(numa) = numa {
        numa.check(cpus)?;
    }
    let mut area = Area::new();
    let dsdt = area.place(&dsdt::dsdt(layout, intx));
    // The tables the XSDT lists; it follows them, so that it is built knowing where they
    // went, and the RSDP, first, points at it.
    let fadt = area.place(&tables::fadt(dsdt));
    let madt = area.place(&tables::madt(cpus));
    let mcfg = area.place(&tables::mcfg());
    let mut listed = vec![fadt, madt, mcfg];
    let (srat, slit) = match numa {
        Some(numa) => {
            let srat = area.place(&numa::srat(numa));
            let slit = area.place(&numa::slit(numa));
            listed.extend([srat, slit]);
            (Some(srat), Some(slit))
        }
        None => (None, None),
    };
    let xsdt = area.place(&xsdt(&listed));
    let bytes = area.finish(xsdt);
    if ACPI_START + bytes.len() as u64 > ACPI_END {
        return Err(AcpiError::TooBig { len: bytes.len() });
    }
    Ok(AcpiTables {
        bytes,
        rsdp: ACPI_RSDP_ADDR,
        xsdt,
        fadt,
        dsdt,
        madt,
        mcfg,
        srat,
        slit,
    })
}

/// Builds the tables and writes them into guest memory.
pub fn write(
    mem: &GuestMemoryMmap,
    cpus: u8,
    layout: &MemoryLayout,
    intx: &[PciIntx],
    numa: Option<&GuestNuma>,
) -> Result<AcpiTables, AcpiError> {
    let tables = build(cpus, layout, intx, numa)?;
    mem.write_slice(&tables.bytes, GuestAddress(ACPI_START))
        .map_err(|source| AcpiError::Write {
            addr: ACPI_START,
            len: tables.bytes.len(),
            source,
        })?;
    Ok(tables)
}

#[cfg(test)]
mod tests;
