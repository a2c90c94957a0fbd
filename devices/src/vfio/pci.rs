//! One VFIO-PCI passthrough function over a [`VfioBackend`].
//!
//! What the guest sees is the device's own configuration space with four things virtualised:
//! - the BARs: the VMM (as firmware) and the guest place them in guest-physical space, which
//!   has nothing to do with where the device sits on the host, so the BAR registers live in a
//!   shadow [`ConfigSpace`] sized from the regions the backend reports;
//! - the expansion ROM BAR reads 0 (not offered);
//! - the MSI and MSI-X capabilities and the MSI-X table and PBA, which the VMM must turn into
//!   KVM routes (the `irqs` module); writes to the capabilities also go through to the device;
//! - everything else is read from and written to the device.
//!
//! BAR parts the backend can mmap are mapped into this process (the `mmap` module;
//! [`VfioPciDevice::mmaps`]) so the VMM can give them to the guest as memory slots; the rest
//! of each BAR traps here.
//!
//! Interrupts: one eventfd per vector (shared by MSI vector i and MSI-X vector i, as only one
//! of them is enabled at a time); the backend signals them, the VMM wires them to KVM irqfds.
//!
//! Masking is ours too (the device never sees the guest's table), and so are pending bits:
//! the VMM keeps an irqfd only on a live vector, so a masked vector's signals wait in its
//! eventfd's counter. That counter is read, and turned into the vector's pending bit, when
//! it matters: when the guest reads the PBA (or MSI's Pending Bits) and just before a write
//! that may unmask the vector. Once the VMM has routed the unmasked vector again, it calls
//! [`VfioPciDevice::release_pending`], which signals each pending live vector once. No
//! thread watches masked vectors: nothing can observe a pending bit before one of those
//! moments.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use pinning::class::{Classify, ErrorClass};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::backend::{VfioBackend, VfioBackendError};
use super::irqs::{MsiShadow, MsixShadow, VectorState};
use super::types::{irq, region};
use crate::pci::config::{cap_id, command, lanes, offset, BarKind, BarSpec, ConfigError};
use crate::pci::msix::Pba;
use crate::pci::{Bar, ConfigSpace, Effects, MsiMessage, PciDevice, PciHeader, RoutingChange};

/// Why a passthrough function could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum VfioPciError {
    #[error(transparent)]
    Backend(#[from] VfioBackendError),
    #[error("{device}: config space region is {size} bytes, a PCI function has at least 256")]
    ConfigRegion { device: String, size: u64 },
    #[error("{device}: BAR{index}: {source}")]
    Bar {
        device: String,
        index: usize,
        source: ConfigError,
    },
    #[error("{device}: creating an eventfd for interrupt vector {vector}: {source}")]
    EventFd {
        device: String,
        vector: usize,
        source: std::io::Error,
    },
    #[error("{device}: mmap of BAR{bar} [{offset:#x}, +{size:#x}): {source}")]
    Mmap {
        device: String,
        bar: usize,
        offset: u64,
        size: u64,
        source: std::io::Error,
    },
}

impl Classify for VfioPciError {
    fn class(&self) -> ErrorClass {
        match self {
            VfioPciError::Backend(e) => e.class(),
            VfioPciError::ConfigRegion { .. }
            | VfioPciError::Bar { .. }
            | VfioPciError::Mmap { .. } => ErrorClass::Device,
            VfioPciError::EventFd { .. } => ErrorClass::Internal,
        }
    }
}

/// An interrupt vector the VMM should route: its eventfd and, when it can fire, its message.
#[derive(Clone, Debug)]
pub struct IrqVector {
    /// Vector number (MSI or MSI-X, whichever is enabled).
    pub vector: usize,
    /// Signalled by the device.
    pub fd: Arc<EventFd>,
    /// Where it goes; `None` while disabled or masked.
    pub message: Option<MsiMessage>,
}

/// Told about the first backend failure while the guest runs.
pub type FailureHandler = Box<dyn Fn(&VfioBackendError) + Send>;

