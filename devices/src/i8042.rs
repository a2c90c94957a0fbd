//! A minimal i8042 keyboard controller: enough for a guest to probe it without errors and,
//! above all, to reset the machine the way Linux does on `reboot` (command 0xFE on port 0x64).
//! There is no keyboard or mouse behind it and no IRQ 1.
//!
//! Registered on ports 0x60..=0x64: data at offset 0, status/command at offset 4.

use std::sync::Arc;

use guest_abi::ports::{I8042_BASE, I8042_COMMAND};

use crate::bus::BusDevice;
use crate::exit::{ExitNotifier, ExitReason};

const DATA: u64 = 0;
const COMMAND: u64 = (I8042_COMMAND - I8042_BASE) as u64;

// Status register bits.
const SB_OUT_FULL: u8 = 0x01;
// "System flag": set once the controller passed its self-test, which it always has.
const SB_SYSTEM: u8 = 0x04;
// Last write went to the command port.
const SB_CMD_DATA: u8 = 0x08;
// Keyboard not inhibited.
const SB_KBD_ENABLED: u8 = 0x10;

// Controller commands.
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xa7;
const CMD_ENABLE_AUX: u8 = 0xa8;
const CMD_TEST_AUX: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_TEST_KBD: u8 = 0xab;
const CMD_DISABLE_KBD: u8 = 0xad;
const CMD_ENABLE_KBD: u8 = 0xae;
const CMD_READ_OUTP: u8 = 0xd0;
const CMD_WRITE_OUTP: u8 = 0xd1;
const CMD_RESET_CPU: u8 = guest_abi::exit::I8042_RESET;

const SELF_TEST_OK: u8 = 0x55;
const PORT_TEST_OK: u8 = 0x00;
// Output port bit 0 low = hold the CPU in reset.
const OUTP_RESET_RELEASED: u8 = 0x01;
// Controller configuration byte after power-on: keyboard IRQ on, system flag, translation.
const CTR_DEFAULT: u8 = 0x45;

/// The i8042 controller.
#[derive(Debug)]
pub struct I8042 {
    exit: Arc<ExitNotifier>,
    status: u8,
    ctr: u8,
    outp: u8,
    out_byte: Option<u8>,
    // A command that takes a data byte on port 0x60 next.
    pending: Option<u8>,
}

impl I8042 {
    /// Signals `exit` with [`ExitReason::Reset`] when the guest resets through the controller.
    pub fn new(exit: Arc<ExitNotifier>) -> Self {
        I8042 {
            exit,
            status: SB_SYSTEM | SB_KBD_ENABLED,
            ctr: CTR_DEFAULT,
            outp: OUTP_RESET_RELEASED,
            out_byte: None,
            pending: None,
        }
    }

    fn push(&mut self, byte: u8) {
        self.out_byte = Some(byte);
        self.status |= SB_OUT_FULL;
    }

    fn reset(&mut self) {
        tracing::debug!("i8042: guest requested a CPU reset");
        self.exit.request(ExitReason::Reset);
    }

    fn command(&mut self, cmd: u8) {
        self.status |= SB_CMD_DATA;
        match cmd {
            CMD_READ_CTR => self.push(self.ctr),
            CMD_WRITE_CTR | CMD_WRITE_OUTP => self.pending = Some(cmd),
            CMD_SELF_TEST => self.push(SELF_TEST_OK),
            CMD_TEST_KBD | CMD_TEST_AUX => self.push(PORT_TEST_OK),
            CMD_READ_OUTP => self.push(self.outp),
            CMD_DISABLE_KBD => self.status &= !SB_KBD_ENABLED,
            CMD_ENABLE_KBD => self.status |= SB_KBD_ENABLED,
            CMD_DISABLE_AUX | CMD_ENABLE_AUX => {}
            CMD_RESET_CPU => self.reset(),
            other => tracing::debug!("i8042: ignoring command {other:#x}"),
        }
    }

    fn data(&mut self, byte: u8) {
        self.status &= !SB_CMD_DATA;
        match self.pending.take() {
            Some(CMD_WRITE_CTR) => self.ctr = byte,
            Some(CMD_WRITE_OUTP) => {
                self.outp = byte;
                if byte & OUTP_RESET_RELEASED == 0 {
                    self.reset();
                }
            }
            // No keyboard is attached: bytes for it go nowhere.
            _ => tracing::debug!("i8042: dropping keyboard byte {byte:#x}"),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            DATA => {
                self.status &= !SB_OUT_FULL;
                self.out_byte.take().unwrap_or(0)
            }
            COMMAND => self.status,
            _ => 0xff,
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&byte) = data.first() else {
            return;
        };
        match offset {
            DATA => self.data(byte),
            COMMAND => self.command(byte),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> (I8042, Arc<ExitNotifier>) {
        let exit = Arc::new(ExitNotifier::new().unwrap());
        (I8042::new(exit.clone()), exit)
    }

    fn read(d: &mut I8042, offset: u64) -> u8 {
        let mut b = [0u8];
        d.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn reset_command_signals_reset() {
        let (mut d, exit) = dev();
        d.write(COMMAND, &[CMD_RESET_CPU]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
        assert_eq!(exit.event_fd().read().unwrap(), 1);
    }

    #[test]
    fn output_port_reset_bit_signals_reset() {
        let (mut d, exit) = dev();
        d.write(COMMAND, &[CMD_WRITE_OUTP]);
        d.write(DATA, &[0xfe]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
    }

    #[test]
    fn status_and_self_test_look_sane() {
        let (mut d, exit) = dev();
        let status = read(&mut d, COMMAND);
        // Not 0xff (that means "no controller" to Linux), nothing pending, self-test passed.
        assert_ne!(status, 0xff);
        assert_eq!(status & SB_OUT_FULL, 0);
        assert_ne!(status & SB_SYSTEM, 0);

        d.write(COMMAND, &[CMD_SELF_TEST]);
        assert_ne!(read(&mut d, COMMAND) & SB_OUT_FULL, 0);
        assert_eq!(read(&mut d, DATA), SELF_TEST_OK);
        assert_eq!(read(&mut d, COMMAND) & SB_OUT_FULL, 0);

        d.write(COMMAND, &[CMD_WRITE_CTR]);
        d.write(DATA, &[0x30]);
        d.write(COMMAND, &[CMD_READ_CTR]);
        assert_eq!(read(&mut d, DATA), 0x30);
        assert_eq!(exit.reason(), None);
    }
}
