//! The tables are read back the way a guest reads them: by following pointers, summing
//! checksums and walking MADT entries and `_CRS` descriptors, with the layouts of the spec
//! written out here rather than taken from the encoder.

use super::tables::{
    ALL_PROCESSORS, ECAM_BUSES, FADT_BOOT_NO_ASPM, FADT_BOOT_NO_CMOS_RTC, FADT_BOOT_NO_VGA,
    HEADER_LEN, MADT_LAPIC_NMI, MADT_PCAT_COMPAT, OEM_ID,
};
use super::*;
use crate::memory::layout::{
    E820Kind, RamRange, GIB, IOAPIC_ADDR, LAPIC_ADDR, MIB, MMIO32_ALLOC_END, MMIO32_START,
    PCI_ECAM_SIZE, PCI_ECAM_START, PCI_IO_END, PCI_IO_START,
};

const RSDP_LEN: usize = 36;
const FADT_LEN: usize = 276;
const FADT_HW_REDUCED_ACPI: u32 = 1 << 20;
const MADT_LAPIC: u8 = 0;
const MADT_IOAPIC: u8 = 1;
const MADT_ENABLED: u32 = 1;

fn byte_sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
}

fn at(t: &AcpiTables, addr: u64, len: usize) -> &[u8] {
    let off = (addr - ACPI_START) as usize;
    &t.bytes[off..off + len]
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

/// The whole table at `addr`, by its header's length.
fn table(t: &AcpiTables, addr: u64) -> &[u8] {
    let len = u32_at(at(t, addr, HEADER_LEN), 4) as usize;
    at(t, addr, len)
}

fn intx() -> Vec<PciIntx> {
    vec![PciIntx {
        slot: 1,
        pin: 1,
        gsi: 10,
    }]
}

#[test]
fn every_checksum_is_zero_and_the_rsdp_leads_to_every_table() {
    for cpus in [1u8, 2, 64, MAX_CPUS] {
        let t = build(cpus, &MemoryLayout::new(6 * GIB).unwrap(), &intx(), None).unwrap();
        assert_eq!(t.rsdp, ACPI_START);
        let rsdp = at(&t, t.rsdp, RSDP_LEN);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(byte_sum(&rsdp[..20]), 0, "RSDP v1 checksum");
        assert_eq!(byte_sum(rsdp), 0, "RSDP extended checksum");
        assert_eq!(&rsdp[9..15], OEM_ID);
        assert_eq!((rsdp[15], u32_at(rsdp, 20)), (2, 36));
        assert_eq!(u64_at(rsdp, 24), t.xsdt);

        let xsdt = table(&t, t.xsdt);
        assert_eq!(&xsdt[..4], b"XSDT");
        let entries: Vec<u64> = xsdt[HEADER_LEN..].chunks(8).map(|c| u64_at(c, 0)).collect();
        assert_eq!(entries, vec![t.fadt, t.madt, t.mcfg]);
        let mut ends = Vec::new();
        for (addr, sig) in [
            (t.xsdt, b"XSDT"),
            (t.fadt, b"FACP"),
            (t.dsdt, b"DSDT"),
            (t.madt, b"APIC"),
            (t.mcfg, b"MCFG"),
        ] {
            let tb = table(&t, addr);
            let name = String::from_utf8_lossy(sig);
            assert_eq!(&tb[..4], sig);
            assert_eq!(byte_sum(tb), 0, "{name} checksum");
            assert_eq!(&tb[10..16], OEM_ID);
            assert_eq!(
                &tb[16..24],
                &[&b"VMM "[..], sig].concat()[..],
                "{name} table id"
            );
            assert_eq!(addr % 16, 0, "{name} is 16-byte aligned");
            ends.push((addr, addr + tb.len() as u64));
        }
        // No two tables overlap, and none the RSDP.
        ends.push((t.rsdp, t.rsdp + RSDP_LEN as u64));
        ends.sort();
        assert!(ends.windows(2).all(|w| w[0].1 <= w[1].0), "{ends:x?}");
        assert_eq!(ACPI_START + t.bytes.len() as u64, ends.last().unwrap().1);

        let fadt = table(&t, t.fadt);
        assert_eq!(fadt.len(), FADT_LEN);
        assert_eq!((fadt[8], fadt[131]), (6, 5), "FADT revision 6.5");
        assert_eq!(u32_at(fadt, 40) as u64, t.dsdt);
        assert_eq!(u64_at(fadt, 140), t.dsdt);
        assert_eq!(
            u16_at(fadt, 109),
            FADT_BOOT_NO_VGA | FADT_BOOT_NO_ASPM | FADT_BOOT_NO_CMOS_RTC
        );
        assert_eq!(u32_at(fadt, 112), FADT_HW_REDUCED_ACPI);
        assert_eq!(&fadt[268..276], b"RUSTVMM\0");
    }
}

#[test]
fn madt_has_one_enabled_lapic_per_cpu_and_the_ioapic() {
    for cpus in [1u8, 2, 7, MAX_CPUS] {
        let t = build(cpus, &MemoryLayout::new(256 * MIB).unwrap(), &[], None).unwrap();
        let madt = table(&t, t.madt);
        assert_eq!(madt[8], 5, "MADT revision");
        assert_eq!(u32_at(madt, 36) as u64, LAPIC_ADDR);
        assert_eq!(u32_at(madt, 40), MADT_PCAT_COMPAT);
        let (mut lapics, mut ioapics, mut nmis) = (Vec::new(), Vec::new(), 0);
        let mut off = 44;
        while off < madt.len() {
            let (kind, len) = (madt[off], madt[off + 1] as usize);
            assert!(len >= 2, "entry at {off}");
            let e = &madt[off..off + len];
            match kind {
                MADT_LAPIC => {
                    assert_eq!(len, 8);
                    assert_eq!(u32_at(e, 4), MADT_ENABLED);
                    lapics.push((e[2], e[3]));
                }
                MADT_IOAPIC => {
                    assert_eq!(len, 12);
                    ioapics.push((e[2], u32_at(e, 4) as u64, u32_at(e, 8)));
                }
                MADT_LAPIC_NMI => {
                    assert_eq!(len, 6);
                    assert_eq!((e[2], u16_at(e, 3), e[5]), (ALL_PROCESSORS, 0, 1));
                    nmis += 1;
                }
                k => panic!("unexpected MADT entry {k}"),
            }
            off += len;
        }
        assert_eq!(off, madt.len());
        let want: Vec<(u8, u8)> = (0..cpus).map(|i| (i, i)).collect();
        assert_eq!(lapics, want);
        assert_eq!(ioapics, vec![(cpus, IOAPIC_ADDR, 0)]);
        assert_eq!(nmis, 1);
    }
}

#[test]
fn mcfg_describes_the_ecam_window() {
    let t = build(1, &MemoryLayout::new(256 * MIB).unwrap(), &[], None).unwrap();
    let mcfg = table(&t, t.mcfg);
    assert_eq!(mcfg.len(), HEADER_LEN + 8 + 16);
    assert_eq!(u64_at(mcfg, HEADER_LEN), 0, "reserved");
    let entry = &mcfg[HEADER_LEN + 8..];
    assert_eq!(u64_at(entry, 0), PCI_ECAM_START);
    assert_eq!(u16_at(entry, 8), 0, "segment 0");
    let (first, last) = (entry[10], entry[11]);
    assert_eq!((first, last), (0, 0));
    assert_eq!((first, last), ECAM_BUSES);
    assert_eq!(
        u64::from(last - first + 1) << 20,
        PCI_ECAM_SIZE,
        "buses x 1 MiB is the window"
    );
    assert_eq!(u32_at(entry, 12), 0, "reserved");
}

#[test]
fn tables_lie_in_reserved_memory_below_the_kernel() {
    for size in [64 * MIB, 6 * GIB] {
        let t = build(MAX_CPUS, &MemoryLayout::new(size).unwrap(), &intx(), None).unwrap();
        let (start, end) = (ACPI_START, ACPI_START + t.bytes.len() as u64);
        assert!(end <= ACPI_END && ACPI_END <= crate::memory::layout::KERNEL_START);
        assert!(
            MemoryLayout::new(size)
                .unwrap()
                .e820()
                .iter()
                .any(|e| e.kind == E820Kind::Reserved && e.addr <= start && end <= e.addr + e.size),
            "{start:#x}..{end:#x} is not E820 reserved"
        );
        // Clear of the MP table, even with every CPU.
        let mp = super::super::mptable::build(MAX_CPUS, &intx()).unwrap();
        assert!(super::super::mptable::MPTABLE_START + mp.len() as u64 <= start);
    }
}

/// A PkgLength at `b[0]`: (the length it encodes, the bytes it takes).
fn pkg_length(b: &[u8]) -> (usize, usize) {
    let extra = usize::from(b[0] >> 6);
    if extra == 0 {
        return (usize::from(b[0] & 0x3f), 1);
    }
    let len = (1..=extra).fold(usize::from(b[0] & 0xf), |len, i| {
        len | usize::from(b[i]) << (4 + 8 * (i - 1))
    });
    (len, 1 + extra)
}

/// A window of a host bridge `_CRS`, as an OS reads it from the descriptor.
#[derive(Debug, PartialEq, Eq)]
enum Window {
    /// Fixed I/O ports (`IO` descriptor): base, length.
    Io(u64, u64),
    /// Address space descriptor: resource type (0 memory, 1 I/O, 2 bus), [min, max], and
    /// whether it is a producer with fixed min and max.
    Range(u8, u64, u64, bool),
    /// `IRQNoFlags`: the IRQ mask.
    Irq(u16),
}

/// The descriptors of the `_CRS` buffer that follows the first `name` in `body`.
fn crs(body: &[u8], name: &[u8; 4]) -> Vec<Window> {
    let device = body.windows(4).position(|w| w == name).expect("the device");
    let at = device
        + body[device..]
            .windows(4)
            .position(|w| w == b"_CRS")
            .unwrap()
        + 4;
    assert_eq!(body[at], 0x11, "BufferOp");
    let (_, pkg) = pkg_length(&body[at + 1..]);
    let mut off = at + 1 + pkg;
    // BufferSize: a ByteConst or WordConst.
    let size = match body[off] {
        0x0a => (usize::from(body[off + 1]), 2),
        0x0b => (usize::from(u16_at(body, off + 1)), 3),
        p => panic!("buffer size prefix {p:#x}"),
    };
    off += size.1;
    let buf = &body[off..off + size.0];
    let (mut out, mut i) = (Vec::new(), 0);
    loop {
        let tag = buf[i];
        match tag {
            0x79 => {
                assert_eq!(i + 2, buf.len(), "end tag last");
                return out;
            }
            0x47 => {
                assert_eq!(u16_at(buf, i + 2), u16_at(buf, i + 4), "fixed base");
                out.push(Window::Io(u16_at(buf, i + 2).into(), buf[i + 7].into()));
                i += 8;
            }
            0x22 => {
                out.push(Window::Irq(u16_at(buf, i + 1)));
                i += 3;
            }
            0x87 | 0x88 | 0x8a => {
                let len = usize::from(u16_at(buf, i + 1));
                let d = &buf[i + 3..i + 3 + len];
                let (kind, flags) = (d[0], d[1]);
                let producer_fixed = flags == 0x0c;
                let field = |n: usize| match tag {
                    0x88 => u64::from(u16_at(d, 3 + 2 * n)),
                    0x87 => u64::from(u32_at(d, 3 + 4 * n)),
                    _ => u64_at(d, 3 + 8 * n),
                };
                // Granularity, min, max, translation, length.
                let (min, max) = (field(1), field(2));
                assert_eq!((field(3), field(4)), (0, max - min + 1), "{out:x?}");
                out.push(Window::Range(kind, min, max, producer_fixed));
                i += 3 + len;
            }
            t => panic!("descriptor {t:#x}"),
        }
    }
}

#[test]
fn dsdt_declares_the_pci_host_bridge_windows_and_com1() {
    let layout = MemoryLayout::new(6 * GIB).unwrap();
    let t = build(2, &layout, &intx(), None).unwrap();
    let dsdt = table(&t, t.dsdt);
    assert_eq!(dsdt[8], 2, "DSDT revision 2: 64-bit integers");
    let body = &dsdt[HEADER_LEN..];
    let has = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
    // Scope(\_SB_) whose PkgLength covers the whole body.
    assert_eq!(body[0], 0x10);
    let (scope_len, _) = pkg_length(&body[1..]);
    assert_eq!(scope_len, body.len() - 1);
    assert!(has(b"\\_SB_"));
    assert!(has(&[0x5b, 0x82]) && has(b"PCI0") && has(b"COM1"));
    // EisaId("PNP0A08"), ("PNP0A03") and ("PNP0501") as ASL compiles them.
    assert!(has(&[0x0c, 0x41, 0xd0, 0x0a, 0x08]));
    assert!(has(&[0x0c, 0x41, 0xd0, 0x0a, 0x03]));
    assert!(has(&[0x0c, 0x41, 0xd0, 0x05, 0x01]));

    let (io, mem) = (1, 0);
    let mmio64 = layout.mmio64();
    assert_eq!(mmio64.start.0, 7 * GIB, "the 64-bit window starts past RAM");
    assert_eq!(
        crs(body, b"PCI0"),
        vec![
            Window::Range(2, 0, u64::from(ECAM_BUSES.1), true),
            Window::Io(0xcf8, 8),
            // All ports but the configuration ones, the I/O BAR window its own range.
            Window::Range(io, 0, 0xcf7, true),
            Window::Range(io, 0xd00, PCI_IO_START - 1, true),
            Window::Range(io, PCI_IO_START, PCI_IO_END - 1, true),
            Window::Range(mem, MMIO32_START, MMIO32_ALLOC_END - 1, true),
            Window::Range(mem, mmio64.start.0, mmio64.end() - 1, true),
        ]
    );
    assert_eq!((PCI_IO_START, PCI_IO_END), (0xc000, 0x1_0000));
    assert_eq!(
        MMIO32_ALLOC_END, PCI_ECAM_START,
        "ends below the ECAM window"
    );
    assert_eq!(
        crs(body, b"COM1"),
        vec![Window::Io(0x3f8, 8), Window::Irq(1 << 4)]
    );
    // WordIO's type-specific flags: EntireRange; DWordMemory's: NonCacheable, ReadWrite.
    assert!(has(&[0x88, 13, 0, 1, 0x0c, 3]));
    assert!(has(&[0x87, 23, 0, 0, 0x0c, 1]));
    // _PRT: Package(4) { 0x1ffff, Zero, Zero, 10 }.
    assert!(has(&[
        0x12, 0x0b, 0x04, 0x0c, 0xff, 0xff, 0x01, 0x00, 0x00, 0x00, 0x0a, 0x0a
    ]));
}

#[test]
fn cpu_count_is_checked() {
    assert!(matches!(
        build(0, &MemoryLayout::new(64 * MIB).unwrap(), &[], None),
        Err(AcpiError::CpuCount(0))
    ));
    assert!(matches!(
        build(255, &MemoryLayout::new(64 * MIB).unwrap(), &[], None),
        Err(AcpiError::CpuCount(255))
    ));
}

#[test]
fn tables_land_in_guest_memory() {
    let mem = crate::loader::tests::guest_mem(64 * MIB);
    let t = write(&mem, 2, &MemoryLayout::new(64 * MIB).unwrap(), &[], None).unwrap();
    let mut sig = [0u8; 8];
    mem.read_slice(&mut sig, GuestAddress(ACPI_RSDP_ADDR))
        .unwrap();
    assert_eq!(&sig, b"RSD PTR ");
    let mut mcfg = [0u8; 4];
    mem.read_slice(&mut mcfg, GuestAddress(t.mcfg)).unwrap();
    assert_eq!(&mcfg, b"MCFG");
}

/// FNV-1a, to pin whole table areas in a few digits.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Without a NUMA description the tables are what they were before SRAT and SLIT existed,
/// byte for byte: the sums were taken on the code before them.
#[test]
fn without_numa_the_tables_are_unchanged() {
    for (cpus, size, len, sum) in [
        (1u8, 64 * MIB, 860, 0xc0ff_4df2_8efa_06b5),
        (2, 6 * GIB, 860, 0xf53e_a5c3_c3ca_b36d),
        (MAX_CPUS, 2 * GIB, 2876, 0x1678_055c_4144_da75),
    ] {
        let t = build(cpus, &MemoryLayout::new(size).unwrap(), &intx(), None).unwrap();
        assert_eq!((t.bytes.len(), fnv1a(&t.bytes)), (len, sum), "{cpus} cpus");
        assert_eq!((t.srat, t.slit), (None, None));
    }
}

const SRAT_LAPIC: u8 = 0;
const SRAT_MEMORY: u8 = 1;

fn node(domain: u32, apic_ids: &[u32], memory: &[(u64, u64)]) -> GuestNumaDesc {
    GuestNumaDesc {
        proximity_domain: domain,
        apic_ids: apic_ids.to_vec(),
        memory: memory
            .iter()
            .map(|&(start, end)| RamRange {
                start: GuestAddress(start),
                size: end - start,
            })
            .collect(),
    }
}

/// The SRAT's enabled structures as an OS reads them: (domain, APIC ID) per Local APIC
/// affinity and (domain, base, end) per memory affinity.
type Srat = (Vec<(u32, u8)>, Vec<(u32, u64, u64)>);

fn decode_srat(srat: &[u8]) -> Srat {
    assert_eq!(&srat[..4], b"SRAT");
    assert_eq!(srat[8], 3, "SRAT revision 3: 32-bit domains");
    assert_eq!(u32_at(srat, HEADER_LEN), 1, "reserved, 1");
    assert_eq!(u64_at(srat, HEADER_LEN + 4), 0, "reserved");
    let (mut cpus, mut mem) = (Vec::new(), Vec::new());
    let mut off = HEADER_LEN + 12;
    while off < srat.len() {
        let (kind, len) = (srat[off], srat[off + 1] as usize);
        let e = &srat[off..off + len];
        match kind {
            SRAT_LAPIC => {
                assert_eq!(len, 16);
                assert_eq!(u32_at(e, 4), 1, "enabled");
                assert_eq!((e[8], u32_at(e, 12)), (0, 0), "SAPIC EID, clock domain");
                let domain = u32::from(e[2]) | u32_at(e, 8) >> 8 << 8;
                cpus.push((domain, e[3]));
            }
            SRAT_MEMORY => {
                assert_eq!(len, 40);
                assert_eq!(
                    u32_at(e, 28),
                    1,
                    "enabled, not hot-pluggable or non-volatile"
                );
                assert_eq!((u16_at(e, 6), u32_at(e, 24), u64_at(e, 32)), (0, 0, 0));
                let (base, size) = (u64_at(e, 8), u64_at(e, 16));
                mem.push((u32_at(e, 2), base, base + size));
            }
            k => panic!("unexpected SRAT structure {k}"),
        }
        off += len;
    }
    assert_eq!(off, srat.len());
    (cpus, mem)
}

/// The SLIT's matrix, row by row.
fn decode_slit(slit: &[u8]) -> Vec<Vec<u8>> {
    assert_eq!(&slit[..4], b"SLIT");
    let n = u64_at(slit, HEADER_LEN) as usize;
    assert_eq!(slit.len(), HEADER_LEN + 8 + n * n);
    slit[HEADER_LEN + 8..]
        .chunks(n)
        .map(<[u8]>::to_vec)
        .collect()
}

/// Three nodes on a 6 GiB guest: two CPUs and the RAM below 2 GiB; one CPU and RAM on both
/// sides of the 32-bit hole; a memory-only node.
fn three_nodes() -> GuestNuma {
    GuestNuma {
        nodes: vec![
            node(0, &[0, 1], &[(0, 2 * GIB)]),
            node(1, &[2], &[(2 * GIB, 3 * GIB), (4 * GIB, 5 * GIB)]),
            node(2, &[], &[(5 * GIB, 7 * GIB)]),
        ],
        distances: vec![vec![10, 20, 30], vec![20, 10, 25], vec![30, 25, 10]],
    }
}

#[test]
fn srat_and_slit_describe_the_guest_numa_nodes() {
    let numa = three_nodes();
    let t = build(
        3,
        &MemoryLayout::new(6 * GIB).unwrap(),
        &intx(),
        Some(&numa),
    )
    .unwrap();
    let (srat, slit) = (t.srat.unwrap(), t.slit.unwrap());
    let xsdt = table(&t, t.xsdt);
    let entries: Vec<u64> = xsdt[HEADER_LEN..].chunks(8).map(|c| u64_at(c, 0)).collect();
    assert_eq!(entries, vec![t.fadt, t.madt, t.mcfg, srat, slit]);
    for (addr, sig) in [(srat, b"SRAT"), (slit, b"SLIT"), (t.xsdt, b"XSDT")] {
        let tb = table(&t, addr);
        assert_eq!(byte_sum(tb), 0, "{} checksum", String::from_utf8_lossy(sig));
        assert_eq!(&tb[10..16], OEM_ID);
        assert_eq!(&tb[16..24], &[&b"VMM "[..], sig].concat()[..]);
        assert_eq!(addr % 16, 0);
    }
    let srat = table(&t, srat);
    assert_eq!(srat.len(), HEADER_LEN + 12 + 3 * 16 + 4 * 40);
    let (cpus, mem) = decode_srat(srat);
    assert_eq!(cpus, vec![(0, 0), (0, 1), (1, 2)]);
    assert_eq!(
        mem,
        vec![
            (0, 0, 2 * GIB),
            (1, 2 * GIB, 3 * GIB),
            (1, 4 * GIB, 5 * GIB),
            (2, 5 * GIB, 7 * GIB)
        ]
    );
    assert_eq!(decode_slit(table(&t, slit)), numa.distances);
    assert!(ACPI_START + t.bytes.len() as u64 <= ACPI_END);
}

#[test]
fn every_cpu_gets_its_node_even_with_the_most_cpus() {
    let numa = GuestNuma {
        nodes: vec![
            node(0, &(0..127).collect::<Vec<_>>(), &[(0, GIB)]),
            node(
                1,
                &(127..u32::from(MAX_CPUS)).collect::<Vec<_>>(),
                &[(GIB, 2 * GIB)],
            ),
        ],
        distances: vec![vec![10, 21], vec![21, 10]],
    };
    let t = build(
        MAX_CPUS,
        &MemoryLayout::new(2 * GIB).unwrap(),
        &[],
        Some(&numa),
    )
    .unwrap();
    let srat = table(&t, t.srat.unwrap());
    assert_eq!(byte_sum(srat), 0);
    let (cpus, _) = decode_srat(srat);
    let want: Vec<(u32, u8)> = (0..MAX_CPUS).map(|i| (u32::from(i >= 127), i)).collect();
    assert_eq!(cpus, want);
    assert_eq!(byte_sum(table(&t, t.slit.unwrap())), 0);
    assert_eq!(decode_slit(table(&t, t.slit.unwrap())), numa.distances);
}

#[test]
fn a_numa_description_the_tables_cannot_carry_is_refused() {
    let layout = MemoryLayout::new(6 * GIB).unwrap();
    let refused = |numa: GuestNuma, cpus: u8| match build(cpus, &layout, &[], Some(&numa)) {
        Err(AcpiError::Numa(e)) => e,
        other => panic!("{other:?}"),
    };
    let with = |f: &dyn Fn(&mut GuestNuma)| {
        let mut numa = three_nodes();
        f(&mut numa);
        refused(numa, 3)
    };
    assert_eq!(
        refused(
            GuestNuma {
                nodes: vec![],
                distances: vec![]
            },
            1
        ),
        NumaError::NoNodes
    );
    assert_eq!(
        with(&|n| n.nodes.swap(0, 1)),
        NumaError::IdOrder { index: 0, id: 1 }
    );
    assert_eq!(
        refused(three_nodes(), 2),
        NumaError::NoSuchCpu { cpu: 2, cpus: 2 }
    );
    assert_eq!(
        with(&|n| n.nodes[1].apic_ids.push(0)),
        NumaError::CpuTwice { cpu: 0 }
    );
    assert_eq!(refused(three_nodes(), 4), NumaError::CpuInNoNode { cpu: 3 });
    assert_eq!(
        with(&|n| n.nodes[2].memory[0].size = 0),
        NumaError::EmptyRange {
            node: 2,
            addr: 5 * GIB
        }
    );
    assert_eq!(
        with(&|n| n.distances[2].pop().map(drop).unwrap()),
        NumaError::DistanceShape { nodes: 3 }
    );
    assert_eq!(
        with(&|n| n.distances.pop().map(drop).unwrap()),
        NumaError::DistanceShape { nodes: 3 }
    );
    assert_eq!(
        with(&|n| n.distances[1][1] = 11),
        NumaError::BadDistance {
            from: 1,
            to: 1,
            got: 11
        }
    );
    assert_eq!(
        with(&|n| n.distances[0][2] = 10),
        NumaError::BadDistance {
            from: 0,
            to: 2,
            got: 10
        }
    );
    assert_eq!(
        with(&|n| n.distances[2][0] = 9),
        NumaError::BadDistance {
            from: 2,
            to: 0,
            got: 9
        }
    );
    assert_eq!(
        with(&|n| n.distances[1][2] = 40),
        NumaError::Asymmetric {
            a: 1,
            b: 2,
            ab: 40,
            ba: 25
        }
    );
    // Unreachable (255) is a distance like any other.
    with_ok(|n| {
        n.distances[0][2] = 255;
        n.distances[2][0] = 255;
    });
}

fn with_ok(f: impl Fn(&mut GuestNuma)) {
    let mut numa = three_nodes();
    f(&mut numa);
    let t = build(3, &MemoryLayout::new(6 * GIB).unwrap(), &[], Some(&numa)).unwrap();
    assert_eq!(decode_slit(table(&t, t.slit.unwrap())), numa.distances);
}
