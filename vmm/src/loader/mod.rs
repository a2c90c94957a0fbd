//! Loading the guest: kernel (ELF vmlinux or bzImage, through linux-loader), command line,
//! initrd, the boot information block for the chosen entry protocol, and the fixed tables
//! (GDT, identity page tables, MP table, ACPI tables).
//!
//! Every error names the image (its path, or the name given to in-memory bytes) and the reason.
//! [`check`] refuses, from the images' headers alone, what [`load`] would refuse, so that
//! `vmm run` can say so before any guest memory exists; both run the same checks.

mod image;
mod kernel;

pub use image::ImageSource;
#[cfg(test)]
use kernel::*;
use kernel::{inspect_kernel, load_kernel};

use std::fmt;
use std::io;
use std::str::FromStr;

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::load_cmdline;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use crate::arch::x86_64::acpi::{self, AcpiError, GuestNuma};
use crate::arch::x86_64::boot_params::{self, BootParamsError, InitrdPlacement};
use crate::arch::x86_64::gdt;
use crate::arch::x86_64::mptable::{self, MpTableError};
use crate::arch::x86_64::regs::{self, EntryMode};
use crate::memory::layout::{CMDLINE_ADDR, PAGE_SIZE};
use crate::memory::MemoryLayout;

/// Which entry point to use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BootProtocol {
    /// PVH when the ELF has a PVH note, else the 64-bit Linux entry.
    #[default]
    Auto,
    /// Always the 64-bit Linux entry (ELF `e_entry`, or bzImage load address + 0x200).
    Linux64,
    /// Always PVH; an error if the image has no PVH note.
    Pvh,
}

impl FromStr for BootProtocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(BootProtocol::Auto),
            "linux64" | "linux" | "64" => Ok(BootProtocol::Linux64),
            "pvh" => Ok(BootProtocol::Pvh),
            other => Err(format!(
                "unknown boot protocol {other:?} (auto, linux64, pvh)"
            )),
        }
    }
}

impl fmt::Display for BootProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BootProtocol::Auto => "auto",
            BootProtocol::Linux64 => "linux64",
            BootProtocol::Pvh => "pvh",
        })
    }
}

/// The kernel formats recognised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// ELF vmlinux (or the probe guest).
    Elf,
    /// bzImage.
    BzImage,
}

/// What the vCPU stage needs to start the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootSetup {
    /// Kernel format.
    pub format: KernelFormat,
    /// Entry protocol chosen.
    pub mode: EntryMode,
    /// Entry point (RIP/EIP).
    pub entry: GuestAddress,
    /// One past the highest kernel byte.
    pub kernel_end: u64,
    /// The initrd, if any.
    pub initrd: Option<InitrdPlacement>,
    /// Command line length without its NUL.
    pub cmdline_len: usize,
}

