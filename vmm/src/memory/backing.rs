//! What backs guest RAM on the host, and the host mapping of one RAM range.
//!
//! Shareable RAM is made of shards: one memfd per shard (1 GiB by default), each mapped with
//! MAP_FIXED into one reserved host range per RAM range, so KVM, the loader and devices still
//! see one contiguous range while faulting in scales with threads. A single shmem file takes
//! its own locks for every page added to it (page-cache insertion, block accounting), so
//! threads populating one memfd queue on it; threads populating different files do not
//! (measured on a 16-core host: one memfd 4.2-4.9 GiB/s, one memfd per GiB 12.9-13.4 GiB/s).
//!
//! Every shard is sealed against shrinking and growing (and against further sealing) right
//! after it is sized, before its fd can reach a vfio-user server: a peer that could
//! `ftruncate` guest RAM would make the VMM's next touch of it a SIGBUS. hugetlbfs memfds
//! accept the same seals as shmem ones (Linux 4.16 and later; mm/memfd.c serves both).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use pinning::region::RamFile;

use super::MemoryError;

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
    /// memfds (one per shard): shareable with another process (needed by vfio-user devices).
    Memfd,
    /// memfds with transparent huge pages (MADV_HUGEPAGE), where the host's shmem_enabled
    /// allows them: shareable without reserving hugetlb pages.
    #[value(name = "memfd-thp")]
    MemfdThp,
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
            Backing::Thp | Backing::MemfdThp | Backing::Hugetlb => PAGE_2M,
            Backing::Hugetlb1g => PAGE_1G,
        }
    }

    pub fn shareable(self) -> bool {
        matches!(
            self,
            Backing::Memfd | Backing::MemfdThp | Backing::Hugetlb | Backing::Hugetlb1g
        )
    }

    pub fn hugetlb(self) -> bool {
        matches!(self, Backing::Hugetlb | Backing::Hugetlb1g)
    }

    pub fn name(self) -> &'static str {
        match self {
            Backing::Anon => "anon",
            Backing::Thp => "thp",
            Backing::Memfd => "memfd",
            Backing::MemfdThp => "memfd-thp",
            Backing::Hugetlb => "hugetlb",
            Backing::Hugetlb1g => "hugetlb-1g",
        }
    }
}

/// The seals every guest-RAM file carries: its size is fixed for good, punching holes (which
/// teardown does) stays allowed.
pub const RAM_SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// One shard of shareable RAM: a memfd mapped at `offset` in its range. The file is shared
/// with the DMA windows mapped from it, so it closes when the last of them is gone too.
pub(super) struct Shard {
    pub(super) offset: u64,
    pub(super) len: u64,
    pub(super) file: RamFile,
}

/// The host mapping of one RAM range: private memory, or a reserved range with the shards
/// mapped into it. Dropping it unmaps the range, then closes the shards' files (fields drop
/// after `drop` runs), which frees their pages.
pub(super) struct HostRange {
    pub(super) addr: u64,
    pub(super) len: u64,
    pub(super) shards: Vec<Shard>,
}

impl Drop for HostRange {
    fn drop(&mut self) {
        // SAFETY: we created this mapping and every view of it (vm-memory regions built raw,
        // GuestRam) is dropped before the GuestMemory that owns us (field order).
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len as usize) };
    }
}

pub(super) fn check_hugetlb(backing: Backing, size: u64) -> Result<(), MemoryError> {
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

/// Maps a fresh range of `size` bytes for `backing`, in shards of `shard_bytes` when it is
/// shareable (the last one may be shorter).
pub(super) fn map_range(
    backing: Backing,
    size: u64,
    shard_bytes: u64,
) -> Result<HostRange, MemoryError> {
    let err = |op, source| MemoryError::Map {
        op,
        backing,
        size,
        source,
    };
    // Huge pages want aligned memory: map a little more and trim the ends.
    let align = match backing {
        Backing::Anon | Backing::Memfd => PAGE_4K,
        _ => backing.page_size(),
    };
    let slack = align - PAGE_4K;
    // Shareable RAM is only reserved here (PROT_NONE, no memory behind it); the shards are
    // mapped over it below.
    let (prot, flags) = if backing.shareable() {
        (
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
        )
    } else {
        (
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
        )
    };
    // SAFETY: a fresh mapping at a kernel-chosen address aliases nothing we own.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            (size + slack) as usize,
            prot,
            flags,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(err("mmap", std::io::Error::last_os_error()));
    }
    let mut addr = ptr as u64;
    if slack > 0 {
        let aligned = addr.next_multiple_of(align);
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
    let mut range = HostRange {
        addr,
        len: size,
        shards: Vec::new(),
    };
    if backing.shareable() {
        let mut offset = 0;
        while offset < size {
            let len = shard_bytes.min(size - offset);
            range
                .shards
                .push(map_shard(backing, addr + offset, offset, len)?);
            offset += len;
        }
    }
    let advice = match backing {
        Backing::Thp | Backing::MemfdThp => libc::MADV_HUGEPAGE,
        // So that `anon` means 4 KiB pages whatever the host's THP default is.
        Backing::Anon => libc::MADV_NOHUGEPAGE,
        _ => return Ok(range),
    };
    // SAFETY: advice on a mapping we own; it changes no contents.
    if unsafe { libc::madvise(addr as *mut libc::c_void, size as usize, advice) } != 0 {
        return Err(err("madvise", std::io::Error::last_os_error()));
    }
    Ok(range)
}

/// A memfd of `len` bytes mapped shared at `at`, inside a range reserved by [`map_range`].
fn map_shard(backing: Backing, at: u64, offset: u64, len: u64) -> Result<Shard, MemoryError> {
    let err = |op, source| MemoryError::Map {
        op,
        backing,
        size: len,
        source,
    };
    let file = ram_file(backing, len)?;
    // SAFETY: [at, at+len) lies inside a PROT_NONE range this module reserved and owns;
    // MAP_FIXED replaces that reservation and nothing else.
    let ptr = unsafe {
        libc::mmap(
            at as *mut libc::c_void,
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_FIXED,
            file.as_raw_fd(),
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(err("mmap", std::io::Error::last_os_error()));
    }
    Ok(Shard {
        offset,
        len,
        file: RamFile::new(file),
    })
}

/// A fresh memfd of `len` bytes for `backing` (a shareable one), sealed with [`RAM_SEALS`].
pub(super) fn ram_file(backing: Backing, len: u64) -> Result<File, MemoryError> {
    let err = |op, source| MemoryError::Map {
        op,
        backing,
        size: len,
        source,
    };
    let mut flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    if backing.hugetlb() {
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
    file.set_len(len).map_err(|e| err("ftruncate", e))?;
    // SAFETY: F_ADD_SEALS on our own fd takes an int and touches no memory of ours.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, RAM_SEALS) } != 0 {
        return Err(err("fcntl(F_ADD_SEALS)", std::io::Error::last_os_error()));
    }
    Ok(file)
}
