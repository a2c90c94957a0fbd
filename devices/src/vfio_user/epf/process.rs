//! The process entry point behind `vmm device epf`: one pci-epf-test device served to one
//! client, stopped cleanly by SIGTERM/SIGINT. With `--socket PATH` it listens there and
//! leaves no socket file behind; with `--socket-fd N` (what `vmm run` uses) it serves the
//! client already connected on an inherited socket, so there is no file at all and the
//! client's death (its end closing) ends the server.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, OnceLock};

use pinning::class::{Classify, ErrorClass};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::EpfUserDevice;
use crate::epf::{EpfConfig, EpfError};
use crate::pci::dma::MappedRegions;
use crate::vfio_user::server::{self, ServerError};

/// Why `vmm device epf` stopped with an error. `socket` names where it served: the path, or
/// the inherited descriptor.
#[derive(Debug, thiserror::Error)]
pub enum EpfServerError {
    #[error("{}: {what}", .path.display())]
    SocketPath { path: PathBuf, what: String },
    #[error(
        "--socket-fd {fd}: {what}; pass a connected Unix stream socket this process inherited"
    )]
    SocketFd { fd: RawFd, what: String },
    #[error("{}: cannot listen on it: {source}; check that its directory exists and is writable", .socket.display())]
    Bind {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The stop eventfd and the signal handlers are process-wide, so one server at a time.
    #[error("{socket}: another vfio-user epf server already runs in this process")]
    AlreadyRunning { socket: String },
    #[error("{socket}: {op}: {source}")]
    Io {
        socket: String,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{socket}: {source}")]
    Model {
        socket: String,
        #[source]
        source: EpfError,
    },
    #[error(transparent)]
    Serve(#[from] ServerError),
}

impl Classify for EpfServerError {
    fn class(&self) -> ErrorClass {
        match self {
            EpfServerError::SocketPath { .. }
            | EpfServerError::SocketFd { .. }
            | EpfServerError::Bind { .. } => ErrorClass::User,
            EpfServerError::AlreadyRunning { .. }
            | EpfServerError::Io { .. }
            | EpfServerError::Model { .. } => ErrorClass::Internal,
            EpfServerError::Serve(e) => e.class(),
        }
    }
}

/// Runs once the server listens, before it accepts (see [`on_listening`]).
static ON_LISTENING: OnceLock<fn() -> io::Result<()>> = OnceLock::new();

/// Sets what [`run_epf_server`] runs once it listens and before it accepts a client, and
/// [`run_epf_server_on_fd`] before it serves (the VMM installs the server's seccomp filter
/// there); an error ends the server. Set once.
pub fn on_listening(hook: fn() -> io::Result<()>) {
    let _ = ON_LISTENING.set(hook);
}

/// The eventfd the signal handler writes; -1 when no server runs.
static STOP_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_stop_signal(_: libc::c_int) {
    let fd = STOP_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one = 1u64.to_ne_bytes();
        // SAFETY: write(2) is async-signal-safe; `one` is a valid 8-byte buffer. The result
        // is ignored: a full counter already means "stop".
        unsafe { libc::write(fd, one.as_ptr().cast(), one.len()) };
    }
}

/// SIGTERM/SIGINT handlers that write the stop eventfd while installed; the previous
/// handlers come back on drop.
struct StopSignals {
    stop: EventFd,
    old: Vec<(libc::c_int, libc::sigaction)>,
}

impl StopSignals {
    fn install(socket: &str) -> Result<Self, EpfServerError> {
        let io_err = |op: &'static str, source| EpfServerError::Io {
            socket: socket.to_string(),
            op,
            source,
        };
        let stop =
            EventFd::new(EFD_NONBLOCK).map_err(|e| io_err("creating the stop eventfd", e))?;
        if STOP_FD
            .compare_exchange(-1, stop.as_raw_fd(), Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return Err(EpfServerError::AlreadyRunning {
                socket: socket.to_string(),
            });
        }
        let mut me = StopSignals {
            stop,
            old: Vec::new(),
        };
        for sig in [libc::SIGTERM, libc::SIGINT] {
            // SAFETY: zeroed sigaction structs are valid (empty mask, no flags); the handler
            // only performs an async-signal-safe write; `old` receives the previous action.
            let res = unsafe {
                let mut act: libc::sigaction = std::mem::zeroed();
                act.sa_sigaction = on_stop_signal as extern "C" fn(libc::c_int) as usize;
                libc::sigemptyset(&mut act.sa_mask);
                let mut old: libc::sigaction = std::mem::zeroed();
                let r = libc::sigaction(sig, &act, &mut old);
                if r == 0 {
                    me.old.push((sig, old));
                }
                r
            };
            if res != 0 {
                return Err(io_err(
                    "installing the SIGTERM/SIGINT handlers",
                    io::Error::last_os_error(),
                ));
            }
        }
        Ok(me)
    }
}

