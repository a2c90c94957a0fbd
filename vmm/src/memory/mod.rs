//! Guest RAM: the address map ([`layout`]), what backs it on the host ([`backing`]:
//! anonymous 4 KiB pages, transparent huge pages, a memfd shareable with a vfio-user server,
//! or hugetlb pages) and [`GuestMemory`], which owns the host mappings and shows them to the
//! rest of the VMM two ways: as a vm-memory `GuestMemoryMmap` for loading and devices, and as
//! a `pinning::GuestRam` for the pinning engine.

pub mod backing;
pub mod layout;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use pinning::{ErrorClass, GuestRam, Region};
use vm_memory::{GuestMemoryMmap, GuestRegionMmap, MmapRegion};

pub use backing::Backing;
use backing::{check_hugetlb, map_one, HostMapping};
pub use layout::{MemoryLayout, RamRange};

use crate::size::human;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory of {} is more than this host's RAM ({}); give the VM less memory", human(*requested), human(*host))]
    MoreThanHost { requested: u64, host: u64 },
    #[error("guest memory region of {} is not a multiple of the {} page size ({}); use a size that is", human(*size), backing.name(), human(backing.page_size()))]
    NotPageMultiple { size: u64, backing: Backing },
    #[error("{backing} needs {needed} free {} huge pages but only {free} are free; reserve them with `echo {want} > /sys/kernel/mm/hugepages/hugepages-{kb}kB/nr_hugepages` (as root) or use --backing thp",
        human(backing.page_size()), backing = backing.name(), want = total + needed - free, kb = backing.page_size() / 1024)]
    HugePages {
        backing: Backing,
        needed: u64,
        free: u64,
        total: u64,
    },
    #[error("{op} for {} of {} guest memory failed: {source}", human(*size), backing.name())]
    Map {
        op: &'static str,
        backing: Backing,
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("describing guest memory to vm-memory failed: {0}")]
    Layout(String),
}

impl pinning::Classify for MemoryError {
    /// A size or reservation is the user's to fix; a mapping the host refused although it
    /// should have worked is not.
    fn class(&self) -> ErrorClass {
        match self {
            MemoryError::Map { .. } | MemoryError::Layout(_) => ErrorClass::Internal,
            _ => ErrorClass::User,
        }
    }
}

/// Guest RAM: the host mappings and the two views of them.
pub struct GuestMemory {
    /// vm-memory's view (loading, devices). Built raw: it never unmaps.
    pub mem: GuestMemoryMmap,
    /// The pinning engine's view.
    pub ram: Arc<GuestRam>,
    pub backing: Backing,
    /// Declared last so it is dropped last, after both views.
    mappings: Vec<HostMapping>,
}

