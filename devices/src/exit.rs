//! One channel through which anything (a device, a vCPU thread, a signal handler) asks the VMM
//! to stop, and says why.
//!
//! The first reason wins: a guest that writes its exit status and then triple-faults exited with
//! its status. The reason is kept in one atomic word and the wake-up is an `EventFd` write, so
//! [`ExitNotifier::request`] takes no lock and is safe to call from a signal handler.

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why the VM has to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest wrote its exit status to the debug-exit port.
    GuestExit(u8),
    /// The guest asked for a reset (i8042 pulse, or a KVM reset system event).
    Reset,
    /// The guest asked KVM to power off (KVM shutdown system event).
    Shutdown,
    /// The vCPU halted with interrupts disabled: nothing can wake it, the guest is done.
    Halted {
        /// Index of the vCPU.
        cpu: u32,
    },
    /// A vCPU stopped on a fault (triple fault, failed entry, internal error); the details are
    /// in that vCPU thread's result.
    VcpuFault {
        /// Index of the vCPU.
        cpu: u32,
    },
    /// The VMM received this signal.
    Signal(i32),
    /// The VMM itself asked to stop (for example `Vm::stop`).
    Stop,
    /// A passthrough device (or the server behind it) failed; the VMM keeps the details.
    DeviceFailed,
    /// Whoever drives the VMM asked it to shut the VM down (the API's vm.shutdown): a clean
    /// end, unlike [`ExitReason::Stop`], which the VMM uses when something went wrong.
    ShutdownRequested,
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::GuestExit(s) => write!(f, "guest exit status {s}"),
            ExitReason::Reset => write!(f, "guest reset"),
            ExitReason::Shutdown => write!(f, "guest shutdown"),
            ExitReason::Halted { cpu } => write!(f, "vCPU {cpu} halted with interrupts disabled"),
            ExitReason::VcpuFault { cpu } => write!(f, "vCPU {cpu} fault"),
            ExitReason::Signal(n) => write!(f, "signal {n}"),
            ExitReason::Stop => write!(f, "stop requested"),
            ExitReason::DeviceFailed => write!(f, "passthrough device failed"),
            ExitReason::ShutdownRequested => write!(f, "shutdown requested"),
        }
    }
}

// Encoding in one u64 so the first writer can win with a compare-exchange:
// bits 56..64 a tag (0 = no reason yet), bits 0..32 the payload.
const TAG_SHIFT: u32 = 56;

impl ExitReason {
    fn encode(self) -> u64 {
        let (tag, payload): (u64, u32) = match self {
            ExitReason::GuestExit(s) => (1, u32::from(s)),
            ExitReason::Reset => (2, 0),
            ExitReason::Shutdown => (3, 0),
            ExitReason::Halted { cpu } => (4, cpu),
            ExitReason::VcpuFault { cpu } => (5, cpu),
            // Signal numbers are small and positive; the cast round-trips through decode.
            ExitReason::Signal(n) => (6, n as u32),
            ExitReason::Stop => (7, 0),
            ExitReason::DeviceFailed => (8, 0),
            ExitReason::ShutdownRequested => (9, 0),
        };
        (tag << TAG_SHIFT) | u64::from(payload)
    }

    fn decode(word: u64) -> Option<Self> {
        let payload = (word & 0xffff_ffff) as u32;
        Some(match word >> TAG_SHIFT {
            1 => ExitReason::GuestExit(payload as u8),
            2 => ExitReason::Reset,
            3 => ExitReason::Shutdown,
            4 => ExitReason::Halted { cpu: payload },
            5 => ExitReason::VcpuFault { cpu: payload },
            6 => ExitReason::Signal(payload as i32),
            7 => ExitReason::Stop,
            8 => ExitReason::DeviceFailed,
            9 => ExitReason::ShutdownRequested,
            _ => return None,
        })
    }
}

/// Shared (in an `Arc`) between the devices, the vCPU threads and the VMM's event loop.
#[derive(Debug)]
pub struct ExitNotifier {
    reason: AtomicU64,
    evt: EventFd,
}

impl ExitNotifier {
    /// A notifier with no reason recorded yet.
    pub fn new() -> io::Result<Self> {
        Ok(ExitNotifier {
            reason: AtomicU64::new(0),
            evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Records `reason` unless another one was recorded first, and wakes the VMM either way.
    /// Returns whether this call's reason was the one kept.
    pub fn request(&self, reason: ExitReason) -> bool {
        let won = self
            .reason
            .compare_exchange(0, reason.encode(), Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        // A failed write can only mean the counter is saturated, i.e. a wake-up is pending.
        let _ = self.evt.write(1);
        won
    }

    /// The reason recorded first, if any.
    pub fn reason(&self) -> Option<ExitReason> {
        ExitReason::decode(self.reason.load(Ordering::Acquire))
    }

    /// The `EventFd` that becomes readable once a reason is recorded (for epoll).
    pub fn event_fd(&self) -> &EventFd {
        &self.evt
    }

    /// Drains the wake-up counter (after epoll said it is readable).
    pub fn consume(&self) {
        let _ = self.evt.read();
    }
}

/// A handle other threads (or a signal handler) use to stop the VM: of the notifier, only
/// [`ExitNotifier::request`].
#[derive(Clone, Debug)]
pub struct StopHandle(Arc<ExitNotifier>);

impl StopHandle {
    /// A handle that stops the VM through `notifier`.
    pub fn new(notifier: Arc<ExitNotifier>) -> Self {
        StopHandle(notifier)
    }

    /// Stops the VM for `reason` (e.g. `ExitReason::Signal(libc::SIGTERM)`). Lock-free: an
    /// atomic compare-exchange and an eventfd write, so a signal handler may call it.
    pub fn request(&self, reason: ExitReason) {
        self.0.request(reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_wakes() {
        let n = ExitNotifier::new().unwrap();
        assert_eq!(n.reason(), None);
        assert!(n.request(ExitReason::GuestExit(7)));
        assert!(!n.request(ExitReason::Reset));
        assert_eq!(n.reason(), Some(ExitReason::GuestExit(7)));
        // Two writes, one counter.
        assert_eq!(n.event_fd().read().unwrap(), 2);
    }

    #[test]
    fn every_reason_round_trips() {
        for r in [
            ExitReason::GuestExit(0),
            ExitReason::GuestExit(255),
            ExitReason::Reset,
            ExitReason::Shutdown,
            ExitReason::Halted { cpu: 3 },
            ExitReason::VcpuFault { cpu: 1 },
            ExitReason::Signal(15),
            ExitReason::Stop,
            ExitReason::DeviceFailed,
            ExitReason::ShutdownRequested,
        ] {
            assert_eq!(ExitReason::decode(r.encode()), Some(r));
        }
        assert_eq!(ExitReason::decode(0), None);
    }
}
