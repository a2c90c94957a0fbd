//! I/O ports: where the VMM registers its legacy devices and where the guest writes.
//!
//! COM1, the debug-exit port and the i8042 sit where a PC (or QEMU) has them, so the same probe
//! image runs unchanged under QEMU (resources/tests/qemu_probe.rs) and Linux guests need no
//! extra configuration.

/// COM1, the 16550 UART: the PC's first serial port, where `console=ttyS0` and the probe's
/// polled output go without being told an address.
pub const SERIAL_COM1: u16 = 0x3f8;
/// A 16550 has 8 byte-wide registers.
pub const SERIAL_LEN: u16 = 8;
/// COM1's ISA IRQ, also its GSI: what Linux assumes for ttyS0 and the DSDT's COM1 device
/// declares.
pub const SERIAL_IRQ: u32 = 4;

/// The boot-marks port, one byte wide ([`crate::marks`]): above the 0x000-0x3ff range of the
/// legacy ISA devices PC guests probe, so no driver writes to it by accident.
pub const BOOT_MARKS: u16 = 0x440;

/// The debug-exit port, one byte wide ([`crate::exit`]): QEMU's customary
/// `isa-debug-exit,iobase=0xf4`, so a guest ends a QEMU run and a VMM run the same way.
pub const DEBUG_EXIT: u16 = 0xf4;

/// The i8042 keyboard controller's data port: the PC's, as Linux expects it.
pub const I8042_BASE: u16 = 0x60;
/// The i8042's status/command port, where a reset command goes ([`crate::exit::I8042_RESET`]).
pub const I8042_COMMAND: u16 = 0x64;
/// The i8042 device's span: data through status/command.
pub const I8042_LEN: u16 = I8042_COMMAND - I8042_BASE + 1;
