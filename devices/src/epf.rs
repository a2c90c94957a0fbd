//! A model of Linux's pci-epf-test endpoint function, the device the host driver
//! `pci_endpoint_test` (drivers/misc/pci_endpoint_test.c) tests PCI with: a register block in
//! BAR0, commands that DMA to and from host (here: guest) memory, and an interrupt when a
//! command is done.
//!
//! Register offsets and bit values are those of the Linux sources; the IDs are TI DRA74x
//! (0x104c:0xb500), which `pci_endpoint_test` binds with the register block in BAR0 and MSI
//! as the default interrupt. Differences from the real endpoint, on purpose:
//! - a command runs synchronously inside the guest's write to COMMAND;
//! - WRITE fills the buffer with a deterministic pattern seeded from the destination address
//!   ([`fill_pattern`]) instead of random bytes, so runs are reproducible;
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

use crate::pci::config::{
    command as cmd_bits, BarKind, BarSpec, ConfigError, ConfigSpace, PciHeader,
};
use crate::pci::device::{Effects, PciDevice};
use crate::pci::dma::{DmaDirection, DmaFault, DmaSpace};
use crate::pci::msi::{MsiCap, MsiError, RoutingChange};
use crate::pci::msix::{MsixCap, MsixError, MsixLocation};
use crate::pci::Bar;

/// Register offsets in BAR0 (Linux `PCI_ENDPOINT_TEST_*`).
pub mod reg {
    /// Scratch register the host's BAR test writes and reads back.
    pub const MAGIC: u64 = 0x00;
    /// Command to run ([`super::command`]); reads 0 once taken.
    pub const COMMAND: u64 = 0x04;
    /// Result of the last command ([`super::status`]).
    pub const STATUS: u64 = 0x08;
    /// Source address, low 32 bits.
    pub const SRC_ADDR_LO: u64 = 0x0c;
    /// Source address, high 32 bits.
    pub const SRC_ADDR_HI: u64 = 0x10;
    /// Destination address, low 32 bits.
    pub const DST_ADDR_LO: u64 = 0x14;
    /// Destination address, high 32 bits.
    pub const DST_ADDR_HI: u64 = 0x18;
    /// Transfer size in bytes.
    pub const SIZE: u64 = 0x1c;
    /// CRC32 (Linux `crc32_le(~0, ..)`) of the data: input to READ, output of WRITE.
    pub const CHECKSUM: u64 = 0x20;
    /// Interrupt type to raise when a transfer is done ([`super::irq_type`]).
    pub const IRQ_TYPE: u64 = 0x24;
    /// Interrupt number, 1-based for MSI/MSI-X.
    pub const IRQ_NUMBER: u64 = 0x28;
    /// Transfer flags ([`super::flags`]).
    pub const FLAGS: u64 = 0x2c;
    /// What the endpoint supports ([`super::caps`]); read-only.
    pub const CAPS: u64 = 0x30;
}

/// COMMAND values (one bit per command).
pub mod command {
    /// Raise the INTx interrupt.
    pub const RAISE_INTX_IRQ: u32 = 1 << 0;
    /// Raise MSI number IRQ_NUMBER.
    pub const RAISE_MSI_IRQ: u32 = 1 << 1;
    /// Raise MSI-X number IRQ_NUMBER.
    pub const RAISE_MSIX_IRQ: u32 = 1 << 2;
    /// Read SIZE bytes at SRC_ADDR and compare their CRC with CHECKSUM.
    pub const READ: u32 = 1 << 3;
    /// Write SIZE bytes at DST_ADDR and put their CRC in CHECKSUM.
    pub const WRITE: u32 = 1 << 4;
    /// Copy SIZE bytes from SRC_ADDR to DST_ADDR.
    pub const COPY: u32 = 1 << 5;
    /// Set up a doorbell (not supported here: answered with DOORBELL_ENABLE_FAIL).
    pub const ENABLE_DOORBELL: u32 = 1 << 6;
    /// Tear a doorbell down (answered with DOORBELL_DISABLE_FAIL).
    pub const DISABLE_DOORBELL: u32 = 1 << 7;
}

