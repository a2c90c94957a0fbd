//! A host PCI function passed through kernel VFIO, over vfio-ioctls: a type1 container
//! (`/dev/vfio/vfio` + `/dev/vfio/<group>`) or an iommufd IOAS (`/dev/iommu` +
//! `/dev/vfio/devices/vfioN`).
//!
//! Opening is `preflight` (sysfs and /dev checks with a fix in every error, see the `checks` module),
//! then the IOMMU context, then the device, which vfio-ioctls attaches at once: the group is
//! set on the container (and the container's IOMMU type chosen), or the cdev is bound to the
//! iommufd and attached to the IOAS. Only then may guest RAM be mapped through
//! [`IommuContext::pin_backend`]: mapping into an IOAS no device is attached to makes the
//! kernel pin everything again, lazily and on one thread, at attach time.
//!
//! Region access, interrupts and reset are issued here as plain ioctls/pread/pwrite on the
//! device fd instead of through `VfioDevice`'s helpers, which log and drop the errno.

mod checks;

use std::fs::File;
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use vfio_bindings::bindings::vfio::{
    vfio_device_info, vfio_region_info, VFIO_BASE, VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_ACTION_UNMASK, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE, VFIO_TYPE,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioError, VfioIommufd, VfioOps, VfioRegionInfoCap};
use vmm_sys_util::eventfd::EventFd;

use pinning::backend::{DmaMapper, IommufdBackend, Type1Backend, VfioDma};
use pinning::PinBackend;

pub use checks::KernelVfioError;
use checks::{preflight, Access, HostPaths, Preflight};
/// The KVM VFIO pseudo-device (`KVM_DEV_TYPE_VFIO`) the VMM may hand over; see
/// [`IommuContext::new`].
pub use vfio_ioctls::VfioDeviceFd;

use super::backend::{irq, region, IrqInfo, MmapArea, RegionInfo, VfioBackend, VfioBackendError};

/// Which kernel interface owns the device's IOMMU mappings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IommuKind {
    /// A VFIO container with the type1v2 IOMMU (`/dev/vfio/vfio`, one group node per group).
    #[default]
    Type1,
    /// An iommufd IOAS and the device's VFIO cdev (Linux 6.6+ for the cdev).
    Iommufd,
}

impl IommuKind {
    pub fn as_str(self) -> &'static str {
        match self {
            IommuKind::Type1 => "type1",
            IommuKind::Iommufd => "iommufd",
        }
    }
}

impl std::fmt::Display for IommuKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for IommuKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "type1" => Ok(IommuKind::Type1),
            "iommufd" => Ok(IommuKind::Iommufd),
            other => Err(format!(
                "unknown IOMMU interface {other:?} (type1 or iommufd)"
            )),
        }
    }
}

/// The errno inside a vfio-ioctls error, wherever in its source chain it is.
pub(crate) fn vfio_errno(e: &VfioError) -> Option<i32> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(n) = err
            .downcast_ref::<io::Error>()
            .and_then(|e| e.raw_os_error())
        {
            return Some(n);
        }
        if let Some(sys) = err.downcast_ref::<vmm_sys_util::errno::Error>() {
            return Some(sys.errno());
        }
        cur = err.source();
    }
    None
}

/// Turns a failed open of a node into the error that says what to do.
fn open_error(device: &str, step: &'static str, path: &Path, e: VfioError) -> KernelVfioError {
    match vfio_errno(&e) {
        Some(libc::EACCES) | Some(libc::EPERM) => {
            let who = checks::Access::Effective;
            // Re-run the node check: it explains who owns the file and how to get it.
            match checks::check_node(device, path, "", &who) {
                Err(err) => err,
                Ok(()) => KernelVfioError::Open {
                    device: device.to_string(),
                    step,
                    source: e,
                },
            }
        }
        Some(libc::EBUSY) => KernelVfioError::Busy {
            device: device.to_string(),
            path: path.to_path_buf(),
        },
        _ => KernelVfioError::Open {
            device: device.to_string(),
            step,
            source: e,
        },
    }
}

