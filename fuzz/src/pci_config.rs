//! Target `pci_config`: a type-0 [`ConfigSpace`] with fuzz-chosen identity, BARs and
//! capabilities (MSI, MSI-X, vendor-specific with write masks), driven by guest config
//! reads and writes of every shape, BAR sizing, firmware BAR placement and late
//! `set_writable` calls.
//!
//! Invariants, checked against a model of the registers and their write masks that this file
//! builds from the PCI rules (not from the crate's own mask tables):
//! - every guest write leaves each bit at `old & !W | new & W`, with W1C bits cleared where a
//!   1 is written and every read-only bit unchanged (identity, header type, capability IDs
//!   and pointers, BAR flag bits);
//! - writing all ones to a BAR reads back its size mask and flag bits (BAR sizing);
//! - the `BarChange`s a write returns are exactly the BARs whose decoded window (COMMAND
//!   enable + programmed address) changed, with the right old and new bases;
//! - `add_bar`, `set_bar_addr`, `set_writable` and the capability constructors succeed
//!   exactly when the PCI rules say they may, and a refused call changes nothing;
//! - the capability list walks exactly the capabilities added, in order, while their
//!   pointers are read-only, and never leaves 0x40..0x100 or loops;
//! - reads beyond the 4 KiB space are all ones, writes there are dropped;
//! - MSI state read back after a write matches the register model.

mod model;

use devices::pci::config::{cap_id, offset, CONFIG_SPACE_SIZE, NUM_BARS, NUM_REGS};
use devices::pci::msix::{MsixCap, MsixLocation};
use devices::pci::{BarChange, BarKind, BarSpec, ConfigSpace, MsiCap, PciHeader};

use crate::{Input, Seed};
use model::{check_caps, check_regs, Model, CAP_LIST};

