//! TSS (with the exception stack as IST 1), IDT for the 32 exception vectors and the first 32
//! interrupt vectors (gates set by `apic`), the exception report, and the machine exit.

use core::arch::asm;
use core::ptr::addr_of;

use guest_abi::exit::{EXCEPTION, I8042_RESET};
use guest_abi::ports::{DEBUG_EXIT, I8042_COMMAND};
use guest_abi::probe::RESULT_FAIL;

use crate::console::Line;
use crate::global::Global;
use crate::io::outb;

pub const SEL_TSS: u16 = 0x18;

extern "C" {
    static mut probe_gdt: [u64; 5];
    static probe_exception_stubs: [u64; 32];
    static probe_exception_stack_top: u8;
}

/// 64-bit TSS: only IST 1 is used.
#[repr(C, packed)]
struct Tss {
    reserved0: u32,
    rsp: [u64; 3],
    reserved1: u64,
    ist: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    iomap_base: u16,
}

static TSS: Global<Tss> = Global::new(Tss {
    reserved0: 0,
    rsp: [0; 3],
    reserved1: 0,
    ist: [0; 7],
    reserved2: 0,
    reserved3: 0,
    iomap_base: 0,
});

/// Gates: the 32 exceptions, then interrupt vectors up to 63 (not present until set).
pub const IDT_VECTORS: usize = 64;

/// 16-byte gates, as pairs of u64.
#[repr(C, align(16))]
struct Idt([[u64; 2]; IDT_VECTORS]);
static IDT: Global<Idt> = Global::new(Idt([[0; 2]; IDT_VECTORS]));

#[repr(C, packed)]
struct DescriptorPointer {
    limit: u16,
    base: u64,
}

/// Installs the TSS and the IDT. The GDT itself was loaded by the entry code.
pub fn init() {
    // SAFETY: single CPU, interrupts off; the statics are ours and live forever.
    unsafe {
        let tss = TSS.as_ptr();
        let ist1 = addr_of!(probe_exception_stack_top) as u64;
        core::ptr::write_unaligned(core::ptr::addr_of_mut!((*tss).ist[0]), ist1);
        core::ptr::write_unaligned(core::ptr::addr_of_mut!((*tss).iomap_base), 104);

        // 64-bit available TSS descriptor (type 9, present), 16 bytes at selector 0x18.
        let base = tss as u64;
        let limit = (core::mem::size_of::<Tss>() - 1) as u64;
        let low = (limit & 0xffff)
            | ((base & 0xff_ffff) << 16)
            | (0x89 << 40)
            | (((limit >> 16) & 0xf) << 48)
            | (((base >> 24) & 0xff) << 56);
        let gdt = core::ptr::addr_of_mut!(probe_gdt) as *mut u64;
        core::ptr::write_volatile(gdt.add(3), low);
        core::ptr::write_volatile(gdt.add(4), base >> 32);
        asm!("ltr {0:x}", in(reg) SEL_TSS, options(nostack, preserves_flags));

        let idt = IDT.as_ptr() as *mut [u64; 2];
        let stubs = addr_of!(probe_exception_stubs) as *const u64;
        for vector in 0..32 {
            set_gate(vector as u8, core::ptr::read_volatile(stubs.add(vector)), 1);
        }
        let pointer = DescriptorPointer {
            limit: (IDT_VECTORS * 16 - 1) as u16,
            base: idt as u64,
        };
        asm!("lidt [{0}]", in(reg) &pointer, options(readonly, nostack, preserves_flags));
    }
}

/// Points IDT gate `vector` at `handler`: an interrupt gate (IF cleared on entry), present,
/// DPL 0, code selector 0x08, running on stack IST `ist` (1 to 7; the red zone is on, so no
/// handler may run on the interrupted stack).
pub fn set_gate(vector: u8, handler: u64, ist: u8) {
    if vector as usize >= IDT_VECTORS {
        return;
    }
    let low = (handler & 0xffff)
        | (0x08 << 16)
        | ((ist as u64 & 7) << 32)
        | (0x8e << 40)
        | (((handler >> 16) & 0xffff) << 48);
    // SAFETY: in bounds; the IDT is only written here, with interrupts off or for a vector
    // that cannot be raised yet.
    unsafe {
        let gate = (IDT.as_ptr() as *mut [u64; 2]).add(vector as usize) as *mut u64;
        core::ptr::write_volatile(gate, low);
        core::ptr::write_volatile(gate.add(1), handler >> 32);
    }
}

