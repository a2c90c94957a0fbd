//! The allow-lists: each kind allows what its threads were seen to need and not what they
//! never need.

use super::rules::ioctl;
use super::*;

fn args(a: &[u64]) -> [u64; 6] {
    let mut all = [0u64; 6];
    all[..a.len()].copy_from_slice(a);
    all
}

#[test]
fn every_kind_compiles_for_on_and_log() {
    for kind in ThreadKind::ALL {
        for level in [SeccompLevel::On, SeccompLevel::Log] {
            let program = kind.compile(level).unwrap();
            assert!(!program.is_empty(), "{kind:?}");
            // The kernel takes at most 4096 instructions per filter.
            assert!(program.len() < 4096, "{kind:?}: {}", program.len());
        }
    }
}

#[test]
fn vcpus_run_the_guest_and_nothing_else_of_kvm() {
    let l = ThreadKind::Vcpu.allow_list();
    let ioctl = |req: u64| l.allows(libc::SYS_ioctl, &args(&[5, req]));
    assert!(ioctl(ioctl::KVM_RUN.number));
    assert!(ioctl(ioctl::KVM_GET_REGS.number));
    assert!(ioctl(ioctl::KVM_SET_GSI_ROUTING.number));
    // Creating vCPUs or VMs, or mapping DMA, is set-up's business, not a running vCPU's.
    assert!(!ioctl(0xae41)); // KVM_CREATE_VCPU
    assert!(!ioctl(0xae01)); // KVM_CREATE_VM
    assert!(!ioctl(ioctl::VFIO_IOMMU_MAP_DMA.number));
    for call in [
        libc::SYS_getppid,
        libc::SYS_openat,
        libc::SYS_execve,
        libc::SYS_clone3,
        libc::SYS_socket,
        libc::SYS_seccomp,
        libc::SYS_prctl,
    ] {
        assert!(!l.allows(call, &args(&[])), "{}", syscall_name(call));
    }
    assert!(l.allows(libc::SYS_sendmsg, &args(&[])));
    assert!(l.allows(libc::SYS_pwrite64, &args(&[])));
}

#[test]
fn the_main_thread_may_kick_vcpus_but_not_signal_at_large() {
    let l = ThreadKind::Vmm.allow_list();
    let rtmin = libc::SIGRTMIN() as u64;
    assert!(l.allows(libc::SYS_tgkill, &args(&[1, 2, rtmin])));
    assert!(!l.allows(libc::SYS_tgkill, &args(&[1, 2, libc::SIGKILL as u64])));
    assert!(l.allows(libc::SYS_kill, &args(&[9, libc::SIGTERM as u64])));
    assert!(!l.allows(libc::SYS_kill, &args(&[9, libc::SIGSTOP as u64])));
    // Threads only: a fork (clone without CLONE_THREAD) is refused.
    let thread = (libc::CLONE_VM | libc::CLONE_THREAD | libc::CLONE_SIGHAND) as u64;
    assert!(l.allows(libc::SYS_clone, &args(&[thread])));
    assert!(!l.allows(libc::SYS_clone, &args(&[libc::SIGCHLD as u64])));
    // A teardown helper may add its own filter; nothing may loosen or replace one.
    assert!(l.allows(
        libc::SYS_seccomp,
        &args(&[libc::SECCOMP_SET_MODE_FILTER as u64, 0])
    ));
    assert!(!l.allows(
        libc::SYS_seccomp,
        &args(&[
            libc::SECCOMP_SET_MODE_FILTER as u64,
            libc::SECCOMP_FILTER_FLAG_TSYNC
        ])
    ));
    assert!(!l.allows(libc::SYS_execve, &args(&[])));
    assert!(!l.allows(libc::SYS_ioctl, &args(&[5, ioctl::KVM_RUN.number])));
}

