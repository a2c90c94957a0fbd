//! Sending and receiving whole messages, with their file descriptors, over a Unix stream
//! socket.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::{cmd, Header, WireError, HEADER_SIZE, MAX_FDS};

/// A whole received message.
#[derive(Debug)]
pub struct Message {
    /// Its header.
    pub header: Header,
    /// The body.
    pub payload: Vec<u8>,
    /// File descriptors that came with it, owned (closed on drop).
    pub fds: Vec<OwnedFd>,
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
}

/// Reads exactly `buf.len()` bytes, collecting any fds that come along. `Ok(false)`: EOF
/// before the first byte.
fn recv_exact(
    sock: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> Result<bool, RecvError> {
    let mut got = 0;
    while got < buf.len() {
        let mut raw = [-1 as RawFd; MAX_FDS];
        let rest = &mut buf[got..];
        let mut iov = [libc::iovec {
            iov_base: rest.as_mut_ptr().cast(),
            iov_len: rest.len(),
        }];
        // SAFETY: the iovec points at `rest`, memory we borrow mutably for this call, and any
        // bytes may be written there.
        let res = unsafe { sock.recv_with_fds(&mut iov, &mut raw) };
        match res {
            Ok((n, nfds)) => {
                for &fd in raw.iter().take(nfds) {
                    // SAFETY: recvmsg just installed these descriptors for us; nothing else
                    // owns them.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
                if n == 0 {
                    if got == 0 {
                        return Ok(false);
                    }
                    return Err(RecvError::Truncated {
                        got,
                        want: buf.len(),
                    });
                }
                got += n;
            }
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(RecvError::Io(io::Error::from_raw_os_error(e.errno()))),
        }
    }
    Ok(true)
}

/// Receives one message of at most `max` bytes. Nothing larger than the header is allocated
/// before the size was checked. EOF before a header is [`RecvError::Closed`]; anywhere else
/// it is [`RecvError::Truncated`].
pub fn recv_message(sock: &UnixStream, max: usize) -> Result<Message, RecvError> {
    let mut fds = Vec::new();
    let mut hb = [0u8; HEADER_SIZE];
    if !recv_exact(sock, &mut hb, &mut fds)? {
        return Err(RecvError::Closed);
    }
    let header = Header::decode(&hb);
    let len = header
        .payload_len(max)
        .map_err(|error| RecvError::BadHeader { header, error })?;
    let mut payload = vec![0u8; len];
    match recv_exact(sock, &mut payload, &mut fds) {
        Ok(true) => {}
        Ok(false) => {
            return Err(RecvError::Truncated {
                got: HEADER_SIZE,
                want: HEADER_SIZE + len,
            })
        }
        Err(RecvError::Truncated { got, want }) => {
            return Err(RecvError::Truncated {
                got: HEADER_SIZE + got,
                want: HEADER_SIZE + want,
            })
        }
        Err(e) => return Err(e),
    }
    Ok(Message {
        header,
        payload,
        fds,
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

/// Writes all of `buf` with MSG_NOSIGNAL, so a vanished peer is EPIPE and not a SIGPIPE.
fn send_all(sock: &UnixStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the duration of the call.
        let n = unsafe {
            libc::send(
                sock.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "send wrote nothing",
            ));
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}