/// A type1 container or an iommufd IOAS: what devices attach to and guest RAM is mapped into.
/// Several devices may share one, so RAM is pinned and mapped once for all of them.
#[derive(Clone)]
pub struct IommuContext {
    kind: IommuKind,
    ops: Arc<dyn VfioOps>,
}

impl IommuContext {
    /// Opens `/dev/vfio/vfio` (type1) or `/dev/iommu` and allocates an IOAS (iommufd).
    /// `kvm_vfio`, the VM's KVM VFIO device, lets KVM know about the group or cdev (the
    /// kernel uses it for non-coherent DMA and on some platforms for interrupts); devices work
    /// without it on x86 hosts with a coherent IOMMU.
    pub fn new(
        kind: IommuKind,
        kvm_vfio: Option<Arc<VfioDeviceFd>>,
    ) -> Result<Self, KernelVfioError> {
        let ops: Arc<dyn VfioOps> = match kind {
            IommuKind::Type1 => {
                let c = VfioContainer::new(kvm_vfio).map_err(|e| {
                    open_error(
                        "VFIO container",
                        "opening /dev/vfio/vfio",
                        Path::new("/dev/vfio/vfio"),
                        e,
                    )
                })?;
                Arc::new(c)
            }
            IommuKind::Iommufd => {
                let fd = iommufd_ioctls::IommuFd::new().map_err(|e| {
                    open_error(
                        "iommufd",
                        "opening /dev/iommu",
                        Path::new("/dev/iommu"),
                        VfioError::NewVfioIommufd(e),
                    )
                })?;
                let i = VfioIommufd::new(Arc::new(fd), None, kvm_vfio).map_err(|e| {
                    KernelVfioError::Open {
                        device: "iommufd".to_string(),
                        step: "allocating an IOAS",
                        source: e,
                    }
                })?;
                Arc::new(i)
            }
        };
        Ok(Self { kind, ops })
    }

    pub fn kind(&self) -> IommuKind {
        self.kind
    }

    /// The container or IOAS as the pinning engine's mapper.
    fn dma_mapper(&self) -> Arc<dyn DmaMapper> {
        Arc::new(VfioDma(self.ops.clone()))
    }

    /// The pin backend that maps guest RAM here. Call it after every device is attached.
    pub fn pin_backend(&self) -> Arc<dyn PinBackend> {
        match self.kind {
            IommuKind::Type1 => Arc::new(Type1Backend::new(
                self.dma_mapper(),
                Type1Backend::host_entry_limit(),
            )),
            IommuKind::Iommufd => Arc::new(IommufdBackend::new(self.dma_mapper())),
        }
    }
}

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

/// A host PCI function opened through kernel VFIO and attached to its IOMMU context.
pub struct KernelVfio {
    name: String,
    // Dropped before `context`: closing the device puts the group / detaches from the IOAS.
    device: VfioDevice,
    context: IommuContext,
    num_regions: u32,
    num_irqs: u32,
    regions: Vec<RegionInfo>,
    /// Where each region starts on the device fd, for pread/pwrite.
    file_offsets: Vec<u64>,
}

impl KernelVfio {
    /// Checks the host, opens a new IOMMU context of kind `iommu` and attaches the device at
    /// `sysfs` (a sysfs path or a PCI address such as `0000:01:00.0`) to it. Map guest RAM
    /// through [`Self::context`] afterwards.
    pub fn open(
        sysfs: &Path,
        iommu: IommuKind,
        kvm_vfio: Option<Arc<VfioDeviceFd>>,
    ) -> Result<Self, KernelVfioError> {
        let pre = preflight(&HostPaths::system(), sysfs, iommu, &Access::Effective)?;
        let context = IommuContext::new(iommu, kvm_vfio)?;
        Self::attach_checked(pre, context)
    }

    /// Checks the host and attaches the device to an existing context (shared with other
    /// devices).
    pub fn attach(sysfs: &Path, context: &IommuContext) -> Result<Self, KernelVfioError> {
        let pre = preflight(
            &HostPaths::system(),
            sysfs,
            context.kind(),
            &Access::Effective,
        )?;
        Self::attach_checked(pre, context.clone())
    }

