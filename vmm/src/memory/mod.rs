//! Guest RAM: the address map ([`layout`]), what backs it on the host ([`backing`]:
//! anonymous 4 KiB pages, transparent huge pages, memfd shards shareable with a vfio-user
//! server (with or without huge pages), or hugetlb pages), what the host allows of huge pages
//! ([`thp`]), and [`GuestMemory`], which owns the host mappings and shows them to the rest of
//! the VMM two ways: as a vm-memory `GuestMemoryMmap` for loading and devices (one region per
//! RAM range, so one KVM slot each), and as a `pinning::GuestRam` for the pinning engine (one
//! region per shard, so no pin chunk straddles two files). Each mapping is bound to its host
//! NUMA node, when it has one, before any page of it is touched ([`numa`]).

pub mod backing;
pub mod layout;
pub mod numa;
pub mod thp;
pub mod zones;

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use pinning::region::RamFile;
use pinning::{ErrorClass, GuestRam, Region};
use vm_memory::{
    GuestMemoryBackend as _, GuestMemoryMmap, GuestMemoryRegion as _, GuestRegionMmap, MmapRegion,
};

pub use backing::Backing;
use backing::{check_hugetlb, map_range, HostRange};
pub use layout::{MemoryLayout, RamRange};
pub use numa::Placement;
pub use thp::ThpPolicy;

use crate::size::human;

/// Shards of shareable RAM are this large unless `--memory-shard` says otherwise (a RAM
/// range smaller than this is one shard).
pub const DEFAULT_SHARD_BYTES: u64 = layout::GIB;

/// Private memory is released in pieces this large, so teardown has work to share.
const RELEASE_PIECE: u64 = layout::GIB;

/// File descriptors kept free for everything else the VMM opens (KVM, devices, sockets).
const FD_HEADROOM: u64 = 256;

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
    #[error("--memory-shard {}: not a power of two; give one such as 256M or 1G", human(*.0))]
    ShardNotPowerOfTwo(u64),
    #[error("--memory-shard {}: smaller than the {} page size of --backing {}; give {} or more", human(*shard), human(backing.page_size()), backing.name(), human(backing.page_size()))]
    ShardBelowPage { shard: u64, backing: Backing },
    #[error("--memory-shard {}: larger than the largest RAM range ({}); give {} or less", human(*shard), human(*largest), human(*largest))]
    ShardAboveRange { shard: u64, largest: u64 },
    #[error("--memory-shard {}: only shareable RAM is made of shards (memfd, memfd-thp, hugetlb, hugetlb-1g), not --backing {}; leave --memory-shard out", human(*shard), backing.name())]
    ShardNotShareable { shard: u64, backing: Backing },
    #[error("guest RAM in {shards} shards needs {shards} file descriptors but RLIMIT_NOFILE is {limit} (keeping {FD_HEADROOM} for the rest); give a larger --memory-shard or raise `ulimit -n`")]
    TooManyShards { shards: u64, limit: u64 },
    #[error("--backing memfd-thp: this host forbids huge pages in shmem ({line}); allow them with `echo advise > {}/shmem_enabled` (as root) or use --backing memfd", thp::SYSFS_THP)]
    ShmemThpForbidden { line: String },
    #[error("{op} for {} of {} guest memory failed: {source}", human(*size), backing.name())]
    Map {
        op: &'static str,
        backing: Backing,
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("host NUMA node {node}: not a node with memory that this process may use (online nodes: {online}; this process may use: {allowed}); give one of those or leave the node out")]
    NoSuchNode {
        node: u32,
        online: String,
        allowed: String,
    },
    #[error("binding {} of guest memory to host NUMA node {node} failed: {source}", human(*size))]
    Bind {
        node: u32,
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("describing guest memory to vm-memory failed: {0}")]
    Layout(String),
}

impl pinning::Classify for MemoryError {
    /// A size, a reservation or a host setting is the user's to fix; a mapping the host
    /// refused although it should have worked is not.
    fn class(&self) -> ErrorClass {
        match self {
            MemoryError::Map { .. } | MemoryError::Bind { .. } | MemoryError::Layout(_) => {
                ErrorClass::Internal
            }
            _ => ErrorClass::User,
        }
    }
}

/// What backs guest RAM, and in shards of what size when it is shareable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemorySpec {
    pub backing: Backing,
    /// `--memory-shard`; `None` is [`DEFAULT_SHARD_BYTES`], clamped to each RAM range.
    pub shard_bytes: Option<u64>,
    /// The host NUMA node every mapping is bound to (MPOL_BIND) before it is touched; `None`
    /// leaves placement to the process's own policy (`numactl --membind=N vmm run`).
    pub host_numa_node: Option<u32>,
}

impl MemorySpec {
    pub fn new(backing: Backing) -> Self {
        MemorySpec {
            backing,
            shard_bytes: None,
            host_numa_node: None,
        }
    }

