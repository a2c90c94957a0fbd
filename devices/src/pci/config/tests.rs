use super::*;

/// Makes the bits set in `mask` write-1-to-clear, as a capability with W1C status bits would.
fn set_w1c(cs: &mut ConfigSpace, offset: usize, mask: &[u8]) -> Result<(), ConfigError> {
    ConfigSpace::set_mask(&mut cs.w1c, offset, mask, &mut cs.writable)
}

/// The programmed base of BAR `index`, decoding or not.
fn bar_addr(cs: &ConfigSpace, index: usize) -> Option<u64> {
    cs.bar(index).map(|b| b.addr)
}

/// The BAR that decodes `addr` in memory (`io == false`) or I/O space, with the offset of
/// `addr` inside it: what a bus lookup would find.
fn bar_at(cs: &ConfigSpace, io: bool, addr: u64) -> Option<(usize, u64)> {
    cs.bars()
        .filter(|b| b.decoding && b.spec.kind.is_memory() != io)
        .find(|b| addr >= b.addr && addr - b.addr < b.spec.size)
        .map(|b| (b.index, addr - b.addr))
}

fn header() -> PciHeader {
    PciHeader {
        vendor_id: 0x1234,
        device_id: 0x5678,
        class_code: 0xff0000,
        revision_id: 2,
        subsystem_vendor_id: 0xaaaa,
        subsystem_id: 0xbbbb,
        interrupt_pin: 1,
    }
}

fn write32(cs: &mut ConfigSpace, offset: usize, v: u32) -> Vec<BarChange> {
    cs.write_reg(offset / 4, 0, &v.to_le_bytes())
}

#[test]
fn header_fields_are_read_only() {
    let mut cs = ConfigSpace::new(&header());
    assert_eq!(cs.read_reg(0), 0x5678_1234);
    assert_eq!(cs.read_reg(2), 0xff00_0002);
    assert_eq!(cs.read_reg(0xb), 0xbbbb_aaaa);
    assert_eq!(cs.read_u8(offset::INTERRUPT_PIN), 1);
    write32(&mut cs, 0, 0xffff_ffff);
    write32(&mut cs, 8, 0);
    write32(&mut cs, 0x2c, 0);
    cs.write_reg(0xf, 1, &[4]); // interrupt pin
    assert_eq!(cs.read_reg(0), 0x5678_1234);
    assert_eq!(cs.read_reg(2), 0xff00_0002);
    assert_eq!(cs.read_reg(0xb), 0xbbbb_aaaa);
    assert_eq!(cs.read_u8(offset::INTERRUPT_PIN), 1);
    // Interrupt line is scratch.
    cs.write_reg(0xf, 0, &[11]);
    assert_eq!(cs.read_u8(offset::INTERRUPT_LINE), 11);
    // Header type is 0 (single function, type 0) and stays so.
    cs.write_reg(3, 2, &[0xff]);
    assert_eq!(cs.read_u8(offset::HEADER_TYPE), 0);
    // Beyond the space reads all ones; writes there are dropped.
    assert_eq!(cs.read_reg(NUM_REGS), u32::MAX);
    assert!(cs.write_reg(NUM_REGS, 0, &[1, 2, 3, 4]).is_empty());
}

#[test]
fn command_mask_and_partial_writes() {
    let mut cs = ConfigSpace::new(&header());
    // Word write to COMMAND: only the implemented bits stick; the status half is untouched.
    cs.write_reg(1, 0, &0xffffu16.to_le_bytes());
    assert_eq!(cs.command(), COMMAND_WRITABLE);
    assert_eq!(cs.status(), 0);
    // Byte write at offset 1 changes only that byte.
    cs.write_reg(1, 1, &[0]);
    assert_eq!(cs.command(), COMMAND_WRITABLE & 0xff);
    assert!(cs.bus_master());
    // Malformed accesses are ignored: 3 bytes, crossing the dword, 8 bytes.
    cs.write_reg(1, 0, &[0, 0, 0]);
    cs.write_reg(1, 3, &[0, 0]);
    cs.write_reg(1, 0, &[0; 8]);
    cs.write_reg(1, u64::MAX, &[0]);
    cs.write_reg(usize::MAX, 0, &[0]);
    assert_eq!(cs.command(), COMMAND_WRITABLE & 0xff);
}

