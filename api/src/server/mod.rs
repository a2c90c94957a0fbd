//! The server: one thread, a `poll(2)` loop over the listening socket, a stop descriptor and a
//! bounded set of non-blocking connections.
//!
//! Bounds (each a client can meet):
//! - a peer whose uid is neither this process's nor root's is closed at accept (and logged);
//! - beyond [`Limits::max_connections`] open, a new connection gets 503 and is closed;
//! - the request line and headers must arrive within [`Limits::header_timeout`] of the
//!   request's first byte, and the body within as long again once the headers are in: else
//!   408 and close;
//! - sizes: see [`crate::http`] (413 for headers or a body over the limits);
//! - an answer the peer does not take for [`Limits::header_timeout`] (no byte sent) closes
//!   the connection, so a peer that never reads holds one slot for that long and never the loop;
//! - a keep-alive connection idle for [`IDLE_TIMEOUT`] is closed.

mod conn;
mod socket;
mod sys;

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{Endpoint, Response};
use conn::Conn;
use socket::FileId;

pub use conn::IDLE_TIMEOUT;
pub use socket::BindError;

/// What one request may cost the server.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The request line and headers, in bytes.
    pub max_header_bytes: usize,
    /// The body (Content-Length), in bytes.
    pub max_body_bytes: usize,
    /// From a connection's first byte of a request to its last header.
    pub header_timeout: Duration,
    /// Connections open at once; more are closed at accept.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 8 << 10,
            max_body_bytes: 64 << 10,
            header_timeout: Duration::from_secs(5),
            max_connections: 16,
        }
    }
}

/// What the API does: called on the server thread for each routed request.
pub trait Handler {
    /// Answers `endpoint` with `body` (empty when none was sent).
    fn handle(&mut self, endpoint: Endpoint, body: &[u8]) -> Response;
    /// Checked after each response is written: true ends [`Server::run`] (`vmm.shutdown`).
    fn done(&self) -> bool {
        false
    }
}

/// How long [`Server::run`] tries to send the answer that made the handler done.
const LAST_ANSWER_WITHIN: Duration = Duration::from_secs(1);

/// After accept fails (out of descriptors, say), the listener rests this long so the loop
/// does not spin on it.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// A listening API socket; the socket file is removed when it drops.
pub struct Server {
    listener: UnixListener,
    path: PathBuf,
    file: FileId,
    limits: Limits,
    euid: u32,
    idle: Duration,
}

impl Server {
    /// Creates the socket at `path`, owner-only (0600). A stale socket there (nobody
    /// listening) is replaced; anything else there is refused, as is a socket another
    /// process still serves.
    pub fn bind(path: &Path, limits: Limits) -> Result<Server, BindError> {
        let (listener, file) = socket::listen(path)?;
        Ok(Server {
            listener,
            path: path.to_path_buf(),
            file,
            limits,
            euid: sys::euid(),
            idle: IDLE_TIMEOUT,
        })
    }

    /// How long a keep-alive connection may sit with no request under way before it is
    /// closed ([`IDLE_TIMEOUT`] unless set).
    pub fn set_idle_timeout(&mut self, idle: Duration) {
        self.idle = idle;
    }

