//! The pieces every allow-list is made of: [`AllowList`] (system calls, each allowed outright
//! or only with certain arguments), the ioctl numbers by name, and what every thread of this
//! process needs whatever its kind ([`base`]).

use std::collections::BTreeMap;

use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};
use vmm_sys_util::ioctl::{ioctl_expr, _IOC_NONE, _IOC_READ, _IOC_WRITE};

/// One argument check: argument `arg` (0-based) compared with `value`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Check {
    arg: u8,
    op: Op,
    value: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    /// The low 32 bits equal `value` (ioctl requests, flags and signal numbers are C ints).
    Eq,
    /// The low 32 bits have none of the bits of `value` set.
    NoneOf,
    /// The low 32 bits have every bit of `value` set.
    AllOf,
}

impl Check {
    /// Argument `arg` is `value` (compared as a 32-bit int).
    pub(super) const fn eq(arg: u8, value: u64) -> Check {
        Check {
            arg,
            op: Op::Eq,
            value,
        }
    }

    /// Argument `arg` has none of the bits of `mask` set.
    pub(super) const fn none_of(arg: u8, mask: u64) -> Check {
        Check {
            arg,
            op: Op::NoneOf,
            value: mask,
        }
    }

    /// Argument `arg` has every bit of `mask` set.
    pub(super) const fn all_of(arg: u8, mask: u64) -> Check {
        Check {
            arg,
            op: Op::AllOf,
            value: mask,
        }
    }

    fn condition(self) -> Result<SeccompCondition, seccompiler::BackendError> {
        let (op, value) = match self.op {
            Op::Eq => (SeccompCmpOp::Eq, self.value),
            Op::NoneOf => (SeccompCmpOp::MaskedEq(self.value), 0),
            Op::AllOf => (SeccompCmpOp::MaskedEq(self.value), self.value),
        };
        SeccompCondition::new(self.arg, SeccompCmpArgLen::Dword, op, value)
    }
}

/// How a system call is allowed.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Rule {
    /// Whatever its arguments.
    Any,
    /// When one of these sets of checks holds (every check of the set).
    When(Vec<Vec<Check>>),
}

/// The system calls one kind of thread may make.
#[derive(Clone, Debug, Default)]
pub struct AllowList {
    calls: BTreeMap<i64, Rule>,
    /// The ioctl requests allowed, by name (for the summary and the tests).
    ioctls: BTreeMap<u64, &'static str>,
    /// `clone3` fails with ENOSYS instead of meeting the mismatch action ([`Self::threads`]).
    clone3_enosys: bool,
}

impl AllowList {
    /// Allows each of `calls` whatever its arguments.
    pub(super) fn allow(&mut self, calls: &[i64]) -> &mut Self {
        for &nr in calls {
            self.calls.insert(nr, Rule::Any);
        }
        self
    }

    /// Allows `call` when every one of `checks` holds (in addition to any way it was already
    /// allowed).
    pub(super) fn allow_when(&mut self, call: i64, checks: &[Check]) -> &mut Self {
        match self
            .calls
            .entry(call)
            .or_insert_with(|| Rule::When(Vec::new()))
        {
            Rule::Any => {}
            Rule::When(sets) => {
                if !sets.iter().any(|s| s == checks) {
                    sets.push(checks.to_vec());
                }
            }
        }
        self
    }

    /// Allows `call` when argument `arg` is one of `values`.
    pub(super) fn allow_values(&mut self, call: i64, arg: u8, values: &[u64]) -> &mut Self {
        for &v in values {
            self.allow_when(call, &[Check::eq(arg, v)]);
        }
        self
    }

    /// Threads of this kind start threads, and only threads: `clone` with CLONE_THREAD set
    /// (its flags are an argument the filter reads), while `clone3`, whose flags are in memory
    /// no filter can read, fails with ENOSYS, which makes glibc fall back to `clone`. So no
    /// thread of this kind can fork, and none meets the mismatch action for starting one.
    pub(super) fn threads(&mut self) -> &mut Self {
        self.clone3_enosys = true;
        self.allow_when(
            libc::SYS_clone,
            &[Check::all_of(0, libc::CLONE_THREAD as u64)],
        )
    }

    /// Whether `clone3` fails with ENOSYS under this list ([`Self::threads`]).
    pub fn clone3_fails_with_enosys(&self) -> bool {
        self.clone3_enosys
    }

    /// Allows `ioctl(fd, request, ..)` for each of `requests`, on any fd.
    pub(super) fn ioctls(&mut self, requests: &[Ioctl]) -> &mut Self {
        for r in requests {
            self.ioctls.insert(r.number, r.name);
            self.allow_when(libc::SYS_ioctl, &[Check::eq(1, r.number)]);
        }
        self
    }

