//! Seeds for `vfio_pci`.

use crate::Seed;

/// Seeds for `vfio_pci`: a driver's probe (BAR sizing, placement, command, capability walk).
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut s = Seed::new();
    s.u8(0)
        .u32(0x1234_8086)
        .u32(0x0200_0001)
        .u32(0x0001_8086)
        .u8(1);
    // BAR0 32-bit 64 KiB mmap-able, BAR1 I/O 256 bytes, BAR2 64-bit 1 MiB, others absent.
    s.u8(0x80).u8(0x40 | 16).u32(0x1000).u32(0x4000);
    s.u8(1).u8(0x40 | 8);
    s.u8(0x0c).u8(0x40 | 20);
    s.u8(0).u8(0).u8(0).u8(0).u8(0).u8(0);
    // MSI-X (4 vectors, table BAR0+0, PBA BAR0+0x800) at 0x40, MSI at 0x50, vendor at 0x60.
    s.u8(3);
    s.u8(0x40).u8(1).u16(3).u32(0).u32(0x800).u8(0);
    s.u8(0x50).u8(0).u16(0x0180).u8(0);
    s.u8(0x60).u8(2).u8(0x09).short_bytes(&[1, 2, 3, 4]).u8(0);
    for bar in 0..6u8 {
        s.u8(2).u8(bar);
    }
    s.u8(3).u8(0).u64(0xc000_0000).u8(1);
    s.u8(3).u8(1).u64(0xc000).u8(1);
    s.u8(3).u8(2).u64(0x8_0000_0000).u8(1);
    s.u8(1).u8(1).u8(0).width(2).u16(0x0407);
    for reg in [0u8, 1, 2, 3, 12, 13, 16, 17, 20, 24, 0x40] {
        s.u8(0).u8(reg);
    }
    s.u8(4).u8(2).u8(0).u16(0x10).width(4);
    s.u8(5).u8(2).u8(0).u16(0x1000).width(4).u32(7);
    let probe = s.0;

    // Odd shapes: huge registers, crossing writes, a looping chain, 256-byte space.
    let mut s = Seed::new();
    s.u8(1).u32(0).u32(0).u32(0).u8(0);
    s.u8(0).u8(0x40 | 12).u8(0).u8(0).u8(4).u8(0x40 | 33);
    s.u8(0).u8(0).u8(0).u8(0).u8(0).u8(0);
    s.u8(2).u8(0x48).u8(0).u16(0x0100).u8(1).u8(0x48);
    s.u8(0x48).u8(3).u8(0x10).u8(0);
    s.u8(0).u8(0xff).u8(0);
    s.u8(1).u8(0xff).u8(3).u8(0).width(4).u32(1);
    s.u8(1).u8(3).u8(3).width(16).bytes(&[0xff; 16]);
    s.u8(1).u8(11).u8(0).width(8).bytes(&[0xff; 8]);
    s.u8(1).u8(0xfe).u16(0x3ff).u8(2).width(4).u32(0xffff_ffff);
    s.u8(0).u8(0xfe).u16(0x41);
    let odd = s.0;
    vec![("probe", probe), ("odd", odd)]
}
