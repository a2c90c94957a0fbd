//! Target `msix`: an [`MsixCap`] with a fuzz-chosen vector count and table/PBA placement
//! (in one BAR or two), driven by table writes and reads of any width and offset, PBA reads,
//! MSI-X enable/function-mask writes through configuration space, vector triggers and
//! `take_deliverable`.
//!
//! Invariants, against a model of the table and PBA built from the PCI rules:
//! - the table reads back what was written through its masks (address bits 1:0 and vector
//!   control bits 31:1 read-only zero), bytes past the table read 0 and writes there are
//!   dropped; the PBA is read-only and reads the pending bits;
//! - a table write reports `Unchanged`, `Vector(v)` or `All` exactly as one, one or several
//!   entries changed; an enable/mask write reports `All` exactly when the state that matters
//!   for delivery changed;
//! - `trigger` sends the entry's message when enabled and unmasked, pends it (sets its PBA
//!   bit) when masked, and does nothing when disabled or out of range; `take_deliverable`
//!   returns exactly the pending, now unmasked vectors, in order, and clears their bits;
//! - `table_offset`/`pba_offset` claim exactly the accesses that start inside them;
//! - `add_to` refuses placements outside memory BARs, overlapping, or misaligned, and a
//!   refusal leaves configuration space unchanged.

use devices::pci::msi::RoutingChange;
use devices::pci::msix::{Delivery, MsixCap, MsixLocation};
use devices::pci::{BarKind, BarSpec, ConfigSpace, MsiMessage, PciHeader};

use crate::{Input, Seed};

const BAR_SIZE: u64 = 0x1_0000;

struct Model {
    entries: Vec<[u32; 4]>,
    pending: Vec<bool>,
    enabled: bool,
    fmask: bool,
}

impl Model {
    fn byte(&self, at: u64) -> Option<u8> {
        let e = self.entries.get(usize::try_from(at / 16).ok()?)?;
        Some((e[(at % 16 / 4) as usize] >> (at % 4 * 8)) as u8)
    }

    fn message(&self, v: usize) -> MsiMessage {
        let e = self.entries[v];
        MsiMessage {
            addr: u64::from(e[1]) << 32 | u64::from(e[0]),
            data: e[2],
            masked: self.fmask || e[3] & 1 != 0,
        }
    }
}

fn config() -> ConfigSpace {
    let mut cs = ConfigSpace::new(&PciHeader {
        vendor_id: 0x1af4,
        device_id: 0x1041,
        ..PciHeader::default()
    });
    for (index, kind) in [(0, BarKind::Memory32), (2, BarKind::Memory64)] {
        cs.add_bar(
            index,
            BarSpec {
                kind,
                size: BAR_SIZE,
                prefetchable: false,
            },
        )
        .unwrap();
    }
    // An I/O BAR that MSI-X must refuse.
    cs.add_bar(
        4,
        BarSpec {
            kind: BarKind::Io,
            size: 0x100,
            prefetchable: false,
        },
    )
    .unwrap();
    cs
}

