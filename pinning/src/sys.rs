//! Thin, checked wrappers over the system calls this crate needs. Every `unsafe` block of the
//! crate that is not about guest memory contents lives here, but for the signal handler's
//! write(2) in `cancel`, which must stay async-signal-safe.

use std::io;

/// `MADV_POPULATE_WRITE` (Linux 5.14): fault pages in writable without touching them from
/// user space, so the kernel zeroes each page once and nothing is read back.
pub(crate) const MADV_POPULATE_WRITE: libc::c_int = 23;
/// `MLOCK_ONFAULT`: lock pages as they are faulted in rather than faulting all of them now.
pub(crate) const MLOCK_ONFAULT: libc::c_uint = 1;

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The kernel id of the calling thread (what `setpriority` and `/proc/self/task` name).
pub(crate) fn gettid() -> i32 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::gettid() }
}

/// The nice value of thread `tid` (0 = the calling thread).
pub(crate) fn thread_nice(tid: i32) -> io::Result<i32> {
    // getpriority may legitimately return -1, so errno must be cleared and checked.
    // SAFETY: __errno_location returns the calling thread's errno slot.
    unsafe { *libc::__errno_location() = 0 };
    // SAFETY: plain syscall with integer arguments.
    let prio = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t) };
    // SAFETY: as above.
    let errno = unsafe { *libc::__errno_location() };
    if prio == -1 && errno != 0 {
        return Err(io::Error::from_raw_os_error(errno));
    }
    Ok(prio)
}

/// Sets the nice value of thread `tid` (0 = the calling thread). On Linux nice is per thread.
pub(crate) fn set_thread_nice(tid: i32, nice: i32) -> io::Result<()> {
    // SAFETY: plain syscall with integer arguments.
    check(unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) })
}

/// The CPUs the calling thread may run on.
pub fn affinity_cpus() -> io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data; zeroed is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer and size describe `set`, which outlives the call.
    check(unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) })?;
    Ok((0..libc::CPU_SETSIZE as usize)
        // SAFETY: `set` was filled by the kernel; CPU_ISSET only reads it.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect())
}

/// Restricts the calling thread to `cpus` (`sched_setaffinity`). A CPU past the kernel's
/// set size is refused here as the kernel refuses a CPU it does not have: `EINVAL`.
pub(crate) fn set_affinity(cpus: &[usize]) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; zeroed is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: `cpu` is below CPU_SETSIZE, so inside `set`.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: the pointer and size describe `set`, which outlives the call.
    check(unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) })
}

/// A resource limit: (soft, hard), `None` meaning unlimited.
pub(crate) fn rlimit(
    resource: libc::__rlimit_resource_t,
) -> io::Result<(Option<u64>, Option<u64>)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid out-pointer for the call.
    check(unsafe { libc::getrlimit(resource, &mut lim) })?;
    let conv = |v: libc::rlim_t| (v != libc::RLIM_INFINITY).then_some(v);
    Ok((conv(lim.rlim_cur), conv(lim.rlim_max)))
}

/// `madvise(MADV_POPULATE_WRITE)` over `[addr, addr+len)`.
///
/// # Safety
/// The range must be mapped memory owned by the caller that nothing else relies on being
/// unpopulated; populating never changes its contents.
pub(crate) unsafe fn populate_write(addr: u64, len: u64) -> io::Result<()> {
    // SAFETY: forwarded to the caller; madvise does not alter contents.
    check(unsafe { libc::madvise(addr as *mut libc::c_void, len as usize, MADV_POPULATE_WRITE) })
}

/// `mlock2(addr, len, flags)`.
pub(crate) fn mlock2(addr: u64, len: u64, flags: libc::c_uint) -> io::Result<()> {
    // SAFETY: mlock2 only changes the locked state of pages; an unmapped range is ENOMEM.
    check(unsafe { libc::mlock2(addr as *const libc::c_void, len as usize, flags) })
}

/// `munlock(addr, len)`.
pub(crate) fn munlock(addr: u64, len: u64) -> io::Result<()> {
    // SAFETY: munlock only changes the locked state of pages.
    check(unsafe { libc::munlock(addr as *const libc::c_void, len as usize) })
}

/// Installs `handler` for `sig` (SA_RESTART, all signals blocked while it runs) and returns
/// the previous action.
pub(crate) fn set_signal_handler(sig: i32, handler: usize) -> io::Result<libc::sigaction> {
    // SAFETY: sigaction is plain data; zeroed is a valid starting point.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = handler;
    action.sa_flags = libc::SA_RESTART;
    // SAFETY: sa_mask is a valid sigset_t inside `action`.
    unsafe { libc::sigfillset(&mut action.sa_mask) };
    // SAFETY: as above; `old` is a valid out-pointer.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the duration of the call.
    check(unsafe { libc::sigaction(sig, &action, &mut old) })?;
    Ok(old)
}

/// Puts back an action returned by [`set_signal_handler`].
pub(crate) fn restore_signal_handler(sig: i32, old: &libc::sigaction) {
    // SAFETY: `old` came from the kernel for this signal.
    unsafe { libc::sigaction(sig, old, std::ptr::null_mut()) };
}

/// "SIGINT", "SIGTERM", or the number.
pub(crate) fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGINT => "SIGINT".into(),
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGKILL => "SIGKILL".into(),
        n => format!("signal {n}"),
    }
}

/// An anonymous private mapping, unmapped on drop. For tests and scratch buffers; guest RAM
/// has its own backings in the VMM.
pub struct AnonMapping {
    addr: u64,
    len: u64,
}

impl AnonMapping {
    pub fn new(len: u64) -> io::Result<Self> {
        // SAFETY: a fresh anonymous mapping at a kernel-chosen address aliases nothing.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            addr: ptr as u64,
            len,
        })
    }

    pub fn addr(&self) -> u64 {
        self.addr
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for AnonMapping {
    fn drop(&mut self) {
        // SAFETY: we own this mapping and nothing borrows it past our lifetime.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len as usize) };
    }
}
