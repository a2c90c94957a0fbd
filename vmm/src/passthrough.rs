//! Passthrough devices for `vmm run`: host functions through kernel VFIO (`--device`) and
//! functions served over vfio-user (`--user-device`), including the built-in pci-epf-test
//! server that `--user-device epf` starts as a child process.
//!
//! The order matters and is the builder's: devices are opened and attached (`devices` stage)
//! before guest RAM is mapped for them (`pin` stage), so the kernel never pins lazily, on one
//! thread, at attach time.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::counters::DeviceCounters;
use devices::exit::StopHandle;
use devices::vfio::kernel::{IommuContext, IommuKind, KernelVfio, VfioDeviceFd};
use devices::vfio::{VfioBackend, VfioPciDevice};
use devices::vfio_user::{Client, ClientError, UserBackend};
use devices::ExitReason;
use pinning::backend::{FdDmaMapper, VfioUserBackend};
use pinning::region::RamFile;
use pinning::{Classify, ErrorClass, PinBackend};

use crate::pci::PciError;
use crate::platform::Platform;
use crate::vstate::vm::Vm;

/// How long one vfio-user request may take before the device counts as dead.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the built-in server's exit status may lag behind its end of the socket closing.
const SERVER_EXIT: Duration = Duration::from_millis(500);

/// `--user-device`: the built-in test device, or a socket another process serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UserDevice {
    /// Start `vmm device epf` as a child and connect to it.
    Epf,
    /// Connect to this socket.
    Socket(PathBuf),
}

impl std::str::FromStr for UserDevice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "" => Err("give `epf` or the path of a vfio-user socket".into()),
            "epf" => Ok(UserDevice::Epf),
            path => Ok(UserDevice::Socket(PathBuf::from(path))),
        }
    }
}

