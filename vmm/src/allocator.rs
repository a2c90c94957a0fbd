//! The one owner of guest resources that devices need: 32-bit and 64-bit MMIO address space,
//! the PCI port I/O window and interrupt lines (GSIs). Handing them out from one place is what
//! keeps two devices from ever being given the same BAR address or the same GSI.

use devices::pci::{BarKind, BarSpec};
use vm_allocator::{AddressAllocator, AllocPolicy, IdAllocator, RangeInclusive};

use crate::memory::layout::{self, MemoryLayout};

/// Legacy GSIs (ISA IRQs and the rest of the IOAPIC pins) are claimed by number.
pub const LEGACY_GSI_COUNT: u32 = 24;
/// Highest GSI handed out. KVM takes at most 4096 routes (KVM_MAX_IRQ_ROUTES), and the routing table always carries
/// the 40 legacy ones (24 IOAPIC pins, 16 PIC lines): one MSI route per GSI fits up to here.
pub const MAX_GSI: u32 = LEGACY_GSI_COUNT + 4096 - 40 - 1;

/// Allocation errors.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResourceError {
    #[error("{pool}: the window {start:#x}..{end:#x} is empty or wraps; the memory layout that defines it is wrong")]
    BadWindow {
        pool: &'static str,
        start: u64,
        end: u64,
    },
    #[error("{pool}: no free range of {size:#x} bytes aligned to {align:#x}")]
    Exhausted {
        pool: &'static str,
        size: u64,
        align: u64,
    },
    #[error("{pool}: invalid request (size {size:#x}, alignment {align:#x})")]
    InvalidRequest {
        pool: &'static str,
        size: u64,
        align: u64,
    },
    #[error("{device}: no room for BAR{index} ({size:#x} bytes of {kind} space) in the {pool} window {start:#x}..{end:#x}: the BARs placed before it fill it; attach fewer devices")]
    NoRoomForBar {
        device: String,
        index: usize,
        kind: BarKind,
        size: u64,
        pool: &'static str,
        start: u64,
        end: u64,
    },
    #[error("{device}: BAR{index} ({size:#x} bytes of {kind} space) is larger than the whole {pool} window {start:#x}..{end:#x}, so this VMM cannot place it: leave the device out")]
    BarLargerThanWindow {
        device: String,
        index: usize,
        kind: BarKind,
        size: u64,
        pool: &'static str,
        start: u64,
        end: u64,
    },
    #[error("{pool}: {addr:#x}+{size:#x} was not allocated")]
    NotAllocated {
        pool: &'static str,
        addr: u64,
        size: u64,
    },
    #[error("legacy GSI {0} is out of range (0..24) or already in use")]
    LegacyGsiUnavailable(u32),
    #[error("no free GSI left (24..={MAX_GSI})")]
    GsiExhausted,
}

/// First-fit allocator over one address window, `vm-allocator`'s [`AddressAllocator`] with
/// the window's name for the errors.
///
/// There is deliberately no claim of a fixed range: `AllocPolicy::ExactMatch` in
/// vm-allocator 0.1.4 places a range inside one already handed out (it does not check that
/// the node it splits is free), and nothing in this VMM needs a fixed address from a pool:
/// the fixed regions (ECAM, LAPIC, IOAPIC) lie outside every window by layout.
#[derive(Debug)]
pub struct AddressPool {
    name: &'static str,
    pool: AddressAllocator,
}

impl AddressPool {
    /// A pool covering `[start, end)`.
    pub fn new(name: &'static str, start: u64, end: u64) -> Result<Self, ResourceError> {
        let bad = ResourceError::BadWindow {
            pool: name,
            start,
            end,
        };
        let size = end.checked_sub(start).ok_or(bad.clone())?;
        let pool = AddressAllocator::new(start, size).map_err(|_| bad)?;
        Ok(AddressPool { name, pool })
    }

    /// The pool's bounds, `[start, end)`.
    pub fn bounds(&self) -> (u64, u64) {
        (self.pool.base(), self.pool.end() + 1)
    }

    /// Lowest free range of `size` bytes aligned to `align` (a power of two).
    pub fn allocate(&mut self, size: u64, align: u64) -> Result<u64, ResourceError> {
        if size == 0 || !align.is_power_of_two() {
            return Err(ResourceError::InvalidRequest {
                pool: self.name,
                size,
                align,
            });
        }
        self.pool
            .allocate(size, align, AllocPolicy::FirstMatch)
            .map(|range| range.start())
            .map_err(|_| ResourceError::Exhausted {
                pool: self.name,
                size,
                align,
            })
    }

