//! The commands of the pci-epf-test model and the thread that runs its transfers: the
//! registers and interrupt lines the guest-facing function and the DMA thread share, a
//! transfer moved in DMA chunks (inline up to [`INLINE_BYTES`], then on the thread in steps
//! it can be stopped between), and how a finished command reports its STATUS and interrupt.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use guest_abi::epf::{command, irq_type, reg, status};

use super::data::{crc32_le, fill_pattern};
use crate::pci::dma::{DmaDirection, DmaFault, DmaSpace};
use crate::ratelimit::RateLimit;
use crate::{debug_limited, log_limited};

/// Registers from MAGIC up to and including CAPS, and the reserved doorbell slots.
pub(super) const REG_COUNT: usize = 16;
pub(super) const REG_BLOCK: u64 = REG_COUNT as u64 * 4;
/// DMA is done in pieces of this size, so a guest-chosen SIZE (up to 4 GiB) never makes the
/// VMM allocate more than this.
pub(super) const DMA_CHUNK: usize = 64 * 1024;
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

/// Which interrupts can be delivered, as configuration space says; kept up to date by the
/// model for the DMA thread, which raises completion interrupts.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct IrqLines {
    /// INTx is not disabled in COMMAND.
    pub intx: bool,
    /// MSI vectors enabled (0: MSI off).
    pub msi: u16,
    /// MSI-X vectors (0: MSI-X off).
    pub msix: u16,
}

/// The registers and what goes with them, shared by the guest-facing model and its DMA
/// thread.
pub(super) struct State {
    pub regs: [u32; REG_COUNT],
    pub lines: IrqLines,
    irq: Box<dyn IrqSink>,
    pub last_fault: Option<DmaFault>,
    /// A transfer is running (on the DMA thread, or about to be): a COMMAND written now
    /// waits in its register.
    pub busy: bool,
    /// The transfer handed to the DMA thread, until it takes it.
    queued: Option<Transfer>,
}

impl State {
    pub fn reg(&self, at: u64) -> u32 {
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
pub(super) struct Core {
    state: Mutex<State>,
    /// Work for the DMA thread, a stop request, or a transfer done.
    pub changed: Condvar,
    dma: Arc<dyn DmaSpace>,
    /// COMMAND's bus master bit, checked before every DMA chunk.
    pub bus_master: AtomicBool,
    /// The model is going away: the DMA thread stops between two chunks.
    pub stop: AtomicBool,
}

impl Core {
    /// Registers `regs`, no interrupt line enabled, bus mastering off, no transfer.
    pub fn new(regs: [u32; REG_COUNT], irq: Box<dyn IrqSink>, dma: Arc<dyn DmaSpace>) -> Self {
        Core {
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
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
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
    pub fn start_pending(&self, st: &mut State) {
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
    pub fn run_worker(&self) {
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
