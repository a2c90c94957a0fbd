//! The local APIC (xAPIC, memory mapped) and the one device interrupt the probe takes: its
//! handler counts and sends EOI; the probe waits for the count with a bounded spin.

use core::ptr::{addr_of, addr_of_mut, read_volatile};

use crate::cpu;
use crate::io::{outb, phys};

/// Vector of the device's MSI/MSI-X message.
pub const DEVICE_VECTOR: u8 = 0x30;
/// Spurious-interrupt vector (SVR); its handler does nothing (no EOI for spurious ones).
pub const SPURIOUS_VECTOR: u8 = 0x3f;
/// Stack the interrupt handlers run on (TSS IST 2).
const IRQ_IST: u8 = 2;

const MSR_APIC_BASE: u32 = 0x1b;
const APIC_BASE_ENABLE: u64 = 1 << 11;
const APIC_BASE_X2APIC: u64 = 1 << 10;
/// Where MSI messages go, whatever the LAPIC's own base.
pub const MSI_ADDRESS_BASE: u64 = 0xfee0_0000;

mod reg {
    pub const ID: u64 = 0x20;
    pub const TPR: u64 = 0x80;
    pub const EOI: u64 = 0xb0;
    pub const SVR: u64 = 0xf0;
    pub const LVT_LINT0: u64 = 0x350;
}
const SVR_ENABLE: u32 = 1 << 8;
const LVT_MASKED: u32 = 1 << 16;

core::arch::global_asm!(
    r#"
    .section .text.irq, "ax", @progbits
    .code64
    .globl probe_irq_device
probe_irq_device:
    pushq %rax
    incq probe_irq_count(%rip)
    movq probe_eoi_addr(%rip), %rax
    movl $0, (%rax)
    popq %rax
    iretq

    .globl probe_irq_spurious
probe_irq_spurious:
    iretq

    .section .data.irq, "aw", @progbits
    .balign 8
    .globl probe_irq_count, probe_eoi_addr
probe_irq_count:
    .quad 0
probe_eoi_addr:
    .quad 0xfee000b0

    .section .nozero.irq, "aw", @nobits
    .balign 16
    .skip 4096
    .globl probe_irq_stack_top
probe_irq_stack_top:
"#,
    options(att_syntax)
);

extern "C" {
    fn probe_irq_device();
    fn probe_irq_spurious();
    static mut probe_irq_count: u64;
    static mut probe_eoi_addr: u64;
    static probe_irq_stack_top: u8;
}

/// Why the LAPIC cannot take the device's interrupt.
#[derive(Clone, Copy)]
pub enum ApicError {
    /// x2APIC mode is on: the MMIO registers are gone (the probe only speaks xAPIC).
    X2apic,
    /// The base is not below the mapped limit.
    Unmapped(u64),
}

/// The BSP's LAPIC, software-enabled, with the device and spurious gates installed.
pub struct Lapic {
    pub id: u8,
}

/// Enables the LAPIC (globally and in SVR), sets TPR 0, masks LINT0 and both 8259s (no PIC
/// or timer interrupt can arrive), and installs the gates. Interrupts stay off.
pub fn init(mapped: u64) -> Result<Lapic, ApicError> {
    let mut msr = cpu::rdmsr(MSR_APIC_BASE);
    if msr & APIC_BASE_X2APIC != 0 {
        return Err(ApicError::X2apic);
    }
    if msr & APIC_BASE_ENABLE == 0 {
        msr |= APIC_BASE_ENABLE;
        cpu::wrmsr(MSR_APIC_BASE, msr);
    }
    let base = msr & 0x000f_ffff_ffff_f000;
    if base + 0x1000 > mapped {
        return Err(ApicError::Unmapped(base));
    }
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
    // SAFETY: single CPU, interrupts off: nothing else touches these.
    unsafe {
        addr_of_mut!(probe_eoi_addr).write_volatile(base + reg::EOI);
        addr_of_mut!(probe_irq_count).write_volatile(0);
    }
    cpu::set_ist(IRQ_IST as usize, addr_of!(probe_irq_stack_top) as u64);
    cpu::set_gate(DEVICE_VECTOR, probe_irq_device as *const () as u64, IRQ_IST);
    cpu::set_gate(
        SPURIOUS_VECTOR,
        probe_irq_spurious as *const () as u64,
        IRQ_IST,
    );
    phys::write32(base + reg::LVT_LINT0, LVT_MASKED);
    phys::write32(base + reg::TPR, 0);
    phys::write32(base + reg::SVR, SVR_ENABLE | SPURIOUS_VECTOR as u32);
    Ok(Lapic {
        id: (phys::read32(base + reg::ID) >> 24) as u8,
    })
}

impl Lapic {
    /// MSI address that targets this LAPIC (physical destination mode, fixed delivery).
    pub fn msi_address(&self) -> u64 {
        MSI_ADDRESS_BASE | (self.id as u64) << 12
    }
}

/// Device interrupts taken so far.
pub fn irq_count() -> u64 {
    // SAFETY: an aligned u64 the handler increments with one instruction on this CPU.
    unsafe { read_volatile(addr_of!(probe_irq_count)) }
}

/// Spins (with `pause`) until more than `seen` device interrupts were taken, at most `spins`
/// times; returns whether one came.
pub fn wait_irq(seen: u64, spins: u32) -> bool {
    for _ in 0..spins {
        if irq_count() > seen {
            return true;
        }
        cpu::pause();
    }
    irq_count() > seen
}