#[test]
fn status_error_bits_are_write_one_to_clear() {
    let mut cs = ConfigSpace::new(&header());
    cs.add_capability(cap_id::VENDOR, &[0, 0]).unwrap();
    // The device reports a master abort (bit 13) and a parity error (bit 15).
    cs.set_u16(offset::STATUS, cs.status() | 0xa000);
    // Writing 0 changes nothing; writing 1 to bit 13 clears only it.
    cs.write_reg(1, 2, &0u16.to_le_bytes());
    assert_eq!(cs.status(), 0xa000 | status::CAPABILITIES_LIST);
    cs.write_reg(1, 2, &0x2000u16.to_le_bytes());
    assert_eq!(cs.status(), 0x8000 | status::CAPABILITIES_LIST);
    // The capabilities bit is read-only even when written with 1.
    write32(&mut cs, 4, 0xffff_0000);
    assert_eq!(cs.status(), status::CAPABILITIES_LIST);
}

#[test]
fn bar_sizing_reads_back_the_size_mask() {
    let mut cs = ConfigSpace::new(&header());
    let mem32 = BarSpec {
        kind: BarKind::Memory32,
        size: 0x1000,
        prefetchable: false,
    };
    let mem64 = BarSpec {
        kind: BarKind::Memory64,
        size: 1 << 33,
        prefetchable: true,
    };
    let io = BarSpec {
        kind: BarKind::Io,
        size: 0x20,
        prefetchable: false,
    };
    cs.add_bar(0, mem32).unwrap();
    cs.add_bar(2, mem64).unwrap();
    cs.add_bar(4, io).unwrap();
    // Flag bits: type and prefetch for memory, bit 0 for I/O.
    assert_eq!(cs.read_reg(4), 0x0);
    assert_eq!(cs.read_reg(6), 0xc);
    assert_eq!(cs.read_reg(8), 0x1);
    for bar in 0..NUM_BARS {
        write32(&mut cs, offset::BAR0 + 4 * bar, u32::MAX);
    }
    assert_eq!(cs.read_reg(4), 0xffff_f000);
    assert_eq!(cs.read_reg(5), 0, "unimplemented BAR reads 0");
    assert_eq!(cs.read_reg(6), 0x0000_000c, "low half of an 8 GiB BAR");
    assert_eq!(cs.read_reg(7), 0xffff_fffe, "high half: 8 GiB");
    assert_eq!(cs.read_reg(8), 0xffff_ffe1);
    assert_eq!(cs.read_reg(9), 0);
    // Programming addresses: the low bits below the size do not stick.
    write32(&mut cs, offset::BAR0, 0xe000_0fff);
    assert_eq!(bar_addr(&cs, 0), Some(0xe000_0000));
    write32(&mut cs, offset::BAR0 + 8, 0x1234_5678);
    write32(&mut cs, offset::BAR0 + 12, 0x4);
    assert_eq!(bar_addr(&cs, 2), Some(0x4_0000_0000));
    write32(&mut cs, offset::BAR0 + 16, 0xc05f);
    assert_eq!(bar_addr(&cs, 4), Some(0xc040));
    assert_eq!(cs.bar(3), None);
    assert_eq!(cs.bars().map(|b| b.index).collect::<Vec<_>>(), [0, 2, 4]);
}

#[test]
fn bar_registration_rules() {
    let mut cs = ConfigSpace::new(&header());
    let spec = |kind, size| BarSpec {
        kind,
        size,
        prefetchable: false,
    };
    assert_eq!(
        cs.add_bar(6, spec(BarKind::Memory32, 0x1000)),
        Err(ConfigError::BarIndex { index: 6 })
    );
    assert_eq!(
        cs.add_bar(5, spec(BarKind::Memory64, 0x1000)),
        Err(ConfigError::Bar64AtEnd { index: 5 })
    );
    assert!(matches!(
        cs.add_bar(0, spec(BarKind::Memory32, 0x1800)),
        Err(ConfigError::BarSize {
            reason: "not a power of two",
            ..
        })
    ));
    assert!(matches!(
        cs.add_bar(0, spec(BarKind::Memory32, 8)),
        Err(ConfigError::BarSize { .. })
    ));
    assert!(matches!(
        cs.add_bar(0, spec(BarKind::Memory32, 1 << 32)),
        Err(ConfigError::BarSize { .. })
    ));
    assert!(matches!(
        cs.add_bar(0, spec(BarKind::Io, 2)),
        Err(ConfigError::BarSize { .. })
    ));
    assert_eq!(
        cs.add_bar(
            0,
            BarSpec {
                kind: BarKind::Io,
                size: 16,
                prefetchable: true
            }
        ),
        Err(ConfigError::PrefetchableIo { index: 0 })
    );
    cs.add_bar(1, spec(BarKind::Memory64, 0x1000)).unwrap();
    // BAR2 is BAR1's upper half; BAR0 as 64-bit would overlap BAR1.
    assert_eq!(
        cs.add_bar(2, spec(BarKind::Memory32, 0x1000)),
        Err(ConfigError::BarInUse { index: 2 })
    );
    assert_eq!(
        cs.add_bar(0, spec(BarKind::Memory64, 0x1000)),
        Err(ConfigError::BarInUse { index: 0 })
    );
    assert_eq!(
        cs.add_bar(1, spec(BarKind::Memory32, 0x1000)),
        Err(ConfigError::BarInUse { index: 1 })
    );
    cs.add_bar(0, spec(BarKind::Memory32, 0x1000)).unwrap();
    // The error names the BAR and the rule.
    let err = cs
        .add_bar(3, spec(BarKind::Memory32, 0x1001))
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "BAR3: 32-bit memory size 0x1001 is invalid: not a power of two"
    );
}