/// Why a passthrough device could not be set up (stage `devices`), or failed before the
/// guest ran. Each names the device and what to fix.
#[derive(Debug, thiserror::Error)]
pub enum PassthroughError {
    #[error(transparent)]
    Kernel(#[from] devices::vfio::kernel::KernelVfioError),
    #[error(transparent)]
    User(#[from] devices::vfio_user::ClientError),
    #[error(transparent)]
    Model(#[from] devices::vfio::VfioPciError),
    #[error(transparent)]
    Pci(#[from] PciError),
    #[error("a passthrough device failed before the guest ran: {0}")]
    FailedEarly(String),
    #[error("interrupted by signal {0} while the device server started")]
    Interrupted(i32),
    #[error("starting the pci-epf-test server (`{exe} device epf`): {source}")]
    Spawn {
        exe: PathBuf,
        source: std::io::Error,
    },
    #[error("{name} exited before it answered: {status}")]
    ServerExited { name: String, status: String },
    #[error("{socket}: not a vfio-user socket: {what}")]
    NotASocket { socket: PathBuf, what: String },
}

impl Classify for PassthroughError {
    /// Before the guest runs, a device that cannot be set up is the device's (or the user's)
    /// to fix.
    fn class(&self) -> ErrorClass {
        match self {
            PassthroughError::Interrupted(sig) => ErrorClass::Interrupted(*sig),
            PassthroughError::User(e @ ClientError::ConnectInterrupted { .. }) => e.class(),
            _ => ErrorClass::Device,
        }
    }
}

/// The first failure of a device while the guest runs, kept for the final message.
#[derive(Clone, Default)]
pub struct Failure(Arc<Mutex<FailureState>>);

#[derive(Default)]
struct FailureState {
    what: Option<String>,
    finished: bool,
}

impl Failure {
    /// Records `what` (the first one wins) and stops the VM. After [`Failure::finish`] it
    /// does nothing: a server that exits during teardown is not a failure.
    pub fn fail(&self, stop: &StopHandle, what: String) {
        let mut state = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if state.finished {
            return;
        }
        state.what.get_or_insert(what);
        drop(state);
        stop.request(ExitReason::DeviceFailed);
    }

    /// What failed before the guest ran, if anything did (the watch goes on).
    pub fn before_run(&self) -> Option<String> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .what
            .clone()
    }

    /// Ends the watch (the guest has stopped) and says what failed, if anything did.
    pub fn finish(&self) -> Option<String> {
        let mut state = self.0.lock().unwrap_or_else(|p| p.into_inner());
        state.finished = true;
        state.what.take()
    }
}

/// Every passthrough device attached: the handles that keep each one open (kernel VFIO fds,
/// vfio-user connections, the servers this VMM started) and how guest RAM must be mapped
/// for them.
#[derive(Default)]
pub struct Passthrough {
    /// One DMA-mapping backend per IOMMU context or vfio-user connection, for the pin stage.
    pub dma: Vec<Arc<dyn PinBackend>>,
    /// Names for the report.
    pub names: Vec<String>,
    /// Each device's counters, by its name in `names` (kernel VFIO devices count nothing yet).
    pub counters: Vec<(String, Arc<DeviceCounters>)>,
    kernel: Vec<Arc<KernelVfio>>,
    clients: Vec<Arc<Client>>,
    // After `clients`: a server is stopped only once our side has hung up.
    servers: Vec<EpfServer>,
}

impl Drop for Passthrough {
    fn drop(&mut self) {
        for c in &self.clients {
            c.shutdown();
        }
    }
}

/// A test-only hole: the page at this guest address is left out of the device's DMA map.
pub struct DmaHole {
    inner: Arc<UserBackend>,
    hole: u64,
}

impl FdDmaMapper for DmaHole {
    fn map_fd(&self, iova: u64, size: u64, file: &RamFile, offset: u64) -> std::io::Result<()> {
        for (start, end) in self.split(iova, size) {
            self.inner
                .map_fd(start, end - start, file, offset + (start - iova))?;
        }
        Ok(())
    }
    fn unmap(&self, iova: u64, size: u64) -> std::io::Result<()> {
        for (start, end) in self.split(iova, size) {
            self.inner.unmap(start, end - start)?;
        }
        Ok(())
    }
}

impl DmaHole {
    fn split(&self, iova: u64, size: u64) -> Vec<(u64, u64)> {
        let (end, hole_end) = (iova + size, self.hole + 4096);
        if self.hole >= end || hole_end <= iova {
            return vec![(iova, end)];
        }
        [(iova, self.hole), (hole_end, end)]
            .into_iter()
            .filter(|(a, b)| a < b)
            .collect()
    }
}

/// The passthrough devices `vmm run` asked for.
#[derive(Clone, Debug, Default)]
pub struct DeviceRequest {
    /// Host functions through kernel VFIO: sysfs paths or PCI addresses.
    pub kernel_devices: Vec<PathBuf>,
    pub iommu: IommuKind,
    pub user_devices: Vec<UserDevice>,
    /// Testing only: leave the page at this guest address out of the vfio-user DMA map.
    pub dma_hole: Option<u64>,
}

/// Opens, connects and attaches every device to `platform`'s PCI bus; returns them with the
/// DMA-mapping backends they need.
pub fn attach_all(
    vm: &Vm,
    platform: &mut Platform,
    req: &DeviceRequest,
    failure: &Failure,
) -> Result<Passthrough, PassthroughError> {
    let mut out = Passthrough::default();
    let mut context: Option<IommuContext> = None;
    for path in &req.kernel_devices {
        let dev = match &context {
            None => KernelVfio::open(path, req.iommu, kvm_vfio_device(vm))?,
            Some(c) => KernelVfio::attach(path, c)?,
        };
        context.get_or_insert_with(|| dev.context().clone());
        let dev = Arc::new(dev);
        let name = VfioBackend::name(dev.as_ref()).to_string();
        out.counters.push((name.clone(), Arc::default()));
        out.names.push(name);
        attach_model(vm, platform, dev.clone(), failure)?;
        out.kernel.push(dev);
    }
    out.dma.extend(context.iter().map(|c| c.pin_backend()));
    for user in &req.user_devices {
        let client = match user {
            UserDevice::Epf => {
                // Owned by `out` at once, so an error below still stops and reaps it.
                out.servers
                    .push(EpfServer::start(vm.stop_handle(), failure.clone())?);
                match out.servers.last_mut() {
                    Some(server) => server.connect()?,
                    None => unreachable!("a server was just pushed"),
                }
            }
            UserDevice::Socket(path) => connect(path)?,
        };
        let client = Arc::new(client);
        // A server that dies or goes silent stops the guest, whoever started the server.
        let (stop, f) = (vm.stop_handle(), failure.clone());
        client.set_on_broken(Box::new(move |why| f.fail(&stop, why.to_string())));
        out.clients.push(client.clone());
        out.names.push(client.name().to_string());
        out.counters
            .push((client.name().to_string(), client.counters()));
        let backend = Arc::new(UserBackend::new(client));
        attach_model(vm, platform, backend.clone(), failure)?;
        let mapper: Arc<dyn FdDmaMapper> = match req.dma_hole {
            Some(hole) => Arc::new(DmaHole {
                inner: backend,
                hole: hole & !4095,
            }),
            None => backend,
        };
        out.dma.push(Arc::new(VfioUserBackend::new(mapper)));
    }
    Ok(out)
}

/// KVM's VFIO pseudo-device: KVM learns of each group or cdev through it (it needs that for
/// devices whose DMA is not cache-coherent). Optional on x86 with a coherent IOMMU, so a KVM
/// without it is logged, not fatal.
fn kvm_vfio_device(vm: &Vm) -> Option<Arc<VfioDeviceFd>> {
    let mut dev = kvm_bindings::kvm_create_device {
        type_: kvm_bindings::kvm_device_type_KVM_DEV_TYPE_VFIO,
        fd: 0,
        flags: 0,
    };
    match vm.fd().create_device(&mut dev) {
        Ok(fd) => Some(Arc::new(VfioDeviceFd::new_from_kvm(fd))),
        Err(e) => {
            tracing::warn!("KVM has no VFIO device ({e}); non-coherent DMA will not be handled");
            None
        }
    }
}

fn attach_model(
    vm: &Vm,
    platform: &mut Platform,
    backend: Arc<dyn VfioBackend>,
    failure: &Failure,
) -> Result<(), PassthroughError> {
    let mut model = VfioPciDevice::new(backend)?;
    let (stop, failure) = (vm.stop_handle(), failure.clone());
    model.set_failure_handler(Box::new(move |e| failure.fail(&stop, e.to_string())));
    platform.attach_vfio(model)?;
    Ok(())
}

/// Connects to a socket someone else serves, with errors that say what the path is.
fn connect(socket: &Path) -> Result<Client, PassthroughError> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::metadata(socket) {
        Err(e) => {
            return Err(PassthroughError::NotASocket {
                socket: socket.into(),
                what: format!("{e} (start the device server first)"),
            })
        }
        Ok(m) if !m.file_type().is_socket() => {
            return Err(PassthroughError::NotASocket {
                socket: socket.into(),
                what: "the path exists but is not a Unix socket".into(),
            })
        }
        Ok(_) => {}
    }
    Ok(Client::connect(socket, REQUEST_TIMEOUT)?)
}

/// `vmm device epf` running as our child, serving one end of a socketpair whose other end
/// is our client: no file, so nothing to remove, and if vmm dies (even by SIGKILL) the server
/// reads EOF and ends (its death signal ends it too). Stopped (SIGTERM, then SIGKILL) and
/// reaped on drop. A watcher thread notices if it dies while the guest runs.
struct EpfServer {
    child: Child,
    /// Our end of the socketpair, until [`EpfServer::connect`] takes it.
    ours: Option<UnixStream>,
    stopping: Arc<AtomicBool>,
    watcher: Option<JoinHandle<()>>,
    stop: StopHandle,
    failure: Failure,
}

impl EpfServer {
    fn start(stop: StopHandle, failure: Failure) -> Result<Self, PassthroughError> {
        let exe = std::env::current_exe().map_err(|source| PassthroughError::Spawn {
            exe: "vmm".into(),
            source,
        })?;
        let spawn_error = |source| PassthroughError::Spawn {
            exe: exe.clone(),
            source,
        };
        // Both ends close-on-exec: no other child of ours inherits either. Only this child
        // gets its end, by clearing the flag between its fork and exec.
        let (ours, theirs) = UnixStream::pair().map_err(spawn_error)?;
        let fd = theirs.as_raw_fd();
        let mut cmd = Command::new(&exe);
        cmd.args(["device", "epf", "--socket-fd"])
            .arg(fd.to_string())
            .args(crate::seccomp::epf_child_args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            // Its own process group: a Ctrl-C at the terminal is ours to handle (undo the
            // pinning, then stop the server), not a device failure.
            .process_group(0);
        // Our child's "serving" line is noise on the user's terminal; RUST_LOG still wins.
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "warn");
        }
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: between fork and exec the closure only makes async-signal-safe calls
        // (signal, fcntl, prctl, getppid, _exit) and allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                // Until exec the child has vmm's handlers, which only record a signal: put
                // the defaults back so that SIGTERM (ours, or the death signal) ends it here.
                libc::signal(libc::SIGTERM, libc::SIG_DFL);
                libc::signal(libc::SIGINT, libc::SIG_DFL);
                // The server's end of the socketpair survives the exec (fds 0-2 are set up
                // before this runs, and `fd` is above them, so it was not overwritten).
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // If vmm dies without reaping us (SIGKILL), the server goes too.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // vmm already gone before the death signal was armed.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            })
        };
        let child = cmd.spawn().map_err(spawn_error)?;
        // The child has its copy; ours of its end must go, or its EOF would never come.
        drop(theirs);
        Ok(EpfServer {
            child,
            ours: Some(ours),
            stopping: Arc::new(AtomicBool::new(false)),
            watcher: None,
            stop,
            failure,
        })
    }

