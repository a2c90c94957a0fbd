use vfio_ioctls::VfioError;

use super::checks::{open_error, vfio_errno};
use super::*;
use crate::vfio::types::region;

#[test]
fn iommu_kind_parses_its_names() {
    assert_eq!("type1".parse::<IommuKind>().unwrap(), IommuKind::Type1);
    assert_eq!("iommufd".parse::<IommuKind>().unwrap(), IommuKind::Iommufd);
    assert!("vfio".parse::<IommuKind>().is_err());
    assert_eq!(IommuKind::Iommufd.to_string(), "iommufd");
}

#[test]
fn errno_is_found_in_the_source_chain() {
    let e = VfioError::OpenGroup(io::Error::from_raw_os_error(libc::EBUSY), "7".into());
    assert_eq!(vfio_errno(&e), Some(libc::EBUSY));
    let e = VfioError::IommuDmaMap(vmm_sys_util::errno::Error::new(libc::ENOSPC));
    assert_eq!(vfio_errno(&e), Some(libc::ENOSPC));
    let e = VfioError::NewVfioIommufd(iommufd_ioctls::IommufdError::IommuIoasAlloc(
        vmm_sys_util::errno::Error::new(libc::ENOMEM),
    ));
    assert_eq!(vfio_errno(&e), Some(libc::ENOMEM));
    assert_eq!(vfio_errno(&VfioError::GroupViable), None);
}

#[test]
fn busy_group_is_reported_as_busy() {
    let e = VfioError::OpenGroup(io::Error::from_raw_os_error(libc::EBUSY), "7".into());
    let err = open_error("0000:01:00.0", "open", Path::new("/dev/vfio/7"), e);
    assert!(matches!(err, KernelVfioError::Busy { .. }), "{err}");
    assert!(err.to_string().contains("another process"), "{err}");
}

#[test]
fn opening_a_missing_device_fails_before_touching_vfio() {
    let err = KernelVfio::open(
        Path::new("/nonexistent/sys/bus/pci/devices/0000:ff:1f.7"),
        IommuKind::Type1,
        None,
    )
    .err()
    .expect("a device that does not exist cannot open");
    assert!(matches!(err, KernelVfioError::NoSuchDevice { .. }), "{err}");
}

/// `VMM_TEST_VFIO_DEVICE` (sysfs path or address of a device bound to vfio-pci) and
/// `VMM_TEST_VFIO_IOMMU` (type1, the default, or iommufd).
fn test_device() -> (std::path::PathBuf, IommuKind) {
    let dev = std::env::var_os("VMM_TEST_VFIO_DEVICE").expect(
        "set VMM_TEST_VFIO_DEVICE to a device bound to vfio-pci, e.g. \
         /sys/bus/pci/devices/0000:01:00.0 (see docs/real-host.md)",
    );
    let iommu = std::env::var("VMM_TEST_VFIO_IOMMU")
        .map(|s| s.parse().expect("VMM_TEST_VFIO_IOMMU: type1 or iommufd"))
        .unwrap_or_default();
    (dev.into(), iommu)
}

#[test]
#[ignore = "needs /dev/vfio and an IOMMU"]
fn real_device_config_space_has_a_vendor_id() {
    let (dev, iommu) = test_device();
    let vfio = KernelVfio::open(&dev, iommu, None).unwrap_or_else(|e| panic!("{e}"));
    let (regions, irqs) = vfio.counts().unwrap();
    assert!(regions > region::CONFIG, "{regions} regions");
    assert!(irqs > irq::MSIX, "{irqs} interrupt indices");
    let config = vfio.region_info(region::CONFIG).unwrap();
    assert!(
        config.size >= 256,
        "config space of {:#x} bytes",
        config.size
    );
    let mut id = [0u8; 4];
    vfio.region_read(region::CONFIG, 0, &mut id).unwrap();
    let vendor = u16::from_le_bytes([id[0], id[1]]);
    let device = u16::from_le_bytes([id[2], id[3]]);
    assert!(
        vendor != 0xffff && vendor != 0,
        "vendor ID {vendor:#06x}: the device did not answer"
    );
    let sysfs_vendor = std::fs::read_to_string(Path::new(vfio.name()).join("vendor")).unwrap();
    assert_eq!(
        u16::from_str_radix(sysfs_vendor.trim().trim_start_matches("0x"), 16).unwrap(),
        vendor
    );
    eprintln!("{}: {vendor:04x}:{device:04x}", vfio.name());
    // Reading past the end is refused, not truncated.
    let mut b = [0u8; 4];
    assert!(vfio
        .region_read(region::CONFIG, config.size - 2, &mut b)
        .is_err());
}

#[test]
#[ignore = "needs /dev/vfio and an IOMMU"]
fn real_device_dma_map_and_unmap_after_attach() {
    let (dev, iommu) = test_device();
    let vfio = KernelVfio::open(&dev, iommu, None).unwrap_or_else(|e| panic!("{e}"));
    let len = 2 << 20;
    // SAFETY: a fresh anonymous mapping, only handed to the IOMMU and then unmapped.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
            -1,
            0,
        )
    };
    assert_ne!(addr, libc::MAP_FAILED);
    let mapper = vfio.context().dma_mapper();
    let iova = 1 << 30;
    mapper
        .map(iova, len as u64, addr as u64)
        .unwrap_or_else(|e| panic!("map of 2 MiB (is `ulimit -l` at least 2 MiB?): {e}"));
    // The same IOVA again overlaps: refused (type1 says EEXIST).
    let again = mapper
        .map(iova, len as u64, addr as u64)
        .expect_err("mapping the same IOVA twice must fail");
    if iommu == IommuKind::Type1 {
        assert_eq!(again.raw_os_error(), Some(libc::EEXIST), "{again}");
    }
    mapper.unmap(iova, len as u64).unwrap();
    // SAFETY: unmapped from the IOMMU above; nothing else refers to it.
    unsafe { libc::munmap(addr, len) };
    vfio.reset().ok();
}
