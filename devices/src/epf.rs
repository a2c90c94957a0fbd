//! A model of Linux's pci-epf-test endpoint function, the device the host driver
//! `pci_endpoint_test` (drivers/misc/pci_endpoint_test.c) tests PCI with: a register block in
//! BAR0, commands that DMA to and from host (here: guest) memory, and an interrupt when a
//! command is done.
//!
//! The IDs, register offsets and bit values, the checksum and the WRITE pattern are the guest
//! ABI ([`guest_abi::epf`]), shared with the probe guest that drives this model. Differences
//! from the real endpoint, on purpose:
//! - a command runs synchronously inside the guest's write to COMMAND;
//! - WRITE fills the buffer with a deterministic pattern seeded from the destination address
//!   ([`fill_pattern`], [`guest_abi::epf::pattern`]) instead of random bytes, so runs are
//!   reproducible;
//! - every DMA goes through a [`DmaSpace`], so an address the IOMMU (or the vfio-user DMA
//!   map) does not cover fails the command with SRC/DST_ADDR_INVALID: a missing mapping is a
//!   failed test, not a silent success. DMA also fails while bus mastering is off;
//! - FLAGS.USE_DMA is accepted and ignored (every transfer is DMA here); the doorbell
//!   commands answer with their FAIL status.
//!
//! Interrupts go to an [`IrqSink`] as (type, zero-based vector); the sink owns delivery and
//! masking (irqfds in the VMM, or eventfds of a vfio-user server).

use std::fmt;
use std::sync::Arc;

use guest_abi::epf::{
    caps, command, irq_type, pattern, reg, status, CHECKSUM_SEED, CLASS_OTHERS, CRC32_TABLE,
    DEVICE_ID_TI_DRA74X, REG_BAR, VENDOR_ID_TI,
};

use crate::pci::config::{
    command as cmd_bits, BarKind, BarSpec, ConfigError, ConfigSpace, PciHeader,
};
use crate::pci::device::{Effects, PciDevice};
use crate::pci::dma::{DmaDirection, DmaFault, DmaSpace};
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

/// Registers from MAGIC up to and including CAPS, and the reserved doorbell slots.
const REG_COUNT: usize = 16;
const REG_BLOCK: u64 = REG_COUNT as u64 * 4;
/// DMA is done in pieces of this size, so a guest-chosen SIZE (up to 4 GiB) never makes the
/// VMM allocate more than this.
const DMA_CHUNK: usize = 64 * 1024;

/// An interrupt the device raises. MSI/MSI-X vectors are zero-based (IRQ_NUMBER - 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EpfIrq {
    /// INTA.
    Intx,
    /// MSI vector.
    Msi {
        /// Zero-based vector.
        vector: u16,
    },
    /// MSI-X vector.
    Msix {
        /// Zero-based vector.
        vector: u16,
    },
}

/// Where the device's interrupts go.
pub trait IrqSink: Send {
    /// Delivers `irq` (an edge; INTx as a pulse).
    fn raise(&mut self, irq: EpfIrq);
}

impl<F: FnMut(EpfIrq) + Send> IrqSink for F {
    fn raise(&mut self, irq: EpfIrq) {
        self(irq)
    }
}

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
}

/// Linux's `crc32_le(seed, data)`: the reflected CRC-32 (`guest_abi::epf::CRC32_POLY`) without pre- or
/// post-inversion.
pub fn crc32_le(seed: u32, data: &[u8]) -> u32 {
    data.iter().fold(seed, |crc, &b| {
        CRC32_TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8)
    })
}

/// The CHECKSUM of `data` as pci-epf-test and `pci_endpoint_test` compute it.
pub fn checksum(data: &[u8]) -> u32 {
    crc32_le(CHECKSUM_SEED, data)
}

/// Fills `buf` with bytes `offset..offset + buf.len()` of the pattern WRITE sends to `base`:
/// byte `p` is byte `p % 8` (little-endian) of [`pattern::word`]`(base, p / 8)`.
pub fn fill_pattern(base: u64, offset: u64, buf: &mut [u8]) {
    let word = |index: u64| pattern::word(base, index);
    let mut current = (u64::MAX, [0u8; 8]);
    for (i, b) in buf.iter_mut().enumerate() {
        let p = offset.wrapping_add(i as u64);
        if current.0 != p / 8 {
            current = (p / 8, word(p / 8).to_le_bytes());
        }
        *b = current.1[(p % 8) as usize];
    }
}

