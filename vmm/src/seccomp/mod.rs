//! seccomp filters, one allow-list per kind of thread ([`ThreadKind`]), compiled with
//! seccompiler and installed once set-up is over, before the guest runs.
//!
//! | kind | list | installed by | when |
//! |---|---|---|---|
//! | vCPU | `vcpu.rs` | each vCPU thread itself | before its first KVM_RUN; the vCPUs wait until every other thread is filtered too |
//! | main/event | `vmm.rs` | the main thread, for itself and for every other thread not yet filtered (the SIGINT/SIGTERM forwarder, the epf watcher, vfio-user reply readers, the serial output writer) | once every vCPU thread has its filter, before the guest runs |
//! | pin helper | `helper.rs` | each pinning-engine helper, through the engine's start hook | as it starts: while pinning (before the guest) and in teardown |
//! | epf server | `epf.rs` | `vmm device epf` | once it listens, before it accepts (with `--socket-fd`: once it has checked its descriptor, before it serves) |
//! | API | `api.rs` | the API thread itself ([`filter_api_thread`]) | first thing, before it serves (`vmm run --api-socket`: before the VM is built; `vmm serve`: its supervisor thread, which starts and reaps the VM children, stays unfiltered) |
//!
//! A filter is per thread and inherited by the threads that thread creates, and it can only
//! be narrowed. So the main thread's list covers teardown too (it runs on that thread after
//! the guest), and a teardown helper, started by the filtered main thread, adds its own
//! filter to the inherited one: it may do what both allow (the main list allows what the
//! helpers do, since the caller of a teardown job works on it too). The threads the main
//! thread filters are not its children: each is asked with a signal (`threads.rs`) to install
//! the list on itself, the way glibc makes every thread change its user id.
//!
//! `--seccomp on` (the default) makes a forbidden call raise SIGSYS (`trap.rs`): the call
//! fails with EPERM, the VM stops, and `vmm run` ends with "seccomp: thread vcpu0 made
//! forbidden system call 110 (getppid)" and status 1 (the epf server prints its line and
//! exits 1, which stops the VM as a device failure). `--seccomp log` allows the call and has
//! the kernel log it (an audit record, in dmesg without auditd): the way to find what a new
//! host or device needs. `--seccomp off` installs nothing.

mod api;
mod epf;
mod helper;
mod names;
mod rules;
mod threads;
mod trap;
mod vcpu;
mod vmm;

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use devices::exit::StopHandle;
use pinning::{Classify, ErrorClass};
use seccompiler::{BpfProgram, SeccompAction};

pub use names::name as syscall_name;
pub use rules::AllowList;
pub use trap::{violation, Violation};

/// `--seccomp`: what a system call outside a thread's allow-list does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SeccompLevel {
    /// SIGSYS: the VM stops and vmm exits 1 naming the thread and the call.
    #[default]
    On,
    /// Allowed, and logged by the kernel (audit record, or dmesg without auditd).
    Log,
    /// No filters.
    Off,
}

impl SeccompLevel {
    fn name(self) -> &'static str {
        match self {
            SeccompLevel::On => "on",
            SeccompLevel::Log => "log",
            SeccompLevel::Off => "off",
        }
    }

    fn mismatch(self) -> Option<SeccompAction> {
        match self {
            SeccompLevel::On => Some(SeccompAction::Trap),
            SeccompLevel::Log => Some(SeccompAction::Log),
            SeccompLevel::Off => None,
        }
    }
}

/// `vmm run`'s seccomp options.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct SeccompArgs {
    /// System-call filters, one allow-list per kind of thread (vCPU, main/event, pinning
    /// helper; the epf server and the API thread get their own), installed before the guest
    /// runs. `on`: a forbidden call stops the VM and vmm exits 1 naming the thread and the
    /// call; `log`: the call is allowed and the kernel logs it (audit, or dmesg); `off`: no
    /// filters.
    #[arg(long, value_enum, default_value_t = SeccompLevel::On)]
    pub seccomp: SeccompLevel,
    /// Testing only: vCPU 0 makes a forbidden system call (getppid) once every filter is in
    /// place, before it first enters the guest.
    #[arg(long, hide = true)]
    pub test_seccomp_violation: bool,
}

