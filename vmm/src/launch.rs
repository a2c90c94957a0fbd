//! `vmm run`: build the VM stage by stage, each stage timed, pin guest RAM, run the guest,
//! tear down in reverse, and report.
//!
//! Stages (names as in the timeline): `kvm` -> `memory` -> `devices` -> `pin` -> `load` ->
//! `vcpus` -> `run` -> `exit` (teardown). Locals are declared so that they drop in reverse:
//! the VM (vCPUs, devices, KVM fds) first, then the pinning (unlock/unmap), then guest RAM.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::vfio::kernel::IommuKind;
use devices::{ExitReason, GuestMarks};
use guest_abi::probe::{OPT_EXPECT_CPUS, OPT_EXPECT_DMA, OPT_EXPECT_MEM};
use pinning::backend::{MlockBackend, NoneBackend, PopulateBackend};
use pinning::BackendKind;
use pinning::{
    CancelToken, Limits, PinBackend, PinError, PinOptions, Pinner, SignalGuard, ThreadRequest,
};
use vmm_sys_util::eventfd::EventFd;

use crate::layout::{self, E820Kind};
use crate::loader::{BootProtocol, ImageSource};
use crate::memory::{Backing, GuestMemory, MemoryError};
use crate::passthrough::{self, Failure, PassthroughError, UserDevice};
use crate::run::VmExit;
use crate::size::parse_size;
use crate::timeline::{GuestTimes, Report, Timeline, VmSummary};
use crate::vm::{SerialIn, SerialOut, Vm, VmConfig, VmError};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RunPin {
    /// What the devices need: their DMA mapping backend, or `none` without devices.
    Auto,
    /// Nothing: RAM is faulted in by the guest as it goes (no DMA-capable device).
    None,
    /// Fault all of RAM in before the guest starts (MADV_POPULATE_WRITE).
    Populate,
    /// Fault in and lock all of RAM (mlock2(MLOCK_ONFAULT) + parallel populate).
    Mlock,
    /// VFIO type1 container (`--device` with `--iommu type1`): populate, then MAP_DMA.
    Type1,
    /// iommufd IOAS (`--device` with `--iommu iommufd`): parallel IOAS_MAP.
    Iommufd,
    /// vfio-user (`--user-device`): populate, then DMA_MAP messages with the memfd.
    #[value(name = "vfio-user")]
    VfioUser,
}

/// `--backing`: `auto` (memfd when a vfio-user device needs shareable RAM, else anon) or a
/// [`Backing`] by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackingArg {
    Auto,
    Fixed(Backing),
}

impl std::str::FromStr for BackingArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        use clap::ValueEnum;
        if s == "auto" {
            return Ok(BackingArg::Auto);
        }
        Backing::from_str(s, false)
            .map(BackingArg::Fixed)
            .map_err(|_| {
                let names: Vec<_> = Backing::value_variants().iter().map(|b| b.name()).collect();
                format!("`{s}`: use auto, {}", names.join(", "))
            })
    }
}

/// `--iommu` for `--device`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum IommuArg {
    /// VFIO type1 container (/dev/vfio/vfio and the group).
    Type1,
    /// iommufd (/dev/iommu and the device's cdev).
    Iommufd,
}

