//! The machine the guest sees around its CPUs and RAM (stage `devices`, before passthrough
//! functions are added): the port I/O and MMIO buses, the legacy devices on them (COM1 with
//! its irqfd, the i8042 reset line, the debug-exit and boot-marks ports), PCI bus 0 with its
//! config ports and ECAM window, the allocator of BAR space and GSIs, and the event loop the
//! run stage waits in.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

pub use devices::serial::output::DEFAULT_BUFFER_BYTES;
use devices::serial::output::{CappedLog, OutputHandle, OutputStats, FINISH_STALL};
use devices::serial::{stdin_is_pollable, SharedBuffer, StdinFd};
use devices::{
    BootMarks, Bus, BusError, DebugExit, ExitNotifier, GuestMarks, SerialDevice, SerialInput, I8042,
};
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use guest_abi::ports;
use pinning::{Classify, ErrorClass};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::allocator::{ResourceAllocator, ResourceError};
use crate::arch::x86_64::mptable::PciIntx;
use crate::memory::MemoryLayout;
use crate::pci::{PciError, PciSystem};
use crate::vstate::vm::Vm;

/// Where the guest's serial output goes. Stdout and a file are written by a thread of their
/// own through a ring (`VmConfig::serial_buffer`, [`DEFAULT_BUFFER_BYTES`] unless a test asks
/// for less): a reader that does not keep up loses output (counted in the report), never
/// stops a vCPU.
#[derive(Clone, Debug, Default)]
pub enum SerialOut {
    /// The VMM's stdout.
    #[default]
    Stdout,
    /// A file, created or truncated, cut after `max` bytes with a marker line.
    File { path: PathBuf, max: u64 },
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

/// Why the platform could not be put together.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    #[error("creating an eventfd for {what} failed: {source}")]
    EventFd {
        what: &'static str,
        source: io::Error,
    },
    #[error(
        "cannot create the serial output file {path}: {source}; give --serial-log a writable path"
    )]
    SerialFile { path: PathBuf, source: io::Error },
    #[error("starting the serial output thread failed: {0}")]
    SerialThread(io::Error),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Resource(#[from] ResourceError),
    #[error("registering the irqfd for GSI {gsi} failed: {source}")]
    Irqfd { gsi: u32, source: kvm_ioctls::Error },
    #[error("creating the event loop failed: {0:?}")]
    EventManager(event_manager::Error),
    #[error(transparent)]
    Pci(#[from] PciError),
}

impl Classify for PlatformError {
    fn class(&self) -> ErrorClass {
        match self {
            PlatformError::SerialFile { .. } => ErrorClass::User,
            _ => ErrorClass::Internal,
        }
    }
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

/// The buses and everything on them.
pub struct Platform {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub pci: PciSystem,
    pub allocator: ResourceAllocator,
    pub event_manager: EventManager<Subscriber>,
    /// Whether the serial input reads the VMM's stdin (the run puts a terminal in raw mode).
    pub stdin_attached: bool,
    /// The serial output's writer thread (stdout or a file).
    serial_output: Option<OutputHandle>,
    // KVM holds its own reference to the file; ours keeps the line's eventfd alive.
    _serial_irq: EventFd,
}

impl Platform {
    /// Puts the legacy devices on the buses, wires COM1's interrupt, and creates PCI bus 0
    /// and the event loop.
    pub fn new(
        vm: &Vm,
        layout: &MemoryLayout,
        serial_out: &SerialOut,
        serial_buffer: usize,
        serial_in: SerialIn,
        marks: &Arc<GuestMarks>,
    ) -> Result<Platform, PlatformError> {
        let mut allocator = ResourceAllocator::new(layout)?;
        let gsi = allocator.gsi.claim_legacy(ports::SERIAL_IRQ)?;
        let eventfd = |what| move |source| PlatformError::EventFd { what, source };
        let irq = EventFd::new(EFD_NONBLOCK).map_err(eventfd("the serial interrupt"))?;
        let irq_dev = irq.try_clone().map_err(eventfd("the serial interrupt"))?;
        vm.fd()
            .register_irqfd(&irq, gsi)
            .map_err(|source| PlatformError::Irqfd { gsi, source })?;
        let (out, serial_output) = serial_writer(serial_out, serial_buffer)?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            irq_dev,
            out,
            Arc::clone(marks),
        )));

        let pio = Arc::new(Bus::new("pio"));
        let mmio = Arc::new(Bus::new("mmio"));
        pio.insert(
            serial.clone(),
            ports::SERIAL_COM1.into(),
            ports::SERIAL_LEN.into(),
        )?;
        let i8042 = Arc::new(Mutex::new(I8042::new(Arc::clone(vm.exit()))));
        pio.insert(i8042, ports::I8042_BASE.into(), ports::I8042_LEN.into())?;
        let debug_exit = Arc::new(Mutex::new(DebugExit::new(Arc::clone(vm.exit()))));
        pio.insert(debug_exit, ports::DEBUG_EXIT.into(), 1)?;
        let boot_marks = Arc::new(Mutex::new(BootMarks::new(Arc::clone(marks))));
        pio.insert(boot_marks, ports::BOOT_MARKS.into(), 1)?;

        let mut event_manager =
            EventManager::<Subscriber>::new().map_err(PlatformError::EventManager)?;
        event_manager.add_subscriber(Box::new(ExitSubscriber(Arc::clone(vm.exit()))));
        let stdin_attached = serial_in == SerialIn::Stdin && stdin_is_pollable();
        if stdin_attached {
            event_manager.add_subscriber(Box::new(SerialInput::new(StdinFd, serial)));
        }
        let pci = PciSystem::new(vm.fd().clone(), pio.clone(), mmio.clone())?;
        Ok(Platform {
            pio,
            mmio,
            pci,
            allocator,
            event_manager,
            stdin_attached,
            serial_output,
            _serial_irq: irq,
        })
    }

    /// Puts a passthrough function on PCI bus 0, its BARs and GSIs from this allocator.
    pub fn attach_vfio(
        &mut self,
        dev: devices::vfio::VfioPciDevice,
    ) -> Result<devices::pci::PciAddress, PciError> {
        self.pci.attach_vfio(dev, &mut self.allocator)
    }

    /// Once the vCPUs are gone: waits until the serial output is written out, within the
    /// bounds of [`OutputHandle::finish`] (a console nobody reads cannot hold the exit), and
    /// says what became of it.
    pub fn finish_serial(&mut self) -> OutputStats {
        self.serial_output
            .as_mut()
            .map(|h| h.finish(FINISH_STALL))
            .unwrap_or_default()
    }

    /// PCI INTx lines, for the MP table and the DSDT's `_PRT`.
    pub fn intx_lines(&self) -> Vec<PciIntx> {
        self.pci.intx_lines()
    }
}

