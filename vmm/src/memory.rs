//! Guest RAM backings: anonymous 4 KiB pages, transparent huge pages, a memfd (shareable
//! with a vfio-user server), or hugetlb pages. The mappings are owned here and shown to
//! the rest of the VMM two ways: as a vm-memory `GuestMemoryMmap` for loading and devices,
//! and as a `pinning::GuestRam` for the pinning engine.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use pinning::{GuestRam, Region};
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::size::human;

const PAGE_4K: u64 = 4 << 10;
const PAGE_2M: u64 = 2 << 20;
const PAGE_1G: u64 = 1 << 30;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backing {
    /// Private anonymous memory, 4 KiB pages (THP disabled for it).
    Anon,
    /// Private anonymous memory with transparent huge pages (2 MiB) requested.
    Thp,
    /// A memfd: shareable with another process (needed by vfio-user devices).
    Memfd,
    /// hugetlb pages of 2 MiB (memfd-backed, shareable). Needs reserved huge pages.
    Hugetlb,
    /// hugetlb pages of 1 GiB (memfd-backed, shareable). Needs reserved huge pages.
    #[value(name = "hugetlb-1g")]
    Hugetlb1g,
}

impl Backing {
    pub fn page_size(self) -> u64 {
        match self {
            Backing::Anon | Backing::Memfd => PAGE_4K,
            Backing::Thp | Backing::Hugetlb => PAGE_2M,
            Backing::Hugetlb1g => PAGE_1G,
        }
    }

    pub fn shareable(self) -> bool {
        matches!(self, Backing::Memfd | Backing::Hugetlb | Backing::Hugetlb1g)
    }

    pub fn name(self) -> &'static str {
        match self {
            Backing::Anon => "anon",
            Backing::Thp => "thp",
            Backing::Memfd => "memfd",
            Backing::Hugetlb => "hugetlb",
            Backing::Hugetlb1g => "hugetlb-1g",
        }
    }
}

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
    #[error("{op} for {} of {} guest memory: {source}", human(*size), backing.name())]
    Map {
        op: &'static str,
        backing: Backing,
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("guest memory layout: {0}")]
    Layout(String),
}

impl MemoryError {
    /// Shell exit status: 2 for a size or reservation the user must fix, 1 when the host
    /// refused a mapping that should have worked.
    pub fn exit_status(&self) -> u8 {
        match self {
            MemoryError::Map { .. } => 1,
            _ => 2,
        }
    }
}

/// One host mapping, unmapped on drop.
struct HostMapping {
    addr: u64,
    len: u64,
    /// The memfd behind a shareable mapping.
    file: Option<File>,
}

impl Drop for HostMapping {
    fn drop(&mut self) {
        // SAFETY: we created this mapping and every view of it (vm-memory regions built raw,
        // GuestRam) is dropped before the GuestMemory that owns us (field order).
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len as usize) };
    }
}

fn check_hugetlb(backing: Backing, size: u64) -> Result<(), MemoryError> {
    let kb = backing.page_size() / 1024;
    let dir = format!("/sys/kernel/mm/hugepages/hugepages-{kb}kB");
    let read = |f: &str| -> u64 {
        std::fs::read_to_string(Path::new(&dir).join(f))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    };
    let (free, total) = (read("free_hugepages"), read("nr_hugepages"));
    let needed = size / backing.page_size();
    if free < needed {
        return Err(MemoryError::HugePages {
            backing,
            needed,
            free,
            total,
        });
    }
    Ok(())
}

