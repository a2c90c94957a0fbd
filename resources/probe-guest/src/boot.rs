//! What the boot protocol hands over: memory map, command line, initrd, ACPI RSDP.

use crate::io::phys;

pub const PROTO_LINUX64: u64 = 1;
pub const PROTO_PVH: u64 = 2;

pub const MAX_ENTRIES: usize = 128;
pub const PAGE: u64 = 4096;
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

/// Linux `struct boot_params` offsets (arch/x86/include/uapi/asm/bootparam.h).
mod zp {
    pub const ACPI_RSDP_ADDR: u64 = 0x070;
    pub const EXT_RAMDISK_IMAGE: u64 = 0x0c0;
    pub const EXT_RAMDISK_SIZE: u64 = 0x0c4;
    pub const EXT_CMD_LINE_PTR: u64 = 0x0c8;
    pub const E820_ENTRIES: u64 = 0x1e8;
    pub const RAMDISK_IMAGE: u64 = 0x218;
    pub const RAMDISK_SIZE: u64 = 0x21c;
    pub const CMD_LINE_PTR: u64 = 0x228;
    pub const E820_TABLE: u64 = 0x2d0;
    pub const E820_ENTRY_SIZE: u64 = 20;
    pub const SIZE: u64 = 4096;
}

/// `struct hvm_start_info` (xen/include/public/arch-x86/hvm/start_info.h).
mod pvh {
    pub const MAGIC: u32 = 0x336e_c578;
    pub const OFF_MAGIC: u64 = 0;
    pub const OFF_VERSION: u64 = 4;
    pub const OFF_NR_MODULES: u64 = 12;
    pub const OFF_MODLIST: u64 = 16;
    pub const OFF_CMDLINE: u64 = 24;
    pub const OFF_RSDP: u64 = 32;
    pub const OFF_MEMMAP: u64 = 40;
    pub const OFF_MEMMAP_ENTRIES: u64 = 48;
    pub const MEMMAP_ENTRY_SIZE: u64 = 24;
    pub const MODULE_SIZE: u64 = 32;
}

#[derive(Clone, Copy)]
pub struct MemEntry {
    pub start: u64,
    pub size: u64,
    pub kind: u32,
}

impl MemEntry {
    pub const fn end(&self) -> u64 {
        self.start.saturating_add(self.size)
    }
}

pub const E820_RAM: u32 = 1;

pub struct BootInfo {
    pub proto: u64,
    pub map: [MemEntry; MAX_ENTRIES],
    pub entries: usize,
    /// Entries the protocol reported (may exceed `MAX_ENTRIES`).
    pub reported_entries: u64,
    pub cmdline: u64,
    pub initrd: u64,
    pub initrd_size: u64,
    /// The ACPI RSDP's address, 0 if the protocol gave none.
    pub rsdp: u64,
    /// [start, end) of the boot structures themselves: the zero page, or `hvm_start_info`,
    /// its module list and its memory map (empty entries are (0, 0)).
    pub areas: [(u64, u64); 3],
}

impl BootInfo {
    pub const fn empty() -> BootInfo {
        BootInfo {
            proto: 0,
            map: [MemEntry {
                start: 0,
                size: 0,
                kind: 0,
            }; MAX_ENTRIES],
            entries: 0,
            reported_entries: 0,
            cmdline: 0,
            initrd: 0,
            initrd_size: 0,
            rsdp: 0,
            areas: [(0, 0); 3],
        }
    }

    pub fn map(&self) -> &[MemEntry] {
        &self.map[..self.entries.min(MAX_ENTRIES)]
    }

    fn push(&mut self, start: u64, size: u64, kind: u32) {
        if self.entries < MAX_ENTRIES {
            self.map[self.entries] = MemEntry { start, size, kind };
            self.entries += 1;
        }
    }
}

/// Why the boot structure could not be read at all.
pub enum BootError {
    PointerOutOfRange(&'static str, u64),
    BadPvhMagic(u32),
}

/// Reads the Linux zero page at `zp` (the low 1 GiB is mapped).
pub fn read_linux(zp: u64, info: &mut BootInfo) -> Result<(), BootError> {
    if zp == 0 || zp.saturating_add(zp::SIZE) > GIB {
        return Err(BootError::PointerOutOfRange("boot_params", zp));
    }
    info.proto = PROTO_LINUX64;
    info.areas[0] = (zp, zp + zp::SIZE);
    let n = phys::u8(zp + zp::E820_ENTRIES) as u64;
    info.reported_entries = n;
    for i in 0..n.min(MAX_ENTRIES as u64) {
        let e = zp + zp::E820_TABLE + i * zp::E820_ENTRY_SIZE;
        info.push(phys::u64(e), phys::u64(e + 8), phys::u32(e + 16));
    }
    info.cmdline = phys::u32(zp + zp::CMD_LINE_PTR) as u64
        | (phys::u32(zp + zp::EXT_CMD_LINE_PTR) as u64) << 32;
    info.initrd = phys::u32(zp + zp::RAMDISK_IMAGE) as u64
        | (phys::u32(zp + zp::EXT_RAMDISK_IMAGE) as u64) << 32;
    info.initrd_size = phys::u32(zp + zp::RAMDISK_SIZE) as u64
        | (phys::u32(zp + zp::EXT_RAMDISK_SIZE) as u64) << 32;
    info.rsdp = phys::u64(zp + zp::ACPI_RSDP_ADDR);
    Ok(())
}

/// Reads `struct hvm_start_info` at `si` (the low 4 GiB are mapped by the PVH stub).
pub fn read_pvh(si: u64, info: &mut BootInfo) -> Result<(), BootError> {
    const LOW4G: u64 = 4 * GIB;
    if si == 0 || si + 56 > LOW4G {
        return Err(BootError::PointerOutOfRange("hvm_start_info", si));
    }
    info.proto = PROTO_PVH;
    info.areas[0] = (si, si + 56);
    let magic = phys::u32(si + pvh::OFF_MAGIC);
    if magic != pvh::MAGIC {
        return Err(BootError::BadPvhMagic(magic));
    }
    let version = phys::u32(si + pvh::OFF_VERSION);
    info.cmdline = phys::u64(si + pvh::OFF_CMDLINE);
    info.rsdp = phys::u64(si + pvh::OFF_RSDP);
    if phys::u32(si + pvh::OFF_NR_MODULES) > 0 {
        let modlist = phys::u64(si + pvh::OFF_MODLIST);
        if modlist == 0 || modlist.saturating_add(pvh::MODULE_SIZE) > LOW4G {
            return Err(BootError::PointerOutOfRange("modlist_paddr", modlist));
        }
        info.areas[1] = (modlist, modlist + pvh::MODULE_SIZE);
        info.initrd = phys::u64(modlist);
        info.initrd_size = phys::u64(modlist + 8);
    }
    if version >= 1 {
        let map = phys::u64(si + pvh::OFF_MEMMAP);
        let n = phys::u32(si + pvh::OFF_MEMMAP_ENTRIES) as u64;
        info.reported_entries = n;
        if n > 0 {
            let take = n.min(MAX_ENTRIES as u64);
            if map == 0 || map.saturating_add(take * pvh::MEMMAP_ENTRY_SIZE) > LOW4G {
                return Err(BootError::PointerOutOfRange("memmap_paddr", map));
            }
            info.areas[2] = (map, map + take * pvh::MEMMAP_ENTRY_SIZE);
            for i in 0..take {
                let e = map + i * pvh::MEMMAP_ENTRY_SIZE;
                info.push(phys::u64(e), phys::u64(e + 8), phys::u32(e + 16));
            }
        }
    }
    Ok(())
}
