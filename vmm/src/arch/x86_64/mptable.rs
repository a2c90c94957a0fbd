//! Intel MultiProcessor Specification 1.4 tables, written into the EBDA so a guest without ACPI
//! (Linux scans the last KiB of base memory, 0x9fc00) learns how many CPUs there are and how
//! the ISA interrupts reach the IOAPIC.
//!
//! Laid out by hand, byte by byte, from the spec's tables 4-1 (floating pointer), 4-2 (header)
//! and 4-3..4-9 (entries).

use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use crate::memory::layout::{EBDA_START, HIMEM_START, IOAPIC_ADDR, LAPIC_ADDR};

/// Where the floating pointer structure goes.
pub const MPTABLE_START: u64 = EBDA_START;
/// Most CPUs described: APIC ids 0..cpus and the IOAPIC id (= cpus) must fit in 8 bits below
/// the broadcast id 0xff.
pub const MAX_CPUS: u8 = 254;

const FLOATING_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const PROCESSOR_LEN: usize = 20;
const ENTRY_LEN: usize = 8;
const ISA_IRQS: u8 = 16;

const SPEC_REV: u8 = 4;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INT: u8 = 3;
const ENTRY_LOCAL_INT: u8 = 4;

const CPU_ENABLED: u8 = 1 << 0;
const CPU_BOOTSTRAP: u8 = 1 << 1;
// An integrated (not 82489DX) local APIC: version >= 0x10.
const LAPIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const IOAPIC_ENABLED: u8 = 1;
// Family 6 and the FPU + APIC feature bits: only informational for the guest.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const ISA_BUS_ID: u8 = 0;
const ALL_LAPICS: u8 = 0xff;

/// MP table errors.
#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    #[error("MP table: {0} CPUs requested, supported 1..={MAX_CPUS}")]
    CpuCount(u8),
    #[error("MP table: writing {len} bytes at {addr:#x} failed: {source}")]
    Write {
        addr: u64,
        len: usize,
        source: GuestMemoryError,
    },
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |s, b| s.wrapping_add(*b))
        .wrapping_neg()
}

fn int_entry(kind: u8, irq_type: u8, src_irq: u8, dst_id: u8, dst_pin: u8) -> [u8; ENTRY_LEN] {
    // flags (2 bytes) 0: polarity and trigger "conform to the bus" (ISA: active high, edge).
    [kind, irq_type, 0, 0, ISA_BUS_ID, src_irq, dst_id, dst_pin]
}

/// PCI bus 0 in the MP table (bus IDs are the table's own numbering).
const PCI_BUS_ID: u8 = 1;
/// I/O interrupt flags: active low (polarity 0b11), level triggered (trigger 0b11 << 2).
const PCI_INTX_FLAGS: u8 = 0x0f;

/// A PCI function's INTx line wired to an IOAPIC pin (level-triggered, active low).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciIntx {
    /// Device number on bus 0.
    pub slot: u8,
    /// Interrupt pin, 1 = INTA .. 4 = INTD.
    pub pin: u8,
    /// IOAPIC pin (= GSI).
    pub gsi: u8,
}

