//! ACPI tables, so a guest learns the CPUs, the interrupt controllers, the PCI host bridge and
//! its ECAM window (MCFG) without a firmware: RSDP (revision 2) -> XSDT -> FADT (-> DSDT),
//! MADT, MCFG. Written at [`ACPI_START`] in the E820-reserved BIOS area, the RSDP first,
//! where Linux scans for it; both boot protocols also pass its address.
//!
//! The platform is described as ACPI "hardware-reduced": there is no PM1 block, PM timer,
//! SCI or FACS to emulate, which a classic FADT would promise (Firecracker and Cloud
//! Hypervisor do the same). Because the OS then enumerates PCI and the legacy serial port
//! through the namespace rather than by probing, the DSDT declares the PCI host bridge
//! (`\_SB.PCI0`: bus 0, its I/O and memory windows, a `_PRT` for INTx lines) and COM1.
//!
//! The MADT's ISA interrupts are identity-mapped (no source override), as in the MP table and
//! in the VMM's GSI routing, where GSI 0 (the PIT) reaches IOAPIC pin 0.
//!
//! Layouts follow the ACPI 6.5 specification, sections 5.2.5 (RSDP), 5.2.6 (header), 5.2.8
//! (XSDT), 5.2.9 (FADT), 5.2.12 (MADT) and 19.6 / 20 (resource descriptors, AML); MCFG is
//! from the PCI Firmware Specification 3.3, 4.1.2.

use devices::pci::bus::{CONFIG_IO_BASE, CONFIG_IO_LEN};
use guest_abi::ports;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use super::mptable::{PciIntx, MAX_CPUS};
use crate::memory::layout::{
    ACPI_END, ACPI_RSDP_ADDR, ACPI_START, IOAPIC_ADDR, LAPIC_ADDR, MMIO32_ALLOC_END, MMIO32_START,
    PCI_ECAM_SIZE, PCI_ECAM_START, PCI_IO_END, PCI_IO_START,
};
use crate::memory::MemoryLayout;

/// ACPI table errors.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables: {0} CPUs requested, supported 1..={MAX_CPUS}")]
    CpuCount(u8),
    #[error("ACPI tables: {len} bytes do not fit {ACPI_START:#x}..{ACPI_END:#x}")]
    TooBig { len: usize },
    #[error("ACPI tables: writing {len} bytes at {addr:#x} failed: {source}")]
    Write {
        addr: u64,
        len: usize,
        source: GuestMemoryError,
    },
}

const OEM_ID: &[u8; 6] = b"RSTVMM";
const CREATOR_ID: &[u8; 4] = b"RVMM";
const HEADER_LEN: usize = 36;
const RSDP_LEN: usize = 36;

/// FADT flag: hardware-reduced ACPI (no fixed hardware, no SCI, no FACS).
const FADT_HW_REDUCED_ACPI: u32 = 1 << 20;
/// FADT IA-PC boot flags: no VGA, OSPM must not enable ASPM, no CMOS RTC. Bit 0 (legacy
/// devices) and bit 1 (8042) stay clear: the i8042 here is only a reset line.
const FADT_BOOT_NO_VGA: u16 = 1 << 2;
const FADT_BOOT_NO_ASPM: u16 = 1 << 4;
const FADT_BOOT_NO_CMOS_RTC: u16 = 1 << 5;
const FADT_LEN: usize = 276;
const FADT_REVISION: u8 = 6;
const FADT_MINOR_REVISION: u8 = 5;

/// MADT flag: the PC has dual 8259s (which the OS masks when it uses the IOAPIC).
const MADT_PCAT_COMPAT: u32 = 1;
const MADT_LAPIC: u8 = 0;
const MADT_IOAPIC: u8 = 1;
const MADT_LAPIC_NMI: u8 = 4;
const MADT_ENABLED: u32 = 1;
/// Processor UID that means "all processors".
const ALL_PROCESSORS: u8 = 0xff;

