use std::os::fd::AsRawFd;

use pinning::backend::DmaMapper;
use pinning::model::IommuModel;

use super::*;

const SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// A memfd of `len` bytes, then `seals` added (none: 0).
fn memfd(len: libc::off_t, seals: libc::c_int) -> std::os::fd::OwnedFd {
    // SAFETY: a plain memfd_create call with a valid NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"dma-test".as_ptr(), libc::MFD_ALLOW_SEALING) };
    assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
    // SAFETY: `fd` was just created and is owned by nobody else.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: `fd` is a valid memfd.
    assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), len) }, 0);
    // SAFETY: F_ADD_SEALS on our own fd takes an int and touches no memory.
    let sealed = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) };
    assert_eq!(sealed, 0, "F_ADD_SEALS: {}", io::Error::last_os_error());
    fd
}

#[test]
fn anonymous_regions_round_trip() {
    let dma = MappedRegions::new();
    dma.insert_anonymous(0x10000, 0x2000, DmaProt::READ_WRITE)
        .unwrap();
    dma.write(0x11ff0, &[7; 16]).unwrap();
    let mut buf = [0u8; 20];
    dma.read(0x11fec, &mut buf).unwrap();
    assert_eq!(&buf[..4], &[0; 4]);
    assert_eq!(&buf[4..], &[7; 16]);
    assert_eq!(dma.regions(), [(0x10000, 0x2000)]);
}

#[test]
fn unmapped_and_straddling_accesses_fault_and_transfer_nothing() {
    let dma = MappedRegions::new();
    dma.insert_anonymous(0x10000, 0x1000, DmaProt::READ_WRITE)
        .unwrap();
    // Entirely outside.
    let err = dma.write(0x20000, &[1; 4]).unwrap_err();
    assert_eq!(err.fault_iova, 0x20000);
    assert_eq!(err.direction, DmaDirection::Write);
    // Before the start.
    let mut buf = [0u8; 8];
    assert_eq!(dma.read(0xfffc, &mut buf).unwrap_err().fault_iova, 0xfffc);
    // Straddling the end: faults at the first unmapped byte and writes nothing.
    let err = dma.write(0x10ffc, &[9; 8]).unwrap_err();
    assert_eq!(err.fault_iova, 0x11000);
    assert_eq!(
        err.to_string(),
        "DMA write of 0x8 byte(s) at IOVA 0x10ffc faulted at 0x11000: not mapped"
    );
    dma.read(0x10ff8, &mut buf).unwrap();
    assert_eq!(buf, [0; 8]);
    // Wrapping the address space.
    let err = dma.read(u64::MAX - 2, &mut buf).unwrap_err();
    assert_eq!(err.reason, "the access wraps the IOVA space");
    // A zero-length access touches nothing and succeeds anywhere.
    dma.read(0x90000, &mut []).unwrap();
}

#[test]
fn adjacent_regions_join_and_gaps_fault() {
    let dma = MappedRegions::new();
    dma.insert_anonymous(0x1000, 0x1000, DmaProt::READ_WRITE)
        .unwrap();
    dma.insert_anonymous(0x2000, 0x1000, DmaProt::READ_WRITE)
        .unwrap();
    dma.insert_anonymous(0x4000, 0x1000, DmaProt::READ_WRITE)
        .unwrap();
    let data: Vec<u8> = (0..32).collect();
    dma.write(0x1ff0, &data).unwrap();
    let mut back = vec![0u8; 32];
    dma.read(0x1ff0, &mut back).unwrap();
    assert_eq!(back, data);
    // 0x3000..0x4000 is a hole.
    let err = dma.write(0x2ff0, &data).unwrap_err();
    assert_eq!(err.fault_iova, 0x3000);
}

#[test]
fn map_rules() {
    let dma = MappedRegions::new();
    dma.insert_anonymous(0x10000, 0x1000, DmaProt::READ_WRITE)
        .unwrap();
    assert!(matches!(
        dma.insert_anonymous(0x10800, 0x1000, DmaProt::READ_WRITE),
        Err(DmaMapError::Overlap {
            existing: 0x10000,
            ..
        })
    ));
    assert!(matches!(
        dma.insert_anonymous(0xf000, 0x1001, DmaProt::READ_WRITE),
        Err(DmaMapError::Overlap { .. })
    ));
    assert!(matches!(
        dma.insert_anonymous(0x20000, 0, DmaProt::READ_WRITE),
        Err(DmaMapError::InvalidRange { .. })
    ));
    assert!(matches!(
        dma.insert_anonymous(u64::MAX - 0xfff, 0x1000, DmaProt::READ_WRITE),
        Err(DmaMapError::InvalidRange { .. })
    ));
    assert!(matches!(
        dma.remove(0x10000, 0x800),
        Err(DmaMapError::NotMapped { .. })
    ));
    dma.remove(0x10000, 0x1000).unwrap();
    assert!(dma.regions().is_empty());
    let mut b = [0u8; 1];
    assert!(dma.read(0x10000, &mut b).is_err());
}

#[test]
fn read_only_regions_refuse_device_writes() {
    let dma = MappedRegions::new();
    dma.insert_anonymous(0x10000, 0x1000, DmaProt::READ_ONLY)
        .unwrap();
    let mut b = [0u8; 4];
    dma.read(0x10000, &mut b).unwrap();
    let err = dma.write(0x10000, &b).unwrap_err();
    assert_eq!(err.reason, "the mapping does not allow it");
}