    /// What the server is called in messages and the report.
    fn name(&self) -> String {
        format!(
            "the pci-epf-test server (`vmm device epf`, pid {})",
            self.child.id()
        )
    }

    /// Connects over our end of the socketpair (the server serves at once; a request waits
    /// for it to start) and starts watching it.
    fn connect(&mut self) -> Result<Client, PassthroughError> {
        let Some(ours) = self.ours.take() else {
            unreachable!("connect is called once per server")
        };
        match Client::from_stream(ours, self.name(), REQUEST_TIMEOUT) {
            Ok(c) => {
                self.watch();
                Ok(c)
            }
            Err(e) => {
                if let Some(sig) = pinning::cancel::pending_signal() {
                    return Err(PassthroughError::Interrupted(sig));
                }
                // A server that exited is named by its status, the likelier cause.
                let deadline = Instant::now() + SERVER_EXIT;
                while Instant::now() < deadline {
                    if let Ok(Some(status)) = self.child.try_wait() {
                        return Err(PassthroughError::ServerExited {
                            name: self.name(),
                            status: describe(status),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e.into())
            }
        }
    }

    fn watch(&mut self) {
        let pid = self.child.id() as libc::id_t;
        let (stopping, stop, failure) = (
            self.stopping.clone(),
            self.stop.clone(),
            self.failure.clone(),
        );
        // Named, so that a seccomp report can say which thread it was.
        let watcher = std::thread::Builder::new().name("epf-watcher".into());
        let watcher = watcher.spawn(move || {
            // WNOWAIT: notice the exit without reaping; Drop reaps.
            // SAFETY: siginfo_t is plain data, for which all zeroes is a valid value.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: waitid writes only into `info`, a siginfo_t we own.
            let r =
                unsafe { libc::waitid(libc::P_PID, pid, &mut info, libc::WEXITED | libc::WNOWAIT) };
            // A signal to vmm ends the run through the signal path, not as a device failure.
            let signalled = pinning::cancel::pending_signal().is_some();
            if r == 0 && !stopping.load(Ordering::Acquire) && !signalled {
                // SAFETY: waitid filled `info` for a child exit.
                let (code, status) = unsafe { (info.si_code, info.si_status()) };
                let how = if code == libc::CLD_EXITED {
                    format!("exited with status {status}")
                } else {
                    format!("was killed by signal {status}")
                };
                failure.fail(
                    &stop,
                    format!("the pci-epf-test server (pid {pid}) {how} while the guest ran"),
                );
            }
        });
        self.watcher = Some(watcher.expect("failed to spawn the epf watcher thread"));
    }
}

fn describe(status: std::process::ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (_, Some(s)) => format!("killed by signal {s}"),
        _ => status.to_string(),
    }
}

impl Drop for EpfServer {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Release);
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: signalling our own child, which is not reaped yet (only Drop reaps).
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() > deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        if let Some(w) = self.watcher.take() {
            let _ = w.join();
        }
    }
}