/// First bus and last bus the ECAM window decodes.
pub const ECAM_BUSES: (u8, u8) = (0, ((PCI_ECAM_SIZE >> 20) - 1) as u8);

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
}

/// Adds `bytes` up, as ACPI checksums do.
pub fn byte_sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
}

/// A system description table: the 36-byte header (checksum filled in) and `body`.
fn sdt(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let len = (HEADER_LEN + body.len()) as u32;
    let mut t = Vec::with_capacity(len as usize);
    t.extend_from_slice(signature);
    t.extend_from_slice(&len.to_le_bytes());
    t.push(revision);
    t.push(0); // checksum
    t.extend_from_slice(OEM_ID);
    let mut table_id = *b"VMM     ";
    table_id[4..].copy_from_slice(signature);
    t.extend_from_slice(&table_id);
    t.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
    t.extend_from_slice(CREATOR_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // creator revision
    t.extend_from_slice(body);
    t[9] = byte_sum(&t).wrapping_neg();
    t
}

fn put(t: &mut [u8], at: usize, bytes: &[u8]) {
    t[at..at + bytes.len()].copy_from_slice(bytes);
}

fn rsdp(xsdt: u64) -> Vec<u8> {
    let mut r = vec![0u8; RSDP_LEN];
    put(&mut r, 0, b"RSD PTR ");
    put(&mut r, 9, OEM_ID);
    // Revision 2: ACPI 2.0+, with the XSDT. [16..20], the RSDT address, stays 0: the XSDT is
    // the root.
    r[15] = 2;
    put(&mut r, 20, &(RSDP_LEN as u32).to_le_bytes());
    put(&mut r, 24, &xsdt.to_le_bytes());
    r[8] = byte_sum(&r[..20]).wrapping_neg();
    r[32] = byte_sum(&r).wrapping_neg();
    r
}

fn xsdt(entries: &[u64]) -> Vec<u8> {
    let body: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
    sdt(b"XSDT", 1, &body)
}

fn fadt(dsdt: u64) -> Vec<u8> {
    let mut body = vec![0u8; FADT_LEN - HEADER_LEN];
    let mut field = |offset: usize, bytes: &[u8]| put(&mut body, offset - HEADER_LEN, bytes);
    // DSDT (32-bit, offset 40) and X_DSDT (64-bit, offset 140); the tables sit below 1 MiB.
    field(40, &(dsdt as u32).to_le_bytes());
    field(
        109,
        &(FADT_BOOT_NO_VGA | FADT_BOOT_NO_ASPM | FADT_BOOT_NO_CMOS_RTC).to_le_bytes(),
    );
    field(112, &FADT_HW_REDUCED_ACPI.to_le_bytes());
    field(131, &[FADT_MINOR_REVISION]);
    field(140, &dsdt.to_le_bytes());
    // Hypervisor vendor identity (offset 268).
    field(268, b"RUSTVMM\0");
    sdt(b"FACP", FADT_REVISION, &body)
}

fn madt(cpus: u8) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(LAPIC_ADDR as u32).to_le_bytes());
    body.extend_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    for id in 0..cpus {
        // Processor UID = APIC ID = vCPU index.
        body.extend_from_slice(&[MADT_LAPIC, 8, id, id]);
        body.extend_from_slice(&MADT_ENABLED.to_le_bytes());
    }
    // The IOAPIC's ID follows the CPUs', as in the MP table; GSIs from 0.
    body.extend_from_slice(&[MADT_IOAPIC, 12, cpus, 0]);
    body.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    // NMI on LINT1 of every CPU (flags 0: conforms to the bus), as in the MP table.
    body.extend_from_slice(&[MADT_LAPIC_NMI, 6, ALL_PROCESSORS, 0, 0, 1]);
    sdt(b"APIC", 5, &body)
}

fn mcfg() -> Vec<u8> {
    let mut body = vec![0u8; 8]; // reserved
    body.extend_from_slice(&PCI_ECAM_START.to_le_bytes());
    body.extend_from_slice(&0u16.to_le_bytes()); // PCI segment group
    body.extend_from_slice(&[ECAM_BUSES.0, ECAM_BUSES.1]);
    body.extend_from_slice(&0u32.to_le_bytes());
    sdt(b"MCFG", 1, &body)
}

