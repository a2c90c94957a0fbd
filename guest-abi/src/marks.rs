//! Boot marks: single bytes the guest writes to [`crate::ports::BOOT_MARKS`] at points of its
//! start-up, which the VMM timestamps for its timeline report.
//!
//! The device records every byte; only [`READY`] means something to it. Any byte other than
//! these is kept (up to a bound) as an "other" mark, so a guest may add its own.

/// The guest is up: the VMM takes the first write of this byte as the end of the boot. The
/// probe writes it after its last check, just before the result line; the Linux guest's init
/// (resources/linux/make-guest.sh) once userspace runs.
pub const READY: u8 = 0x01;

/// The guest's entry point ran: the probe writes it right after its first (`hello`) line. To
/// the device it is an ordinary mark; the launch report looks for it among the others to time
/// the guest's entry.
pub const ENTRY: u8 = 0x02;
