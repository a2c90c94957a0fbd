//! The pci-epf-test function as the PCI bus sees it: configuration space with its MSI and
//! MSI-X capabilities, and BAR0 with the registers, the MSI-X table and the PBA. A write to
//! COMMAND hands the command to [`super::transfer`].

use std::fmt;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use guest_abi::epf::{caps, reg, CLASS_OTHERS, DEVICE_ID_TI_DRA74X, REG_BAR, VENDOR_ID_TI};

use super::transfer::{Core, IrqLines, IrqSink, State, REG_BLOCK, REG_COUNT};
use crate::pci::config::{
    command as cmd_bits, BarKind, BarSpec, ConfigError, ConfigSpace, PciHeader,
};
use crate::pci::device::{Effects, PciDevice};
use crate::pci::dma::{DmaFault, DmaSpace};
use crate::pci::msi::{MsiCap, MsiError, RoutingChange};
use crate::pci::msix::{MsixCap, MsixError, MsixLocation};
use crate::pci::Bar;

/// The size of [`REG_BAR`]: registers, MSI-X table and PBA in one page.
pub const REG_BAR_SIZE: u64 = 0x1000;
/// Where the MSI-X table starts in the register BAR (after the registers, as pci-epf-test
/// places it).
pub const MSIX_TABLE_OFFSET: u64 = 0x400;
/// Where the MSI-X PBA starts in the register BAR.
pub const MSIX_PBA_OFFSET: u64 = 0x800;
/// Most MSI-X vectors the table area holds.
pub const MAX_MSIX_VECTORS: u16 = ((MSIX_PBA_OFFSET - MSIX_TABLE_OFFSET) / 16) as u16;

/// How many vectors the device offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EpfConfig {
    /// MSI vectors: 1, 2, 4, .. 32 (`pci_endpoint_test` asks for up to 32).
    pub msi_vectors: u16,
    /// MSI-X vectors: 1..=[`MAX_MSIX_VECTORS`].
    pub msix_vectors: u16,
}

impl Default for EpfConfig {
    fn default() -> Self {
        EpfConfig {
            msi_vectors: 32,
            msix_vectors: 32,
        }
    }
}

