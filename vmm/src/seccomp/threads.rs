//! Filtering threads the main thread did not start after its filter: the SIGINT/SIGTERM
//! forwarder, the epf server's watcher, each vfio-user connection's reply reader, the serial
//! output writer, and any other thread a library started during set-up.
//!
//! seccomp installs a filter on the calling thread only. TSYNC (one filter for every thread)
//! cannot be used: it refuses when another thread already has a filter of its own, as the
//! vCPU threads do, and it would give the vCPUs the main thread's list. So, as glibc does to
//! change every thread's user id, each thread still without a filter (as
//! /proc/self/task/TID/status says) is sent a signal whose handler installs the main/event
//! list on that thread, and the main thread waits until /proc shows every thread filtered.
//! The handler makes three system calls (prctl twice, seccomp) and touches only statics.

use std::collections::HashSet;
use std::sync::atomic::{AtomicI32, AtomicPtr, Ordering};
use std::time::{Duration, Instant};

use seccompiler::{sock_filter, BpfProgram};

use super::trap::set_thread_name_bytes;
use super::SeccompError;

/// How long a thread has to take the signal and install its filter.
const WITHIN: Duration = Duration::from_secs(5);

/// The kernel's `struct sock_fprog`.
#[repr(C)]
struct SockFprog {
    len: libc::c_ushort,
    filter: *const sock_filter,
}

/// The program the signal handler installs (leaked: a late signal may still read it).
static PROGRAM: AtomicPtr<SockFprog> = AtomicPtr::new(std::ptr::null_mut());
/// The errno of the first thread whose install failed (0: none).
static FAILED: AtomicI32 = AtomicI32::new(0);

/// The signal that asks a thread to install the filter: one past the vCPU kick.
fn filter_signal() -> libc::c_int {
    libc::SIGRTMIN() + 1
}

extern "C" fn on_filter_request(_: libc::c_int) {
    let program = PROGRAM.load(Ordering::Acquire);
    if program.is_null() {
        return;
    }
    let mut name = [0u8; 16];
    // SAFETY: prctl and seccomp are plain system calls; `name` has the 16 bytes PR_GET_NAME
    // writes, and `program` points to a leaked, valid sock_fprog.
    unsafe {
        if libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) == 0 {
            set_thread_name_bytes(name);
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, 0, program) != 0
        {
            let _ = FAILED.compare_exchange(
                0,
                *libc::__errno_location(),
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
    }
}

/// PF_USER_WORKER: a kernel worker in this thread group (such as KVM's `kvm-nx-lpage-recovery`
/// on Linux 6.13 and later), which never runs user code and takes no signal handler.
const PF_USER_WORKER: u64 = 0x4000;

/// A thread of this process as /proc shows it.
struct Task {
    tid: i32,
    name: String,
    /// The `Seccomp:` field: 0 none, 1 strict, 2 filter.
    mode: Option<u32>,
    user_worker: bool,
}

/// The `flags` field of a /proc/PID/task/TID/stat line (the 9th; the name before it may
/// hold spaces and parentheses, so count from the last `)`).
fn stat_flags(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(6)?.parse().ok()
}

fn tasks() -> std::io::Result<Vec<Task>> {
    let mut tasks = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task")? {
        let Some(tid) = entry?.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        // A thread that ended since the listing has no status any more: skip it.
        let Ok(status) = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
        };
        let flags = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat"))
            .ok()
            .and_then(|s| stat_flags(&s))
            .unwrap_or(0);
        tasks.push(Task {
            tid,
            name: field("Name:").unwrap_or("").to_string(),
            mode: field("Seccomp:").and_then(|v| v.parse().ok()),
            user_worker: flags & PF_USER_WORKER != 0,
        });
    }
    Ok(tasks)
}

