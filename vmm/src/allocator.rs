//! The one owner of guest resources that devices need: 32-bit and 64-bit MMIO address space,
//! the PCI port I/O window and interrupt lines (GSIs). Handing them out from one place is what
//! keeps two devices from ever being given the same BAR address or the same GSI.

use std::collections::BTreeMap;

use devices::pci::{BarKind, BarSpec};

use crate::memory::layout::{self, MemoryLayout};

/// Legacy GSIs (ISA IRQs and the rest of the IOAPIC pins) are claimed by number.
pub const LEGACY_GSI_COUNT: u32 = 24;
/// Highest GSI handed out. KVM takes at most 4096 routes (KVM_MAX_IRQ_ROUTES), and the routing table always carries
/// the 40 legacy ones (24 IOAPIC pins, 16 PIC lines): one MSI route per GSI fits up to here.
pub const MAX_GSI: u32 = LEGACY_GSI_COUNT + 4096 - 40 - 1;

/// Allocation errors.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResourceError {
    #[error("{pool}: no free range of {size:#x} bytes aligned to {align:#x}")]
    Exhausted {
        pool: &'static str,
        size: u64,
        align: u64,
    },
    #[error("{pool}: range {addr:#x}+{size:#x} is outside the pool or in use")]
    Unavailable {
        pool: &'static str,
        addr: u64,
        size: u64,
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
    #[error("{pool}: {addr:#x} was not allocated")]
    NotAllocated { pool: &'static str, addr: u64 },
    #[error("legacy GSI {0} is out of range (0..24) or already in use")]
    LegacyGsiUnavailable(u32),
    #[error("no free GSI left (24..={MAX_GSI})")]
    GsiExhausted,
}

/// First-fit allocator over `[start, end)` with aligned allocations.
#[derive(Debug)]
pub struct AddressAllocator {
    name: &'static str,
    start: u64,
    end: u64,
    // start -> size of every live allocation.
    used: BTreeMap<u64, u64>,
}

impl AddressAllocator {
    /// A pool covering `[start, end)`.
    pub fn new(name: &'static str, start: u64, end: u64) -> Self {
        AddressAllocator {
            name,
            start,
            end,
            used: BTreeMap::new(),
        }
    }

    /// The pool's bounds.
    pub fn bounds(&self) -> (u64, u64) {
        (self.start, self.end)
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
        let exhausted = ResourceError::Exhausted {
            pool: self.name,
            size,
            align,
        };
        let mut candidate = self
            .start
            .checked_next_multiple_of(align)
            .ok_or(exhausted.clone())?;
        // Walk the allocations in order, trying the gap before each one.
        for (&a, &len) in &self.used {
            let fits = candidate.checked_add(size).is_some_and(|e| e <= a);
            if fits {
                break;
            }
            let after = a + len;
            if after > candidate {
                candidate = after
                    .checked_next_multiple_of(align)
                    .ok_or(exhausted.clone())?;
            }
        }
        match candidate.checked_add(size) {
            Some(e) if e <= self.end => {
                self.used.insert(candidate, size);
                Ok(candidate)
            }
            _ => Err(exhausted),
        }
    }

    /// Claims exactly `[addr, addr + size)`.
    pub fn allocate_at(&mut self, addr: u64, size: u64) -> Result<(), ResourceError> {
        let unavailable = ResourceError::Unavailable {
            pool: self.name,
            addr,
            size,
        };
        let end = addr.checked_add(size).ok_or(unavailable.clone())?;
        if size == 0 || addr < self.start || end > self.end {
            return Err(unavailable);
        }
        let below = self.used.range(..=addr).next_back();
        let above = self.used.range(addr..).next();
        let clash =
            below.is_some_and(|(&a, &l)| a + l > addr) || above.is_some_and(|(&a, _)| a < end);
        if clash {
            return Err(unavailable);
        }
        self.used.insert(addr, size);
        Ok(())
    }

    /// Returns the allocation starting at `addr`.
    pub fn free(&mut self, addr: u64) -> Result<(), ResourceError> {
        self.used
            .remove(&addr)
            .map(|_| ())
            .ok_or(ResourceError::NotAllocated {
                pool: self.name,
                addr,
            })
    }
}

/// GSIs: 0..24 claimed by number (legacy devices), MSI vectors from 24 up.
#[derive(Debug)]
pub struct GsiAllocator {
    legacy_used: u32,
    next_msi: u32,
    freed_msi: Vec<u32>,
}

impl Default for GsiAllocator {
    fn default() -> Self {
        GsiAllocator {
            legacy_used: 0,
            next_msi: LEGACY_GSI_COUNT,
            freed_msi: Vec::new(),
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

    /// A GSI for an MSI/MSI-X vector.
    pub fn allocate_msi(&mut self) -> Result<u32, ResourceError> {
        if let Some(gsi) = self.freed_msi.pop() {
            return Ok(gsi);
        }
        if self.next_msi > MAX_GSI {
            return Err(ResourceError::GsiExhausted);
        }
        let gsi = self.next_msi;
        self.next_msi += 1;
        Ok(gsi)
    }

    /// Gives back an MSI GSI.
    pub fn free_msi(&mut self, gsi: u32) {
        if (LEGACY_GSI_COUNT..self.next_msi).contains(&gsi) && !self.freed_msi.contains(&gsi) {
            self.freed_msi.push(gsi);
        }
    }
}

/// All allocatable resources of one VM.
#[derive(Debug)]
pub struct ResourceAllocator {
    /// 32-bit MMIO (BARs that must stay below 4 GiB).
    pub mmio32: AddressAllocator,
    /// 64-bit MMIO window above RAM.
    pub mmio64: AddressAllocator,
    /// The PCI port I/O window (I/O BARs).
    pub pio: AddressAllocator,
    /// Interrupt lines.
    pub gsi: GsiAllocator,
}

impl ResourceAllocator {
    /// Pools for the MMIO windows of `layout`.
    pub fn new(layout: &MemoryLayout) -> Self {
        let mmio64 = layout.mmio64();
        ResourceAllocator {
            mmio32: AddressAllocator::new("mmio32", layout::MMIO32_START, layout::MMIO32_ALLOC_END),
            mmio64: AddressAllocator::new("mmio64", mmio64.start.0, mmio64.end()),
            pio: AddressAllocator::new("pci-io", layout::PCI_IO_START, layout::PCI_IO_END),
            gsi: GsiAllocator::default(),
        }
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
        let (pool_name, start, end) = (pool.name, pool.start, pool.end);
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
        let mut a = AddressAllocator::new("t", 0x1000, 0x10000);
        assert_eq!(a.allocate(0x100, 0x1000), Ok(0x1000));
        assert_eq!(a.allocate(0x2000, 0x2000), Ok(0x2000));
        // Fills the gap left before 0x2000 (0x1100..0x2000).
        assert_eq!(a.allocate(0x100, 0x100), Ok(0x1100));
        assert_eq!(a.allocate(0x1000, 0x1000), Ok(0x4000));
        a.free(0x2000).unwrap();
        assert_eq!(a.allocate(0x2000, 0x1000), Ok(0x2000));
        assert_eq!(
            a.free(0x3000),
            Err(ResourceError::NotAllocated {
                pool: "t",
                addr: 0x3000
            })
        );
    }

    #[test]
    fn exhaustion_and_bad_requests_are_errors() {
        let mut a = AddressAllocator::new("t", 0, 0x4000);
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
        let mut b = AddressAllocator::new("t", u64::MAX - 0xfff, u64::MAX);
        assert!(b.allocate(0x1000, 0x1_0000).is_err());
    }

    #[test]
    fn fixed_claims_respect_neighbours() {
        let mut a = AddressAllocator::new("t", 0x1000, 0x9000);
        a.allocate_at(0x3000, 0x1000).unwrap();
        assert!(a.allocate_at(0x2800, 0x1000).is_err());
        assert!(a.allocate_at(0x3800, 0x100).is_err());
        assert!(a.allocate_at(0x0, 0x1000).is_err());
        assert!(a.allocate_at(0x8800, 0x1000).is_err());
        a.allocate_at(0x2000, 0x1000).unwrap();
        a.allocate_at(0x4000, 0x1000).unwrap();
        assert_eq!(a.allocate(0x1000, 0x1000), Ok(0x1000));
        assert_eq!(a.allocate(0x1000, 0x1000), Ok(0x5000));
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
        let mut r = ResourceAllocator::new(&MemoryLayout::new(64 * layout::MIB).unwrap());
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
        let mut r = ResourceAllocator::new(&MemoryLayout::new(64 * layout::MIB).unwrap());
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
    fn vm_pools_follow_the_layout() {
        let r = ResourceAllocator::new(&MemoryLayout::new(6 * layout::GIB).unwrap());
        assert_eq!(r.mmio32.bounds(), (3 * layout::GIB, layout::PCI_ECAM_START));
        assert_eq!(
            r.mmio64.bounds(),
            (7 * layout::GIB, 7 * layout::GIB + layout::MMIO64_SIZE)
        );
    }
}
