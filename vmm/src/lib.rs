//! The `vmm` library: guest memory, the command-line pieces, and (as they land) the VM
//! builder, boot and run loop. The binary in `main.rs` is a thin shell over it.

pub mod bench;
pub mod launch;
pub mod memory;
pub mod pin_bench;
pub mod size;
pub mod timeline;

// Boot/run core.
pub mod arch;
pub mod layout;
pub mod loader;
pub mod passthrough;
pub mod pci;
pub mod resources;
pub mod run;
pub mod vcpu;
pub mod vm;
