//! What the `vmm device epf` server process may do once it listens: accept its one client,
//! wait on the socket and its stop eventfd, exchange vfio-user messages (receiving the memory
//! files of DMA_MAP, which it maps shared and never executable, checks the size of and
//! unmaps again), raise interrupts by writing eventfds, and at the end remove its socket
//! file and put its SIGTERM/SIGINT handlers back. The device model itself (BARs, DMA,
//! CRC32) is plain computation on mapped memory.

use super::rules::{base, AllowList};

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
    l.allow_values(SYS_rt_sigaction, 0, &[SIGINT as u64, SIGTERM as u64]);
    l
}
