//! Target `vfio_msix`: the passthrough model's MSI-X shadow (`devices/src/vfio/irqs.rs`)
//! through [`devices::vfio::VfioPciDevice`], with the `vfio_pci` harness
//! ([`crate::vfio_pci`]) always giving the fake device an MSI-X capability (any vector count,
//! table anywhere in a memory BAR, PBA in the same BAR or another) and spending most
//! operations on table writes and reads of every width and offset, PBA reads and writes,
//! enable/function-mask writes, firmware placement and the device raising vectors.
//!
//! Invariants (those of `vfio_pci`, the MSI-X ones in full): masked vectors (entry or
//! function mask) are never routed nor delivered; a vector raised while masked shows in the
//! PBA and is delivered exactly once when unmasked, and never after MSI-X was switched off;
//! table reads return what was written; no route exists past the table; PBA writes and
//! table accesses never reach the device.

use crate::vfio_pci::{run_with, Focus};
use crate::Seed;

/// Runs one input.
pub fn run(data: &[u8]) {
    run_with(data, Focus::Msix);
}

/// Seeds: a driver's MSI-X setup, a vector raised while masked, then unmasked.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    // Op bytes in this mix: 0 place, 1 read, 2 write, 3 raise, 4 control, 9 config read.
    let header = |s: &mut Seed, vectors: u16, table: u32, pba: u32| {
        s.u8(0).u32(0x1234_8086).u32(0x0200_0001).u32(0).u8(0);
        for _ in 0..6 {
            s.u8(0).u8(0);
        }
        s.u8(0).u8(4).u16(vectors).u32(table).u32(pba).u8(0);
    };
    let table_write = |s: &mut Seed, off: u16, v: u32| {
        s.u8(2).u8(0).u16(off + 16).width(4).u32(v);
    };
    let mut out = Vec::new();

    let mut s = Seed::new();
    header(&mut s, 7, 0x2000, 0x3000);
    s.u8(0).u8(0).u64(0xc000_0000).u8(1);
    for v in 0..4u16 {
        table_write(&mut s, v * 16, 0xfee0_0000);
        table_write(&mut s, v * 16 + 8, 0x40 + u32::from(v));
    }
    s.u8(4).u16(0xc000).u8(1); // enable, function masked
    s.u8(3).u16(1).u8(3).u16(2); // raised while masked
    s.u8(1).u8(1).u16(16).width(8); // PBA
    table_write(&mut s, 16 + 12, 0); // unmask entry 1: still function-masked
    s.u8(4).u16(0x8000).u8(1); // lift the function mask: 1 is delivered
    s.u8(3).u16(1).u8(3).u16(7); // 1 live; 7 past the table
    s.u8(1).u8(0).u16(16).width(16);
    out.push(("driver-setup", s.0));

    let mut s = Seed::new();
    header(&mut s, 0x7ff, 0x8, 0x3ff8 | 2);
    s.u8(4).u16(0x8000).u8(0);
    s.u8(3).u16(2047);
    s.u8(2).u8(1).u16(16).width(8).u64(u64::MAX);
    s.u8(4).u16(0).u8(1);
    s.u8(1).u8(1).u16(16 + 255).width(1);
    out.push(("big-table", s.0));
    out
}