    fn attach_checked(pre: Preflight, context: IommuContext) -> Result<Self, KernelVfioError> {
        let name = pre.sysfs.display().to_string();
        let node = pre.nodes.last().cloned().unwrap_or_default();
        // attach_ioas = true: the device joins the IOAS now, before any RAM is mapped.
        let device = VfioDevice::new(&pre.sysfs, context.ops.clone(), true)
            .map_err(|e| open_error(&name, "opening the device", &node, e))?;
        let query = |op: &str, source| KernelVfioError::Request {
            device: name.clone(),
            op: op.to_string(),
            source,
        };
        let info = get_device_info(&device).map_err(|e| query("VFIO_DEVICE_GET_INFO", e))?;
        let mut regions = Vec::new();
        let mut file_offsets = Vec::new();
        for index in 0..info.num_regions {
            let (region, offset) = get_region_info(&device, index, info.num_regions)
                .map_err(|e| query("VFIO_DEVICE_GET_REGION_INFO", e))?;
            regions.push(region);
            file_offsets.push(offset);
        }
        tracing::info!(
            "{}: attached through {} ({} regions, {} interrupt indices)",
            pre,
            context.kind(),
            info.num_regions,
            info.num_irqs
        );
        Ok(Self {
            name,
            device,
            context,
            num_regions: info.num_regions,
            num_irqs: info.num_irqs,
            regions,
            file_offsets,
        })
    }

    /// The container or IOAS this device is attached to; map guest RAM through it.
    pub fn context(&self) -> &IommuContext {
        &self.context
    }

    /// The device fd as a `File` for pread/pwrite, without taking it over.
    fn device_file(&self) -> ManuallyDrop<File> {
        // SAFETY: the fd is open while self.device lives, and ManuallyDrop never closes it.
        ManuallyDrop::new(unsafe { File::from_raw_fd(self.device.as_raw_fd()) })
    }

    fn io_err(&self, op: String, source: io::Error) -> VfioBackendError {
        VfioBackendError::Kernel(KernelVfioError::Request {
            device: self.name.clone(),
            op,
            source,
        })
    }

    fn region(&self, index: u32, op: &str) -> Result<&RegionInfo, VfioBackendError> {
        self.regions
            .get(index as usize)
            .filter(|r| r.size > 0)
            .ok_or_else(|| {
                self.io_err(
                    format!("{op} region {index}: no such region"),
                    io::Error::from_raw_os_error(libc::EINVAL),
                )
            })
    }

    /// File offset of `[offset, +len)` inside region `index`, bounds-checked.
    fn file_offset(
        &self,
        index: u32,
        offset: u64,
        len: usize,
        op: &str,
    ) -> Result<u64, VfioBackendError> {
        let r = self.region(index, op)?;
        let end = offset.checked_add(len as u64);
        if end.is_none_or(|end| end > r.size) {
            return Err(self.io_err(
                format!(
                    "{op} region {index} at {offset:#x}+{len:#x}: beyond its {:#x} bytes",
                    r.size
                ),
                io::Error::from_raw_os_error(libc::EINVAL),
            ));
        }
        Ok(self.file_offsets[index as usize] + offset)
    }

    fn set_irqs(&self, index: u32, flags: u32, fds: &[RawFd]) -> io::Result<()> {
        let buf = irq_set(index, flags, fds);
        // SAFETY: buf is a vfio_irq_set header followed by fds.len() u32s, argsz says so, and
        // the kernel only reads it.
        check_ret(unsafe {
            vmm_sys_util::ioctl::ioctl_with_ptr(
                &self.device,
                ioctls::VFIO_DEVICE_SET_IRQS(),
                buf.as_ptr(),
            )
        })
    }
}

/// A `vfio_irq_set` with `fds` as its eventfd data, as u32 words (the struct is five u32s).
fn irq_set(index: u32, flags: u32, fds: &[RawFd]) -> Vec<u32> {
    let argsz = (5 + fds.len()) * 4;
    let mut v = vec![argsz as u32, flags, index, 0, fds.len() as u32];
    v.extend(fds.iter().map(|&fd| fd as u32));
    v
}

