//! Port I/O and raw physical memory access (everything the probe touches is identity mapped).

use core::arch::asm;

/// Writes a byte to an I/O port.
pub fn outb(port: u16, value: u8) {
    // SAFETY: port writes have no memory effects visible to Rust.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for `outb`.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    }
    value
}

/// Writes a word to an I/O port.
pub fn outw(port: u16, value: u16) {
    // SAFETY: as for `outb`.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") value, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a word from an I/O port.
pub fn inw(port: u16) -> u16 {
    let value: u16;
    // SAFETY: as for `outb`.
    unsafe {
        asm!("in ax, dx", in("dx") port, out("ax") value, options(nomem, nostack, preserves_flags))
    }
    value
}

/// Writes a dword to an I/O port.
pub fn outl(port: u16, value: u32) {
    // SAFETY: as for `outb`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a dword from an I/O port.
pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: as for `outb`.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack, preserves_flags))
    }
    value
}

/// Physical memory and MMIO accesses. Callers make sure the address is mapped (identity) and non-zero.
pub mod phys {
    use core::ptr::{read_unaligned, read_volatile, write_volatile};

    pub fn u8(addr: u64) -> u8 {
        // SAFETY: see the module docs.
        unsafe { read_volatile(addr as *const u8) }
    }

    pub fn u16(addr: u64) -> u16 {
        // SAFETY: see the module docs.
        unsafe { read_unaligned(addr as *const u16) }
    }

    pub fn u32(addr: u64) -> u32 {
        // SAFETY: see the module docs.
        unsafe { read_unaligned(addr as *const u32) }
    }

    pub fn u64(addr: u64) -> u64 {
        // SAFETY: see the module docs.
        unsafe { read_unaligned(addr as *const u64) }
    }

    /// Volatile aligned 64-bit read (memory test, checksums).
    pub fn read64(addr: u64) -> u64 {
        // SAFETY: see the module docs; the caller passes an 8-byte aligned address.
        unsafe { read_volatile(addr as *const u64) }
    }

    /// Volatile aligned 32-bit read (device registers).
    pub fn read32(addr: u64) -> u32 {
        // SAFETY: see the module docs; the caller passes a 4-byte aligned address.
        unsafe { read_volatile(addr as *const u32) }
    }

    /// Volatile aligned 32-bit write (device registers).
    pub fn write32(addr: u64, value: u32) {
        // SAFETY: see the module docs; the caller owns the register or memory it writes.
        unsafe { write_volatile(addr as *mut u32, value) }
    }

    /// Volatile aligned 64-bit write (memory test, page tables).
    pub fn write64(addr: u64, value: u64) {
        // SAFETY: see the module docs; the caller owns the memory it writes.
        unsafe { write_volatile(addr as *mut u64, value) }
    }
}