impl GuestMemory {
    /// Maps fresh memory for each range: a guest's are [`MemoryLayout::ram`].
    pub fn new(backing: Backing, ranges: &[RamRange]) -> Result<Self, MemoryError> {
        let total: u64 = ranges.iter().map(|r| r.size).sum();
        let host = pinning::procfs::mem_total(Path::new("/")).unwrap_or(u64::MAX);
        if total > host {
            return Err(MemoryError::MoreThanHost {
                requested: total,
                host,
            });
        }
        for &RamRange { size, .. } in ranges {
            if size % backing.page_size() != 0 || size == 0 {
                return Err(MemoryError::NotPageMultiple { size, backing });
            }
        }
        if matches!(backing, Backing::Hugetlb | Backing::Hugetlb1g) {
            check_hugetlb(backing, total)?;
        }
        let mut mappings = Vec::with_capacity(ranges.len());
        for r in ranges {
            mappings.push(map_one(backing, r.size)?);
        }
        let mut vm_regions = Vec::new();
        let mut regions = Vec::new();
        for (m, &RamRange { start, size }) in mappings.iter().zip(ranges) {
            let flags = if m.file.is_some() {
                libc::MAP_SHARED
            } else {
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS
            };
            // SAFETY: [addr, addr+size) is a live mapping owned by `mappings`, which outlives
            // this region (field order of GuestMemory).
            let raw = unsafe {
                MmapRegion::build_raw(
                    m.addr as *mut u8,
                    size as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    flags,
                )
            }
            .map_err(|e| MemoryError::Layout(format!("region at {:#x}: {e}", start.0)))?;
            let region = GuestRegionMmap::new(raw, start).ok_or_else(|| {
                MemoryError::Layout(format!("region at {:#x} overflows", start.0))
            })?;
            vm_regions.push(region);
            regions.push(Region {
                host_addr: m.addr,
                guest_addr: start.0,
                size,
                page_size: backing.page_size(),
                file: m.file.as_ref().map(|f| (f.as_raw_fd(), 0)),
            });
        }
        let mem = GuestMemoryMmap::from_regions(vm_regions)
            .map_err(|e| MemoryError::Layout(e.to_string()))?;
        // SAFETY: the regions are the mappings above, owned by this GuestMemory and dropped
        // after `ram`; guest RAM is only ever accessed through vm-memory's volatile accessors
        // or raw pointers.
        let ram = Arc::new(
            unsafe { GuestRam::new(regions) }.map_err(|e| MemoryError::Layout(e.to_string()))?,
        );
        Ok(Self {
            mem,
            ram,
            backing,
            mappings,
        })
    }

    pub fn size(&self) -> u64 {
        self.mappings.iter().map(|m| m.len).sum()
    }

    /// The memfd behind a shareable region, for handing to another process.
    pub fn files(&self) -> impl Iterator<Item = &File> {
        self.mappings.iter().filter_map(|m| m.file.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use layout::{GIB, MIB};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend as _};

    #[test]
    fn every_backing_that_needs_no_reservation_maps_and_is_usable() {
        for backing in [Backing::Anon, Backing::Thp, Backing::Memfd] {
            // RAM on both sides of the 32-bit hole.
            let layout = MemoryLayout::new(3 * GIB + 4 * MIB).unwrap();
            let m = GuestMemory::new(backing, layout.ram()).unwrap();
            assert_eq!(m.size(), 3 * GIB + 4 * MIB);
            m.mem
                .write_obj(0xdead_beef_u32, GuestAddress((1 << 32) + 16))
                .unwrap();
            assert_eq!(
                m.mem.read_obj::<u32>(GuestAddress((1 << 32) + 16)).unwrap(),
                0xdead_beef
            );
            assert_eq!(m.ram.size(), 3 * GIB + 4 * MIB);
            assert_eq!(m.mem.iter().count(), 2);
            assert_eq!(m.files().count(), usize::from(backing.shareable()) * 2);
            for r in m.ram.regions() {
                assert_eq!(r.host_addr % backing.page_size(), 0);
            }
        }
    }

    #[test]
    fn hugetlb_without_reserved_pages_says_how_to_reserve() {
        let free: u64 =
            std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0);
        let want = ((free + 1) * 2 * MIB).max(64 * MIB);
        let e = GuestMemory::new(Backing::Hugetlb, MemoryLayout::new(want).unwrap().ram())
            .err()
            .expect("more than is free");
        assert!(e.to_string().contains("nr_hugepages"), "{e}");
    }

    #[test]
    fn sizes_that_split_a_page_or_exceed_the_host_are_refused() {
        let e = GuestMemory::new(
            Backing::Thp,
            MemoryLayout::new(64 * MIB + 4096).unwrap().ram(),
        )
        .err()
        .unwrap();
        assert!(matches!(e, MemoryError::NotPageMultiple { .. }), "{e}");
        let e = GuestMemory::new(Backing::Anon, MemoryLayout::new(1 << 50).unwrap().ram())
            .err()
            .unwrap();
        assert!(matches!(e, MemoryError::MoreThanHost { .. }), "{e}");
    }
}