/// The passthrough function.
pub struct VfioPciDevice {
    backend: Arc<dyn VfioBackend>,
    /// Bytes of config space the device has (256, or 4096 with extended space).
    config_size: u64,
    shadow: ConfigSpace,
    msix: Option<MsixShadow>,
    msi: Option<MsiShadow>,
    /// Which interrupt index the backend is signalling now, and how many vectors.
    active: Option<(u32, usize)>,
    fds: Vec<Arc<EventFd>>,
    /// Vectors (of the active index) that fired while masked.
    pending: Pba,
    mmaps: Vec<BarMmap>,
    failed: AtomicBool,
    on_failure: Option<FailureHandler>,
}

impl std::fmt::Debug for VfioPciDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioPciDevice")
            .field("device", &self.backend.name())
            .field("msix", &self.msix)
            .field("msi", &self.msi)
            .field("active", &self.active)
            .finish_non_exhaustive()
    }
}

fn dword(b: [u8; 4]) -> u32 {
    u32::from_le_bytes(b)
}

impl VfioPciDevice {
    /// Reads the device's identity, BARs and capabilities through `backend` and maps what
    /// can be mapped.
    pub fn new(backend: Arc<dyn VfioBackend>) -> Result<Self, VfioPciError> {
        let name = backend.name().to_string();
        let cfg = backend.region_info(region::CONFIG)?;
        if cfg.size < 256 {
            return Err(VfioPciError::ConfigRegion {
                device: name,
                size: cfg.size,
            });
        }
        let mut raw = [0u8; 256];
        backend.region_read(region::CONFIG, 0, &mut raw)?;
        let rd = |off: usize| dword([raw[off], raw[off + 1], raw[off + 2], raw[off + 3]]);
        let mut shadow = ConfigSpace::new(&PciHeader {
            vendor_id: rd(0) as u16,
            device_id: (rd(0) >> 16) as u16,
            class_code: rd(8) >> 8,
            revision_id: rd(8) as u8,
            subsystem_vendor_id: rd(0x2c) as u16,
            subsystem_id: (rd(0x2c) >> 16) as u16,
            interrupt_pin: raw[offset::INTERRUPT_PIN],
        });

        // Kept for map_bars: each query is a round trip to a vfio-user server.
        let mut bar_regions = Vec::new();
        let mut index = 0;
        while index < 6 {
            let info = backend.region_info(region::BAR0 + index as u32)?;
            let reg = rd(offset::BAR0 + 4 * index);
            let kind = if reg & 1 != 0 {
                BarKind::Io
            } else if reg & 0b110 == 0b100 {
                BarKind::Memory64
            } else {
                BarKind::Memory32
            };
            if info.size > 0 {
                let size =
                    info.size
                        .checked_next_power_of_two()
                        .ok_or_else(|| VfioPciError::Bar {
                            device: name.clone(),
                            index,
                            source: ConfigError::BarSize {
                                index,
                                kind,
                                size: info.size,
                                reason: "larger than any power of two that fits in 64 bits",
                            },
                        })?;
                let spec = BarSpec {
                    kind,
                    size,
                    prefetchable: kind != BarKind::Io && reg & 0b1000 != 0,
                };
                shadow
                    .add_bar(index, spec)
                    .map_err(|source| VfioPciError::Bar {
                        device: name.clone(),
                        index,
                        source,
                    })?;
                if kind != BarKind::Io {
                    bar_regions.push((index, info));
                }
            }
            index += if kind == BarKind::Memory64 { 2 } else { 1 };
        }

        let (mut msi, mut msix) = (None, None);
        let has_caps = rd(offset::COMMAND) >> 16 & 0x10 != 0;
        let mut at = if has_caps {
            usize::from(raw[offset::CAPABILITIES_POINTER] & !3)
        } else {
            0
        };
        // A malformed list could loop; 48 capabilities fill the standard space.
        for _ in 0..48 {
            if !(0x40..=0xfc).contains(&at) {
                break;
            }
            let dw0 = rd(at);
            match dw0 as u8 {
                cap_id::MSI => msi = Some(MsiShadow::new(at, dw0)),
                cap_id::MSIX if at <= 0xf4 => {
                    msix = Some(MsixShadow::new(at, dw0, rd(at + 4), rd(at + 8)))
                }
                _ => {}
            }
            at = usize::from((dw0 >> 8) as u8 & !3);
        }

        let vectors = msix
            .as_ref()
            .map_or(0, |m| m.count())
            .max(msi.as_ref().map_or(0, |m| m.supported()));
        let fds = (0..vectors)
            .map(|vector| {
                EventFd::new(EFD_NONBLOCK)
                    .map(Arc::new)
                    .map_err(|source| VfioPciError::EventFd {
                        device: name.clone(),
                        vector,
                        source,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;

        let mut dev = VfioPciDevice {
            backend,
            config_size: cfg.size.min(4096),
            shadow,
            msix,
            msi,
            active: None,
            pending: Pba::new(fds.len()),
            fds,
            mmaps: Vec::new(),
            failed: AtomicBool::new(false),
            on_failure: None,
        };
        dev.map_bars(&bar_regions)?;
        Ok(dev)
    }

    /// Called once with the first backend error the guest's accesses run into (a vfio-user
    /// server that died, say), so the VMM can stop the guest with that error.
    pub fn set_failure_handler(&mut self, f: FailureHandler) {
        self.on_failure = Some(f);
    }

    /// The backend, for the VMM's reports.
    pub fn backend(&self) -> &Arc<dyn VfioBackend> {
        &self.backend
    }

    /// The BAR parts mapped here, for the VMM to give the guest as memory slots.
    pub fn mmaps(&self) -> &[BarMmap] {
        &self.mmaps
    }

    /// Every vector's eventfd, and its message if it can fire now.
    pub fn irq_vectors(&self) -> Vec<IrqVector> {
        self.fds
            .iter()
            .enumerate()
            .map(|(vector, fd)| IrqVector {
                vector,
                fd: fd.clone(),
                message: self.state(vector).live(),
            })
            .collect()
    }

    fn state(&self, vector: usize) -> VectorState {
        let state = match self.active {
            Some((irq::MSIX, _)) => self.msix.as_ref().map(|m| m.state(vector)),
            Some((irq::MSI, _)) => self.msi.as_ref().map(|m| m.state(vector)),
            _ => None,
        };
        state.unwrap_or(VectorState::Off)
    }

    /// Reads the eventfd counters of the masked and disabled vectors in `vectors`: a masked
    /// one that was signalled becomes pending; a disabled one's signals are dropped. Live
    /// vectors are left alone: their counters belong to KVM's irqfds.
    fn collect_fired(&mut self, vectors: std::ops::Range<usize>) {
        for v in vectors {
            let state = self.state(v);
            let Some(fd) = self.fds.get(v).filter(|_| state.live().is_none()) else {
                continue;
            };
            // Non-blocking: an unsignalled counter is an error (EAGAIN), i.e. nothing fired.
            if fd.read().is_ok() && state == VectorState::Masked {
                self.pending.set(v, true);
            }
        }
    }

    /// Signals once each pending vector that is live now, and clears its bit. The VMM calls
    /// this after routing the live vectors, so that KVM delivers what fired while masked.
    pub fn release_pending(&mut self) {
        let live: Vec<usize> = self
            .pending
            .iter()
            .filter(|&v| self.state(v).live().is_some())
            .collect();
        for v in live {
            self.pending.set(v, false);
            if let Err(e) = self.fds[v].write(1) {
                crate::warn_limited!("{}: re-sending vector {v}: {e}", self.backend.name());
            }
        }
    }

    /// The INTx pin (1 = INTA .. 4 = INTD) of a device that offers neither MSI nor MSI-X:
    /// such a device needs a level-triggered line.
    pub fn intx_only(&self) -> Option<u8> {
        let pin = self.shadow.read_u8(offset::INTERRUPT_PIN);
        (self.fds.is_empty() && (1..=4).contains(&pin)).then_some(pin)
    }

    /// Wires INTx: the device signals `trigger` when it asserts the line and waits for a
    /// write to `resample` (KVM's, on the guest's EOI) before it can assert it again. `line`
    /// goes into the Interrupt Line register for the guest's information.
    pub fn enable_intx(
        &mut self,
        line: u8,
        trigger: &EventFd,
        resample: &EventFd,
    ) -> Result<(), VfioBackendError> {
        if let Err(e) = self.backend.enable_intx(trigger, resample) {
            // It may have taken the trigger but not the unmask fd: leave nothing half wired.
            let _ = self.backend.disable_irq(irq::INTX);
            return Err(e);
        }
        self.forward_config(offset::INTERRUPT_LINE / 4, 0, &[line]);
        self.active = Some((irq::INTX, 1));
        Ok(())
    }

    /// Programs BAR `index` to `addr` and turns decoding on, as firmware does before the
    /// guest runs. Returns the BAR changes for the VMM to register.
    pub fn place_bar(&mut self, index: usize, addr: u64) -> Result<Vec<Bar>, ConfigError> {
        self.shadow.set_bar_addr(index, addr)?;
        let space = match self.shadow.bar(index).map(|b| b.spec.kind) {
            Some(BarKind::Io) => command::IO_SPACE,
            _ => command::MEMORY_SPACE,
        };
        let cmd = self.shadow.command() | space;
        self.shadow
            .write_reg(offset::COMMAND / 4, 0, &cmd.to_le_bytes());
        self.forward_config(offset::COMMAND / 4, 0, &cmd.to_le_bytes());
        Ok(self.shadow.bars().collect())
    }

    /// Reports the first backend failure; later ones (one per guest access to a broken
    /// device) are only logged at debug level, rate-limited.
    fn failed(&self, e: VfioBackendError) {
        if self.failed.swap(true, Ordering::AcqRel) {
            crate::debug_limited!("{}: {e}", self.backend.name());
            return;
        }
        tracing::error!("passthrough device failed: {e}");
        if let Some(f) = &self.on_failure {
            f(&e);
        }
    }

    fn forward_config(&self, reg: usize, offset: u64, data: &[u8]) {
        // Only what a config cycle can carry (1, 2 or 4 bytes inside one dword): a longer or
        // crossing write would reach the registers after `reg`, the device's own BARs say.
        if lanes(offset, data).is_none() {
            return;
        }
        // Past the device's config space (extended space of a conventional function, reached
        // through ECAM): nothing to write to, as on real hardware. Wide enough for any `reg`.
        let end = reg as u128 * 4 + u128::from(offset) + data.len() as u128;
        if end > u128::from(self.config_size) {
            return;
        }
        let at = reg as u64 * 4 + offset;
        if let Err(e) = self.backend.region_write(region::CONFIG, at, data) {
            self.failed(e);
        }
    }

    fn device_config(&self, reg: usize) -> u32 {
        // All ones past the device's config space: what Linux takes for "no extended space".
        if reg as u64 >= self.config_size / 4 {
            return u32::MAX;
        }
        let mut b = [0xff; 4];
        match self
            .backend
            .region_read(region::CONFIG, reg as u64 * 4, &mut b)
        {
            Ok(()) => dword(b),
            Err(e) => {
                self.failed(e);
                u32::MAX
            }
        }
    }

    /// Points the backend's vectors at our eventfds for whatever the guest enabled now.
    fn sync_irqs(&mut self) {
        let want = match (&self.msix, &self.msi) {
            (Some(m), _) if m.enabled() => Some((irq::MSIX, m.count())),
            (_, Some(m)) if m.enabled_vectors() > 0 => Some((irq::MSI, m.enabled_vectors())),
            _ => None,
        };
        if want == self.active {
            return;
        }
        // Pending bits are per vector of one interrupt kind; they go with it.
        self.pending.clear();
        if let Some((index, _)) = self.active.take() {
            if let Err(e) = self.backend.disable_irq(index) {
                self.failed(e);
            }
        }
        if let Some((index, n)) = want {
            let fds: Vec<&EventFd> = self.fds.iter().take(n).map(|f| f.as_ref()).collect();
            match self.backend.enable_irq(index, &fds) {
                Ok(()) => self.active = want,
                Err(e) => self.failed(e),
            }
        }
    }
}

impl PciDevice for VfioPciDevice {
    fn config_read(&mut self, reg: usize) -> u32 {
        match reg {
            r if (offset::BAR0 / 4..offset::BAR0 / 4 + 6).contains(&r) => self.shadow.read_reg(r),
            r if r == offset::ROM_BAR / 4 => 0,
            r if self.msix.as_ref().is_some_and(|m| m.is_control_reg(r)) => {
                let dev = self.device_config(r);
                self.msix.as_ref().map_or(dev, |m| m.overlay(dev))
            }
            r if self.msi.as_ref().is_some_and(|m| m.contains(r)) => {
                let dev = self.device_config(r);
                let Some(m) = self.msi.as_ref() else {
                    return dev;
                };
                let value = m.read(r, dev);
                if m.pending_reg() != Some(r) {
                    return value;
                }
                self.collect_fired(0..self.fds.len().min(32));
                let mut ours = [0u8; 4];
                self.pending.read(0, &mut ours);
                value | dword(ours)
            }
            r => self.device_config(r),
        }
    }

    fn config_write(&mut self, reg: usize, offset: u64, data: &[u8]) -> Effects {
        let mut effects = Effects::default();
        let bar_regs = offset::BAR0 / 4..offset::BAR0 / 4 + 6;
        if bar_regs.contains(&reg) {
            effects.bars = self.shadow.write_reg(reg, offset, data);
            return effects;
        }
        if reg == offset::ROM_BAR / 4 {
            return effects;
        }
        if reg == offset::COMMAND / 4 {
            effects.bars = self.shadow.write_reg(reg, offset, data);
        }
        let irq_reg = self.msix.as_ref().is_some_and(|m| m.is_control_reg(reg))
            || self.msi.as_ref().is_some_and(|m| m.contains(reg));
        if irq_reg {
            // Under the old masks: what fired while masked is pending before it may unmask.
            self.collect_fired(0..self.fds.len());
        }
        if let Some(m) = self.msix.as_mut().filter(|m| m.is_control_reg(reg)) {
            if m.write_control(offset, data) {
                effects.msix = RoutingChange::All;
            }
        }
        if let Some(m) = self.msi.as_mut().filter(|m| m.contains(reg)) {
            if m.write(reg, offset, data) {
                effects.msi = RoutingChange::All;
            }
        }
        self.forward_config(reg, offset, data);
        if effects.msi.is_changed() || effects.msix.is_changed() {
            self.sync_irqs();
        }
        effects
    }

    fn bars(&self) -> Vec<Bar> {
        self.shadow.bars().collect()
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        // Past BAR5, `region::BAR0 + bar` would be the ROM or config space, not a BAR.
        if bar >= region::ROM as usize {
            return data.fill(0xff);
        }
        if let Some(m) = &self.msix {
            if let Some(at) = m.table.inner(bar, offset, data.len()) {
                return m.table_read(at, data);
            }
            // The device's own PBA knows nothing of our masks: the guest reads ours.
            if let Some(at) = m.pba.inner(bar, offset, data.len()) {
                if self.active.is_some_and(|(index, _)| index == irq::MSIX) {
                    self.collect_fired(self.pending.vectors_read(at, data.len()));
                    self.pending.read(at, data);
                } else {
                    data.fill(0);
                }
                return;
            }
        }
        if let Err(e) = self
            .backend
            .region_read(region::BAR0 + bar as u32, offset, data)
        {
            data.fill(0xff);
            self.failed(e);
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) -> Effects {
        if bar >= region::ROM as usize {
            return Effects::default();
        }
        let (table, pba) = match &self.msix {
            Some(m) => (
                m.table.inner(bar, offset, data.len()),
                m.pba.inner(bar, offset, data.len()),
            ),
            None => (None, None),
        };
        if let Some(at) = table {
            let vectors = (at / 16) as usize..(at + data.len() as u64).div_ceil(16) as usize;
            // Under the old mask: what fired while masked is pending before it may unmask.
            self.collect_fired(vectors);
            let changed = self.msix.as_mut().is_some_and(|m| m.table_write(at, data));
            return Effects {
                msix: if changed {
                    RoutingChange::Vector((at / 16) as u16)
                } else {
                    RoutingChange::Unchanged
                },
                ..Effects::default()
            };
        }
        if pba.is_some() {
            // The PBA is read-only.
            return Effects::default();
        }
        if let Err(e) = self
            .backend
            .region_write(region::BAR0 + bar as u32, offset, data)
        {
            self.failed(e);
        }
        Effects::default()
    }
}

impl Drop for VfioPciDevice {
    fn drop(&mut self) {
        // Stop the device's DMA before guest RAM is unmapped from it (the VMM drops the
        // device models first), then its interrupts.
        if !self.failed.load(Ordering::Acquire) {
            if let Err(e) = self.backend.reset() {
                tracing::debug!("at teardown: {e}");
            }
        }
        if let Some((index, _)) = self.active.take() {
            if let Err(e) = self.backend.disable_irq(index) {
                tracing::debug!("at teardown: {e}");
            }
        }
    }
}

mod mmap;

pub use mmap::BarMmap;

#[cfg(test)]
mod tests;
