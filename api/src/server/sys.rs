//! The system calls the loop makes itself, where std has no non-blocking or flag-taking form:
//! accept4 (non-blocking, close-on-exec, no ioctl after), SO_PEERCRED, send with
//! MSG_NOSIGNAL (a peer gone makes EPIPE, never SIGPIPE), recv and poll.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Who is at the other end of a connection, as the kernel recorded it at connect.
#[derive(Clone, Copy, Debug)]
pub(super) struct Peer {
    pub pid: i32,
    pub uid: u32,
}

/// One connection from `listener`, non-blocking; `None` when none is waiting.
pub(super) fn accept(listener: &impl AsRawFd) -> io::Result<Option<OwnedFd>> {
    loop {
        // SAFETY: accept4 with null address pointers stores nothing; the fd it returns is new
        // and owned here.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            )
        };
        if fd >= 0 {
            // SAFETY: `fd` was just returned by accept4 and nothing else owns it.
            return Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) => return Ok(None),
            // A peer that gave up before we took it; the next one may be there.
            Some(libc::EINTR | libc::ECONNABORTED) => continue,
            _ => return Err(e),
        }
    }
}

pub(super) fn peer(fd: &OwnedFd) -> io::Result<Peer> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes at most `len` bytes into `cred`, a ucred.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Peer {
        pid: cred.pid,
        uid: cred.uid,
    })
}

/// This process's effective user id.
pub(super) fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// Sends what it can of `buf` without blocking; `Ok(0)` when the socket is full.
pub(super) fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is valid for `buf.len()` bytes.
        let n = unsafe {
            libc::send(
                fd,
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) => return Ok(0),
            Some(libc::EINTR) => continue,
            _ => return Err(e),
        }
    }
}

/// Receives into `buf` without blocking: `Ok(None)` when nothing is there, `Ok(Some(0))` at
/// the peer's end.
pub(super) fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) => return Ok(None),
            Some(libc::EINTR) => continue,
            _ => return Err(e),
        }
    }
}

/// Waits for `fds` at most `timeout_ms` (-1: no limit); an interrupted wait returns 0.
pub(super) fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> io::Result<usize> {
    // SAFETY: `fds` is a valid slice of pollfd of the length given.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    if n >= 0 {
        return Ok(n as usize);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EINTR) => Ok(0),
        _ => Err(e),
    }
}
