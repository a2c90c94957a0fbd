//! Guest RAM mapped for every backing, its shards, seals and refusals, and its NUMA binding.

use super::*;
use layout::{GIB, MIB};
use vm_memory::{Bytes, GuestAddress};

fn spec(backing: Backing, shard_bytes: Option<u64>) -> MemorySpec {
    MemorySpec {
        backing,
        shard_bytes,
        host_numa_node: None,
    }
}

#[test]
fn every_backing_that_needs_no_reservation_maps_and_is_usable() {
    for backing in [Backing::Anon, Backing::Thp, Backing::Memfd] {
        // RAM on both sides of the 32-bit hole.
        let layout = MemoryLayout::new(3 * GIB + 4 * MIB).unwrap();
        let m = GuestMemory::new(MemorySpec::new(backing), layout.ram()).unwrap();
        assert_eq!(m.size(), 3 * GIB + 4 * MIB);
        m.mem
            .write_obj(0xdead_beef_u32, GuestAddress((1 << 32) + 16))
            .unwrap();
        assert_eq!(
            m.mem.read_obj::<u32>(GuestAddress((1 << 32) + 16)).unwrap(),
            0xdead_beef
        );
        assert_eq!(m.ram.size(), 3 * GIB + 4 * MIB);
        // One vm-memory region (so one KVM slot) per RAM range, whatever the shards.
        assert_eq!(m.mem.iter().count(), 2);
        // Shareable: 1 GiB shards, the last of the high range 4 MiB.
        let shards = if backing.shareable() { 4 } else { 0 };
        assert_eq!(m.files().count(), shards);
        assert_eq!(m.ram.regions().len(), shards.max(2));
        for r in m.ram.regions() {
            assert_eq!(r.host_addr % backing.page_size(), 0);
        }
    }
}

#[test]
fn shards_lie_back_to_back_in_one_host_range_per_ram_range() {
    let layout = MemoryLayout::new(6 * GIB).unwrap();
    let m = GuestMemory::new(spec(Backing::Memfd, Some(512 * MIB)), layout.ram()).unwrap();
    assert_eq!(m.files().count(), 12);
    assert_eq!(m.shard_bytes(), 512 * MIB);
    let regions = m.ram.regions();
    assert_eq!(regions.len(), 12);
    for w in regions.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        assert_eq!(a.size, 512 * MIB);
        if a.guest_addr + a.size == b.guest_addr {
            // Same RAM range: contiguous on the host too, each its own file at offset 0.
            assert_eq!(a.host_addr + a.size, b.host_addr);
        } else {
            assert_eq!((a.guest_addr + a.size, b.guest_addr), (3 * GIB, 4 * GIB));
        }
        let (a_file, b_file) = (a.file.as_ref().unwrap(), b.file.as_ref().unwrap());
        assert_ne!(a_file.0, b_file.0);
        assert_eq!(b_file.1, 0);
    }
    // An access across a shard boundary reaches both files, as one contiguous range.
    let at = GuestAddress(512 * MIB - 2);
    m.mem.write_obj(0x1122_3344_u32, at).unwrap();
    assert_eq!(m.mem.read_obj::<u32>(at).unwrap(), 0x1122_3344);
    let second = &regions[1];
    // SAFETY: a live, populated mapping of this test's guest memory.
    let byte = unsafe { *(second.host_addr as *const u8) };
    assert_eq!(byte, 0x22);
}

/// `file` carries exactly the guest-RAM seals: it can neither shrink nor grow, and holes
/// can still be punched in it (as `release` does).
fn assert_sealed(backing: Backing, file: &std::fs::File) {
    // SAFETY: F_GET_SEALS on an open fd of ours; it only returns an int.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    assert_eq!(seals, backing::RAM_SEALS, "{backing:?}");
    let len = file.metadata().unwrap().len();
    let page = backing.page_size();
    for to in [0, len - page, len + page] {
        let e = file.set_len(to).unwrap_err();
        assert_eq!(
            e.raw_os_error(),
            Some(libc::EPERM),
            "{backing:?} to {to:#x}: {e}"
        );
    }
    assert_eq!(file.metadata().unwrap().len(), len);
    let hole = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: punching a hole in a file only this test uses.
    let punched = unsafe { libc::fallocate(file.as_raw_fd(), hole, 0, page as libc::off_t) };
    assert_eq!(
        punched,
        0,
        "{backing:?}: {}",
        std::io::Error::last_os_error()
    );
}

