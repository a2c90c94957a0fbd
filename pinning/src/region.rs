//! Guest RAM as the pinning engine sees it: host mappings laid end to end in one linear
//! range of offsets, so one job covers all of RAM even when it has a hole (the 32-bit MMIO
//! gap) in guest-physical space.

use std::fmt;
use std::fs::File;
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;

/// The file behind shareable guest RAM (a memfd shard), shared by the memory that owns it and
/// every DMA window mapped from it: a window keeps the file open by holding a reference, so
/// no descriptor is duplicated (a guest with N shards holds N descriptors, whatever the
/// device count). Two are equal when they are the same open file.
#[derive(Clone)]
pub struct RamFile(Arc<File>);

impl RamFile {
    pub fn new(file: File) -> Self {
        Self(Arc::new(file))
    }

    /// The shared file, for a holder that must outlive this reference.
    pub fn shared(&self) -> &Arc<File> {
        &self.0
    }
}

impl PartialEq for RamFile {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for RamFile {}

impl fmt::Debug for RamFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RamFile(fd {})", self.0.as_raw_fd())
    }
}

impl AsFd for RamFile {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl AsRawFd for RamFile {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// One contiguous piece of guest RAM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Region {
    /// Where it is mapped in this process.
    pub host_addr: u64,
    /// Where the guest (and so the device, as IOVA) sees it.
    pub guest_addr: u64,
    pub size: u64,
    /// Backing page size: 4 KiB, 2 MiB or 1 GiB.
    pub page_size: u64,
    /// The file behind it and the offset of `host_addr` in it (memfd RAM), so that another
    /// process (a vfio-user server) can map the same memory.
    pub file: Option<(RamFile, u64)>,
}

/// A part of one region, produced by cutting a linear range at region boundaries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Piece {
    pub host_addr: u64,
    pub guest_addr: u64,
    pub len: u64,
    pub file: Option<(RamFile, u64)>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegionError {
    #[error("guest RAM region at guest {guest:#x} (host {host:#x}, {size:#x} bytes) is not aligned to its page size {page:#x} (a power of two)")]
    Unaligned {
        guest: u64,
        host: u64,
        size: u64,
        page: u64,
    },
    #[error("guest RAM has no regions")]
    Empty,
}

/// All of guest RAM, in guest-address order.
#[derive(Debug)]
pub struct GuestRam {
    regions: Vec<Region>,
    /// Linear offset at which each region starts.
    offsets: Vec<u64>,
    size: u64,
}

impl GuestRam {
    /// # Safety
    /// Each region must be a mapping that the caller owns and keeps alive for the life of
    /// this value (and of anything pinned through it), whose contents nothing accesses
    /// through Rust references: pinning populates it, and a device may DMA into it at any
    /// time once mapped, so only raw pointers and volatile accesses are sound.
    pub unsafe fn new(mut regions: Vec<Region>) -> Result<Self, RegionError> {
        if regions.is_empty() {
            return Err(RegionError::Empty);
        }
        regions.sort_by_key(|r| r.guest_addr);
        let mut offsets = Vec::with_capacity(regions.len());
        let mut size = 0;
        for r in &regions {
            let p = r.page_size;
            if !p.is_power_of_two()
                || r.host_addr % p != 0
                || r.guest_addr % p != 0
                || r.size % p != 0
            {
                return Err(RegionError::Unaligned {
                    guest: r.guest_addr,
                    host: r.host_addr,
                    size: r.size,
                    page: p,
                });
            }
            offsets.push(size);
            size += r.size;
        }
        Ok(Self {
            regions,
            offsets,
            size,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// The largest backing page size: chunks cut at multiples of it from each region's start
    /// (see [`GuestRam::region_cuts`]) never split any region's backing page.
    pub fn page_size(&self) -> u64 {
        self.regions
            .iter()
            .map(|r| r.page_size)
            .max()
            .unwrap_or(4096)
    }

    /// Where one region ends and the next begins, as linear offsets strictly inside RAM and
    /// each once: cut there, no chunk of a job over RAM spans two regions (two memory files).
    pub fn region_cuts(&self) -> Vec<u64> {
        let mut cuts: Vec<u64> = self
            .offsets
            .iter()
            .copied()
            .filter(|&o| o > 0 && o < self.size)
            .collect();
        // An empty region starts where the next one does.
        cuts.dedup();
        cuts
    }

    /// The linear ranges that hold the RAM among guest addresses `guest`, in order; bytes
    /// of it that are not RAM are in none of them.
    pub fn linear_ranges(&self, guest: Range<u64>) -> Vec<Range<u64>> {
        self.regions
            .iter()
            .zip(&self.offsets)
            .filter_map(|(r, &off)| {
                let start = guest.start.max(r.guest_addr);
                let end = guest.end.min(r.guest_addr.saturating_add(r.size));
                (start < end).then(|| off + (start - r.guest_addr)..off + (end - r.guest_addr))
            })
            .collect()
    }

    /// The pieces that make up the linear range `range`, in order.
    pub fn pieces(&self, range: Range<u64>) -> impl DoubleEndedIterator<Item = Piece> + '_ {
        self.regions
            .iter()
            .zip(&self.offsets)
            .filter_map(move |(r, &off)| {
                let start = range.start.max(off);
                let end = range.end.min(off + r.size);
                (start < end).then(|| {
                    let skip = start - off;
                    Piece {
                        host_addr: r.host_addr + skip,
                        guest_addr: r.guest_addr + skip,
                        len: end - start,
                        file: r.file.as_ref().map(|(f, o)| (f.clone(), o + skip)),
                    }
                })
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram_with(file: &RamFile) -> GuestRam {
        let regions = vec![
            Region {
                host_addr: 0x10_0000_0000,
                guest_addr: 1 << 32,
                size: 2 << 30,
                page_size: 4096,
                file: Some((file.clone(), 3 << 30)),
            },
            Region {
                host_addr: 0x20_0000_0000,
                guest_addr: 0,
                size: 3 << 30,
                page_size: 4096,
                file: Some((file.clone(), 0)),
            },
        ];
        // SAFETY: the addresses are never dereferenced by these tests.
        unsafe { GuestRam::new(regions) }.unwrap()
    }

    fn ram() -> GuestRam {
        ram_with(&RamFile::new(File::open("/dev/null").unwrap()))
    }

    #[test]
    fn a_range_across_the_hole_is_cut_at_the_region_boundary() {
        let file = RamFile::new(File::open("/dev/null").unwrap());
        let ram = ram_with(&file);
        assert_eq!(ram.size(), 5 << 30);
        let pieces: Vec<_> = ram.pieces((3 << 30) - 4096..(3 << 30) + 8192).collect();
        assert_eq!(pieces.len(), 2);
        assert_eq!(pieces[0].guest_addr, (3 << 30) - 4096);
        assert_eq!(pieces[0].len, 4096);
        assert_eq!(pieces[1].guest_addr, 1 << 32);
        assert_eq!(pieces[1].host_addr, 0x10_0000_0000);
        assert_eq!(pieces[1].file, Some((file, 3 << 30)));
        assert_eq!(pieces[1].len, 8192);
    }

    #[test]
    fn region_cuts_are_the_inner_region_starts_once_each() {
        assert_eq!(ram().region_cuts(), [3 << 30]);
        let shard = |guest_addr, size| Region {
            host_addr: 0x10_0000_0000 + guest_addr,
            guest_addr,
            size,
            page_size: 4096,
            file: None,
        };
        let regions = vec![
            shard(0, 1 << 30),
            shard(1 << 30, 0),
            shard(1 << 30, 1 << 30),
            shard(2 << 30, 4096),
        ];
        // SAFETY: never dereferenced.
        let ram = unsafe { GuestRam::new(regions) }.unwrap();
        assert_eq!(ram.region_cuts(), [1 << 30, 2 << 30]);
    }

    #[test]
    fn unaligned_regions_are_refused() {
        let r = Region {
            host_addr: 4096,
            guest_addr: 0,
            size: 2 << 20,
            page_size: 2 << 20,
            file: None,
        };
        // SAFETY: never dereferenced.
        let refused = unsafe { GuestRam::new(vec![r]) };
        assert!(matches!(refused, Err(RegionError::Unaligned { .. })));
    }
}
