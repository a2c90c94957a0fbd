//! The guest physical address map, in one place.
//!
//! ```text
//! 0x0000_0000  real-mode IVT / BDA (RAM)
//! 0x0000_0500  GDT                     0x0000_0520  IDT (limit 0)
//! 0x0000_6000  PVH hvm_start_info, then its module list and memory map
//! 0x0000_7000  Linux boot_params ("zero page")
//! 0x0000_8ff0  boot stack top (grows down)
//! 0x0000_9000  PML4   0xa000 PDPT   0xb000 PD (identity map of the first 1 GiB, 2 MiB pages)
//! 0x0002_0000  kernel command line (up to 2048 bytes with its NUL)
//! 0x0009_fc00  EBDA: the MP table lives here (E820 reserved)
//! 0x000a_0000  VGA hole and BIOS area up to 1 MiB (E820 reserved, no device behind it)
//! 0x000e_0000  ACPI: the RSDP (where Linux scans for it), then DSDT, FADT, MADT, MCFG, XSDT
//! 0x0010_0000  kernel load address; RAM continues up to min(size, 3 GiB)
//!              initrd: page-aligned at the top of RAM below 3 GiB
//! 0xc000_0000  32-bit MMIO hole (PCI BARs), up to 4 GiB; PCI ECAM for bus 0 at 0xfeb0_0000
//!              (1 MiB, E820 reserved), IOAPIC 0xfec0_0000, LAPIC 0xfee0_0000,
//!              KVM's TSS and identity-map pages at 0xfffb_c000..0xfffc_0000
//! 0x1_0000_0000 RAM above 4 GiB (whatever does not fit below the hole)
//! end of RAM rounded up to 1 GiB: 64-bit MMIO window (64 GiB)
//! ```
//!
//! Port I/O has one window of its own: PCI I/O BARs are placed in
//! [`PCI_IO_START`]..[`PCI_IO_END`], above every legacy port the VMM decodes (COM1, i8042,
//! debug exit, boot marks, the 0xCF8 configuration ports).
//!
//! All the low fixed structures sit below 1 MiB so they never collide with the kernel, and the
//! hole at 3 GiB keeps 32-bit BARs and the APICs below 4 GiB as x86 guests expect.

use vm_memory::GuestAddress;

/// 1 KiB.
pub const KIB: u64 = 1 << 10;
/// 1 MiB.
pub const MIB: u64 = 1 << 20;
/// 1 GiB.
pub const GIB: u64 = 1 << 30;

/// Page size used for alignment of guest memory sizes and the initrd.
pub const PAGE_SIZE: u64 = 4 * KIB;

/// GDT (flat segments for both boot protocols).
pub const GDT_ADDR: u64 = 0x500;
/// IDT: a zero-limit table, so any exception before the guest installs its own triple-faults
/// (reported as a shutdown) instead of jumping somewhere random.
pub const IDT_ADDR: u64 = 0x520;

/// PVH `hvm_start_info`.
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// PVH module list (one entry: the initrd), right after `hvm_start_info` (56 bytes).
pub const PVH_MODLIST_ADDR: u64 = 0x6040;
/// PVH memory map, after the module list, up to the zero page.
pub const PVH_MEMMAP_ADDR: u64 = 0x6080;
/// Entries that fit between [`PVH_MEMMAP_ADDR`] and [`ZERO_PAGE_ADDR`] (24 bytes each).
pub const PVH_MEMMAP_MAX_ENTRIES: usize = ((ZERO_PAGE_ADDR - PVH_MEMMAP_ADDR) / 24) as usize;

/// Linux `boot_params` (the zero page), passed in RSI to the 64-bit entry.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer (RSP and RBP) for the 64-bit entry.
pub const BOOT_STACK_TOP: u64 = 0x8ff0;

/// Page-map level 4.
pub const PML4_ADDR: u64 = 0x9000;
/// Page-directory pointer table.
pub const PDPT_ADDR: u64 = 0xa000;
/// Page directory: 512 entries of 2 MiB = the first 1 GiB identity-mapped.
pub const PD_ADDR: u64 = 0xb000;

/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Longest command line, counting its NUL (x86 Linux `COMMAND_LINE_SIZE`). A bzImage may
/// declare a smaller limit in its header.
pub const CMDLINE_MAX_SIZE: usize = 2048;

/// End of conventional low RAM and start of the EBDA.
pub const EBDA_START: u64 = 0x9_fc00;
/// End of the EBDA; start of the VGA hole / BIOS area.
pub const LEGACY_HOLE_START: u64 = 0xa_0000;
/// End of the legacy area: "high memory" starts here.
pub const HIMEM_START: u64 = 0x10_0000;
/// Where the kernel is loaded (1 MiB).
pub const KERNEL_START: u64 = HIMEM_START;