/// Sets interrupt stack `n` (1 to 7) of the TSS to `top`.
pub fn set_ist(n: usize, top: u64) {
    if !(1..=7).contains(&n) {
        return;
    }
    // SAFETY: single CPU; the CPU reads the TSS only when it takes an interrupt through IST n,
    // and no gate uses IST n before it is set.
    unsafe {
        let tss = TSS.as_ptr();
        core::ptr::write_unaligned(core::ptr::addr_of_mut!((*tss).ist[n - 1]), top);
    }
}

/// `sti`.
pub fn enable_interrupts() {
    // SAFETY: every vector that can arrive has a gate (the device's, the spurious one).
    unsafe { asm!("sti", options(nomem, nostack)) };
}

/// `cli`.
pub fn disable_interrupts() {
    // SAFETY: only stops interrupt delivery.
    unsafe { asm!("cli", options(nomem, nostack)) };
}

/// `pause` (spin-wait hint).
pub fn pause() {
    // SAFETY: no effects beyond a delay.
    unsafe { asm!("pause", options(nomem, nostack, preserves_flags)) };
}

/// Reads a model-specific register.
pub fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: the caller names an MSR that exists (else #GP, reported as an exception).
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    (hi as u64) << 32 | lo as u64
}

/// Writes a model-specific register.
pub fn wrmsr(msr: u32, value: u64) {
    // SAFETY: as for `rdmsr`; the caller knows what the write does.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nostack, preserves_flags))
    };
}

/// What the exception stubs push, then what the CPU pushed.
#[repr(C)]
pub struct ExceptionFrame {
    vector: u64,
    error: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

const EXCEPTION_NAMES: [&str; 32] = [
    "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS", "#NP", "#SS",
    "#GP", "#PF", "-", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "-", "-", "-", "-", "-", "-",
    "#HV", "#VC", "#SX", "-",
];

/// Called by the exception stubs (on the IST stack): report and exit with [`EXCEPTION`].
#[no_mangle]
extern "C" fn probe_exception(frame: &ExceptionFrame) -> ! {
    let name = EXCEPTION_NAMES
        .get(frame.vector as usize)
        .copied()
        .unwrap_or("?");
    let line = Line::new()
        .s("exception ")
        .dec(frame.vector)
        .s(" ")
        .s(name)
        .s(" error ")
        .hex(frame.error)
        .s(" rip ")
        .hex(frame.rip)
        .s(" rsp ")
        .hex(frame.rsp);
    if frame.vector == 14 {
        let cr2: u64;
        // SAFETY: reading CR2 has no side effects.
        unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags)) };
        line.s(" cr2 ").hex(cr2).end();
    } else {
        line.end();
    }
    Line::new()
        .s(text!(RESULT_FAIL, "exception "))
        .dec(frame.vector)
        .s(" at rip ")
        .hex(frame.rip)
        .end();
    exit(EXCEPTION)
}

/// Ends the run: the exit device first; without one, an i8042 reset; then halt for good.
pub fn exit(status: u8) -> ! {
    outb(DEBUG_EXIT, status);
    outb(I8042_COMMAND, I8042_RESET);
    loop {
        // SAFETY: stopping the CPU.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// Waits forever with interrupts enabled but none able to arrive (both PICs masked; the
/// LAPIC's LVT entries stay masked as at reset; the pci-epf-test device, if the probe set it
/// up, is idle): the vCPU sleeps in HLT, costing nothing,
/// and the VMM does not take it for a finished guest (that is HLT with interrupts off).
pub fn idle_forever() -> ! {
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
    loop {
        // SAFETY: nothing can interrupt us (all masked), so sti; hlt just parks the CPU.
        unsafe { asm!("sti", "hlt", options(nomem, nostack)) };
    }
}

/// Loads CR3.
///
/// # Safety
/// `pml4` must be a valid top-level table that maps the running code, data and stacks.
pub unsafe fn load_cr3(pml4: u64) {
    asm!("mov cr3, {}", in(reg) pml4, options(nostack, preserves_flags));
}