/// The kinds of thread that get an allow-list of their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    Vcpu,
    /// The main thread (event loop, teardown) and every other VMM thread but vCPUs and helpers.
    Vmm,
    /// Pinning-engine helpers (pinning and teardown jobs).
    Helper,
    /// The `vmm device epf` server process.
    Epf,
    /// The API thread (`--api-socket`).
    Api,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 5] = [
        ThreadKind::Vcpu,
        ThreadKind::Vmm,
        ThreadKind::Helper,
        ThreadKind::Epf,
        ThreadKind::Api,
    ];

    /// This kind's allow-list, for this process.
    pub fn allow_list(self) -> AllowList {
        match self {
            ThreadKind::Vcpu => vcpu::allow_list(),
            ThreadKind::Vmm => vmm::allow_list(),
            ThreadKind::Helper => helper::allow_list(std::process::id()),
            ThreadKind::Epf => epf::allow_list(),
            ThreadKind::Api => api::allow_list(),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Vmm => "main/event",
            ThreadKind::Helper => "pin helper",
            ThreadKind::Epf => "epf server",
            ThreadKind::Api => "api",
        }
    }

    fn compile(self, level: SeccompLevel) -> Result<BpfProgram, SeccompError> {
        let action = level.mismatch().unwrap_or(SeccompAction::Allow);
        self.allow_list()
            .compile(action)
            .map_err(|reason| SeccompError::Compile { kind: self, reason })
    }
}

/// Why filters could not be put in place, or a forbidden call that was made.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp: compiling the {} filter failed: {reason}", .kind.name())]
    Compile { kind: ThreadKind, reason: String },
    #[error("seccomp: installing the {} filter on thread {thread} failed: {reason}; run with --seccomp off on a kernel without seccomp filters", .kind.name())]
    Install {
        kind: ThreadKind,
        thread: String,
        reason: String,
    },
    #[error("seccomp: installing the SIGSYS handler failed: {0}")]
    Handler(std::io::Error),
    #[error("seccomp: thread {name} (tid {tid}) did not install its filter: {reason}")]
    Thread {
        name: String,
        tid: i32,
        reason: String,
    },
    #[error("seccomp: the vCPU threads did not report their filters within {0:?}")]
    VcpusSlow(Duration),
    #[error("{0}")]
    Violation(Violation),
}

impl Classify for SeccompError {
    fn class(&self) -> ErrorClass {
        ErrorClass::Internal
    }
}

/// What `vmm device epf` children get (0: not set, so their own default).
static CHILD_LEVEL: AtomicU8 = AtomicU8::new(0);

/// The `--seccomp` arguments a `vmm device epf` child of this `vmm run` gets: the run's own
/// level.
pub fn epf_child_args() -> Vec<&'static str> {
    let level = match CHILD_LEVEL.load(Ordering::Relaxed) {
        1 => SeccompLevel::On,
        2 => SeccompLevel::Log,
        3 => SeccompLevel::Off,
        _ => return Vec::new(),
    };
    vec!["--seccomp", level.name()]
}

/// The compiled helper program the pinning engine's start hook installs; `None` without
/// filters.
static HELPER: RwLock<Option<Arc<BpfProgram>>> = RwLock::new(None);
/// The first helper that could not install its filter.
static HELPER_FAILURE: Mutex<Option<SeccompError>> = Mutex::new(None);

/// The pinning engine's helper start hook: the helper installs its own filter.
fn helper_started(name: &str) {
    let program = HELPER
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let Some(program) = program else {
        return;
    };
    trap::set_thread_name(name);
    if let Err(e) = seccompiler::apply_filter(&program) {
        HELPER_FAILURE
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert(SeccompError::Install {
                kind: ThreadKind::Helper,
                thread: name.to_string(),
                reason: e.to_string(),
            });
    }
}

