//! The VM and its staged builder. Each stage is one method with its own error variant, so the
//! caller can time and report them separately:
//!
//! ```text
//! Vm::create        kvm      open /dev/kvm, create the VM, TSS/identity map, irqchip, PIT
//! register_memory   memory   hand guest RAM (built by the caller) to KVM
//! attach_devices    devices  serial (irqfd GSI 4), i8042, debug exit, boot marks, event loop
//!                   (pinning goes here, in the caller, using guest_memory())
//! load              load     kernel, command line, initrd, boot info, GDT, page tables, MP table
//! create_vcpus      vcpus    create and configure every vCPU (entry registers on the BSP)
//! run_until_exit    run      see run.rs
//! ```
//!
//! `Vm::new` runs the first three. A stage called out of order is an error, not a panic.

use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use devices::serial::{stdin_is_pollable, SharedBuffer, StdinFd};
use devices::{
    BootMarks, Bus, BusError, DebugExit, ExitNotifier, ExitReason, GuestMarks, SerialDevice,
    SerialInput, I8042,
};
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use guest_abi::ports;
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::x86_64::mptable;
use crate::layout;
use crate::loader::{self, BootProtocol, BootSetup, ImageSource, LoadError, LoadRequest};
use crate::pci::{PciError, PciSystem};
use crate::resources::{ResourceAllocator, ResourceError};
use crate::vcpu::{self, Vcpu, VcpuError, VcpuHandle};

/// Where the guest's serial output goes.
#[derive(Clone, Debug, Default)]
pub enum SerialOut {
    /// The VMM's stdout.
    #[default]
    Stdout,
    /// A file, created or truncated.
    File(PathBuf),
    /// An in-memory buffer (tests, reports).
    Buffer(SharedBuffer),
    /// Discarded.
    Sink,
}

/// Where the guest's serial input comes from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SerialIn {
    /// No input.
    #[default]
    None,
    /// The VMM's stdin, when it is a terminal, pipe or socket (not /dev/null or a file). A
    /// terminal is switched to raw input for the run.
    Stdin,
}

/// What to build.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// The kernel (a file or in-memory bytes such as the probe guest).
    pub kernel: ImageSource,
    /// The initrd.
    pub initrd: Option<ImageSource>,
    /// Kernel command line.
    pub cmdline: String,
    /// vCPUs (1..=254).
    pub cpus: u8,
    /// Entry protocol.
    pub boot_protocol: BootProtocol,
    /// Serial output.
    pub serial_out: SerialOut,
    /// Serial input.
    pub serial_in: SerialIn,
}

/// `kvm` stage errors.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// /dev/kvm is missing.
    #[error("/dev/kvm does not exist: load the kvm module (kvm_intel or kvm_amd) and enable virtualization in the firmware")]
    NoDevice,
    /// /dev/kvm is not accessible.
    #[error("permission denied opening /dev/kvm: add the user to the 'kvm' group or run as root")]
    Permission,
    /// Opening /dev/kvm failed otherwise.
    #[error("opening /dev/kvm failed: {0}")]
    Open(kvm_ioctls::Error),
    /// A required capability is missing.
    #[error("KVM lacks the {0} capability this VMM needs")]
    MissingCap(&'static str),
    /// Too many or zero CPUs.
    #[error("{requested} vCPUs requested; this VMM supports 1..={max} here")]
    CpuCount {
        /// Requested.
        requested: u8,
        /// Maximum.
        max: usize,
    },
    /// A VM-level ioctl failed.
    #[error("{what} failed: {source}")]
    Ioctl {
        /// Which ioctl.
        what: &'static str,
        /// Why.
        source: kvm_ioctls::Error,
    },
}

/// `memory` stage errors.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The size does not fit the layout.
    #[error(transparent)]
    Layout(#[from] layout::LayoutError),
    /// RAM is missing where the layout needs it, or present in the MMIO hole.
    #[error("guest memory does not follow the layout: {0}")]
    Shape(String),
    /// KVM_SET_USER_MEMORY_REGION failed.
    #[error("registering guest memory slot {slot} ({start:#x}, {size:#x} bytes) with KVM failed: {source}")]
    Register {
        /// Slot.
        slot: u32,
        /// Guest address.
        start: u64,
        /// Size.
        size: u64,
        /// Why.
        source: kvm_ioctls::Error,
    },
}