/// The floating pointer followed by the configuration table, for `cpus` CPUs, as placed at
/// [`MPTABLE_START`].
pub fn build(cpus: u8, intx: &[PciIntx]) -> Result<Vec<u8>, MpTableError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(MpTableError::CpuCount(cpus));
    }
    let ioapic_id = cpus;
    let config_addr = MPTABLE_START + FLOATING_LEN as u64;

    let mut entries: Vec<u8> = Vec::new();
    for id in 0..cpus {
        let mut p = [0u8; PROCESSOR_LEN];
        p[0] = ENTRY_PROCESSOR;
        p[1] = id;
        p[2] = LAPIC_VERSION;
        p[3] = CPU_ENABLED | if id == 0 { CPU_BOOTSTRAP } else { 0 };
        p[4..8].copy_from_slice(&CPU_SIGNATURE.to_le_bytes());
        p[8..12].copy_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&p);
    }
    let mut bus = [0u8; ENTRY_LEN];
    bus[0] = ENTRY_BUS;
    bus[1] = ISA_BUS_ID;
    bus[2..8].copy_from_slice(b"ISA   ");
    entries.extend_from_slice(&bus);
    bus[1] = PCI_BUS_ID;
    bus[2..8].copy_from_slice(b"PCI   ");
    entries.extend_from_slice(&bus);

    let mut ioapic = [
        ENTRY_IOAPIC,
        ioapic_id,
        IOAPIC_VERSION,
        IOAPIC_ENABLED,
        0,
        0,
        0,
        0,
    ];
    ioapic[4..8].copy_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    entries.extend_from_slice(&ioapic);

    // ISA IRQ n -> IOAPIC pin n: KVM's default GSI routing wires them the same way.
    for irq in 0..ISA_IRQS {
        entries.extend_from_slice(&int_entry(ENTRY_IO_INT, INT_TYPE_INT, irq, ioapic_id, irq));
    }
    // Virtual wire mode: the PIC through LINT0 of the BSP, NMI to LINT1 of every CPU.
    entries.extend_from_slice(&int_entry(ENTRY_LOCAL_INT, INT_TYPE_EXTINT, 0, 0, 0));
    entries.extend_from_slice(&int_entry(ENTRY_LOCAL_INT, INT_TYPE_NMI, 0, ALL_LAPICS, 1));
    // PCI INTx: source IRQ is device << 2 | (pin - 1), as the MP spec encodes PCI lines.
    for i in intx {
        let src = (i.slot & 0x1f) << 2 | (i.pin.clamp(1, 4) - 1);
        entries.extend_from_slice(&[
            ENTRY_IO_INT,
            INT_TYPE_INT,
            PCI_INTX_FLAGS,
            0,
            PCI_BUS_ID,
            src,
            ioapic_id,
            i.gsi,
        ]);
    }
    let entry_count = u16::from(cpus) + 2 + 1 + u16::from(ISA_IRQS) + 2 + intx.len() as u16;

    let mut header = [0u8; HEADER_LEN];
    header[0..4].copy_from_slice(b"PCMP");
    let base_len = (HEADER_LEN + entries.len()) as u16;
    header[4..6].copy_from_slice(&base_len.to_le_bytes());
    header[6] = SPEC_REV;
    // [7] checksum, filled below.
    header[8..16].copy_from_slice(b"RUSTVMM ");
    header[16..28].copy_from_slice(b"PROBE VMM   ");
    // [28..32] OEM table pointer and [32..34] its size: none.
    header[34..36].copy_from_slice(&entry_count.to_le_bytes());
    header[36..40].copy_from_slice(&(LAPIC_ADDR as u32).to_le_bytes());
    // [40..42] extended table length, [42] its checksum, [43] reserved: no extended table.
    let mut config = header.to_vec();
    config.extend_from_slice(&entries);
    config[7] = checksum(&config);

    let mut floating = [0u8; FLOATING_LEN];
    floating[0..4].copy_from_slice(b"_MP_");
    floating[4..8].copy_from_slice(&(config_addr as u32).to_le_bytes());
    floating[8] = 1; // length in 16-byte units
    floating[9] = SPEC_REV;
    // [11] feature 1 = 0: a configuration table is present (no default configuration).
    // [12] feature 2 bit 7 = 0: no IMCR, virtual wire mode.
    floating[10] = checksum(&floating);

    let mut out = floating.to_vec();
    out.extend_from_slice(&config);
    Ok(out)
}

