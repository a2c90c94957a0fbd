//! The boot GDT. One table serves both entry protocols: the 64-bit Linux entry wants
//! `__BOOT_CS` = 0x10 and `__BOOT_DS` = 0x18 (Documentation/arch/x86/boot.rst), PVH wants flat
//! 32-bit code and data, so slot 1 holds a 32-bit code segment and slot 2 a 64-bit one.
//!
//! Four entries fill 0x500..0x520 exactly, up to the IDT. The task register only needs its
//! hidden state (VM entry checks that, the guest never reloads the boot TR), so the TSS has
//! no GDT slot: its selector 0x20 is just past the table and is replaced by the guest's own.

use kvm_bindings::kvm_segment;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use crate::memory::layout::{GDT_ADDR, IDT_ADDR};

/// 32-bit flat code (PVH entry).
pub const SEL_CODE32: u16 = 0x08;
/// 64-bit code (Linux 64-bit entry).
pub const SEL_CODE64: u16 = 0x10;
/// Flat data for both.
pub const SEL_DATA: u16 = 0x18;
/// Task state segment selector for TR (VM entry needs a usable TR); not in the table.
pub const SEL_TSS: u16 = 0x20;

// Access byte + flags nibble, laid out as in the descriptor's bytes 5..7:
// 0xG D/B L AVL _ P DPL S TYPE.
const FLAGS_CODE32: u16 = 0xc09b; // G, D=32-bit, present, code exec/read, accessed
const FLAGS_CODE64: u16 = 0xa09b; // G, L=64-bit, present, code exec/read, accessed
const FLAGS_DATA: u16 = 0xc093; // G, B=32-bit, present, data read/write, accessed
const FLAGS_TSS: u16 = 0x008b; // byte granular, present, system, 32/64-bit busy TSS
                               // Minimal 32-bit TSS size - 1 (what PVH specifies for TR).
const TSS_LIMIT: u32 = 0x67;

/// The table written at [`GDT_ADDR`].
pub const GDT: [u64; 4] = [
    0,
    gdt_entry(FLAGS_CODE32, 0, 0xfffff),
    gdt_entry(FLAGS_CODE64, 0, 0xfffff),
    gdt_entry(FLAGS_DATA, 0, 0xfffff),
];

/// Encodes a segment descriptor.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    let flags = flags as u64;
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// The hidden part of a segment register, as KVM wants it, for `selector` (a GDT slot, or
/// [`SEL_TSS`]).
pub fn segment(selector: u16) -> kvm_segment {
    let e = match GDT.get(usize::from(selector >> 3)) {
        Some(&e) => e,
        None if selector == SEL_TSS => gdt_entry(FLAGS_TSS, 0, TSS_LIMIT),
        None => 0,
    };
    descriptor_to_segment(e, selector)
}

fn descriptor_to_segment(e: u64, selector: u16) -> kvm_segment {
    let base = ((e >> 16) & 0x00ff_ffff) | ((e >> 32) & 0xff00_0000);
    let raw_limit = (e & 0xffff) | ((e >> 32) & 0x000f_0000);
    let g = ((e >> 55) & 1) as u8;
    // With G set the limit counts 4 KiB pages; KVM wants it in bytes.
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = ((e >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit: limit as u32,
        selector,
        type_: ((e >> 40) & 0xf) as u8,
        present,
        dpl: ((e >> 45) & 3) as u8,
        db: ((e >> 54) & 1) as u8,
        s: ((e >> 44) & 1) as u8,
        l: ((e >> 53) & 1) as u8,
        g,
        avl: ((e >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// GDT limit as loaded into GDTR.
pub const GDT_LIMIT: u16 = (std::mem::size_of::<[u64; 4]>() - 1) as u16;

/// Writes the GDT and an empty IDT.
pub fn write_tables(mem: &GuestMemoryMmap) -> Result<(), GuestMemoryError> {
    for (i, e) in GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + 8 * i as u64))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_decode_to_flat_segments() {
        let cs = segment(SEL_CODE64);
        assert_eq!(
            (cs.base, cs.limit, cs.l, cs.db, cs.type_, cs.present),
            (0, 0xffff_ffff, 1, 0, 0xb, 1)
        );
        assert_eq!((cs.s, cs.g, cs.dpl, cs.selector), (1, 1, 0, 0x10));
        let cs32 = segment(SEL_CODE32);
        assert_eq!((cs32.l, cs32.db, cs32.type_), (0, 1, 0xb));
        let ds = segment(SEL_DATA);
        assert_eq!((ds.type_, ds.db, ds.s, ds.limit), (3, 1, 1, 0xffff_ffff));
        let tss = segment(SEL_TSS);
        assert_eq!(
            (tss.type_, tss.s, tss.present, tss.unusable),
            (0xb, 0, 1, 0)
        );
        assert_eq!((tss.limit, tss.g, tss.selector), (0x67, 0, 0x20));
        // The table ends where the IDT starts.
        assert_eq!(GDT_ADDR + u64::from(GDT_LIMIT) + 1, IDT_ADDR);
        assert_eq!(segment(0).unusable, 1);
    }

    #[test]
    fn known_encodings() {
        // The classic flat 64-bit code descriptor.
        assert_eq!(gdt_entry(FLAGS_CODE64, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(FLAGS_DATA, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(
            gdt_entry(0x0093, 0x1234_5678, 0xabcde),
            0x120a_9334_5678_bcde
        );
    }
}
