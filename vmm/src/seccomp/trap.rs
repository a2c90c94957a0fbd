//! What happens on a forbidden system call under `--seccomp on`: the kernel sends the thread
//! SIGSYS, whose handler records the call and the thread's name (the first violation wins),
//! makes the call return EPERM, and stops the VM through the exit notifier (an atomic and an
//! eventfd write, both safe in a signal handler). The main thread reports it once the VM has
//! stopped and been torn down ([`violation`]). Where there is no VM to stop (the epf server
//! process, `vmm serve`, the API thread of a `vmm run` before its VM is built) the handler
//! writes the line to stderr and ends the process with status 1.
//!
//! Everything the handler touches is static or a const-initialised thread-local, and the
//! only system calls it makes (write, exit_group, rt_sigreturn) are in every allow-list.

use std::cell::Cell;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicPtr, AtomicU64, AtomicU8, Ordering};

use devices::exit::StopHandle;
use devices::ExitReason;

// The calling thread's name for the report, set where its filter is installed. Const-
// initialised and without a destructor, so the signal handler can read it.
thread_local! {
    static THREAD_NAME: Cell<[u8; 16]> = const { Cell::new([0; 16]) };
}

/// Names the calling thread in a violation report (at most 15 bytes are kept).
pub(super) fn set_thread_name(name: &str) {
    let mut bytes = [0u8; 16];
    let n = name.len().min(15);
    bytes[..n].copy_from_slice(&name.as_bytes()[..n]);
    set_thread_name_bytes(bytes);
}

/// [`set_thread_name`] from a NUL-padded name (as PR_GET_NAME gives it); safe in a signal
/// handler.
pub(super) fn set_thread_name_bytes(mut bytes: [u8; 16]) {
    bytes[15] = 0;
    THREAD_NAME.with(|n| n.set(bytes));
}

/// The first violation: claimed, then the name stored, then the call number published.
static CLAIMED: AtomicBool = AtomicBool::new(false);
static NAME: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
static SYSCALL: AtomicI64 = AtomicI64::new(-1);
/// Where the handler stops the VM (leaked: a handler may run until the process ends).
static STOP: AtomicPtr<StopHandle> = AtomicPtr::new(std::ptr::null_mut());
/// Where there is no VM to stop: print the line and exit instead ([`ExitLine`] as a number,
/// 0: stop the VM).
static EXIT_AT_ONCE: AtomicU8 = AtomicU8::new(0);
/// Whether the handler is installed.
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// How the line starts when the handler ends the process itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ExitLine {
    /// `vmm device epf`.
    Epf = 1,
    /// The API thread, with no VM (yet) to stop.
    Api = 2,
}

impl ExitLine {
    fn prefix(code: u8) -> Option<&'static [u8]> {
        match code {
            1 => Some(b"vmm: device epf: seccomp: thread "),
            2 => Some(b"vmm: seccomp: thread "),
            _ => None,
        }
    }
}

/// A forbidden system call that was made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The thread's name (`vcpu0`, `main`, `pin-helper-1`, ...).
    pub thread: String,
    /// The x86_64 system call number.
    pub syscall: i64,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seccomp: thread {} made forbidden system call {} ({})",
            self.thread,
            self.syscall,
            super::names::name(self.syscall)
        )
    }
}

/// The first forbidden call this process made, if it made one.
pub fn violation() -> Option<Violation> {
    let syscall = SYSCALL.load(Ordering::Acquire);
    if syscall < 0 {
        return None;
    }
    Some(Violation {
        thread: thread_name(recorded_name()),
        syscall,
    })
}

fn recorded_name() -> [u8; 16] {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&NAME[0].load(Ordering::Acquire).to_ne_bytes());
    bytes[8..].copy_from_slice(&NAME[1].load(Ordering::Acquire).to_ne_bytes());
    bytes
}

