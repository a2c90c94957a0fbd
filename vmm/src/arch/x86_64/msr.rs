//! Model-specific registers every vCPU starts with. ARCH_CAPABILITIES (0x10a) is deliberately
//! absent: this project's nested KVM refuses writes to it (DESIGN.md section 4).

use kvm_bindings::{kvm_msr_entry, Msrs};

/// IA32_TSC.
pub const MSR_TSC: u32 = 0x10;
/// IA32_SYSENTER_CS.
pub const MSR_SYSENTER_CS: u32 = 0x174;
/// IA32_SYSENTER_ESP.
pub const MSR_SYSENTER_ESP: u32 = 0x175;
/// IA32_SYSENTER_EIP.
pub const MSR_SYSENTER_EIP: u32 = 0x176;
/// IA32_MISC_ENABLE.
pub const MSR_MISC_ENABLE: u32 = 0x1a0;
/// IA32_MTRR_DEF_TYPE.
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// STAR.
pub const MSR_STAR: u32 = 0xc000_0081;
/// LSTAR.
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// CSTAR.
pub const MSR_CSTAR: u32 = 0xc000_0083;
/// SFMASK.
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
/// KERNEL_GS_BASE.
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// The MSR the nested KVM here refuses; never in the boot list.
pub const MSR_ARCH_CAPABILITIES: u32 = 0x10a;

const MISC_ENABLE_FAST_STRING: u64 = 1 << 0;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_TYPE_WRBACK: u64 = 6;

/// (index, value) pairs written to every vCPU before it runs.
pub const BOOT_MSRS: [(u32, u64); 11] = [
    (MSR_SYSENTER_CS, 0),
    (MSR_SYSENTER_ESP, 0),
    (MSR_SYSENTER_EIP, 0),
    (MSR_STAR, 0),
    (MSR_CSTAR, 0),
    (MSR_KERNEL_GS_BASE, 0),
    (MSR_SYSCALL_MASK, 0),
    (MSR_LSTAR, 0),
    (MSR_TSC, 0),
    (MSR_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    // Memory defaults to write-back with MTRRs on; without it Linux maps all RAM uncached.
    (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WRBACK),
];

/// [`BOOT_MSRS`] in the form `KVM_SET_MSRS` takes.
pub fn boot_msrs() -> Result<Msrs, vmm_sys_util::fam::Error> {
    let entries: Vec<kvm_msr_entry> = BOOT_MSRS
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_list_never_writes_arch_capabilities() {
        assert!(BOOT_MSRS.iter().all(|&(i, _)| i != MSR_ARCH_CAPABILITIES));
        assert_eq!(boot_msrs().unwrap().as_slice().len(), BOOT_MSRS.len());
    }
}