fn bar_spec(input: &mut Input<'_>) -> Option<BarSpec> {
    let b = input.u8();
    let kind = match b & 3 {
        0 => return None,
        1 => BarKind::Io,
        2 => BarKind::Memory32,
        _ => BarKind::Memory64,
    };
    let size = match input.u8() {
        // Mostly powers of two, sometimes anything.
        s if s < 0xf0 => 1u64 << (s % 64),
        _ => input.u64(),
    };
    Some(BarSpec {
        kind,
        size,
        prefetchable: b & 4 != 0,
    })
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let header = PciHeader {
        vendor_id: input.u16(),
        device_id: input.u16(),
        class_code: input.u32(),
        revision_id: input.u8(),
        subsystem_vendor_id: input.u16(),
        subsystem_id: input.u16(),
        interrupt_pin: input.u8(),
    };
    let mut cs = ConfigSpace::new(&header);
    let mut m = Model::new();

    // Identity as the PCI header layout puts it.
    assert_eq!(
        cs.read_reg(0),
        u32::from(header.device_id) << 16 | u32::from(header.vendor_id)
    );
    assert_eq!(
        cs.read_reg(2),
        (header.class_code & 0xff_ffff) << 8 | u32::from(header.revision_id)
    );
    assert_eq!(
        cs.read_reg(0xb),
        u32::from(header.subsystem_id) << 16 | u32::from(header.subsystem_vendor_id)
    );
    assert_eq!(cs.read_u8(offset::INTERRUPT_PIN), header.interrupt_pin);
    for i in 0..NUM_REGS {
        m.regs[i] = cs.read_reg(i);
    }

    // BARs: up to six registration attempts at fuzz-chosen indices.
    for _ in 0..input.u8() % 7 {
        let index = usize::from(input.u8() % 7);
        let Some(spec) = bar_spec(&mut input) else {
            continue;
        };
        let allowed = m.bar_allowed(index, spec);
        let before = cs.clone();
        let res = cs.add_bar(index, spec);
        assert_eq!(res.is_ok(), allowed, "add_bar({index}, {spec:?}): {res:?}");
        if allowed {
            m.add_bar(index, spec);
        } else {
            check_regs(&before, &m, "before refused add_bar");
        }
        check_regs(&cs, &m, "after add_bar");
    }

    // Capabilities.
    for _ in 0..input.u8() % 6 {
        let caps_before = m.caps.len();
        match input.u8() % 3 {
            0 => {
                let vectors = 1u16 << (input.u8() % 7);
                let pvm = input.bool();
                let len = if pvm { 0x18 } else { 0x0e };
                let fits = m.cap_fits(len) && vectors <= 32;
                match MsiCap::add_to(&mut cs, vectors, pvm) {
                    Ok(msi) => {
                        assert!(fits, "MSI cap of {len} bytes added at {:#x}", msi.offset());
                        let at = msi.offset();
                        m.add_cap(cap_id::MSI, at, len);
                        // The PCI rules for a 64-bit MSI capability.
                        let ctrl_rw: u32 = 1 | 0x7 << 4;
                        m.writable[at / 4] |= ctrl_rw << 16;
                        m.writable[at / 4 + 1] = 0xffff_fffc;
                        m.writable[at / 4 + 2] = u32::MAX;
                        m.writable[at / 4 + 3] = 0xffff;
                        if pvm {
                            m.writable[at / 4 + 4] = u32::MAX >> (32 - u32::from(vectors));
                        }
                        if m.msi.is_none() {
                            m.msi = Some((msi, at, vectors, pvm));
                        }
                    }
                    Err(e) => assert!(!fits, "MSI cap refused: {e}"),
                }
            }
            1 => {
                let vectors = input.u16() % 2100;
                let table = MsixLocation {
                    bar: usize::from(input.u8() % 7),
                    offset: u64::from(input.u16()) * 8,
                };
                let pba = MsixLocation {
                    bar: usize::from(input.u8() % 7),
                    offset: u64::from(input.u16()) * 8,
                };
                let len = |n: u16| (u64::from(n) * 16, u64::from(n).div_ceil(64) * 8);
                let (table_len, pba_len) = len(vectors);
                let inside =
                    |loc: MsixLocation, n: u64| {
                        m.bars.get(loc.bar).copied().flatten().is_some_and(|spec| {
                            spec.kind != BarKind::Io && loc.offset + n <= spec.size
                        })
                    };
                let overlap = table.bar == pba.bar
                    && table.offset < pba.offset + pba_len
                    && pba.offset < table.offset + table_len;
                let allowed = (1..=2048).contains(&vectors)
                    && inside(table, table_len)
                    && inside(pba, pba_len)
                    && !overlap
                    && m.cap_fits(12);
                let res = MsixCap::add_to(&mut cs, vectors, table, pba);
                assert_eq!(
                    res.is_ok(),
                    allowed,
                    "MSI-X {vectors} {table:?} {pba:?}: {res:?}"
                );
                if let Ok(msix) = res {
                    let at = msix.offset();
                    assert!(m.cap_fits(12));
                    assert!((1..=2048).contains(&vectors));
                    for (loc, len) in [msix.table(), msix.pba()] {
                        let (spec, _) = m.bar_addr(loc.bar).expect("MSI-X in a registered BAR");
                        assert_ne!(spec.kind, BarKind::Io);
                        assert!(
                            loc.offset + len <= spec.size,
                            "MSI-X structure past its BAR"
                        );
                    }
                    m.add_cap(cap_id::MSIX, at, 12);
                    m.writable[at / 4] |= 0xc000 << 16;
                    assert_eq!(cs.read_u32(at + 4), table.offset as u32 | table.bar as u32);
                    assert_eq!(cs.read_u32(at + 8), pba.offset as u32 | pba.bar as u32);
                }
            }
            _ => {
                let body = input.short_bytes(255).to_vec();
                let len = body.len() + 2;
                let fits = m.cap_fits(len);
                match cs.add_capability(cap_id::VENDOR, &body) {
                    Ok(at) => {
                        assert!(fits);
                        m.add_cap(cap_id::VENDOR, at, len);
                        let mut got = vec![0u8; body.len()];
                        cs.read(at + 2, &mut got);
                        assert_eq!(got, body, "capability body");
                    }
                    Err(e) => assert!(!fits, "vendor capability refused: {e}"),
                }
            }
        }
        // A new capability is a device-side store of its bytes, of the pointer to it (the
        // previous capability's next field or 0x34) and of STATUS.CAP_LIST; nothing else.
        if m.caps.len() > caps_before {
            let &(id, at, len) = m.caps.last().unwrap();
            let pointer = match m.caps.len() {
                1 => offset::CAPABILITIES_POINTER,
                n => m.caps[n - 2].1 + 1,
            };
            assert_eq!(
                cs.read_u8(pointer),
                at as u8,
                "pointer to capability {id:#x}"
            );
            assert_eq!(cs.read_u8(at), id);
            assert_eq!(
                cs.read_u8(at + 1),
                0,
                "the new last capability ends the list"
            );
            let synced = [1, pointer / 4]
                .into_iter()
                .chain(at / 4..(at + len).div_ceil(4));
            for r in synced {
                m.regs[r] = cs.read_reg(r);
            }
        }
        check_regs(&cs, &m, "after adding a capability");
    }
    if !m.caps.is_empty() {
        assert_ne!(
            cs.read_reg(1) & CAP_LIST,
            0,
            "STATUS.CAP_LIST with capabilities"
        );
        // The pointers and IDs the guest walks.
        let mut at = usize::from(cs.read_u8(offset::CAPABILITIES_POINTER));
        for &(id, cap_at, _) in &m.caps {
            assert_eq!(at, cap_at);
            assert_eq!(cs.read_u8(at), id);
            at = usize::from(cs.read_u8(at + 1));
        }
        assert_eq!(at, 0, "the last capability ends the list");
    }
    check_caps(&cs, &m);

    let mut ops = 0;
    while !input.is_empty() && ops < 512 {
        ops += 1;
        match input.u8() % 8 {
            // A guest config write of any shape.
            0 | 1 => {
                let reg = usize::from(input.u16()) % (NUM_REGS + 64);
                let off = u64::from(input.u8() % 6);
                let len = input.width();
                let data = input.bytes(len).to_vec();
                let before = m.decoded();
                let shaped = m.guest_write(reg, off, &data).is_some();
                let changes = cs.write_reg(reg, off, &data);
                let after = m.decoded();
                let want: Vec<BarChange> = (0..NUM_BARS)
                    .filter(|&i| before[i] != after[i])
                    .map(|i| BarChange {
                        index: i,
                        spec: m.bars[i].unwrap(),
                        old: before[i],
                        new: after[i],
                    })
                    .collect();
                assert_eq!(
                    changes, want,
                    "BAR changes of write {reg:#x}+{off} {data:?}"
                );
                assert!(shaped || changes.is_empty());
                check_regs(&cs, &m, "after a guest write");
                if let Some((msi, at, vectors, pvm)) = m.msi.as_mut() {
                    msi.update(&cs);
                    let ctrl = m.regs[*at / 4] >> 16;
                    let enabled = ctrl & 1 != 0;
                    let mme = (ctrl >> 4) & 7;
                    assert_eq!(msi.enabled(), enabled);
                    let n = if enabled {
                        (1u16 << mme).min(*vectors)
                    } else {
                        0
                    };
                    assert_eq!(msi.enabled_vectors(), n);
                    let addr =
                        u64::from(m.regs[*at / 4 + 2]) << 32 | u64::from(m.regs[*at / 4 + 1]);
                    let data = m.regs[*at / 4 + 3] & 0xffff;
                    for v in 0..n {
                        let msg = msi.message(v).expect("enabled vector");
                        assert_eq!(msg.addr, addr);
                        assert_eq!(msg.data, (data & !(u32::from(n) - 1)) | u32::from(v));
                        let masked = *pvm && m.regs[*at / 4 + 4] & (1 << v) != 0;
                        assert_eq!(msg.masked, masked);
                    }
                    assert_eq!(msi.message(n), None);
                }
            }
            2 => {
                let reg = usize::from(input.u16()) % (NUM_REGS + 64);
                let want = m.regs.get(reg).copied().unwrap_or(u32::MAX);
                assert_eq!(cs.read_reg(reg), want);
            }
            3 => {
                let at = usize::from(input.u16()) % (CONFIG_SPACE_SIZE + 64);
                let mut buf = vec![0u8; input.width()];
                cs.read(at, &mut buf);
                for (i, &b) in buf.iter().enumerate() {
                    let p = at + i;
                    let want = m.regs.get(p / 4).map_or(0xff, |r| (r >> (p % 4 * 8)) as u8);
                    assert_eq!(b, want, "byte {p:#x}");
                }
            }
            // BAR sizing as an OS does it: all ones, read back, restore.
            4 => {
                let i = usize::from(input.u8()) % NUM_BARS;
                let reg = offset::BAR0 / 4 + i;
                let saved = m.regs[reg];
                cs.write_reg(reg, 0, &u32::MAX.to_le_bytes());
                m.guest_write(reg, 0, &u32::MAX.to_le_bytes());
                let got = cs.read_reg(reg);
                match m.bars[i].filter(|_| !m.bars_open) {
                    Some(spec) => {
                        let flags = saved & if spec.kind == BarKind::Io { 0x3 } else { 0xf };
                        let size_mask = !(spec.size - 1) as u32
                            & if spec.kind == BarKind::Io { !0x3 } else { !0xf };
                        assert_eq!(got, size_mask | flags, "sizing BAR{i} of {:#x}", spec.size);
                    }
                    // Unregistered, or the upper half of a 64-bit BAR: the model decides.
                    None => assert_eq!(got, m.regs[reg]),
                }
                cs.write_reg(reg, 0, &saved.to_le_bytes());
                m.guest_write(reg, 0, &saved.to_le_bytes());
                check_regs(&cs, &m, "after BAR sizing");
            }
            5 => {
                let i = usize::from(input.u8() % 7);
                let addr = if input.bool() {
                    input.u64()
                } else {
                    u64::from(input.u32()) << (input.u8() % 40)
                };
                let res = cs.set_bar_addr(i, addr);
                let allowed = m.bars.get(i).copied().flatten().is_some_and(|spec| {
                    let limit = match spec.kind {
                        BarKind::Io => 1u128 << 16,
                        BarKind::Memory32 => 1 << 32,
                        BarKind::Memory64 => 1 << 64,
                    };
                    addr % spec.size == 0 && u128::from(addr) + u128::from(spec.size) <= limit
                });
                assert_eq!(
                    res.is_ok(),
                    allowed,
                    "set_bar_addr({i}, {addr:#x}): {res:?}"
                );
                if allowed {
                    let spec = m.bars[i].unwrap();
                    let reg = offset::BAR0 / 4 + i;
                    let flag_bits = if spec.kind == BarKind::Io { 3 } else { 0xf };
                    m.regs[reg] = (m.regs[reg] & flag_bits) | (addr as u32 & !flag_bits);
                    if spec.kind == BarKind::Memory64 {
                        m.regs[reg + 1] = (addr >> 32) as u32;
                    }
                    assert_eq!(cs.bar(i).map(|b| b.addr), Some(addr));
                }
                check_regs(&cs, &m, "after set_bar_addr");
            }
            6 => {
                let at = usize::from(input.u16()) % (CONFIG_SPACE_SIZE + 16);
                let mask = input.short_bytes(8).to_vec();
                let res = cs.set_writable(at, &mask);
                let fits = at + mask.len() <= CONFIG_SPACE_SIZE;
                assert_eq!(res.is_ok(), fits, "set_writable({at:#x}, {mask:?})");
                if fits {
                    for (i, &b) in mask.iter().enumerate() {
                        let p = at + i;
                        m.set_mask_byte(p, b);
                        let in_chain = p == offset::CAPABILITIES_POINTER
                            || m.caps.iter().any(|&(_, c, _)| p == c || p == c + 1)
                            || (p == offset::STATUS && b & 0x10 != 0);
                        m.chain_open |= in_chain && b != 0;
                        m.bars_open |= (offset::BAR0..offset::BAR0 + 4 * NUM_BARS).contains(&p);
                    }
                }
            }
            _ => check_caps(&cs, &m),
        }
    }
    check_caps(&cs, &m);
}