#[test]
fn every_guest_ram_file_is_sealed_against_shrinking_and_growing() {
    // Sizing a hugetlbfs file reserves no huge page, so its seals are checked on any host
    // that knows the page size.
    let mut backings = vec![Backing::Memfd, Backing::MemfdThp, Backing::Hugetlb];
    if Path::new("/sys/kernel/mm/hugepages/hugepages-1048576kB").exists() {
        backings.push(Backing::Hugetlb1g);
    }
    for backing in backings {
        let file = backing::ram_file(backing, 2 * GIB).unwrap();
        assert_sealed(backing, &file);
    }
    let m = GuestMemory::new(
        spec(Backing::Memfd, Some(32 * MIB)),
        MemoryLayout::new(64 * MIB).unwrap().ram(),
    )
    .unwrap();
    assert_eq!(m.files().count(), 2);
    for f in m.files() {
        assert_sealed(Backing::Memfd, f.shared());
    }
}

#[test]
fn the_default_shard_is_a_gib_clamped_to_small_guests() {
    let ram = |size| MemoryLayout::new(size).unwrap().ram().to_vec();
    let memfd = MemorySpec::new(Backing::Memfd);
    assert_eq!(memfd.shard_bytes(&ram(256 * MIB)), 256 * MIB);
    assert_eq!(memfd.shards(&ram(256 * MIB)), 1);
    assert_eq!(memfd.shard_bytes(&ram(6 * GIB)), GIB);
    assert_eq!(memfd.shards(&ram(6 * GIB)), 6);
    // The 3 GiB below the hole and 2 MiB above it.
    assert_eq!(memfd.shards(&ram(3 * GIB + 2 * MIB)), 4);
    assert_eq!(MemorySpec::new(Backing::Anon).shards(&ram(6 * GIB)), 0);
}