/// AML, as much of it as the DSDT needs (ACPI 6.5 section 20.2).
mod aml {
    pub const ZERO: u8 = 0x00;
    pub const ONE: u8 = 0x01;
    const NAME_OP: u8 = 0x08;
    const BYTE_PREFIX: u8 = 0x0a;
    const WORD_PREFIX: u8 = 0x0b;
    const DWORD_PREFIX: u8 = 0x0c;
    const QWORD_PREFIX: u8 = 0x0e;
    const SCOPE_OP: u8 = 0x10;
    const BUFFER_OP: u8 = 0x11;
    const PACKAGE_OP: u8 = 0x12;
    const EXT_OP_PREFIX: u8 = 0x5b;
    const DEVICE_OP: u8 = 0x82;
    const ROOT_CHAR: u8 = b'\\';

    /// PkgLength: the length of `body` plus the encoding itself.
    pub fn pkg_length(body: usize) -> Vec<u8> {
        if body + 1 < 0x40 {
            return vec![(body + 1) as u8];
        }
        for extra in 1..=3usize {
            let total = body + 1 + extra;
            if total < 1 << (4 + 8 * extra) {
                let mut out = vec![(extra as u8) << 6 | (total & 0xf) as u8];
                out.extend((0..extra).map(|i| (total >> (4 + 8 * i)) as u8));
                return out;
            }
        }
        unreachable!("AML package of {body} bytes")
    }

    fn with_pkg_length(op: &[u8], body: Vec<u8>) -> Vec<u8> {
        let mut out = op.to_vec();
        out.extend(pkg_length(body.len()));
        out.extend(body);
        out
    }

    /// The smallest encoding of an integer.
    pub fn int(v: u64) -> Vec<u8> {
        match v {
            0 => vec![ZERO],
            1 => vec![ONE],
            2..=0xff => vec![BYTE_PREFIX, v as u8],
            0x100..=0xffff => [&[WORD_PREFIX][..], &(v as u16).to_le_bytes()].concat(),
            0x1_0000..=0xffff_ffff => [&[DWORD_PREFIX][..], &(v as u32).to_le_bytes()].concat(),
            _ => [&[QWORD_PREFIX][..], &v.to_le_bytes()].concat(),
        }
    }

    /// A compressed EISA ID ("PNP0A03") as the DWord ASL's `EisaId()` makes.
    pub fn eisa_id(id: &[u8; 7]) -> Vec<u8> {
        let letter = |b: u8| u32::from(b.wrapping_sub(b'@')) & 0x1f;
        let hex = |b: u8| (b as char).to_digit(16).unwrap_or(0);
        let v = letter(id[0]) << 26
            | letter(id[1]) << 21
            | letter(id[2]) << 16
            | hex(id[3]) << 12
            | hex(id[4]) << 8
            | hex(id[5]) << 4
            | hex(id[6]);
        [&[DWORD_PREFIX][..], &v.to_be_bytes()].concat()
    }

    /// `Name(name, value)`.
    pub fn name(name: &[u8; 4], value: Vec<u8>) -> Vec<u8> {
        [&[NAME_OP][..], name, &value].concat()
    }

    /// `Scope(\name) { body }`.
    pub fn root_scope(name: &[u8; 4], body: Vec<u8>) -> Vec<u8> {
        with_pkg_length(&[SCOPE_OP], [&[ROOT_CHAR][..], name, &body].concat())
    }

    /// `Device(name) { body }`.
    pub fn device(name: &[u8; 4], body: Vec<u8>) -> Vec<u8> {
        with_pkg_length(&[EXT_OP_PREFIX, DEVICE_OP], [&name[..], &body].concat())
    }

    /// `Buffer() { bytes }`.
    pub fn buffer(bytes: &[u8]) -> Vec<u8> {
        with_pkg_length(&[BUFFER_OP], [&int(bytes.len() as u64)[..], bytes].concat())
    }