    /// The shard size in effect for `ranges`: what was asked for, or the default clamped to
    /// the largest range.
    pub fn shard_bytes(&self, ranges: &[RamRange]) -> u64 {
        let largest = ranges.iter().map(|r| r.size).max().unwrap_or(0);
        self.shard_bytes
            .unwrap_or(DEFAULT_SHARD_BYTES.min(largest.next_power_of_two()))
    }

    /// How many shards `ranges` take (0 for private backings).
    pub fn shards(&self, ranges: &[RamRange]) -> u64 {
        if !self.backing.shareable() {
            return 0;
        }
        let shard = self.shard_bytes(ranges);
        ranges.iter().map(|r| r.size.div_ceil(shard)).sum()
    }

    /// Everything about `ranges` that can be refused before any memory is touched: sizes,
    /// shards, the file descriptor limit, hugetlb reservations and the host's THP policy.
    pub fn check(&self, ranges: &[RamRange], thp: &ThpPolicy) -> Result<(), MemoryError> {
        self.check_with(ranges, thp, nofile_limit())
    }

    fn check_with(
        &self,
        ranges: &[RamRange],
        thp: &ThpPolicy,
        nofile: u64,
    ) -> Result<(), MemoryError> {
        let backing = self.backing;
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
        if let Some(shard) = self.shard_bytes {
            let largest = ranges.iter().map(|r| r.size).max().unwrap_or(0);
            if !backing.shareable() {
                return Err(MemoryError::ShardNotShareable { shard, backing });
            }
            if !shard.is_power_of_two() {
                return Err(MemoryError::ShardNotPowerOfTwo(shard));
            }
            if shard < backing.page_size() {
                return Err(MemoryError::ShardBelowPage { shard, backing });
            }
            if shard > largest {
                return Err(MemoryError::ShardAboveRange { shard, largest });
            }
        }
        let shards = self.shards(ranges);
        if shards > 0 && shards + FD_HEADROOM > nofile {
            return Err(MemoryError::TooManyShards {
                shards,
                limit: nofile,
            });
        }
        if backing == Backing::MemfdThp && !thp.shmem_allowed() {
            return Err(MemoryError::ShmemThpForbidden {
                line: thp.describe_shmem(),
            });
        }
        if backing.hugetlb() {
            check_hugetlb(backing, total)?;
        }
        Ok(())
    }
}

/// All zones together against the host's RAM (each zone's own check sees only itself).
pub fn check_host_ram(ranges: &[RamRange]) -> Result<(), MemoryError> {
    let total = ranges.iter().fold(0u64, |t, r| t.saturating_add(r.size));
    let host = pinning::procfs::mem_total(Path::new("/")).unwrap_or(u64::MAX);
    if total > host {
        return Err(MemoryError::MoreThanHost {
            requested: total,
            host,
        });
    }
    Ok(())
}

/// The soft RLIMIT_NOFILE: how many files this process may have open.
fn nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only into `lim`, which we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return u64::MAX;
    }
    lim.rlim_cur
}

/// Binds a freshly mapped range (all its shards: mbind spans the VMAs) to `node`.
fn bind(h: &HostRange, node: u32) -> Result<(), MemoryError> {
    numa::bind(h.addr, h.len, node).map_err(|source| {
        if source.raw_os_error() == Some(libc::EINVAL) {
            let host = pinning::topology::HostTopology::detect();
            let online = host.nodes.iter().filter(|n| n.online).map(|n| n.id);
            return MemoryError::NoSuchNode {
                node,
                online: pinning::topology::node_list(online),
                allowed: host
                    .mems_allowed
                    .map_or_else(|| "unknown".into(), pinning::topology::node_list),
            };
        }
        MemoryError::Bind {
            node,
            size: h.len,
            source,
        }
    })
}

/// Guest RAM: the host mappings and the two views of them.
pub struct GuestMemory {
    /// vm-memory's view (loading, devices): one region per RAM range. Built raw: it never
    /// unmaps.
    pub mem: GuestMemoryMmap,
    /// The pinning engine's view: one region per shard (per RAM range for private memory).
    pub ram: Arc<GuestRam>,
    pub spec: MemorySpec,
    /// Declared last so it is dropped last, after both views.
    ranges: Vec<HostRange>,
}

impl GuestMemory {
    /// Checks `spec` against the host and maps fresh memory for each range: a guest's are
    /// [`MemoryLayout::ram`].
    pub fn new(spec: MemorySpec, ranges: &[RamRange]) -> Result<Self, MemoryError> {
        Self::zoned(&[(spec, ranges.to_vec())])
    }