/// The ACPI tables: from here to [`ACPI_END`], inside the E820-reserved BIOS area. The RSDP
/// comes first, 16-byte aligned, because Linux (without `acpi_rsdp_addr`) and other OSes
/// scan 0xE0000..0xFFFFF for it.
pub const ACPI_START: u64 = 0xe_0000;
/// Where the RSDP is (the boot protocols pass this address too).
pub const ACPI_RSDP_ADDR: u64 = ACPI_START;
/// End of the ACPI area (the tables for 254 vCPUs take about 3 KiB of its 128 KiB).
pub const ACPI_END: u64 = HIMEM_START;

/// Start of the 32-bit MMIO hole: RAM below 4 GiB stops here.
pub const MMIO32_START: u64 = 3 * GIB;
/// End of the 32-bit MMIO hole.
pub const MMIO32_END: u64 = 4 * GIB;
/// IOAPIC base.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// Local APIC base.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// Size of the PCI ECAM window: bus 0 only (32 devices x 8 functions x 4 KiB), the only bus
/// there is. The ACPI MCFG table says buses 0..=0.
pub const PCI_ECAM_SIZE: u64 = MIB;
/// PCI ECAM (MMCONFIG) window, right below the IOAPIC; E820 reserved, as Linux requires of an
/// MCFG area, and out of the BAR allocator's range.
pub const PCI_ECAM_START: u64 = IOAPIC_ADDR - PCI_ECAM_SIZE;
/// 32-bit BARs are allocated from [`MMIO32_START`] up to here (the ECAM window, the APICs and
/// KVM pages sit above).
pub const MMIO32_ALLOC_END: u64 = PCI_ECAM_START;
/// KVM's three-page real-mode TSS (`KVM_SET_TSS_ADDR`), in the hole so it never shadows RAM.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// KVM's identity-map page (`KVM_SET_IDENTITY_MAP_ADDR`), just below the TSS.
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// First port of the PCI I/O window, where I/O BARs are placed: the upper quarter of the
/// 64 KiB port space, as PC firmware does, far from the legacy ISA ports below 0x1000.
pub const PCI_IO_START: u64 = 0xc000;
/// End (exclusive) of the PCI I/O window: the end of port space.
pub const PCI_IO_END: u64 = 0x1_0000;

/// Where RAM that does not fit below the hole continues.
pub const RAM_ABOVE_4G_START: u64 = MMIO32_END;
/// The 64-bit MMIO window starts at the end of RAM rounded up to this.
pub const MMIO64_ALIGN: u64 = GIB;
/// Size of the 64-bit MMIO window.
pub const MMIO64_SIZE: u64 = 64 * GIB;

/// Smallest guest this layout supports: room for the fixed structures, a kernel at 1 MiB and
/// an initrd.
pub const MIN_MEM_SIZE: u64 = 64 * MIB;

/// Why a RAM size cannot be laid out.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("guest memory of {size} bytes is below the minimum of {min} bytes (64 MiB): give --memory 64M or more")]
    TooSmall { size: u64, min: u64 },
    #[error("guest memory size {size:#x} is not a multiple of the 4 KiB page size: give a whole number of pages")]
    NotPageAligned { size: u64 },
    #[error("guest memory size {size:#x} does not fit the 64-bit address space with its MMIO window: give less memory")]
    TooLarge { size: u64 },
}

impl pinning::Classify for LayoutError {
    fn class(&self) -> pinning::ErrorClass {
        pinning::ErrorClass::User
    }
}

/// One range of guest RAM: where it starts in the guest and how long it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRange {
    pub start: GuestAddress,
    pub size: u64,
}

impl RamRange {
    /// `size` bytes from guest address 0 (memory measured outside a guest layout).
    pub fn at_zero(size: u64) -> Self {
        RamRange {
            start: GuestAddress(0),
            size,
        }
    }

    /// One past its last byte.
    pub fn end(&self) -> u64 {
        self.start.0 + self.size
    }
}

/// E820 entry types used here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum E820Kind {
    /// Usable RAM (E820 type 1).
    Ram,
    /// Reserved (E820 type 2).
    Reserved,
}

impl E820Kind {
    /// The numeric E820 type.
    pub fn raw(self) -> u32 {
        match self {
            E820Kind::Ram => 1,
            E820Kind::Reserved => 2,
        }
    }
}

/// One E820 entry (in the run report as `{"addr", "size", "kind": "ram"|"reserved"}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: E820Kind,
}

