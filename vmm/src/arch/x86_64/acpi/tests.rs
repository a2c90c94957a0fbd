use super::*;
use crate::memory::layout::{E820Kind, GIB, MIB};

fn at(t: &AcpiTables, addr: u64, len: usize) -> &[u8] {
    let off = (addr - ACPI_START) as usize;
    &t.bytes[off..off + len]
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
        let t = build(cpus, &MemoryLayout::new(6 * GIB).unwrap(), &intx()).unwrap();
        let rsdp = at(&t, t.rsdp, RSDP_LEN);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(byte_sum(&rsdp[..20]), 0, "RSDP v1 checksum");
        assert_eq!(byte_sum(rsdp), 0, "RSDP extended checksum");
        assert_eq!((rsdp[15], u32_at(rsdp, 20)), (2, 36));
        assert_eq!(u64_at(rsdp, 24), t.xsdt);

        let xsdt = table(&t, t.xsdt);
        assert_eq!(&xsdt[..4], b"XSDT");
        let entries: Vec<u64> = xsdt[HEADER_LEN..].chunks(8).map(|c| u64_at(c, 0)).collect();
        assert_eq!(entries, vec![t.fadt, t.madt, t.mcfg]);
        for (addr, sig) in [
            (t.xsdt, b"XSDT"),
            (t.fadt, b"FACP"),
            (t.dsdt, b"DSDT"),
            (t.madt, b"APIC"),
            (t.mcfg, b"MCFG"),
        ] {
            let tb = table(&t, addr);
            assert_eq!(&tb[..4], sig);
            assert_eq!(byte_sum(tb), 0, "{} checksum", String::from_utf8_lossy(sig));
            assert_eq!(&tb[10..16], OEM_ID);
        }
        let fadt = table(&t, t.fadt);
        assert_eq!(fadt.len(), FADT_LEN);
        assert_eq!(u32_at(fadt, 40) as u64, t.dsdt);
        assert_eq!(u64_at(fadt, 140), t.dsdt);
        assert_ne!(u32_at(fadt, 112) & FADT_HW_REDUCED_ACPI, 0);
    }
}

