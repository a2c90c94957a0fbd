//! Cancellation: a token checked between chunks, set by the caller or by SIGINT/SIGTERM.
//!
//! A signal handler may only touch async-signal-safe state, so the handler stores the signal
//! number in a process-wide atomic and, if one was registered, writes to an eventfd so that an
//! event loop wakes up. Tokens that watch signals read that atomic.

use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};
use std::sync::Arc;

use crate::class::{Classify, ErrorClass};
use crate::sys;

/// The first SIGINT/SIGTERM received while a [`SignalGuard`] was installed (0 = none).
static PENDING_SIGNAL: AtomicI32 = AtomicI32::new(0);
/// Every SIGINT/SIGTERM caught, the first and the ones after it (test fault points wait for
/// one; see [`signals_caught`]).
static SIGNALS_CAUGHT: AtomicU32 = AtomicU32::new(0);
/// An eventfd to poke when a signal arrives (-1 = none).
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);

/// Why a job stopped early.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CancelReason {
    /// A signal (SIGINT, SIGTERM) arrived.
    Signal(i32),
    /// The caller asked.
    Requested,
}

impl Classify for CancelReason {
    /// A caller's request is no signal from the user: nothing for them to fix, so Internal.
    fn class(&self) -> ErrorClass {
        match *self {
            CancelReason::Signal(sig) => ErrorClass::Interrupted(sig),
            CancelReason::Requested => ErrorClass::Internal,
        }
    }
}

impl std::fmt::Display for CancelReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CancelReason::Signal(sig) => write!(f, "{}", sys::signal_name(*sig)),
            CancelReason::Requested => f.write_str("request"),
        }
    }
}

/// Shared cancellation flag. Cheap to clone; all clones see the same state.
#[derive(Clone, Debug, Default)]
pub struct CancelToken {
    requested: Arc<AtomicI32>,
    watch_signals: bool,
}

impl CancelToken {
    /// A token only the caller can cancel.
    pub fn new() -> Self {
        Self::default()
    }

    /// A token that is also cancelled by a SIGINT/SIGTERM caught by a [`SignalGuard`].
    pub fn with_signals() -> Self {
        Self {
            requested: Arc::default(),
            watch_signals: true,
        }
    }

    pub fn cancel(&self) {
        self.requested.store(1, Ordering::SeqCst);
    }

    /// Why the job should stop, if it should.
    pub fn reason(&self) -> Option<CancelReason> {
        if self.watch_signals {
            if let Some(sig) = pending_signal() {
                return Some(CancelReason::Signal(sig));
            }
        }
        (self.requested.load(Ordering::SeqCst) != 0).then_some(CancelReason::Requested)
    }

    pub fn is_cancelled(&self) -> bool {
        self.reason().is_some()
    }
}

/// The signal caught since the guard was installed, if any.
pub fn pending_signal() -> Option<i32> {
    match PENDING_SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        sig => Some(sig),
    }
}

/// How many SIGINT/SIGTERM the handler has caught since the process started, so that a
/// test fault point can wait for the next one (the pending signal keeps only the first).
pub fn signals_caught() -> u32 {
    SIGNALS_CAUGHT.load(Ordering::SeqCst)
}

extern "C" fn on_signal(sig: libc::c_int) {
    // Keep the first signal: a second Ctrl-C must not change the exit status we report.
    let _ = PENDING_SIGNAL.compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst);
    SIGNALS_CAUGHT.fetch_add(1, Ordering::SeqCst);
    let fd = WAKE_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; the buffer is a live local of the right size.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

/// Catches SIGINT and SIGTERM while alive, restoring the previous handlers on drop.
pub struct SignalGuard {
    previous: Vec<(i32, libc::sigaction)>,
}

impl SignalGuard {
    /// Installs the handlers. `wake_fd`, if given, is an eventfd written on each signal.
    pub fn install(wake_fd: Option<i32>) -> std::io::Result<Self> {
        PENDING_SIGNAL.store(0, Ordering::SeqCst);
        WAKE_FD.store(wake_fd.unwrap_or(-1), Ordering::SeqCst);
        let mut previous = Vec::new();
        for sig in [libc::SIGINT, libc::SIGTERM] {
            match sys::set_signal_handler(sig, on_signal as *const () as usize) {
                Ok(old) => previous.push((sig, old)),
                Err(e) => {
                    // Restore what we changed before reporting.
                    drop(Self { previous });
                    return Err(e);
                }
            }
        }
        Ok(Self { previous })
    }
}

impl Drop for SignalGuard {
    fn drop(&mut self) {
        for (sig, old) in self.previous.drain(..) {
            sys::restore_signal_handler(sig, &old);
        }
        WAKE_FD.store(-1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_cancel_is_shared_by_clones() {
        let a = CancelToken::new();
        let b = a.clone();
        assert!(!b.is_cancelled());
        a.cancel();
        assert_eq!(b.reason(), Some(CancelReason::Requested));
    }

    #[test]
    fn a_signal_is_an_interruption_and_a_request_is_not() {
        let int = CancelReason::Signal(libc::SIGINT).class();
        assert_eq!(int, ErrorClass::Interrupted(libc::SIGINT));
        assert_eq!(int.exit_status(), 130);
        assert_eq!(
            CancelReason::Signal(libc::SIGTERM).class().exit_status(),
            143
        );
        assert_eq!(CancelReason::Requested.class(), ErrorClass::Internal);
    }
}