/// Load-stage errors.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot open {image}: {source}; check the --kernel/--initrd path")]
    Open { image: String, source: io::Error },
    #[error("cannot read {image}: {source}")]
    Read { image: String, source: io::Error },
    #[error(
        "{image} is neither an ELF vmlinux nor a bzImage (no ELF magic, no \"HdrS\" at 0x202)"
    )]
    NotAKernel { image: String },
    #[error("{image}: unsupported ELF: {reason}")]
    UnsupportedElf { image: String, reason: String },
    #[error("{image}: unsupported bzImage: {reason}")]
    UnsupportedBzImage { image: String, reason: String },
    #[error("{image} does not fit in guest memory: it needs {start:#x}..{end:#x}, RAM below the 32-bit MMIO hole ends at {limit:#x}; give the guest more --memory")]
    KernelTooBig {
        image: String,
        start: u64,
        end: u64,
        limit: u64,
    },
    #[error("{image}: {source}")]
    Kernel {
        image: String,
        source: linux_loader::loader::Error,
    },
    #[error("{image}: PVH boot requested but {reason}")]
    PvhUnavailable { image: String, reason: &'static str },
    #[error("the kernel command line is {len} bytes with its NUL, the kernel accepts at most {limit}: shorten --cmdline")]
    CmdlineTooLong { len: usize, limit: usize },
    #[error("the kernel command line contains a NUL byte at offset {0}: remove it from --cmdline")]
    CmdlineNul(usize),
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error("initrd {image} ({size} bytes) does not fit in guest memory: {available} bytes free between the kernel end {kernel_end:#x} and {top:#x}; give the guest more --memory or a smaller initrd")]
    InitrdTooBig {
        image: String,
        size: u64,
        available: u64,
        kernel_end: u64,
        top: u64,
    },
    #[error("initrd {image}: copying {size} bytes to {addr:#x} failed: {source}")]
    InitrdCopy {
        image: String,
        size: u64,
        addr: u64,
        source: GuestMemoryError,
    },
    #[error(transparent)]
    BootParams(#[from] BootParamsError),
    #[error(transparent)]
    MpTable(#[from] MpTableError),
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    #[error("writing the {what} failed: {source}")]
    Tables {
        what: &'static str,
        source: GuestMemoryError,
    },
}

impl pinning::Classify for LoadError {
    /// The images and the command line are the user's; so is a guest too small for them.
    fn class(&self) -> pinning::ErrorClass {
        pinning::ErrorClass::User
    }
}

/// Everything the load stage needs.
#[derive(Clone, Copy, Debug)]
pub struct LoadRequest<'a> {
    /// The kernel.
    pub kernel: &'a ImageSource,
    /// The initrd.
    pub initrd: Option<&'a ImageSource>,
    /// Kernel command line.
    pub cmdline: &'a str,
    /// Entry protocol.
    pub protocol: BootProtocol,
    /// CPUs, for the MP and ACPI tables.
    pub cpus: u8,
    /// PCI INTx lines, for the MP table and the DSDT's `_PRT`.
    pub pci_intx: &'a [mptable::PciIntx],
    /// The guest NUMA topology, for the SRAT and SLIT; none: no NUMA tables.
    pub numa: Option<&'a GuestNuma>,
}

/// Checks, without loading anything, what `load` would refuse about the images and the
/// command line: the kernel and initrd open, the kernel's headers read and its extent
/// checked against RAM below the 32-bit hole, the command line against the kernel's limit,
/// and the initrd's size against the room left above the kernel, and the guest NUMA topology
/// against `req.cpus`. Reads a few KiB of headers; `req.pci_intx` is not looked at.
pub fn check(layout: &MemoryLayout, req: &LoadRequest<'_>) -> Result<(), LoadError> {
    if let Some(numa) = req.numa {
        numa.check(req.cpus).map_err(AcpiError::from)?;
    }
    let low_end = layout.low_ram_end();
    let kernel = inspect_kernel(req.kernel, req.protocol, low_end)?;
    check_cmdline(req.cmdline, kernel.cmdline_limit)?;
    if let Some(src) = req.initrd {
        let size = src.open()?.len().map_err(|source| LoadError::Read {
            image: src.name(),
            source,
        })?;
        let top = initrd_top(low_end, kernel.initrd_addr_max);
        place_initrd(src, size, kernel.end, top)?;
    }
    Ok(())
}