    /// `Package() { elements }` (fewer than 256).
    pub fn package(elements: &[Vec<u8>]) -> Vec<u8> {
        let mut body = vec![elements.len() as u8];
        for e in elements {
            body.extend_from_slice(e);
        }
        with_pkg_length(&[PACKAGE_OP], body)
    }

    /// Resource descriptors for `ResourceTemplate()` (section 6.4).
    pub mod res {
        const PRODUCER_MIN_MAX_FIXED: u8 = 0x0c;

        /// `IO(Decode16, base, base, align, len)`.
        pub fn io(base: u16, align: u8, len: u8) -> Vec<u8> {
            let b = base.to_le_bytes();
            vec![0x47, 1, b[0], b[1], b[0], b[1], align, len]
        }

        /// `IRQNoFlags() { irq }`: edge triggered, active high.
        pub fn irq(irq: u8) -> Vec<u8> {
            [&[0x22][..], &(1u16 << irq).to_le_bytes()].concat()
        }

        /// `WordBusNumber` or `WordIO` (EntireRange) produced by a bridge: [min, max].
        pub fn word(kind: u8, min: u16, max: u16) -> Vec<u8> {
            let type_flags = if kind == 1 { 3 } else { 0 };
            let mut d = vec![0x88, 13, 0, kind, PRODUCER_MIN_MAX_FIXED, type_flags];
            for v in [0, min, max, 0, max - min + 1] {
                d.extend_from_slice(&v.to_le_bytes());
            }
            d
        }

        /// Bus numbers [min, max].
        pub fn bus_numbers(min: u8, max: u8) -> Vec<u8> {
            word(2, min.into(), max.into())
        }

        /// `DWordMemory(ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable,
        /// ReadWrite)` over [min, max].
        pub fn dword_memory(min: u32, max: u32) -> Vec<u8> {
            let mut d = vec![0x87, 23, 0, 0, PRODUCER_MIN_MAX_FIXED, 1];
            for v in [0, min, max, 0, max - min + 1] {
                d.extend_from_slice(&v.to_le_bytes());
            }
            d
        }

        /// `QWordMemory(...)` like [`dword_memory`].
        pub fn qword_memory(min: u64, max: u64) -> Vec<u8> {
            let mut d = vec![0x8a, 43, 0, 0, PRODUCER_MIN_MAX_FIXED, 1];
            for v in [0, min, max, 0, max - min + 1] {
                d.extend_from_slice(&v.to_le_bytes());
            }
            d
        }

        /// The end tag (checksum 0: "treat as correct").
        pub fn template(items: &[Vec<u8>]) -> Vec<u8> {
            let mut out: Vec<u8> = items.concat();
            out.extend_from_slice(&[0x79, 0]);
            out
        }
    }
}

