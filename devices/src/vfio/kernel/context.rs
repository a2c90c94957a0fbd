//! Where a device's DMA mappings live: a type1 container or an iommufd IOAS, shared by every
//! device attached to it so guest RAM is pinned and mapped once for all of them.

use std::path::Path;
use std::sync::Arc;

use pinning::backend::{DmaMapper, IommufdBackend, Type1Backend, VfioDma};
use pinning::PinBackend;
use vfio_ioctls::{VfioContainer, VfioDeviceFd, VfioError, VfioIommufd, VfioOps};

use super::checks::{open_error, KernelVfioError};
use super::kind::IommuKind;

/// A type1 container or an iommufd IOAS: what devices attach to and guest RAM is mapped into.
/// Several devices may share one, so RAM is pinned and mapped once for all of them.
#[derive(Clone)]
pub struct IommuContext {
    kind: IommuKind,
    pub(super) ops: Arc<dyn VfioOps>,
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
    pub(super) fn dma_mapper(&self) -> Arc<dyn DmaMapper> {
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
