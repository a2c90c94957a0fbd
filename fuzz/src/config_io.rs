//! Target `config_io`: configuration mechanism #1 ([`PciConfigIo`], I/O ports 0xCF8..0xCFF)
//! with address and data accesses of every width at every port offset, and the ECAM window
//! over the same bus as a second view.
//!
//! Invariants (see `bus_model` for the reference twins):
//! - CONFIG_ADDRESS takes only dword writes at 0xCF8 and keeps the enable, bus, device,
//!   function and register bits (reserved bits 30:24 and 1:0 read 0); it reads back only as
//!   a dword; every other access to 0xCF8..0xCFB reads all ones;
//! - a CONFIG_DATA access of 1, 2 or 4 bytes inside 0xCFC..0xCFF while the enable bit is set
//!   reaches exactly the function and register CONFIG_ADDRESS names (bus 0, function 0 of
//!   a present device), at the byte the port offset names; otherwise it reads all ones and
//!   writes nothing;
//! - a write changes that function as a direct config write does and no other; its effects
//!   reach the handler once, only when there are some;
//! - the ports and ECAM read the same value for every standard register.

use devices::pci::{PciAddress, PciConfigIo, PciEcam};
use devices::BusDevice;

use crate::bus_model::Rig;
use crate::{Input, Seed};

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mut rig = Rig::new(&mut input);
    let mut io = PciConfigIo::new(rig.bus.clone()).with_effects_handler(rig.handler());
    let mut ecam = PciEcam::new(rig.bus.clone());
    let mut address = 0u32;
    let mut expected = Vec::new();
    let decode = |address: u32| {
        (
            PciAddress {
                bus: (address >> 16) as u8,
                device: (address >> 11) as u8 & 31,
                function: (address >> 8) as u8 & 7,
            },
            (address as usize & 0xfc) / 4,
        )
    };
    let mut ops = 0;
    while !input.is_empty() && ops < 512 {
        ops += 1;
        let op = input.u8();
        let port = u64::from(op >> 1) % 10;
        let len = input.width();
        match op & 1 {
            1 => {
                let data = match (port, len) {
                    // Mostly enabled addresses of real registers.
                    (0, 4) if input.bool() => {
                        let v = 0x8000_0000
                            | u32::from(input.u8() % 6) << 11
                            | u32::from(input.u8()) << 2
                            | u32::from(input.u8() & 1) << 8;
                        v.to_le_bytes().to_vec()
                    }
                    _ => input.bytes(len).to_vec(),
                };
                if port == 0 && data.len() == 4 {
                    address = u32::from_le_bytes(data[..].try_into().unwrap()) & 0x80ff_fffc;
                }
                let at = port.wrapping_sub(4);
                if (4..8).contains(&port)
                    && matches!(data.len(), 1 | 2 | 4)
                    && at + data.len() as u64 <= 4
                    && address & 0x8000_0000 != 0
                {
                    let (addr, reg) = decode(address);
                    expected.extend(rig.expected_write(addr, reg, at, &data));
                }
                io.write(port, &data);
                rig.check(&mut expected, &format!("port write at +{port} of {data:?}"));
            }
            _ => {
                let mut buf = vec![0u8; len];
                io.read(port, &mut buf);
                let at = port.wrapping_sub(4);
                let want = if port == 0 && len == 4 {
                    address.to_le_bytes().to_vec()
                } else if (4..8).contains(&port)
                    && matches!(len, 1 | 2 | 4)
                    && at + len as u64 <= 4
                    && address & 0x8000_0000 != 0
                {
                    let (addr, reg) = decode(address);
                    let v = rig.expected_read(addr, reg).to_le_bytes();
                    v[at as usize..at as usize + len].to_vec()
                } else {
                    vec![0xff; len]
                };
                assert_eq!(
                    buf, want,
                    "port read at +{port}, {len} bytes, address {address:#x}"
                );
                // The same register through ECAM.
                let (addr, reg) = decode(address);
                if addr.bus == 0 {
                    let off = u64::from(addr.device) << 15
                        | u64::from(addr.function) << 12
                        | (reg as u64 * 4);
                    let mut e = [0u8; 4];
                    ecam.read(off, &mut e);
                    assert_eq!(
                        u32::from_le_bytes(e),
                        rig.expected_read(addr, reg),
                        "ECAM and the ports disagree on {addr} register {:#x}",
                        reg * 4
                    );
                }
            }
        }
    }
    rig.check(&mut expected, "at the end");
}

/// Seeds: Linux's mechanism #1 probe and a BAR sizing through the ports.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let write_addr = |s: &mut Seed, dev: u8, reg: u8| {
        s.u8(1).width(4).u8(1).u8(dev).u8(reg / 4).u8(0);
    };
    let data_read = |s: &mut Seed, byte: u8, len: usize| {
        s.u8((4 + byte) << 1).width(len);
    };
    let data_write = |s: &mut Seed, byte: u8, bytes: &[u8]| {
        s.u8((4 + byte) << 1 | 1).width(bytes.len()).bytes(bytes);
    };
    let mut out = Vec::new();

    let mut s = Seed::new();
    s.u8(1).u8(2).u8(0).u8(0);
    // pci_sanity_check: 0xCFB byte write, then a dword of CONFIG_ADDRESS read back.
    s.u8(3 << 1 | 1).width(1).u8(0);
    s.u8(1).width(4).u8(0).u32(0x8000_0000);
    s.u8(0).width(4);
    for dev in 0..4 {
        write_addr(&mut s, dev, 0);
        data_read(&mut s, 0, 4);
        data_read(&mut s, 2, 2);
        write_addr(&mut s, dev, 0x0c);
        data_read(&mut s, 2, 1);
    }
    write_addr(&mut s, 1, 0x10);
    data_write(&mut s, 0, &u32::MAX.to_le_bytes());
    data_read(&mut s, 0, 4);
    data_write(&mut s, 0, &0xc000_0000u32.to_le_bytes());
    write_addr(&mut s, 1, 0x04);
    data_write(&mut s, 0, &7u16.to_le_bytes());
    write_addr(&mut s, 1, 0x40);
    data_write(&mut s, 2, &1u16.to_le_bytes());
    data_read(&mut s, 0, 4);
    out.push(("probe", s.0));

    let mut s = Seed::new();
    s.u8(0);
    // Disabled address, other bus, unaligned and wide data accesses, 0xCF9.
    s.u8(1).width(4).u8(0).u32(0x0000_0800);
    data_read(&mut s, 0, 4);
    s.u8(1).width(4).u8(0).u32(0x8001_0000);
    data_read(&mut s, 0, 4);
    s.u8(1).width(4).u8(0).u32(0x8000_0804);
    data_read(&mut s, 3, 2);
    data_read(&mut s, 1, 4);
    data_read(&mut s, 0, 8);
    s.u8(1 << 1 | 1).width(1).u8(6);
    s.u8(1 << 1).width(1);
    s.u8(9 << 1).width(4);
    out.push(("odd", s.0));
    out
}
