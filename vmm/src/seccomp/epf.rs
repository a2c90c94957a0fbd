//! What the `vmm device epf` server process may do once it listens (or, given `--socket-fd`,
//! once it has checked the socket it inherited; the same list serves both): accept its one client,
//! wait on the socket and its stop eventfd, exchange vfio-user messages (receiving the memory
//! files of DMA_MAP, whose seals and size it checks, which it maps shared and never
//! executable and unmaps again), raise interrupts by writing eventfds, and at the end remove
//! its socket file and put its SIGTERM/SIGINT handlers back. The device model itself (BARs, DMA,
//! CRC32) is plain computation on mapped memory, on this thread or the model's DMA thread.

use super::rules::{base, AllowList};

/// glibc's internal signal for set*id calls across threads (kernel number 33).
const GLIBC_SIGSETXID: u64 = 33;

pub(super) fn allow_list() -> AllowList {
    use libc::*;
    let mut l = base();
    l.allow(&[
        SYS_accept4,
        SYS_poll,
        SYS_ppoll,
        SYS_read,
        SYS_recvmsg,
        SYS_sendmsg,
        SYS_sendto,
        SYS_shutdown,
        SYS_fstat,
        SYS_newfstatat,
        SYS_statx,
        SYS_unlink,
    ]);
    // A DMA_MAP's file is mapped only if it is sealed against shrinking.
    l.allow_values(SYS_fcntl, 1, &[F_GET_SEALS as u64]);
    // A transfer longer than the inline part runs on the model's DMA thread: created
    // (a thread only: see `AllowList::threads`) and named; std looks up the SIGSEGV/SIGBUS
    // handlers for its stack-overflow guard as a thread starts, and glibc installs its
    // set-id signal (SIGRTMIN+1 in kernel numbering, 33) at the first thread it creates.
    l.allow(&[SYS_set_robust_list, SYS_rseq, SYS_sched_getaffinity]);
    l.threads();
    l.allow_values(SYS_prctl, 0, &[PR_SET_NAME as u64]);
    l.allow_values(
        SYS_rt_sigaction,
        0,
        &[
            SIGINT as u64,
            SIGTERM as u64,
            SIGSEGV as u64,
            SIGBUS as u64,
            GLIBC_SIGSETXID,
        ],
    );
    l
}
