//! Initial register state of the boot vCPU for the two entry protocols, and the identity page
//! tables the 64-bit entry needs.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use super::gdt::{self, SEL_CODE32, SEL_CODE64, SEL_DATA, SEL_TSS};
use crate::memory::layout::{
    BOOT_STACK_TOP, GDT_ADDR, IDT_ADDR, PDPT_ADDR, PD_ADDR, PML4_ADDR, PVH_INFO_ADDR,
    ZERO_PAGE_ADDR,
};

const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
// Bit 1 of RFLAGS is reserved and always reads as one.
const RFLAGS_RESERVED: u64 = 1 << 1;

const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_HUGE: u64 = 1 << 7;

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// Linux 64-bit boot protocol: long mode, paging on, RSI = zero page.
    Linux64,
    /// PVH: 32-bit protected mode, paging off, EBX = `hvm_start_info`.
    Pvh,
}

/// Writes PML4 -> PDPT -> PD mapping the first 1 GiB with 2 MiB pages, identity.
pub fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), GuestMemoryError> {
    mem.write_obj(
        PDPT_ADDR | PTE_PRESENT | PTE_WRITABLE,
        GuestAddress(PML4_ADDR),
    )?;
    mem.write_obj(
        PD_ADDR | PTE_PRESENT | PTE_WRITABLE,
        GuestAddress(PDPT_ADDR),
    )?;
    let mut pd = Vec::with_capacity(512 * 8);
    for i in 0..512u64 {
        pd.extend_from_slice(&((i << 21) | PTE_PRESENT | PTE_WRITABLE | PTE_HUGE).to_le_bytes());
    }
    mem.write_slice(&pd, GuestAddress(PD_ADDR))
}

/// Special registers for `mode`, starting from what KVM reported (`base`) so fields we do not
/// care about (APIC base, interrupt bitmap) keep their defaults.
pub fn boot_sregs(mode: EntryMode, base: kvm_sregs) -> kvm_sregs {
    let mut s = base;
    s.gdt.base = GDT_ADDR;
    s.gdt.limit = gdt::GDT_LIMIT;
    s.idt.base = IDT_ADDR;
    s.idt.limit = 0;
    let data = gdt::segment(SEL_DATA);
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = gdt::segment(SEL_TSS);
    match mode {
        EntryMode::Linux64 => {
            s.cs = gdt::segment(SEL_CODE64);
            s.cr0 = CR0_PE | CR0_ET | CR0_PG;
            s.cr3 = PML4_ADDR;
            s.cr4 = CR4_PAE;
            s.efer = EFER_LME | EFER_LMA;
        }
        EntryMode::Pvh => {
            s.cs = gdt::segment(SEL_CODE32);
            s.cr0 = CR0_PE | CR0_ET;
            s.cr3 = 0;
            s.cr4 = 0;
            s.efer = 0;
        }
    }
    s
}

/// General registers for `mode` entering at `entry`.
pub fn boot_regs(mode: EntryMode, entry: u64) -> kvm_regs {
    let mut r = kvm_regs {
        rip: entry,
        rflags: RFLAGS_RESERVED,
        ..Default::default()
    };
    match mode {
        EntryMode::Linux64 => {
            r.rsp = BOOT_STACK_TOP;
            r.rbp = BOOT_STACK_TOP;
            r.rsi = ZERO_PAGE_ADDR;
        }
        EntryMode::Pvh => r.rbx = PVH_INFO_ADDR,
    }
    r
}

/// FPU state after FNINIT plus the SSE control default.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::layout::MIB;

    #[test]
    fn page_tables_identity_map_first_gib() {
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 * MIB as usize)]).unwrap();
        write_page_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4, PDPT_ADDR | 3);
        let pdpt: u64 = mem.read_obj(GuestAddress(PDPT_ADDR)).unwrap();
        assert_eq!(pdpt, PD_ADDR | 3);
        let last: u64 = mem.read_obj(GuestAddress(PD_ADDR + 511 * 8)).unwrap();
        assert_eq!(last, (511 << 21) | 0x83);
    }

    #[test]
    fn long_mode_and_pvh_register_sets() {
        let s = boot_sregs(EntryMode::Linux64, kvm_sregs::default());
        assert_eq!(
            (s.cs.selector, s.ds.selector, s.cr3, s.efer),
            (0x10, 0x18, 0x9000, 0x500)
        );
        assert_eq!(s.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
        assert_eq!(s.cr4, CR4_PAE);
        let r = boot_regs(EntryMode::Linux64, 0x100_0000);
        assert_eq!(
            (r.rip, r.rsp, r.rbp, r.rsi, r.rflags),
            (0x100_0000, 0x8ff0, 0x8ff0, 0x7000, 2)
        );

        let s = boot_sregs(EntryMode::Pvh, kvm_sregs::default());
        assert_eq!((s.cs.selector, s.cs.db, s.cs.l), (0x08, 1, 0));
        assert_eq!(s.cr0 & CR0_PG, 0);
        assert_eq!(s.efer, 0);
        let r = boot_regs(EntryMode::Pvh, 0x100_0000);
        assert_eq!((r.rbx, r.rsi), (0x6000, 0));
    }
}