/// One memory zone's guest RAM: the zone's id and its ranges, in address order (two when it
/// spans the 32-bit hole).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZoneLayout {
    pub id: String,
    pub ranges: Vec<RamRange>,
}

/// The zone that holds all guest RAM when no `--memory-zone` is given.
pub const DEFAULT_ZONE: &str = "ram";

/// The address map of one guest, worked out once from its RAM size: every stage that places
/// something (guest memory, the BAR allocator, the loader, the boot tables, the bench and the
/// report) reads it from here rather than recomputing it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryLayout {
    ram: Vec<RamRange>,
    /// Every RAM byte in exactly one zone; the zones in order from address 0.
    zones: Vec<ZoneLayout>,
    e820: Vec<E820Entry>,
    mmio64: RamRange,
}

impl MemoryLayout {
    /// Lays out `mem_size` bytes of RAM: one range from 0, or two when the RAM does not fit
    /// below the 32-bit MMIO hole (the rest continues at 4 GiB).
    pub fn new(mem_size: u64) -> Result<Self, LayoutError> {
        if mem_size < MIN_MEM_SIZE {
            return Err(LayoutError::TooSmall {
                size: mem_size,
                min: MIN_MEM_SIZE,
            });
        }
        if mem_size % PAGE_SIZE != 0 {
            return Err(LayoutError::NotPageAligned { size: mem_size });
        }
        // RAM above 4 GiB plus the MMIO window must stay addressable.
        let ram_end = if mem_size <= MMIO32_START {
            Some(mem_size)
        } else {
            RAM_ABOVE_4G_START.checked_add(mem_size - MMIO32_START)
        };
        if ram_end
            .and_then(|e| e.checked_add(MMIO64_ALIGN + MMIO64_SIZE))
            .is_none_or(|e| e > 1 << 52)
        {
            return Err(LayoutError::TooLarge { size: mem_size });
        }
        let ram = if mem_size <= MMIO32_START {
            vec![RamRange {
                start: GuestAddress(0),
                size: mem_size,
            }]
        } else {
            vec![
                RamRange {
                    start: GuestAddress(0),
                    size: MMIO32_START,
                },
                RamRange {
                    start: GuestAddress(RAM_ABOVE_4G_START),
                    size: mem_size - MMIO32_START,
                },
            ]
        };
        let ram_end = ram.last().map_or(0, RamRange::end);
        // Starts at 4 GiB at the lowest, so it never overlaps the 32-bit hole.
        let mmio64 = RamRange {
            start: GuestAddress(ram_end.max(MMIO32_END).next_multiple_of(MMIO64_ALIGN)),
            size: MMIO64_SIZE,
        };
        let e820 = e820_map(&ram);
        let zones = vec![ZoneLayout {
            id: DEFAULT_ZONE.into(),
            ranges: ram.clone(),
        }];
        Ok(Self {
            ram,
            zones,
            e820,
            mmio64,
        })
    }

    /// Lays out zones of `(id, size)` one after the other from address 0, as [`Self::new`]
    /// lays out their sum: a zone that reaches the 32-bit hole continues at 4 GiB.
    pub fn with_zones(zones: &[(String, u64)]) -> Result<Self, LayoutError> {
        let total = zones
            .iter()
            .try_fold(0u64, |t, (_, size)| t.checked_add(*size))
            .ok_or(LayoutError::TooLarge { size: u64::MAX })?;
        let mut layout = Self::new(total)?;
        let mut offset = 0;
        layout.zones = zones
            .iter()
            .map(|(id, size)| {
                let ranges = slice(&layout.ram, offset, *size);
                offset += size;
                ZoneLayout {
                    id: id.clone(),
                    ranges,
                }
            })
            .collect();
        Ok(layout)
    }

    /// The memory zones, in address order.
    pub fn zones(&self) -> &[ZoneLayout] {
        &self.zones
    }

    /// The guest RAM ranges, in address order.
    pub fn ram(&self) -> &[RamRange] {
        &self.ram
    }

    /// Bytes of guest RAM in all ranges.
    pub fn ram_size(&self) -> u64 {
        self.ram.iter().map(|r| r.size).sum()
    }

    /// End of the RAM below the 32-bit hole (where the kernel, boot structures and initrd go).
    pub fn low_ram_end(&self) -> u64 {
        self.ram[0].end()
    }

    /// The memory map the guest is told about.
    pub fn e820(&self) -> &[E820Entry] {
        &self.e820
    }