fn dsdt(layout: &MemoryLayout, intx: &[PciIntx]) -> Vec<u8> {
    use aml::res;
    let window = layout.mmio64();
    let (mmio64, mmio64_size) = (window.start, window.size);
    let crs = res::template(&[
        res::bus_numbers(ECAM_BUSES.0, ECAM_BUSES.1),
        res::io(CONFIG_IO_BASE, 1, CONFIG_IO_LEN as u8),
        // All of port space but the configuration ports, as a PC host bridge decodes it; the
        // window I/O BARs are placed in is a range of its own, so the guest sees where.
        res::word(1, 0, CONFIG_IO_BASE - 1),
        res::word(1, CONFIG_IO_BASE + CONFIG_IO_LEN, PCI_IO_START as u16 - 1),
        res::word(1, PCI_IO_START as u16, (PCI_IO_END - 1) as u16),
        res::dword_memory(MMIO32_START as u32, (MMIO32_ALLOC_END - 1) as u32),
        res::qword_memory(mmio64.0, mmio64.0 + mmio64_size - 1),
    ]);
    // INTx: (device << 16 | 0xffff, pin 0..3, no link device, GSI).
    let prt: Vec<Vec<u8>> = intx
        .iter()
        .map(|i| {
            aml::package(&[
                aml::int(u64::from(i.slot) << 16 | 0xffff),
                aml::int(u64::from(i.pin.clamp(1, 4) - 1)),
                vec![aml::ZERO],
                aml::int(i.gsi.into()),
            ])
        })
        .collect();
    let pci0 = aml::device(
        b"PCI0",
        [
            aml::name(b"_HID", aml::eisa_id(b"PNP0A08")),
            aml::name(b"_CID", aml::eisa_id(b"PNP0A03")),
            aml::name(b"_SEG", vec![aml::ZERO]),
            aml::name(b"_BBN", vec![aml::ZERO]),
            aml::name(b"_UID", vec![aml::ZERO]),
            aml::name(b"_CRS", aml::buffer(&crs)),
            aml::name(b"_PRT", aml::package(&prt)),
        ]
        .concat(),
    );
    let com1_crs = res::template(&[
        res::io(ports::SERIAL_COM1, 1, ports::SERIAL_LEN as u8),
        res::irq(ports::SERIAL_IRQ as u8),
    ]);
    let com1 = aml::device(
        b"COM1",
        [
            aml::name(b"_HID", aml::eisa_id(b"PNP0501")),
            aml::name(b"_UID", vec![aml::ONE]),
            aml::name(b"_CRS", aml::buffer(&com1_crs)),
        ]
        .concat(),
    );
    // Revision 2: integers are 64 bits (the 64-bit window needs it).
    sdt(b"DSDT", 2, &aml::root_scope(b"_SB_", [pci0, com1].concat()))
}

/// Builds every table for `cpus` CPUs, the 64-bit PCI window of `layout` and the INTx lines
/// in `intx`, laid out from [`ACPI_START`].
pub fn build(cpus: u8, layout: &MemoryLayout, intx: &[PciIntx]) -> Result<AcpiTables, AcpiError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(AcpiError::CpuCount(cpus));
    }
    let mut bytes = Vec::new();
    // Appends `table` 16-byte aligned; returns its guest address.
    fn place(bytes: &mut Vec<u8>, table: &[u8]) -> u64 {
        bytes.resize(bytes.len().next_multiple_of(16), 0);
        let addr = ACPI_START + bytes.len() as u64;
        bytes.extend_from_slice(table);
        addr
    }
    // The RSDP needs the XSDT's address and the XSDT everyone else's: lay the others out
    // first, after room for both.
    let entries = 3;
    let xsdt_len = HEADER_LEN + 8 * entries;
    bytes.resize(RSDP_LEN.next_multiple_of(16) + xsdt_len, 0);
    let dsdt_addr = place(&mut bytes, &dsdt(layout, intx));
    let fadt_addr = place(&mut bytes, &fadt(dsdt_addr));
    let madt_addr = place(&mut bytes, &madt(cpus));
    let mcfg_addr = place(&mut bytes, &mcfg());
    let xsdt_at = RSDP_LEN.next_multiple_of(16);
    let xsdt_addr = ACPI_START + xsdt_at as u64;
    put(
        &mut bytes,
        xsdt_at,
        &xsdt(&[fadt_addr, madt_addr, mcfg_addr]),
    );
    put(&mut bytes, 0, &rsdp(xsdt_addr));
    if ACPI_START + bytes.len() as u64 > ACPI_END {
        return Err(AcpiError::TooBig { len: bytes.len() });
    }
    Ok(AcpiTables {
        bytes,
        rsdp: ACPI_RSDP_ADDR,
        xsdt: xsdt_addr,
        fadt: fadt_addr,
        dsdt: dsdt_addr,
        madt: madt_addr,
        mcfg: mcfg_addr,
    })
}

/// Builds the tables and writes them into guest memory.
pub fn write(
    mem: &GuestMemoryMmap,
    cpus: u8,
    layout: &MemoryLayout,
    intx: &[PciIntx],
) -> Result<AcpiTables, AcpiError> {
    let tables = build(cpus, layout, intx)?;
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
