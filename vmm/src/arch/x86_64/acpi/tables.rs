//! The static tables (FADT, MADT, MCFG) and the header every table of this VMM carries, built
//! with the `acpi_tables` crate. A new table is one more function (here, or in a module of
//! its own as the NUMA ones in `numa`) that returns something `acpi_tables::Aml`, placed and
//! listed by `acpi::build`.
//!
//! Layouts: ACPI 6.5 sections 5.2.9 (FADT) and 5.2.12 (MADT); MCFG is from the PCI Firmware
//! Specification 3.3, 4.1.2.

use acpi_tables::fadt::{FADTBuilder, Flags, FADT};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::mcfg::MCFG;
use acpi_tables::sdt::Sdt;
use acpi_tables::Aml;

use crate::memory::layout::{IOAPIC_ADDR, LAPIC_ADDR, PCI_ECAM_SIZE, PCI_ECAM_START};

/// The OEM ID of every table and of the RSDP.
pub const OEM_ID: [u8; 6] = *b"RSTVMM";
/// The OEM revision of every table.
pub const OEM_REVISION: u32 = 1;
/// Length of the common table header (ACPI 6.5, 5.2.6).
pub const HEADER_LEN: usize = 36;

/// FADT IA-PC boot flags: no VGA, OSPM must not enable ASPM, no CMOS RTC. Bit 0 (legacy
/// devices) and bit 1 (8042) stay clear: the i8042 here is only a reset line. (acpi_tables
/// names the FADT flags but not these.)
pub const FADT_BOOT_NO_VGA: u16 = 1 << 2;
pub const FADT_BOOT_NO_ASPM: u16 = 1 << 4;
pub const FADT_BOOT_NO_CMOS_RTC: u16 = 1 << 5;

/// MADT revision of ACPI 6.5.
const MADT_REVISION: u8 = 5;
/// MADT flag: the PC has dual 8259s (which the OS masks when it uses the IOAPIC).
pub const MADT_PCAT_COMPAT: u32 = 1;
/// MADT structure type of a Local APIC NMI.
pub const MADT_LAPIC_NMI: u8 = 4;
/// Processor UID that means "all processors".
pub const ALL_PROCESSORS: u8 = 0xff;

/// First bus and last bus the ECAM window decodes.
pub const ECAM_BUSES: (u8, u8) = (0, ((PCI_ECAM_SIZE >> 20) - 1) as u8);

/// The OEM table ID: "VMM " and the signature, so each table's is distinct.
pub fn oem_table_id(signature: &[u8; 4]) -> [u8; 8] {
    let mut id = *b"VMM     ";
    id[4..].copy_from_slice(signature);
    id
}

/// An empty table with this VMM's header, for the tables built from bytes.
pub fn sdt(signature: &[u8; 4], revision: u8) -> Sdt {
    Sdt::new(
        *signature,
        HEADER_LEN as u32,
        revision,
        OEM_ID,
        oem_table_id(signature),
        OEM_REVISION,
    )
}

/// What `item` serialises to.
pub fn bytes(item: &dyn Aml) -> Vec<u8> {
    let mut out = Vec::new();
    item.to_aml_bytes(&mut out);
    out
}

/// A hardware-reduced FADT (no PM1 block, PM timer, SCI or FACS) pointing at the DSDT.
pub fn fadt(dsdt: u64) -> FADT {
    let mut fadt =
        FADTBuilder::new(OEM_ID, oem_table_id(b"FACP"), OEM_REVISION).flag(Flags::HwReducedAcpi);
    // Both DSDT pointers, equal (the crate's setters keep only one): OSPM takes X_DSDT when
    // it is set, older ones read the 32-bit field; the tables sit below 1 MiB.
    fadt.dsdt = (dsdt as u32).into();
    fadt.x_dsdt = dsdt.into();
    fadt.iapc_boot_arch = (FADT_BOOT_NO_VGA | FADT_BOOT_NO_ASPM | FADT_BOOT_NO_CMOS_RTC).into();
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"RUSTVMM\0").into();
    fadt.finalize()
}

/// One enabled Local APIC per CPU (processor UID = APIC ID = vCPU index), the IOAPIC with
/// the next ID (as in the MP table) and GSIs from 0, and NMI on LINT1 of every CPU.
///
/// Built on the generic `Sdt` from the crate's LAPIC and IOAPIC structures, not on its `MADT`:
/// that one fixes revision 1 and flags 0 (no PCAT_COMPAT), and the crate has no x86 Local
/// APIC NMI structure (ACPI 6.5, 5.2.12.7), so that entry is written here.
pub fn madt(cpus: u8) -> Sdt {
    let mut body = Vec::new();
    body.extend_from_slice(&(LAPIC_ADDR as u32).to_le_bytes());
    body.extend_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    for id in 0..cpus {
        ProcessorLocalApic::new(id, id, EnabledStatus::Enabled).to_aml_bytes(&mut body);
    }
    IoApic::new(cpus, IOAPIC_ADDR as u32, 0).to_aml_bytes(&mut body);
    // Type, length, all processors, flags 0 (conforms to the bus), LINT1.
    body.extend_from_slice(&[MADT_LAPIC_NMI, 6, ALL_PROCESSORS, 0, 0, 1]);
    let mut table = sdt(b"APIC", MADT_REVISION);
    table.append_slice(&body);
    table
}

/// The ECAM window of segment 0.
pub fn mcfg() -> MCFG {
    let mut mcfg = MCFG::new(OEM_ID, oem_table_id(b"MCFG"), OEM_REVISION);
    mcfg.add_ecam(PCI_ECAM_START, 0, ECAM_BUSES.0, ECAM_BUSES.1);
    mcfg
}
