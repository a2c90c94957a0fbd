//! A VM put together stage by stage, as `vmm run` does it. Each stage is a function that takes
//! what it needs and returns what it built, so a stage cannot run before the one whose
//! output it needs: the order is in the types, not in runtime checks. Each is timed under the
//! name the timeline and the report use.
//!
//! ```text
//! stage    function                 takes                                  returns
//! kvm      Vm::new                  vCPU count                             Vm
//! memory   memory()                 Vm, MemoryLayout, Backing              GuestMemory
//! devices  devices()                Vm, MemoryLayout, VmConfig             Platform, Passthrough
//! pin      pin()                    PinChoice, Passthrough, GuestMemory    Pinned
//! placement placement()            VmConfig, GuestMemory                  Vec<ZoneReport>
//! load     loader::load()           GuestMemory, MemoryLayout, Platform    BootSetup
//! vcpus    vcpu::create_all()       Vm, BootSetup                          Vec<Vcpu>
//! run      run::run_until_exit()    Vec<Vcpu>, Platform, Vm                VmExit
//! exit     drop(Machine)
//! ```
//!
//! Teardown is [`Machine`]'s field order (Rust drops fields top to bottom): the device models
//! first (a passthrough function is reset, so its DMA stops), then KVM, then the DMA
//! mappings (sent to device servers that are still running), then the servers, then guest
//! RAM. When a stage fails before the machine is whole, what was built so far drops in the
//! reverse order of building; no vCPU has run then, so no device has DMA in flight.

use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::exit::StopHandle;
use devices::{ExitReason, GuestMarks};
use pinning::pinner::PinZone;
use pinning::{
    CancelToken, Classify, ErrorClass, Limits, PinError, PinOptions, Pinned, Pinner, ProgressSink,
    SignalGuard, Undone,
};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::acpi::GuestNuma;
use crate::control::VmControl;
use crate::loader::{self, BootProtocol, ImageSource, LoadError, LoadRequest};
use crate::memory::numa::Policy;
use crate::memory::zones::{GuestNumaNode, ZoneConfig};
use crate::memory::{thp, GuestMemory, MemoryError, MemoryLayout, MemorySpec, RamRange};
use crate::passthrough::{self, DeviceRequest, Failure, Passthrough, PassthroughError};
use crate::pin::{PinChoice, PinChoiceError, TestFault};
use crate::placement::{self, Zone, ZoneReport};
use crate::platform::{Platform, PlatformError, SerialIn, SerialOut};
use crate::run::{self, RunError, VmExit};
use crate::seccomp::{self, Filters, SeccompArgs, SeccompError};
use crate::timeline::{ms, GuestTimes, Report, Teardown, Timeline, VmSummary};
use crate::vstate::pause::PauseGate;
use crate::vstate::vcpu::{self, VcpuError};
use crate::vstate::vm::{KvmError, Vm};

/// The longest a guest may run before it is stopped ([`VmConfig::timeout`]): one year, in
/// seconds. `vmm run --timeout` and the bench's per-boot timeout are bounded by it.
pub const MAX_TIMEOUT_SECS: u64 = 365 * 24 * 60 * 60;

/// What to build: the command line, resolved and checked.
#[derive(Clone, Debug)]
pub struct VmConfig {
    pub layout: MemoryLayout,
    pub cpus: u8,
    /// The guest NUMA topology the ACPI tables describe (SRAT, SLIT); none: no NUMA.
    pub guest_numa: Option<GuestNuma>,
    /// The backing `--backing` resolved to (and `--memory-shard`).
    pub memory: MemorySpec,
    /// Each zone's backing, in the order of `layout.zones()` (`[memory]` without zones).
    pub zone_memory: Vec<MemorySpec>,
    /// `--memory-zone`s (empty: none given, all RAM is one zone with no host node).
    pub zones: Vec<ZoneConfig>,
    /// `--numa` guest nodes (empty: the guest sees no NUMA topology).
    pub numa: Vec<GuestNumaNode>,
    /// Why `memory.backing` was chosen (`--backing auto` says what it weighed).
    pub backing_reason: String,
    pub kernel: ImageSource,
    pub initrd: Option<ImageSource>,
    pub cmdline: String,
    pub boot_protocol: BootProtocol,
    pub serial_out: SerialOut,
    /// The ring between the serial port and its output (stdout or the log file).
    pub serial_buffer: usize,
    pub serial_in: SerialIn,
    pub devices: DeviceRequest,
    pub pin: PinChoice,
    pub pin_options: PinOptions,
    /// Faults to inject into the pin backend: for tests only (`--test-fault`).
    pub test_faults: Vec<TestFault>,
    /// Stop the guest after this long.
    pub timeout: Option<Duration>,
    /// System-call filters per thread kind.
    pub seccomp: SeccompArgs,
}