#[test]
fn helpers_pin_and_unpin_but_do_not_run_the_guest() {
    let l = ThreadKind::Helper.allow_list();
    assert!(l.allows(libc::SYS_madvise, &args(&[0, 4096, 23])));
    assert!(l.allows(
        libc::SYS_mlock2,
        &args(&[0, 4096, libc::MLOCK_ONFAULT as u64])
    ));
    assert!(l.allows(libc::SYS_ioctl, &args(&[5, ioctl::IOMMU_IOAS_MAP.number])));
    let pid = u64::from(std::process::id());
    assert!(l.allows(libc::SYS_process_vm_readv, &args(&[pid])));
    assert!(!l.allows(libc::SYS_process_vm_readv, &args(&[pid + 1])));
    assert!(!l.allows(libc::SYS_ioctl, &args(&[5, ioctl::KVM_RUN.number])));
    assert!(!l.allows(libc::SYS_clone3, &args(&[])));
    // A zone's helper pins itself to the zone's CPUs, and no other thread.
    assert!(l.allows(libc::SYS_sched_setaffinity, &args(&[0])));
    assert!(!l.allows(libc::SYS_sched_setaffinity, &args(&[1234])));
    // vfio-user DMA_MAP shares the memory file with the client: no descriptor to duplicate.
    assert!(!l.allows(libc::SYS_newfstatat, &args(&[5])));
    assert!(!l.allows(
        libc::SYS_fcntl,
        &args(&[5, libc::F_DUPFD_CLOEXEC as u64, 3])
    ));
}

/// The vfio-user reply reader runs under the main list and serves DMA_READ/DMA_WRITE from
/// memory files.
#[test]
fn the_main_list_lets_the_vfio_user_reader_serve_dma_by_message() {
    let main = ThreadKind::Vmm.allow_list();
    assert!(main.allows(libc::SYS_pread64, &args(&[5])));
    assert!(main.allows(libc::SYS_pwrite64, &args(&[5])));
}

/// A teardown helper runs under the main thread's filter and its own: whatever it does must
/// pass both.
#[test]
fn the_main_list_allows_what_teardown_helpers_do() {
    let main = ThreadKind::Vmm.allow_list();
    let helper = ThreadKind::Helper.allow_list();
    let teardown: [(i64, &[u64]); 7] = [
        (libc::SYS_munlock, &[]),
        (libc::SYS_madvise, &[0, 4096, libc::MADV_DONTNEED as u64]),
        (
            libc::SYS_fallocate,
            &[
                3,
                (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE) as u64,
            ],
        ),
        (libc::SYS_ioctl, &[5, ioctl::VFIO_IOMMU_UNMAP_DMA.number]),
        (libc::SYS_ioctl, &[5, ioctl::IOMMU_IOAS_UNMAP.number]),
        (libc::SYS_sendmsg, &[]),
        (libc::SYS_setpriority, &[libc::PRIO_PROCESS as u64, 7, 19]),
    ];
    for (call, a) in teardown {
        let a = args(a);
        assert!(helper.allows(call, &a), "helper: {}", syscall_name(call));
        assert!(main.allows(call, &a), "main: {}", syscall_name(call));
    }
}

#[test]
fn the_epf_server_neither_listens_again_nor_starts_a_process() {
    let l = ThreadKind::Epf.allow_list();
    assert!(l.allows(libc::SYS_accept4, &args(&[])));
    assert!(l.allows(libc::SYS_recvmsg, &args(&[])));
    for call in [
        libc::SYS_socket,
        libc::SYS_bind,
        libc::SYS_listen,
        libc::SYS_connect,
        libc::SYS_openat,
        libc::SYS_ioctl,
        libc::SYS_execve,
    ] {
        assert!(!l.allows(call, &args(&[])), "{}", syscall_name(call));
    }
    // Its DMA thread may start, but no child process.
    let thread = (libc::CLONE_VM | libc::CLONE_THREAD | libc::CLONE_SIGHAND) as u64;
    assert!(l.allows(libc::SYS_clone, &args(&[thread])));
    assert!(!l.allows(libc::SYS_clone, &args(&[libc::SIGCHLD as u64])));
}

#[test]
fn system_call_names_come_from_the_table() {
    assert_eq!(syscall_name(0), "read");
    assert_eq!(syscall_name(libc::SYS_getppid), "getppid");
    assert_eq!(syscall_name(libc::SYS_ioctl), "ioctl");
    assert_eq!(syscall_name(libc::SYS_clone3), "clone3");
    assert_eq!(syscall_name(libc::SYS_rseq), "rseq");
    // Linux 6.11's uretprobe (the hand-kept table this replaced had missed it) and 6.17's
    // file_setattr; 337..=423 is a gap in the x86_64 numbering.
    assert_eq!(syscall_name(335), "uretprobe");
    assert_eq!(syscall_name(469), "file_setattr");
    assert_eq!(syscall_name(400), "unknown");
    assert_eq!(syscall_name(-1), "unknown");
    assert_eq!(syscall_name(100_000), "unknown");
}

