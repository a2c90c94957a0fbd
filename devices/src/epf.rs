//! A model of Linux's pci-epf-test endpoint function, the device the host driver
//! `pci_endpoint_test` (drivers/misc/pci_endpoint_test.c) tests PCI with: a register block in
//! BAR0, commands that DMA to and from host (here: guest) memory, and an interrupt when a
//! command is done.
//!
//! The IDs, register offsets and bit values, the checksum and the WRITE pattern are the guest
//! ABI ([`guest_abi::epf`]), shared with the probe guest that drives this model.
//!
//! Commands run as on the real endpoint, whose command handler polls COMMAND from a work item:
//! the guest's write to COMMAND returns promptly, and the device sets STATUS and raises its
//! interrupt when the command is done. A transfer (READ, WRITE, COPY) of up to
//! [`INLINE_BYTES`] completes before that write returns; a larger one (SIZE goes up to
//! 4 GiB) continues in steps on the device's DMA thread, so no single register access, and
//! no vfio-user REGION_WRITE, waits for it.
//!
//! A COMMAND written while a transfer runs is what the real device does with it too: it stays
//! in the COMMAND register (the guest reads it back) and starts when the running one is done,
//! reading its parameters then; a second such write replaces the first. A reset (a new model)
//! stops a running transfer between two steps, with no STATUS and no interrupt.
//!
//! Differences from the real endpoint, on purpose:
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
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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
use crate::ratelimit::RateLimit;
use crate::{debug_limited, log_limited};

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
/// The part of a transfer done inside the guest's write to COMMAND: a transfer this small
/// (a page is what the probe guest and most of `pci_endpoint_test` use) is complete, STATUS
/// set and its interrupt raised, before the write returns. About a millisecond of work.
pub const INLINE_BYTES: u64 = 1 << 20;
/// The DMA thread's step: between two, it sees a reset.
const STEP_BYTES: u64 = 1 << 20;

/// DMA faults are the guest's doing (a bad address, bus mastering off): each fails its
/// command, and the log says so at most this often.
pub(crate) static DMA_FAULTS: RateLimit = RateLimit::per_site();

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
    #[error("starting the pci-epf-test DMA thread: {0}")]
    Worker(#[source] io::Error),
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

/// Which interrupts can be delivered, as configuration space says; kept up to date by the
/// model for the DMA thread, which raises completion interrupts.
#[derive(Clone, Copy, Debug, Default)]
struct IrqLines {
    /// INTx is not disabled in COMMAND.
    intx: bool,
    /// MSI vectors enabled (0: MSI off).
    msi: u16,
    /// MSI-X vectors (0: MSI-X off).
    msix: u16,
}

/// The registers and what goes with them, shared by the guest-facing model and its DMA
/// thread.
struct State {
    regs: [u32; REG_COUNT],
    lines: IrqLines,
    irq: Box<dyn IrqSink>,
    last_fault: Option<DmaFault>,
    /// A transfer is running (on the DMA thread, or about to be): a COMMAND written now
    /// waits in its register.
    busy: bool,
    /// The transfer handed to the DMA thread, until it takes it.
    queued: Option<Transfer>,
}

impl State {
    fn reg(&self, at: u64) -> u32 {
        self.regs.get((at / 4) as usize).copied().unwrap_or(0)
    }

    fn set_reg(&mut self, at: u64, v: u32) {
        self.regs[(at / 4) as usize] = v;
    }

    /// Sets IRQ_RAISED and raises interrupt `kind` number IRQ_NUMBER. Like pci-epf-test,
    /// the status bit is set even when the number is out of range and nothing is sent.
    fn raise(&mut self, kind: u32) {
        self.set_reg(reg::STATUS, self.reg(reg::STATUS) | status::IRQ_RAISED);
        let number = self.reg(reg::IRQ_NUMBER);
        let vector =
            |count: u16| (number >= 1 && number <= u32::from(count)).then(|| (number - 1) as u16);
        let irq = match kind {
            irq_type::INTX => self.lines.intx.then_some(EpfIrq::Intx),
            irq_type::MSI => vector(self.lines.msi).map(|vector| EpfIrq::Msi { vector }),
            _ => vector(self.lines.msix).map(|vector| EpfIrq::Msix { vector }),
        };
        match irq {
            Some(irq) => self.irq.raise(irq),
            None => debug_limited!(
                "pci-epf-test: interrupt type {kind} number {number} is not enabled or out of \
                 range, not raised"
            ),
        }
    }
}

/// A transfer command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Read,
    Write,
    Copy,
}