/// Installs `program` on every thread of this process that has no filter yet, except the
/// calling one; returns once /proc shows each of them filtered.
pub(super) fn filter_unfiltered_threads(program: &BpfProgram) -> Result<(), SeccompError> {
    // SAFETY: gettid has no preconditions.
    let me = unsafe { libc::gettid() };
    let failed = |tid: i32, name: &str, reason: String| SeccompError::Thread {
        name: name.to_string(),
        tid,
        reason,
    };
    let filter: &'static [sock_filter] = Box::leak(program.clone().into_boxed_slice());
    let len = libc::c_ushort::try_from(filter.len()).map_err(|_| {
        failed(
            me,
            "main",
            format!("a filter of {} instructions is too long", filter.len()),
        )
    })?;
    let fprog = Box::leak(Box::new(SockFprog {
        len,
        filter: filter.as_ptr(),
    }));
    PROGRAM.store(fprog, Ordering::Release);
    FAILED.store(0, Ordering::Release);
    // SAFETY: a zeroed sigaction is valid; the handler is safe in a signal handler.
    // SA_RESTART: a thread blocked in read, recvmsg or waitid goes back to it.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_filter_request as extern "C" fn(libc::c_int) as usize;
        act.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut act.sa_mask);
        if libc::sigaction(filter_signal(), &act, std::ptr::null_mut()) != 0 {
            return Err(failed(
                me,
                "main",
                format!(
                    "installing the signal handler: {}",
                    std::io::Error::last_os_error()
                ),
            ));
        }
    }
    let result = signal_until_filtered(me);
    // From now on the signal means nothing here.
    // SAFETY: SIG_IGN for a signal only this module sends.
    unsafe { libc::signal(filter_signal(), libc::SIG_IGN) };
    PROGRAM.store(std::ptr::null_mut(), Ordering::Release);
    result
}

fn signal_until_filtered(me: i32) -> Result<(), SeccompError> {
    let pid = std::process::id() as libc::pid_t;
    let deadline = Instant::now() + WITHIN;
    let mut signalled = HashSet::new();
    loop {
        let tasks = tasks().map_err(|e| SeccompError::Thread {
            name: "main".into(),
            tid: me,
            reason: format!("listing /proc/self/task: {e}"),
        })?;
        let waiting: Vec<&Task> = tasks
            .iter()
            .filter(|t| t.tid != me && t.mode != Some(2) && !t.user_worker)
            .collect();
        let errno = FAILED.load(Ordering::Acquire);
        if errno != 0 {
            let t = waiting.first();
            return Err(SeccompError::Thread {
                name: t.map_or("(unknown)".into(), |t| t.name.clone()),
                tid: t.map_or(0, |t| t.tid),
                reason: std::io::Error::from_raw_os_error(errno).to_string(),
            });
        }
        let Some(first) = waiting.first() else {
            return Ok(());
        };
        if Instant::now() > deadline {
            return Err(SeccompError::Thread {
                name: first.name.clone(),
                tid: first.tid,
                reason: format!("it did not take the request signal within {WITHIN:?}"),
            });
        }
        for t in &waiting {
            if signalled.insert(t.tid) {
                // SAFETY: tgkill to a thread of this process; ESRCH (it ended) is fine.
                unsafe { libc::syscall(libc::SYS_tgkill, pid, t.tid, filter_signal()) };
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flags_field_is_found_after_an_awkward_name() {
        let stat = "4711 (kvm-nx (x) y) S 1 4711 4711 0 -1 4210752 0 0 0 0 0 0";
        assert_eq!(stat_flags(stat), Some(4_210_752));
        assert_eq!(stat_flags("garbage"), None);
    }

    #[test]
    fn this_test_thread_is_listed() {
        // SAFETY: gettid has no preconditions.
        let me = unsafe { libc::gettid() };
        let tasks = tasks().unwrap();
        let t = tasks.iter().find(|t| t.tid == me).unwrap();
        assert!(!t.user_worker);
        assert!(t.mode.is_some());
    }
}