/// The pci-epf-test function.
pub struct EpfTest {
    config: ConfigSpace,
    msi: MsiCap,
    msix: MsixCap,
    regs: [u32; REG_COUNT],
    dma: Arc<dyn DmaSpace>,
    irq: Box<dyn IrqSink>,
    last_fault: Option<DmaFault>,
}

impl fmt::Debug for EpfTest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EpfTest")
            .field("config", &self.config)
            .field("regs", &self.regs)
            .field("last_fault", &self.last_fault)
            .finish_non_exhaustive()
    }
}

impl EpfTest {
    /// A device that reaches memory through `dma` and raises interrupts into `irq`.
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
        Ok(EpfTest {
            config,
            msi,
            msix,
            regs,
            dma,
            irq,
            last_fault: None,
        })
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
        self.regs.get((at / 4) as usize).copied().unwrap_or(0)
    }

    /// The DMA fault of the last failed command, for diagnostics.
    pub fn last_fault(&self) -> Option<DmaFault> {
        self.last_fault
    }

    fn set_reg(&mut self, at: u64, v: u32) {
        self.regs[(at / 4) as usize] = v;
    }

    fn addr(&self, lo: u64, hi: u64) -> u64 {
        u64::from(self.reg(hi)) << 32 | u64::from(self.reg(lo))
    }

    fn read_byte(&self, at: u64) -> u8 {
        if at < REG_BLOCK {
            (self.regs[(at / 4) as usize] >> (at % 4 * 8)) as u8
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

    /// Runs the command the guest just wrote, the way pci-epf-test's command handler does.
    fn run_command(&mut self) {
        let cmd = self.reg(reg::COMMAND);
        self.set_reg(reg::COMMAND, 0);
        if cmd == 0 {
            return;
        }
        self.set_reg(reg::STATUS, 0);
        let kind = self.reg(reg::IRQ_TYPE);
        if kind > irq_type::MSIX {
            tracing::debug!(
                kind,
                "pci-epf-test: unknown IRQ type, command {cmd:#x} dropped"
            );
            return;
        }
        let outcome = match cmd {
            command::RAISE_INTX_IRQ => return self.raise(irq_type::INTX),
            command::RAISE_MSI_IRQ => return self.raise(irq_type::MSI),
            command::RAISE_MSIX_IRQ => return self.raise(irq_type::MSIX),
            command::READ => self.do_read(),
            command::WRITE => self.do_write(),
            command::COPY => self.do_copy(),
            command::ENABLE_DOORBELL => status::DOORBELL_ENABLE_FAIL,
            command::DISABLE_DOORBELL => status::DOORBELL_DISABLE_FAIL,
            _ => {
                tracing::debug!("pci-epf-test: invalid command {cmd:#x}");
                return;
            }
        };
        self.set_reg(reg::STATUS, self.reg(reg::STATUS) | outcome);
        self.raise(kind);
    }

    /// Sets IRQ_RAISED and raises interrupt `kind` number IRQ_NUMBER. Like pci-epf-test,
    /// the status bit is set even when the number is out of range and nothing is sent.
    fn raise(&mut self, kind: u32) {
        self.set_reg(reg::STATUS, self.reg(reg::STATUS) | status::IRQ_RAISED);
        let number = self.reg(reg::IRQ_NUMBER);
        let vector =
            |count: u16| (number >= 1 && number <= u32::from(count)).then(|| (number - 1) as u16);
        let irq = match kind {
            irq_type::INTX => {
                let off = self.config.command() & cmd_bits::INTX_DISABLE != 0;
                (!off).then_some(EpfIrq::Intx)
            }
            irq_type::MSI => {
                vector(self.msi.enabled_vectors()).map(|vector| EpfIrq::Msi { vector })
            }
            _ => {
                let count = if self.msix.enabled() {
                    self.msix.num_vectors()
                } else {
                    0
                };
                vector(count).map(|vector| EpfIrq::Msix { vector })
            }
        };
        match irq {
            Some(irq) => self.irq.raise(irq),
            None => tracing::debug!(
                kind,
                number,
                "pci-epf-test: interrupt not enabled or out of range, not raised"
            ),
        }
    }

    fn fault(&mut self, f: DmaFault) {
        tracing::warn!("pci-epf-test: {f}");
        self.last_fault = Some(f);
    }

    /// One DMA chunk: the bus-master check, then the DMA space.
    fn dma(
        &self,
        direction: DmaDirection,
        base: u64,
        done: u64,
        buf: &mut [u8],
    ) -> Result<(), DmaFault> {
        let fault = |fault_iova, reason| DmaFault {
            direction,
            iova: base,
            len: buf.len() as u64,
            fault_iova,
            reason,
        };
        if !self.config.bus_master() {
            return Err(fault(base, "bus mastering is disabled in COMMAND"));
        }
        let at = base
            .checked_add(done)
            .ok_or_else(|| fault(base, "the transfer wraps the address space"))?;
        match direction {
            DmaDirection::Read => self.dma.read(at, buf),
            DmaDirection::Write => self.dma.write(at, buf),
        }
    }

    /// (offset, length) of the DMA pieces of the SIZE register's transfer.
    fn chunks(&self) -> impl Iterator<Item = (u64, usize)> + use<> {
        let size = u64::from(self.reg(reg::SIZE));
        (0..size)
            .step_by(DMA_CHUNK)
            .map(move |done| (done, (size - done).min(DMA_CHUNK as u64) as usize))
    }

    fn buffer(&self) -> Vec<u8> {
        vec![0; (self.reg(reg::SIZE) as usize).min(DMA_CHUNK)]
    }

    fn do_read(&mut self) -> u32 {
        let src = self.addr(reg::SRC_ADDR_LO, reg::SRC_ADDR_HI);
        let mut buf = self.buffer();
        let mut crc = !0;
        for (done, n) in self.chunks() {
            if let Err(f) = self.dma(DmaDirection::Read, src, done, &mut buf[..n]) {
                self.fault(f);
                return status::SRC_ADDR_INVALID | status::READ_FAIL;
            }
            crc = crc32_le(crc, &buf[..n]);
        }
        if crc == self.reg(reg::CHECKSUM) {
            status::READ_SUCCESS
        } else {
            status::READ_FAIL
        }
    }

    fn do_write(&mut self) -> u32 {
        let dst = self.addr(reg::DST_ADDR_LO, reg::DST_ADDR_HI);
        let mut buf = self.buffer();
        let mut crc = !0;
        for (done, n) in self.chunks() {
            fill_pattern(dst, done, &mut buf[..n]);
            crc = crc32_le(crc, &buf[..n]);
            if let Err(f) = self.dma(DmaDirection::Write, dst, done, &mut buf[..n]) {
                self.fault(f);
                return status::DST_ADDR_INVALID | status::WRITE_FAIL;
            }
        }
        self.set_reg(reg::CHECKSUM, crc);
        status::WRITE_SUCCESS
    }

    fn do_copy(&mut self) -> u32 {
        let src = self.addr(reg::SRC_ADDR_LO, reg::SRC_ADDR_HI);
        let dst = self.addr(reg::DST_ADDR_LO, reg::DST_ADDR_HI);
        let mut buf = self.buffer();
        for (done, n) in self.chunks() {
            if let Err(f) = self.dma(DmaDirection::Read, src, done, &mut buf[..n]) {
                self.fault(f);
                return status::SRC_ADDR_INVALID | status::COPY_FAIL;
            }
            if let Err(f) = self.dma(DmaDirection::Write, dst, done, &mut buf[..n]) {
                self.fault(f);
                return status::DST_ADDR_INVALID | status::COPY_FAIL;
            }
        }
        status::COPY_SUCCESS
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
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .map_or(0, |at| self.read_byte(at));
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) -> Effects {
        let mut effects = Effects::default();
        if bar != REG_BAR {
            return effects;
        }
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
                let r = &mut self.regs[(at / 4) as usize];
                let shift = at % 4 * 8;
                *r = (*r & !(0xff << shift)) | (u32::from(b) << shift);
                command_written |= at / 4 == reg::COMMAND / 4;
            } else if let Some(t) = self.msix.table_offset(REG_BAR, at) {
                effects.msix = effects.msix.merge(self.msix.table_write(t, &[b]));
            }
        }
        if command_written {
            self.run_command();
        }
        effects
    }
}

#[cfg(test)]
mod tests;
