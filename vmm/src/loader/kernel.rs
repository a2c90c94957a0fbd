//! The kernel image: an ELF vmlinux (PVH note or 64-bit entry) or a bzImage, checked against
//! guest RAM below the 32-bit hole before linux-loader copies it in.

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::image::{Image, ImageSource};
use super::{BootProtocol, KernelFormat, LoadError};
use crate::arch::x86_64::regs::EntryMode;
use crate::memory::layout::{CMDLINE_MAX_SIZE, HIMEM_START};

pub(super) const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
pub(super) const BZIMAGE_MAGIC_OFFSET: u64 = 0x202;
pub(super) const BZIMAGE_MAGIC: &[u8; 4] = b"HdrS";
/// The 64-bit entry of a bzImage is 0x200 past its protected-mode load address.
pub(super) const BZIMAGE_ENTRY64_OFFSET: u64 = 0x200;
/// `xloadflags` bit: the kernel has the 64-bit entry.
pub(super) const XLF_KERNEL_64: u16 = 1 << 0;
/// Before protocol 2.03 `initrd_addr_max` is absent and fixed at this.
pub(super) const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
/// Before protocol 2.06 the command line is limited to 255 bytes.
pub(super) const OLD_CMDLINE_MAX: usize = 256;

pub(super) struct LoadedKernel {
    pub(super) format: KernelFormat,
    pub(super) mode: EntryMode,
    pub(super) entry: GuestAddress,
    pub(super) kernel_end: u64,
    pub(super) header: Option<setup_header>,
    pub(super) cmdline_limit: usize,
    pub(super) initrd_addr_max: u64,
}

/// What a kernel's headers say, read and checked against guest RAM before anything is
/// loaded: by `load_kernel`, and by `loader::check` before any guest memory exists.
pub(super) struct KernelInfo {
    pub(super) format: KernelFormat,
    /// One past the highest byte the kernel needs (its segments, or a bzImage's init_size).
    pub(super) end: u64,
    /// The command line's limit, with its NUL.
    pub(super) cmdline_limit: usize,
    pub(super) initrd_addr_max: u64,
}

/// Opens the kernel, reads its headers and checks that it fits below `low_end`, without
/// loading it.
pub(super) fn inspect_kernel(
    src: &ImageSource,
    protocol: BootProtocol,
    low_end: u64,
) -> Result<KernelInfo, LoadError> {
    let mut file = src.open()?;
    inspect(&mut file, &src.name(), protocol, low_end)
}

fn inspect(
    file: &mut Image<'_>,
    image: &str,
    protocol: BootProtocol,
    low_end: u64,
) -> Result<KernelInfo, LoadError> {
    let read_err = |source| LoadError::Read {
        image: image.to_string(),
        source,
    };
    let mut magic = [0u8; 4];
    let n = file.read_at(0, &mut magic).map_err(read_err)?;
    if n == 4 && &magic == ELF_MAGIC {
        return Ok(KernelInfo {
            format: KernelFormat::Elf,
            end: check_elf(file, image, low_end)?,
            cmdline_limit: CMDLINE_MAX_SIZE,
            initrd_addr_max: u64::from(u32::MAX),
        });
    }
    let n = file
        .read_at(BZIMAGE_MAGIC_OFFSET, &mut magic)
        .map_err(read_err)?;
    if n == 4 && &magic == BZIMAGE_MAGIC {
        return check_bzimage(file, image, protocol, low_end);
    }
    Err(LoadError::NotAKernel {
        image: image.to_string(),
    })
}

pub(super) fn load_kernel(
    mem: &GuestMemoryMmap,
    src: &ImageSource,
    protocol: BootProtocol,
    low_end: u64,
) -> Result<LoadedKernel, LoadError> {
    let image = src.name();
    let mut file = src.open()?;
    let info = inspect(&mut file, &image, protocol, low_end)?;
    match info.format {
        KernelFormat::Elf => load_elf(mem, &mut file, image, protocol, info),
        KernelFormat::BzImage => load_bzimage(mem, &mut file, image, info),
    }
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
        let filesz = le_u64(&ph, 0x20);
        let memsz = le_u64(&ph, 0x28);
        // linux-loader copies p_filesz bytes but reports the end from p_memsz: a segment
        // whose file part is larger (the ELF spec forbids it) would spill past the kernel end
        // we tell the guest and place the initrd after.
        if filesz > memsz {
            return Err(unsupported(format!(
                "program header {i}: its file size {filesz:#x} exceeds its memory size {memsz:#x}"
            )));
        }
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
    info: KernelInfo,
) -> Result<LoadedKernel, LoadError> {
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
        kernel_end: info.end.max(result.kernel_end),
        header: None,
        cmdline_limit: info.cmdline_limit,
        initrd_addr_max: info.initrd_addr_max,
    })
}

