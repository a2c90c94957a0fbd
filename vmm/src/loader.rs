//! Loading the guest: kernel (ELF vmlinux or bzImage, through linux-loader), command line,
//! initrd, the boot information block for the chosen entry protocol, and the fixed tables
//! (GDT, identity page tables, MP table, ACPI tables).
//!
//! Every error names the image (its path, or the name given to in-memory bytes) and the reason.

use std::borrow::Cow;
use std::fmt;
use std::fs::File;
use std::io::{self, Cursor, Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::str::FromStr;

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap, ReadVolatile, VolatileMemoryError,
    VolatileSlice,
};

use crate::arch::x86_64::acpi::{self, AcpiError};
use crate::arch::x86_64::boot_params::{self, BootParamsError, InitrdPlacement};
use crate::arch::x86_64::gdt;
use crate::arch::x86_64::mptable::{self, MpTableError};
use crate::arch::x86_64::regs::{self, EntryMode};
use crate::memory::layout::{CMDLINE_ADDR, CMDLINE_MAX_SIZE, HIMEM_START, PAGE_SIZE};
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

/// Where an image (kernel or initrd) comes from.
#[derive(Clone, Debug)]
pub enum ImageSource {
    /// A file.
    Path(PathBuf),
    /// Bytes already in memory (the built-in probe guest); `name` is used in messages.
    Bytes {
        /// Shown in errors.
        name: String,
        /// The image.
        data: Cow<'static, [u8]>,
    },
}

impl ImageSource {
    /// How errors refer to this image.
    pub fn name(&self) -> String {
        match self {
            ImageSource::Path(p) => p.display().to_string(),
            ImageSource::Bytes { name, .. } => name.clone(),
        }
    }

    fn open(&self) -> Result<Image<'_>, LoadError> {
        match self {
            ImageSource::Path(p) => {
                File::open(p)
                    .map(Image::File)
                    .map_err(|source| LoadError::Open {
                        image: self.name(),
                        source,
                    })
            }
            ImageSource::Bytes { data, .. } => Ok(Image::Bytes(Cursor::new(data.as_ref()))),
        }
    }
}

/// An open image: what linux-loader reads from.
enum Image<'a> {
    File(File),
    Bytes(Cursor<&'a [u8]>),
}

impl Read for Image<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Image::File(f) => f.read(buf),
            Image::Bytes(c) => c.read(buf),
        }
    }
}

impl Seek for Image<'_> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        match self {
            Image::File(f) => f.seek(pos),
            Image::Bytes(c) => c.seek(pos),
        }
    }
}

impl ReadVolatile for Image<'_> {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        match self {
            Image::File(f) => f.read_volatile(buf),
            Image::Bytes(c) => c.read_volatile(buf),
        }
    }
}

