//! Sending and receiving whole messages, with their file descriptors, over a Unix stream
//! socket.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::{cmd, Header, WireError, HEADER_SIZE, MAX_FDS};

/// A whole received message.
#[derive(Debug)]
pub struct Message {
    /// Its header.
    pub header: Header,
    /// The body.
    pub payload: Vec<u8>,
    /// File descriptors that came with it, owned (closed on drop); at most [`MAX_FDS`].
    pub fds: Vec<OwnedFd>,
}

/// What one received message may be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecvLimits {
    /// Largest whole message, header included; a larger size in a header is refused before
    /// anything is allocated for it.
    pub max_size: usize,
    /// How long the rest of a message may take once its first byte arrived (`None`: no
    /// limit). Waiting for the first byte is not limited: a peer may be idle between
    /// messages as long as it likes, not in the middle of one.
    pub message_timeout: Option<Duration>,
}

/// Why a message could not be received.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    /// Between messages: the normal end of a connection.
    #[error("the peer closed the connection")]
    Closed,
    #[error("the peer closed the connection in the middle of a message ({got} of {want} bytes)")]
    Truncated { got: usize, want: usize },
    #[error("receiving: {0}")]
    Io(#[source] io::Error),
    /// The header announces an impossible size; the stream cannot be followed any further.
    #[error("message {} ({}): {error}", .header.msg_id, cmd::name(.header.command))]
    BadHeader { header: Header, error: WireError },
    /// The peer started a message and did not finish it in time; what it sent of it is lost,
    /// so the stream cannot be followed any further.
    #[error(
        "the peer sent {got} of the {want} bytes of a message and nothing more for {waited:?}, \
         so the message is abandoned"
    )]
    Stalled {
        got: usize,
        want: usize,
        waited: Duration,
    },
    /// The whole message arrived (the stream is still in step) but with more file
    /// descriptors than one message may carry; all of them were closed.
    #[error(
        "message {} ({}) came with more than {MAX_FDS} file descriptors; all were closed",
        .header.msg_id,
        cmd::name(.header.command)
    )]
    TooManyFds { header: Header },
}

/// Room for one SCM_RIGHTS control message of [`MAX_FDS`] descriptors (and alignment for
/// `cmsghdr`).
#[repr(C, align(8))]
struct ControlBuf([u8; 512]);

/// One `recvmsg` into `buf`: the byte count, the descriptors that came with those bytes (owned
/// at once, close-on-exec), and whether the kernel had to drop descriptors that did not fit.
fn recv_once(sock: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>, bool)> {
    let mut control = ControlBuf([0; 512]);
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * size_of::<RawFd>()) as u32) } as usize;
    debug_assert!(space <= control.0.len());
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is valid (no name, no iovecs, no control).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = space;
    let n = loop {
        // SAFETY: `msg` points at `iov` (our `buf`, writable for its length) and at `control`
        // (writable for `space` bytes); both outlive the call.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: `msg` was filled in by recvmsg; the CMSG_* macros walk the control buffer it
    // describes and never past msg_controllen.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: CMSG_FIRSTHDR/CMSG_NXTHDR returned a header inside the control buffer.
        let c = unsafe { &*cmsg };
        if c.cmsg_level == libc::SOL_SOCKET && c.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN only computes a size.
            let header = unsafe { libc::CMSG_LEN(0) } as usize;
            let count = (c.cmsg_len as usize).saturating_sub(header) / size_of::<RawFd>();
            // SAFETY: the kernel wrote `count` descriptors after the header.
            let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<RawFd>();
            for i in 0..count {
                // SAFETY: inside the data the kernel wrote (possibly unaligned); recvmsg
                // just installed these descriptors for us and nothing else owns them.
                fds.push(unsafe { OwnedFd::from_raw_fd(data.add(i).read_unaligned()) });
            }
        }
        // SAFETY: as above.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    Ok((n, fds, msg.msg_flags & libc::MSG_CTRUNC != 0))
}

/// One message being received: its bytes so far, its descriptors, its deadline.
struct Incoming<'a> {
    sock: &'a UnixStream,
    limits: RecvLimits,
    /// Bytes of the message received so far, header included.
    got: usize,
    /// Its whole size, once the header said (the header's size until then).
    want: usize,
    /// Set by the first byte, when there is a message timeout.
    deadline: Option<(Instant, Instant)>,
    fds: Vec<OwnedFd>,
    too_many_fds: bool,
}