/// The filters of one `vmm run`, compiled before any VM work.
pub struct Filters {
    vcpu: BpfProgram,
    vmm: BpfProgram,
    test_violation: bool,
}

impl Filters {
    /// Compiles every list for `args.seccomp` and prepares what reports a violation (the
    /// SIGSYS handler stops the VM through `stop`); from now on pinning-engine helpers
    /// install their filter as they start. `None` with `--seccomp off`.
    pub fn new(args: &SeccompArgs, stop: StopHandle) -> Result<Option<Arc<Filters>>, SeccompError> {
        CHILD_LEVEL.store(
            match args.seccomp {
                SeccompLevel::On => 1,
                SeccompLevel::Log => 2,
                SeccompLevel::Off => 3,
            },
            Ordering::Relaxed,
        );
        if args.seccomp == SeccompLevel::Off {
            return Ok(None);
        }
        filtered_panics();
        let filters = Filters {
            vcpu: ThreadKind::Vcpu.compile(args.seccomp)?,
            vmm: ThreadKind::Vmm.compile(args.seccomp)?,
            test_violation: args.test_seccomp_violation,
        };
        let helper = ThreadKind::Helper.compile(args.seccomp)?;
        if args.seccomp == SeccompLevel::On {
            trap::install_handler(Some(stop), None).map_err(SeccompError::Handler)?;
        }
        *HELPER.write().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(helper));
        pinning::set_helper_start_hook(Some(helper_started));
        Ok(Some(Arc::new(filters)))
    }

    /// A pinning helper that could not install its filter, if one could not.
    pub fn helper_failure(&self) -> Result<(), SeccompError> {
        match HELPER_FAILURE
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// On vCPU thread `index`: installs the vCPU filter.
    fn install_vcpu(&self, index: u32) -> Result<(), SeccompError> {
        let thread = format!("vcpu{index}");
        trap::set_thread_name(&thread);
        seccompiler::apply_filter(&self.vcpu).map_err(|e| SeccompError::Install {
            kind: ThreadKind::Vcpu,
            thread,
            reason: e.to_string(),
        })
    }

    /// On the main thread: filters every thread not filtered yet, then itself.
    fn install_vmm(&self) -> Result<(), SeccompError> {
        threads::filter_unfiltered_threads(&self.vmm)?;
        trap::set_thread_name("main");
        seccompiler::apply_filter(&self.vmm).map_err(|e| SeccompError::Install {
            kind: ThreadKind::Vmm,
            thread: "main".into(),
            reason: e.to_string(),
        })
    }
}

/// How long the main thread waits for the vCPU threads to install their filters.
const VCPUS_READY_WITHIN: Duration = Duration::from_secs(30);

/// Where vCPU threads, each with its filter installed, wait until every other thread has
/// one too: no guest instruction runs before every filter is in place.
pub struct VcpuGate {
    filters: Arc<Filters>,
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Default)]
struct GateState {
    ready: usize,
    failure: Option<SeccompError>,
    /// Set once: whether the vCPUs may run the guest.
    open: Option<bool>,
}