    /// Bytes the E820 map calls usable RAM (what a guest counts; the EBDA and BIOS area are
    /// reserved out of the first range).
    pub fn e820_ram_bytes(&self) -> u64 {
        self.e820
            .iter()
            .filter(|e| e.kind == E820Kind::Ram)
            .map(|e| e.size)
            .sum()
    }

    /// The 64-bit MMIO window: from the end of RAM rounded up to 1 GiB, [`MMIO64_SIZE`] long.
    pub fn mmio64(&self) -> RamRange {
        self.mmio64
    }
}

/// The guest ranges of bytes `offset..offset + len` of RAM counted across `ram` in order.
fn slice(ram: &[RamRange], mut offset: u64, mut len: u64) -> Vec<RamRange> {
    let mut out = Vec::new();
    for r in ram {
        if len == 0 {
            break;
        }
        if offset >= r.size {
            offset -= r.size;
            continue;
        }
        let size = len.min(r.size - offset);
        out.push(RamRange {
            start: GuestAddress(r.start.0 + offset),
            size,
        });
        len -= size;
        offset = 0;
    }
    out
}

fn e820_map(ram: &[RamRange]) -> Vec<E820Entry> {
    let entry = |addr: u64, end: u64, kind| E820Entry {
        addr,
        size: end - addr,
        kind,
    };
    let mut map = vec![
        entry(0, EBDA_START, E820Kind::Ram),
        entry(EBDA_START, LEGACY_HOLE_START, E820Kind::Reserved),
        entry(LEGACY_HOLE_START, HIMEM_START, E820Kind::Reserved),
        entry(HIMEM_START, ram[0].end(), E820Kind::Ram),
        entry(
            PCI_ECAM_START,
            PCI_ECAM_START + PCI_ECAM_SIZE,
            E820Kind::Reserved,
        ),
    ];
    map.extend(
        ram[1..]
            .iter()
            .map(|r| entry(r.start.0, r.end(), E820Kind::Ram)),
    );
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(size: u64) -> MemoryLayout {
        MemoryLayout::new(size).unwrap()
    }

    fn range(start: u64, size: u64) -> RamRange {
        RamRange {
            start: GuestAddress(start),
            size,
        }
    }

    #[test]
    fn small_guest_has_one_range_and_legacy_holes_reserved() {
        let size = 256 * MIB;
        assert_eq!(layout(size).ram(), [range(0, size)]);
        assert_eq!(
            layout(size).e820(),
            [
                E820Entry {
                    addr: 0,
                    size: 0x9_fc00,
                    kind: E820Kind::Ram
                },
                E820Entry {
                    addr: 0x9_fc00,
                    size: 0x400,
                    kind: E820Kind::Reserved
                },
                E820Entry {
                    addr: 0xa_0000,
                    size: 0x6_0000,
                    kind: E820Kind::Reserved
                },
                E820Entry {
                    addr: 0x10_0000,
                    size: size - MIB,
                    kind: E820Kind::Ram
                },
                E820Entry {
                    addr: 0xfeb0_0000,
                    size: MIB,
                    kind: E820Kind::Reserved
                },
            ]
        );
        assert_eq!(layout(size).mmio64(), range(4 * GIB, MMIO64_SIZE));
    }

    #[test]
    fn large_guest_is_split_around_the_mmio_hole() {
        let size = 6 * GIB;
        let l = layout(size);
        assert_eq!(l.ram(), [range(0, 3 * GIB), range(4 * GIB, 3 * GIB)]);
        assert_eq!(l.ram_size(), size);
        let map = l.e820();
        assert_eq!(map.len(), 6);
        assert_eq!(
            map[3],
            E820Entry {
                addr: MIB,
                size: 3 * GIB - MIB,
                kind: E820Kind::Ram
            }
        );
        assert_eq!(
            map[5],
            E820Entry {
                addr: 4 * GIB,
                size: 3 * GIB,
                kind: E820Kind::Ram
            }
        );
        // Total RAM reported equals the guest size minus the reserved legacy area.
        assert_eq!(l.e820_ram_bytes(), size - (HIMEM_START - EBDA_START));
        // Nothing in the map touches the hole but the reserved ECAM window.
        assert!(map.iter().all(|e| e.addr + e.size <= MMIO32_START
            || e.addr >= MMIO32_END
            || (e.addr, e.kind) == (PCI_ECAM_START, E820Kind::Reserved)));
        assert_eq!(l.ram()[1].end(), 7 * GIB);
        assert_eq!(l.mmio64().start, GuestAddress(7 * GIB));
        // A non-GiB end rounds up.
        assert_eq!(
            layout(6 * GIB + 2 * MIB).mmio64().start,
            GuestAddress(8 * GIB)
        );
    }

    #[test]
    fn exactly_three_gib_stays_in_one_range() {
        assert_eq!(layout(3 * GIB).ram(), [range(0, 3 * GIB)]);
        assert_eq!(layout(3 * GIB).e820().len(), 5);
    }

    #[test]
    fn pci_io_window_lies_above_every_legacy_port() {
        use devices::pci::bus::{CONFIG_IO_BASE, CONFIG_IO_LEN};
        use guest_abi::ports;
        const {
            assert!(PCI_IO_START < PCI_IO_END && PCI_IO_END <= 1 << 16);
            assert!((ports::SERIAL_COM1 + ports::SERIAL_LEN) as u64 <= PCI_IO_START);
            assert!((ports::I8042_BASE + ports::I8042_LEN) as u64 <= PCI_IO_START);
            assert!((ports::BOOT_MARKS as u64) < PCI_IO_START);
            assert!((ports::DEBUG_EXIT as u64) < PCI_IO_START);
            assert!((CONFIG_IO_BASE + CONFIG_IO_LEN) as u64 <= PCI_IO_START);
        };
    }

    #[test]
    fn ecam_window_is_reserved_aligned_and_outside_the_bar_pool() {
        const {
            assert!(PCI_ECAM_START % PCI_ECAM_SIZE == 0);
            assert!(MMIO32_ALLOC_END <= PCI_ECAM_START);
            assert!(PCI_ECAM_START + PCI_ECAM_SIZE <= IOAPIC_ADDR);
            assert!(PCI_ECAM_START >= MMIO32_START);
        };
        for size in [64 * MIB, 3 * GIB, 6 * GIB] {
            let l = layout(size);
            let map = l.e820();
            assert!(map.iter().any(|e| e.kind == E820Kind::Reserved
                && e.addr <= PCI_ECAM_START
                && PCI_ECAM_START + PCI_ECAM_SIZE <= e.addr + e.size));
            // Sorted and disjoint, as guests expect.
            assert!(map.windows(2).all(|w| w[0].addr + w[0].size <= w[1].addr));
        }
        // The ACPI area is inside the reserved BIOS area, above the MP table.
        let l = layout(64 * MIB);
        assert!(l.e820().iter().any(|e| e.kind == E820Kind::Reserved
            && e.addr <= ACPI_START
            && ACPI_END <= e.addr + e.size));
        const { assert!(ACPI_RSDP_ADDR % 16 == 0 && ACPI_START >= 0xe_0000) };
    }

    #[test]
    fn too_small_or_unaligned_sizes_are_refused() {
        assert_eq!(
            MemoryLayout::new(32 * MIB),
            Err(LayoutError::TooSmall {
                size: 32 * MIB,
                min: MIN_MEM_SIZE
            })
        );
        assert!(MemoryLayout::new(32 * MIB)
            .unwrap_err()
            .to_string()
            .contains("below the minimum"));
        assert_eq!(
            MemoryLayout::new(64 * MIB + 1),
            Err(LayoutError::NotPageAligned { size: 64 * MIB + 1 })
        );
        assert!(MemoryLayout::new(64 * MIB).is_ok());
        assert!(matches!(
            MemoryLayout::new(!0xfff),
            Err(LayoutError::TooLarge { .. })
        ));
    }

    #[test]
    fn fixed_structures_do_not_overlap() {
        let spans = [
            (GDT_ADDR, 4 * 8),
            (IDT_ADDR, 8),
            (PVH_INFO_ADDR, PVH_MODLIST_ADDR - PVH_INFO_ADDR),
            (PVH_MODLIST_ADDR, PVH_MEMMAP_ADDR - PVH_MODLIST_ADDR),
            (PVH_MEMMAP_ADDR, PVH_MEMMAP_MAX_ENTRIES as u64 * 24),
            (ZERO_PAGE_ADDR, 4096),
            (PML4_ADDR, 4096),
            (PDPT_ADDR, 4096),
            (PD_ADDR, 4096),
            (CMDLINE_ADDR, CMDLINE_MAX_SIZE as u64),
            (EBDA_START, LEGACY_HOLE_START - EBDA_START),
        ];
        for (i, a) in spans.iter().enumerate() {
            for b in &spans[i + 1..] {
                assert!(
                    a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0,
                    "{a:x?} overlaps {b:x?}"
                );
            }
        }
        // The stack grows down from below the page tables and above the zero page.
        const { assert!(BOOT_STACK_TOP < PML4_ADDR && BOOT_STACK_TOP > ZERO_PAGE_ADDR + 4096) };
    }
}
