//! A host PCI function passed through kernel VFIO, over vfio-ioctls: a type1 container
//! (`/dev/vfio/vfio` + `/dev/vfio/<group>`) or an iommufd IOAS (`/dev/iommu` +
//! `/dev/vfio/devices/vfioN`).
//!
//! Opening is `preflight` (the `checks` module: sysfs and /dev checks with a fix in every
//! error), then the [`IommuContext`], then the device, which vfio-ioctls attaches at once: the
//! group is set on the container (and the container's IOMMU type chosen), or the cdev is bound
//! to the iommufd and attached to the IOAS. Only then may guest RAM be mapped through
//! [`IommuContext::pin_backend`]: mapping into an IOAS no device is attached to makes the
//! kernel pin everything again, lazily and on one thread, at attach time.
//!
//! Region access, interrupts and reset are plain ioctls (the `ioctl` module) and pread/pwrite
//! on the device fd instead of `VfioDevice`'s helpers, which log and drop the errno.

mod checks;
mod context;
mod ioctl;
mod kind;

use std::fs::File;
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_UNMASK, VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE,
};
use vfio_ioctls::VfioDevice;
use vmm_sys_util::eventfd::EventFd;

pub use checks::KernelVfioError;
use checks::{open_error, preflight, Access, HostPaths, Preflight};
pub use context::IommuContext;
use ioctl::{absent_region, get_device_info, get_region_info};
pub use kind::IommuKind;
/// The KVM VFIO pseudo-device (`KVM_DEV_TYPE_VFIO`) the VMM may hand over; see
/// [`IommuContext::new`].
pub use vfio_ioctls::VfioDeviceFd;

use super::backend::{VfioBackend, VfioBackendError};
use super::types::{irq, IrqInfo, RegionInfo};

impl From<KernelVfioError> for VfioBackendError {
    fn from(e: KernelVfioError) -> Self {
        VfioBackendError::new(e)
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
        KernelVfioError::Request {
            device: self.name.clone(),
            op,
            source,
        }
        .into()
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
        ioctl::set_irqs(&self.device, index, flags, fds)
    }
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
        ioctl::reset(&self.device).map_err(|e| self.io_err("VFIO_DEVICE_RESET".into(), e))
    }
}

#[cfg(test)]
mod tests;