    /// [`GuestMemory::new`] for memory zones: each `(spec, ranges)` is one zone, mapped with
    /// its own backing and shards ([`MemoryLayout::zones`]). Each zone range is a region of
    /// its own in both views, so no pin chunk crosses a zone border. `spec` is the first
    /// zone's.
    pub fn zoned(zones: &[(MemorySpec, Vec<RamRange>)]) -> Result<Self, MemoryError> {
        let thp = ThpPolicy::host();
        for (spec, ranges) in zones {
            spec.check(ranges, &thp)?;
        }
        let all: Vec<RamRange> = zones.iter().flat_map(|(_, r)| r.iter().copied()).collect();
        check_host_ram(&all)?;
        let mut host = Vec::with_capacity(all.len());
        let mut vm_regions = Vec::new();
        let mut regions = Vec::new();
        for (spec, ranges) in zones {
            let backing = spec.backing;
            let shard = spec.shard_bytes(ranges);
            for &RamRange { start, size } in ranges {
                let h = map_range(backing, size, shard)?;
                if let Some(node) = spec.host_numa_node {
                    bind(&h, node)?;
                }
                let flags = if backing.shareable() {
                    libc::MAP_SHARED
                } else {
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS
                };
                // SAFETY: [addr, addr+size) is a live mapping owned by `h`, which `host`
                // keeps until after this region is gone (field order of GuestMemory).
                let raw = unsafe {
                    MmapRegion::build_raw(
                        h.addr as *mut u8,
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
                let region = |offset: u64, size: u64, file: Option<&RamFile>| Region {
                    host_addr: h.addr + offset,
                    guest_addr: start.0 + offset,
                    size,
                    page_size: backing.page_size(),
                    file: file.map(|f| (f.clone(), 0)),
                };
                if h.shards.is_empty() {
                    regions.push(region(0, size, None));
                }
                for s in &h.shards {
                    regions.push(region(s.offset, s.len, Some(&s.file)));
                }
                host.push(h);
            }
        }
        let spec = zones
            .first()
            .map_or(MemorySpec::new(Backing::Anon), |(s, _)| *s);
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
            spec,
            ranges: host,
        })
    }

    /// Bytes mapped.
    pub fn size(&self) -> u64 {
        self.ranges.iter().map(|r| r.len).sum()
    }

    /// The memfds of shareable RAM, one per shard, in guest-address order.
    pub fn files(&self) -> impl Iterator<Item = &RamFile> {
        self.ranges
            .iter()
            .flat_map(|r| r.shards.iter().map(|s| &s.file))
    }

    /// Frees guest RAM on up to `threads` threads (the pinning engine's helpers, at nice 19),
    /// then unmaps it: each shard's pages are punched out of its memfd, and private memory
    /// is dropped a gigabyte at a time with MADV_DONTNEED, in parallel; the unmap and the
    /// closes that follow find little left to free. Returns the threads that took part.
    pub fn release(self, threads: usize) -> usize {
        let mut pieces: Vec<(u64, u64, Option<&RamFile>)> = Vec::new();
        for r in &self.ranges {
            if r.shards.is_empty() {
                pieces.extend(
                    (0..r.len)
                        .step_by(RELEASE_PIECE as usize)
                        .map(|off| (r.addr + off, RELEASE_PIECE.min(r.len - off), None)),
                );
            }
            for s in &r.shards {
                pieces.push((r.addr + s.offset, s.len, Some(&s.file)));
            }
        }
        let used = pinning::parallel_for(&pieces, threads, "free-ram", |&(addr, len, file)| {
            let freed = match file {
                // SAFETY: punching a hole in our own memfd; every mapping of it (ours, and a
                // device server's, which has been told to unmap) sees zeroes afterwards.
                Some(f) => unsafe {
                    libc::fallocate(
                        f.as_raw_fd(),
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        0,
                        len as libc::off_t,
                    )
                },
                // SAFETY: advice on private memory this GuestMemory owns and nothing uses any
                // more (the VM and every device are gone); it only drops the contents.
                None => unsafe {
                    libc::madvise(addr as *mut libc::c_void, len as usize, libc::MADV_DONTNEED)
                },
            };
            if freed != 0 {
                // Not fatal: the unmap and close below free the memory all the same, later.
                tracing::debug!(
                    "freeing guest RAM at {addr:#x}+{len:#x}: {}",
                    std::io::Error::last_os_error()
                );
            }
        });
        drop(self);
        used
    }

    /// Where the pages of `guest` (guest-physical ranges of this RAM) are on the host: one
    /// sample every `step` bytes, widened to take at most `max_samples` in all.
    pub fn placement(
        &self,
        guest: &[RamRange],
        step: u64,
        max_samples: u64,
    ) -> std::io::Result<Placement> {
        // The host pieces of `guest`: each within one vm-memory region (one host mapping).
        let mut pieces = Vec::new();
        for r in guest {
            for region in self.mem.iter() {
                let (start, len) = (region.start_addr().0, region.len());
                let from = r.start.0.max(start);
                let to = (r.start.0 + r.size).min(start + len);
                if from < to {
                    pieces.push((region.as_ptr() as u64 + (from - start), to - from));
                }
            }
        }
        // One step for all of them, so the bound holds for `guest` as a whole.
        let step = numa::sample_step(pieces.iter().map(|p| p.1).sum(), step, max_samples);
        let mut total = Placement::default();
        for (host, len) in pieces {
            total.merge(&numa::sample_placement(host, len, step, u64::MAX)?);
        }
        Ok(total)
    }

    /// The shard size in effect (0 for private memory).
    pub fn shard_bytes(&self) -> u64 {
        self.ranges
            .iter()
            .flat_map(|r| r.shards.iter().map(|s| s.len))
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests;