    /// Whether `call` with these arguments passes (the filter's logic, for tests and docs).
    pub fn allows(&self, call: i64, args: &[u64; 6]) -> bool {
        match self.calls.get(&call) {
            None => false,
            Some(Rule::Any) => true,
            Some(Rule::When(sets)) => sets.iter().any(|set| {
                set.iter().all(|c| {
                    let a = args[usize::from(c.arg)] & 0xffff_ffff;
                    match c.op {
                        Op::Eq => a == c.value & 0xffff_ffff,
                        Op::NoneOf => a & c.value == 0,
                        Op::AllOf => a & c.value == c.value,
                    }
                })
            }),
        }
    }

    /// How many system calls are allowed (in any way).
    pub fn syscall_count(&self) -> usize {
        self.calls.len()
    }

    /// The ioctl requests allowed, by name.
    pub fn ioctl_names(&self) -> Vec<&'static str> {
        self.ioctls.values().copied().collect()
    }

    /// The names of the system calls allowed.
    pub fn syscall_names(&self) -> Vec<&'static str> {
        self.calls
            .keys()
            .map(|&nr| super::names::name(nr))
            .collect()
    }

    /// Compiles the list: allowed calls pass, anything else gets `mismatch` (SIGSYS or a log
    /// record).
    pub(super) fn compile(&self, mismatch: SeccompAction) -> Result<BpfProgram, String> {
        let mut rules = BTreeMap::new();
        for (&nr, rule) in &self.calls {
            let rule = match rule {
                Rule::Any => Vec::new(),
                Rule::When(sets) => sets
                    .iter()
                    .map(|set| {
                        let conds = set
                            .iter()
                            .map(|c| c.condition())
                            .collect::<Result<Vec<_>, _>>()?;
                        SeccompRule::new(conds)
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| e.to_string())?,
            };
            rules.insert(nr, rule);
        }
        let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
            .map_err(|e| e.to_string())?;
        let program = BpfProgram::try_from(filter).map_err(|e| e.to_string())?;
        Ok(match self.clone3_enosys {
            true => [clone3_enosys_preamble().as_slice(), &program].concat(),
            false => program,
        })
    }
}

/// A few instructions put before a compiled program: on x86_64, `clone3` returns ENOSYS;
/// anything else goes on to the program's own first instruction (which checks the
/// architecture again). seccompiler gives one action to every rule that matches, so this
/// one, which differs, is written by hand; its jumps stay inside it or land on the program's
/// start, and the program's own jumps are relative, so it is unchanged by what comes before.
fn clone3_enosys_preamble() -> Vec<sock_filter> {
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    // struct seccomp_data: the system call number at 0, the architecture at 4.
    const NR: u32 = 0;
    const ARCH: u32 = 4;
    let ld = |offset| sock_filter {
        code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
        jt: 0,
        jf: 0,
        k: offset,
    };
    let jeq = |k, jt, jf| sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    };
    vec![
        ld(ARCH),
        jeq(AUDIT_ARCH_X86_64, 0, 3), // another architecture: to the program
        ld(NR),
        jeq(libc::SYS_clone3 as u32, 0, 1), // not clone3: to the program
        sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
        },
    ]
}

/// An ioctl request number and its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ioctl {
    pub name: &'static str,
    pub number: u64,
}

const fn io(name: &'static str, ty: u32, nr: u32) -> Ioctl {
    Ioctl {
        name,
        number: ioctl_expr(_IOC_NONE, ty, nr, 0) as u64,
    }
}

const fn ior(name: &'static str, ty: u32, nr: u32, size: usize) -> Ioctl {
    Ioctl {
        name,
        number: ioctl_expr(_IOC_READ, ty, nr, size as u32) as u64,
    }
}

const fn iow(name: &'static str, ty: u32, nr: u32, size: usize) -> Ioctl {
    Ioctl {
        name,
        number: ioctl_expr(_IOC_WRITE, ty, nr, size as u32) as u64,
    }
}

const KVMIO: u32 = 0xae;
/// VFIO and iommufd share the ioctl type ';'.
const VFIO_TYPE: u32 = b';' as u32;
const VFIO_BASE: u32 = 100;
const IOMMUFD_BASE: u32 = 0x80;

/// The ioctl requests this VMM makes once set-up is over, by name.
pub(super) mod ioctl {
    use std::mem::size_of;

    use kvm_bindings::{
        kvm_device_attr, kvm_irq_routing, kvm_irqfd, kvm_mp_state, kvm_regs,
        kvm_userspace_memory_region,
    };