fn get_device_info(device: &VfioDevice) -> io::Result<vfio_device_info> {
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
fn get_region_info(
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

fn absent_region(index: u32) -> RegionInfo {
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

impl VfioBackend for KernelVfio {
    fn name(&self) -> &str {
        &self.name
    }

    fn counts(&self) -> Result<(u32, u32), VfioBackendError> {
        Ok((self.num_regions, self.num_irqs))
    }

    fn region_info(&self, index: u32) -> Result<RegionInfo, VfioBackendError> {
        Ok(self
            .regions
            .get(index as usize)
            .cloned()
            .unwrap_or_else(|| absent_region(index)))
    }

    fn region_read(
        &self,
        index: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), VfioBackendError> {
        let at = self.file_offset(index, offset, data.len(), "read")?;
        self.device_file().read_exact_at(data, at).map_err(|e| {
            self.io_err(
                format!(
                    "read of {:#x} bytes at {offset:#x} of region {index}",
                    data.len()
                ),
                e,
            )
        })
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), VfioBackendError> {
        let at = self.file_offset(index, offset, data.len(), "write")?;
        self.device_file().write_all_at(data, at).map_err(|e| {
            self.io_err(
                format!(
                    "write of {:#x} bytes at {offset:#x} of region {index}",
                    data.len()
                ),
                e,
            )
        })
    }

    fn irq_info(&self, index: u32) -> Result<IrqInfo, VfioBackendError> {
        Ok(match self.device.get_irq_info(index) {
            Some(i) => IrqInfo {
                index,
                flags: i.flags,
                count: i.count,
            },
            None => IrqInfo {
                index,
                flags: 0,
                count: 0,
            },
        })
    }

    fn enable_irq(&self, index: u32, fds: &[&EventFd]) -> Result<(), VfioBackendError> {
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
        let op = || format!("VFIO_DEVICE_SET_IRQS index {index}, {} vectors", raw.len());
        match self.set_irqs(index, flags, &raw) {
            Ok(()) => Ok(()),
            // MSI/MSI-X already enabled with fewer vectors: the kernel only swaps eventfds
            // inside the enabled block, so growing it means disabling first.
            Err(e)
                if e.raw_os_error() == Some(libc::EINVAL)
                    && (index == irq::MSI || index == irq::MSIX) =>
            {
                self.set_irqs(
                    index,
                    VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
                    &[],
                )
                .and_then(|()| self.set_irqs(index, flags, &raw))
                .map_err(|e| self.io_err(op(), e))
            }
            Err(e) => Err(self.io_err(op(), e)),
        }
    }

    fn enable_intx(&self, trigger: &EventFd, unmask: &EventFd) -> Result<(), VfioBackendError> {
        self.set_irqs(
            irq::INTX,
            VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
            &[trigger.as_raw_fd()],
        )
        .map_err(|e| self.io_err("VFIO_DEVICE_SET_IRQS INTx trigger".into(), e))?;
        self.set_irqs(
            irq::INTX,
            VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_UNMASK,
            &[unmask.as_raw_fd()],
        )
        .map_err(|e| self.io_err("VFIO_DEVICE_SET_IRQS INTx unmask eventfd".into(), e))
    }

    fn disable_irq(&self, index: u32) -> Result<(), VfioBackendError> {
        self.set_irqs(
            index,
            VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
            &[],
        )
        .map_err(|e| self.io_err(format!("VFIO_DEVICE_SET_IRQS disable index {index}"), e))
    }

    fn reset(&self) -> Result<(), VfioBackendError> {
        // SAFETY: VFIO_DEVICE_RESET takes no argument.
        check_ret(unsafe { vmm_sys_util::ioctl::ioctl(&self.device, ioctls::VFIO_DEVICE_RESET()) })
            .map_err(|e| self.io_err("VFIO_DEVICE_RESET".into(), e))
    }
}

#[cfg(test)]
mod tests;