impl Drop for StopSignals {
    fn drop(&mut self) {
        for (sig, old) in self.old.drain(..).rev() {
            // SAFETY: restores the action saved by `install`.
            unsafe { libc::sigaction(sig, &old, std::ptr::null_mut()) };
        }
        STOP_FD.store(-1, Ordering::SeqCst);
    }
}

/// Removes the socket file when the server ends, however it ends (short of SIGKILL).
struct RemoveSocket(PathBuf);

impl Drop for RemoveSocket {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!("removing {}: {e}", self.0.display());
            }
        }
    }
}

/// Makes `socket` free to bind: refuses anything that is not a socket and a socket someone
/// listens on; removes a stale socket file.
fn clear_stale_socket(socket: &Path) -> Result<(), EpfServerError> {
    let refuse = |what: String| EpfServerError::SocketPath {
        path: socket.to_path_buf(),
        what,
    };
    let meta = match std::fs::symlink_metadata(socket) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(refuse(format!("cannot inspect it: {e}"))),
    };
    if !meta.file_type().is_socket() {
        return Err(refuse(
            "exists and is not a socket; refusing to replace it (remove it or choose another path)"
                .to_string(),
        ));
    }
    match UnixStream::connect(socket) {
        Ok(_) => Err(refuse(
            "another server is listening on it; stop it or choose another path".to_string(),
        )),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            std::fs::remove_file(socket)
                .map_err(|e| refuse(format!("removing the stale socket: {e}")))?;
            Ok(())
        }
        Err(e) => Err(refuse(format!("probing the existing socket: {e}"))),
    }
}

/// Serves a pci-epf-test device on `socket` to ONE client, until it disconnects or the
/// process gets SIGTERM/SIGINT; the socket file is removed on every way out. Prints one
/// line to stderr once it listens, nothing on stdout.
pub fn run_epf_server(socket: &Path) -> Result<(), EpfServerError> {
    let name = socket.display().to_string();
    let io_err = |op: &'static str, source| EpfServerError::Io {
        socket: name.clone(),
        op,
        source,
    };
    let signals = StopSignals::install(&name)?;
    clear_stale_socket(socket)?;
    let listener = UnixListener::bind(socket).map_err(|source| EpfServerError::Bind {
        socket: socket.to_path_buf(),
        source,
    })?;
    let _remove = RemoveSocket(socket.to_path_buf());
    tracing::info!("vfio-user epf server listening on {name}");
    run_hook(&name)?;
    let (mut device, regions) = new_device(&name)?;

    // Accept, unless asked to stop first.
    let mut pfd = [
        libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: signals.stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `pfd` is a valid array of two pollfds for the duration of the call.
        let n = unsafe { libc::poll(pfd.as_mut_ptr(), pfd.len() as libc::nfds_t, -1) };
        if n >= 0 {
            break;
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(io_err("waiting for a client", e));
        }
    }
    if pfd[1].revents != 0 {
        tracing::info!("vfio-user epf server: stopped before a client connected");
        return Ok(());
    }
    let (stream, _) = listener.accept().map_err(|e| io_err("accepting", e))?;
    drop(listener);
    tracing::info!("vfio-user epf server: client connected");
    serve_one(stream, &mut device, regions, &signals)
}

