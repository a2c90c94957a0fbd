//! The pci-epf-test model ([`EpfTest`]) as a vfio-user device; the process entry point
//! behind `vmm device epf` (`--socket PATH` or `--socket-fd N`) is in the `process` module.
//!
//! Region 7 is configuration space and region 0 the register BAR, both through
//! `PciDevice`; the client (the VMM's passthrough model) writes configuration space through,
//! so the model's own MSI/MSI-X enable checks see what the guest did. Interrupts go to the
//! eventfds the client gave with SET_IRQS; the client traps the MSI-X table itself, so
//! masking is its business and every raised vector is signalled.

mod process;

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, PoisonError};

pub use process::{on_listening, run_epf_server, run_epf_server_on_fd, EpfServerError};

use super::server::UserDevice;
use super::wire::{irq_info_flags, irq_set};
use crate::epf::{EpfConfig, EpfError, EpfIrq, EpfTest, REG_BAR_SIZE};
use crate::pci::config::CONFIG_SPACE_SIZE;
use crate::pci::device::PciDevice;
use crate::pci::dma::MappedRegions;
use crate::vfio::types::{irq, region, IrqInfo, RegionInfo};
use guest_abi::epf::REG_BAR;

/// Regions of a VFIO PCI device: BAR0-5, ROM, config, VGA.
const NUM_REGIONS: u32 = 9;
/// Interrupt indices of a VFIO PCI device: INTx, MSI, MSI-X, ERR, REQ.
const NUM_IRQS: u32 = 5;

/// Eventfds per interrupt index, as the client set them.
#[derive(Default)]
struct IrqFds {
    intx: Vec<Option<File>>,
    msi: Vec<Option<File>>,
    msix: Vec<Option<File>>,
}

impl IrqFds {
    fn slots(&mut self, index: u32) -> Option<&mut Vec<Option<File>>> {
        match index {
            irq::INTX => Some(&mut self.intx),
            irq::MSI => Some(&mut self.msi),
            irq::MSIX => Some(&mut self.msix),
            _ => None,
        }
    }
}

/// Signals an eventfd once. A full counter (EAGAIN on a non-blocking eventfd) means the
/// interrupt is pending already, which is fine.
fn signal(f: &File) {
    let mut f = f;
    if let Err(e) = f.write_all(&1u64.to_ne_bytes()) {
        if e.kind() != io::ErrorKind::WouldBlock {
            crate::warn_limited!("pci-epf-test: signalling an interrupt eventfd: {e}");
        }
    }
}

/// [`EpfTest`] served over vfio-user.
pub struct EpfUserDevice {
    dev: EpfTest,
    cfg: EpfConfig,
    regions: Arc<MappedRegions>,
    irqs: Arc<Mutex<IrqFds>>,
}

impl std::fmt::Debug for EpfUserDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EpfUserDevice")
            .field("dev", &self.dev)
            .finish_non_exhaustive()
    }
}

impl EpfUserDevice {
    /// A device offering `cfg`'s vectors that does all DMA through `regions` (give the same
    /// object to [`super::serve`]).
    pub fn new(cfg: EpfConfig, regions: Arc<MappedRegions>) -> Result<Self, EpfError> {
        let irqs: Arc<Mutex<IrqFds>> = Arc::default();
        let dev = Self::build(cfg, &regions, &irqs)?;
        let mut me = EpfUserDevice {
            dev,
            cfg,
            regions,
            irqs,
        };
        me.size_irq_tables();
        Ok(me)
    }

    fn build(
        cfg: EpfConfig,
        regions: &Arc<MappedRegions>,
        irqs: &Arc<Mutex<IrqFds>>,
    ) -> Result<EpfTest, EpfError> {
        let sink_irqs = irqs.clone();
        let sink = move |irq: EpfIrq| {
            let fds = sink_irqs.lock().unwrap_or_else(PoisonError::into_inner);
            let slot = match irq {
                EpfIrq::Intx => fds.intx.first(),
                EpfIrq::Msi { vector } => fds.msi.get(usize::from(vector)),
                EpfIrq::Msix { vector } => fds.msix.get(usize::from(vector)),
            };
            match slot.and_then(Option::as_ref) {
                Some(f) => signal(f),
                None => tracing::debug!("pci-epf-test: {irq:?} has no eventfd, dropped"),
            }
        };
        EpfTest::new(cfg, regions.clone(), Box::new(sink))
    }

    fn size_irq_tables(&mut self) {
        let counts = [
            (irq::INTX, 1usize),
            (irq::MSI, usize::from(self.dev.msi().supported_vectors())),
            (irq::MSIX, usize::from(self.dev.msix().num_vectors())),
        ];
        let mut fds = self.irqs.lock().unwrap_or_else(PoisonError::into_inner);
        for (index, n) in counts {
            if let Some(slots) = fds.slots(index) {
                slots.resize_with(n, || None);
            }
        }
    }

    fn vectors(&self, index: u32) -> Option<u32> {
        match index {
            irq::INTX => Some(1),
            irq::MSI => Some(u32::from(self.dev.msi().supported_vectors())),
            irq::MSIX => Some(u32::from(self.dev.msix().num_vectors())),
            // ERR and REQ exist but offer no vectors.
            3 | 4 => Some(0),
            _ => None,
        }
    }

