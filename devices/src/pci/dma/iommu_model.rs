//! A [`DmaSpace`] over the pinning crate's IOMMU model, for tests that check a device model
//! reaches exactly what the pinning engine mapped.

use std::fmt;
use std::sync::Arc;

use pinning::model::IommuModel;

use super::{Access, DmaDirection, DmaFault, DmaSpace};

/// The IOMMU page size [`IommuModel`] enforces.
const IOMMU_PAGE: u64 = 4096;

/// DMA through the workspace's [`IommuModel`]: an access is translated page by page, as an
/// IOMMU does, so it succeeds only if every page it touches is mapped.
pub struct IommuDma {
    model: Arc<IommuModel>,
}

impl fmt::Debug for IommuDma {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IommuDma").finish_non_exhaustive()
    }
}

impl IommuDma {
    /// DMA through `model`'s mappings.
    ///
    /// # Safety
    ///
    /// Every host address `model` maps, now or later, must be valid for reads and writes of
    /// the mapping's size for as long as this adapter is used, even after it is unmapped
    /// from the model (a translation may race with an unmap). Guest RAM that outlives the
    /// device satisfies this.
    pub unsafe fn new(model: Arc<IommuModel>) -> Self {
        IommuDma { model }
    }

    fn pieces(
        &self,
        iova: u64,
        len: u64,
        direction: DmaDirection,
    ) -> Result<Vec<(u64, usize)>, DmaFault> {
        let access = Access {
            direction,
            iova,
            len,
        };
        let fault = |at, reason| access.fault(at, reason);
        // The model computes `iova + len` unchecked: refuse wrapping accesses first.
        let end = access.end()?;
        let mut pieces = Vec::new();
        let mut at = iova;
        while at < end {
            let page_end = (at / IOMMU_PAGE + 1).saturating_mul(IOMMU_PAGE);
            let n = page_end.min(end) - at;
            let host = self
                .model
                .translate(at, n)
                .ok_or_else(|| fault(at, "no IOMMU mapping"))?;
            pieces.push((host, n as usize));
            at += n;
        }
        Ok(pieces)
    }
}

impl DmaSpace for IommuDma {
    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaFault> {
        let mut done = 0;
        for (host, n) in self.pieces(iova, buf.len() as u64, DmaDirection::Read)? {
            // SAFETY: `new`'s contract makes every translated host range valid memory.
            unsafe {
                std::ptr::copy_nonoverlapping(host as *const u8, buf[done..].as_mut_ptr(), n)
            };
            done += n;
        }
        Ok(())
    }

    fn write(&self, iova: u64, buf: &[u8]) -> Result<(), DmaFault> {
        let mut done = 0;
        for (host, n) in self.pieces(iova, buf.len() as u64, DmaDirection::Write)? {
            // SAFETY: as in `read`.
            unsafe { std::ptr::copy_nonoverlapping(buf[done..].as_ptr(), host as *mut u8, n) };
            done += n;
        }
        Ok(())
    }
}
