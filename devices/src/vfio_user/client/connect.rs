//! Connecting to a server's socket without waiting forever.
//!
//! A blocking `connect` on a Unix stream socket waits for as long as the listener's queue of
//! connections not yet accepted is full: a server that listens and never accepts would hold
//! the VMM before its guest ever ran. A non-blocking connect is refused at once instead
//! (EAGAIN) and there is nothing to `poll` for until the queue has room, so it is retried
//! every few milliseconds until a deadline, and a SIGINT/SIGTERM caught by the process's
//! [`pinning::cancel::SignalGuard`] ends the wait.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// How often a connect refused for a full queue is tried again.
const RETRY: Duration = Duration::from_millis(5);

/// Why no connection was made.
pub(super) enum Failure {
    /// The connect itself failed (no such file, nobody listening, no permission).
    Io(io::Error),
    /// The listener's queue stayed full for this long.
    QueueFull(Duration),
    /// This signal arrived while waiting.
    Interrupted(i32),
}

/// Connects to the Unix stream socket at `path`, waiting at most `deadline` for a listener
/// whose queue is full. The stream returned is blocking.
pub(super) fn connect(path: &Path, deadline: Duration) -> Result<UnixStream, Failure> {
    let address = socket_address(path).map_err(Failure::Io)?;
    // SAFETY: a plain socket(2) call; the descriptor is owned at once below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(Failure::Io(io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let stream = UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let started = Instant::now();
    loop {
        // SAFETY: `address` is a valid sockaddr_un of the length given, alive for the call.
        let ret = unsafe {
            libc::connect(
                fd,
                (&address as *const libc::sockaddr_un).cast(),
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            )
        };
        if ret == 0 {
            break;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) => {}
            _ => return Err(Failure::Io(e)),
        }
        if let Some(sig) = pinning::cancel::pending_signal() {
            return Err(Failure::Interrupted(sig));
        }
        let waited = started.elapsed();
        if waited >= deadline {
            return Err(Failure::QueueFull(waited));
        }
        std::thread::sleep(RETRY.min(deadline - waited));
    }
    stream.set_nonblocking(false).map_err(Failure::Io)?;
    Ok(stream)
}

/// `path` as a Unix socket address; a path too long for one is ENAMETOOLONG.
fn socket_address(path: &Path) -> io::Result<libc::sockaddr_un> {
    // SAFETY: sockaddr_un is plain integers and bytes, for which all zeroes is a value.
    let mut address: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    address.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    // One byte stays 0: the path is NUL-terminated.
    if bytes.is_empty() || bytes.len() >= address.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    for (to, from) in address.sun_path.iter_mut().zip(bytes) {
        *to = *from as libc::c_char;
    }
    Ok(address)
}
