//! A vfio-user server as a [`VfioBackend`] (for the passthrough model) and as an
//! [`FdDmaMapper`] (for the pinning engine's vfio-user backend). Both share one [`Client`]:
//! its requests are pipelined, so DMA_MAP messages from every pinning thread are in flight
//! at once.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use pinning::backend::{FdDmaMapper, PeerErrno};
use pinning::region::RamFile;
use vmm_sys_util::eventfd::EventFd;

use super::wire::irq_info_flags;
use super::wire::irq_set::{ACTION_TRIGGER, ACTION_UNMASK, DATA_EVENTFD, DATA_NONE};
use super::{Client, ClientError};
use crate::vfio::types::{irq, IrqInfo, RegionInfo};
use crate::vfio::{VfioBackend, VfioBackendError};

/// A device behind a vfio-user socket.
pub struct UserBackend {
    client: Arc<Client>,
}

impl UserBackend {
    /// Uses `client` (already connected and past version negotiation).
    pub fn new(client: Arc<Client>) -> Self {
        UserBackend { client }
    }
}

impl VfioBackend for UserBackend {
    fn name(&self) -> &str {
        self.client.name()
    }
    fn counts(&self) -> Result<(u32, u32), VfioBackendError> {
        let (_, regions, irqs) = self.client.device_info()?;
        Ok((regions, irqs))
    }
    fn region_info(&self, index: u32) -> Result<RegionInfo, VfioBackendError> {
        Ok(self.client.region_info(index)?)
    }
    fn region_read(
        &self,
        index: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), VfioBackendError> {
        Ok(self.client.region_read(index, offset, data)?)
    }
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), VfioBackendError> {
        Ok(self.client.region_write(index, offset, data)?)
    }
    fn irq_info(&self, index: u32) -> Result<IrqInfo, VfioBackendError> {
        Ok(self.client.irq_info(index)?)
    }
    fn enable_irq(&self, index: u32, fds: &[&EventFd]) -> Result<(), VfioBackendError> {
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let flags = DATA_EVENTFD | ACTION_TRIGGER;
        Ok(self
            .client
            .set_irqs(index, flags, 0, raw.len() as u32, &raw)?)
    }
    fn enable_intx(&self, trigger: &EventFd, unmask: &EventFd) -> Result<(), VfioBackendError> {
        let intx = irq::INTX;
        // An unmask eventfd only means something to a server whose INTx is maskable (the
        // spec ties the MASK/UNMASK actions to VFIO_IRQ_INFO_MASKABLE); one that is not
        // re-arms by itself, and may not tell an unmask fd from a trigger fd.
        let maskable = self.client.irq_info(intx)?.flags & irq_info_flags::MASKABLE != 0;
        self.client.set_irqs(
            intx,
            DATA_EVENTFD | ACTION_TRIGGER,
            0,
            1,
            &[trigger.as_raw_fd()],
        )?;
        if maskable {
            self.client.set_irqs(
                intx,
                DATA_EVENTFD | ACTION_UNMASK,
                0,
                1,
                &[unmask.as_raw_fd()],
            )?;
        }
        Ok(())
    }
    fn disable_irq(&self, index: u32) -> Result<(), VfioBackendError> {
        let flags = DATA_NONE | ACTION_TRIGGER;
        Ok(self.client.set_irqs(index, flags, 0, 0, &[])?)
    }
    fn reset(&self) -> Result<(), VfioBackendError> {
        Ok(self.client.reset()?)
    }
}

impl From<ClientError> for VfioBackendError {
    fn from(e: ClientError) -> Self {
        VfioBackendError::new(e)
    }
}

/// The client's error whole (it names the server and what it said), of the errno's kind.
fn io_error(e: ClientError) -> io::Error {
    match e.errno() {
        Some(errno) if errno != 0 => PeerErrno::into_io(errno, e),
        _ => io::Error::other(e.to_string()),
    }
}

impl FdDmaMapper for UserBackend {
    fn map_fd(&self, iova: u64, size: u64, file: &RamFile, offset: u64) -> io::Result<()> {
        self.client
            .dma_map(iova, size, file.shared(), offset, true, true)
            .map_err(io_error)
    }
    fn unmap(&self, iova: u64, size: u64) -> io::Result<()> {
        match self.client.dma_unmap(iova, size) {
            // The connection is closed (the server died, or this side gave up on it and shut
            // the socket): a server's DMA regions last only as long as its client's connection,
            // so nothing is left to unmap. A server that keeps them anyway is one
            // docs/reliability.md lists as not defended against.
            Err(e) if e.connection_gone() => {
                tracing::debug!("{e}: nothing left to unmap");
                Ok(())
            }
            r => r.map_err(io_error),
        }
    }
}
