//! The `vmm` library: guest memory, the command-line pieces, and (as they land) the VM
//! builder, boot and run loop. The binary in `main.rs` is a thin shell over it.

pub mod memory;
pub mod pin_bench;
pub mod size;
