//! `vmm run`: build the VM stage by stage, each stage timed, pin guest RAM, run the guest,
//! tear down in reverse, and report.
//!
//! Stages (names as in the timeline): `kvm` -> `memory` -> `devices` -> `pin` -> `load` ->
//! `vcpus` -> `run` -> `exit` (teardown). Locals are declared so that they drop in reverse:
//! the VM (vCPUs, devices, KVM fds) first, then the pinning (unlock/unmap), then guest RAM.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::{ExitReason, GuestMarks};
use pinning::backend::{MlockBackend, NoneBackend, PopulateBackend};
use pinning::{
    CancelToken, Limits, PinBackend, PinError, PinOptions, Pinner, SignalGuard, ThreadRequest,
};
use vmm_sys_util::eventfd::EventFd;

use crate::layout::{self, E820Kind};
use crate::loader::{BootProtocol, ImageSource};
use crate::memory::{Backing, GuestMemory, MemoryError};
use crate::run::VmExit;
use crate::size::parse_size;
use crate::timeline::{GuestTimes, Report, Timeline, VmSummary};
use crate::vm::{SerialIn, SerialOut, Vm, VmConfig, VmError};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RunPin {
    /// Nothing: RAM is faulted in by the guest as it goes (no DMA-capable device).
    None,
    /// Fault all of RAM in before the guest starts (MADV_POPULATE_WRITE).
    Populate,
    /// Fault in and lock all of RAM (mlock2(MLOCK_ONFAULT) + parallel populate).
    Mlock,
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
    /// What backs guest RAM.
    #[arg(long, value_enum, default_value = "anon")]
    pub backing: Backing,
    /// How guest RAM is prepared before the guest runs.
    #[arg(long, value_enum, default_value = "none")]
    pub pin: RunPin,
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
}

impl LaunchError {
    /// 2 for input or limits the user must fix, 128+N for a signal, else 1.
    pub fn exit_status(&self) -> u8 {
        use crate::vm::{KvmError, MemoryError as VmMemoryError};
        match self {
            LaunchError::Usage(_) => 2,
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
}

impl Outcome {
    /// The process exit status: the guest's own status when it gave one.
    pub fn exit_status(&self) -> u8 {
        match &self.exit {
            VmExit::GuestExit(s) => *s,
            VmExit::Reset | VmExit::Shutdown => 0,
            VmExit::Timeout => 124,
            VmExit::Signal(n) => (128 + n) as u8,
            VmExit::Halted { .. } | VmExit::Stopped | VmExit::Fault(_) => 1,
        }
    }
}

/// The command line the probe guest checks itself against: the RAM the E820 map describes
/// (in whole MiB, as the probe counts) and the vCPU count.
fn probe_cmdline(memory: u64, cpus: u8) -> String {
    let ram: u64 = layout::e820_map(memory)
        .iter()
        .filter(|e| e.kind == E820Kind::Ram)
        .map(|e| e.size)
        .sum();
    format!("probe.expect_mem={} probe.expect_cpus={cpus}", ram >> 20)
}

fn config(args: &RunArgs) -> VmConfig {
    let (kernel, default_cmdline) = match &args.kernel {
        Some(p) => (ImageSource::Path(p.clone()), "console=ttyS0".to_string()),
        None => (
            ImageSource::Bytes {
                name: "built-in probe guest".into(),
                data: vmm_resources::PROBE_GUEST.into(),
            },
            probe_cmdline(args.memory, args.cpus),
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

fn backend(pin: RunPin) -> Arc<dyn PinBackend> {
    match pin {
        RunPin::None => Arc::new(NoneBackend),
        RunPin::Populate => Arc::new(PopulateBackend),
        RunPin::Mlock => Arc::new(MlockBackend),
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
    let mut timeline = Timeline::new(start);
    let marks = Arc::new(GuestMarks::new(start));
    let config = config(args);

    let mut vm = timeline.phase("kvm", || Vm::create(&config, marks.clone()))?;
    let ranges: Vec<(u64, u64)> = layout::ram_ranges(args.memory)
        .iter()
        .map(|(a, s)| (a.0, *s))
        .collect();
    let guest = timeline.phase("memory", || -> Result<GuestMemory, LaunchError> {
        let guest = GuestMemory::new(args.backing, &ranges)?;
        vm.register_memory(guest.mem.clone())?;
        Ok(guest)
    })?;
    timeline.phase("devices", || vm.attach_devices())?;
    let options = PinOptions {
        threads: args.pin_threads,
        ..PinOptions::default()
    };
    let pinner = Pinner::new(backend(args.pin), limits, options);
    let pinned = timeline.phase("pin", || pinner.pin(guest.ram.clone(), &cancel))?;
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
    let exit = timeline.phase("run", || vm.run_until_exit(deadline))?;
    drop(forwarder);

    let teardown = start.elapsed();
    let pin_stats = pinned.stats.clone();
    drop(vm);
    drop(pinned);
    drop(guest);
    timeline.record("exit", teardown, start.elapsed());

    let report = Report {
        total_ms: timeline.now_ms(),
        phases: timeline.phases().to_vec(),
        guest: GuestTimes::from_durations(
            marks
                .other_marks()
                .iter()
                .find(|m| m.byte == vmm_resources::MARK_ENTRY)
                .map(|m| m.at),
            marks.first_output(),
            marks.ready(),
        ),
        exit_status: match exit {
            VmExit::GuestExit(s) => Some(i32::from(s)),
            _ => None,
        },
        outcome: exit.to_string(),
        pin: (args.pin != RunPin::None).then_some(pin_stats),
        vm: VmSummary {
            memory_bytes: args.memory,
            cpus: args.cpus,
            backing: args.backing.name().into(),
            kernel: config.kernel.name(),
        },
    };
    Ok(Outcome { report, exit })
}