type SerialWriter = (Box<dyn Write + Send>, Option<OutputHandle>);

fn serial_writer(out: &SerialOut, buffer: usize) -> Result<SerialWriter, PlatformError> {
    let (sink, cut): (Box<dyn Write + Send>, _) = match out {
        SerialOut::Stdout => match io::stdout().as_fd().try_clone_to_owned() {
            // A descriptor of its own: the writer thread, blocked on a full pipe, must not
            // hold std's stdout lock.
            Ok(fd) => (Box::new(File::from(fd)), None),
            // A closed stdout discards output, as std's own stdout does.
            Err(e) if e.raw_os_error() == Some(libc::EBADF) => {
                return Ok((Box::new(io::sink()), None))
            }
            Err(e) => return Err(PlatformError::SerialThread(e)),
        },
        SerialOut::File { path, max } => {
            let file = File::create(path).map_err(|source| PlatformError::SerialFile {
                path: path.clone(),
                source,
            })?;
            let log = CappedLog::new(file, *max);
            let cut = log.cut_counter();
            (Box::new(log), Some(cut))
        }
        SerialOut::Buffer(b) => return Ok((Box::new(b.clone()), None)),
        SerialOut::Sink => return Ok((Box::new(io::sink()), None)),
    };
    let (writer, handle) =
        OutputHandle::start(sink, buffer, cut).map_err(PlatformError::SerialThread)?;
    Ok((Box::new(writer), Some(handle)))
}