/// Loads everything into `mem`, laid out as `layout` says, and returns where to start.
pub fn load(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    req: &LoadRequest<'_>,
) -> Result<BootSetup, LoadError> {
    let low_end = layout.low_ram_end();
    let loaded = load_kernel(mem, req.kernel, req.protocol, low_end)?;

    let cmdline_len = write_cmdline(mem, req.cmdline, loaded.cmdline_limit)?;

    let initrd = match req.initrd {
        Some(src) => Some(load_initrd(
            mem,
            src,
            loaded.kernel_end,
            initrd_top(low_end, loaded.initrd_addr_max),
        )?),
        None => None,
    };

    // Both blocks are written for an ELF: the zero page costs nothing and lets a guest entered
    // through PVH read the same facts either way.
    let bp = boot_params::zero_page(loaded.header, cmdline_len, initrd, layout)?;
    boot_params::write_zero_page(mem, &bp)?;
    if loaded.format == KernelFormat::Elf {
        boot_params::write_pvh_start_info(mem, initrd, layout)?;
    }

    gdt::write_tables(mem).map_err(|source| LoadError::Tables {
        what: "GDT and IDT",
        source,
    })?;
    regs::write_page_tables(mem).map_err(|source| LoadError::Tables {
        what: "identity page tables",
        source,
    })?;
    mptable::write(mem, req.cpus, req.pci_intx)?;
    // Both boot blocks above point at the RSDP these put at ACPI_RSDP_ADDR.
    acpi::write(mem, req.cpus, layout, req.pci_intx, req.numa)?;

    Ok(BootSetup {
        format: loaded.format,
        mode: loaded.mode,
        entry: loaded.entry,
        kernel_end: loaded.kernel_end,
        initrd,
        cmdline_len,
    })
}

/// Refuses a command line with a NUL in it or longer than `limit` with its NUL.
fn check_cmdline(cmdline: &str, limit: usize) -> Result<(), LoadError> {
    if let Some(i) = cmdline.bytes().position(|b| b == 0) {
        return Err(LoadError::CmdlineNul(i));
    }
    let len = cmdline.len() + 1;
    if len > limit {
        return Err(LoadError::CmdlineTooLong { len, limit });
    }
    Ok(())
}

/// Validates and writes the command line; returns its length without the NUL.
fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str, limit: usize) -> Result<usize, LoadError> {
    check_cmdline(cmdline, limit)?;
    let cl = Cmdline::try_from(cmdline, limit).map_err(|e| LoadError::Cmdline(e.to_string()))?;
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cl)
        .map_err(|e| LoadError::Cmdline(e.to_string()))?;
    let written = cl
        .as_cstring()
        .map_err(|e| LoadError::Cmdline(e.to_string()))?;
    Ok(written.as_bytes().len())
}

/// One past the highest address the initrd may reach: the end of RAM below the 32-bit hole,
/// or lower if the kernel says so.
fn initrd_top(low_end: u64, initrd_addr_max: u64) -> u64 {
    low_end.min(initrd_addr_max.saturating_add(1))
}

/// Where an initrd of `size` bytes goes: page-aligned, as high as possible below `top`,
/// above the kernel.
fn place_initrd(src: &ImageSource, size: u64, kernel_end: u64, top: u64) -> Result<u64, LoadError> {
    let floor = kernel_end.next_multiple_of(PAGE_SIZE);
    top.checked_sub(size)
        .map(|a| a / PAGE_SIZE * PAGE_SIZE)
        .filter(|&a| a >= floor)
        .ok_or_else(|| LoadError::InitrdTooBig {
            image: src.name(),
            size,
            available: top.saturating_sub(floor),
            kernel_end,
            top,
        })
}

/// Places the initrd (see [`place_initrd`]) and copies it in.
fn load_initrd(
    mem: &GuestMemoryMmap,
    src: &ImageSource,
    kernel_end: u64,
    top: u64,
) -> Result<InitrdPlacement, LoadError> {
    let image = src.name();
    let mut file = src.open()?;
    let size = file.len().map_err(|source| LoadError::Read {
        image: image.clone(),
        source,
    })?;
    let addr = place_initrd(src, size, kernel_end, top)?;
    let len = usize::try_from(size).unwrap_or(usize::MAX);
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, len)
        .map_err(|source| LoadError::InitrdCopy {
            image,
            size,
            addr,
            source,
        })?;
    Ok(InitrdPlacement { addr, size })
}

#[cfg(test)]
pub(crate) mod tests;