/// `devices` stage errors.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// An EventFd could not be created.
    #[error("creating an eventfd for {what}: {source}")]
    EventFd {
        /// For what.
        what: &'static str,
        /// Why.
        source: io::Error,
    },
    /// The serial log file could not be created.
    #[error("cannot create serial output file {path}: {source}")]
    SerialFile {
        /// Path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A bus range clash.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// GSI allocation.
    #[error(transparent)]
    Resource(#[from] ResourceError),
    /// KVM_IRQFD failed.
    #[error("registering the irqfd for GSI {gsi} failed: {source}")]
    Irqfd {
        /// GSI.
        gsi: u32,
        /// Why.
        source: kvm_ioctls::Error,
    },
    /// The event manager could not be created.
    #[error("creating the event loop failed: {0:?}")]
    EventManager(event_manager::Error),
    /// PCI bus or device set-up.
    #[error(transparent)]
    Pci(#[from] PciError),
    /// A passthrough device could not be modelled.
    #[error(transparent)]
    Vfio(#[from] devices::vfio::VfioPciError),
}

/// One error type over all stages; the variant names the stage.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `kvm` stage.
    #[error("kvm: {0}")]
    Kvm(#[from] KvmError),
    /// `memory` stage.
    #[error("memory: {0}")]
    Memory(#[from] MemoryError),
    /// `devices` stage.
    #[error("devices: {0}")]
    Devices(#[from] DeviceError),
    /// `load` stage.
    #[error("load: {0}")]
    Load(#[from] LoadError),
    /// `vcpus` stage.
    #[error("vcpus: {0}")]
    Vcpus(#[from] VcpuError),
    /// A stage called before the one it depends on.
    #[error("{stage} called before {needs}")]
    OutOfOrder {
        /// The stage called.
        stage: &'static str,
        /// What must come first.
        needs: &'static str,
    },
}

/// Event-loop subscriber type.
pub type Subscriber = Box<dyn MutEventSubscriber + Send>;

/// Drains the exit EventFd so epoll stops reporting it; the reason itself is read by the loop.
struct ExitSubscriber(Arc<ExitNotifier>);

impl MutEventSubscriber for ExitSubscriber {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        self.0.consume();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.0.event_fd(), EventSet::IN)) {
            tracing::error!("cannot watch the exit eventfd: {e:?}");
        }
    }
}

/// A handle other threads (or a signal handler) use to stop the VM.
#[derive(Clone, Debug)]
pub struct StopHandle(Arc<ExitNotifier>);

impl StopHandle {
    /// Stops the VM with [`ExitReason::Stop`].
    pub fn stop(&self) {
        self.0.request(ExitReason::Stop);
    }

    /// Stops the VM for `reason` (e.g. `ExitReason::Signal(libc::SIGTERM)`). Lock-free: an
    /// atomic compare-exchange and an eventfd write, so a signal handler may call it.
    pub fn request(&self, reason: ExitReason) {
        self.0.request(reason);
    }
}

/// A VM under construction or running.
///
/// Field order is drop order: vCPUs and devices go before the VM fd, and the VM fd before the
/// guest memory it maps.
pub struct Vm {
    pub(crate) running: Vec<VcpuHandle>,
    pub(crate) vcpus: Vec<Vcpu>,
    pub(crate) event_manager: Option<EventManager<Subscriber>>,
    pub(crate) stdin_attached: bool,
    serial: Option<Arc<Mutex<SerialDevice>>>,
    pci: Option<PciSystem>,
    irqfds: Vec<(EventFd, u32)>,
    pub(crate) pio: Arc<Bus>,
    pub(crate) mmio: Arc<Bus>,
    pub(crate) exit: Arc<ExitNotifier>,
    marks: Arc<GuestMarks>,
    resources: Option<ResourceAllocator>,
    boot: Option<BootSetup>,
    supported_cpuid: CpuId,
    vm_fd: Arc<VmFd>,
    _kvm: Kvm,
    guest_mem: Option<GuestMemoryMmap>,
    config: VmConfig,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("cpus", &self.config.cpus)
            .field("memory_registered", &self.guest_mem.is_some())
            .field("devices", &self.serial.is_some())
            .field("boot", &self.boot)
            .field("vcpus", &self.vcpus.len())
            .field("running", &self.running.len())
            .finish()
    }
}

fn open_kvm() -> Result<Kvm, KvmError> {
    Kvm::new().map_err(open_error)
}

fn open_error(e: kvm_ioctls::Error) -> KvmError {
    match e.errno() {
        libc::ENOENT | libc::ENXIO | libc::ENODEV => KvmError::NoDevice,
        libc::EACCES | libc::EPERM => KvmError::Permission,
        _ => KvmError::Open(e),
    }
}

impl Vm {
    /// Stages `kvm`, `memory` and `devices`.
    pub fn new(
        config: &VmConfig,
        guest_mem: GuestMemoryMmap,
        marks: Arc<GuestMarks>,
    ) -> Result<Vm, VmError> {
        let mut vm = Vm::create(config, marks)?;
        vm.register_memory(guest_mem)?;
        vm.attach_devices()?;
        Ok(vm)
    }

    /// Stage `kvm`: opens /dev/kvm and creates the VM with its in-kernel irqchip and PIT.
    pub fn create(config: &VmConfig, marks: Arc<GuestMarks>) -> Result<Vm, VmError> {
        let kvm = open_kvm()?;
        for (cap, name) in [
            (Cap::Irqchip, "IRQCHIP"),
            (Cap::UserMemory, "USER_MEMORY"),
            (Cap::SetTssAddr, "SET_TSS_ADDR"),
            (Cap::Pit2, "PIT2"),
            (Cap::Irqfd, "IRQFD"),
            (Cap::ImmediateExit, "IMMEDIATE_EXIT"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(KvmError::MissingCap(name).into());
            }
        }
        let max = kvm.get_max_vcpus().min(usize::from(mptable::MAX_CPUS));
        if config.cpus == 0 || usize::from(config.cpus) > max {
            return Err(KvmError::CpuCount {
                requested: config.cpus,
                max,
            }
            .into());
        }
        let ioctl = |what| move |source| KvmError::Ioctl { what, source };
        let vm_fd = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
        vm_fd
            .set_tss_address(layout::KVM_TSS_ADDR as usize)
            .map_err(ioctl("KVM_SET_TSS_ADDR"))?;
        vm_fd
            .set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDR)
            .map_err(ioctl("KVM_SET_IDENTITY_MAP_ADDR"))?;
        vm_fd
            .create_irq_chip()
            .map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
        // The dummy speaker port (0x61) stays in the kernel: Linux polls it to calibrate.
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm_fd.create_pit2(pit).map_err(ioctl("KVM_CREATE_PIT2"))?;
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))?;
        let exit = ExitNotifier::new().map_err(|source| DeviceError::EventFd {
            what: "the exit notifier",
            source,
        })?;
        Ok(Vm {
            running: Vec::new(),
            vcpus: Vec::new(),
            event_manager: None,
            stdin_attached: false,
            serial: None,
            pci: None,
            irqfds: Vec::new(),
            pio: Arc::new(Bus::new("pio")),
            mmio: Arc::new(Bus::new("mmio")),
            exit: Arc::new(exit),
            marks,
            resources: None,
            boot: None,
            supported_cpuid,
            vm_fd: Arc::new(vm_fd),
            _kvm: kvm,
            guest_mem: None,
            config: config.clone(),
        })
    }

    /// Stage `memory`: checks `guest_mem` against the layout and registers every region with
    /// KVM (slots from 0).
    pub fn register_memory(&mut self, guest_mem: GuestMemoryMmap) -> Result<(), VmError> {
        let size = loader::mem_size(&guest_mem);
        layout::check_mem_size(size).map_err(MemoryError::from)?;
        check_shape(&guest_mem, size)?;
        for (slot, region) in guest_mem.iter().enumerate() {
            let slot = slot as u32;
            let start = region.start_addr().raw_value();
            let host = guest_mem
                .get_host_address(region.start_addr())
                .map_err(|e| MemoryError::Shape(format!("region at {start:#x}: {e}")))?;
            let mr = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: start,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mapping of `memory_size` bytes owned by `guest_mem`,
            // which this Vm keeps until after the VM fd is closed (field order).
            unsafe { self.vm_fd.set_user_memory_region(mr) }.map_err(|source| {
                MemoryError::Register {
                    slot,
                    start,
                    size: region.len(),
                    source,
                }
            })?;
        }
        self.resources = Some(ResourceAllocator::new(size));
        self.guest_mem = Some(guest_mem);
        Ok(())
    }

    /// Stage `devices`: the legacy devices on the PIO bus, the serial irqfd and the event loop.
    pub fn attach_devices(&mut self) -> Result<(), VmError> {
        let resources = self.resources.as_mut().ok_or(VmError::OutOfOrder {
            stage: "attach_devices",
            needs: "register_memory",
        })?;
        if self.serial.is_some() {
            return Err(VmError::OutOfOrder {
                stage: "attach_devices",
                needs: "a VM without devices (it was called twice)",
            });
        }
        let gsi = resources
            .gsi
            .claim_legacy(ports::SERIAL_IRQ)
            .map_err(DeviceError::from)?;
        let irq = EventFd::new(EFD_NONBLOCK).map_err(|source| DeviceError::EventFd {
            what: "the serial interrupt",
            source,
        })?;
        let irq_dev = irq.try_clone().map_err(|source| DeviceError::EventFd {
            what: "the serial interrupt",
            source,
        })?;
        self.vm_fd
            .register_irqfd(&irq, gsi)
            .map_err(|source| DeviceError::Irqfd { gsi, source })?;
        let out = serial_writer(&self.config.serial_out)?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            irq_dev,
            out,
            Arc::clone(&self.marks),
        )));

        let pio = &self.pio;
        pio.insert(
            serial.clone(),
            ports::SERIAL_COM1.into(),
            ports::SERIAL_LEN.into(),
        )
        .map_err(DeviceError::from)?;
        let i8042 = Arc::new(Mutex::new(I8042::new(Arc::clone(&self.exit))));
        pio.insert(i8042, ports::I8042_BASE.into(), ports::I8042_LEN.into())
            .map_err(DeviceError::from)?;
        let debug_exit = Arc::new(Mutex::new(DebugExit::new(Arc::clone(&self.exit))));
        pio.insert(debug_exit, ports::DEBUG_EXIT.into(), 1)
            .map_err(DeviceError::from)?;
        let boot_marks = Arc::new(Mutex::new(BootMarks::new(Arc::clone(&self.marks))));
        pio.insert(boot_marks, ports::BOOT_MARKS.into(), 1)
            .map_err(DeviceError::from)?;

        let mut em = EventManager::<Subscriber>::new().map_err(DeviceError::EventManager)?;
        em.add_subscriber(Box::new(ExitSubscriber(Arc::clone(&self.exit))));
        if self.config.serial_in == SerialIn::Stdin && stdin_is_pollable() {
            em.add_subscriber(Box::new(SerialInput::new(StdinFd, serial.clone())));
            self.stdin_attached = true;
        }
        self.pci = Some(
            PciSystem::new(self.vm_fd.clone(), &self.pio, self.mmio.clone())
                .map_err(DeviceError::from)?,
        );
        // KVM holds its own reference to the file; ours is kept to unregister it later.
        self.irqfds.push((irq, gsi));
        self.event_manager = Some(em);
        self.serial = Some(serial);
        Ok(())
    }

    /// Puts a passthrough function on PCI bus 0 (stage `devices`, after `attach_devices`).
    pub fn attach_vfio(
        &mut self,
        dev: devices::vfio::VfioPciDevice,
    ) -> Result<devices::pci::PciAddress, VmError> {
        let (Some(pci), Some(resources)) = (self.pci.as_ref(), self.resources.as_mut()) else {
            return Err(VmError::OutOfOrder {
                stage: "attach_vfio",
                needs: "attach_devices",
            });
        };
        Ok(pci.attach_vfio(dev, resources).map_err(DeviceError::from)?)
    }

    /// Stage `load`: kernel, initrd, command line and boot tables into guest memory.
    pub fn load(&mut self) -> Result<BootSetup, VmError> {
        let mem = self.guest_mem.as_ref().ok_or(VmError::OutOfOrder {
            stage: "load",
            needs: "register_memory",
        })?;
        let intx = self
            .pci
            .as_ref()
            .map(PciSystem::intx_lines)
            .unwrap_or_default();
        let req = LoadRequest {
            kernel: &self.config.kernel,
            initrd: self.config.initrd.as_ref(),
            cmdline: &self.config.cmdline,
            protocol: self.config.boot_protocol,
            cpus: self.config.cpus,
            pci_intx: &intx,
        };
        let setup = loader::load(mem, &req)?;
        self.boot = Some(setup);
        Ok(setup)
    }

    /// Stage `vcpus`: creates every vCPU and configures it; the BSP gets the entry registers.
    pub fn create_vcpus(&mut self) -> Result<(), VmError> {
        let boot = self.boot.ok_or(VmError::OutOfOrder {
            stage: "create_vcpus",
            needs: "load",
        })?;
        if !self.vcpus.is_empty() || !self.running.is_empty() {
            return Err(VmError::OutOfOrder {
                stage: "create_vcpus",
                needs: "a VM without vCPUs (it was called twice)",
            });
        }
        vcpu::install_kick_handler()?;
        for index in 0..u32::from(self.config.cpus) {
            let v = Vcpu::new(&self.vm_fd, index)?;
            v.configure(
                &self.supported_cpuid,
                self.config.cpus,
                (index == 0).then_some(&boot),
            )?;
            self.vcpus.push(v);
        }
        Ok(())
    }

    /// Guest RAM, once registered (for pinning and DMA setup).
    pub fn guest_memory(&self) -> Option<&GuestMemoryMmap> {
        self.guest_mem.as_ref()
    }

    /// The KVM VM fd (for VFIO, irqfds, ioeventfds).
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm_fd
    }

    /// The port I/O bus.
    pub fn pio_bus(&self) -> &Arc<Bus> {
        &self.pio
    }

    /// PCI bus 0 and its wiring, once `attach_devices` ran.
    pub fn pci(&self) -> Option<&PciSystem> {
        self.pci.as_ref()
    }

    /// The MMIO bus.
    pub fn mmio_bus(&self) -> &Arc<Bus> {
        &self.mmio
    }

    /// MMIO windows and GSIs, once memory is registered.
    pub fn resources_mut(&mut self) -> Option<&mut ResourceAllocator> {
        self.resources.as_mut()
    }

    /// Guest marks (first serial byte, ready, others).
    pub fn marks(&self) -> &Arc<GuestMarks> {
        &self.marks
    }

    /// Where the loader put things, once loaded.
    pub fn boot_setup(&self) -> Option<&BootSetup> {
        self.boot.as_ref()
    }

    /// Asks a running (or about to run) VM to stop: `run_until_exit` returns
    /// [`crate::run::VmExit::Stopped`]. From another thread use [`Vm::stop_handle`].
    pub fn stop(&self) {
        self.exit.request(ExitReason::Stop);
    }

    /// A handle to stop the VM from elsewhere (another thread, a signal handler).
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(Arc::clone(&self.exit))
    }

    /// The shared exit notifier (its EventFd becomes readable when the VM must stop).
    pub fn exit_notifier(&self) -> &Arc<ExitNotifier> {
        &self.exit
    }

    /// Adds a subscriber (e.g. a signalfd) to the event loop run by `run_until_exit`.
    pub fn add_subscriber(&mut self, s: Subscriber) -> Result<(), VmError> {
        let em = self.event_manager.as_mut().ok_or(VmError::OutOfOrder {
            stage: "add_subscriber",
            needs: "attach_devices",
        })?;
        em.add_subscriber(s);
        Ok(())
    }

    /// Whether the serial input reads the VMM's stdin.
    pub fn stdin_attached(&self) -> bool {
        self.stdin_attached
    }

    /// The configuration the VM was built from.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }
}