    use super::{io, ior, iow, Ioctl, IOMMUFD_BASE, KVMIO, VFIO_BASE, VFIO_TYPE};

    pub const KVM_RUN: Ioctl = io("KVM_RUN", KVMIO, 0x80);
    pub const KVM_GET_REGS: Ioctl = ior("KVM_GET_REGS", KVMIO, 0x81, size_of::<kvm_regs>());
    pub const KVM_GET_MP_STATE: Ioctl =
        ior("KVM_GET_MP_STATE", KVMIO, 0x98, size_of::<kvm_mp_state>());
    pub const KVM_SET_GSI_ROUTING: Ioctl = iow(
        "KVM_SET_GSI_ROUTING",
        KVMIO,
        0x6a,
        size_of::<kvm_irq_routing>(),
    );
    pub const KVM_IRQFD: Ioctl = iow("KVM_IRQFD", KVMIO, 0x76, size_of::<kvm_irqfd>());
    pub const KVM_SET_USER_MEMORY_REGION: Ioctl = iow(
        "KVM_SET_USER_MEMORY_REGION",
        KVMIO,
        0x46,
        size_of::<kvm_userspace_memory_region>(),
    );
    pub const KVM_SET_DEVICE_ATTR: Ioctl = iow(
        "KVM_SET_DEVICE_ATTR",
        KVMIO,
        0xe1,
        size_of::<kvm_device_attr>(),
    );

    pub const VFIO_GROUP_UNSET_CONTAINER: Ioctl =
        io("VFIO_GROUP_UNSET_CONTAINER", VFIO_TYPE, VFIO_BASE + 5);
    pub const VFIO_DEVICE_SET_IRQS: Ioctl = io("VFIO_DEVICE_SET_IRQS", VFIO_TYPE, VFIO_BASE + 10);
    pub const VFIO_DEVICE_RESET: Ioctl = io("VFIO_DEVICE_RESET", VFIO_TYPE, VFIO_BASE + 11);
    pub const VFIO_IOMMU_MAP_DMA: Ioctl = io("VFIO_IOMMU_MAP_DMA", VFIO_TYPE, VFIO_BASE + 13);
    pub const VFIO_IOMMU_UNMAP_DMA: Ioctl = io("VFIO_IOMMU_UNMAP_DMA", VFIO_TYPE, VFIO_BASE + 14);
    pub const VFIO_DEVICE_DETACH_IOMMUFD_PT: Ioctl =
        io("VFIO_DEVICE_DETACH_IOMMUFD_PT", VFIO_TYPE, VFIO_BASE + 20);
    pub const IOMMU_DESTROY: Ioctl = io("IOMMU_DESTROY", VFIO_TYPE, IOMMUFD_BASE);
    pub const IOMMU_IOAS_MAP: Ioctl = io("IOMMU_IOAS_MAP", VFIO_TYPE, IOMMUFD_BASE + 5);
    pub const IOMMU_IOAS_UNMAP: Ioctl = io("IOMMU_IOAS_UNMAP", VFIO_TYPE, IOMMUFD_BASE + 6);

    pub const TCGETS: Ioctl = Ioctl {
        name: "TCGETS",
        number: libc::TCGETS,
    };
    pub const TCSETS: Ioctl = Ioctl {
        name: "TCSETS",
        number: libc::TCSETS,
    };
    pub const TCSETSW: Ioctl = Ioctl {
        name: "TCSETSW",
        number: libc::TCSETSW,
    };
    pub const TCSETSF: Ioctl = Ioctl {
        name: "TCSETSF",
        number: libc::TCSETSF,
    };
}

