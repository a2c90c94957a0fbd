//! pci-epf-test's checksum and data pattern, as the device model computes them
//! (devices/src/epf.rs `crc32_le`, `fill_pattern`).
//!
//! CRC: Linux `crc32_le(~0, data)`, the reflected CRC-32 (polynomial 0xedb88320) with the
//! initial value ~0 and no final inversion; here eight bytes at a time (slicing-by-8, tables
//! built at compile time), about 30 instructions a word.

const POLY: u32 = 0xedb8_8320;

const TABLES: [[u32; 256]; 8] = {
    let mut t = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { POLY ^ (c >> 1) } else { c >> 1 };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut s = 1;
    while s < 8 {
        let mut i = 0;
        while i < 256 {
            let prev = t[s - 1][i];
            t[s][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
            i += 1;
        }
        s += 1;
    }
    t
};

/// The CRC's initial value (`crc32_le(~0, ..)`).
pub const CRC_INIT: u32 = !0;

/// Feeds the 8 bytes of `word` (little-endian, as memory holds it) into `crc`.
pub fn crc_word(crc: u32, word: u64) -> u32 {
    let lo = crc ^ word as u32;
    let hi = (word >> 32) as u32;
    TABLES[7][(lo & 0xff) as usize]
        ^ TABLES[6][((lo >> 8) & 0xff) as usize]
        ^ TABLES[5][((lo >> 16) & 0xff) as usize]
        ^ TABLES[4][(lo >> 24) as usize]
        ^ TABLES[3][(hi & 0xff) as usize]
        ^ TABLES[2][((hi >> 8) & 0xff) as usize]
        ^ TABLES[1][((hi >> 16) & 0xff) as usize]
        ^ TABLES[0][(hi >> 24) as usize]
}

const PHI: u64 = 0x9e37_79b9_7f4a_7c15;

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(PHI);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Word `index` (bytes `8 * index ..`) of what a WRITE to `base` stores: the device's
/// `fill_pattern(base, ..)`, read as a little-endian u64.
pub fn device_word(base: u64, index: u64) -> u64 {
    splitmix64(base ^ index.wrapping_mul(PHI))
}