/// STATUS bits.
pub mod status {
    /// READ found the expected checksum.
    pub const READ_SUCCESS: u32 = 1 << 0;
    /// READ failed (DMA fault or checksum mismatch).
    pub const READ_FAIL: u32 = 1 << 1;
    /// WRITE done.
    pub const WRITE_SUCCESS: u32 = 1 << 2;
    /// WRITE failed.
    pub const WRITE_FAIL: u32 = 1 << 3;
    /// COPY done.
    pub const COPY_SUCCESS: u32 = 1 << 4;
    /// COPY failed.
    pub const COPY_FAIL: u32 = 1 << 5;
    /// The interrupt for the command was raised.
    pub const IRQ_RAISED: u32 = 1 << 6;
    /// The source address could not be reached.
    pub const SRC_ADDR_INVALID: u32 = 1 << 7;
    /// The destination address could not be reached.
    pub const DST_ADDR_INVALID: u32 = 1 << 8;
    /// Doorbell set-up failed.
    pub const DOORBELL_ENABLE_FAIL: u32 = 1 << 11;
    /// Doorbell tear-down failed.
    pub const DOORBELL_DISABLE_FAIL: u32 = 1 << 13;
}

/// IRQ_TYPE values.
pub mod irq_type {
    /// Legacy INTx.
    pub const INTX: u32 = 0;
    /// MSI.
    pub const MSI: u32 = 1;
    /// MSI-X.
    pub const MSIX: u32 = 2;
}

/// FLAGS bits.
pub mod flags {
    /// Use the endpoint's DMA engine rather than memcpy through a window (same thing here).
    pub const USE_DMA: u32 = 1 << 0;
}

/// CAPS bits.
pub mod caps {
    /// Transfers need no particular alignment, so the host need not pad its buffers.
    pub const UNALIGNED_ACCESS: u32 = 1 << 0;
    /// MSI is available.
    pub const MSI: u32 = 1 << 1;
    /// MSI-X is available.
    pub const MSIX: u32 = 1 << 2;
    /// INTx is available.
    pub const INTX: u32 = 1 << 3;
}