impl Image<'_> {
    fn len(&mut self) -> io::Result<u64> {
        let len = self.seek(SeekFrom::End(0))?;
        self.rewind()?;
        Ok(len)
    }

    /// Reads up to `buf.len()` bytes at `offset`; short at end of file.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        self.seek(SeekFrom::Start(offset))?;
        let mut filled = 0;
        while filled < buf.len() {
            match self.read(&mut buf[filled..])? {
                0 => break,
                n => filled += n,
            }
        }
        Ok(filled)
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
    /// The file cannot be opened.
    #[error("cannot open {image}: {source}")]
    Open {
        /// Image.
        image: String,
        /// Why.
        source: io::Error,
    },
    /// Reading the file failed.
    #[error("cannot read {image}: {source}")]
    Read {
        /// Image.
        image: String,
        /// Why.
        source: io::Error,
    },
    /// Neither an ELF nor a bzImage.
    #[error(
        "{image} is neither an ELF vmlinux nor a bzImage (no ELF magic, no \"HdrS\" at 0x202)"
    )]
    NotAKernel {
        /// Image.
        image: String,
    },
    /// An ELF we cannot boot.
    #[error("{image}: unsupported ELF: {reason}")]
    UnsupportedElf {
        /// Image.
        image: String,
        /// Why.
        reason: String,
    },
    /// A bzImage we cannot boot.
    #[error("{image}: unsupported bzImage: {reason}")]
    UnsupportedBzImage {
        /// Image.
        image: String,
        /// Why.
        reason: String,
    },
    /// The kernel does not fit in guest RAM below the 32-bit hole.
    #[error("{image} does not fit in guest memory: it needs {start:#x}..{end:#x}, RAM below the 32-bit MMIO hole ends at {limit:#x}")]
    KernelTooBig {
        /// Image.
        image: String,
        /// First byte.
        start: u64,
        /// One past the last byte needed.
        end: u64,
        /// End of low RAM.
        limit: u64,
    },
    /// linux-loader refused the image.
    #[error("{image}: {source}")]
    Kernel {
        /// Image.
        image: String,
        /// Why.
        source: linux_loader::loader::Error,
    },
    /// PVH was requested but the image cannot be entered that way.
    #[error("{image}: PVH boot requested but {reason}")]
    PvhUnavailable {
        /// Image.
        image: String,
        /// Why.
        reason: &'static str,
    },
    /// Command line too long for the kernel.
    #[error("kernel command line is {len} bytes with its NUL, the kernel accepts at most {limit}")]
    CmdlineTooLong {
        /// Length with NUL.
        len: usize,
        /// Limit with NUL.
        limit: usize,
    },
    /// Command line contains a NUL byte.
    #[error("kernel command line contains a NUL byte at offset {0}")]
    CmdlineNul(usize),
    /// linux-loader refused the command line.
    #[error("kernel command line: {0}")]
    Cmdline(String),
    /// The initrd does not fit between the kernel and the top of low RAM.
    #[error("initrd {image} ({size} bytes) does not fit in guest memory: {available} bytes free between the kernel end {kernel_end:#x} and {top:#x}")]
    InitrdTooBig {
        /// Image.
        image: String,
        /// Its size.
        size: u64,
        /// Free bytes.
        available: u64,
        /// Kernel end.
        kernel_end: u64,
        /// Highest address the initrd may reach.
        top: u64,
    },
    /// Copying the initrd into guest memory failed.
    #[error("initrd {image}: copying {size} bytes to {addr:#x} failed: {source}")]
    InitrdCopy {
        /// Image.
        image: String,
        /// Size.
        size: u64,
        /// Where.
        addr: u64,
        /// Why.
        source: GuestMemoryError,
    },
    /// Writing boot parameters failed.
    #[error(transparent)]
    BootParams(#[from] BootParamsError),
    /// Writing the MP table failed.
    #[error(transparent)]
    MpTable(#[from] MpTableError),
    /// Writing the ACPI tables failed.
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    /// Writing the GDT or page tables failed.
    #[error("writing the {what} failed: {source}")]
    Tables {
        /// Which.
        what: &'static str,
        /// Why.
        source: GuestMemoryError,
    },
}

impl pinning::Classify for LoadError {
    /// The images and the command line are the user's; so is a guest too small for them.
    fn class(&self) -> pinning::ErrorClass {
        pinning::ErrorClass::User
    }
}

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const BZIMAGE_MAGIC_OFFSET: u64 = 0x202;
const BZIMAGE_MAGIC: &[u8; 4] = b"HdrS";
/// The 64-bit entry of a bzImage is 0x200 past its protected-mode load address.
const BZIMAGE_ENTRY64_OFFSET: u64 = 0x200;
/// `xloadflags` bit: the kernel has the 64-bit entry.
const XLF_KERNEL_64: u16 = 1 << 0;
/// Before protocol 2.03 `initrd_addr_max` is absent and fixed at this.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
/// Before protocol 2.06 the command line is limited to 255 bytes.
const OLD_CMDLINE_MAX: usize = 256;

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
            low_end.min(loaded.initrd_addr_max.saturating_add(1)),
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
    acpi::write(mem, req.cpus, layout, req.pci_intx)?;

    Ok(BootSetup {
        format: loaded.format,
        mode: loaded.mode,
        entry: loaded.entry,
        kernel_end: loaded.kernel_end,
        initrd,
        cmdline_len,
    })
}

struct LoadedKernel {
    format: KernelFormat,
    mode: EntryMode,
    entry: GuestAddress,
    kernel_end: u64,
    header: Option<setup_header>,
    cmdline_limit: usize,
    initrd_addr_max: u64,
}