    /// Returns the `size` bytes allocated at `addr`. (vm-allocator also accepts a range that
    /// is exactly a free gap, which changes nothing.)
    pub fn free(&mut self, addr: u64, size: u64) -> Result<(), ResourceError> {
        let not_allocated = ResourceError::NotAllocated {
            pool: self.name,
            addr,
            size,
        };
        let end = addr
            .checked_add(size)
            .and_then(|e| e.checked_sub(1))
            .ok_or(not_allocated.clone())?;
        let range = RangeInclusive::new(addr, end).map_err(|_| not_allocated.clone())?;
        self.pool.free(&range).map_err(|_| not_allocated)
    }
}

/// GSIs: 0..24 claimed by number (legacy devices), MSI vectors from 24 up.
#[derive(Debug)]
pub struct GsiAllocator {
    // A bit per legacy GSI. vm-allocator has no claim by number that works here: its
    // IdAllocator hands out ids in order, and its AddressAllocator's ExactMatch (0.1.4)
    // misses a single free id whose successor is taken (it looks for a two-id superset).
    legacy_used: u32,
    msi: IdAllocator,
}

const _: () = assert!(LEGACY_GSI_COUNT <= MAX_GSI);

impl Default for GsiAllocator {
    fn default() -> Self {
        GsiAllocator {
            legacy_used: 0,
            msi: IdAllocator::new(LEGACY_GSI_COUNT, MAX_GSI)
                .expect("LEGACY_GSI_COUNT <= MAX_GSI by their definitions"),
        }
    }
}

impl GsiAllocator {
    /// Claims legacy GSI `gsi` (for example 4 for COM1).
    pub fn claim_legacy(&mut self, gsi: u32) -> Result<u32, ResourceError> {
        if gsi >= LEGACY_GSI_COUNT || self.legacy_used & (1 << gsi) != 0 {
            return Err(ResourceError::LegacyGsiUnavailable(gsi));
        }
        self.legacy_used |= 1 << gsi;
        Ok(gsi)
    }

    /// A GSI for an MSI/MSI-X vector: the lowest one given back, else the next never used.
    pub fn allocate_msi(&mut self) -> Result<u32, ResourceError> {
        self.msi
            .allocate_id()
            .map_err(|_| ResourceError::GsiExhausted)
    }

    /// Gives back an MSI GSI; one that is not a live MSI GSI is ignored.
    pub fn free_msi(&mut self, gsi: u32) {
        // The only failures are "not an MSI GSI" and "not handed out", both harmless here.
        let _ = self.msi.free_id(gsi);
    }
}

/// All allocatable resources of one VM.
#[derive(Debug)]
pub struct ResourceAllocator {
    /// 32-bit MMIO (BARs that must stay below 4 GiB).
    pub mmio32: AddressPool,
    /// 64-bit MMIO window above RAM.
    pub mmio64: AddressPool,
    /// The PCI port I/O window (I/O BARs).
    pub pio: AddressPool,
    /// Interrupt lines.
    pub gsi: GsiAllocator,
}

impl ResourceAllocator {
    /// Pools for the MMIO windows of `layout`.
    pub fn new(layout: &MemoryLayout) -> Result<Self, ResourceError> {
        let mmio64 = layout.mmio64();
        Ok(ResourceAllocator {
            mmio32: AddressPool::new("mmio32", layout::MMIO32_START, layout::MMIO32_ALLOC_END)?,
            mmio64: AddressPool::new("mmio64", mmio64.start.0, mmio64.end())?,
            pio: AddressPool::new("pci-io", layout::PCI_IO_START, layout::PCI_IO_END)?,
            gsi: GsiAllocator::default(),
        })
    }