#[test]
fn the_summary_counts_every_kind() {
    let summary = summary();
    assert_eq!(summary.len(), ThreadKind::ALL.len());
    for (kind, calls, _ioctls) in summary {
        assert!(calls > 10, "{kind:?}: {calls}");
    }
}

/// A fault on a filtered thread must still end the process: std's handler puts the default
/// SIGSEGV/SIGBUS action back and returns, so the fault repeats and kills. A list without
/// that rt_sigaction would make the handler trap, return and fault again, forever.
#[test]
fn every_kind_may_put_the_default_fault_actions_back() {
    for kind in ThreadKind::ALL {
        let l = kind.allow_list();
        for sig in [libc::SIGSEGV, libc::SIGBUS] {
            assert!(
                l.allows(libc::SYS_rt_sigaction, &args(&[sig as u64])),
                "{}: rt_sigaction({sig})",
                kind.name()
            );
        }
        assert!(!l.allows(libc::SYS_rt_sigaction, &args(&[libc::SIGUSR1 as u64])));
    }
}

/// docs/reliability.md gives each list's size in its seccomp row: a list that grows or shrinks
/// fails here until the row says so too.
#[test]
fn the_reliability_doc_gives_each_lists_size() {
    let doc = include_str!("../../../docs/reliability.md");
    let row = doc
        .lines()
        .find(|l| l.starts_with("| seccomp"))
        .expect("docs/reliability.md has a seccomp row");
    for (kind, calls, ioctls) in summary() {
        let said = format!("{}: {calls} calls, {ioctls} ioctls", kind.name());
        assert!(row.contains(&said), "the seccomp row does not say {said:?}");
    }
}

/// The filter the kernel runs, not the list's logic: under a kind that starts threads,
/// `clone3` (whose flags no filter can read) fails with ENOSYS, so glibc falls back to
/// `clone`, which passes only with CLONE_THREAD; under a kind that starts none it meets the
/// mismatch action (SIGSYS). Each in a forked child that makes only raw system calls.
#[test]
fn clone3_fails_with_enosys_where_threads_start_and_traps_elsewhere() {
    /// The child's exit codes.
    const ENOSYS_SEEN: i32 = 0;
    const OTHER_ERRNO: i32 = 1;
    const NOT_INSTALLED: i32 = 2;
    #[repr(C)]
    struct Fprog {
        len: libc::c_ushort,
        filter: *const seccompiler::sock_filter,
    }
    for kind in ThreadKind::ALL {
        let list = kind.allow_list();
        let starts_threads = matches!(kind, ThreadKind::Vmm | ThreadKind::Epf);
        assert_eq!(list.clone3_fails_with_enosys(), starts_threads, "{kind:?}");
        assert!(!list.allows(libc::SYS_clone3, &args(&[])), "{kind:?}");
        let program = kind.compile(SeccompLevel::On).unwrap();
        let fprog = Fprog {
            len: program.len() as libc::c_ushort,
            filter: program.as_ptr(),
        };
        // SAFETY: the child makes raw system calls only (no allocation, no lock) and leaves
        // with _exit; `fprog` points into `program`, alive across the fork.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            // SAFETY: as above, in the child.
            unsafe {
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                    || libc::syscall(
                        libc::SYS_seccomp,
                        libc::SECCOMP_SET_MODE_FILTER,
                        0,
                        &fprog as *const Fprog,
                    ) != 0
                {
                    libc::_exit(NOT_INSTALLED);
                }
                // A size of 0 is EINVAL from the kernel itself, so only the filter says ENOSYS.
                let r = libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0usize);
                let errno = *libc::__errno_location();
                libc::_exit(if r == -1 && errno == libc::ENOSYS {
                    ENOSYS_SEEN
                } else {
                    OTHER_ERRNO
                });
            }
        }
        let mut status = 0;
        // SAFETY: waiting for the child just forked.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        if starts_threads {
            assert!(
                libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == ENOSYS_SEEN,
                "{kind:?}: status {status:#x}"
            );
        } else {
            assert!(
                libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
                "{kind:?}: status {status:#x}"
            );
        }
    }
}
