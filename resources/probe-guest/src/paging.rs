//! The probe's own identity map: 2 MiB pages over [0, max(4 GiB, top of RAM)), at most
//! `MAX_GIB`. Only the entries in use are written (the table area is not zeroed as a whole).

use core::ptr::addr_of;

use crate::boot::GIB;
use crate::io::phys;

/// Page directories reserved in entry.S (`probe_pt_pd`).
pub const MAX_GIB: u64 = 64;
const MIN_GIB: u64 = 4;

const PRESENT: u64 = 1;
const WRITABLE: u64 = 2;
const HUGE: u64 = 0x80;
const PAGE_2M: u64 = 2 << 20;

extern "C" {
    static probe_pt_pml4: u8;
    static probe_pt_pdpt: u8;
    static probe_pt_pd: u8;
}

/// Identity maps [0, `gib` GiB) and switches to it; returns the mapped limit in bytes.
/// `gib` is clamped to [4, MAX_GIB].
pub fn build(gib: u64) -> u64 {
    let gib = gib.clamp(MIN_GIB, MAX_GIB);
    let pml4 = addr_of!(probe_pt_pml4) as u64;
    let pdpt = addr_of!(probe_pt_pdpt) as u64;
    let pd = addr_of!(probe_pt_pd) as u64;
    for i in 0..512 {
        phys::write64(pml4 + i * 8, 0);
    }
    phys::write64(pml4, pdpt | PRESENT | WRITABLE);
    for i in 0..512 {
        let entry = if i < gib {
            (pd + i * 4096) | PRESENT | WRITABLE
        } else {
            0
        };
        phys::write64(pdpt + i * 8, entry);
    }
    let mut entry = PRESENT | WRITABLE | HUGE;
    let mut slot = pd;
    for _ in 0..gib * 512 {
        phys::write64(slot, entry);
        entry += PAGE_2M;
        slot += 8;
    }
    // SAFETY: the new map is a superset of the low 1 GiB (4 GiB for PVH) we run in.
    unsafe { crate::cpu::load_cr3(pml4) };
    gib * GIB
}
