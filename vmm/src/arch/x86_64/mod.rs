//! x86_64 boot: descriptor tables, registers, CPUID, MSRs, the MP table, the ACPI tables and
//! the boot information blocks (Linux zero page, PVH start info).

pub mod acpi;
pub mod boot_params;
pub mod cpuid;
pub mod gdt;
pub mod mptable;
pub mod msr;
pub mod regs;
