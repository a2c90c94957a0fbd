//! The boot information blocks: Linux's `boot_params` (zero page) for the 64-bit entry and
//! PVH's `hvm_start_info` with its memory map and module list. Both carry the same facts: the
//! E820 map from [`crate::memory::layout`], the command line address, the initrd and the ACPI RSDP
//! (the loader always writes the ACPI tables at [`layout::ACPI_RSDP_ADDR`]).

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use crate::memory::layout::{
    ACPI_RSDP_ADDR, CMDLINE_ADDR, PVH_INFO_ADDR, PVH_MEMMAP_ADDR, PVH_MEMMAP_MAX_ENTRIES,
    PVH_MODLIST_ADDR, ZERO_PAGE_ADDR,
};
use crate::memory::MemoryLayout;

/// `boot_flag` magic.
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// "HdrS".
const HDRS_MAGIC: u32 = 0x5372_6448;
/// "Undefined" boot loader id: we are not one of the registered loaders.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// Kernel alignment a vmlinux header claims (CONFIG_PHYSICAL_ALIGN default, 16 MiB).
const DEFAULT_KERNEL_ALIGNMENT: u32 = 0x100_0000;
/// Protocol 2.15 (what recent kernels speak), for vmlinux without a real header.
const DEFAULT_PROTOCOL_VERSION: u16 = 0x020f;
/// `hvm_start_info` magic.
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// Version 1 has the memory map fields.
const HVM_START_INFO_VERSION: u32 = 1;

/// An initrd already placed in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitrdPlacement {
    /// Guest address (page aligned).
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// Boot-information errors.
#[derive(Debug, thiserror::Error)]
pub enum BootParamsError {
    #[error("{what}: {count} memory map entries, room for {max}")]
    TooManyEntries {
        what: &'static str,
        count: usize,
        max: usize,
    },
    #[error("writing {what} at {addr:#x} failed: {source}")]
    Write {
        what: &'static str,
        addr: u64,
        source: GuestMemoryError,
    },
}

fn write_err(what: &'static str, addr: u64) -> impl FnOnce(GuestMemoryError) -> BootParamsError {
    move |source| BootParamsError::Write { what, addr, source }
}

/// Builds the zero page. `hdr` is the bzImage setup header (`None` for a vmlinux, which gets a
/// minimal synthetic one); `cmdline_len` excludes the NUL.
pub fn zero_page(
    hdr: Option<setup_header>,
    cmdline_len: usize,
    initrd: Option<InitrdPlacement>,
    layout: &MemoryLayout,
) -> Result<boot_params, BootParamsError> {
    let hdr = match hdr {
        Some(h) => h,
        None => setup_header {
            boot_flag: BOOT_FLAG_MAGIC,
            header: HDRS_MAGIC,
            version: DEFAULT_PROTOCOL_VERSION,
            kernel_alignment: DEFAULT_KERNEL_ALIGNMENT,
            ..Default::default()
        },
    };
    let mut bp = boot_params {
        hdr,
        ..Default::default()
    };
    bp.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    bp.acpi_rsdp_addr = ACPI_RSDP_ADDR;
    bp.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    bp.hdr.cmdline_size = cmdline_len as u32;
    if let Some(i) = initrd {
        // The layout keeps the initrd below 3 GiB, so the 32-bit fields suffice.
        bp.hdr.ramdisk_image = i.addr as u32;
        bp.hdr.ramdisk_size = i.size as u32;
    }
    let map = layout.e820();
    if map.len() > bp.e820_table.len() {
        return Err(BootParamsError::TooManyEntries {
            what: "boot_params",
            count: map.len(),
            max: bp.e820_table.len(),
        });
    }
    for (slot, e) in bp.e820_table.iter_mut().zip(map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind.raw(),
        };
    }
    bp.e820_entries = map.len() as u8;
    Ok(bp)
}

/// Writes `bp` at [`ZERO_PAGE_ADDR`].
pub fn write_zero_page(mem: &GuestMemoryMmap, bp: &boot_params) -> Result<(), BootParamsError> {
    mem.write_obj(*bp, GuestAddress(ZERO_PAGE_ADDR))
        .map_err(write_err("boot_params", ZERO_PAGE_ADDR))
}