#[test]
fn set_bar_addr_checks_alignment_and_reach() {
    let mut cs = ConfigSpace::new(&header());
    cs.add_bar(
        0,
        BarSpec {
            kind: BarKind::Memory32,
            size: 0x2000,
            prefetchable: true,
        },
    )
    .unwrap();
    cs.add_bar(
        1,
        BarSpec {
            kind: BarKind::Memory64,
            size: 0x4000,
            prefetchable: false,
        },
    )
    .unwrap();
    assert!(matches!(
        cs.set_bar_addr(0, 0x1000),
        Err(ConfigError::BarAddress { .. })
    ));
    assert!(matches!(
        cs.set_bar_addr(0, 0x1_0000_0000),
        Err(ConfigError::BarAddress { .. })
    ));
    assert_eq!(
        cs.set_bar_addr(3, 0),
        Err(ConfigError::BarNotRegistered { index: 3 })
    );
    cs.set_bar_addr(0, 0xffff_e000).unwrap();
    assert_eq!(cs.read_reg(4), 0xffff_e008, "prefetch flag kept");
    cs.set_bar_addr(1, 0x80_0000_4000).unwrap();
    assert_eq!(bar_addr(&cs, 1), Some(0x80_0000_4000));
    assert_eq!(cs.read_reg(5) & 0xf, 0x4);
}

#[test]
fn bar_changes_follow_decode_enable_and_moves() {
    let mut cs = ConfigSpace::new(&header());
    let spec = BarSpec {
        kind: BarKind::Memory64,
        size: 0x1000,
        prefetchable: false,
    };
    let io = BarSpec {
        kind: BarKind::Io,
        size: 0x10,
        prefetchable: false,
    };
    cs.add_bar(0, spec).unwrap();
    cs.add_bar(2, io).unwrap();
    cs.set_bar_addr(0, 0xd000_0000).unwrap();
    cs.set_bar_addr(2, 0x1000).unwrap();
    // Moving a BAR that does not decode is not a change.
    assert!(write32(&mut cs, offset::BAR0, 0xe000_0000).is_empty());
    assert!(!cs.bar(0).unwrap().decoding);
    // Enabling memory decode maps BAR0 only.
    let changes = cs.write_reg(1, 0, &command::MEMORY_SPACE.to_le_bytes());
    assert_eq!(
        changes,
        [BarChange {
            index: 0,
            spec,
            old: None,
            new: Some(0xe000_0000)
        }]
    );
    // A move while decoding is reported at each half of the 64-bit register.
    let changes = write32(&mut cs, offset::BAR0 + 4, 0x1);
    assert_eq!(changes[0].old, Some(0xe000_0000));
    assert_eq!(changes[0].new, Some(0x1_e000_0000));
    assert!(write32(&mut cs, offset::BAR0 + 4, 0x1).is_empty());
    assert_eq!(bar_at(&cs, false, 0x1_e000_0ffc), Some((0, 0xffc)));
    assert_eq!(bar_at(&cs, false, 0x1_e000_1000), None);
    assert_eq!(bar_at(&cs, true, 0x1004), None, "I/O decode is off");
    // Enabling I/O as well reports only the I/O BAR; disabling both reports both.
    let both = command::MEMORY_SPACE | command::IO_SPACE;
    let changes = cs.write_reg(1, 0, &both.to_le_bytes());
    assert_eq!(changes.len(), 1);
    assert_eq!((changes[0].index, changes[0].new), (2, Some(0x1000)));
    assert_eq!(bar_at(&cs, true, 0x100f), Some((2, 0xf)));
    let changes = cs.write_reg(1, 0, &0u16.to_le_bytes());
    assert_eq!(changes.len(), 2);
    assert!(changes.iter().all(|c| c.new.is_none() && c.old.is_some()));
}

