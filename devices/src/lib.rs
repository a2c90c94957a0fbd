//! What the guest sees: the port/MMIO buses and the legacy devices a minimal x86 guest needs
//! (COM1 serial, i8042 reset line, debug-exit port, boot-marks port); PCI ([`pci`]) with
//! passthrough functions behind kernel VFIO or a vfio-user server ([`vfio`], [`vfio_user`]),
//! and the pci-epf-test model ([`epf`]) such a server offers; plus the small shared pieces the
//! VMM uses to learn about the guest (marks, exit requests) and the terminal it runs in.
//!
//! Where they sit (ports, the pci-epf-test IDs and registers) and the bytes the guest writes to
//! them are the guest ABI, in the `guest-abi` crate that the probe guest builds too.
//!
//! Nothing here touches KVM: every device is plain Rust behind [`bus::BusDevice`] or
//! [`pci::PciDevice`], so all of it but the real-host VFIO tests runs without `/dev/kvm`.

pub mod boot_marks;
pub mod bus;
pub mod counters;
pub mod debug_exit;
pub mod epf;
pub mod exit;
pub mod i8042;
pub mod marks;
pub mod pci;
pub mod ratelimit;
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
