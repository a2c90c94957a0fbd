//! Debug-exit port (0xf4): the guest writes one byte, its exit status, and the VM stops.
//! Unlike QEMU's isa-debug-exit the byte is the status as is (no `(v << 1) | 1`), so a guest
//! can report 0 for success.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::exit::{ExitNotifier, ExitReason};

/// The debug-exit device.
#[derive(Debug)]
pub struct DebugExit {
    exit: Arc<ExitNotifier>,
    status: Option<u8>,
}

impl DebugExit {
    /// Signals `exit` when the guest writes its status.
    pub fn new(exit: Arc<ExitNotifier>) -> Self {
        DebugExit { exit, status: None }
    }

    /// The first status the guest wrote, if any.
    pub fn status(&self) -> Option<u8> {
        self.status
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (0, Some(&status)) = (offset, data.first()) else {
            return;
        };
        if self.status.is_none() {
            self.status = Some(status);
        }
        self.exit.request(ExitReason::GuestExit(status));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_recorded_and_exit_signalled() {
        let exit = Arc::new(ExitNotifier::new().unwrap());
        let mut dev = DebugExit::new(exit.clone());
        assert_eq!(dev.status(), None);
        // Nothing signalled yet: the non-blocking eventfd has no count.
        assert!(exit.event_fd().read().is_err());
        dev.write(0, &[7]);
        assert_eq!(dev.status(), Some(7));
        assert_eq!(exit.event_fd().read().unwrap(), 1);
        assert_eq!(exit.reason(), Some(ExitReason::GuestExit(7)));
        // A second write keeps the first status.
        dev.write(0, &[9]);
        assert_eq!(dev.status(), Some(7));
        assert_eq!(exit.reason(), Some(ExitReason::GuestExit(7)));
    }
}