/// Writes `hvm_start_info`, the memory map and (with an initrd) the module list.
pub fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    initrd: Option<InitrdPlacement>,
    layout: &MemoryLayout,
) -> Result<(), BootParamsError> {
    let map = layout.e820();
    if map.len() > PVH_MEMMAP_MAX_ENTRIES {
        return Err(BootParamsError::TooManyEntries {
            what: "hvm_start_info",
            count: map.len(),
            max: PVH_MEMMAP_MAX_ENTRIES,
        });
    }
    for (i, e) in map.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind.raw(),
            reserved: 0,
        };
        let addr = PVH_MEMMAP_ADDR + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(entry, GuestAddress(addr))
            .map_err(write_err("PVH memory map", addr))?;
    }
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: HVM_START_INFO_VERSION,
        cmdline_paddr: CMDLINE_ADDR,
        rsdp_paddr: ACPI_RSDP_ADDR,
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if let Some(i) = initrd {
        let module = hvm_modlist_entry {
            paddr: i.addr,
            size: i.size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(PVH_MODLIST_ADDR))
            .map_err(write_err("PVH module list", PVH_MODLIST_ADDR))?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_ADDR;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_ADDR))
        .map_err(write_err("hvm_start_info", PVH_INFO_ADDR))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::layout::{GIB, MIB};

    #[test]
    fn zero_page_carries_e820_cmdline_and_initrd() {
        let initrd = InitrdPlacement {
            addr: 0x7f00_0000,
            size: 0x1234,
        };
        let bp = zero_page(None, 10, Some(initrd), &MemoryLayout::new(6 * GIB).unwrap()).unwrap();
        let hdr = bp.hdr;
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.header }, HDRS_MAGIC);
        assert_eq!({ hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ hdr.cmdline_size }, 10);
        assert_eq!(
            ({ hdr.ramdisk_image }, { hdr.ramdisk_size }),
            (0x7f00_0000, 0x1234)
        );
        assert_eq!({ bp.acpi_rsdp_addr }, 0xe_0000);
        assert_eq!(bp.e820_entries, 6);
        let last = bp.e820_table[5];
        assert_eq!(
            ({ last.addr }, { last.size }, { last.r#type }),
            (4 * GIB, 3 * GIB, 1)
        );
    }

    #[test]
    fn bzimage_header_is_kept() {
        let hdr = setup_header {
            version: 0x20d,
            code32_start: 0x10_0000,
            ..Default::default()
        };
        let bp = zero_page(Some(hdr), 0, None, &MemoryLayout::new(256 * MIB).unwrap()).unwrap();
        assert_eq!({ bp.hdr.version }, 0x20d);
        assert_eq!({ bp.hdr.code32_start }, 0x10_0000);
        assert_eq!({ bp.hdr.ramdisk_image }, 0);
    }

    #[test]
    fn pvh_start_info_and_memmap_in_memory() {
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 * MIB as usize)]).unwrap();
        let initrd = InitrdPlacement {
            addr: 0x300_0000,
            size: 0x2000,
        };
        write_pvh_start_info(&mem, Some(initrd), &MemoryLayout::new(64 * MIB).unwrap()).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_ADDR)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC);
        assert_eq!(
            (info.memmap_paddr, info.memmap_entries),
            (PVH_MEMMAP_ADDR, 5)
        );
        assert_eq!(info.rsdp_paddr, 0xe_0000);
        assert_eq!(
            (info.nr_modules, info.modlist_paddr, info.cmdline_paddr),
            (1, PVH_MODLIST_ADDR, 0x20000)
        );
        let m: hvm_modlist_entry = mem.read_obj(GuestAddress(PVH_MODLIST_ADDR)).unwrap();
        assert_eq!((m.paddr, m.size), (0x300_0000, 0x2000));
        let e: hvm_memmap_table_entry = mem
            .read_obj(GuestAddress(PVH_MEMMAP_ADDR + 3 * 24))
            .unwrap();
        assert_eq!((e.addr, e.size, e.type_), (MIB, 63 * MIB, 1));
    }
}