fn load_kernel(
    mem: &GuestMemoryMmap,
    src: &ImageSource,
    protocol: BootProtocol,
    low_end: u64,
) -> Result<LoadedKernel, LoadError> {
    let image = src.name();
    let mut file = src.open()?;
    let read_err = |source| LoadError::Read {
        image: image.clone(),
        source,
    };
    let mut magic = [0u8; 4];
    let n = file.read_at(0, &mut magic).map_err(read_err)?;
    if n == 4 && &magic == ELF_MAGIC {
        return load_elf(mem, &mut file, image, protocol, low_end);
    }
    let n = file
        .read_at(BZIMAGE_MAGIC_OFFSET, &mut magic)
        .map_err(read_err)?;
    if n == 4 && &magic == BZIMAGE_MAGIC {
        return load_bzimage(mem, &mut file, image, protocol, low_end);
    }
    Err(LoadError::NotAKernel { image })
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or_default())
}
fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or_default())
}

/// Checks the ELF header and that every loadable segment lands in [1 MiB, low_end): linux-loader
/// would report a segment past the end of RAM only as a failed read.
fn check_elf(file: &mut Image<'_>, image: &str, low_end: u64) -> Result<u64, LoadError> {
    const EHDR_LEN: usize = 64;
    const PHDR_LEN: usize = 56;
    const PT_LOAD: u32 = 1;
    const EM_X86_64: u16 = 62;
    let unsupported = |reason: String| LoadError::UnsupportedElf {
        image: image.to_string(),
        reason,
    };
    let read_err = |source| LoadError::Read {
        image: image.to_string(),
        source,
    };
    let mut ehdr = [0u8; EHDR_LEN];
    if file.read_at(0, &mut ehdr).map_err(read_err)? < EHDR_LEN {
        return Err(unsupported("truncated ELF header".into()));
    }
    if ehdr[4] != 2 {
        return Err(unsupported("not a 64-bit ELF (ELFCLASS64 required)".into()));
    }
    if le_u16(&ehdr, 0x12) != EM_X86_64 {
        return Err(unsupported(format!(
            "machine {} is not x86_64",
            le_u16(&ehdr, 0x12)
        )));
    }
    let phoff = le_u64(&ehdr, 0x20);
    let phnum = le_u16(&ehdr, 0x38);
    let mut end = 0u64;
    for i in 0..u64::from(phnum) {
        let mut ph = [0u8; PHDR_LEN];
        let at = phoff.saturating_add(i * PHDR_LEN as u64);
        if file.read_at(at, &mut ph).map_err(read_err)? < PHDR_LEN {
            return Err(unsupported(format!("program header {i} is truncated")));
        }
        if le_u32(&ph, 0) != PT_LOAD || le_u64(&ph, 0x20) == 0 {
            continue;
        }
        let paddr = le_u64(&ph, 0x18);
        let memsz = le_u64(&ph, 0x28);
        let seg_end = paddr.saturating_add(memsz);
        if paddr < HIMEM_START || seg_end > low_end {
            return Err(LoadError::KernelTooBig {
                image: image.to_string(),
                start: paddr,
                end: seg_end,
                limit: low_end,
            });
        }
        end = end.max(seg_end);
    }
    Ok(end)
}

fn load_elf(
    mem: &GuestMemoryMmap,
    file: &mut Image<'_>,
    image: String,
    protocol: BootProtocol,
    low_end: u64,
) -> Result<LoadedKernel, LoadError> {
    let end = check_elf(file, &image, low_end)?;
    let result = Elf::load(mem, None, file, Some(GuestAddress(HIMEM_START))).map_err(|source| {
        LoadError::Kernel {
            image: image.clone(),
            source,
        }
    })?;
    let pvh = match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => Some(addr),
        _ => None,
    };
    let (mode, entry) = match (protocol, pvh) {
        (BootProtocol::Auto | BootProtocol::Pvh, Some(addr)) => (EntryMode::Pvh, addr),
        (BootProtocol::Pvh, None) => {
            return Err(LoadError::PvhUnavailable {
                image,
                reason: "the ELF has no PVH note (XEN_ELFNOTE_PHYS32_ENTRY)",
            })
        }
        (BootProtocol::Auto | BootProtocol::Linux64, _) => (EntryMode::Linux64, result.kernel_load),
    };
    Ok(LoadedKernel {
        format: KernelFormat::Elf,
        mode,
        entry,
        kernel_end: end.max(result.kernel_end),
        header: None,
        cmdline_limit: CMDLINE_MAX_SIZE,
        initrd_addr_max: u64::from(u32::MAX),
    })
}