/// Writes the tables for `cpus` CPUs into guest memory.
pub fn write(mem: &GuestMemoryMmap, cpus: u8, intx: &[PciIntx]) -> Result<(), MpTableError> {
    let bytes = build(cpus, intx)?;
    // With hundreds of CPUs the table grows past the EBDA into the reserved legacy area, which
    // is still guest RAM; it must stay below the kernel at 1 MiB.
    debug_assert!(MPTABLE_START + bytes.len() as u64 <= HIMEM_START);
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(|source| MpTableError::Write {
            addr: MPTABLE_START,
            len: bytes.len(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |s, x| s.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_pointers_are_valid() {
        for cpus in [1u8, 2, 4, 64, MAX_CPUS] {
            let t = build(cpus, &[]).unwrap();
            let (floating, config) = t.split_at(FLOATING_LEN);
            assert_eq!(&floating[0..4], b"_MP_");
            assert_eq!(sum(floating), 0, "floating pointer checksum, {cpus} CPUs");
            let ptr = u32::from_le_bytes(floating[4..8].try_into().unwrap()) as u64;
            assert_eq!(ptr, MPTABLE_START + 16);
            assert_eq!((floating[8], floating[9]), (1, 4));
            assert_eq!(&config[0..4], b"PCMP");
            let len = u16::from_le_bytes([config[4], config[5]]) as usize;
            assert_eq!(len, config.len());
            assert_eq!(sum(config), 0, "config table checksum, {cpus} CPUs");
            assert!(MPTABLE_START + t.len() as u64 <= HIMEM_START);
        }
    }

    #[test]
    fn entries_describe_cpus_ioapic_and_irqs() {
        let intx = PciIntx {
            slot: 1,
            pin: 1,
            gsi: 10,
        };
        let t = build(4, &[intx]).unwrap();
        let config = &t[FLOATING_LEN..];
        let count = u16::from_le_bytes([config[34], config[35]]);
        assert_eq!(count, 4 + 2 + 1 + 16 + 2 + 1);
        let mut buses = Vec::new();
        let mut pci_ints = Vec::new();
        let mut at = HEADER_LEN;
        let mut cpus = Vec::new();
        let mut io_ints = 0;
        let mut ioapic_id = None;
        let mut locals = Vec::new();
        for _ in 0..count {
            match config[at] {
                ENTRY_PROCESSOR => {
                    cpus.push((config[at + 1], config[at + 3]));
                    at += PROCESSOR_LEN;
                    continue;
                }
                ENTRY_BUS => buses.push((config[at + 1], config[at + 2..at + 8].to_vec())),
                ENTRY_IOAPIC => {
                    ioapic_id = Some(config[at + 1]);
                    assert_eq!(&config[at + 4..at + 8], &0xfec0_0000u32.to_le_bytes());
                }
                ENTRY_IO_INT if config[at + 4] == PCI_BUS_ID => {
                    pci_ints.push(config[at..at + ENTRY_LEN].to_vec());
                }
                ENTRY_IO_INT => {
                    assert_eq!(config[at + 5], config[at + 7], "ISA IRQ n on pin n");
                    assert_eq!(config[at + 6], 4, "routed to the IOAPIC");
                    io_ints += 1;
                }
                ENTRY_LOCAL_INT => locals.push((config[at + 1], config[at + 7])),
                t => panic!("unexpected entry type {t}"),
            }
            at += ENTRY_LEN;
        }
        assert_eq!(at, config.len());
        assert_eq!(
            cpus,
            vec![(0, 3), (1, 1), (2, 1), (3, 1)],
            "CPU 0 is the BSP"
        );
        assert_eq!(ioapic_id, Some(4));
        assert_eq!(io_ints, 16);
        assert_eq!(
            buses,
            vec![
                (ISA_BUS_ID, b"ISA   ".to_vec()),
                (PCI_BUS_ID, b"PCI   ".to_vec())
            ]
        );
        // 00:01.0 INTA (source 1 << 2 | 0), level/active low, to IOAPIC 4 pin 10.
        assert_eq!(
            pci_ints,
            vec![vec![
                ENTRY_IO_INT,
                INT_TYPE_INT,
                0x0f,
                0,
                PCI_BUS_ID,
                4,
                4,
                10
            ]]
        );
        assert_eq!(locals, vec![(INT_TYPE_EXTINT, 0), (INT_TYPE_NMI, 1)]);
    }

    #[test]
    fn cpu_count_is_checked() {
        assert!(matches!(build(0, &[]), Err(MpTableError::CpuCount(0))));
        assert!(matches!(build(255, &[]), Err(MpTableError::CpuCount(255))));
    }
}
