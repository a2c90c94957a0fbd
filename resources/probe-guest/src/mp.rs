//! Intel MultiProcessor Specification table: count the enabled processors.

use crate::io::phys;

const MP_FLOATING_SIGNATURE: u32 = u32::from_le_bytes(*b"_MP_");
const MP_CONFIG_SIGNATURE: u32 = u32::from_le_bytes(*b"PCMP");
const CONFIG_HEADER_SIZE: u64 = 44;

/// Enabled processors listed by the first valid MP table, if there is one.
pub fn count_cpus() -> Option<u64> {
    // The EBDA segment is at 0x40e, the base memory size (KiB) at 0x413 (BIOS data area).
    let ebda = (phys::u16(0x40e) as u64) << 4;
    let base_kib = phys::u16(0x413) as u64;
    let base_end = if (1..=640).contains(&base_kib) {
        base_kib * 1024
    } else {
        640 * 1024
    };
    if (0x500..0xa0000).contains(&ebda) {
        if let Some(cpus) = scan(ebda, ebda + 1024) {
            return Some(cpus);
        }
    }
    if let Some(cpus) = scan(base_end - 1024, base_end) {
        return Some(cpus);
    }
    if let Some(cpus) = scan(0xf0000, 0x100000) {
        return Some(cpus);
    }
    None
}

fn scan(start: u64, end: u64) -> Option<u64> {
    let mut at = start & !15;
    while at + 16 <= end {
        if phys::read64(at) as u32 == MP_FLOATING_SIGNATURE {
            if let Some(cpus) = floating_pointer(at) {
                return Some(cpus);
            }
        }
        at += 16;
    }
    None
}

fn checksum_ok(start: u64, len: u64) -> bool {
    let mut sum = 0u8;
    for i in 0..len {
        sum = sum.wrapping_add(phys::u8(start + i));
    }
    sum == 0
}

fn floating_pointer(at: u64) -> Option<u64> {
    let len = phys::u8(at + 8) as u64 * 16;
    if len == 0 || !checksum_ok(at, len) {
        return None;
    }
    let config = phys::u32(at + 4) as u64;
    let default_config = phys::u8(at + 11);
    if config == 0 {
        // No table: a default configuration (all of them have two processors), or nothing.
        return if default_config != 0 { Some(2) } else { None };
    }
    if config >= 0x1_0000_0000 || phys::u32(config) != MP_CONFIG_SIGNATURE {
        return None;
    }
    let base_len = phys::u16(config + 4) as u64;
    if base_len < CONFIG_HEADER_SIZE || !checksum_ok(config, base_len) {
        return None;
    }
    let entries = phys::u16(config + 34);
    let end = config + base_len;
    let mut at = config + CONFIG_HEADER_SIZE;
    let mut cpus = 0;
    for _ in 0..entries {
        if at >= end {
            break;
        }
        match phys::u8(at) {
            0 => {
                // Processor entry: flags at 3, bit 0 = enabled.
                if phys::u8(at + 3) & 1 != 0 {
                    cpus += 1;
                }
                at += 20;
            }
            1..=4 => at += 8,
            _ => break,
        }
    }
    Some(cpus)
}