impl Incoming<'_> {
    /// Descriptors that came with a part of this message belong to it, up to [`MAX_FDS`] in
    /// all; past that (or when the kernel already dropped some) every one is closed at once
    /// and the message is refused once it is whole.
    fn take_fds(&mut self, new: Vec<OwnedFd>, truncated: bool) {
        if truncated || self.too_many_fds || self.fds.len() + new.len() > MAX_FDS {
            self.too_many_fds = true;
            self.fds.clear();
            return;
        }
        self.fds.extend(new);
    }

    /// Waits until more of the message can be read, within its deadline.
    fn wait(&self) -> Result<(), RecvError> {
        let Some((started, deadline)) = self.deadline else {
            return Ok(());
        };
        loop {
            let now = Instant::now();
            let left = deadline.saturating_duration_since(now);
            if left.is_zero() {
                return Err(RecvError::Stalled {
                    got: self.got,
                    want: self.want,
                    waited: now - started,
                });
            }
            let mut pfd = libc::pollfd {
                fd: self.sock.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd for the duration of the call.
            let n = unsafe { libc::poll(&mut pfd, 1, ms) };
            if n > 0 {
                // Readable, or hung up / in error: recvmsg says which.
                return Ok(());
            }
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EINTR) {
                    return Err(RecvError::Io(e));
                }
            }
        }
    }

    /// Reads exactly `buf.len()` bytes. `Ok(false)`: EOF before the first byte of the message.
    fn read_exact(&mut self, buf: &mut [u8]) -> Result<bool, RecvError> {
        let mut filled = 0;
        while filled < buf.len() {
            self.wait()?;
            let (n, fds, truncated) =
                recv_once(self.sock, &mut buf[filled..]).map_err(RecvError::Io)?;
            self.take_fds(fds, truncated);
            if n == 0 {
                if self.got == 0 {
                    return Ok(false);
                }
                return Err(RecvError::Truncated {
                    got: self.got,
                    want: self.want,
                });
            }
            if self.got == 0 {
                if let Some(timeout) = self.limits.message_timeout {
                    let now = Instant::now();
                    self.deadline = Some((now, now + timeout));
                }
            }
            self.got += n;
            filled += n;
        }
        Ok(true)
    }
}

/// Receives one message of at most `max` bytes, with no time limit; see [`recv_message_with`].
pub fn recv_message(sock: &UnixStream, max: usize) -> Result<Message, RecvError> {
    recv_message_with(
        sock,
        RecvLimits {
            max_size: max,
            message_timeout: None,
        },
    )
}

/// Receives one message within `limits`. Nothing larger than the header is allocated before
/// the size was checked. EOF before a header is [`RecvError::Closed`]; anywhere else it is
/// [`RecvError::Truncated`]. File descriptors that come with any part of the message are the
/// message's (or closed, see [`RecvError::TooManyFds`]); none is ever left behind.
pub fn recv_message_with(sock: &UnixStream, limits: RecvLimits) -> Result<Message, RecvError> {
    let mut msg = Incoming {
        sock,
        limits,
        got: 0,
        want: HEADER_SIZE,
        deadline: None,
        fds: Vec::new(),
        too_many_fds: false,
    };
    let mut hb = [0u8; HEADER_SIZE];
    if !msg.read_exact(&mut hb)? {
        return Err(RecvError::Closed);
    }
    let header = Header::decode(&hb);
    let len = header
        .payload_len(limits.max_size)
        .map_err(|error| RecvError::BadHeader { header, error })?;
    msg.want = HEADER_SIZE + len;
    let mut payload = vec![0u8; len];
    msg.read_exact(&mut payload)?;
    if msg.too_many_fds {
        return Err(RecvError::TooManyFds { header });
    }
    Ok(Message {
        header,
        payload,
        fds: msg.fds,
    })
}

/// Sends one message (header, payload, fds) completely. The fds go with the first bytes; a
/// partial send (a signal, a send timeout) is finished with plain writes, so the stream never
/// holds half a message unless this returns an error.
pub fn send_message(
    sock: &UnixStream,
    header: &Header,
    payload: &[u8],
    fds: &[RawFd],
) -> io::Result<()> {
    let hb = header.encode();
    let total = hb.len() + payload.len();
    let sent = loop {
        match sock.send_with_fds(&[&hb[..], payload], fds) {
            Ok(n) => break n,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(io::Error::from_raw_os_error(e.errno())),
        }
    };
    if sent < total {
        if sent < hb.len() {
            send_all(sock, &hb[sent..])?;
            send_all(sock, payload)?;
        } else {
            send_all(sock, &payload[sent - hb.len()..])?;
        }
    }
    Ok(())
}

/// How long a peer may leave a message of ours unread, and what ends the wait early.
#[derive(Clone, Copy, Debug)]
pub struct SendLimits<'a> {
    /// The whole message must be in the socket within this time of the first try.
    pub timeout: Duration,
    /// Readable (an eventfd, a pipe): stop waiting at once.
    pub stop: Option<BorrowedFd<'a>>,
}