/// Why the device could not be built.
#[derive(Debug, thiserror::Error)]
pub enum EpfError {
    /// The MSI-X table area in BAR0 is limited.
    #[error("pci-epf-test offers 1 to {MAX_MSIX_VECTORS} MSI-X vectors, not {0}")]
    MsixVectors(u16),
    #[error("building the pci-epf-test register BAR: {0}")]
    Config(#[from] ConfigError),
    #[error("building the pci-epf-test MSI capability: {0}")]
    Msi(#[from] MsiError),
    #[error("building the pci-epf-test MSI-X capability: {0}")]
    Msix(#[from] MsixError),
    #[error("starting the pci-epf-test DMA thread: {0}")]
    Worker(#[source] io::Error),
}

/// The pci-epf-test function.
pub struct EpfTest {
    config: ConfigSpace,
    msi: MsiCap,
    msix: MsixCap,
    core: Arc<Core>,
    worker: Option<JoinHandle<()>>,
}

impl fmt::Debug for EpfTest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.core.lock();
        f.debug_struct("EpfTest")
            .field("config", &self.config)
            .field("regs", &st.regs)
            .field("busy", &st.busy)
            .field("last_fault", &st.last_fault)
            .finish_non_exhaustive()
    }
}

impl Drop for EpfTest {
    fn drop(&mut self) {
        // Stop a running transfer between two chunks, and the thread with it.
        self.core.stop.store(true, Ordering::Release);
        drop(self.core.lock());
        self.core.changed.notify_all();
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

impl EpfTest {
    /// A device that reaches memory through `dma` and raises interrupts into `irq`. It starts
    /// its DMA thread, stopped when the device is dropped.
    pub fn new(
        cfg: EpfConfig,
        dma: Arc<dyn DmaSpace>,
        irq: Box<dyn IrqSink>,
    ) -> Result<Self, EpfError> {
        if cfg.msix_vectors == 0 || cfg.msix_vectors > MAX_MSIX_VECTORS {
            return Err(EpfError::MsixVectors(cfg.msix_vectors));
        }
        let mut config = ConfigSpace::new(&PciHeader {
            vendor_id: VENDOR_ID_TI,
            device_id: DEVICE_ID_TI_DRA74X,
            class_code: CLASS_OTHERS,
            interrupt_pin: 1,
            ..PciHeader::default()
        });
        config.add_bar(
            REG_BAR,
            BarSpec {
                kind: BarKind::Memory32,
                size: REG_BAR_SIZE,
                prefetchable: false,
            },
        )?;
        let msi = MsiCap::add_to(&mut config, cfg.msi_vectors, true)?;
        let msix = MsixCap::add_to(
            &mut config,
            cfg.msix_vectors,
            MsixLocation {
                bar: REG_BAR,
                offset: MSIX_TABLE_OFFSET,
            },
            MsixLocation {
                bar: REG_BAR,
                offset: MSIX_PBA_OFFSET,
            },
        )?;
        let mut regs = [0; REG_COUNT];
        regs[(reg::CAPS / 4) as usize] =
            caps::UNALIGNED_ACCESS | caps::MSI | caps::MSIX | caps::INTX;
        let core = Arc::new(Core::new(regs, irq, dma));
        let worker_core = core.clone();
        let worker = std::thread::Builder::new()
            .name("epf-dma".into())
            .spawn(move || worker_core.run_worker())
            .map_err(EpfError::Worker)?;
        let dev = EpfTest {
            config,
            msi,
            msix,
            core,
            worker: Some(worker),
        };
        dev.sync_lines();
        Ok(dev)
    }

    /// The configuration space (for the VMM to read BARs and identity).
    pub fn config(&self) -> &ConfigSpace {
        &self.config
    }

    /// MSI state (for the VMM to route vectors).
    pub fn msi(&self) -> &MsiCap {
        &self.msi
    }

    /// MSI-X state (for the VMM to route vectors).
    pub fn msix(&self) -> &MsixCap {
        &self.msix
    }

    /// Register at byte offset `at` of BAR0 (0 outside the register block).
    pub fn reg(&self, at: u64) -> u32 {
        self.core.lock().reg(at)
    }

    /// The DMA fault of the last failed command, for diagnostics.
    pub fn last_fault(&self) -> Option<DmaFault> {
        self.core.lock().last_fault
    }

    /// Whether a transfer is running.
    pub fn busy(&self) -> bool {
        self.core.lock().busy
    }

    /// Waits up to `timeout` for the running transfer (and any command queued behind it) to
    /// finish; `true` once nothing runs.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.core.lock();
        while st.busy {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = self
                .core
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }

    /// Hands what configuration space says about bus mastering and interrupts to the side
    /// that does DMA and raises completion interrupts.
    fn sync_lines(&self) {
        let lines = IrqLines {
            intx: self.config.command() & cmd_bits::INTX_DISABLE == 0,
            msi: self.msi.enabled_vectors(),
            msix: if self.msix.enabled() {
                self.msix.num_vectors()
            } else {
                0
            },
        };
        self.core
            .bus_master
            .store(self.config.bus_master(), Ordering::Release);
        self.core.lock().lines = lines;
    }

    fn read_byte(&self, st: &State, at: u64) -> u8 {
        if at < REG_BLOCK {
            (st.regs[(at / 4) as usize] >> (at % 4 * 8)) as u8
        } else if let Some(t) = self.msix.table_offset(REG_BAR, at) {
            let mut b = [0u8];
            self.msix.table_read(t, &mut b);
            b[0]
        } else if let Some(p) = self.msix.pba_offset(REG_BAR, at) {
            let mut b = [0u8];
            self.msix.pba_read(p, &mut b);
            b[0]
        } else {
            0
        }
    }
}

impl PciDevice for EpfTest {
    fn config_read(&mut self, reg: usize) -> u32 {
        self.config.read_reg(reg)
    }

    fn config_write(&mut self, reg: usize, offset: u64, data: &[u8]) -> Effects {
        let bars = self.config.write_reg(reg, offset, data);
        let msi = if self.msi.contains_reg(reg) {
            self.msi.update(&self.config)
        } else {
            RoutingChange::Unchanged
        };
        let msix = if self.msix.contains_reg(reg) {
            self.msix.update(&self.config)
        } else {
            RoutingChange::Unchanged
        };
        self.sync_lines();
        Effects { bars, msi, msix }
    }

    fn bars(&self) -> Vec<Bar> {
        self.config.bars().collect()
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if bar != REG_BAR {
            data.fill(0xff);
            return;
        }
        let st = self.core.lock();
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .map_or(0, |at| self.read_byte(&st, at));
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) -> Effects {
        let mut effects = Effects::default();
        if bar != REG_BAR {
            return effects;
        }
        let mut st = self.core.lock();
        let mut command_written = false;
        for (i, &b) in data.iter().enumerate() {
            let Some(at) = offset.checked_add(i as u64) else {
                break;
            };
            if at < REG_BLOCK {
                // CAPS and the doorbell registers after it are read-only here.
                if at >= reg::CAPS {
                    continue;
                }
                let r = &mut st.regs[(at / 4) as usize];
                let shift = at % 4 * 8;
                *r = (*r & !(0xff << shift)) | (u32::from(b) << shift);
                command_written |= at / 4 == reg::COMMAND / 4;
            } else if let Some(t) = self.msix.table_offset(REG_BAR, at) {
                effects.msix = effects.msix.merge(self.msix.table_write(t, &[b]));
            }
        }
        // While a transfer runs, a new command waits in COMMAND; the DMA thread starts it.
        if command_written && !st.busy {
            self.core.start_pending(&mut st);
        }
        effects
    }
}
