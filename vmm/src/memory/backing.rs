//! What backs guest RAM on the host, and one host mapping of it.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

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

/// One host mapping, unmapped on drop.
pub(super) struct HostMapping {
    pub(super) addr: u64,
    pub(super) len: u64,
    /// The memfd behind a shareable mapping.
    pub(super) file: Option<File>,
}

impl Drop for HostMapping {
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

pub(super) fn map_one(backing: Backing, size: u64) -> Result<HostMapping, MemoryError> {
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
