//! The KVM virtual machine (stage `kvm`): /dev/kvm, the VM fd with its in-kernel irqchip and
//! PIT, the CPUID KVM supports, and the exit notifier every part that can stop the guest
//! shares. Guest RAM is registered as memory slots by the `memory` stage.

use std::sync::Arc;

use devices::exit::StopHandle;
use devices::ExitNotifier;
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use pinning::{Classify, ErrorClass};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::x86_64::mptable;
use crate::memory::layout::{KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR};
use crate::memory::GuestMemory;

/// Why the VM could not be created or its memory registered.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error("/dev/kvm does not exist: load the kvm module (kvm_intel or kvm_amd) and enable virtualization in the firmware")]
    NoDevice,
    #[error("permission denied opening /dev/kvm: add the user to the 'kvm' group or run as root")]
    Permission,
    #[error("opening /dev/kvm failed: {0}")]
    Open(kvm_ioctls::Error),
    #[error("KVM lacks the {0} capability this VMM needs: use a newer host kernel")]
    MissingCap(&'static str),
    #[error(
        "{requested} vCPUs requested; this VMM supports 1..={max} here: give --cpus {max} or fewer"
    )]
    CpuCount { requested: u8, max: usize },
    #[error("{what} failed: {source}")]
    Ioctl {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("creating the exit notifier's eventfd failed: {0}")]
    ExitNotifier(std::io::Error),
    #[error("registering guest memory slot {slot} ({start:#x}, {size:#x} bytes) with KVM failed: {source}")]
    Register {
        slot: u32,
        start: u64,
        size: u64,
        source: kvm_ioctls::Error,
    },
}

impl Classify for KvmError {
    fn class(&self) -> ErrorClass {
        match self {
            KvmError::NoDevice | KvmError::Permission | KvmError::CpuCount { .. } => {
                ErrorClass::User
            }
            _ => ErrorClass::Internal,
        }
    }
}

/// The KVM VM: what the `kvm` stage builds.
pub struct Vm {
    fd: Arc<VmFd>,
    supported_cpuid: CpuId,
    exit: Arc<ExitNotifier>,
    _kvm: Kvm,
}

fn open_error(e: kvm_ioctls::Error) -> KvmError {
    match e.errno() {
        libc::ENOENT | libc::ENXIO | libc::ENODEV => KvmError::NoDevice,
        libc::EACCES | libc::EPERM => KvmError::Permission,
        _ => KvmError::Open(e),
    }
}

impl Vm {
    /// Opens /dev/kvm and creates a VM for `cpus` vCPUs with its irqchip and PIT.
    pub fn new(cpus: u8) -> Result<Vm, KvmError> {
        let kvm = Kvm::new().map_err(open_error)?;
        for (cap, name) in [
            (Cap::Irqchip, "IRQCHIP"),
            (Cap::UserMemory, "USER_MEMORY"),
            (Cap::SetTssAddr, "SET_TSS_ADDR"),
            (Cap::Pit2, "PIT2"),
            (Cap::Irqfd, "IRQFD"),
            (Cap::ImmediateExit, "IMMEDIATE_EXIT"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(KvmError::MissingCap(name));
            }
        }
        let max = kvm.get_max_vcpus().min(usize::from(mptable::MAX_CPUS));
        if cpus == 0 || usize::from(cpus) > max {
            return Err(KvmError::CpuCount {
                requested: cpus,
                max,
            });
        }
        let ioctl = |what| move |source| KvmError::Ioctl { what, source };
        let fd = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
        fd.set_tss_address(KVM_TSS_ADDR as usize)
            .map_err(ioctl("KVM_SET_TSS_ADDR"))?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
            .map_err(ioctl("KVM_SET_IDENTITY_MAP_ADDR"))?;
        fd.create_irq_chip().map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
        // The dummy speaker port (0x61) stays in the kernel: Linux polls it to calibrate.
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(ioctl("KVM_CREATE_PIT2"))?;
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))?;
        let exit = ExitNotifier::new().map_err(KvmError::ExitNotifier)?;
        Ok(Vm {
            fd: Arc::new(fd),
            supported_cpuid,
            exit: Arc::new(exit),
            _kvm: kvm,
        })
    }

    /// Registers every region of guest RAM as a KVM memory slot (slots from 0).
    pub fn register_memory(&self, memory: &GuestMemory) -> Result<(), KvmError> {
        for (slot, region) in memory.mem.iter().enumerate() {
            let slot = slot as u32;
            let start = region.start_addr().raw_value();
            let register = |source| KvmError::Register {
                slot,
                start,
                size: region.len(),
                source,
            };
            let host = memory
                .mem
                .get_host_address(region.start_addr())
                .map_err(|_| register(kvm_ioctls::Error::new(libc::EFAULT)))?;
            let mr = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: start,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mapping of `memory_size` bytes owned by `memory`.
            // The builder's `Machine` drops this VM before guest memory; on an error path
            // before the guest runs no vCPU exists to reach it through the slot.
            unsafe { self.fd.set_user_memory_region(mr) }.map_err(register)?;
        }
        Ok(())
    }

    /// The VM fd (vCPUs, irqfds, GSI routes, BAR slots, KVM's VFIO device).
    pub fn fd(&self) -> &Arc<VmFd> {
        &self.fd
    }

    /// The CPUID entries KVM supports, filtered per vCPU at the `vcpus` stage.
    pub fn supported_cpuid(&self) -> &CpuId {
        &self.supported_cpuid
    }

    /// The notifier that devices, vCPUs and signals use to stop the guest.
    pub fn exit(&self) -> &Arc<ExitNotifier> {
        &self.exit
    }

    /// A handle to stop the VM from elsewhere (another thread, a signal handler).
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle::new(Arc::clone(&self.exit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_kvm_open_errors_say_what_to_do() {
        let e = |n| open_error(kvm_ioctls::Error::new(n)).to_string();
        assert!(e(libc::ENOENT).starts_with("/dev/kvm does not exist: load the kvm module"));
        assert!(e(libc::EACCES).contains("add the user to the 'kvm' group or run as root"));
        assert!(e(libc::EBUSY).starts_with("opening /dev/kvm failed"));
    }
}