fn map_one(backing: Backing, size: u64) -> Result<HostMapping, MemoryError> {
    let err = |op, source| MemoryError::Map {
        op,
        backing,
        size,
        source,
    };
    let file = if backing.shareable() {
        let mut flags = libc::MFD_CLOEXEC;
        if matches!(backing, Backing::Hugetlb | Backing::Hugetlb1g) {
            let shift = backing.page_size().trailing_zeros();
            flags |= libc::MFD_HUGETLB | (shift << libc::MFD_HUGE_SHIFT);
        }
        // SAFETY: the name is a NUL-terminated literal; the fd returned is owned below.
        let fd = unsafe { libc::memfd_create(c"vmm-guest-ram".as_ptr(), flags) };
        if fd < 0 {
            return Err(err("memfd_create", std::io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        file.set_len(size).map_err(|e| err("ftruncate", e))?;
        Some(file)
    } else {
        None
    };
    // THP wants 2 MiB-aligned memory: map a little more and trim the ends.
    let slack = if backing == Backing::Thp { PAGE_2M } else { 0 };
    let (flags, fd) = match &file {
        Some(f) => (libc::MAP_SHARED, f.as_raw_fd()),
        None => (
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
        ),
    };
    // SAFETY: a fresh mapping at a kernel-chosen address aliases nothing we own.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            (size + slack) as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            fd,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(err("mmap", std::io::Error::last_os_error()));
    }
    let mut addr = ptr as u64;
    if slack > 0 {
        let aligned = addr.next_multiple_of(PAGE_2M);
        let (head, tail) = (aligned - addr, slack - (aligned - addr));
        // SAFETY: both trims lie inside the mapping just made and are not used.
        unsafe {
            if head > 0 {
                libc::munmap(addr as *mut libc::c_void, head as usize);
            }
            if tail > 0 {
                libc::munmap((aligned + size) as *mut libc::c_void, tail as usize);
            }
        }
        addr = aligned;
    }
    let mapping = HostMapping {
        addr,
        len: size,
        file,
    };
    let advice = match backing {
        Backing::Thp => libc::MADV_HUGEPAGE,
        // So that `anon` means 4 KiB pages whatever the host's THP default is.
        Backing::Anon => libc::MADV_NOHUGEPAGE,
        _ => return Ok(mapping),
    };
    // SAFETY: advice on a mapping we own; it changes no contents.
    if unsafe { libc::madvise(addr as *mut libc::c_void, size as usize, advice) } != 0 {
        return Err(err("madvise", std::io::Error::last_os_error()));
    }
    Ok(mapping)
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
    /// Maps fresh memory for each `(guest address, size)` range.
    pub fn new(backing: Backing, ranges: &[(u64, u64)]) -> Result<Self, MemoryError> {
        let total: u64 = ranges.iter().map(|r| r.1).sum();
        let host = pinning::procfs::mem_total(Path::new("/")).unwrap_or(u64::MAX);
        if total > host {
            return Err(MemoryError::MoreThanHost {
                requested: total,
                host,
            });
        }
        for &(_, size) in ranges {
            if size % backing.page_size() != 0 || size == 0 {
                return Err(MemoryError::NotPageMultiple { size, backing });
            }
        }
        if matches!(backing, Backing::Hugetlb | Backing::Hugetlb1g) {
            check_hugetlb(backing, total)?;
        }
        let mut mappings = Vec::with_capacity(ranges.len());
        for &(_, size) in ranges {
            mappings.push(map_one(backing, size)?);
        }
        let mut vm_regions = Vec::new();
        let mut regions = Vec::new();
        for (m, &(guest, size)) in mappings.iter().zip(ranges) {
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
            .map_err(|e| MemoryError::Layout(format!("region at {guest:#x}: {e}")))?;
            let region = GuestRegionMmap::new(raw, GuestAddress(guest))
                .ok_or_else(|| MemoryError::Layout(format!("region at {guest:#x} overflows")))?;
            vm_regions.push(region);
            regions.push(Region {
                host_addr: m.addr,
                guest_addr: guest,
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
    use vm_memory::{Bytes, GuestMemoryBackend as _};

    #[test]
    fn every_backing_that_needs_no_reservation_maps_and_is_usable() {
        for backing in [Backing::Anon, Backing::Thp, Backing::Memfd] {
            let m = GuestMemory::new(backing, &[(0, 8 << 20), (1 << 32, 4 << 20)]).unwrap();
            assert_eq!(m.size(), 12 << 20);
            m.mem
                .write_obj(0xdead_beef_u32, GuestAddress((1 << 32) + 16))
                .unwrap();
            assert_eq!(
                m.mem.read_obj::<u32>(GuestAddress((1 << 32) + 16)).unwrap(),
                0xdead_beef
            );
            assert_eq!(m.ram.size(), 12 << 20);
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
        let want = (free + 1) * PAGE_2M;
        let e = GuestMemory::new(Backing::Hugetlb, &[(0, want)])
            .err()
            .expect("more than is free");
        assert!(e.to_string().contains("nr_hugepages"), "{e}");
    }

    #[test]
    fn sizes_that_split_a_page_or_exceed_the_host_are_refused() {
        let e = GuestMemory::new(Backing::Thp, &[(0, 3 << 20)])
            .err()
            .unwrap();
        assert!(matches!(e, MemoryError::NotPageMultiple { .. }), "{e}");
        let e = GuestMemory::new(Backing::Anon, &[(0, 1 << 50)])
            .err()
            .unwrap();
        assert!(matches!(e, MemoryError::MoreThanHost { .. }), "{e}");
    }
}