#[derive(Clone, Debug, clap::Args)]
pub struct RunArgs {
    /// Kernel: an ELF vmlinux (PVH note or 64-bit entry) or a bzImage. Default: the built-in
    /// probe guest.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk (an uncompressed cpio boots fastest).
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line. Default for the probe guest: its self-checks for the memory size
    /// and CPU count; for other kernels: `console=ttyS0`.
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Guest RAM: 256M, 4G, ... (a bare number is MiB). Above 3 GiB, RAM continues at 4 GiB.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub memory: u64,
    /// vCPUs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=254))]
    pub cpus: u8,
    /// What backs guest RAM: auto, anon, thp, memfd, hugetlb, hugetlb-1g. `auto`: memfd when
    /// a vfio-user device is attached (its server maps guest RAM through the memfd), else anon.
    #[arg(long, default_value = "auto")]
    pub backing: BackingArg,
    /// How guest RAM is prepared before the guest runs. `auto`: mapped for the attached
    /// devices by their backend (type1, iommufd or vfio-user), nothing without devices.
    #[arg(long, value_enum, default_value = "auto")]
    pub pin: RunPin,
    /// Pass a host PCI function through kernel VFIO: its sysfs path
    /// (/sys/bus/pci/devices/0000:01:00.0) or PCI address. Repeatable.
    #[arg(long = "device", value_name = "SYSFS_PATH")]
    pub devices: Vec<PathBuf>,
    /// IOMMU interface for --device.
    #[arg(long, value_enum, default_value = "type1")]
    pub iommu: IommuArg,
    /// A PCI function served over vfio-user: `epf` starts the built-in pci-epf-test server
    /// (`vmm device epf`) as a child process; anything else is the path of a server's socket;
    /// `none` attaches nothing. Default with the built-in probe guest: `epf` (unless --device,
    /// or a --pin/--backing that cannot serve it, is given).
    #[arg(long = "user-device", value_name = "epf|SOCKET|none")]
    pub user_devices: Vec<String>,
    /// Testing only: leave the 4 KiB page at this guest address out of the vfio-user DMA map.
    #[arg(long, hide = true, value_parser = parse_addr)]
    pub test_dma_hole: Option<u64>,
    /// Threads for pinning: `auto` (all the limits allow) or a number.
    #[arg(long, default_value = "auto")]
    pub pin_threads: ThreadRequest,
    /// Entry protocol: auto (PVH if the ELF has the note), linux64, pvh.
    #[arg(long, default_value = "auto")]
    pub boot_protocol: BootProtocol,
    /// Write guest serial output to this file instead of stdout.
    #[arg(long)]
    pub serial_log: Option<PathBuf>,
    /// Write the start-up report (JSON) here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Don't print the timeline summary on stderr.
    #[arg(long)]
    pub quiet: bool,
    /// Stop the guest after this many seconds (exit status 124).
    #[arg(long)]
    pub timeout: Option<f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Pin(#[from] PinError),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("run: {0}")]
    Run(#[from] crate::run::RunError),
    #[error("devices: {0}")]
    Passthrough(#[from] PassthroughError),
}

impl LaunchError {
    /// 2 for input or limits the user must fix, 128+N for a signal, else 1.
    pub fn exit_status(&self) -> u8 {
        use crate::vm::{KvmError, MemoryError as VmMemoryError};
        match self {
            LaunchError::Passthrough(PassthroughError::Interrupted(sig)) => (128 + sig) as u8,
            LaunchError::Usage(_) | LaunchError::Passthrough(_) => 2,
            LaunchError::Memory(m) => m.exit_status(),
            LaunchError::Pin(p) => p.exit_status(),
            LaunchError::Vm(
                VmError::Kvm(KvmError::NoDevice | KvmError::Permission | KvmError::CpuCount { .. })
                | VmError::Memory(VmMemoryError::Layout(_))
                | VmError::Load(_),
            ) => 2,
            _ => 1,
        }
    }
}

/// What a finished run says.
pub struct Outcome {
    pub report: Report,
    pub exit: VmExit,
    /// Why a passthrough device stopped the guest, if one did.
    pub device_failure: Option<String>,
}

impl Outcome {
    /// The process exit status: the guest's own status when it gave one.
    pub fn exit_status(&self) -> u8 {
        match &self.exit {
            VmExit::GuestExit(s) => *s,
            VmExit::Reset | VmExit::Shutdown => 0,
            VmExit::Timeout => 124,
            VmExit::Signal(n) => (128 + n) as u8,
            VmExit::Halted { .. } | VmExit::Stopped | VmExit::Fault(_) | VmExit::DeviceFailed => 1,
        }
    }
}

/// The command line the probe guest checks itself against: the RAM the E820 map describes
/// (in whole MiB, as the probe counts) and the vCPU count.
fn probe_cmdline(memory: u64, cpus: u8, dma: bool) -> String {
    let ram: u64 = layout::e820_map(memory)
        .iter()
        .filter(|e| e.kind == E820Kind::Ram)
        .map(|e| e.size)
        .sum();
    let dma = if dma {
        format!(" {OPT_EXPECT_DMA}=1")
    } else {
        String::new()
    };
    format!(
        "{OPT_EXPECT_MEM}={} {OPT_EXPECT_CPUS}={cpus}{dma}",
        ram >> 20
    )
}

fn config(args: &RunArgs, dma: bool) -> VmConfig {
    let (kernel, default_cmdline) = match &args.kernel {
        Some(p) => (ImageSource::Path(p.clone()), "console=ttyS0".to_string()),
        None => (
            ImageSource::Bytes {
                name: "built-in probe guest".into(),
                data: vmm_resources::PROBE_GUEST.into(),
            },
            probe_cmdline(args.memory, args.cpus, dma),
        ),
    };
    VmConfig {
        kernel,
        initrd: args.initrd.clone().map(ImageSource::Path),
        cmdline: args.cmdline.clone().unwrap_or(default_cmdline),
        cpus: args.cpus,
        boot_protocol: args.boot_protocol,
        serial_out: args
            .serial_log
            .clone()
            .map_or(SerialOut::Stdout, SerialOut::File),
        serial_in: SerialIn::Stdin,
    }
}

/// A guest-physical address, hex (0x...) or decimal.
fn parse_addr(s: &str) -> Result<u64, String> {
    let parsed = match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|_| format!("`{s}` is not an address: give hex (0x3ffff000) or decimal"))
}

/// The vfio-user devices asked for, with the default: the probe guest gets the built-in
/// pci-epf-test device unless the other options rule it out.
fn user_devices(args: &RunArgs) -> Result<Vec<UserDevice>, LaunchError> {
    if args.user_devices.iter().any(|d| d == "none") {
        return Ok(Vec::new());
    }
    if !args.user_devices.is_empty() {
        return args
            .user_devices
            .iter()
            .map(|d| {
                d.parse()
                    .map_err(|e| LaunchError::Usage(format!("--user-device {d:?}: {e}")))
            })
            .collect();
    }
    let shareable = !matches!(
        args.backing,
        BackingArg::Fixed(Backing::Anon | Backing::Thp)
    );
    let default = args.kernel.is_none()
        && args.devices.is_empty()
        && matches!(args.pin, RunPin::Auto | RunPin::VfioUser)
        && shareable;
    Ok(if default {
        vec![UserDevice::Epf]
    } else {
        Vec::new()
    })
}

fn backing(args: &RunArgs, user: &[UserDevice]) -> Result<Backing, LaunchError> {
    let explicit = match args.backing {
        BackingArg::Auto => None,
        BackingArg::Fixed(b) => Some(b),
    };
    match (explicit, user.is_empty()) {
        (None, true) => Ok(Backing::Anon),
        (None, false) => Ok(Backing::Memfd),
        (Some(b @ (Backing::Anon | Backing::Thp)), false) => Err(LaunchError::Usage(format!(
            "--backing {}: a vfio-user device maps guest RAM from another process, which \
             needs shareable memory: use --backing memfd (or hugetlb), or leave --backing auto",
            b.name()
        ))),
        (Some(b), _) => Ok(b),
    }
}

impl RunPin {
    /// The name on the command line.
    fn name(self) -> String {
        use clap::ValueEnum;
        self.to_possible_value()
            .map_or_else(String::new, |v| v.get_name().to_string())
    }

    /// The backend of a mode that maps for no device (`none`, `populate`, `mlock`).
    fn without_device(self) -> Option<Arc<dyn PinBackend>> {
        match self {
            RunPin::None => Some(Arc::new(NoneBackend)),
            RunPin::Populate => Some(Arc::new(PopulateBackend)),
            RunPin::Mlock => Some(Arc::new(MlockBackend)),
            _ => None,
        }
    }

    /// The device backend a mode names (`type1`, `iommufd`, `vfio-user`).
    fn device_kind(self) -> Option<BackendKind> {
        match self {
            RunPin::Type1 => Some(BackendKind::Type1),
            RunPin::Iommufd => Some(BackendKind::Iommufd),
            RunPin::VfioUser => Some(BackendKind::VfioUser),
            _ => None,
        }
    }
}

/// `--pin none|populate|mlock` with a device: checked before any device is opened or any
/// server started, so [`pin_backend`] never sees that combination.
fn check_pin_for_devices(pin: RunPin, devices: bool) -> Result<(), LaunchError> {
    match pin.without_device() {
        Some(_) if devices => Err(LaunchError::Usage(format!(
            "--pin {}: a passthrough device needs guest RAM mapped for its DMA; use --pin auto",
            pin.name()
        ))),
        _ => Ok(()),
    }
}

/// The pin backend: what `--pin` says, checked against what the devices need.
fn pin_backend(
    pin: RunPin,
    needed: Option<Arc<dyn PinBackend>>,
) -> Result<Arc<dyn PinBackend>, LaunchError> {
    if let Some(b) = pin.without_device() {
        return Ok(b);
    }
    match (pin.device_kind(), needed) {
        (None, None) => Ok(Arc::new(NoneBackend)),
        (Some(_), None) => Err(LaunchError::Usage(format!(
            "--pin {}: no device that maps through it is attached (see --device and \
             --user-device)",
            pin.name()
        ))),
        (Some(w), Some(n)) if !n.kinds().contains(&w) => Err(LaunchError::Usage(format!(
            "--pin {w}: the attached devices map through {} (for --device, pick the \
             interface with --iommu)",
            n.kinds()
                .iter()
                .map(|k| k.as_str())
                .collect::<Vec<_>>()
                .join(" and ")
        ))),
        (_, Some(n)) => Ok(n),
    }
}

/// Turns a pending SIGINT/SIGTERM into a VM stop: the signal handler writes an eventfd, and
/// this thread, woken by it, asks the VM to stop for that signal.
struct SignalForwarder {
    wake: Arc<EventFd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SignalForwarder {
    fn start(wake: Arc<EventFd>, stop: crate::vm::StopHandle) -> Self {
        let w = wake.clone();
        let thread = std::thread::spawn(move || {
            // Woken either by a signal or by `drop` (no signal pending then).
            if w.read().is_ok() {
                if let Some(sig) = pinning::cancel::pending_signal() {
                    stop.request(ExitReason::Signal(sig));
                }
            }
        });
        Self {
            wake,
            thread: Some(thread),
        }
    }
}

impl Drop for SignalForwarder {
    fn drop(&mut self) {
        let _ = self.wake.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs a VM as `vmm run` does. `start` is when the process started (timeline zero).
pub fn launch(args: &RunArgs, start: Instant) -> Result<Outcome, LaunchError> {
    if let Some(t) = args.timeout {
        if !(t.is_finite() && t > 0.0) {
            return Err(LaunchError::Usage(format!(
                "--timeout {t}: give a positive number of seconds"
            )));
        }
    }
    layout::check_mem_size(args.memory).map_err(|e| LaunchError::Usage(e.to_string()))?;
    let wake = Arc::new(
        EventFd::new(libc::EFD_CLOEXEC).map_err(|source| LaunchError::Io {
            what: "eventfd",
            source,
        })?,
    );
    // Signals are caught from here on, so Ctrl-C during pinning undoes it, and during the
    // run stops the VM cleanly.
    let _signals = SignalGuard::install(Some(std::os::fd::AsRawFd::as_raw_fd(wake.as_ref())))
        .map_err(|source| LaunchError::Io {
            what: "installing signal handlers",
            source,
        })?;
    let cancel = CancelToken::with_signals();
    let limits = Limits::detect().map_err(|e| LaunchError::Usage(e.to_string()))?;
    let user = user_devices(args)?;
    let backing = backing(args, &user)?;
    let dma = !user.is_empty() || !args.devices.is_empty();
    check_pin_for_devices(args.pin, dma)?;
    let mut timeline = Timeline::new(start);
    let marks = Arc::new(GuestMarks::new(start));
    let config = config(args, dma);
    let failure = Failure::default();

    // Declared before the VM so that they drop after it on every path, errors included:
    // locals drop in reverse order of declaration, and teardown must run VM (vCPUs, device
    // models, KVM's view of RAM) -> DMA mappings -> device servers -> guest RAM.
    let guest: GuestMemory;
    let mut devices: passthrough::Devices;
    let pinner: Pinner;
    let pinned: pinning::Pinned;
    let mut vm = timeline.phase("kvm", || Vm::create(&config, marks.clone()))?;
    let ranges: Vec<(u64, u64)> = layout::ram_ranges(args.memory)
        .iter()
        .map(|(a, s)| (a.0, *s))
        .collect();
    guest = timeline.phase("memory", || -> Result<GuestMemory, LaunchError> {
        let guest = GuestMemory::new(backing, &ranges)?;
        vm.register_memory(guest.mem.clone())?;
        Ok(guest)
    })?;
    let request = passthrough::Request {
        kernel_devices: &args.devices,
        iommu: match args.iommu {
            IommuArg::Type1 => IommuKind::Type1,
            IommuArg::Iommufd => IommuKind::Iommufd,
        },
        user_devices: &user,
        dma_hole: args.test_dma_hole,
    };
    devices = timeline.phase("devices", || -> Result<_, LaunchError> {
        vm.attach_devices()?;
        Ok(passthrough::attach_all(&mut vm, &request, &failure)?)
    })?;
    let options = PinOptions {
        threads: args.pin_threads,
        ..PinOptions::default()
    };
    let backend = pin_backend(args.pin, devices.pin_backend.take())?;
    let pinning = backend.kind() != BackendKind::None;
    pinner = Pinner::new(backend, limits, options);
    pinned = timeline
        .phase("pin", || pinner.pin(guest.ram.clone(), &cancel))
        .map_err(|e| match e {
            // Before the guest runs, a device that cannot be mapped is the device's (or the
            // user's) problem to fix: say which device, exit 2.
            e if e.cancel_reason().is_none() && !devices.names.is_empty() => {
                LaunchError::Passthrough(PassthroughError::Map {
                    devices: devices.names.join(", "),
                    source: e,
                })
            }
            e => LaunchError::Pin(e),
        })?;
    timeline.phase("load", || vm.load())?;
    timeline.phase("vcpus", || vm.create_vcpus())?;

    let forwarder = SignalForwarder::start(wake.clone(), vm.stop_handle());
    if let Some(sig) = pinning::cancel::pending_signal() {
        // A signal between pinning and here: honour it before the guest runs.
        vm.stop_handle().request(ExitReason::Signal(sig));
    }
    let deadline = args
        .timeout
        .map(|t| Instant::now() + Duration::from_secs_f64(t));
    if let Some(what) = failure.before_run() {
        return Err(PassthroughError::FailedEarly(what).into());
    }
    let exit = timeline.phase("run", || vm.run_until_exit(deadline))?;
    let device_failure = failure.finish();
    drop(forwarder);

    let teardown = start.elapsed();
    let pin_stats = pinned.stats.clone();
    // Reverse order of set-up: the VM (device models), the DMA mappings (sent to the device
    // servers, which are still running), the servers, then guest RAM.
    drop(vm);
    drop(pinned);
    drop(pinner);
    let device_names = std::mem::take(&mut devices.names);
    drop(devices);
    drop(guest);
    timeline.record("exit", teardown, start.elapsed());

    let report = Report {
        total_ms: timeline.now_ms(),
        phases: timeline.phases().to_vec(),
        guest: GuestTimes::from_durations(
            marks
                .other_marks()
                .iter()
                .find(|m| m.byte == guest_abi::marks::ENTRY)
                .map(|m| m.at),
            marks.first_output(),
            marks.ready(),
        ),
        exit_status: match exit {
            VmExit::GuestExit(s) => Some(i32::from(s)),
            _ => None,
        },
        outcome: exit.to_string(),
        pin: pinning.then_some(pin_stats),
        vm: VmSummary {
            memory_bytes: args.memory,
            cpus: args.cpus,
            backing: backing.name().into(),
            kernel: config.kernel.name(),
            devices: device_names,
        },
    };
    Ok(Outcome {
        report,
        exit,
        device_failure,
    })
}
