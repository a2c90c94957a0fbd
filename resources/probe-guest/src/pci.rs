//! PCI bus 0 through configuration mechanism 1 (ports 0xcf8 / 0xcfc).

use crate::console::Line;
use crate::io::{inl, outl};

const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;

pub fn config_read(bus: u8, dev: u8, func: u8, reg: u8) -> u32 {
    let address = 0x8000_0000
        | (bus as u32) << 16
        | ((dev as u32) & 0x1f) << 11
        | ((func as u32) & 7) << 8
        | (reg as u32 & 0xfc);
    outl(CONFIG_ADDRESS, address);
    inl(CONFIG_DATA)
}

/// Prints one line per function on bus 0; returns how many there were.
pub fn enumerate_bus0() -> u32 {
    let mut found = 0;
    for dev in 0..32u8 {
        let id = config_read(0, dev, 0, 0);
        if id & 0xffff == 0xffff {
            continue;
        }
        let multi = (config_read(0, dev, 0, 0x0c) >> 16) & 0x80 != 0;
        let funcs = if multi { 8 } else { 1 };
        for func in 0..funcs {
            let id = if func == 0 {
                id
            } else {
                config_read(0, dev, func, 0)
            };
            if id & 0xffff == 0xffff {
                continue;
            }
            let class = config_read(0, dev, func, 0x08) >> 8;
            Line::new()
                .s("pci 00:")
                .hexw(dev as u64, 2)
                .s(".")
                .hexw(func as u64, 1)
                .s(" ")
                .hexw((id & 0xffff) as u64, 4)
                .s(":")
                .hexw((id >> 16) as u64, 4)
                .s(" class ")
                .hexw(class as u64, 6)
                .end();
            found += 1;
        }
    }
    found
}