#[test]
fn bad_shards_and_forbidden_huge_pages_are_refused_before_mapping() {
    let ram = MemoryLayout::new(6 * GIB).unwrap().ram().to_vec();
    let thp = ThpPolicy::read(Path::new("/nonexistent"));
    let check = |s: MemorySpec| s.check_with(&ram, &thp, 1024).err().unwrap();
    assert!(matches!(
        check(spec(Backing::Memfd, Some(3 * GIB))),
        MemoryError::ShardNotPowerOfTwo(_)
    ));
    assert!(matches!(
        check(spec(Backing::Memfd, Some(2048))),
        MemoryError::ShardBelowPage { .. }
    ));
    assert!(matches!(
        check(spec(Backing::Hugetlb, Some(MIB))),
        MemoryError::ShardBelowPage { .. }
    ));
    let e = check(spec(Backing::Memfd, Some(4 * GIB)));
    assert!(e.to_string().contains("give 3 GiB or less"), "{e}");
    assert!(matches!(
        check(spec(Backing::Anon, Some(GIB))),
        MemoryError::ShardNotShareable { .. }
    ));
    let e = spec(Backing::Memfd, Some(4 * MIB))
        .check_with(&ram, &thp, 1024)
        .err()
        .unwrap();
    assert!(
        matches!(e, MemoryError::TooManyShards { shards: 1536, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("ulimit -n"), "{e}");
    let e = check(MemorySpec::new(Backing::MemfdThp));
    assert!(e.to_string().contains("shmem_enabled"), "{e}");
    assert_eq!(pinning::Classify::class(&e), ErrorClass::User);
    assert!(MemorySpec::new(Backing::Memfd)
        .check_with(&ram, &thp, 1024)
        .is_ok());
}

#[test]
fn hugetlb_without_reserved_pages_says_how_to_reserve() {
    let free: u64 =
        std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
    let want = ((free + 1) * 2 * MIB).max(64 * MIB);
    let e = GuestMemory::new(
        MemorySpec::new(Backing::Hugetlb),
        MemoryLayout::new(want).unwrap().ram(),
    )
    .err()
    .expect("more than is free");
    assert!(e.to_string().contains("nr_hugepages"), "{e}");
}

#[test]
fn sizes_that_split_a_page_or_exceed_the_host_are_refused() {
    let e = GuestMemory::new(
        MemorySpec::new(Backing::Thp),
        MemoryLayout::new(64 * MIB + 4096).unwrap().ram(),
    )
    .err()
    .unwrap();
    assert!(matches!(e, MemoryError::NotPageMultiple { .. }), "{e}");
    let e = GuestMemory::new(
        MemorySpec::new(Backing::Anon),
        MemoryLayout::new(1 << 50).unwrap().ram(),
    )
    .err()
    .unwrap();
    assert!(matches!(e, MemoryError::MoreThanHost { .. }), "{e}");
}

/// Backings this host can map without help: hugetlb ones where enough pages are free.
fn bindable_backings(size: u64) -> Vec<Backing> {
    let mut b = vec![Backing::Anon, Backing::Thp, Backing::Memfd];
    if ThpPolicy::host().shmem_allowed() {
        b.push(Backing::MemfdThp);
    }
    for h in [Backing::Hugetlb, Backing::Hugetlb1g] {
        if size % h.page_size() == 0 && check_hugetlb(h, size).is_ok() {
            b.push(h);
        }
    }
    b
}

#[test]
fn every_backing_is_bound_before_it_is_touched_and_fills_on_its_node() {
    let layout = MemoryLayout::new(64 * MIB).unwrap();
    for backing in bindable_backings(64 * MIB) {
        let spec = MemorySpec {
            host_numa_node: Some(0),
            ..spec(backing, Some(32 * MIB).filter(|_| backing.shareable()))
        };
        let m = GuestMemory::new(spec, layout.ram()).unwrap();
        // Bound, and nothing touched yet (MPOL_MF_STRICT would have refused a stray page).
        for r in m.ram.regions() {
            let p = numa::Policy::at(r.host_addr).unwrap();
            assert_eq!(p.describe(), "bind 0", "{backing:?}");
        }
        let before = m.placement(layout.ram(), 2 * MIB, 1 << 16).unwrap();
        assert_eq!((before.sampled, before.not_present), (0, 32), "{backing:?}");
        for addr in (0..64 * MIB).step_by(4096) {
            m.mem.write_obj(1u8, GuestAddress(addr)).unwrap();
        }
        let after = m.placement(layout.ram(), 2 * MIB, 1 << 16).unwrap();
        assert_eq!(after.sampled, 32, "{backing:?}: {after:?}");
        assert_eq!(after.on(&[0]), 32, "{backing:?}: {after:?}");
    }
}

#[test]
fn a_memfd_binding_is_the_files_so_another_mapping_of_it_has_it_too() {
    let spec = MemorySpec {
        host_numa_node: Some(0),
        ..spec(Backing::Memfd, Some(32 * MIB))
    };
    let m = GuestMemory::new(spec, MemoryLayout::new(64 * MIB).unwrap().ram()).unwrap();
    let file = m.files().next().unwrap().shared();
    // SAFETY: a fresh shared mapping of our own memfd at a kernel-chosen address.
    let other = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            (32 * MIB) as usize,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    assert_ne!(other, libc::MAP_FAILED);
    let p = numa::Policy::at(other as u64);
    // SAFETY: unmapping the mapping made above, not used after this.
    unsafe { libc::munmap(other, (32 * MIB) as usize) };
    assert_eq!(p.unwrap().describe(), "bind 0");
}

#[test]
fn unbound_memory_keeps_the_default_policy_and_a_missing_node_is_named() {
    let layout = MemoryLayout::new(64 * MIB).unwrap();
    let m = GuestMemory::new(MemorySpec::new(Backing::Anon), layout.ram()).unwrap();
    let addr = m.ram.regions()[0].host_addr;
    assert_eq!(numa::Policy::at(addr).unwrap().mode, "default");
    let absent = (1..64).find(|&n| !numa::node_exists(n)).unwrap();
    for backing in [Backing::Anon, Backing::Memfd] {
        let e = GuestMemory::new(
            MemorySpec {
                host_numa_node: Some(absent),
                ..MemorySpec::new(backing)
            },
            layout.ram(),
        )
        .err()
        .expect("no such node");
        assert!(
            matches!(e, MemoryError::NoSuchNode { node, .. } if node == absent),
            "{e}"
        );
        assert!(
            e.to_string()
                .starts_with(&format!("host NUMA node {absent}:")),
            "{e}"
        );
        assert_eq!(pinning::Classify::class(&e), ErrorClass::User);
    }
}