/// Why a message could not be sent within its [`SendLimits`].
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("sending: {0}")]
    Io(#[source] io::Error),
    /// The peer does not read: what was sent of the message is in the stream, so it cannot be
    /// followed any further.
    #[error(
        "the peer does not read: {sent} of the {total} bytes of a message could be sent in \
         {waited:?}, so the message is abandoned"
    )]
    Stalled {
        sent: usize,
        total: usize,
        waited: Duration,
    },
    /// The stop fd became readable while the peer was not reading.
    #[error("asked to stop while the peer was not reading")]
    Stopped,
}

/// Like [`send_message`], for a peer that may never read: gives up after `limits.timeout` or
/// as soon as `limits.stop` becomes readable. Nothing blocks: each piece is sent with
/// MSG_DONTWAIT once `poll` says there is room, so no socket option (and no system call a
/// filtered server thread lacks) is needed.
pub fn send_message_until(
    sock: &UnixStream,
    header: &Header,
    payload: &[u8],
    fds: &[RawFd],
    limits: SendLimits<'_>,
) -> Result<(), SendError> {
    let hb = header.encode();
    let total = hb.len() + payload.len();
    let started = Instant::now();
    let mut sent = 0;
    while sent < total {
        wait_writable(sock, limits, started, sent, total)?;
        let parts: [&[u8]; 2] = match sent.checked_sub(hb.len()) {
            None => [&hb[sent..], payload],
            Some(at) => [&payload[at..], &[]],
        };
        // The fds go with the first byte; until one went out, they did not either.
        let with = if sent == 0 { fds } else { &[] };
        match send_nowait(sock, &parts, with) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(SendError::Io(e)),
        }
    }
    Ok(())
}

/// Waits until `sock` has room (or is in error: the send says which), within the deadline
/// and unless `limits.stop` becomes readable first.
fn wait_writable(
    sock: &UnixStream,
    limits: SendLimits<'_>,
    started: Instant,
    sent: usize,
    total: usize,
) -> Result<(), SendError> {
    let mut fds = [
        libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        },
        libc::pollfd {
            fd: limits.stop.map_or(-1, |f| f.as_raw_fd()),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        let waited = started.elapsed();
        let left = limits.timeout.saturating_sub(waited);
        if left.is_zero() {
            return Err(SendError::Stalled {
                sent,
                total,
                waited,
            });
        }
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: `fds` is a valid array of two pollfds for the duration of the call (poll
        // skips the one with fd -1).
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(SendError::Io(e));
        }
        if fds[1].revents != 0 {
            return Err(SendError::Stopped);
        }
        if fds[0].revents != 0 {
            return Ok(());
        }
    }
}

/// One `sendmsg` of `parts` with `fds`, MSG_DONTWAIT | MSG_NOSIGNAL (EINTR retried): how many
/// bytes went; WouldBlock when none could.
fn send_nowait(sock: &UnixStream, parts: &[&[u8]; 2], fds: &[RawFd]) -> io::Result<usize> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut iov = parts.map(|p| libc::iovec {
        iov_base: p.as_ptr() as *mut libc::c_void,
        iov_len: p.len(),
    });
    let mut control = ControlBuf([0; 512]);
    // SAFETY: an all-zero msghdr is valid (no name, no iovecs, no control).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = iov.len();
    if !fds.is_empty() {
        let bytes = std::mem::size_of_val(fds);
        // SAFETY: CMSG_SPACE only computes a size.
        let space = unsafe { libc::CMSG_SPACE(bytes as u32) } as usize;
        debug_assert!(space <= control.0.len());
        msg.msg_control = control.0.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: the control buffer holds `space` bytes, room for one header and `fds`
        // (at most MAX_FDS, checked above); CMSG_FIRSTHDR points at its start.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(bytes as u32) as usize;
            std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(c), bytes);
        }
    }
    loop {
        // SAFETY: `msg` points at `iov` (the caller's buffers, readable for their lengths)
        // and at `control`; all outlive the call.
        let n = unsafe {
            libc::sendmsg(
                sock.as_raw_fd(),
                &msg,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// One `send` of some of `buf` with MSG_NOSIGNAL (EINTR retried): how many bytes went.
fn send_some(sock: &UnixStream, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the duration of the call.
        let n = unsafe {
            libc::send(
                sock.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n > 0 {
            return Ok(n as usize);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "send wrote nothing",
            ));
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// Writes all of `buf` with MSG_NOSIGNAL, so a vanished peer is EPIPE and not a SIGPIPE.
fn send_all(sock: &UnixStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        let n = send_some(sock, buf)?;
        buf = &buf[n..];
    }
    Ok(())
}