/// Texas Instruments.
pub const VENDOR_ID_TI: u16 = 0x104c;
/// TI DRA74x, in `pci_endpoint_test`'s ID table with the registers in BAR0.
pub const DEVICE_ID_TI_DRA74X: u16 = 0xb500;
/// Class "other" (base class 0xff), as pci-epf-test's header says.
pub const CLASS_OTHERS: u32 = 0xff_00_00;
/// The BAR with the register block.
pub const REG_BAR: usize = 0;
/// Its size: registers, MSI-X table and PBA in one page.
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
    /// Building BAR0 failed.
    #[error("building the pci-epf-test register BAR")]
    Config(#[from] ConfigError),
    /// Building the MSI capability failed.
    #[error("building the pci-epf-test MSI capability")]
    Msi(#[from] MsiError),
    /// Building the MSI-X capability failed.
    #[error("building the pci-epf-test MSI-X capability")]
    Msix(#[from] MsixError),
}

/// Linux's `crc32_le(seed, data)`: the reflected CRC-32 (polynomial 0xedb88320) without pre-
/// or post-inversion. pci-epf-test and its host driver use `crc32_le(~0, ..)`, which is the
/// bitwise NOT of the usual CRC-32.
pub fn crc32_le(seed: u32, data: &[u8]) -> u32 {
    data.iter().fold(seed, |crc, &b| {
        CRC_TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8)
    })
}

/// The CHECKSUM of `data` as pci-epf-test and `pci_endpoint_test` compute it.
pub fn checksum(data: &[u8]) -> u32 {
    crc32_le(!0, data)
}

const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fills `buf` with bytes `offset..offset + buf.len()` of the pattern WRITE sends to `base`:
/// byte `p` is byte `p % 8` (little-endian) of `splitmix64(base ^ (p / 8) * φ)`, with
/// φ = 0x9e3779b97f4a7c15. Deterministic, so a guest or test can predict it.
pub fn fill_pattern(base: u64, offset: u64, buf: &mut [u8]) {
    let word = |index: u64| splitmix64(base ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15));
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

    /// The configuration space, for the VMM acting as firmware (placing BARs).
    pub fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
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
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::pci::config::{cap_id, offset};
    use crate::pci::dma::{DmaProt, IommuDma, MappedRegions};

    /// Guest RAM the device may reach.
    const RAM: u64 = 0x1000_0000;
    const RAM_LEN: u64 = 0x10_0000;

    struct Rig {
        dev: EpfTest,
        mem: Arc<MappedRegions>,
        irqs: Arc<Mutex<Vec<EpfIrq>>>,
    }

    fn rig_with(cfg: EpfConfig) -> Rig {
        let mem = Arc::new(MappedRegions::new());
        mem.insert_anonymous(RAM, RAM_LEN, DmaProt::READ_WRITE)
            .unwrap();
        let irqs: Arc<Mutex<Vec<EpfIrq>>> = Arc::default();
        let sink = irqs.clone();
        let dev = EpfTest::new(
            cfg,
            mem.clone(),
            Box::new(move |irq: EpfIrq| sink.lock().unwrap().push(irq)),
        )
        .unwrap();
        let mut rig = Rig { dev, mem, irqs };
        // What pci_endpoint_test's probe does: memory decode and bus mastering on, MSI on.
        rig.cfg_write16(
            offset::COMMAND,
            cmd_bits::MEMORY_SPACE | cmd_bits::BUS_MASTER,
        );
        rig.enable_msi(5); // MME = 5: 32 vectors
        rig
    }

    fn rig() -> Rig {
        rig_with(EpfConfig::default())
    }

    impl Rig {
        fn cfg_write16(&mut self, at: usize, v: u16) -> Effects {
            self.dev
                .config_write(at / 4, (at % 4) as u64, &v.to_le_bytes())
        }

        fn cfg_write32(&mut self, at: usize, v: u32) -> Effects {
            self.dev.config_write(at / 4, 0, &v.to_le_bytes())
        }

        fn enable_msi(&mut self, mme: u16) -> Effects {
            let at = self.dev.msi().offset();
            self.cfg_write32(at + 4, 0xfee0_0000);
            self.cfg_write16(at + 0xc, 0x40);
            self.cfg_write16(at + 2, 1 | mme << 4)
        }

        fn enable_msix(&mut self) -> Effects {
            let at = self.dev.msix().offset();
            self.cfg_write16(at + 2, 1 << 15)
        }

        fn write(&mut self, r: u64, v: u32) -> Effects {
            self.dev.bar_write(REG_BAR, r, &v.to_le_bytes())
        }

        fn read(&mut self, r: u64) -> u32 {
            let mut b = [0u8; 4];
            self.dev.bar_read(REG_BAR, r, &mut b);
            u32::from_le_bytes(b)
        }

        fn transfer(&mut self, command: u32, src: u64, dst: u64, size: u32) -> u32 {
            self.write(reg::SRC_ADDR_LO, src as u32);
            self.write(reg::SRC_ADDR_HI, (src >> 32) as u32);
            self.write(reg::DST_ADDR_LO, dst as u32);
            self.write(reg::DST_ADDR_HI, (dst >> 32) as u32);
            self.write(reg::SIZE, size);
            self.write(reg::COMMAND, command);
            self.read(reg::STATUS)
        }

        fn irqs(&self) -> Vec<EpfIrq> {
            std::mem::take(&mut *self.irqs.lock().unwrap())
        }

        fn mem_read(&self, iova: u64, len: usize) -> Vec<u8> {
            let mut v = vec![0u8; len];
            self.mem.read(iova, &mut v).unwrap();
            v
        }
    }

    #[test]
    fn crc32_matches_linux_convention() {
        // The usual CRC-32 of "123456789" is 0xcbf43926; Linux crc32_le(~0) leaves it
        // un-inverted.
        assert_eq!(checksum(b"123456789"), !0xcbf4_3926);
        assert_eq!(checksum(b""), 0xffff_ffff);
        assert_eq!(
            !checksum(b"The quick brown fox jumps over the lazy dog"),
            0x414f_a339
        );
        // Incremental equals one-shot.
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        assert_eq!(
            crc32_le(crc32_le(!0, &data[..333]), &data[333..]),
            checksum(&data)
        );
    }

    #[test]
    fn pattern_is_deterministic_and_chunk_independent() {
        let mut whole = vec![0u8; 100];
        fill_pattern(0x1234, 0, &mut whole);
        let mut parts = vec![0u8; 100];
        fill_pattern(0x1234, 0, &mut parts[..13]);
        fill_pattern(0x1234, 13, &mut parts[13..]);
        assert_eq!(whole, parts);
        let mut other = vec![0u8; 100];
        fill_pattern(0x1238, 0, &mut other);
        assert_ne!(whole, other, "seeded from the address");
        assert!(whole.iter().any(|&b| b != whole[0]));
    }

    #[test]
    fn identity_bars_and_capabilities() {
        let mut r = rig();
        let d = &mut r.dev;
        assert_eq!(d.config_read(0), 0xb500_104c);
        assert_eq!(d.config_read(2) >> 8, CLASS_OTHERS);
        assert_eq!(d.config().read_u8(offset::INTERRUPT_PIN), 1);
        // BAR0 sizes as a 4 KiB 32-bit non-prefetchable memory BAR.
        d.config_write(4, 0, &u32::MAX.to_le_bytes());
        assert_eq!(d.config_read(4), 0xffff_f000);
        let caps = d.config().capabilities();
        assert_eq!(
            caps.iter().map(|c| c.0).collect::<Vec<_>>(),
            [cap_id::MSI, cap_id::MSIX]
        );
        // MSI-X: 32 entries, table at BAR0+0x400, PBA at BAR0+0x800.
        let msix = caps[1].1;
        assert_eq!(d.config().read_u16(msix + 2) & 0x7ff, 31);
        assert_eq!(d.config().read_u32(msix + 4), 0x400);
        assert_eq!(d.config().read_u32(msix + 8), 0x800);
        assert_eq!(d.bars().len(), 1);
        // Bad vector counts are refused.
        let mem = Arc::new(MappedRegions::new());
        for cfg in [
            EpfConfig {
                msi_vectors: 32,
                msix_vectors: 65,
            },
            EpfConfig {
                msi_vectors: 32,
                msix_vectors: 0,
            },
            EpfConfig {
                msi_vectors: 3,
                msix_vectors: 1,
            },
        ] {
            assert!(EpfTest::new(cfg, mem.clone(), Box::new(|_: EpfIrq| {})).is_err());
        }
    }

    #[test]
    fn registers_read_and_write() {
        let mut r = rig();
        // The host's BAR test: a pattern to MAGIC reads back.
        r.write(reg::MAGIC, 0xa0a0_a0a0);
        assert_eq!(r.read(reg::MAGIC), 0xa0a0_a0a0);
        for at in [
            reg::SRC_ADDR_LO,
            reg::SRC_ADDR_HI,
            reg::DST_ADDR_LO,
            reg::DST_ADDR_HI,
            reg::SIZE,
            reg::CHECKSUM,
            reg::IRQ_TYPE,
            reg::IRQ_NUMBER,
            reg::FLAGS,
        ] {
            r.write(at, 0x1234_5678 ^ at as u32);
            assert_eq!(r.read(at), 0x1234_5678 ^ at as u32, "register {at:#x}");
        }
        // CAPS is read-only; the doorbell slots after it read 0.
        let caps = caps::UNALIGNED_ACCESS | caps::MSI | caps::MSIX | caps::INTX;
        assert_eq!(r.read(reg::CAPS), caps);
        r.write(reg::CAPS, 0);
        r.write(0x34, 7);
        assert_eq!(r.read(reg::CAPS), caps);
        assert_eq!(r.read(0x34), 0);
        // Narrow and unaligned accesses.
        r.dev.bar_write(REG_BAR, reg::MAGIC + 1, &[0x55, 0x66]);
        assert_eq!(r.read(reg::MAGIC), 0xa066_55a0);
        let mut w = [0u8; 2];
        r.dev.bar_read(REG_BAR, reg::MAGIC + 2, &mut w);
        assert_eq!(w, [0x66, 0xa0]);
        // An 8-byte access covers two registers.
        r.dev
            .bar_write(REG_BAR, reg::SIZE, &0x0000_0002_0000_0001u64.to_le_bytes());
        assert_eq!((r.read(reg::SIZE), r.read(reg::CHECKSUM)), (1, 2));
        // Outside the registers and the MSI-X areas: zeros; other BARs: all ones.
        assert_eq!(r.read(0x100), 0);
        assert_eq!(r.read(0xffc), 0);
        let mut b = [0u8; 4];
        r.dev.bar_read(2, 0, &mut b);
        assert_eq!(b, [0xff; 4]);
        assert!(r.dev.bar_write(2, 0, &[1]).is_empty());
        // Past the end of the BAR, even at the top of the offset space, nothing panics.
        r.dev.bar_write(REG_BAR, u64::MAX - 1, &[1, 2, 3, 4]);
        r.dev.bar_read(REG_BAR, u64::MAX - 1, &mut b);
        assert_eq!(r.dev.reg(0x1000), 0);
    }

    #[test]
    fn write_command_fills_memory_and_reports_its_crc() {
        let mut r = rig();
        r.write(reg::IRQ_TYPE, irq_type::MSI);
        r.write(reg::IRQ_NUMBER, 1);
        let dst = RAM + 0x1001; // unaligned on purpose (CAP_UNALIGNED_ACCESS)
        let st = r.transfer(command::WRITE, 0, dst, 5000);
        assert_eq!(st, status::WRITE_SUCCESS | status::IRQ_RAISED);
        assert_eq!(r.read(reg::COMMAND), 0, "command taken");
        let data = r.mem_read(dst, 5000);
        assert_eq!(r.read(reg::CHECKSUM), checksum(&data));
        let mut want = vec![0u8; 5000];
        fill_pattern(dst, 0, &mut want);
        assert_eq!(data, want);
        assert_eq!(r.irqs(), [EpfIrq::Msi { vector: 0 }]);
        // Bytes around the buffer are untouched.
        assert_eq!(r.mem_read(dst - 1, 1), [0]);
        assert_eq!(r.mem_read(dst + 5000, 1), [0]);
    }

    #[test]
    fn read_command_checks_the_crc() {
        let mut r = rig();
        r.write(reg::IRQ_TYPE, irq_type::MSI);
        r.write(reg::IRQ_NUMBER, 3);
        let src = RAM + 0x8000;
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 31 + 7) as u8).collect();
        r.mem.write(src, &data).unwrap();
        r.write(reg::CHECKSUM, checksum(&data));
        let st = r.transfer(command::READ, src, 0, 4096);
        assert_eq!(st, status::READ_SUCCESS | status::IRQ_RAISED);
        assert_eq!(r.irqs(), [EpfIrq::Msi { vector: 2 }]);
        // A wrong checksum fails without blaming the address.
        r.write(reg::CHECKSUM, checksum(&data) ^ 1);
        let st = r.transfer(command::READ, src, 0, 4096);
        assert_eq!(st, status::READ_FAIL | status::IRQ_RAISED);
        assert_eq!(r.dev.last_fault(), None);
    }

    #[test]
    fn copy_command_copies() {
        let mut r = rig();
        r.write(reg::IRQ_NUMBER, 1);
        r.write(reg::IRQ_TYPE, irq_type::MSI);
        let (src, dst) = (RAM + 0x100, RAM + 0x9_0000);
        let data: Vec<u8> = (0..3000u32).map(|i| (i ^ (i >> 3)) as u8).collect();
        r.mem.write(src, &data).unwrap();
        let st = r.transfer(command::COPY, src, dst, 3000);
        assert_eq!(st, status::COPY_SUCCESS | status::IRQ_RAISED);
        assert_eq!(checksum(&r.mem_read(dst, 3000)), checksum(&data));
        assert_eq!(r.irqs().len(), 1);
    }

    #[test]
    fn large_transfers_cross_dma_chunks() {
        let mut r = rig();
        r.write(reg::IRQ_NUMBER, 1);
        r.write(reg::IRQ_TYPE, irq_type::MSI);
        let size = 3 * DMA_CHUNK as u32 + 123;
        let st = r.transfer(command::WRITE, 0, RAM, size);
        assert_eq!(st, status::WRITE_SUCCESS | status::IRQ_RAISED);
        let crc = r.read(reg::CHECKSUM);
        assert_eq!(crc, checksum(&r.mem_read(RAM, size as usize)));
        // What the device wrote, it reads back with the same CRC (what pci_endpoint_test's
        // WRITE then READ tests rely on), and copies intact.
        let st = r.transfer(command::READ, RAM, 0, size);
        assert_eq!(st, status::READ_SUCCESS | status::IRQ_RAISED);
        let st = r.transfer(command::COPY, RAM, RAM + 0x8_0000, size);
        assert_eq!(st, status::COPY_SUCCESS | status::IRQ_RAISED);
        assert_eq!(checksum(&r.mem_read(RAM + 0x8_0000, size as usize)), crc);
    }

    #[test]
    fn unmapped_addresses_fail_with_the_right_bits() {
        let mut r = rig();
        r.write(reg::IRQ_NUMBER, 1);
        r.write(reg::IRQ_TYPE, irq_type::MSI);
        let hole = RAM + RAM_LEN + 0x1000;
        let cases = [
            (
                command::READ,
                hole,
                RAM,
                status::SRC_ADDR_INVALID | status::READ_FAIL,
            ),
            (
                command::WRITE,
                RAM,
                hole,
                status::DST_ADDR_INVALID | status::WRITE_FAIL,
            ),
            (
                command::COPY,
                hole,
                RAM,
                status::SRC_ADDR_INVALID | status::COPY_FAIL,
            ),
            (
                command::COPY,
                RAM,
                hole,
                status::DST_ADDR_INVALID | status::COPY_FAIL,
            ),
        ];
        for (cmd, src, dst, want) in cases {
            r.write(reg::CHECKSUM, 0);
            let st = r.transfer(cmd, src, dst, 64);
            assert_eq!(st, want | status::IRQ_RAISED, "command {cmd:#x}");
            assert_eq!(r.dev.last_fault().unwrap().fault_iova, hole);
            // The host still gets its interrupt, so a failure is reported, not a hang.
            assert_eq!(r.irqs(), [EpfIrq::Msi { vector: 0 }]);
            // A failed WRITE leaves CHECKSUM alone.
            assert_eq!(r.read(reg::CHECKSUM), 0);
        }
        // An address above 4 GiB (high register) that is not mapped.
        let st = r.transfer(command::WRITE, 0, RAM | 1 << 32, 16);
        assert_eq!(
            st,
            status::DST_ADDR_INVALID | status::WRITE_FAIL | status::IRQ_RAISED
        );
        // A transfer that wraps the 64-bit space.
        let st = r.transfer(command::READ, u64::MAX - 7, 0, 16);
        assert_eq!(
            st,
            status::SRC_ADDR_INVALID | status::READ_FAIL | status::IRQ_RAISED
        );
    }

    #[test]
    fn access_straddling_the_end_of_a_mapping_fails() {
        let mut r = rig();
        r.write(reg::IRQ_NUMBER, 1);
        r.write(reg::IRQ_TYPE, irq_type::MSI);
        let end = RAM + RAM_LEN;
        // The last byte of the mapping works.
        let st = r.transfer(command::WRITE, 0, end - 1, 1);
        assert_eq!(st, status::WRITE_SUCCESS | status::IRQ_RAISED);
        // One byte more does not, and nothing of the buffer was written.
        let before = r.mem_read(end - 100, 100);
        let st = r.transfer(command::WRITE, 0, end - 100, 101);
        assert_eq!(
            st,
            status::DST_ADDR_INVALID | status::WRITE_FAIL | status::IRQ_RAISED
        );
        assert_eq!(r.mem_read(end - 100, 100), before);
        assert_eq!(r.dev.last_fault().unwrap().fault_iova, end);
        let st = r.transfer(command::READ, end - 8, 0, 9);
        assert_eq!(
            st,
            status::SRC_ADDR_INVALID | status::READ_FAIL | status::IRQ_RAISED
        );
        let st = r.transfer(command::COPY, RAM, end - 8, 9);
        assert_eq!(
            st,
            status::DST_ADDR_INVALID | status::COPY_FAIL | status::IRQ_RAISED
        );
        // Starting just before the mapping.
        let st = r.transfer(command::READ, RAM - 1, 0, 2);
        assert_eq!(
            st,
            status::SRC_ADDR_INVALID | status::READ_FAIL | status::IRQ_RAISED
        );
    }

    #[test]
    fn dma_needs_bus_mastering() {
        let mut r = rig();
        r.write(reg::IRQ_NUMBER, 1);
        r.write(reg::IRQ_TYPE, irq_type::MSI);
        r.cfg_write16(offset::COMMAND, cmd_bits::MEMORY_SPACE);
        let st = r.transfer(command::WRITE, 0, RAM, 16);
        assert_eq!(
            st,
            status::DST_ADDR_INVALID | status::WRITE_FAIL | status::IRQ_RAISED
        );
        assert_eq!(
            r.dev.last_fault().unwrap().reason,
            "bus mastering is disabled in COMMAND"
        );
        assert_eq!(r.mem_read(RAM, 16), [0; 16]);
    }

    #[test]
    fn missing_iommu_mapping_fails_the_command() {
        let mut backing = vec![0u8; 0x3000];
        let host = (backing.as_mut_ptr() as u64 + 0xfff) & !0xfff;
        let model = Arc::new(pinning::model::IommuModel::new(8, None));
        pinning::backend::DmaMapper::map(&*model, 0x4000_0000, 0x1000, host).unwrap();
        // SAFETY: the one mapping points into `backing`, which outlives the device.
        let dma = Arc::new(unsafe { IommuDma::new(model) });
        let irqs: Arc<Mutex<Vec<EpfIrq>>> = Arc::default();
        let sink = irqs.clone();
        let dev = EpfTest::new(
            EpfConfig::default(),
            dma,
            Box::new(move |i: EpfIrq| sink.lock().unwrap().push(i)),
        )
        .unwrap();
        let mut r = Rig {
            dev,
            mem: Arc::new(MappedRegions::new()),
            irqs,
        };
        r.cfg_write16(
            offset::COMMAND,
            cmd_bits::MEMORY_SPACE | cmd_bits::BUS_MASTER,
        );
        r.write(reg::IRQ_TYPE, irq_type::INTX);
        let st = r.transfer(command::WRITE, 0, 0x4000_0000, 0x1000);
        assert_eq!(st, status::WRITE_SUCCESS | status::IRQ_RAISED);
        // The next page has no IOMMU mapping.
        let st = r.transfer(command::WRITE, 0, 0x4000_0800, 0x1000);
        assert_eq!(
            st,
            status::DST_ADDR_INVALID | status::WRITE_FAIL | status::IRQ_RAISED
        );
        assert_eq!(r.dev.last_fault().unwrap().fault_iova, 0x4000_1000);
        assert_eq!(r.irqs(), [EpfIrq::Intx, EpfIrq::Intx]);
        drop(r);
        drop(backing);
    }

    #[test]
    fn raise_commands_pick_type_and_number() {
        let mut r = rig();
        // INTx.
        r.write(reg::IRQ_TYPE, irq_type::INTX);
        r.write(reg::IRQ_NUMBER, 0);
        r.write(reg::COMMAND, command::RAISE_INTX_IRQ);
        assert_eq!(r.read(reg::STATUS), status::IRQ_RAISED);
        assert_eq!(r.irqs(), [EpfIrq::Intx]);
        // INTx disabled in COMMAND: status set, nothing sent.
        r.cfg_write16(
            offset::COMMAND,
            cmd_bits::MEMORY_SPACE | cmd_bits::BUS_MASTER | cmd_bits::INTX_DISABLE,
        );
        r.write(reg::COMMAND, command::RAISE_INTX_IRQ);
        assert!(r.irqs().is_empty());
        // MSI 32 of 32.
        r.write(reg::IRQ_TYPE, irq_type::MSI);
        r.write(reg::IRQ_NUMBER, 32);
        r.write(reg::COMMAND, command::RAISE_MSI_IRQ);
        assert_eq!(r.irqs(), [EpfIrq::Msi { vector: 31 }]);
        // Number 0 and numbers beyond the enabled vectors are not raised.
        for n in [0, 33, u32::MAX] {
            r.write(reg::IRQ_NUMBER, n);
            r.write(reg::COMMAND, command::RAISE_MSI_IRQ);
            assert_eq!(r.read(reg::STATUS), status::IRQ_RAISED);
        }
        assert!(r.irqs().is_empty());
        // With only 4 MSI vectors enabled, number 5 is out of range.
        r.enable_msi(2);
        r.write(reg::IRQ_NUMBER, 5);
        r.write(reg::COMMAND, command::RAISE_MSI_IRQ);
        r.write(reg::IRQ_NUMBER, 4);
        r.write(reg::COMMAND, command::RAISE_MSI_IRQ);
        assert_eq!(r.irqs(), [EpfIrq::Msi { vector: 3 }]);
        // MSI-X only once enabled.
        r.write(reg::IRQ_TYPE, irq_type::MSIX);
        r.write(reg::IRQ_NUMBER, 7);
        r.write(reg::COMMAND, command::RAISE_MSIX_IRQ);
        assert!(r.irqs().is_empty());
        r.enable_msix();
        r.write(reg::COMMAND, command::RAISE_MSIX_IRQ);
        assert_eq!(r.irqs(), [EpfIrq::Msix { vector: 6 }]);
        // A transfer completes with the configured MSI-X vector.
        let st = r.transfer(command::WRITE, 0, RAM, 8);
        assert_eq!(st, status::WRITE_SUCCESS | status::IRQ_RAISED);
        assert_eq!(r.irqs(), [EpfIrq::Msix { vector: 6 }]);
    }

    #[test]
    fn invalid_commands_and_irq_types_are_dropped() {
        let mut r = rig();
        r.write(reg::STATUS, status::READ_SUCCESS);
        // Unknown IRQ type: pci-epf-test drops the command with STATUS cleared.
        r.write(reg::IRQ_TYPE, 3);
        let st = r.transfer(command::WRITE, 0, RAM, 8);
        assert_eq!(st, 0);
        assert_eq!(r.mem_read(RAM, 8), [0; 8]);
        // Two command bits at once, or an unknown bit, is not a command.
        r.write(reg::IRQ_TYPE, irq_type::MSI);
        r.write(reg::IRQ_NUMBER, 1);
        for bad in [command::READ | command::WRITE, 1 << 20] {
            r.write(reg::COMMAND, bad);
            assert_eq!(r.read(reg::STATUS), 0);
            assert_eq!(r.read(reg::COMMAND), 0);
        }
        assert!(r.irqs().is_empty());
        // Doorbells are not supported: FAIL status and the interrupt.
        r.write(reg::COMMAND, command::ENABLE_DOORBELL);
        assert_eq!(
            r.read(reg::STATUS),
            status::DOORBELL_ENABLE_FAIL | status::IRQ_RAISED
        );
        r.write(reg::COMMAND, command::DISABLE_DOORBELL);
        assert_eq!(
            r.read(reg::STATUS),
            status::DOORBELL_DISABLE_FAIL | status::IRQ_RAISED
        );
        assert_eq!(r.irqs().len(), 2);
        // The host clears IRQ_RAISED by writing STATUS back.
        r.write(reg::STATUS, 0);
        assert_eq!(r.read(reg::STATUS), 0);
        // FLAGS.USE_DMA changes nothing.
        r.write(reg::FLAGS, flags::USE_DMA);
        let st = r.transfer(command::WRITE, 0, RAM, 8);
        assert_eq!(st, status::WRITE_SUCCESS | status::IRQ_RAISED);
    }

    #[test]
    fn zero_size_transfers_touch_nothing() {
        let mut r = rig();
        r.write(reg::IRQ_NUMBER, 1);
        r.write(reg::IRQ_TYPE, irq_type::MSI);
        let st = r.transfer(command::WRITE, 0, 0xdead_0000, 0);
        assert_eq!(st, status::WRITE_SUCCESS | status::IRQ_RAISED);
        assert_eq!(r.read(reg::CHECKSUM), checksum(&[]));
    }

    #[test]
    fn msi_and_msix_routing_changes_are_reported() {
        let mut r = rig_with(EpfConfig {
            msi_vectors: 4,
            msix_vectors: 8,
        });
        // MSI: programming while enabled changes everything.
        let at = r.dev.msi().offset();
        let e = r.cfg_write32(at + 4, 0xfee0_1000);
        assert_eq!(e.msi, RoutingChange::All);
        assert_eq!(r.dev.msi().message(0).unwrap().addr, 0xfee0_1000);
        // Per-vector mask bit 2.
        let e = r.cfg_write32(at + 0x10, 0x4);
        assert_eq!(e.msi, RoutingChange::Vector(2));
        assert!(r.dev.msi().message(2).unwrap().masked);
        // MSI-X table entry 3 through BAR0, then unmask it.
        let e = r.enable_msix();
        assert_eq!(e.msix, RoutingChange::All);
        let entry = MSIX_TABLE_OFFSET + 3 * 16;
        assert_eq!(r.write(entry, 0xfee0_2000).msix, RoutingChange::Vector(3));
        assert_eq!(r.write(entry + 8, 0x45).msix, RoutingChange::Vector(3));
        assert_eq!(r.read(entry + 12), 1, "entries reset masked");
        assert_eq!(r.write(entry + 12, 0).msix, RoutingChange::Vector(3));
        assert_eq!(r.read(entry), 0xfee0_2000);
        let v: Vec<_> = r.dev.msix().vectors().filter(|(_, m)| !m.masked).collect();
        assert_eq!(v.len(), 1);
        assert_eq!((v[0].0, v[0].1.addr, v[0].1.data), (3, 0xfee0_2000, 0x45));
        // Function mask through config space.
        let cap = r.dev.msix().offset();
        let e = r.cfg_write16(cap + 2, 1 << 15 | 1 << 14);
        assert_eq!(e.msix, RoutingChange::All);
        assert!(r.dev.msix().vectors().all(|(_, m)| m.masked));
        // The PBA is read-only and reads 0 (the device leaves pending to the sink).
        r.write(MSIX_PBA_OFFSET, u32::MAX);
        assert_eq!(r.read(MSIX_PBA_OFFSET), 0);
        // Register writes are not routing changes.
        assert!(r.write(reg::MAGIC, 1).is_empty());
    }

    #[test]
    fn bar_moves_are_reported() {
        let mut r = rig();
        let e = r.cfg_write32(offset::BAR0, 0xc000_0000);
        assert_eq!(e.bars.len(), 1);
        assert_eq!((e.bars[0].old, e.bars[0].new), (Some(0), Some(0xc000_0000)));
        let e = r.cfg_write16(offset::COMMAND, cmd_bits::BUS_MASTER);
        assert_eq!((e.bars[0].old, e.bars[0].new), (Some(0xc000_0000), None));
        assert_eq!(r.dev.bars()[0].addr, 0xc000_0000);
    }

    #[test]
    fn arbitrary_guest_accesses_do_not_panic() {
        let mut r = rig();
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut next = move || {
            seed = splitmix64(seed);
            seed
        };
        for _ in 0..20_000 {
            let x = next();
            let len = [1, 2, 3, 4, 8][(x % 5) as usize];
            let value = next().to_le_bytes();
            let off = (x >> 8) % 0x1100;
            let mut buf = [0u8; 8];
            match (x >> 32) % 4 {
                0 => {
                    r.dev.bar_write((x >> 40) as usize % 7, off, &value[..len]);
                }
                1 => r.dev.bar_read((x >> 40) as usize % 7, off, &mut buf[..len]),
                2 => {
                    r.dev
                        .config_write((off / 4) as usize, x >> 48 & 7, &value[..len]);
                }
                _ => {
                    r.dev.config_read((off / 4) as usize);
                }
            }
        }
    }
}
