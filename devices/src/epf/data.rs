//! What pci-epf-test computes over the bytes it moves: the CHECKSUM (Linux's `crc32_le`) and
//! the deterministic pattern WRITE sends, shared with the fuzz targets that check the model.

use guest_abi::epf::{pattern, CHECKSUM_SEED, CRC32_TABLE};

/// Linux's `crc32_le(seed, data)`: the reflected CRC-32 (`guest_abi::epf::CRC32_POLY`) without pre- or
/// post-inversion.
pub fn crc32_le(seed: u32, data: &[u8]) -> u32 {
    data.iter().fold(seed, |crc, &b| {
        CRC32_TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8)
    })
}

/// The CHECKSUM of `data` as pci-epf-test and `pci_endpoint_test` compute it.
pub fn checksum(data: &[u8]) -> u32 {
    crc32_le(CHECKSUM_SEED, data)
}

/// Fills `buf` with bytes `offset..offset + buf.len()` of the pattern WRITE sends to `base`:
/// byte `p` is byte `p % 8` (little-endian) of [`pattern::word`]`(base, p / 8)`.
pub fn fill_pattern(base: u64, offset: u64, buf: &mut [u8]) {
    let word = |index: u64| pattern::word(base, index);
    let mut current = (u64::MAX, [0u8; 8]);
    for (i, b) in buf.iter_mut().enumerate() {
        let p = offset.wrapping_add(i as u64);
        if current.0 != p / 8 {
            current = (p / 8, word(p / 8).to_le_bytes());
        }
        *b = current.1[(p % 8) as usize];
    }
}