#[test]
fn memfd_regions_share_memory_with_their_owner() {
    let fd = memfd(0x3000, SEALS);
    let dma = MappedRegions::new();
    // The second page of the memfd at IOVA 0x8000_0000.
    use std::os::fd::AsFd;
    dma.insert_fd(0x8000_0000, 0x1000, fd.as_fd(), 0x1000, DmaProt::READ_WRITE)
        .unwrap();
    dma.write(0x8000_0010, b"hello").unwrap();
    let mut back = [0u8; 5];
    // SAFETY: reading 5 bytes of the memfd at 0x1010 into our buffer.
    let n = unsafe { libc::pread(fd.as_raw_fd(), back.as_mut_ptr().cast(), back.len(), 0x1010) };
    assert_eq!(n, 5);
    assert_eq!(&back, b"hello");
}

/// Found by the `vfio_user_server` fuzz target: a DMA_MAP whose range ran past the end of
/// its memfd was mapped, and the epf device's next DMA there killed the server with SIGBUS.
#[test]
fn regions_past_the_end_of_their_file_are_refused() {
    let fd = memfd(0x2000, SEALS);
    use std::os::fd::AsFd;
    let dma = MappedRegions::new();
    for (len, offset) in [(0x2000, 0x1000), (0x3000, 0), (0x1000, u64::MAX - 0xfff)] {
        let err = dma
            .insert_fd(0x10_0000, len, fd.as_fd(), offset, DmaProt::READ_WRITE)
            .unwrap_err();
        assert!(
            matches!(
                err,
                DmaMapError::PastEnd {
                    file_len: 0x2000,
                    ..
                }
            ),
            "{len:#x} at {offset:#x}: {err}"
        );
    }
    assert!(dma.regions().is_empty());
    // All of the file, or its last page, is fine; so is DMA to its last byte.
    dma.insert_fd(0x10_0000, 0x2000, fd.as_fd(), 0, DmaProt::READ_WRITE)
        .unwrap();
    dma.insert_fd(0x20_0000, 0x1000, fd.as_fd(), 0x1000, DmaProt::READ_WRITE)
        .unwrap();
    dma.write(0x10_1fff, &[1]).unwrap();
    dma.write(0x20_0fff, &[2]).unwrap();
}

/// A file its sender can still shrink would turn the next DMA into a SIGBUS once it did, so
/// it is refused whatever the range; so is a file that takes no seals at all.
#[test]
fn files_not_sealed_against_shrinking_are_refused() {
    use std::os::fd::AsFd;
    let dma = MappedRegions::new();
    let grow_only = memfd(0x2000, libc::F_SEAL_GROW);
    let unsealed = memfd(0x2000, 0);
    for (fd, why) in [
        (grow_only.as_fd(), "not sealed against shrinking"),
        (unsealed.as_fd(), "not sealed against shrinking"),
    ] {
        let err = dma
            .insert_fd(0x10_0000, 0x1000, fd, 0, DmaProt::READ_WRITE)
            .unwrap_err();
        assert!(matches!(err, DmaMapError::Unsealed { .. }), "{err}");
        assert!(err.to_string().contains(why), "{err}");
        assert!(err.to_string().contains("F_SEAL_SHRINK"), "{err}");
    }
    // A file on a disk filesystem: no seals to ask for.
    let on_disk = std::fs::File::open(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")).unwrap();
    let err = dma
        .insert_fd(0x10_0000, 0x1000, on_disk.as_fd(), 0, DmaProt::READ_ONLY)
        .unwrap_err();
    assert!(err.to_string().contains("takes no seals"), "{err}");
    assert!(dma.regions().is_empty());
    // Shrink-sealed alone is enough.
    let shrink_only = memfd(0x2000, libc::F_SEAL_SHRINK);
    dma.insert_fd(
        0x10_0000,
        0x1000,
        shrink_only.as_fd(),
        0,
        DmaProt::READ_WRITE,
    )
    .unwrap();
}

#[test]
fn iommu_model_adapter_translates_per_page() {
    let mut mem = vec![0u8; 0x4000];
    // Page-align the host side as the model demands.
    let base = (mem.as_mut_ptr() as u64 + 0xfff) & !0xfff;
    let model = Arc::new(IommuModel::new(16, None));
    model.map(0x10_0000, 0x1000, base).unwrap();
    model.map(0x10_1000, 0x1000, base + 0x2000).unwrap();
    // SAFETY: both mappings point into `mem`, which outlives `dma` and is only accessed
    // through `dma` meanwhile.
    let dma = unsafe { IommuDma::new(model.clone()) };
    // Crosses from the first mapping into the second, whose host page is not adjacent.
    dma.write(0x10_0ffe, &[1, 2, 3, 4]).unwrap();
    let mut back = [0u8; 4];
    dma.read(0x10_0ffe, &mut back).unwrap();
    assert_eq!(back, [1, 2, 3, 4]);
    let off = (base - mem.as_ptr() as u64) as usize;
    assert_eq!(&mem[off + 0xffe..off + 0x1000], &[1, 2]);
    assert_eq!(&mem[off + 0x2000..off + 0x2002], &[3, 4]);
    // Past the second mapping, and wrapping.
    let err = dma.write(0x10_1ffe, &[0; 4]).unwrap_err();
    assert_eq!(err.fault_iova, 0x10_2000);
    assert!(dma.read(u64::MAX - 1, &mut back).is_err());
    assert!(dma.read(u64::MAX - 3, &mut back).is_err());
}