/// Requires the low range [0, min(size, 3 GiB)) and any RAM above 4 GiB to be backed, and
/// nothing inside the 32-bit MMIO hole.
fn check_shape(mem: &GuestMemoryMmap, size: u64) -> Result<(), MemoryError> {
    for (start, len) in layout::ram_ranges(size) {
        let covered = usize::try_from(len)
            .ok()
            .is_some_and(|l| mem.check_range(start, l));
        if !covered {
            return Err(MemoryError::Shape(format!(
                "{:#x}..{:#x} must be RAM for a {size:#x}-byte guest",
                start.0,
                start.0 + len
            )));
        }
    }
    let hole = layout::MMIO32_START..layout::MMIO32_END;
    for r in mem.iter() {
        let (s, e) = (r.start_addr().0, r.start_addr().0 + r.len());
        if s < hole.end && hole.start < e {
            return Err(MemoryError::Shape(format!(
                "region {s:#x}..{e:#x} overlaps the 32-bit MMIO hole {:#x}..{:#x}",
                hole.start, hole.end
            )));
        }
    }
    Ok(())
}

fn serial_writer(out: &SerialOut) -> Result<Box<dyn Write + Send>, DeviceError> {
    Ok(match out {
        SerialOut::Stdout => Box::new(io::stdout()),
        SerialOut::File(path) => {
            Box::new(
                File::create(path).map_err(|source| DeviceError::SerialFile {
                    path: path.clone(),
                    source,
                })?,
            )
        }
        SerialOut::Buffer(b) => Box::new(b.clone()),
        SerialOut::Sink => Box::new(io::sink()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_kvm_open_errors_say_what_to_do() {
        let e = |n| open_error(kvm_ioctls::Error::new(n)).to_string();
        assert!(e(libc::ENOENT).starts_with("/dev/kvm does not exist: load the kvm module"));
        assert!(e(libc::EACCES).contains("add the user to the 'kvm' group or run as root"));
        assert!(e(libc::EBUSY).starts_with("opening /dev/kvm failed"));
    }
}
