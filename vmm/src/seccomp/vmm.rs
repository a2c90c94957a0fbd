//! What the VMM's main thread may do from the moment the guest is about to run, and with it
//! every other thread that is not a vCPU: the thread turning SIGINT/SIGTERM into a VM stop,
//! the one watching the epf server child, each vfio-user connection's reply reader, the one
//! writing the guest's serial output to stdout or the serial log (write and futex, both in the
//! base list).
//!
//! The main thread runs the event loop (epoll on the exit eventfd and serial input, the
//! terminal in raw mode) and kicks vCPUs with SIGRTMIN, then tears the machine down on the
//! same thread: device models reset and their interrupts and BAR slots removed, the DMA
//! mappings undone and guest RAM freed on the pinning engine (which starts helper threads,
//! each of which adds the helper filter to this one), the device servers stopped (SIGTERM,
//! then SIGKILL) and reaped, their socket folder removed, the report written. A filter can
//! only ever be narrowed, so this list allows what teardown needs as well as what the run
//! needs.

use super::rules::{base, ioctl, AllowList, Check};

pub(super) fn allow_list() -> AllowList {
    use libc::*;
    let mut l = base();
    // The event loop, eventfds, serial input, the SIGINT/SIGTERM forwarder.
    l.allow(&[SYS_epoll_wait, SYS_epoll_pwait, SYS_epoll_ctl, SYS_read]);
    // Kicking a vCPU out of KVM_RUN (pthread_kill).
    l.allow(&[SYS_getpid]);
    l.allow_values(SYS_tgkill, 2, &[SIGRTMIN() as u64]);
    // The terminal: is it one, raw mode in and out.
    l.ioctls(&[ioctl::TCGETS, ioctl::TCSETS, ioctl::TCSETSW, ioctl::TCSETSF]);
    // vfio-user connections: requests (device reset, DMA_UNMAP at teardown), replies on the
    // reader thread, shutdown when closed; the reader serves the server's DMA_READ/DMA_WRITE
    // from the memory files of the windows mapped with an fd.
    l.allow(&[SYS_sendmsg, SYS_sendto, SYS_recvmsg, SYS_shutdown]);
    l.allow(&[SYS_pread64, SYS_pwrite64]);
    // Device models and KVM at teardown: interrupts off, BAR slots and irqfds removed, the
    // function reset, kernel VFIO groups and iommufd objects released.
    l.ioctls(&[
        ioctl::KVM_IRQFD,
        ioctl::KVM_SET_GSI_ROUTING,
        ioctl::KVM_SET_USER_MEMORY_REGION,
        ioctl::KVM_SET_DEVICE_ATTR,
        ioctl::VFIO_DEVICE_SET_IRQS,
        ioctl::VFIO_DEVICE_RESET,
        ioctl::VFIO_GROUP_UNSET_CONTAINER,
        ioctl::VFIO_DEVICE_DETACH_IOMMUFD_PT,
        ioctl::IOMMU_DESTROY,
        // The caller of a teardown job works on it too.
        ioctl::VFIO_IOMMU_UNMAP_DMA,
        ioctl::IOMMU_IOAS_UNMAP,
    ]);
    l.allow(&[SYS_munlock]);
    l.allow_when(
        SYS_fallocate,
        &[Check::eq(
            1,
            (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) as u64,
        )],
    );
    // Teardown's helper threads: created (a thread only: see `AllowList::threads`), named, given
    // their own filter, lowered to nice 19 and lent the caller's priority.
    l.allow(&[SYS_set_robust_list, SYS_rseq, SYS_sched_getaffinity]);
    l.threads();
    l.allow_values(
        SYS_prctl,
        0,
        &[PR_SET_NAME as u64, PR_SET_NO_NEW_PRIVS as u64],
    );
    l.allow_when(
        SYS_seccomp,
        &[
            Check::eq(0, SECCOMP_SET_MODE_FILTER as u64),
            Check::eq(1, 0),
        ],
    );
    l.allow_values(SYS_setpriority, 0, &[PRIO_PROCESS as u64]);
    l.allow_values(SYS_getpriority, 0, &[PRIO_PROCESS as u64]);
    // The epf server child: watched (waitid, without reaping), stopped and reaped.
    l.allow_values(SYS_kill, 1, &[SIGTERM as u64, SIGKILL as u64]);
    l.allow(&[SYS_wait4, SYS_waitid]);
    // Files: its socket folder removed, the kernel VFIO group looked up, /proc/meminfo
    // read for the report, the report written.
    l.allow(&[
        SYS_openat,
        SYS_getdents64,
        SYS_newfstatat,
        SYS_statx,
        SYS_fstat,
        SYS_lseek,
        SYS_unlink,
        SYS_unlinkat,
        SYS_rmdir,
        SYS_readlink,
        SYS_readlinkat,
    ]);
    l.allow_values(
        SYS_fcntl,
        1,
        &[
            F_GETFD as u64,
            F_SETFD as u64,
            F_GETFL as u64,
            F_SETFL as u64,
            F_DUPFD_CLOEXEC as u64,
        ],
    );
    // The SIGINT/SIGTERM handlers put back when the run ends.
    l.allow_values(SYS_rt_sigaction, 0, &[SIGINT as u64, SIGTERM as u64]);
    l
}
