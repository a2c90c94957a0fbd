//! What the guest sees: the port/MMIO buses and the legacy devices a minimal x86 guest needs
//! (COM1 serial, i8042 reset line, debug-exit port, boot-marks port); PCI ([`pci`]) with
//! passthrough functions behind kernel VFIO or a vfio-user server ([`vfio`], [`vfio_user`]),
//! and the pci-epf-test model ([`epf`]) such a server offers; plus the small shared pieces the
//! VMM uses to learn about the guest (marks, exit requests) and the terminal it runs in.
//!
//! Nothing here touches KVM: every device is plain Rust behind [`bus::BusDevice`] or
//! [`pci::PciDevice`], so all of it but the real-host VFIO tests runs without `/dev/kvm`.

pub mod boot_marks;
pub mod bus;
pub mod debug_exit;
pub mod epf;
pub mod exit;
pub mod i8042;
pub mod marks;
pub mod pci;
pub mod serial;
pub mod terminal;
pub mod vfio;
pub mod vfio_user;

pub use boot_marks::BootMarks;
pub use bus::{Bus, BusDevice, BusError, BusRange};
pub use debug_exit::DebugExit;
pub use exit::{ExitNotifier, ExitReason};
pub use i8042::I8042;
pub use marks::{GuestMarks, Mark};
pub use serial::{EventFdTrigger, SerialDevice, SerialInput};
pub use terminal::RawTerminal;

/// I/O ports agreed with the probe guest (resources/): keep them in one place.
pub mod ports {
    /// COM1 16550 UART, 8 registers.
    pub const SERIAL_COM1: u16 = 0x3f8;
    /// Number of COM1 registers.
    pub const SERIAL_LEN: u16 = 8;
    /// Boot-marks port (1 byte): 0x01 ready, 0x02 guest entry, others recorded as marks.
    pub const BOOT_MARKS: u16 = 0x440;
    /// Debug-exit port: the byte written is the guest's exit status.
    pub const DEBUG_EXIT: u16 = 0xf4;
    /// i8042 data port; the device spans 0x60..=0x64 (0x64 = status/command).
    pub const I8042_BASE: u16 = 0x60;
    /// Span of the i8042 registration (data at +0, command/status at +4).
    pub const I8042_LEN: u16 = 5;
    /// Legacy IRQ line (and GSI) of COM1.
    pub const SERIAL_IRQ: u32 = 4;
}