fn load_bzimage(
    mem: &GuestMemoryMmap,
    file: &mut Image<'_>,
    image: String,
    protocol: BootProtocol,
    low_end: u64,
) -> Result<LoadedKernel, LoadError> {
    if protocol == BootProtocol::Pvh {
        return Err(LoadError::PvhUnavailable {
            image,
            reason: "a bzImage has no PVH entry point (use the vmlinux ELF)",
        });
    }
    let unsupported = |reason: String| LoadError::UnsupportedBzImage {
        image: image.clone(),
        reason,
    };
    // The header fields needed before loading: setup_sects (0x1f1), version (0x206),
    // code32_start (0x214), init_size (0x260).
    let mut head = [0u8; 0x268];
    let n = file
        .read_at(0, &mut head)
        .map_err(|source| LoadError::Read {
            image: image.clone(),
            source,
        })?;
    if n < head.len() {
        return Err(unsupported("truncated setup header".into()));
    }
    let file_len = file.len().map_err(|source| LoadError::Read {
        image: image.clone(),
        source,
    })?;
    let setup_sects = match head[0x1f1] {
        0 => 4,
        n => u64::from(n),
    };
    let payload = file_len.saturating_sub((setup_sects + 1) * 512);
    let code32_start = u64::from(le_u32(&head, 0x214));
    let init_size = u64::from(le_u32(&head, 0x260));
    let need_end = code32_start.saturating_add(payload.max(init_size));
    if need_end > low_end {
        return Err(LoadError::KernelTooBig {
            image,
            start: code32_start,
            end: need_end,
            limit: low_end,
        });
    }

    let result =
        BzImage::load(mem, None, file, Some(GuestAddress(HIMEM_START))).map_err(|source| {
            LoadError::Kernel {
                image: image.clone(),
                source,
            }
        })?;
    let hdr = result
        .setup_header
        .ok_or_else(|| unsupported("linux-loader returned no setup header".into()))?;
    let version = hdr.version;
    let xloadflags = hdr.xloadflags;
    if version >= 0x020c && xloadflags & XLF_KERNEL_64 == 0 {
        return Err(unsupported(
            "the kernel has no 64-bit entry point (XLF_KERNEL_64 clear)".into(),
        ));
    }
    let cmdline_limit = if version >= 0x0206 {
        (hdr.cmdline_size as usize)
            .saturating_add(1)
            .min(CMDLINE_MAX_SIZE)
    } else {
        OLD_CMDLINE_MAX
    };
    let initrd_addr_max = if version >= 0x0203 {
        u64::from(hdr.initrd_addr_max)
    } else {
        DEFAULT_INITRD_ADDR_MAX
    };
    Ok(LoadedKernel {
        format: KernelFormat::BzImage,
        mode: EntryMode::Linux64,
        entry: GuestAddress(result.kernel_load.0 + BZIMAGE_ENTRY64_OFFSET),
        kernel_end: result.kernel_end.max(need_end),
        header: Some(hdr),
        cmdline_limit,
        initrd_addr_max,
    })
}

/// Validates and writes the command line; returns its length without the NUL.
fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str, limit: usize) -> Result<usize, LoadError> {
    if let Some(i) = cmdline.bytes().position(|b| b == 0) {
        return Err(LoadError::CmdlineNul(i));
    }
    let len = cmdline.len() + 1;
    if len > limit {
        return Err(LoadError::CmdlineTooLong { len, limit });
    }
    let cl = Cmdline::try_from(cmdline, limit).map_err(|e| LoadError::Cmdline(e.to_string()))?;
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cl)
        .map_err(|e| LoadError::Cmdline(e.to_string()))?;
    let written = cl
        .as_cstring()
        .map_err(|e| LoadError::Cmdline(e.to_string()))?;
    Ok(written.as_bytes().len())
}

/// Places the initrd page-aligned as high as possible below `top`, above the kernel.
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
    let floor = kernel_end.next_multiple_of(PAGE_SIZE);
    let addr = top
        .checked_sub(size)
        .map(|a| a / PAGE_SIZE * PAGE_SIZE)
        .filter(|&a| a >= floor);
    let Some(addr) = addr else {
        return Err(LoadError::InitrdTooBig {
            image,
            size,
            available: top.saturating_sub(floor),
            kernel_end,
            top,
        });
    };
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