/// How a transfer ended.
struct Outcome {
    /// STATUS bits.
    status: u32,
    /// WRITE's CHECKSUM.
    checksum: Option<u32>,
    fault: Option<DmaFault>,
}

impl Outcome {
    fn status(status: u32) -> Self {
        Outcome {
            status,
            checksum: None,
            fault: None,
        }
    }

    fn fault(fault: DmaFault, status: u32) -> Self {
        Outcome {
            status,
            checksum: None,
            fault: Some(fault),
        }
    }
}

enum Progress {
    More,
    Done(Outcome),
    /// The device is going away (reset): the transfer is abandoned.
    Stopped,
}

/// A transfer in progress, with its parameters as the registers held when it started.
struct Transfer {
    op: Op,
    /// IRQ_TYPE when it started.
    kind: u32,
    src: u64,
    dst: u64,
    size: u64,
    /// Bytes done.
    done: u64,
    crc: u32,
    /// READ: the CHECKSUM to match.
    expect: u32,
    buf: Vec<u8>,
}

impl Transfer {
    fn new(op: Op, kind: u32, st: &State) -> Self {
        let addr = |lo, hi| u64::from(st.reg(hi)) << 32 | u64::from(st.reg(lo));
        let size = u64::from(st.reg(reg::SIZE));
        Transfer {
            op,
            kind,
            src: addr(reg::SRC_ADDR_LO, reg::SRC_ADDR_HI),
            dst: addr(reg::DST_ADDR_LO, reg::DST_ADDR_HI),
            size,
            done: 0,
            crc: !0,
            expect: st.reg(reg::CHECKSUM),
            buf: vec![0; size.min(DMA_CHUNK as u64) as usize],
        }
    }

    /// Moves up to `budget` more bytes (whole DMA chunks).
    fn step(&mut self, core: &Core, budget: u64) -> Progress {
        let end = self.done.saturating_add(budget).min(self.size);
        while self.done < end {
            if core.stop.load(Ordering::Acquire) {
                return Progress::Stopped;
            }
            let n = (self.size - self.done).min(DMA_CHUNK as u64) as usize;
            let buf = &mut self.buf[..n];
            let done = self.done;
            match self.op {
                Op::Read => {
                    if let Err(f) = core.dma(DmaDirection::Read, self.src, done, buf) {
                        let bits = status::SRC_ADDR_INVALID | status::READ_FAIL;
                        return Progress::Done(Outcome::fault(f, bits));
                    }
                    self.crc = crc32_le(self.crc, buf);
                }
                Op::Write => {
                    fill_pattern(self.dst, done, buf);
                    self.crc = crc32_le(self.crc, buf);
                    if let Err(f) = core.dma(DmaDirection::Write, self.dst, done, buf) {
                        let bits = status::DST_ADDR_INVALID | status::WRITE_FAIL;
                        return Progress::Done(Outcome::fault(f, bits));
                    }
                }
                Op::Copy => {
                    if let Err(f) = core.dma(DmaDirection::Read, self.src, done, buf) {
                        let bits = status::SRC_ADDR_INVALID | status::COPY_FAIL;
                        return Progress::Done(Outcome::fault(f, bits));
                    }
                    if let Err(f) = core.dma(DmaDirection::Write, self.dst, done, buf) {
                        let bits = status::DST_ADDR_INVALID | status::COPY_FAIL;
                        return Progress::Done(Outcome::fault(f, bits));
                    }
                }
            }
            self.done += n as u64;
        }
        if self.done < self.size {
            return Progress::More;
        }
        Progress::Done(match self.op {
            Op::Read if self.crc == self.expect => Outcome::status(status::READ_SUCCESS),
            Op::Read => Outcome::status(status::READ_FAIL),
            Op::Write => Outcome {
                status: status::WRITE_SUCCESS,
                checksum: Some(self.crc),
                fault: None,
            },
            Op::Copy => Outcome::status(status::COPY_SUCCESS),
        })
    }
}