/// Seeds: a few realistic devices and the accesses a guest makes to them.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let header = |s: &mut Seed| {
        s.u16(0x104c)
            .u16(0xb500)
            .u32(0xff0000)
            .u8(1)
            .u16(0x1af4)
            .u16(1)
            .u8(1);
    };
    let write = |s: &mut Seed, reg: u16, off: u8, data: &[u8]| {
        s.u8(0).u16(reg).u8(off).width(data.len()).bytes(data);
    };
    let read = |s: &mut Seed, reg: u16| {
        s.u8(2).u16(reg);
    };
    let mut out = Vec::new();

    // Two memory BARs (one 64-bit prefetchable), an I/O BAR, MSI with masking, MSI-X, a
    // vendor capability; then an OS's probe: sizing, placement, decode on, MSI programming.
    let mut s = Seed::new();
    header(&mut s);
    s.u8(3);
    s.u8(0).u8(2).u8(12); // BAR0: 32-bit memory, 4 KiB
    s.u8(2).u8(3 | 4).u8(20); // BAR2: 64-bit prefetchable memory, 1 MiB
    s.u8(4).u8(1).u8(5); // BAR4: I/O, 32 bytes
    s.u8(3);
    s.u8(0).u8(5).u8(1); // MSI, 32 vectors, per-vector mask
    s.u8(1).u16(16).u8(0).u16(0x400 / 8).u8(0).u16(0x800 / 8); // MSI-X in BAR0
    s.u8(2).short_bytes(&[0x10, 1, 2, 3, 4, 5, 6, 7]); // vendor
    for bar in [0u8, 2, 3, 4] {
        s.u8(4).u8(bar);
    }
    s.u8(5).u8(0).u8(0).u32(0xc000_0000).u8(0);
    write(&mut s, 4, 0, &0xe000_0000u32.to_le_bytes());
    write(&mut s, 5, 0, &1u32.to_le_bytes());
    write(&mut s, 8, 0, &0xc100u32.to_le_bytes());
    write(&mut s, 1, 0, &0x0007u16.to_le_bytes());
    write(&mut s, 1, 2, &0xffffu16.to_le_bytes()); // clear STATUS errors
    write(&mut s, 0x11, 0, &0xfee0_0000u32.to_le_bytes()); // MSI address
    write(&mut s, 0x13, 0, &0x4041u32.to_le_bytes()); // MSI data
    write(&mut s, 0x10, 2, &0x0051u16.to_le_bytes()); // MSI enable, 32 vectors
    write(&mut s, 0x14, 0, &0xffu32.to_le_bytes()); // mask 8
    for reg in [
        0u16, 1, 4, 5, 6, 7, 8, 0xd, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15,
    ] {
        read(&mut s, reg);
    }
    s.u8(7);
    out.push(("probe", s.0));

    // Odd shapes: unaligned, 3 bytes, past the space, and set_writable late.
    let mut s = Seed::new();
    header(&mut s);
    s.u8(1).u8(0).u8(2).u8(4); // BAR0 16 bytes
    s.u8(1).u8(2).short_bytes(&[0; 20]);
    write(&mut s, 4, 3, &[0xff, 0xff]);
    write(&mut s, 4, 1, &[1, 2, 3]);
    write(&mut s, 0x400, 0, &[0xff; 4]);
    write(&mut s, 0x3ff, 0, &[0xff; 4]);
    s.u8(6).u16(0x44).short_bytes(&[0xff, 0xff, 0, 0xf0]);
    write(&mut s, 0x11, 0, &[0xff; 4]);
    s.u8(6).u16(4095).short_bytes(&[1, 2]);
    s.u8(3).u16(0xffe).width(4);
    out.push(("odd-shapes", s.0));

    // Full capability area.
    let mut s = Seed::new();
    header(&mut s);
    s.u8(0);
    s.u8(5);
    for _ in 0..5 {
        s.u8(2).short_bytes(&[0xaa; 60]);
    }
    s.u8(7);
    out.push(("cap-area-full", s.0));
    out
}