#[test]
fn capability_chain() {
    let mut cs = ConfigSpace::new(&header());
    assert_eq!(cs.status() & status::CAPABILITIES_LIST, 0);
    assert!(cs.capabilities().is_empty());
    let a = cs.add_capability(cap_id::VENDOR, &[3, 0xaa]).unwrap();
    let b = cs.add_capability(cap_id::MSI, &[0; 5]).unwrap();
    let c = cs.add_capability(cap_id::MSIX, &[0; 10]).unwrap();
    assert_eq!((a, b, c), (0x40, 0x44, 0x4c));
    assert_eq!(cs.read_u8(offset::CAPABILITIES_POINTER), 0x40);
    assert_ne!(cs.status() & status::CAPABILITIES_LIST, 0);
    assert_eq!(cs.read_u32(0x40), 0xaa03_4409);
    assert_eq!(cs.read_u8(0x45), 0x4c);
    assert_eq!(cs.read_u8(0x4d), 0, "last next pointer is 0");
    assert_eq!(
        cs.capabilities(),
        [
            (cap_id::VENDOR, 0x40),
            (cap_id::MSI, 0x44),
            (cap_id::MSIX, 0x4c)
        ]
    );
    // Capability bytes, pointer and header are read-only unless made writable.
    write32(&mut cs, 0x40, 0);
    write32(&mut cs, offset::CAPABILITIES_POINTER, 0);
    assert_eq!(cs.read_u32(0x40), 0xaa03_4409);
    assert_eq!(cs.read_u8(offset::CAPABILITIES_POINTER), 0x40);
    cs.set_writable(0x43, &[0xf0]).unwrap();
    cs.write_reg(0x10, 3, &[0xff]);
    assert_eq!(cs.read_u8(0x43), 0xfa);
    // Space runs out below 0x100.
    let err = cs.add_capability(cap_id::VENDOR, &[0; 200]).unwrap_err();
    assert_eq!(
        err,
        ConfigError::CapabilitySpace {
            id: cap_id::VENDOR,
            len: 202,
            free: 0x100 - 0x58
        }
    );
}

#[test]
fn capability_walk_survives_a_loop() {
    let mut cs = ConfigSpace::new(&header());
    cs.add_capability(cap_id::VENDOR, &[0, 0]).unwrap();
    cs.set_u8(0x41, 0x40); // points at itself
    assert_eq!(cs.capabilities().len(), 48);
}

#[test]
fn w1c_and_writable_masks_exclude_each_other() {
    let mut cs = ConfigSpace::new(&header());
    cs.set_writable(0x80, &[0xff]).unwrap();
    set_w1c(&mut cs, 0x80, &[0x0f]).unwrap();
    cs.set_u8(0x80, 0xff);
    cs.write_reg(0x20, 0, &[0x01]);
    // Bit 0 is cleared (W1C), bits 1-3 stay (W1C, written 0), the upper nibble is still
    // writable and takes the 0s written.
    assert_eq!(cs.read_u8(0x80), 0x0e);
    assert_eq!(
        cs.set_writable(4095, &[1, 1]),
        Err(ConfigError::OutOfRange {
            offset: 4095,
            len: 2
        })
    );
}

#[test]
fn extended_space_is_stored() {
    let mut cs = ConfigSpace::new(&header());
    cs.set_u32(0xffc, 0xdead_beef);
    cs.set_writable(0x100, &[0xff; 4]).unwrap();
    cs.write_reg(0x40, 0, &0x1234_5678u32.to_le_bytes());
    assert_eq!(cs.read_reg(0x3ff), 0xdead_beef);
    assert_eq!(cs.read_reg(0x40), 0x1234_5678);
    let mut b = [0u8; 4];
    cs.read(0xffe, &mut b);
    assert_eq!(b, [0xad, 0xde, 0xff, 0xff]);
}