/// A bzImage's setup header, read raw (setup_sects 0x1f1, version 0x206, initrd_addr_max
/// 0x22c, code32_start 0x214, xloadflags 0x236, cmdline_size 0x238, init_size 0x260), and
/// checked: a 64-bit entry, no PVH asked for, and room below `low_end` for the kernel and
/// the memory it decompresses into.
fn check_bzimage(
    file: &mut Image<'_>,
    image: &str,
    protocol: BootProtocol,
    low_end: u64,
) -> Result<KernelInfo, LoadError> {
    if protocol == BootProtocol::Pvh {
        return Err(LoadError::PvhUnavailable {
            image: image.to_string(),
            reason: "a bzImage has no PVH entry point (use the vmlinux ELF)",
        });
    }
    let unsupported = |reason: String| LoadError::UnsupportedBzImage {
        image: image.to_string(),
        reason,
    };
    let read_err = |source| LoadError::Read {
        image: image.to_string(),
        source,
    };
    let mut head = [0u8; 0x268];
    if file.read_at(0, &mut head).map_err(read_err)? < head.len() {
        return Err(unsupported("truncated setup header".into()));
    }
    let file_len = file.len().map_err(read_err)?;
    let setup_sects = match head[0x1f1] {
        0 => 4,
        n => u64::from(n),
    };
    let version = le_u16(&head, 0x206);
    if version >= 0x020c && le_u16(&head, 0x236) & XLF_KERNEL_64 == 0 {
        return Err(unsupported(
            "the kernel has no 64-bit entry point (XLF_KERNEL_64 clear)".into(),
        ));
    }
    let payload = file_len.saturating_sub((setup_sects + 1) * 512);
    let code32_start = u64::from(le_u32(&head, 0x214));
    let init_size = u64::from(le_u32(&head, 0x260));
    let end = code32_start.saturating_add(payload.max(init_size));
    if end > low_end {
        return Err(LoadError::KernelTooBig {
            image: image.to_string(),
            start: code32_start,
            end,
            limit: low_end,
        });
    }
    let cmdline_limit = if version >= 0x0206 {
        (le_u32(&head, 0x238) as usize)
            .saturating_add(1)
            .min(CMDLINE_MAX_SIZE)
    } else {
        OLD_CMDLINE_MAX
    };
    let initrd_addr_max = if version >= 0x0203 {
        u64::from(le_u32(&head, 0x22c))
    } else {
        DEFAULT_INITRD_ADDR_MAX
    };
    Ok(KernelInfo {
        format: KernelFormat::BzImage,
        end,
        cmdline_limit,
        initrd_addr_max,
    })
}

fn load_bzimage(
    mem: &GuestMemoryMmap,
    file: &mut Image<'_>,
    image: String,
    info: KernelInfo,
) -> Result<LoadedKernel, LoadError> {
    let result =
        BzImage::load(mem, None, file, Some(GuestAddress(HIMEM_START))).map_err(|source| {
            LoadError::Kernel {
                image: image.clone(),
                source,
            }
        })?;
    let hdr = result
        .setup_header
        .ok_or_else(|| LoadError::UnsupportedBzImage {
            image,
            reason: "linux-loader returned no setup header".into(),
        })?;
    Ok(LoadedKernel {
        format: KernelFormat::BzImage,
        mode: EntryMode::Linux64,
        entry: GuestAddress(result.kernel_load.0 + BZIMAGE_ENTRY64_OFFSET),
        kernel_end: result.kernel_end.max(info.end),
        header: Some(hdr),
        cmdline_limit: info.cmdline_limit,
        initrd_addr_max: info.initrd_addr_max,
    })
}