/// What the model and its DMA thread share.
struct Core {
    state: Mutex<State>,
    /// Work for the DMA thread, a stop request, or a transfer done.
    changed: Condvar,
    dma: Arc<dyn DmaSpace>,
    /// COMMAND's bus master bit, checked before every DMA chunk.
    bus_master: AtomicBool,
    /// The model is going away: the DMA thread stops between two chunks.
    stop: AtomicBool,
}

impl Core {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
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
        if !self.bus_master.load(Ordering::Acquire) {
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

    /// Starts the command in COMMAND, the way pci-epf-test's command handler does: clears
    /// COMMAND and STATUS, then runs it. Only while no transfer runs.
    fn start_pending(&self, st: &mut State) {
        debug_assert!(!st.busy);
        let cmd = st.reg(reg::COMMAND);
        st.set_reg(reg::COMMAND, 0);
        if cmd == 0 {
            return;
        }
        st.set_reg(reg::STATUS, 0);
        let kind = st.reg(reg::IRQ_TYPE);
        if kind > irq_type::MSIX {
            debug_limited!("pci-epf-test: unknown IRQ type {kind}, command {cmd:#x} dropped");
            return;
        }
        let op = match cmd {
            command::RAISE_INTX_IRQ => return st.raise(irq_type::INTX),
            command::RAISE_MSI_IRQ => return st.raise(irq_type::MSI),
            command::RAISE_MSIX_IRQ => return st.raise(irq_type::MSIX),
            command::READ => Op::Read,
            command::WRITE => Op::Write,
            command::COPY => Op::Copy,
            command::ENABLE_DOORBELL => {
                let done = Outcome::status(status::DOORBELL_ENABLE_FAIL);
                return Self::finish(st, kind, done);
            }
            command::DISABLE_DOORBELL => {
                let done = Outcome::status(status::DOORBELL_DISABLE_FAIL);
                return Self::finish(st, kind, done);
            }
            _ => {
                debug_limited!("pci-epf-test: invalid command {cmd:#x}");
                return;
            }
        };
        let mut t = Transfer::new(op, kind, st);
        match t.step(self, INLINE_BYTES) {
            Progress::Done(outcome) => Self::finish(st, kind, outcome),
            Progress::More => {
                st.busy = true;
                st.queued = Some(t);
                self.changed.notify_all();
            }
            Progress::Stopped => {}
        }
    }

    /// Reports a finished command: STATUS (and WRITE's CHECKSUM), then its interrupt.
    fn finish(st: &mut State, kind: u32, outcome: Outcome) {
        if let Some(f) = outcome.fault {
            log_limited!(&DMA_FAULTS, warn, "pci-epf-test: {f}");
            st.last_fault = Some(f);
        }
        if let Some(crc) = outcome.checksum {
            st.set_reg(reg::CHECKSUM, crc);
        }
        st.set_reg(reg::STATUS, st.reg(reg::STATUS) | outcome.status);
        st.raise(kind);
    }

    /// The DMA thread: runs queued transfers in steps until the model goes away.
    fn run_worker(&self) {
        let mut st = self.lock();
        loop {
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            let Some(mut t) = st.queued.take() else {
                st = self
                    .changed
                    .wait(st)
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            };
            drop(st);
            let outcome = loop {
                match t.step(self, STEP_BYTES) {
                    Progress::More => {}
                    Progress::Done(outcome) => break outcome,
                    Progress::Stopped => return,
                }
            };
            st = self.lock();
            st.busy = false;
            Self::finish(&mut st, t.kind, outcome);
            // A command the guest wrote meanwhile starts now.
            self.start_pending(&mut st);
            self.changed.notify_all();
        }
    }
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
        let core = Arc::new(Core {
            state: Mutex::new(State {
                regs,
                lines: IrqLines::default(),
                irq,
                last_fault: None,
                busy: false,
                queued: None,
            }),
            changed: Condvar::new(),
            dma,
            bus_master: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
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

#[cfg(test)]
mod tests;