    /// A base for BAR `index` of `device`, from the window its kind decodes in, aligned to
    /// its size as PCI requires. Memory BARs get at least a page each, so that mmap-able BAR
    /// parts can become memory slots and no two devices share a page.
    pub fn allocate_bar(
        &mut self,
        device: &str,
        index: usize,
        spec: BarSpec,
    ) -> Result<u64, ResourceError> {
        let (pool, align) = match spec.kind {
            BarKind::Io => (&mut self.pio, spec.size),
            BarKind::Memory32 => (&mut self.mmio32, spec.size.max(layout::PAGE_SIZE)),
            BarKind::Memory64 => (&mut self.mmio64, spec.size.max(layout::PAGE_SIZE)),
        };
        let (device, kind, size) = (device.to_string(), spec.kind, spec.size);
        let pool_name = pool.name;
        let (start, end) = pool.bounds();
        pool.allocate(size, align).map_err(|e| match e {
            ResourceError::Exhausted { .. } if size > end - start => {
                ResourceError::BarLargerThanWindow {
                    device,
                    index,
                    kind,
                    size,
                    pool: pool_name,
                    start,
                    end,
                }
            }
            ResourceError::Exhausted { .. } => ResourceError::NoRoomForBar {
                device,
                index,
                kind,
                size,
                pool: pool_name,
                start,
                end,
            },
            other => other,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocations_are_aligned_first_fit_and_reusable() {
        let mut a = AddressPool::new("t", 0x1000, 0x10000).unwrap();
        assert_eq!(a.allocate(0x100, 0x1000), Ok(0x1000));
        assert_eq!(a.allocate(0x2000, 0x2000), Ok(0x2000));
        // Fills the gap left before 0x2000 (0x1100..0x2000).
        assert_eq!(a.allocate(0x100, 0x100), Ok(0x1100));
        assert_eq!(a.allocate(0x1000, 0x1000), Ok(0x4000));
        a.free(0x2000, 0x2000).unwrap();
        assert_eq!(a.allocate(0x2000, 0x1000), Ok(0x2000));
        // Part of an allocation, or a range never handed out, is not freed.
        assert_eq!(
            a.free(0x3000, 0x1000),
            Err(ResourceError::NotAllocated {
                pool: "t",
                addr: 0x3000,
                size: 0x1000
            })
        );
        assert!(a.free(0x5000, 0x1000).is_err());
        assert!(a.free(0, 0).is_err());
        // Freed neighbours merge: the whole 0x1000..0x5000 is one range again.
        for (addr, size) in [
            (0x1000, 0x100),
            (0x1100, 0x100),
            (0x2000, 0x2000),
            (0x4000, 0x1000),
        ] {
            a.free(addr, size).unwrap();
        }
        assert_eq!(a.allocate(0xf000, 0x1000), Ok(0x1000));
    }

    #[test]
    fn exhaustion_and_bad_requests_are_errors() {
        let mut a = AddressPool::new("t", 0, 0x4000).unwrap();
        assert_eq!(a.allocate(0x4000, 0x1000), Ok(0));
        assert_eq!(
            a.allocate(1, 1),
            Err(ResourceError::Exhausted {
                pool: "t",
                size: 1,
                align: 1
            })
        );
        assert!(matches!(
            a.allocate(0, 1),
            Err(ResourceError::InvalidRequest { .. })
        ));
        assert!(matches!(
            a.allocate(1, 3),
            Err(ResourceError::InvalidRequest { .. })
        ));
        let mut b = AddressPool::new("t", u64::MAX - 0xfff, u64::MAX).unwrap();
        assert!(b.allocate(0x1000, 0x1_0000).is_err());
        assert_eq!(
            AddressPool::new("t", 0x2000, 0x1000).unwrap_err(),
            ResourceError::BadWindow {
                pool: "t",
                start: 0x2000,
                end: 0x1000
            }
        );
        assert!(AddressPool::new("t", 0x1000, 0x1000).is_err());
    }

    #[test]
    fn gsis_legacy_by_number_msi_from_24() {
        let mut g = GsiAllocator::default();
        assert_eq!(g.claim_legacy(4), Ok(4));
        assert_eq!(
            g.claim_legacy(4),
            Err(ResourceError::LegacyGsiUnavailable(4))
        );
        assert_eq!(
            g.claim_legacy(24),
            Err(ResourceError::LegacyGsiUnavailable(24))
        );
        // The INTx order: a free line between two taken ones is still claimable.
        for gsi in [10, 11, 9, 5, 3] {
            assert_eq!(g.claim_legacy(gsi), Ok(gsi));
        }
        assert_eq!(g.allocate_msi(), Ok(24));
        assert_eq!(g.allocate_msi(), Ok(25));
        g.free_msi(24);
        g.free_msi(4); // not an MSI GSI: ignored
        assert_eq!(g.allocate_msi(), Ok(24));
        assert_eq!(g.allocate_msi(), Ok(26));
        for _ in 27..=MAX_GSI {
            g.allocate_msi().unwrap();
        }
        assert_eq!(g.allocate_msi(), Err(ResourceError::GsiExhausted));
    }

    fn io(size: u64) -> BarSpec {
        BarSpec {
            kind: BarKind::Io,
            size,
            prefetchable: false,
        }
    }

    #[test]
    fn io_bars_fill_the_pio_window_aligned_to_their_size_up_to_its_last_port() {
        let mut r = ResourceAllocator::new(&MemoryLayout::new(64 * layout::MIB).unwrap()).unwrap();
        assert_eq!(r.pio.bounds(), (layout::PCI_IO_START, layout::PCI_IO_END));
        // The first BAR sits at the window's first port.
        assert_eq!(r.allocate_bar("a", 0, io(0x20)), Ok(0xc000));
        // A bigger one is aligned to its own size, past the first.
        assert_eq!(r.allocate_bar("a", 1, io(0x100)), Ok(0xc100));
        // A small one fills the gap the alignment left.
        assert_eq!(r.allocate_bar("a", 2, io(4)), Ok(0xc020));
        // One that ends exactly at the last port fits ...
        assert_eq!(r.allocate_bar("b", 0, io(0x2000)), Ok(0xe000));
        assert_eq!(r.allocate_bar("b", 1, io(0x1000)), Ok(0xd000));
        // ... and memory BARs come from their own windows, untouched by I/O ones.
        let mem = BarSpec {
            kind: BarKind::Memory32,
            size: 16,
            prefetchable: false,
        };
        assert_eq!(r.allocate_bar("b", 2, mem), Ok(layout::MMIO32_START));
    }

    #[test]
    fn a_full_pio_window_names_the_device_and_bar_it_refused() {
        let mut r = ResourceAllocator::new(&MemoryLayout::new(64 * layout::MIB).unwrap()).unwrap();
        let window = layout::PCI_IO_END - layout::PCI_IO_START;
        // A 64 KiB BAR is valid PCI but larger than the window.
        let err = r.allocate_bar("gpio.sock", 2, io(0x1_0000)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "gpio.sock: BAR2 (0x10000 bytes of I/O space) is larger than the whole pci-io \
             window 0xc000..0x10000, so this VMM cannot place it: leave the device out"
        );
        assert_eq!(r.allocate_bar("x", 0, io(window / 2)), Ok(0xc000));
        assert_eq!(r.allocate_bar("x", 1, io(window / 2)), Ok(0xe000));
        let err = r.allocate_bar("gpio.sock", 2, io(4)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "gpio.sock: no room for BAR2 (0x4 bytes of I/O space) in the pci-io window \
             0xc000..0x10000: the BARs placed before it fill it; attach fewer devices"
        );
    }

    #[test]
    fn memory_bars_take_at_least_a_page_aligned_to_their_size() {
        let mut r = ResourceAllocator::new(&MemoryLayout::new(6 * layout::GIB).unwrap()).unwrap();
        let bar = |kind, size| BarSpec {
            kind,
            size,
            prefetchable: false,
        };
        let small = bar(BarKind::Memory32, 0x10);
        assert_eq!(r.allocate_bar("a", 0, small), Ok(layout::MMIO32_START));
        assert_eq!(
            r.allocate_bar("a", 1, small),
            Ok(layout::MMIO32_START + 0x1000)
        );
        let big = bar(BarKind::Memory32, 0x10_0000);
        assert_eq!(
            r.allocate_bar("a", 2, big),
            Ok(layout::MMIO32_START + 0x10_0000)
        );
        // The gap the alignment left is still used.
        assert_eq!(
            r.allocate_bar("a", 3, small),
            Ok(layout::MMIO32_START + 0x2000)
        );
        let mmio64 = r.mmio64.bounds().0;
        // The 64-bit window starts at 7 GiB: a 4 GiB BAR goes to 8 GiB, and a 1 GiB one
        // then fills the gap below it.
        let four = bar(BarKind::Memory64, 4 * layout::GIB);
        assert_eq!(r.allocate_bar("b", 0, four), Ok(8 * layout::GIB));
        let gib = bar(BarKind::Memory64, layout::GIB);
        assert_eq!(r.allocate_bar("b", 2, gib), Ok(mmio64));
        assert_eq!(r.allocate_bar("b", 4, gib), Ok(12 * layout::GIB));
    }

    #[test]
    fn vm_pools_follow_the_layout() {
        let r = ResourceAllocator::new(&MemoryLayout::new(6 * layout::GIB).unwrap()).unwrap();
        assert_eq!(r.mmio32.bounds(), (3 * layout::GIB, layout::PCI_ECAM_START));
        assert_eq!(
            r.mmio64.bounds(),
            (7 * layout::GIB, 7 * layout::GIB + layout::MMIO64_SIZE)
        );
    }
}