/// Serves a pci-epf-test device to the ONE client already connected on `fd`, a Unix stream
/// socket this process inherited (one end of a socketpair whose other end the client holds),
/// until the client closes its end or the process gets SIGTERM/SIGINT. No file is created. The
/// descriptor is checked before it is used and owned (closed) from then on.
pub fn run_epf_server_on_fd(fd: RawFd) -> Result<(), EpfServerError> {
    let name = format!("socket fd {fd}");
    let signals = StopSignals::install(&name)?;
    let stream = adopt_connected_socket(fd)?;
    tracing::info!("vfio-user epf server serving the client on {name}");
    run_hook(&name)?;
    let (mut device, regions) = new_device(&name)?;
    serve_one(stream, &mut device, regions, &signals)
}

/// Takes `fd` as this process's own once it is a connected Unix stream socket, close-on-exec.
fn adopt_connected_socket(fd: RawFd) -> Result<UnixStream, EpfServerError> {
    let refuse = |what: String| EpfServerError::SocketFd { fd, what };
    let last = || io::Error::last_os_error();
    // SAFETY: F_GETFD reads the descriptor's flags and touches no memory.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(refuse(format!("not an open descriptor ({})", last())));
    }
    let int_opt = |opt: libc::c_int| -> io::Result<libc::c_int> {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `v` and `len` are ours and sized for an int option, as getsockopt expects.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if r == 0 {
            Ok(v)
        } else {
            Err(last())
        }
    };
    match (int_opt(libc::SO_DOMAIN), int_opt(libc::SO_TYPE)) {
        (Ok(libc::AF_UNIX), Ok(libc::SOCK_STREAM)) => {}
        (Err(e), _) | (_, Err(e)) => return Err(refuse(format!("not a socket ({e})"))),
        (Ok(domain), Ok(kind)) => {
            return Err(refuse(format!(
                "a socket of domain {domain} and type {kind}, not a Unix stream socket"
            )))
        }
    }
    // SAFETY: all-zero bytes are a valid sockaddr_un; getpeername writes at most `len` bytes
    // into it and updates `len`.
    let connected = unsafe {
        let mut addr: libc::sockaddr_un = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        libc::getpeername(fd, (&mut addr as *mut libc::sockaddr_un).cast(), &mut len)
    };
    if connected != 0 {
        return Err(refuse(format!("not connected ({})", last())));
    }
    // Inherited without close-on-exec; whatever this process starts must not hold it.
    // SAFETY: F_SETFD sets the descriptor's flags and touches no memory.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(refuse(format!("setting close-on-exec: {}", last())));
    }
    // SAFETY: `fd` is open (checked above) and was handed to this process on its command line
    // to serve on; nothing else in the process knows or closes it, so it can be owned here.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(UnixStream::from(owned))
}

/// Runs the hook set with [`on_listening`], if any.
fn run_hook(name: &str) -> Result<(), EpfServerError> {
    match ON_LISTENING.get() {
        Some(hook) => hook().map_err(|source| EpfServerError::Io {
            socket: name.to_string(),
            op: "running the listening hook",
            source,
        }),
        None => Ok(()),
    }
}

fn new_device(name: &str) -> Result<(EpfUserDevice, Arc<MappedRegions>), EpfServerError> {
    let regions = Arc::new(MappedRegions::new());
    let device = EpfUserDevice::new(EpfConfig::default(), regions.clone()).map_err(|source| {
        EpfServerError::Model {
            socket: name.to_string(),
            source,
        }
    })?;
    Ok((device, regions))
}

/// Serves `stream` until the client leaves or a stop signal arrives.
fn serve_one(
    stream: UnixStream,
    device: &mut EpfUserDevice,
    regions: Arc<MappedRegions>,
    signals: &StopSignals,
) -> Result<(), EpfServerError> {
    // SAFETY: the eventfd lives in `signals`, which outlives this call and so the borrow.
    let stop = unsafe { std::os::fd::BorrowedFd::borrow_raw(signals.stop.as_raw_fd()) };
    let result = server::serve_until(stream, device, regions, Some(stop));
    tracing::info!("vfio-user epf server: done ({result:?})");
    Ok(result?)
}
