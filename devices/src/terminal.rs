//! Puts the controlling terminal (stdin) into raw input mode while the guest owns the console,
//! and guarantees it is restored: on drop, and from a signal handler via
//! [`RawTerminal::restore_from_signal`].
//!
//! Only input processing is changed (no line buffering, no echo, no CR->NL): output
//! post-processing stays on so host-side newlines keep working, and ISIG stays on so Ctrl-C
//! still reaches the VMM. Under this project's emulated KVM a stuck guest must stay killable.

use std::io;
use std::os::fd::RawFd;
use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};

#[derive(Clone, Copy)]
struct Saved {
    fd: RawFd,
    termios: libc::termios,
}

// What a signal handler restores. Each `enter` leaks one small `Saved` on purpose: a handler
// may be reading it at any moment, so it is never freed (one per guest run).
static SIGNAL_RESTORE: AtomicPtr<Saved> = AtomicPtr::new(ptr::null_mut());

/// Guard: while alive, the terminal is in raw input mode.
pub struct RawTerminal {
    saved: Saved,
    published: *mut Saved,
}

// SAFETY: `published` is only compared and swapped atomically, never dereferenced by the guard.
unsafe impl Send for RawTerminal {}

impl std::fmt::Debug for RawTerminal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawTerminal")
            .field("fd", &self.saved.fd)
            .finish()
    }
}

fn is_tty(fd: RawFd) -> bool {
    // SAFETY: isatty only inspects the fd.
    unsafe { libc::isatty(fd) == 1 }
}

fn get_termios(fd: RawFd) -> io::Result<libc::termios> {
    // SAFETY: termios is plain data; tcgetattr fills it or fails.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer; a bad fd makes tcgetattr fail, which is checked.
    if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(t)
}

fn set_termios(fd: RawFd, t: &libc::termios) -> io::Result<()> {
    // SAFETY: a valid pointer to initialised settings; errors are returned.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl RawTerminal {
    /// Switches stdin to raw input mode if it is a terminal. `Ok(None)` when it is not (a pipe,
    /// a file, `/dev/null`): nothing to do and nothing to restore.
    pub fn enter() -> io::Result<Option<RawTerminal>> {
        Self::enter_fd(libc::STDIN_FILENO)
    }

    /// Like [`RawTerminal::enter`] for any terminal fd.
    pub fn enter_fd(fd: RawFd) -> io::Result<Option<RawTerminal>> {
        if !is_tty(fd) {
            return Ok(None);
        }
        let original = get_termios(fd)?;
        let mut raw = original;
        raw.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ECHONL | libc::IEXTEN);
        raw.c_iflag &= !(libc::ICRNL | libc::INLCR | libc::IGNCR | libc::IXON);
        raw.c_cc[libc::VMIN] = 1;
        raw.c_cc[libc::VTIME] = 0;
        let saved = Saved {
            fd,
            termios: original,
        };
        let published = Box::into_raw(Box::new(saved));
        SIGNAL_RESTORE.store(published, Ordering::Release);
        set_termios(fd, &raw)?;
        Ok(Some(RawTerminal { saved, published }))
    }

    /// Restores the terminal if a guard is active. Async-signal-safe (an atomic swap and
    /// `tcsetattr`), so a SIGTERM/SIGINT handler may call it before the process dies.
    pub fn restore_from_signal() {
        let p = SIGNAL_RESTORE.swap(ptr::null_mut(), Ordering::AcqRel);
        if !p.is_null() {
            // SAFETY: non-null pointers stored in SIGNAL_RESTORE come from Box::into_raw and
            // are never freed.
            let saved = unsafe { *p };
            let _ = set_termios(saved.fd, &saved.termios);
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // Withdraw our entry (unless a newer guard replaced it), then restore; restoring twice
        // after a signal handler already did is harmless.
        let _ = SIGNAL_RESTORE.compare_exchange(
            self.published,
            ptr::null_mut(),
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        if let Err(e) = set_termios(self.saved.fd, &self.saved.termios) {
            tracing::debug!("restoring terminal settings failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;
    use std::sync::Mutex;

    // The signal-restore slot is process-wide: tests that touch it take turns.
    static SERIAL: Mutex<()> = Mutex::new(());

    /// Opens a pseudo-terminal pair; returns (master, slave) fds.
    fn open_pty() -> (RawFd, RawFd) {
        // SAFETY: plain libc calls with checked results; ptsname's buffer is copied at once.
        unsafe {
            let master = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY);
            assert!(master >= 0, "posix_openpt: {}", io::Error::last_os_error());
            assert_eq!(libc::grantpt(master), 0);
            assert_eq!(libc::unlockpt(master), 0);
            let name = CStr::from_ptr(libc::ptsname(master)).to_owned();
            let slave = libc::open(name.as_ptr(), libc::O_RDWR | libc::O_NOCTTY);
            assert!(slave >= 0, "open {name:?}: {}", io::Error::last_os_error());
            (master, slave)
        }
    }

    #[test]
    fn raw_mode_is_entered_and_restored_on_drop() {
        let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let (master, slave) = open_pty();
        let before = get_termios(slave).unwrap();
        assert_ne!(before.c_lflag & libc::ICANON, 0, "a fresh pty is canonical");
        let guard = RawTerminal::enter_fd(slave)
            .unwrap()
            .expect("a pty is a tty");
        let raw = get_termios(slave).unwrap();
        assert_eq!(raw.c_lflag & (libc::ICANON | libc::ECHO), 0);
        assert_ne!(
            raw.c_lflag & libc::ISIG,
            0,
            "Ctrl-C must still reach the VMM"
        );
        assert_ne!(raw.c_oflag & libc::OPOST, 0, "output processing stays on");
        drop(guard);
        let after = get_termios(slave).unwrap();
        assert_eq!(after.c_lflag, before.c_lflag);
        assert_eq!(after.c_iflag, before.c_iflag);
        // SAFETY: closing fds this test opened.
        unsafe {
            libc::close(slave);
            libc::close(master);
        }
    }

    #[test]
    fn signal_path_restores_and_non_tty_is_left_alone() {
        let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let (master, slave) = open_pty();
        let before = get_termios(slave).unwrap();
        let guard = RawTerminal::enter_fd(slave).unwrap().unwrap();
        RawTerminal::restore_from_signal();
        assert_eq!(get_termios(slave).unwrap().c_lflag, before.c_lflag);
        drop(guard);

        // A pipe is not a terminal: no guard.
        let mut fds = [0; 2];
        // SAFETY: a valid two-element array for pipe().
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        assert!(RawTerminal::enter_fd(fds[0]).unwrap().is_none());
        // SAFETY: closing fds this test opened.
        unsafe {
            for fd in [fds[0], fds[1], slave, master] {
                libc::close(fd);
            }
        }
    }
}
