//! What a pinning-engine helper thread may do: its share of a pin job before the guest runs
//! (fault RAM in with MADV_POPULATE_WRITE or by touching it through process_vm_readv/writev
//! where the kernel lacks that, lock it with mlock2, DMA-map it with a VFIO type1 or iommufd
//! ioctl or a vfio-user DMA_MAP message) and its share of teardown (the reverse: unmap,
//! munlock, and punching the memory files' pages out with fallocate or MADV_DONTNEED). It
//! lowers its own priority, and the caller lends it its own while it waits. A helper of a
//! memory zone on a host node pins itself (and only itself) to that node's CPUs.

use super::rules::{base, ioctl, AllowList, Check};

pub(super) fn allow_list(pid: u32) -> AllowList {
    use libc::*;
    let mut l = base();
    l.allow_values(SYS_madvise, 2, &[MADV_POPULATE_WRITE as u64]);
    l.allow_values(SYS_mlock2, 2, &[MLOCK_ONFAULT as u64]);
    l.allow(&[SYS_munlock]);
    // The populate fallback touches this process's own pages only.
    l.allow_values(SYS_process_vm_readv, 0, &[u64::from(pid)]);
    l.allow_values(SYS_process_vm_writev, 0, &[u64::from(pid)]);
    l.ioctls(&[
        ioctl::VFIO_IOMMU_MAP_DMA,
        ioctl::VFIO_IOMMU_UNMAP_DMA,
        ioctl::IOMMU_IOAS_MAP,
        ioctl::IOMMU_IOAS_UNMAP,
    ]);
    l.allow(&[SYS_sendmsg, SYS_sendto, SYS_shutdown]);
    l.allow_when(
        SYS_fallocate,
        &[Check::eq(
            1,
            (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) as u64,
        )],
    );
    l.allow_values(SYS_setpriority, 0, &[PRIO_PROCESS as u64]);
    l.allow_values(SYS_getpriority, 0, &[PRIO_PROCESS as u64]);
    // pid 0: the calling thread, the only one a helper moves (pinning::sys::set_affinity).
    l.allow_values(SYS_sched_setaffinity, 0, &[0]);
    l
}