    /// Checks that `[offset, offset + len)` lies inside a region of `size` bytes.
    fn check(size: u64, offset: u64, len: usize) -> Result<(), i32> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= size => Ok(()),
            _ => Err(libc::EINVAL),
        }
    }

    fn config_read(&mut self, offset: u64, data: &mut [u8]) {
        let mut done = 0;
        while done < data.len() {
            let at = offset as usize + done;
            let reg = at / 4;
            let shift = at % 4;
            let n = (4 - shift).min(data.len() - done);
            let value = self.dev.config_read(reg).to_le_bytes();
            data[done..done + n].copy_from_slice(&value[shift..shift + n]);
            done += n;
        }
    }

    /// Config writes go to the model as 4-, 2- or 1-byte accesses inside one dword, the only
    /// shapes `PciDevice::config_write` takes.
    fn config_write(&mut self, offset: u64, data: &[u8]) {
        let mut done = 0;
        while done < data.len() {
            let at = offset as usize + done;
            let left = data.len() - done;
            let n = if at % 4 == 0 && left >= 4 {
                4
            } else if at % 2 == 0 && left >= 2 {
                2
            } else {
                1
            };
            let _ = self
                .dev
                .config_write(at / 4, (at % 4) as u64, &data[done..done + n]);
            done += n;
        }
    }
}

impl UserDevice for EpfUserDevice {
    fn device_info(&self) -> (u32, u32) {
        (NUM_REGIONS, NUM_IRQS)
    }

    fn region_info(&self, index: u32) -> Result<RegionInfo, i32> {
        let size = match index {
            region::CONFIG => CONFIG_SPACE_SIZE as u64,
            i if i == REG_BAR as u32 => REG_BAR_SIZE,
            i if i < NUM_REGIONS => 0,
            _ => return Err(libc::EINVAL),
        };
        Ok(RegionInfo::trapped(index, size))
    }

    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), i32> {
        match index {
            region::CONFIG => {
                Self::check(CONFIG_SPACE_SIZE as u64, offset, data.len())?;
                self.config_read(offset, data);
            }
            i if i == REG_BAR as u32 => {
                Self::check(REG_BAR_SIZE, offset, data.len())?;
                self.dev.bar_read(REG_BAR, offset, data);
            }
            _ => Self::check(0, offset, data.len())?,
        }
        Ok(())
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), i32> {
        match index {
            region::CONFIG => {
                Self::check(CONFIG_SPACE_SIZE as u64, offset, data.len())?;
                self.config_write(offset, data);
            }
            i if i == REG_BAR as u32 => {
                Self::check(REG_BAR_SIZE, offset, data.len())?;
                // A command starts inside this write and raises its interrupt on the
                // eventfds when done: here, or later from the model's DMA thread.
                let _ = self.dev.bar_write(REG_BAR, offset, data);
            }
            _ => Self::check(0, offset, data.len())?,
        }
        Ok(())
    }

    fn irq_info(&self, index: u32) -> Result<IrqInfo, i32> {
        let count = self.vectors(index).ok_or(libc::EINVAL)?;
        let flags = match index {
            irq::INTX => irq_info_flags::EVENTFD,
            irq::MSI | irq::MSIX => irq_info_flags::EVENTFD | irq_info_flags::NORESIZE,
            _ => 0,
        };
        Ok(IrqInfo {
            index,
            flags,
            count,
        })
    }

    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: Vec<OwnedFd>,
    ) -> Result<(), i32> {
        let vectors = self.vectors(index).ok_or(libc::EINVAL)?;
        let data = flags & irq_set::DATA_MASK;
        let action = flags & irq_set::ACTION_MASK_ALL;
        if action != irq_set::ACTION_TRIGGER {
            // INTx here is a pulse that needs no unmask; accept the VMM's resample fd and
            // mask requests so a level-triggered setup works, and ignore them.
            return if index == irq::INTX {
                Ok(())
            } else {
                Err(libc::ENOTSUP)
            };
        }
        let mut table = self.irqs.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(slots) = table.slots(index) else {
            // ERR/REQ: only "disable all" makes sense.
            return if data == irq_set::DATA_NONE && count == 0 {
                Ok(())
            } else {
                Err(libc::EINVAL)
            };
        };
        if data == irq_set::DATA_NONE && count == 0 {
            slots.iter_mut().for_each(|s| *s = None);
            return Ok(());
        }
        let end = start.checked_add(count).ok_or(libc::EINVAL)?;
        if end > vectors {
            return Err(libc::EINVAL);
        }
        let range = start as usize..end as usize;
        match data {
            irq_set::DATA_NONE => {
                // The client fires the vectors itself.
                for f in slots[range].iter().flatten() {
                    signal(f);
                }
            }
            irq_set::DATA_EVENTFD if fds.is_empty() => {
                slots[range].iter_mut().for_each(|s| *s = None);
            }
            irq_set::DATA_EVENTFD => {
                if fds.len() != range.len() {
                    return Err(libc::EINVAL);
                }
                for (slot, fd) in slots[range].iter_mut().zip(fds) {
                    *slot = Some(File::from(fd));
                }
            }
            _ => return Err(libc::ENOTSUP),
        }
        Ok(())
    }

    fn reset(&mut self) -> Result<(), i32> {
        // A fresh model is the reset state; the client's eventfds and DMA mappings stay, as
        // they do across a VFIO device reset.
        self.dev = Self::build(self.cfg, &self.regions, &self.irqs).map_err(|e| {
            tracing::warn!("pci-epf-test: reset: {e}");
            libc::EIO
        })?;
        Ok(())
    }
}
