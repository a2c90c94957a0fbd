//! pci-epf-test's checksum and data pattern (`guest_abi::epf`), as the device model computes
//! them (devices/src/epf.rs `crc32_le`, `fill_pattern`).
//!
//! CRC: Linux `crc32_le(CHECKSUM_SEED, data)`, the reflected CRC-32 with `guest_abi::epf::CRC32_POLY` and no
//! final inversion; here eight bytes at a time (slicing-by-8, tables built at compile time).
//!
//! Guest instructions are expensive here (a few million a second under the emulated KVM), so
//! the check of a whole page ([`check_page`]) is one hand-scheduled loop: the splitmix64 word,
//! the compare and the CRC step with the CRC in a register, about 37 instructions a word
//! (the compiler's version of the same loop took 53, spilling the CRC and reloading constants).

use core::arch::asm;

use guest_abi::epf::pattern::{self, MIX1, MIX2, PHI};
use guest_abi::epf::{CHECKSUM_SEED, CRC32_TABLE};

const TABLES: [[u32; 256]; 8] = {
    let mut t = [[0u32; 256]; 8];
    t[0] = CRC32_TABLE;
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

/// The tables in memory, for [`check_page`]'s absolute addressing.
static CRC_TABLES: [[u32; 256]; 8] = TABLES;

/// Feeds the 8 bytes of `word` (little-endian, as memory holds it) into `crc`.
pub const fn crc_word(crc: u32, word: u64) -> u32 {
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

/// The CRC of `words` copies of `word` from an initial value of 0: what XOR-ing every word of
/// a buffer with `word` does to its CRC (the CRC is linear: `crc(init, a ^ b) = crc(init, a) ^
/// crc(0, b)` for equal lengths).
pub const fn xor_mask_crc(word: u64, words: u64) -> u32 {
    let mut crc = 0;
    let mut i = 0;
    while i < words {
        crc = crc_word(crc, word);
        i += 1;
    }
    crc
}

/// Bytes [`check_page`] covers.
pub const PAGE_BYTES: u64 = 4096;

/// One word of the page loop (`OFF`: the word's offset from the loop pointer): the
/// splitmix64 word into rax from `k` = index * PHI (left in rax for the CRC step), compared
/// with memory (mismatch: to label 3 with the pointer at this word's pair), then the CRC
/// step: rax ^= crc, eight table lookups by byte (movzx from al/ah, so rax, rcx and rdx are
/// fixed registers).
macro_rules! word_step {
    ($k:literal, $off:literal) => {
        concat!(
            "mov rax, ",
            $k,
            "\n",
            "xor rax, {base}\n",
            "add rax, {phi}\n",
            "mov rdx, rax\n",
            "shr rdx, 30\n",
            "xor rax, rdx\n",
            "imul rax, {c1}\n",
            "mov rdx, rax\n",
            "shr rdx, 27\n",
            "xor rax, rdx\n",
            "imul rax, {c2}\n",
            "mov rdx, rax\n",
            "shr rdx, 31\n",
            "xor rax, rdx\n",
            "cmp rax, qword ptr [{base} + {idx} + ",
            $off,
            "]\n",
            "jne 3f\n",
            "xor rax, {crc}\n",
            "movzx ecx, al\n",
            "movzx edx, ah\n",
            "mov {crc:e}, dword ptr [{t} + rcx*4 + 7168]\n",
            "xor {crc:e}, dword ptr [{t} + rdx*4 + 6144]\n",
            "shr rax, 16\n",
            "movzx ecx, al\n",
            "movzx edx, ah\n",
            "xor {crc:e}, dword ptr [{t} + rcx*4 + 5120]\n",
            "xor {crc:e}, dword ptr [{t} + rdx*4 + 4096]\n",
            "shr rax, 16\n",
            "movzx ecx, al\n",
            "movzx edx, ah\n",
            "xor {crc:e}, dword ptr [{t} + rcx*4 + 3072]\n",
            "xor {crc:e}, dword ptr [{t} + rdx*4 + 2048]\n",
            "shr eax, 16\n",
            "movzx ecx, al\n",
            "movzx edx, ah\n",
            "xor {crc:e}, dword ptr [{t} + rcx*4 + 1024]\n",
            "xor {crc:e}, dword ptr [{t} + rdx*4]\n",
        )
    };
}

/// Checks the [`PAGE_BYTES`] at `base` (8-byte aligned, mapped) against what a WRITE to `base`
/// stores ([`pattern::word`]) and computes their CRC (from [`CHECKSUM_SEED`]) in the same pass.
/// `Ok(crc)`, or `Err(index)` of the first word that differs.
pub fn check_page(base: u64) -> Result<u32, u64> {
    let mut crc = CHECKSUM_SEED as u64;
    // Runs from -PAGE_BYTES up to 0, two words a round; addresses are base + idx + PAGE_BYTES.
    let mut idx = (PAGE_BYTES as i64).wrapping_neg() as u64;
    let matched: u64;
    // SAFETY: reads the page (the caller's) and the CRC tables; writes only registers.
    unsafe {
        asm!(
            "2:",
            word_step!("{k}", "4096"),
            "add {k}, {phi}",
            word_step!("{k}", "4104"),
            "add {k}, {phi}",
            "add {idx}, 16",
            "jnz 2b",
            "mov {m}, 1",
            "jmp 4f",
            "3:",
            "xor {m:e}, {m:e}",
            "4:",
            base = in(reg) base,
            idx = inout(reg) idx,
            k = inout(reg) 0u64 => _,
            crc = inout(reg) crc,
            m = out(reg) matched,
            phi = in(reg) PHI,
            c1 = in(reg) MIX1,
            c2 = in(reg) MIX2,
            t = in(reg) CRC_TABLES.as_ptr(),
            out("rax") _,
            out("rcx") _,
            out("rdx") _,
            options(nostack, readonly),
        );
    }
    if matched != 0 {
        return Ok(crc as u32);
    }
    // A mismatch in the round at idx: the first or the second word (k says which).
    let first = (idx.wrapping_add(PAGE_BYTES)) / 8;
    Err(first + u64::from(phys_word(base, first) == pattern::word(base, first)))
}

fn phys_word(base: u64, index: u64) -> u64 {
    crate::io::phys::read64(base + index * 8)
}
