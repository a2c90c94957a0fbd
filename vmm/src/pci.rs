//! PCI inside the VM: bus 0 behind ports 0xCF8..0xCFF and the ECAM window at
//! [`layout::PCI_ECAM_START`] (which the ACPI MCFG table describes), passthrough functions
//! with their memory BARs on the MMIO bus (mmap-able parts as KVM memory slots, so the guest
//! reaches them without exits) and their I/O BARs on the port I/O bus (in the window at
//! [`layout::PCI_IO_START`]), and MSI/MSI-X vectors as KVM GSI routes fed by irqfds.
//!
//! The devices crate knows nothing of KVM: a guest write returns [`Effects`] (a BAR moved, a
//! vector changed), and `Wiring::apply` turns them into bus registrations, memory slots and
//! routes. Only live (enabled, unmasked) vectors get an irqfd; the device model turns what a
//! masked vector's eventfd collects into its pending bit and re-sends it once it is live.
//! KVM_SET_GSI_ROUTING replaces the whole table, so the table is rebuilt from the legacy
//! routes plus every live vector each time.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use devices::pci::bus::{CONFIG_IO_BASE, CONFIG_IO_LEN};
use devices::pci::{
    BarKind, BarSpec, EffectsHandler, MsiMessage, PciAddress, PciBarRegion, PciBus, PciBusError,
    PciConfigIo, PciEcam, SharedPciDevice,
};
use devices::pci::{Effects, PciDevice};
use devices::vfio::VfioPciDevice;
use devices::Bus;
use kvm_bindings::{
    kvm_irq_routing_entry, kvm_userspace_memory_region, KvmIrqRouting, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use crate::allocator::{ResourceAllocator, ResourceError};
use crate::arch::x86_64::mptable::PciIntx;
use crate::memory::layout;

/// First KVM memory slot for BAR mappings; guest RAM uses the slots below.
const FIRST_BAR_SLOT: u32 = 64;
/// The IOAPIC has 24 pins; GSIs 0..24 are its (and, below 16, the PICs') lines.
const LEGACY_GSIS: u32 = 24;

/// PCI set-up errors (stage `devices`).
#[derive(Debug, thiserror::Error)]
pub enum PciError {
    #[error(transparent)]
    Bus(#[from] PciBusError),
    #[error("{device}: {source}")]
    Resource {
        device: String,
        source: ResourceError,
    },
    /// The allocator's error names the device and the BAR already.
    #[error(transparent)]
    BarSpace(ResourceError),
    #[error("{device}: placing BAR{index} at {addr:#x}: {source}")]
    Bar {
        device: String,
        index: usize,
        addr: u64,
        source: devices::pci::ConfigError,
    },
    #[error("{device}: {what}: {source}")]
    Kvm {
        device: String,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Intx {
        source: devices::vfio::VfioBackendError,
    },
    #[error("registering the PCI configuration ports: {0}")]
    ConfigPorts(devices::BusError),
    #[error("registering the PCI ECAM window: {0}")]
    Ecam(devices::BusError),
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One interrupt vector of one device.
struct Vector {
    gsi: u32,
    fd: Arc<EventFd>,
    irqfd: bool,
}

/// A BAR part mapped as a memory slot.
struct Slot {
    slot: u32,
    bar: usize,
    offset: u64,
    size: u64,
    host_addr: u64,
    gpa: Option<u64>,
}

/// A level-triggered INTx line: KVM asserts `gsi` on `trigger` and signals `resample` when
/// the guest EOIs it, which unmasks the device.
struct Intx {
    gsi: u32,
    pin: u8,
    trigger: EventFd,
    /// Only held: our end of the resample fd stays open as long as the line is wired.
    _resample: EventFd,
}

struct Attached {
    name: String,
    intx: Option<Intx>,
    dev: Arc<Mutex<VfioPciDevice>>,
    shared: SharedPciDevice,
    /// Where each BAR is registered now, on the MMIO bus or (I/O BARs) the PIO bus.
    bars: HashMap<usize, u64>,
    slots: Vec<Slot>,
    vectors: Vec<Vector>,
}

#[derive(Default)]
struct State {
    devices: HashMap<PciAddress, Attached>,
    /// Live MSI routes by GSI.
    routes: BTreeMap<u32, MsiMessage>,
    next_slot: u32,
}

/// What guest writes change, applied to KVM and the buses.
pub struct Wiring {
    vm_fd: Arc<VmFd>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    state: Mutex<State>,
}

/// Bus 0 and everything wired for it.
pub struct PciSystem {
    bus: Arc<PciBus>,
    wiring: Arc<Wiring>,
}

impl PciSystem {
    /// Bus 0 (with its host bridge at 00:00.0), its configuration ports on `pio` and its
    /// ECAM window on `mmio`; writes through either reach the same effects handler. BARs go
    /// on the same two buses.
    pub fn new(vm_fd: Arc<VmFd>, pio: Arc<Bus>, mmio: Arc<Bus>) -> Result<Self, PciError> {
        let bus = Arc::new(PciBus::new());
        let wiring = Arc::new(Wiring {
            vm_fd,
            pio,
            mmio,
            state: Mutex::new(State {
                next_slot: FIRST_BAR_SLOT,
                ..State::default()
            }),
        });
        let io = PciConfigIo::new(bus.clone()).with_effects_handler(wiring.handler());
        wiring
            .pio
            .insert(
                Arc::new(Mutex::new(io)),
                CONFIG_IO_BASE.into(),
                CONFIG_IO_LEN.into(),
            )
            .map_err(PciError::ConfigPorts)?;
        let ecam = PciEcam::new(bus.clone()).with_effects_handler(wiring.handler());
        wiring
            .mmio
            .insert(
                Arc::new(Mutex::new(ecam)),
                layout::PCI_ECAM_START,
                layout::PCI_ECAM_SIZE,
            )
            .map_err(PciError::Ecam)?;
        Ok(PciSystem { bus, wiring })
    }

    /// Puts a passthrough function on the bus: places its BARs (as firmware would), maps
    /// its mmap-able BAR parts, and gives each interrupt vector a GSI.
    pub fn attach_vfio(
        &self,
        dev: VfioPciDevice,
        resources: &mut ResourceAllocator,
    ) -> Result<PciAddress, PciError> {
        let name = dev.backend().name().to_string();
        let dev = Arc::new(Mutex::new(dev));
        let mut placed = Vec::new();
        {
            let mut d = lock(&dev);
            for bar in d.bars() {
                let addr = resources
                    .allocate_bar(&name, bar.index, bar.spec)
                    .map_err(PciError::BarSpace)?;
                d.place_bar(bar.index, addr)
                    .map_err(|source| PciError::Bar {
                        device: name.clone(),
                        index: bar.index,
                        addr,
                        source,
                    })?;
                tracing::debug!(
                    "{name}: BAR{} ({}, {:#x} bytes) at {addr:#x}",
                    bar.index,
                    bar.spec.kind,
                    bar.spec.size
                );
                placed.push((bar.index, bar.spec, addr));
            }
        }
        let mut vectors = Vec::new();
        for v in lock(&dev).irq_vectors() {
            let gsi = resources
                .gsi
                .allocate_msi()
                .map_err(|source| PciError::Resource {
                    device: name.clone(),
                    source,
                })?;
            vectors.push(Vector {
                gsi,
                fd: v.fd,
                irqfd: false,
            });
        }
        // Not in the match scrutinee: its temporary guard would live through the match and
        // wire_intx, which locks the device again.
        let intx_pin = lock(&dev).intx_only();
        let intx = match intx_pin {
            Some(pin) if vectors.is_empty() => Some(self.wire_intx(&name, &dev, pin, resources)?),
            _ => None,
        };
        let shared: SharedPciDevice = dev.clone();
        let address = self.bus.add_device(shared.clone())?;
        let mut state = lock(&self.wiring.state);
        let mut slots = Vec::new();
        for m in lock(&dev).mmaps() {
            slots.push(Slot {
                slot: state.next_slot,
                bar: m.bar,
                offset: m.offset,
                size: m.size,
                host_addr: m.host_addr,
                gpa: None,
            });
            state.next_slot += 1;
        }
        state.devices.insert(
            address,
            Attached {
                name: name.clone(),
                intx,
                dev,
                shared,
                bars: HashMap::new(),
                slots,
                vectors,
            },
        );
        drop(state);
        for (index, spec, addr) in placed {
            self.wiring.move_bar(address, index, spec, None, Some(addr));
        }
        tracing::info!("{name}: attached at {address}");
        Ok(address)
    }

    /// Legacy lines a device without MSI/MSI-X gets, tried in order: free on the PC
    /// platform (COM1 is 4).
    const INTX_GSIS: [u32; 4] = [10, 11, 9, 5];

    fn wire_intx(
        &self,
        name: &str,
        dev: &Mutex<VfioPciDevice>,
        pin: u8,
        resources: &mut ResourceAllocator,
    ) -> Result<Intx, PciError> {
        let gsi = Self::INTX_GSIS
            .iter()
            .find_map(|&g| resources.gsi.claim_legacy(g).ok())
            .ok_or_else(|| PciError::Resource {
                device: name.to_string(),
                source: ResourceError::GsiExhausted,
            })?;
        let kvm = |what, source| PciError::Kvm {
            device: name.to_string(),
            what,
            source,
        };
        let efd = || EventFd::new(libc::EFD_NONBLOCK).map_err(|e| kvm("eventfd", e.into()));
        let (trigger, resample) = (efd()?, efd()?);
        self.wiring
            .vm_fd
            .register_irqfd_with_resample(&trigger, &resample, gsi)
            .map_err(|e| kvm("KVM_IRQFD with resample", e))?;
        lock(dev)
            .enable_intx(gsi as u8, &trigger, &resample)
            .map_err(|source| PciError::Intx { source })?;
        Ok(Intx {
            gsi,
            pin,
            trigger,
            _resample: resample,
        })
    }

    /// INTx lines for the MP table: (slot, pin, IOAPIC pin).
    pub fn intx_lines(&self) -> Vec<PciIntx> {
        lock(&self.wiring.state)
            .devices
            .iter()
            .filter_map(|(addr, d)| {
                d.intx.as_ref().map(|i| PciIntx {
                    slot: addr.device,
                    pin: i.pin,
                    gsi: i.gsi as u8,
                })
            })
            .collect()
    }
}

impl Drop for PciSystem {
    fn drop(&mut self) {
        let mut state = lock(&self.wiring.state);
        let vm_fd = self.wiring.vm_fd.clone();
        for dev in state.devices.values_mut() {
            if let Some(i) = dev.intx.take() {
                let _ = vm_fd.unregister_irqfd(&i.trigger, i.gsi);
            }
            for v in dev.vectors.iter_mut().filter(|v| v.irqfd) {
                let _ = vm_fd.unregister_irqfd(&v.fd, v.gsi);
                v.irqfd = false;
            }
            for s in dev.slots.iter_mut() {
                if s.gpa.take().is_some() {
                    let _ = set_slot(&vm_fd, s.slot, 0, 0, 0);
                }
            }
        }
    }
}

fn set_slot(
    vm_fd: &VmFd,
    slot: u32,
    gpa: u64,
    size: u64,
    host: u64,
) -> Result<(), kvm_ioctls::Error> {
    let region = kvm_userspace_memory_region {
        slot,
        flags: 0,
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: host,
    };
    // SAFETY: `host` is a live mapping of `size` bytes owned by the device model, which stays
    // attached (and mapped) until PciSystem's drop removes the slot; size 0 deletes the slot.
    unsafe { vm_fd.set_user_memory_region(region) }
}

impl Wiring {
    fn handler(self: &Arc<Self>) -> EffectsHandler {
        let wiring = Arc::downgrade(self);
        Arc::new(move |addr, effects| {
            if let Some(w) = wiring.upgrade() {
                w.apply(addr, effects);
            }
        })
    }

    /// Applies what a guest write changed.
    fn apply(self: &Arc<Self>, addr: PciAddress, effects: Effects) {
        for change in &effects.bars {
            self.move_bar(addr, change.index, change.spec, change.old, change.new);
        }
        if effects.msi.is_changed() || effects.msix.is_changed() {
            self.refresh_vectors(addr);
        }
    }

    /// Moves BAR `index` from `old` to `new` (either `None`: it did not or does not decode)
    /// on the bus its kind decodes on.
    fn move_bar(
        self: &Arc<Self>,
        addr: PciAddress,
        index: usize,
        spec: BarSpec,
        old: Option<u64>,
        new: Option<u64>,
    ) {
        let bus = match spec.kind {
            BarKind::Io => &self.pio,
            BarKind::Memory32 | BarKind::Memory64 => &self.mmio,
        };
        let mut state = lock(&self.state);
        let Some(dev) = state.devices.get_mut(&addr) else {
            return;
        };
        if old.is_some() {
            if let Some(base) = dev.bars.remove(&index) {
                bus.remove(base);
            }
            for s in dev.slots.iter_mut().filter(|s| s.bar == index) {
                if s.gpa.take().is_some() {
                    if let Err(e) = set_slot(&self.vm_fd, s.slot, 0, 0, 0) {
                        devices::warn_limited!("{}: removing BAR{index} slot: {e}", dev.name);
                    }
                }
            }
        }
        let Some(base) = new else {
            return;
        };
        let region = PciBarRegion::new(addr, dev.shared.clone(), index, Some(self.handler()));
        match bus.insert(Arc::new(Mutex::new(region)), base, spec.size) {
            Ok(()) => {
                dev.bars.insert(index, base);
            }
            // The guest may program any address, even over other devices: it then simply
            // does not reach this BAR there, as on a real bus with a conflict.
            Err(e) => devices::warn_limited!("{}: BAR{index} at {base:#x}: {e}", dev.name),
        }
        for s in dev.slots.iter_mut().filter(|s| s.bar == index) {
            // Guest-chosen base: an area that would wrap is left trapped.
            let Some(gpa) = base.checked_add(s.offset) else {
                continue;
            };
            match set_slot(&self.vm_fd, s.slot, gpa, s.size, s.host_addr) {
                Ok(()) => s.gpa = Some(gpa),
                Err(e) => {
                    devices::warn_limited!("{}: mapping BAR{index} at {gpa:#x}: {e}", dev.name)
                }
            }
        }
    }

    /// Re-reads a device's vectors and brings routes and irqfds in line with them.
    fn refresh_vectors(&self, addr: PciAddress) {
        let mut state = lock(&self.state);
        let State {
            devices, routes, ..
        } = &mut *state;
        let Some(dev) = devices.get_mut(&addr) else {
            return;
        };
        let live = lock(&dev.dev).irq_vectors();
        for (v, now) in dev.vectors.iter_mut().zip(live) {
            match now.message {
                Some(msg) => {
                    routes.insert(v.gsi, msg);
                }
                None => {
                    routes.remove(&v.gsi);
                }
            }
        }
        // A routing failure skips the irqfds but not the release: a pending vector's signal
        // then waits in its eventfd, which KVM delivers once an irqfd is attached.
        self.route_vectors(dev, routes);
        // Now that the unmasked vectors have their irqfds, what fired while they were masked
        // goes out through them, once.
        lock(&dev.dev).release_pending();
    }

    /// Installs the routing table for `routes` and attaches or detaches each vector's irqfd.
    fn route_vectors(&self, dev: &mut Attached, routes: &BTreeMap<u32, MsiMessage>) {
        let table = match routing_table(routes) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!("{}: building the GSI routing table: {e:?}", dev.name);
                return;
            }
        };
        if let Err(e) = self.vm_fd.set_gsi_routing(&table) {
            tracing::error!("{}: KVM_SET_GSI_ROUTING: {e}", dev.name);
            return;
        }
        // irqfds only for vectors that can fire: a masked vector's signals wait in its
        // eventfd, where the device model finds them and sets the vector's pending bit
        // (see the module doc of devices::vfio::pci).
        for v in dev.vectors.iter_mut() {
            let want = routes.contains_key(&v.gsi);
            let result = match (want, v.irqfd) {
                (true, false) => self.vm_fd.register_irqfd(&v.fd, v.gsi),
                (false, true) => self.vm_fd.unregister_irqfd(&v.fd, v.gsi),
                _ => continue,
            };
            match result {
                Ok(()) => v.irqfd = want,
                Err(e) => tracing::error!("{}: irqfd for GSI {}: {e}", dev.name, v.gsi),
            }
        }
    }
}

/// The legacy routes KVM starts with (PIC and IOAPIC pins), plus `msi`.
fn routing_table(
    msi: &BTreeMap<u32, MsiMessage>,
) -> Result<KvmIrqRouting, vmm_sys_util::fam::Error> {
    let mut entries = Vec::new();
    let irqchip = |gsi: u32, chip: u32, pin: u32| {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_IRQCHIP,
            ..Default::default()
        };
        e.u.irqchip.irqchip = chip;
        e.u.irqchip.pin = pin;
        e
    };
    // KVM's default table, which KVM_SET_GSI_ROUTING would otherwise drop: every GSI to
    // the IOAPIC pin of the same number, and GSIs 0..16 to the PICs as well.
    for gsi in 0..LEGACY_GSIS {
        entries.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        if gsi < 8 {
            entries.push(irqchip(gsi, KVM_IRQCHIP_PIC_MASTER, gsi));
        } else if gsi < 16 {
            entries.push(irqchip(gsi, KVM_IRQCHIP_PIC_SLAVE, gsi - 8));
        }
    }
    for (&gsi, m) in msi {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_MSI,
            ..Default::default()
        };
        e.u.msi.address_lo = m.addr as u32;
        e.u.msi.address_hi = (m.addr >> 32) as u32;
        e.u.msi.data = m.data;
        entries.push(e);
    }
    // Within KVM_MAX_IRQ_ROUTES: the GSI allocator stops at resources::MAX_GSI.
    KvmIrqRouting::from_entries(&entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_table_keeps_the_legacy_lines_and_adds_each_vector() {
        let mut msi = BTreeMap::new();
        msi.insert(
            24,
            MsiMessage {
                addr: 0xfee0_0000,
                data: 0x41,
                masked: false,
            },
        );
        let t = routing_table(&msi).unwrap();
        let entries = t.as_slice();
        // Serial (GSI 4) still reaches both the PIC and the IOAPIC.
        let gsi4: Vec<_> = entries.iter().filter(|e| e.gsi == 4).collect();
        assert_eq!(gsi4.len(), 2);
        let last = entries.last().unwrap();
        assert_eq!((last.gsi, last.type_), (24, KVM_IRQ_ROUTING_MSI));
        // SAFETY: the entry was written as an MSI route.
        let (lo, data) = unsafe { (last.u.msi.address_lo, last.u.msi.data) };
        assert_eq!((lo, data), (0xfee0_0000, 0x41));
    }
}