fn thread_name(bytes: [u8; 16]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    if end == 0 {
        return "(unnamed)".into();
    }
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// The `_sigsys` member of the kernel's siginfo (x86_64): what SIGSYS from seccomp carries.
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo; for SIGSYS its union holds `_sigsys`.
    let syscall = i64::from(unsafe { (*info.cast::<SigsysInfo>()).syscall });
    let name = THREAD_NAME.with(Cell::get);
    if !CLAIMED.swap(true, Ordering::AcqRel) {
        NAME[0].store(
            u64::from_ne_bytes(name[..8].try_into().unwrap_or([0; 8])),
            Ordering::Release,
        );
        NAME[1].store(
            u64::from_ne_bytes(name[8..].try_into().unwrap_or([0; 8])),
            Ordering::Release,
        );
        SYSCALL.store(syscall, Ordering::Release);
    }
    // The call did not run: make it return -EPERM, as SECCOMP_RET_ERRNO would.
    // SAFETY: for an SA_SIGINFO handler `context` is the thread's ucontext_t, which the
    // kernel restores (RAX included) when the handler returns.
    unsafe {
        let uc = context.cast::<libc::ucontext_t>();
        (*uc).uc_mcontext.gregs[libc::REG_RAX as usize] = -i64::from(libc::EPERM);
    }
    if let Some(prefix) = ExitLine::prefix(EXIT_AT_ONCE.load(Ordering::Acquire)) {
        let mut line = Line::default();
        line.push(prefix);
        line.push_name(&name);
        line.push(b" made forbidden system call ");
        line.push_number(syscall);
        line.push(b" (");
        line.push(super::names::name(syscall).as_bytes());
        line.push(b")\n");
        // SAFETY: write and exit_group are async-signal-safe; the buffer is a live local.
        unsafe {
            libc::write(libc::STDERR_FILENO, line.buf.as_ptr().cast(), line.len);
            libc::syscall(libc::SYS_exit_group, 1);
        }
    }
    let stop = STOP.load(Ordering::Acquire);
    if !stop.is_null() {
        // SAFETY: STOP holds a leaked StopHandle, never freed; `request` is an atomic
        // compare-exchange and an eventfd write.
        unsafe { (*stop).request(ExitReason::Stop) };
    }
}

/// A fixed buffer a signal handler can format a line into.
struct Line {
    buf: [u8; 192],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Line {
            buf: [0; 192],
            len: 0,
        }
    }
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_name(&mut self, name: &[u8; 16]) {
        let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        if end == 0 {
            self.push(b"(unnamed)");
        } else {
            self.push(&name[..end]);
        }
    }

    fn push_number(&mut self, n: i64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let mut v = n.unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        if n < 0 {
            self.push(b"-");
        }
        self.push(&digits[i..]);
    }
}

/// Whether [`install_handler`] has run in this process.
pub(super) fn handler_installed() -> bool {
    INSTALLED.load(Ordering::Acquire)
}

/// Installs the SIGSYS handler. It stops the VM through `stop`; with `exit` (no VM to stop)
/// it prints the line and exits 1 instead.
pub(super) fn install_handler(
    stop: Option<StopHandle>,
    exit: Option<ExitLine>,
) -> std::io::Result<()> {
    if let Some(stop) = stop {
        let old = STOP.swap(Box::into_raw(Box::new(stop)), Ordering::AcqRel);
        // The previous one stays leaked: a handler may still be reading it.
        let _ = old;
    }
    EXIT_AT_ONCE.store(exit.map_or(0, |e| e as u8), Ordering::Release);
    // SAFETY: a zeroed sigaction is valid (empty mask, no flags); the handler only does what
    // is safe in a signal handler.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_sigsys
            as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void)
            as usize;
        act.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut act.sa_mask);
        if libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    INSTALLED.store(true, Ordering::Release);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_formatted_without_allocating() {
        let mut line = Line::default();
        line.push(b"thread ");
        let mut name = [0u8; 16];
        name[..5].copy_from_slice(b"vcpu0");
        line.push_name(&name);
        line.push(b" call ");
        line.push_number(110);
        line.push(b" ");
        line.push_number(0);
        line.push(b" ");
        line.push_number(-12);
        assert_eq!(&line.buf[..line.len], b"thread vcpu0 call 110 0 -12");
        line.push(&[b'x'; 400]);
        assert_eq!(line.len, line.buf.len());
        assert_eq!(thread_name([0; 16]), "(unnamed)");
    }

    #[test]
    fn a_violation_names_the_thread_and_the_call() {
        let v = Violation {
            thread: "vcpu0".into(),
            syscall: libc::SYS_getppid,
        };
        assert_eq!(
            v.to_string(),
            "seccomp: thread vcpu0 made forbidden system call 110 (getppid)"
        );
    }
}