/// What every thread of this process may do, whatever its kind: allocate and free memory
/// (never executable), wait on and wake futexes, take and return from signals (the vCPU kick,
/// SIGINT/SIGTERM, this module's SIGSYS handler, which writes an eventfd), read the clocks
/// where the vDSO cannot, write logs to stderr, close what it drops, and end.
pub(super) fn base() -> AllowList {
    use libc::*;
    let mut l = AllowList::default();
    l.allow(&[
        SYS_futex,
        SYS_sched_yield,
        SYS_rt_sigreturn,
        SYS_rt_sigprocmask,
        SYS_sigaltstack,
        SYS_restart_syscall,
        SYS_munmap,
        SYS_brk,
        SYS_mremap,
        SYS_clock_gettime,
        SYS_clock_nanosleep,
        SYS_nanosleep,
        SYS_getrandom,
        SYS_gettid,
        SYS_write,
        SYS_writev,
        SYS_close,
        SYS_exit,
        SYS_exit_group,
    ]);
    // No executable mappings, ever: this process has loaded all the code it will run.
    let no_exec = Check::none_of(2, PROT_EXEC as u64);
    l.allow_when(SYS_mmap, &[no_exec]);
    l.allow_when(SYS_mprotect, &[no_exec]);
    // malloc gives memory back, a finished thread's stack is dropped.
    l.allow_values(SYS_madvise, 2, &[MADV_DONTNEED as u64]);
    // A real fault must end the process: std's stack-overflow handler puts the default
    // SIGSEGV/SIGBUS action back and returns, so the fault repeats and kills. Refused, it
    // would trap, return and fault again, forever.
    l.allow_values(SYS_rt_sigaction, 0, &[SIGSEGV as u64, SIGBUS as u64]);
    l
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        // The values strace shows for this VMM's own calls, and the UAPI headers' for the rest.
        assert_eq!(ioctl::KVM_RUN.number, 0xae80);
        assert_eq!(ioctl::KVM_GET_REGS.number, 0x8090_ae81);
        assert_eq!(ioctl::KVM_GET_MP_STATE.number, 0x8004_ae98);
        assert_eq!(ioctl::KVM_SET_GSI_ROUTING.number, 0x4008_ae6a);
        assert_eq!(ioctl::KVM_IRQFD.number, 0x4020_ae76);
        assert_eq!(ioctl::KVM_SET_USER_MEMORY_REGION.number, 0x4020_ae46);
        assert_eq!(ioctl::KVM_SET_DEVICE_ATTR.number, 0x4018_aee1);
        assert_eq!(ioctl::VFIO_GROUP_UNSET_CONTAINER.number, 0x3b69);
        assert_eq!(ioctl::VFIO_DEVICE_SET_IRQS.number, 0x3b6e);
        assert_eq!(ioctl::VFIO_DEVICE_RESET.number, 0x3b6f);
        assert_eq!(ioctl::VFIO_IOMMU_MAP_DMA.number, 0x3b71);
        assert_eq!(ioctl::VFIO_IOMMU_UNMAP_DMA.number, 0x3b72);
        assert_eq!(ioctl::VFIO_DEVICE_DETACH_IOMMUFD_PT.number, 0x3b78);
        assert_eq!(ioctl::IOMMU_DESTROY.number, 0x3b80);
        assert_eq!(ioctl::IOMMU_IOAS_MAP.number, 0x3b85);
        assert_eq!(ioctl::IOMMU_IOAS_UNMAP.number, 0x3b86);
        assert_eq!(ioctl::TCGETS.number, 0x5401);
    }

    #[test]
    fn argument_checks_decide_like_the_filter() {
        let mut l = base();
        l.ioctls(&[ioctl::KVM_RUN]);
        let args = |a: [u64; 3]| [a[0], a[1], a[2], 0, 0, 0];
        assert!(l.allows(libc::SYS_ioctl, &args([7, 0xae80, 0])));
        // Only the low 32 bits of a request count, as for the kernel.
        assert!(l.allows(libc::SYS_ioctl, &args([7, 0xdead_0000_0000_ae80, 0])));
        assert!(!l.allows(libc::SYS_ioctl, &args([7, 0xae81, 0])));
        let rw = (libc::PROT_READ | libc::PROT_WRITE) as u64;
        assert!(l.allows(libc::SYS_mmap, &args([0, 4096, rw])));
        assert!(!l.allows(
            libc::SYS_mmap,
            &args([0, 4096, rw | libc::PROT_EXEC as u64])
        ));
        assert!(!l.allows(libc::SYS_mprotect, &args([0, 4096, libc::PROT_EXEC as u64])));
        assert!(l.allows(
            libc::SYS_madvise,
            &args([0, 4096, libc::MADV_DONTNEED as u64])
        ));
        assert!(!l.allows(
            libc::SYS_madvise,
            &args([0, 4096, libc::MADV_HUGEPAGE as u64])
        ));
        assert!(!l.allows(libc::SYS_getppid, &args([0, 0, 0])));
    }

    #[test]
    fn an_unconditional_allow_wins_over_argument_checks() {
        let mut l = AllowList::default();
        l.allow_values(libc::SYS_fcntl, 1, &[libc::F_GETFD as u64]);
        l.allow(&[libc::SYS_fcntl]);
        l.allow_values(libc::SYS_fcntl, 1, &[libc::F_SETFD as u64]);
        assert!(l.allows(libc::SYS_fcntl, &[0, libc::F_SETFL as u64, 0, 0, 0, 0]));
        assert_eq!(l.syscall_count(), 1);
    }

    #[test]
    fn every_list_compiles() {
        for action in [SeccompAction::Trap, SeccompAction::Log] {
            assert!(!base().compile(action).unwrap().is_empty());
        }
    }
}