fn regs(cs: &ConfigSpace) -> Vec<u32> {
    (0..64).map(|r| cs.read_reg(r)).collect()
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mut cs = config();

    // First an arbitrary placement; if refused, nothing may have changed.
    let vectors = input.u16();
    let table = MsixLocation {
        bar: usize::from(input.u8() % 8),
        offset: u64::from(input.u32()),
    };
    let pba = MsixLocation {
        bar: usize::from(input.u8() % 8),
        offset: u64::from(input.u32()),
    };
    let before = regs(&cs);
    let msix = match MsixCap::add_to(&mut cs, vectors, table, pba) {
        Ok(msix) => {
            let n = u64::from(vectors);
            assert!((1..=2048).contains(&vectors));
            for (loc, len) in [(table, n * 16), (pba, n.div_ceil(64) * 8)] {
                assert!(
                    matches!(loc.bar, 0 | 2),
                    "MSI-X structure in BAR{}",
                    loc.bar
                );
                assert_eq!(loc.offset % 8, 0);
                assert!(loc.offset + len <= BAR_SIZE);
            }
            msix
        }
        Err(_) => {
            assert_eq!(
                regs(&cs),
                before,
                "a refused MSI-X capability changed config space"
            );
            // A valid placement derived from the same bytes.
            let vectors = 1 + vectors % 2048;
            let table_len = u64::from(vectors) * 16;
            let table = MsixLocation {
                bar: if table.bar & 1 == 0 { 0 } else { 2 },
                offset: (table.offset % (BAR_SIZE - table_len + 1)) & !7,
            };
            let pba = MsixLocation {
                bar: if table.bar == 0 { 2 } else { 0 },
                offset: (pba.offset % 0x8000) & !7,
            };
            MsixCap::add_to(&mut cs, vectors, table, pba).expect("a valid MSI-X placement")
        }
    };
    let n = usize::from(msix.num_vectors());
    let cap = msix.offset();
    let mut msix = msix;
    let (table_loc, table_len) = msix.table();
    let (pba_loc, pba_len) = msix.pba();
    assert_eq!(table_len, n as u64 * 16);
    assert_eq!(pba_len, (n as u64).div_ceil(64) * 8);
    // Table size field (N - 1) and the BIR/offset registers are what the guest reads.
    assert_eq!(
        usize::from(cs.read_u16(cap + 2) & 0x7ff),
        n - 1,
        "table size field"
    );
    assert_eq!(
        u64::from(cs.read_u32(cap + 4)),
        table_loc.offset | table_loc.bar as u64
    );
    assert_eq!(
        u64::from(cs.read_u32(cap + 8)),
        pba_loc.offset | pba_loc.bar as u64
    );

    let mut m = Model {
        entries: vec![[0, 0, 0, 1]; n],
        pending: vec![false; n],
        enabled: false,
        fmask: false,
    };

    let mut ops = 0;
    while !input.is_empty() && ops < 1024 {
        ops += 1;
        match input.u8() % 9 {
            0 | 1 => {
                let off = match input.u8() {
                    0xff => u64::MAX - u64::from(input.u8()),
                    _ => u64::from(input.u16()) % (table_len + 32),
                };
                let len = input.width();
                let data = input.bytes(len).to_vec();
                let mut changed = Vec::new();
                for (i, &b) in data.iter().enumerate() {
                    let Some(at) = off.checked_add(i as u64) else {
                        break;
                    };
                    let Some(e) = usize::try_from(at / 16).ok().filter(|&e| e < n) else {
                        continue;
                    };
                    let word = (at % 16 / 4) as usize;
                    let writable = [0xffff_fffc, u32::MAX, u32::MAX, 1][word];
                    let shift = at % 4 * 8;
                    let w = writable & (0xff << shift);
                    let old = m.entries[e][word];
                    m.entries[e][word] = (old & !w) | ((u32::from(b) << shift) & w);
                    if m.entries[e][word] != old && !changed.contains(&e) {
                        changed.push(e);
                    }
                }
                let want = match changed.as_slice() {
                    [] => RoutingChange::Unchanged,
                    [e] => RoutingChange::Vector(*e as u16),
                    _ => RoutingChange::All,
                };
                let got = msix.table_write(off, &data);
                assert_eq!(got, want, "table write at {off:#x} of {data:?}");
            }
            2 => {
                let off = u64::from(input.u16()) % (table_len + 32);
                let mut buf = vec![0u8; input.width()];
                msix.table_read(off, &mut buf);
                for (i, &b) in buf.iter().enumerate() {
                    let want = m.byte(off + i as u64).unwrap_or(0);
                    assert_eq!(b, want, "table byte {:#x}", off + i as u64);
                }
            }
            3 => {
                let off = match input.u8() {
                    0xff => u64::MAX - u64::from(input.u8()),
                    _ => u64::from(input.u16()) % (pba_len + 16),
                };
                let mut buf = vec![0u8; input.width()];
                msix.pba_read(off, &mut buf);
                for (i, &b) in buf.iter().enumerate() {
                    let bit0 = off.saturating_add(i as u64).saturating_mul(8);
                    let want = (0..8u64).fold(0u8, |acc, k| {
                        let v = bit0.saturating_add(k);
                        let set = usize::try_from(v)
                            .ok()
                            .and_then(|v| m.pending.get(v))
                            .copied()
                            .unwrap_or(false);
                        acc | (u8::from(set) << k)
                    });
                    assert_eq!(b, want, "PBA byte {off:#x}+{i}");
                }
            }
            // Enable and function mask through configuration space (word or byte write).
            4 => {
                let v = input.u16();
                let (reg, shift_off, data) = if input.bool() {
                    // The capability is dword aligned: message control is bytes 2..4.
                    (cap / 4, 2, v.to_le_bytes().to_vec())
                } else {
                    (cap / 4, 3, vec![(v >> 8) as u8])
                };
                cs.write_reg(reg, shift_off as u64, &data);
                let (enabled, fmask) = (v & 0x8000 != 0, v & 0x4000 != 0);
                let relevant = enabled || m.enabled;
                let changed = (enabled, fmask) != (m.enabled, m.fmask);
                m.enabled = enabled;
                m.fmask = fmask;
                assert!(msix.contains_reg(reg));
                let got = msix.update(&cs);
                let want = if changed && relevant {
                    RoutingChange::All
                } else {
                    RoutingChange::Unchanged
                };
                assert_eq!(got, want, "MSI-X control write {v:#06x}");
                assert_eq!(msix.enabled(), enabled);
                // The table size stays read-only.
                assert_eq!(usize::from(cs.read_u16(cap + 2) & 0x7ff), n - 1);
            }
            5 => {
                let v = match input.u8() {
                    0xff => input.u16(),
                    b => u16::from(b) % (n as u16 + 2),
                };
                let want = match usize::from(v) {
                    v if v >= n => Delivery::NoSuchVector,
                    _ if !m.enabled => Delivery::Disabled,
                    v if m.message(v).masked => {
                        m.pending[v] = true;
                        Delivery::Pending
                    }
                    v => Delivery::Send(m.message(v)),
                };
                assert_eq!(msix.trigger(v), want, "trigger {v}");
                assert_eq!(
                    msix.is_pending(v),
                    m.pending.get(usize::from(v)) == Some(&true)
                );
            }
            6 => {
                let want: Vec<(u16, MsiMessage)> = if m.enabled {
                    (0..n)
                        .filter(|&v| m.pending[v] && !m.message(v).masked)
                        .map(|v| (v as u16, m.message(v)))
                        .collect()
                } else {
                    Vec::new()
                };
                for &(v, _) in &want {
                    m.pending[usize::from(v)] = false;
                }
                assert_eq!(msix.take_deliverable(), want);
            }
            7 => {
                let bar = usize::from(input.u8() % 7);
                let off = u64::from(input.u32()) % (BAR_SIZE + 64);
                let inside = |loc: MsixLocation, len: u64| {
                    (bar == loc.bar && off >= loc.offset && off < loc.offset + len)
                        .then(|| off - loc.offset)
                };
                assert_eq!(msix.table_offset(bar, off), inside(table_loc, table_len));
                assert_eq!(msix.pba_offset(bar, off), inside(pba_loc, pba_len));
            }
            _ => {
                let want: Vec<(u16, MsiMessage)> = if m.enabled {
                    (0..n).map(|v| (v as u16, m.message(v))).collect()
                } else {
                    Vec::new()
                };
                assert!(msix.vectors().eq(want.into_iter()), "vectors()");
                for v in 0..n.min(4) {
                    assert_eq!(msix.message(v as u16), Some(m.message(v)));
                }
                assert_eq!(msix.message(n as u16), None);
            }
        }
    }
}