impl VcpuGate {
    pub fn new(filters: Arc<Filters>) -> Self {
        VcpuGate {
            filters,
            state: Mutex::new(GateState::default()),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// On vCPU thread `index`, before its first KVM_RUN: installs its filter, says so, and
    /// waits for the gate. Returns whether to run the guest.
    pub fn enter_vcpu(&self, index: u32) -> bool {
        let installed = self.filters.install_vcpu(index);
        let mut state = self.lock();
        state.ready += 1;
        if let Err(e) = installed {
            state.failure.get_or_insert(e);
        }
        self.changed.notify_all();
        while state.open.is_none() {
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        let run = state.open == Some(true);
        drop(state);
        if run && index == 0 && self.filters.test_violation {
            // SAFETY: getppid has no preconditions; the filter refuses it (SIGSYS, EPERM).
            unsafe { libc::getppid() };
        }
        run
    }

    /// On the main thread, once `vcpus` vCPU threads were started: waits until each has its
    /// filter, filters every other thread and then the main thread itself, and opens the
    /// gate. On an error the gate opens with "do not run" and the error is returned.
    pub fn open(&self, vcpus: usize) -> Result<(), SeccompError> {
        let deadline = Instant::now() + VCPUS_READY_WITHIN;
        let mut state = self.lock();
        while state.ready < vcpus {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                state.open = Some(false);
                self.changed.notify_all();
                return Err(SeccompError::VcpusSlow(VCPUS_READY_WITHIN));
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        let result = match state.failure.take() {
            Some(e) => Err(e),
            None => self.filters.install_vmm(),
        };
        state.open = Some(result.is_ok());
        self.changed.notify_all();
        result
    }

    /// Opens the gate with "do not run" (the run failed before it could start).
    pub fn abandon(&self) {
        let mut state = self.lock();
        state.open.get_or_insert(false);
        self.changed.notify_all();
    }
}

/// `vmm device epf`: the filter to install once the server listens (see
/// [`enter_epf_server`]).
static EPF: Mutex<Option<BpfProgram>> = Mutex::new(None);

/// `vmm device epf --seccomp LEVEL`: compiles the server's filter and has the server install
/// it once it listens.
pub fn prepare_epf_server(level: SeccompLevel) -> Result<(), SeccompError> {
    if level == SeccompLevel::Off {
        return Ok(());
    }
    let program = ThreadKind::Epf.compile(level)?;
    filtered_panics();
    if level == SeccompLevel::On {
        trap::install_handler(None, Some(trap::ExitLine::Epf)).map_err(SeccompError::Handler)?;
    }
    *EPF.lock().unwrap_or_else(PoisonError::into_inner) = Some(program);
    devices::vfio_user::epf::on_listening(enter_epf_server);
    Ok(())
}

/// On the API thread, before it serves: installs the API list on the calling thread (nothing
/// with `--seccomp off`). Under `on`, a forbidden call before the VM's own filters are in
/// place (or in `vmm serve`, which has no VM) ends the process with the line and status 1;
/// once `vmm run` has put its filters in place, it stops the VM as on any other thread.
pub fn filter_api_thread(level: SeccompLevel) -> Result<(), SeccompError> {
    if level == SeccompLevel::Off {
        return Ok(());
    }
    let program = ThreadKind::Api.compile(level)?;
    filtered_panics();
    if level == SeccompLevel::On && !trap::handler_installed() {
        trap::install_handler(None, Some(trap::ExitLine::Api)).map_err(SeccompError::Handler)?;
    }
    trap::set_thread_name("api");
    seccompiler::apply_filter(&program).map_err(|e| SeccompError::Install {
        kind: ThreadKind::Api,
        thread: "api".into(),
        reason: e.to_string(),
    })
}

/// A panic message that a filtered thread can print: the thread, the place and the message,
/// written to stderr. The default hook may capture a backtrace (RUST_BACKTRACE), which reads
/// the working directory and the executable, calls no filter allows; the panic itself is
/// what must be reported (pinning turns a helper's into the job's error).
fn filtered_panics() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("<unnamed>");
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| info.payload().downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("thread '{name}' panicked{at}: {msg}");
    }));
}

/// The epf server's listening hook: it installs its filter.
fn enter_epf_server() -> std::io::Result<()> {
    let Some(program) = EPF.lock().unwrap_or_else(PoisonError::into_inner).take() else {
        return Ok(());
    };
    trap::set_thread_name("epf");
    seccompiler::apply_filter(&program).map_err(std::io::Error::other)
}

/// A one-line summary per kind: how many system calls and ioctl requests it allows.
pub fn summary() -> Vec<(ThreadKind, usize, usize)> {
    ThreadKind::ALL
        .iter()
        .map(|&k| {
            let l = k.allow_list();
            (k, l.syscall_count(), l.ioctl_names().len())
        })
        .collect()
}

#[cfg(test)]
mod tests;
