//! The device-fd ioctls issued by hand rather than through `VfioDevice`'s helpers, which log
//! and drop the errno: device and region info, SET_IRQS and reset.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use vfio_bindings::bindings::vfio::{vfio_device_info, vfio_region_info, VFIO_BASE, VFIO_TYPE};
use vfio_ioctls::{VfioDevice, VfioRegionInfoCap};

use crate::vfio::types::{region, MmapArea, RegionInfo};

mod ioctls {
    use super::{VFIO_BASE, VFIO_TYPE};
    vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_GET_INFO, VFIO_TYPE as u32, VFIO_BASE + 7);
    vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_GET_REGION_INFO, VFIO_TYPE as u32, VFIO_BASE + 8);
    vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_SET_IRQS, VFIO_TYPE as u32, VFIO_BASE + 10);
    vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_RESET, VFIO_TYPE as u32, VFIO_BASE + 11);
}

fn check_ret(ret: i32) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Points vectors `0..fds.len()` of interrupt `index` at `fds` (none: acts on all vectors,
/// as `flags` says).
pub(super) fn set_irqs(
    device: &VfioDevice,
    index: u32,
    flags: u32,
    fds: &[RawFd],
) -> io::Result<()> {
    let buf = irq_set(index, flags, fds);
    // SAFETY: buf is a vfio_irq_set header followed by fds.len() u32s, argsz says so, and
    // the kernel only reads it.
    check_ret(unsafe {
        vmm_sys_util::ioctl::ioctl_with_ptr(device, ioctls::VFIO_DEVICE_SET_IRQS(), buf.as_ptr())
    })
}

/// Function-level reset.
pub(super) fn reset(device: &VfioDevice) -> io::Result<()> {
    // SAFETY: VFIO_DEVICE_RESET takes no argument.
    check_ret(unsafe { vmm_sys_util::ioctl::ioctl(device, ioctls::VFIO_DEVICE_RESET()) })
}

/// A `vfio_irq_set` with `fds` as its eventfd data, as u32 words (the struct is five u32s).
fn irq_set(index: u32, flags: u32, fds: &[RawFd]) -> Vec<u32> {
    let argsz = (5 + fds.len()) * 4;
    let mut v = vec![argsz as u32, flags, index, 0, fds.len() as u32];
    v.extend(fds.iter().map(|&fd| fd as u32));
    v
}

pub(super) fn get_device_info(device: &VfioDevice) -> io::Result<vfio_device_info> {
    let mut info = vfio_device_info {
        argsz: std::mem::size_of::<vfio_device_info>() as u32,
        ..Default::default()
    };
    // SAFETY: info is a vfio_device_info with argsz set; the kernel writes within it.
    check_ret(unsafe {
        vmm_sys_util::ioctl::ioctl_with_mut_ref(device, ioctls::VFIO_DEVICE_GET_INFO(), &mut info)
    })?;
    Ok(info)
}

/// Region `index` as the kernel reports it now, with the mmap-able areas vfio-ioctls parsed
/// from its capability chain when it opened the device, and its offset on the device fd.
pub(super) fn get_region_info(
    device: &VfioDevice,
    index: u32,
    num_regions: u32,
) -> io::Result<(RegionInfo, u64)> {
    let mut info = vfio_region_info {
        argsz: std::mem::size_of::<vfio_region_info>() as u32,
        index,
        ..Default::default()
    };
    // SAFETY: info is a vfio_region_info with argsz set; the kernel writes within it (a
    // capability chain that does not fit only raises argsz).
    let ret = unsafe {
        vmm_sys_util::ioctl::ioctl_with_mut_ref(
            device,
            ioctls::VFIO_DEVICE_GET_REGION_INFO(),
            &mut info,
        )
    };
    if ret < 0 {
        let e = io::Error::last_os_error();
        // A region the device does not have (VGA on a non-VGA device): size 0.
        if e.raw_os_error() == Some(libc::EINVAL) {
            return Ok((absent_region(index), 0));
        }
        return Err(e);
    }
    // vfio-ioctls keeps regions in a Vec that skips the ones it failed to query, so find this
    // region's capabilities by its (unique) file offset, not by position.
    // (Flags and offset first: get_region_size logs on an index it does not have.)
    let caps = (0..num_regions)
        .filter(|_| info.size > 0)
        .find(|&i| {
            device.get_region_flags(i) == info.flags
                && device.get_region_offset(i) == info.offset
                && device.get_region_size(i) == info.size
        })
        .map(|i| device.get_region_caps(i))
        .unwrap_or_default();
    let mmap_areas = mmap_areas(info.flags, info.size, &caps);
    let mmap_fd = (!mmap_areas.is_empty()).then(|| (device.as_raw_fd(), info.offset));
    Ok((
        RegionInfo {
            index,
            flags: info.flags,
            size: info.size,
            mmap_areas,
            mmap_fd,
        },
        info.offset,
    ))
}

pub(super) fn absent_region(index: u32) -> RegionInfo {
    RegionInfo {
        index,
        flags: 0,
        size: 0,
        mmap_areas: Vec::new(),
        mmap_fd: None,
    }
}

/// The parts of a region that may be mmap'ed: the sparse-mmap areas if the kernel gave them,
/// else all of it if it is mmap-able at all.
fn mmap_areas(flags: u32, size: u64, caps: &[VfioRegionInfoCap]) -> Vec<MmapArea> {
    if flags & region::FLAG_MMAP == 0 || size == 0 {
        return Vec::new();
    }
    for cap in caps {
        if let VfioRegionInfoCap::SparseMmap(sparse) = cap {
            return sparse
                .areas
                .iter()
                .filter(|a| a.size > 0)
                .map(|a| MmapArea {
                    offset: a.offset,
                    size: a.size,
                })
                .collect();
        }
    }
    vec![MmapArea { offset: 0, size }]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vfio::types::irq;
    use vfio_ioctls::{VfioRegionInfoCapSparseMmap, VfioRegionSparseMmapArea};

    #[test]
    fn irq_set_layout_matches_the_kernel_struct() {
        let v = irq_set(irq::MSIX, 0x24, &[10, 11, 12]);
        assert_eq!(v, vec![32, 0x24, irq::MSIX, 0, 3, 10, 11, 12]);
        assert_eq!(
            std::mem::size_of::<vfio_bindings::bindings::vfio::vfio_irq_set>(),
            20
        );
        assert_eq!(irq_set(irq::INTX, 0x21, &[]), vec![20, 0x21, 0, 0, 0]);
    }

    #[test]
    fn mmap_areas_follow_the_sparse_capability() {
        let all = region::FLAG_READ | region::FLAG_WRITE | region::FLAG_MMAP;
        assert_eq!(
            mmap_areas(all, 0x4000, &[]),
            vec![MmapArea {
                offset: 0,
                size: 0x4000
            }]
        );
        assert!(mmap_areas(region::FLAG_READ, 0x4000, &[]).is_empty());
        let sparse = VfioRegionInfoCap::SparseMmap(VfioRegionInfoCapSparseMmap {
            areas: vec![
                VfioRegionSparseMmapArea {
                    offset: 0,
                    size: 0x2000,
                },
                VfioRegionSparseMmapArea {
                    offset: 0x2000,
                    size: 0,
                },
                VfioRegionSparseMmapArea {
                    offset: 0x3000,
                    size: 0x1000,
                },
            ],
        });
        assert_eq!(
            mmap_areas(all, 0x4000, &[VfioRegionInfoCap::MsixMappable, sparse]),
            vec![
                MmapArea {
                    offset: 0,
                    size: 0x2000
                },
                MmapArea {
                    offset: 0x3000,
                    size: 0x1000
                }
            ]
        );
    }
}