/// Seeds: a driver's setup of a few vectors, masking, triggering and unmasking.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    let table_write = |s: &mut Seed, off: u16, data: &[u8]| {
        s.u8(0).u8(0).u16(off).width(data.len()).bytes(data);
    };

    // 8 vectors, table at BAR0+0x1000, PBA at BAR0+0x2000.
    let mut s = Seed::new();
    s.u16(8).u8(0).u32(0x1000).u8(0).u32(0x2000);
    for v in 0..4u16 {
        table_write(&mut s, v * 16, &0xfee0_0000u32.to_le_bytes());
        table_write(&mut s, v * 16 + 8, &(0x40 + u32::from(v)).to_le_bytes());
        table_write(&mut s, v * 16 + 12, &0u32.to_le_bytes());
    }
    s.u8(4).u16(0xc000).u8(1); // enable + function mask
    s.u8(5).u8(1).u8(5).u8(2); // trigger 1, 2: pending
    s.u8(3).u16(0).width(8);
    s.u8(4).u16(0x8000).u8(1); // unmask the function
    s.u8(6);
    s.u8(5).u8(3).u8(5).u8(7); // 3 sends, 7 is masked
    s.u8(2).u16(0x70).width(16);
    s.u8(8);
    out.push(("driver-setup", s.0));

    // A placement MSI-X must refuse (I/O BAR), then 2048 vectors over two BARs.
    let mut s = Seed::new();
    s.u16(2048).u8(4).u32(0).u8(0).u32(0);
    s.u8(7).u8(0).u32(0x10);
    s.u8(0).u8(0xff).u8(3).width(8).bytes(&[0xff; 8]);
    s.u8(3).u8(0xff).u8(0).width(4);
    s.u8(8);
    out.push(("refused-then-big", s.0));

    // A 64-bit BAR table with 1 vector; qword accesses.
    let mut s = Seed::new();
    s.u16(1).u8(2).u32(0x8).u8(2).u32(0x100);
    table_write(&mut s, 0, &0x0000_0001_fee0_1003u64.to_le_bytes());
    table_write(&mut s, 8, &0x0000_0001_0000_0021u64.to_le_bytes());
    s.u8(4).u16(0x8000).u8(1);
    s.u8(5).u8(0).u8(6).u8(3).u16(0).width(8);
    out.push(("one-vector", s.0));
    out
}