#[test]
fn madt_has_one_enabled_lapic_per_cpu_and_the_ioapic() {
    for cpus in [1u8, 2, 7, MAX_CPUS] {
        let t = build(cpus, &MemoryLayout::new(256 * MIB).unwrap(), &[]).unwrap();
        let madt = table(&t, t.madt);
        assert_eq!(u32_at(madt, 36) as u64, LAPIC_ADDR);
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
                    assert_eq!((e[2], e[5]), (ALL_PROCESSORS, 1));
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
    let t = build(1, &MemoryLayout::new(256 * MIB).unwrap(), &[]).unwrap();
    let mcfg = table(&t, t.mcfg);
    assert_eq!(mcfg.len(), HEADER_LEN + 8 + 16);
    let entry = &mcfg[HEADER_LEN + 8..];
    assert_eq!(u64_at(entry, 0), PCI_ECAM_START);
    assert_eq!(u16::from_le_bytes([entry[8], entry[9]]), 0, "segment 0");
    let (first, last) = (entry[10], entry[11]);
    assert_eq!((first, last), (0, 0));
    assert_eq!(
        u64::from(last - first + 1) << 20,
        PCI_ECAM_SIZE,
        "buses x 1 MiB is the window"
    );
}

#[test]
fn tables_lie_in_reserved_memory_below_the_kernel() {
    for size in [64 * MIB, 6 * GIB] {
        let t = build(MAX_CPUS, &MemoryLayout::new(size).unwrap(), &intx()).unwrap();
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

#[test]
fn dsdt_declares_the_pci_host_bridge_and_com1() {
    let t = build(2, &MemoryLayout::new(6 * GIB).unwrap(), &intx()).unwrap();
    let dsdt = table(&t, t.dsdt);
    let body = &dsdt[HEADER_LEN..];
    let has = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
    // Scope(\_SB_) whose PkgLength covers the whole body.
    assert_eq!(body[0], 0x10);
    let extra = usize::from(body[1] >> 6);
    let scope_len = (1..=extra).fold(usize::from(body[1] & 0xf), |len, i| {
        len | usize::from(body[1 + i]) << (4 + 8 * (i - 1))
    });
    assert_eq!(scope_len, body.len() - 1);
    assert!(has(b"\\_SB_"));
    assert!(has(&[0x5b, 0x82]) && has(b"PCI0") && has(b"COM1"));
    // EisaId("PNP0A08") and ("PNP0A03") as ASL compiles them.
    assert!(has(&[0x0c, 0x41, 0xd0, 0x0a, 0x08]));
    assert!(has(&[0x0c, 0x41, 0xd0, 0x0a, 0x03]));
    assert!(has(&[0x0c, 0x41, 0xd0, 0x05, 0x01]));
    // The 32-bit window ends below the ECAM window; the 64-bit one starts past RAM.
    let mut dword = vec![0x87, 23, 0, 0, 0x0c, 1, 0, 0, 0, 0];
    dword.extend_from_slice(&0xc000_0000u32.to_le_bytes());
    dword.extend_from_slice(&(PCI_ECAM_START as u32 - 1).to_le_bytes());
    assert!(has(&dword));
    let mut qword = vec![0u8; 8];
    qword.extend_from_slice(&(7 * GIB).to_le_bytes());
    assert!(has(&qword));
    // WordIO(ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange) over the PCI I/O
    // window 0xc000..=0xffff, where I/O BARs are placed.
    assert!(has(&[
        0x88, 13, 0, 1, 0x0c, 3, 0, 0, 0x00, 0xc0, 0xff, 0xff, 0, 0, 0x00, 0x40
    ]));
    // _PRT: Package(4) { 0x1ffff, Zero, Zero, 10 }.
    assert!(has(&[
        0x12, 0x0b, 0x04, 0x0c, 0xff, 0xff, 0x01, 0x00, 0x00, 0x00, 0x0a, 0x0a
    ]));
}

#[test]
fn pkg_length_encodings() {
    assert_eq!(aml::pkg_length(0), vec![1]);
    assert_eq!(aml::pkg_length(0x3e), vec![0x3f]);
    // 0x3f + 2 = 0x41: two bytes, low nibble first.
    assert_eq!(aml::pkg_length(0x3f), vec![0x41, 0x04]);
    assert_eq!(aml::pkg_length(0xffd), vec![0x4f, 0xff]);
    assert_eq!(aml::pkg_length(0xffe), vec![0x81, 0x00, 0x01]);
    assert_eq!(aml::int(0), vec![0]);
    assert_eq!(aml::int(0x1234), vec![0x0b, 0x34, 0x12]);
    assert_eq!(aml::int(1 << 32), vec![0x0e, 0, 0, 0, 0, 1, 0, 0, 0]);
}

#[test]
fn cpu_count_is_checked() {
    assert!(matches!(
        build(0, &MemoryLayout::new(64 * MIB).unwrap(), &[]),
        Err(AcpiError::CpuCount(0))
    ));
    assert!(matches!(
        build(255, &MemoryLayout::new(64 * MIB).unwrap(), &[]),
        Err(AcpiError::CpuCount(255))
    ));
}

#[test]
fn tables_land_in_guest_memory() {
    let mem = crate::loader::tests::guest_mem(64 * MIB);
    let t = write(&mem, 2, &MemoryLayout::new(64 * MIB).unwrap(), &[]).unwrap();
    let mut sig = [0u8; 8];
    mem.read_slice(&mut sig, GuestAddress(ACPI_RSDP_ADDR))
        .unwrap();
    assert_eq!(&sig, b"RSD PTR ");
    let mut mcfg = [0u8; 4];
    mem.read_slice(&mut mcfg, GuestAddress(t.mcfg)).unwrap();
    assert_eq!(&mcfg, b"MCFG");
}
