//! How the guest ends the run: the status byte it writes to [`crate::ports::DEBUG_EXIT`], and
//! the i8042 reset it falls back on where there is no debug-exit device.
//!
//! The VMM exits with the byte as is; QEMU's `isa-debug-exit` exits with `(status << 1) | 1`.

/// Every check passed.
pub const OK: u8 = 0;

/// A check failed; the probe's result line says which.
pub const CHECK_FAILED: u8 = 1;

/// A CPU exception (or a panic) ended the run. Not 2: `vmm` itself exits 2 for bad input, so
/// a 2 never comes from the guest.
pub const EXCEPTION: u8 = 3;

/// The i8042 command that pulses the CPU reset line, written to
/// [`crate::ports::I8042_COMMAND`]: how Linux reboots a PC (`reboot=k`), and the probe's last
/// resort when the debug-exit write returned.
pub const I8042_RESET: u8 = 0xfe;