/// Why a VM could not be built or run; the variant names the stage.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("installing the SIGINT/SIGTERM handlers failed: {0}")]
    Signals(std::io::Error),
    #[error(transparent)]
    Limits(#[from] pinning::limits::LimitsError),
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Platform(#[from] PlatformError),
    #[error(transparent)]
    Passthrough(#[from] PassthroughError),
    #[error(transparent)]
    PinChoice(#[from] PinChoiceError),
    #[error("{devices}: mapping guest RAM for DMA failed: {source}")]
    Map { devices: String, source: PinError },
    #[error(transparent)]
    Pin(#[from] PinError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Vcpus(#[from] VcpuError),
    #[error(transparent)]
    Run(#[from] RunError),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
}

impl Classify for StartError {
    fn class(&self) -> ErrorClass {
        match self {
            StartError::Signals(_) => ErrorClass::Internal,
            StartError::Limits(e) => e.class(),
            StartError::Kvm(e) => e.class(),
            StartError::Memory(e) => e.class(),
            StartError::Platform(e) => e.class(),
            StartError::Passthrough(e) => e.class(),
            StartError::PinChoice(e) => e.class(),
            // A device that would not map is the device's to fix; a panic, or an undo that
            // left something mapped or locked, is ours.
            StartError::Map { source, .. }
                if matches!(source, PinError::Panicked { .. })
                    || source.left_something_behind() =>
            {
                ErrorClass::Internal
            }
            StartError::Map { .. } => ErrorClass::Device,
            StartError::Pin(e) => e.class(),
            StartError::Load(e) => e.class(),
            StartError::Vcpus(e) => e.class(),
            StartError::Run(e) => e.class(),
            StartError::Seccomp(e) => e.class(),
        }
    }
}

/// What a finished run says.
pub struct Outcome {
    pub report: Report,
    pub exit: VmExit,
    /// Why a passthrough device stopped the guest, if one did.
    pub device_failure: Option<String>,
    /// Set when teardown could not undo every DMA mapping or lock of guest RAM.
    pub left_behind: Option<LeftBehind>,
}

/// Teardown could not undo every DMA mapping or lock of guest RAM: what may still be mapped
/// for a device or locked is the VMM's failure, whatever the guest did.
#[derive(Debug, thiserror::Error)]
#[error(
    "tearing the VM down: {0} until this process exits (the warnings above name each failed call)"
)]
pub struct LeftBehind(pub Undone);

impl Classify for LeftBehind {
    fn class(&self) -> ErrorClass {
        ErrorClass::Internal
    }
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

/// Everything a built VM holds, in teardown order (see the module doc).
pub struct Machine {
    pub platform: Platform,
    pub vm: Vm,
    pub pinned: Pinned,
    pub passthrough: Passthrough,
    pub memory: GuestMemory,
}

impl Machine {
    /// Tears the machine down in its field order, the slow parts on the pinning engine with
    /// up to `threads` threads: the DMA mappings undone chunk by chunk, then guest RAM freed
    /// shard by shard. Not cancellable: a signal now is noted and teardown finishes.
    pub fn teardown(self, threads: usize) -> Teardown {
        let started = Instant::now();
        let Machine {
            platform,
            vm,
            pinned,
            passthrough,
            memory,
        } = self;
        drop(platform);
        drop(vm);
        let unpin = pinned.unpin();
        drop(passthrough);
        let freeing = Instant::now();
        let free_threads = memory.release(threads);
        let free = freeing.elapsed();
        let total = started.elapsed();
        Teardown {
            unpin_ms: ms(unpin.elapsed),
            unpin_threads: unpin.threads,
            unpin: unpin.undone,
            free_ms: ms(free),
            free_threads,
            other_ms: ms(total.saturating_sub(unpin.elapsed + free)),
        }
    }
}

/// Stage `memory`: maps guest RAM as `layout` says, each zone with its spec in `specs`
/// (one per zone, in order), and registers it with KVM.
pub fn memory(
    vm: &Vm,
    layout: &MemoryLayout,
    specs: &[MemorySpec],
) -> Result<GuestMemory, StartError> {
    let zones: Vec<(MemorySpec, Vec<RamRange>)> = specs
        .iter()
        .zip(layout.zones())
        .map(|(spec, zone)| (*spec, zone.ranges.clone()))
        .collect();
    let memory = GuestMemory::zoned(&zones)?;
    vm.register_memory(&memory)?;
    Ok(memory)
}

/// Stage `devices`: the platform, then every passthrough function on its PCI bus.
pub fn devices(
    vm: &Vm,
    config: &VmConfig,
    marks: &Arc<GuestMarks>,
    failure: &Failure,
) -> Result<(Platform, Passthrough), StartError> {
    let mut platform = Platform::new(
        vm,
        &config.layout,
        &config.serial_out,
        config.serial_buffer,
        config.serial_in,
        marks,
    )?;
    let passthrough = passthrough::attach_all(vm, &mut platform, &config.devices, failure)?;
    Ok((platform, passthrough))
}

/// Stage `pin`: prepares all of guest RAM with the backend `choice` and the devices call for,
/// counting its progress into `sink` when given.
#[allow(clippy::too_many_arguments)]
pub fn pin(
    choice: PinChoice,
    options: PinOptions,
    faults: &[TestFault],
    limits: Limits,
    passthrough: &mut Passthrough,
    memory: &GuestMemory,
    cancel: &CancelToken,
    sink: Option<Arc<ProgressSink>>,
) -> Result<Pinned, StartError> {
    let backend = choice.backend(std::mem::take(&mut passthrough.dma))?;
    let backend = TestFault::wrap(faults, backend);
    let pinner = Pinner::new(backend, limits, options);
    let pinner = match sink {
        Some(sink) => pinner.with_progress_sink(sink),
        None => pinner,
    };
    pinner.pin(memory.ram.clone(), cancel).map_err(|e| match e {
        // Before the guest runs, a device that cannot be mapped is the device's (or the
        // user's) to fix: say which device.
        e if e.cancel_reason().is_none() && !passthrough.names.is_empty() => StartError::Map {
            devices: passthrough.names.join(", "),
            source: e,
        },
        e => StartError::Pin(e),
    })
}

/// The layout's zones, each with its host node (`--memory-zone host_numa_node`) and the guest
/// node that holds it (`--numa memory_zones`): what the pin and placement stages work on.
fn zones(config: &VmConfig) -> Vec<Zone> {
    config
        .layout
        .zones()
        .iter()
        .zip(&config.zone_memory)
        .map(|(z, spec)| Zone {
            id: z.id.clone(),
            ranges: z.ranges.clone(),
            host_numa_node: spec.host_numa_node,
            guest_numa_id: config
                .numa
                .iter()
                .find(|n| n.memory_zones.contains(&z.id))
                .map(|n| n.guest_numa_id),
        })
        .collect()
}

/// The pin job's zones: with `--memory-zone`, each zone is filled by helpers on its host
/// node's CPUs ([`placement::pin_zones`]) and reported on its own; without, one job over all
/// RAM as before.
fn pin_zones(config: &VmConfig, zones: &[Zone]) -> Vec<PinZone> {
    if config.zones.is_empty() {
        return Vec::new();
    }
    placement::pin_zones(zones)
}

/// Stage `placement`: where each zone's pages are after pinning (before the guest or the
/// loader touches any), against its host node or the process's policy. On this thread, which
/// is not yet filtered and whose policy the pinning helpers inherited.
fn placement(memory: &GuestMemory, zones: &[Zone]) -> Vec<ZoneReport> {
    let allowed = Policy::mems_allowed().unwrap_or_else(|e| {
        tracing::debug!("the cpuset's memory nodes: {e}");
        Vec::new()
    });
    placement::check(memory, zones, &Policy::current(), &allowed)
}

/// Stage `load`: kernel, initrd, command line and boot tables into guest RAM.
pub fn load(
    config: &VmConfig,
    memory: &GuestMemory,
    platform: &Platform,
) -> Result<loader::BootSetup, StartError> {
    let intx = platform.intx_lines();
    let req = LoadRequest {
        kernel: &config.kernel,
        initrd: config.initrd.as_ref(),
        cmdline: &config.cmdline,
        protocol: config.boot_protocol,
        cpus: config.cpus,
        pci_intx: &intx,
        numa: config.guest_numa.as_ref(),
    };
    Ok(loader::load(&memory.mem, &config.layout, &req)?)
}

/// Turns a pending SIGINT/SIGTERM into a VM stop: the signal handler writes an eventfd, and
/// this thread, woken by it, asks the VM to stop for that signal.
struct SignalForwarder {
    wake: Arc<EventFd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SignalForwarder {
    fn start(wake: Arc<EventFd>, stop: StopHandle) -> Self {
        let w = wake.clone();
        // Named, so that a seccomp report can say which thread it was.
        let thread = std::thread::Builder::new().name("vmm-signals".into());
        let thread = thread.spawn(move || {
            // Woken either by a signal or by `drop` (no signal pending then).
            if w.read().is_ok() {
                if let Some(sig) = pinning::cancel::pending_signal() {
                    stop.request(ExitReason::Signal(sig));
                }
            }
        });
        let thread = thread.expect("failed to spawn the signal forwarder thread");
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

/// Times stage `name` into the timeline and, with a control, says that it began.
fn stage<T>(
    timeline: &mut Timeline,
    control: Option<&Arc<VmControl>>,
    name: &'static str,
    f: impl FnOnce() -> T,
) -> T {
    if let Some(c) = control {
        c.set_phase(name);
    }
    timeline.phase(name, f)
}

/// Builds the VM stage by stage, runs it until it stops, tears it down and reports. `start`
/// is when the process started (timeline zero). With `control`, another thread sees each
/// stage, the pinning progress and figures, and may pause, resume or stop the guest (the
/// caller tells it how the run ended: [`VmControl::finish`]).
///
/// A forbidden system call (`--seccomp on`) is the error, whatever else went wrong after
/// it: a call refused with EPERM may have made a stage fail for what looks like another
/// reason.
pub fn run(
    config: &VmConfig,
    start: Instant,
    control: Option<&Arc<VmControl>>,
) -> Result<Outcome, StartError> {
    let result = build_and_run(config, start, control);
    match seccomp::violation() {
        Some(v) => Err(SeccompError::Violation(v).into()),
        None => result,
    }
}

fn build_and_run(
    config: &VmConfig,
    start: Instant,
    control: Option<&Arc<VmControl>>,
) -> Result<Outcome, StartError> {
    let wake = Arc::new(EventFd::new(libc::EFD_CLOEXEC).map_err(StartError::Signals)?);
    // Signals are caught from here on, so Ctrl-C during pinning undoes it, and during the
    // run stops the VM cleanly.
    let _signals = SignalGuard::install(Some(std::os::fd::AsRawFd::as_raw_fd(wake.as_ref())))
        .map_err(StartError::Signals)?;
    let cancel = CancelToken::with_signals();
    let limits = Limits::detect()?;
    let mut timeline = Timeline::new(start);
    let marks = Arc::new(GuestMarks::new(start));
    let failure = Failure::default();

    let vm = stage(&mut timeline, control, "kvm", || Vm::new(config.cpus))?;
    if let Some(c) = control {
        c.set_stop(vm.stop_handle(), cancel.clone());
    }
    // From here on pinning helpers filter themselves as they start.
    let filters = Filters::new(&config.seccomp, vm.stop_handle())?;
    let huge_before = thp::huge_bytes_in_use();
    let memory = stage(&mut timeline, control, "memory", || {
        memory(&vm, &config.layout, &config.zone_memory)
    })?;
    let (platform, mut passthrough) = stage(&mut timeline, control, "devices", || {
        devices(&vm, config, &marks, &failure)
    })?;
    if let Some(c) = control {
        c.set_devices(passthrough.counters.clone());
    }
    let zone_list = zones(config);
    let pinned = stage(&mut timeline, control, "pin", || {
        pin(
            config.pin,
            PinOptions {
                zones: pin_zones(config, &zone_list),
                ..config.pin_options.clone()
            },
            &config.test_faults,
            limits,
            &mut passthrough,
            &memory,
            &cancel,
            control.map(|c| c.progress_sink()),
        )
    })?;
    if let Some(c) = control {
        c.set_pin_stats(pinned.stats.clone());
    }
    if let Some(f) = &filters {
        f.helper_failure()?;
    }
    let zones = stage(&mut timeline, control, "placement", || {
        placement(&memory, &zone_list)
    });
    let boot = stage(&mut timeline, control, "load", || {
        load(config, &memory, &platform)
    })?;
    let vcpus = stage(&mut timeline, control, "vcpus", || {
        vcpu::create_all(&vm, config.cpus, &boot)
    })?;
    let mut machine = Machine {
        platform,
        vm,
        pinned,
        passthrough,
        memory,
    };

    let forwarder = SignalForwarder::start(wake.clone(), machine.vm.stop_handle());
    if let Some(sig) = pinning::cancel::pending_signal() {
        // A signal between pinning and here: honour it before the guest runs.
        machine.vm.stop_handle().request(ExitReason::Signal(sig));
    }
    let deadline = config.timeout.map(|t| Instant::now() + t);
    if let Some(what) = failure.before_run() {
        return Err(PassthroughError::FailedEarly(what).into());
    }
    let pause = Arc::new(PauseGate::default());
    if let Some(c) = control {
        c.set_pause(pause.clone());
    }
    let exit = stage(&mut timeline, control, "run", || {
        run::run_until_exit(
            vcpus,
            &mut machine.platform,
            machine.vm.exit(),
            deadline,
            filters.as_ref(),
            &pause,
        )
    })?;
    if let Some(c) = control {
        c.set_phase("exit");
    }
    let device_failure = failure.finish();
    drop(forwarder);
    let serial = machine.platform.finish_serial();

    let teardown_start = start.elapsed();
    let pin_stats = machine.pinned.stats.clone();
    let summary = VmSummary {
        memory_bytes: machine.memory.size(),
        memory_shards: machine.memory.files().count(),
        shard_bytes: machine.memory.shard_bytes(),
        huge_bytes: thp::huge_bytes_in_use().saturating_sub(huge_before),
        cpus: config.cpus,
        e820: config.layout.e820().to_vec(),
        backing: config.memory.backing.name().into(),
        backing_reason: config.backing_reason.clone(),
        kernel: config.kernel.name(),
        devices: std::mem::take(&mut machine.passthrough.names),
        zones,
    };
    let teardown = machine.teardown(pin_stats.threads.max(1));
    timeline.record("exit", teardown_start, start.elapsed());
    if let Some(f) = &filters {
        // A teardown helper that could not add its filter still ran under the main one.
        f.helper_failure()?;
    }
    let left_behind = (!teardown.unpin.is_clean()).then(|| LeftBehind(teardown.unpin.clone()));

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
        pin: (pin_stats.backend != pinning::BackendKind::None).then_some(pin_stats),
        teardown,
        vm: summary,
        serial,
    };
    Ok(Outcome {
        report,
        exit,
        device_failure,
        left_behind,
    })
}