    /// Where the socket is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves until the handler is done (once its last answer is sent, or after
    /// [`LAST_ANSWER_WITHIN`]) or `stop` becomes readable (an eventfd or pipe fd, which is not
    /// read; a negative `stop` is never ready). Open connections are closed on return.
    pub fn run(&mut self, handler: &mut dyn Handler, stop: RawFd) -> std::io::Result<()> {
        let limits = self.limits;
        let mut conns: Vec<Conn> = Vec::new();
        let mut accept_after: Option<Instant> = None;
        let mut fds: Vec<libc::pollfd> = Vec::new();
        loop {
            let now = Instant::now();
            let accepting = accept_after.is_none_or(|t| now >= t);
            fds.clear();
            let listen_events = if accepting { libc::POLLIN } else { 0 };
            fds.push(pollfd(self.listener.as_raw_fd(), listen_events));
            fds.push(pollfd(stop, libc::POLLIN));
            fds.extend(conns.iter().map(|c| pollfd(c.fd(), c.events(&limits))));
            let next = conns
                .iter()
                .map(|c| c.deadline(&limits))
                .chain(accept_after.filter(|_| !accepting))
                .min();
            let timeout = next.map_or(-1, |t| millis_until(t, now));
            sys::poll(&mut fds, timeout)?;
            if fds[1].revents != 0 {
                return Ok(());
            }
            let now = Instant::now();
            for (i, conn) in conns.iter_mut().enumerate() {
                let revents = fds[i + 2].revents;
                if revents & libc::POLLIN != 0 {
                    conn.receive(&limits, now);
                } else if revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0
                    && revents & libc::POLLOUT == 0
                {
                    conn.dead = true;
                }
                // Each answer the handler gives may make it done; pipelined requests after it
                // are answered only if not.
                while revents != 0 && !conn.dead && conn.drive(handler, &limits, now) {
                    if handler.done() {
                        finish(conn);
                        return Ok(());
                    }
                }
                if !conn.dead && now >= conn.deadline(&limits) {
                    conn.expire(&limits, now);
                }
            }
            conns.retain(|c| !c.dead);
            if fds[0].revents & libc::POLLIN != 0 {
                accept_after = self.accept(&mut conns, now);
            }
        }
    }

    /// Takes every connection waiting; returns when to try again after a failure.
    fn accept(&self, conns: &mut Vec<Conn>, now: Instant) -> Option<Instant> {
        loop {
            let fd = match sys::accept(&self.listener) {
                Ok(Some(fd)) => fd,
                Ok(None) => return None,
                Err(e) => {
                    tracing::warn!("API socket {}: accept failed: {e}", self.path.display());
                    return Some(now + ACCEPT_PAUSE);
                }
            };
            let peer = match sys::peer(&fd) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!("API connection refused: its peer is unknown ({e})");
                    continue;
                }
            };
            if peer.uid != self.euid && peer.uid != 0 {
                tracing::warn!(
                    "API connection from uid {} (pid {}) refused: only uid {} and root may use {}",
                    peer.uid,
                    peer.pid,
                    self.euid,
                    self.path.display()
                );
                continue;
            }
            if conns.len() >= self.limits.max_connections {
                tracing::debug!(
                    "API connection from pid {} refused: {} are open",
                    peer.pid,
                    conns.len()
                );
                let response = Response::error(
                    503,
                    format!(
                        "the API already has {} connections open; close one and retry",
                        conns.len()
                    ),
                );
                let mut out = Vec::new();
                crate::http::write_response(&response, None, true, &mut out);
                // Best effort: a new socket's buffer takes this at once or never.
                let _ = sys::send(fd.as_raw_fd(), &out);
                continue;
            }
            conns.push(Conn::new(fd, now, self.idle));
        }
    }
}

/// Sends the rest of `conn`'s last answer, for at most [`LAST_ANSWER_WITHIN`].
fn finish(conn: &mut Conn) {
    let deadline = Instant::now() + LAST_ANSWER_WITHIN;
    loop {
        let now = Instant::now();
        conn.flush(now);
        if conn.dead || !conn.pending() || now >= deadline {
            return;
        }
        let mut fd = [pollfd(conn.fd(), libc::POLLOUT)];
        if sys::poll(&mut fd, millis_until(deadline, now)).is_err() {
            return;
        }
    }
}

fn pollfd(fd: RawFd, events: i16) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

/// Milliseconds from `now` to `t`, rounded up (a poll that wakes early would spin).
fn millis_until(t: Instant, now: Instant) -> i32 {
    let d = t.saturating_duration_since(now);
    let ms = d.as_micros().div_ceil(1000);
    i32::try_from(ms).unwrap_or(i32::MAX)
}

impl Drop for Server {
    fn drop(&mut self) {
        socket::remove_if_ours(&self.path, self.file);
    }
}

#[cfg(test)]
mod tests;
