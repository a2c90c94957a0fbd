//! Target `ecam`: the ECAM window ([`PciEcam`]) over bus 0, with reads and writes of every
//! width at any offset (all of bus 0, other buses, offsets near 2^64).
//!
//! Invariants (see `bus_model` for the reference twins):
//! - an access of 1, 2 or 4 bytes inside one dword of bus 0 reaches exactly the function
//!   and register that `bus << 20 | device << 15 | function << 12 | register` names, and an
//!   aligned 8-byte access is the two dword accesses; anything else reads all ones and
//!   changes nothing;
//! - a read returns the addressed bytes of the register, all ones where no function is;
//! - a write changes the addressed function exactly as a direct config write does and no
//!   other function, and its effects reach the handler once, with the function's address,
//!   only when there are some.

use devices::pci::{PciAddress, PciEcam, ECAM_BUS_SIZE};
use devices::BusDevice;

use crate::bus_model::Rig;
use crate::{Input, Seed};

/// (address, dword register, byte in it) of a 1/2/4-byte access inside one dword of bus 0.
fn decode(offset: u64, len: usize) -> Option<(PciAddress, usize, u64)> {
    let byte = offset % 4;
    if !matches!(len, 1 | 2 | 4) || byte + len as u64 > 4 || offset >= ECAM_BUS_SIZE {
        return None;
    }
    Some((
        PciAddress {
            bus: 0,
            device: (offset >> 15) as u8 & 31,
            function: (offset >> 12) as u8 & 7,
        },
        (offset % 4096 / 4) as usize,
        byte,
    ))
}

/// The accesses a `len`-byte access at `offset` is made of.
fn parts(offset: u64, len: usize) -> Vec<(u64, std::ops::Range<usize>)> {
    if len == 8 && offset.is_multiple_of(8) {
        vec![(offset, 0..4), (offset + 4, 4..8)]
    } else {
        vec![(offset, 0..len)]
    }
}

fn offset(input: &mut Input<'_>) -> u64 {
    match input.u8() % 8 {
        // A register of a function of bus 0.
        0..=4 => {
            let device = u64::from(input.u8() % 32);
            let function = u64::from(input.u8() % 8);
            device << 15 | function << 12 | u64::from(input.u16() % 4096)
        }
        // The start of another bus (the window may be registered larger than bus 0).
        5 => u64::from(input.u8()) << 20 | u64::from(input.u16() % 4096),
        6 => u64::MAX - u64::from(input.u8()),
        _ => input.u64(),
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mut rig = Rig::new(&mut input);
    let mut ecam = PciEcam::new(rig.bus.clone()).with_effects_handler(rig.handler());
    let mut expected = Vec::new();
    let mut ops = 0;
    while !input.is_empty() && ops < 256 {
        ops += 1;
        let write = input.u8() & 1 == 1;
        let off = offset(&mut input);
        let len = input.width();
        if write {
            let data = input.bytes(len).to_vec();
            for (at, range) in parts(off, data.len()) {
                if let Some((addr, reg, byte)) = decode(at, range.len()) {
                    expected.extend(rig.expected_write(addr, reg, byte, &data[range]));
                }
            }
            ecam.write(off, &data);
            rig.check(
                &mut expected,
                &format!("ECAM write at {off:#x} of {data:?}"),
            );
        } else {
            let mut buf = vec![0u8; len];
            ecam.read(off, &mut buf);
            for (at, range) in parts(off, len) {
                let want = match decode(at, range.len()) {
                    Some((addr, reg, byte)) => {
                        let v = rig.expected_read(addr, reg).to_le_bytes();
                        v[byte as usize..byte as usize + range.len()].to_vec()
                    }
                    None => vec![0xff; range.len()],
                };
                assert_eq!(buf[range], want[..], "ECAM read at {off:#x}, {len} bytes");
            }
        }
    }
    rig.check(&mut expected, "at the end");
}

/// Seeds: an OS's enumeration and BAR programming through ECAM, and odd accesses.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let at = |s: &mut Seed, write: bool, dev: u8, func: u8, reg: u16| {
        s.u8(u8::from(write)).u8(0).u8(dev).u8(func).u16(reg);
    };
    let mut out = Vec::new();

    let mut s = Seed::new();
    s.u8(2).u8(2).u8(0).u8(1 | 4 << 2).u8(3).u8(0).u8(0);
    for dev in 0..5 {
        at(&mut s, false, dev, 0, 0);
        s.width(4);
        at(&mut s, false, dev, 0, 0xe);
        s.width(1);
    }
    // Size and place the epf register BAR, enable memory decode and bus mastering.
    at(&mut s, true, 1, 0, 0x10);
    s.width(4).u32(u32::MAX);
    at(&mut s, false, 1, 0, 0x10);
    s.width(4);
    at(&mut s, true, 1, 0, 0x10);
    s.width(4).u32(0xc000_0000);
    at(&mut s, true, 1, 0, 0x4);
    s.width(2).u16(6);
    // MSI enable on the epf function (capability at 0x40).
    at(&mut s, true, 1, 0, 0x42);
    s.width(2).u16(1);
    // 8-byte read of a 64-bit BAR of a plain function, extended space.
    at(&mut s, false, 2, 0, 0x18);
    s.width(8);
    at(&mut s, false, 2, 0, 0x100);
    s.width(4);
    out.push(("enumerate", s.0));

    let mut s = Seed::new();
    s.u8(0);
    at(&mut s, false, 0, 0, 3);
    s.width(2);
    at(&mut s, true, 0, 1, 4);
    s.width(4).u32(7);
    s.u8(0).u8(5).u8(1).u16(0);
    s.width(4);
    s.u8(1).u8(6).u8(3).width(8).u64(u64::MAX);
    s.u8(0).u8(7).u64(0x0000_0000_0000_8004).width(8);
    out.push(("odd", s.0));
    out
}
