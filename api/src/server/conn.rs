//! One connection: the bytes received and not yet answered, the answer not yet sent, and the
//! clocks that bound both. Nothing here blocks: a read or a send takes what the socket has
//! room for, and the rest waits for the next poll.

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use super::sys;
use super::{Handler, Limits};
use crate::http::{self, Bounds, Parsed};
use crate::{Method, Response};

/// A keep-alive connection with no request under way is closed after this long (unless
/// [`super::Server::set_idle_timeout`] says otherwise).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How much one receive takes.
const READ_CHUNK: usize = 8 << 10;

pub(super) struct Conn {
    fd: OwnedFd,
    /// Received and not yet answered.
    buf: Vec<u8>,
    /// The answer being sent, and how much of it went.
    out: Vec<u8>,
    sent: usize,
    /// When the request under way sent its first byte, and when its head was complete.
    started: Option<Instant>,
    head_at: Option<Instant>,
    /// The last time this connection made progress: accepted, a byte sent, an answer done.
    last: Instant,
    /// Close once what is queued is sent (Connection: close, HTTP/1.0, an error that
    /// leaves the request's end unknown).
    close_after: bool,
    /// The peer has sent all it will: answer the whole requests received, then close.
    eof: bool,
    /// How long it may sit with no request under way.
    idle: Duration,
    pub dead: bool,
}

/// What one step over the received bytes did.
pub(super) enum Stepped {
    /// Nothing to answer yet.
    Waiting,
    /// An answer is queued; `handled`: the handler gave it.
    Answered { handled: bool },
}

impl Conn {
    pub fn new(fd: OwnedFd, now: Instant, idle: Duration) -> Conn {
        Conn {
            fd,
            buf: Vec::new(),
            out: Vec::new(),
            sent: 0,
            started: None,
            head_at: None,
            last: now,
            close_after: false,
            eof: false,
            idle,
            dead: false,
        }
    }

    pub fn fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    /// Whether part of an answer waits to be sent.
    pub fn pending(&self) -> bool {
        self.sent < self.out.len()
    }

    /// The most a connection holds received: a whole request at its bounds, and one byte
    /// more to see it exceeds them.
    fn capacity(limits: &Limits) -> usize {
        limits
            .max_header_bytes
            .saturating_add(limits.max_body_bytes)
            .saturating_add(1)
    }

    /// The poll events this connection waits for: sending while an answer is queued, else
    /// receiving, unless it has said all it will.
    pub fn events(&self, limits: &Limits) -> i16 {
        if self.pending() {
            libc::POLLOUT
        } else if self.close_after || self.eof || self.buf.len() >= Self::capacity(limits) {
            0
        } else {
            libc::POLLIN
        }
    }

    /// Takes what the socket has.
    pub fn receive(&mut self, limits: &Limits, now: Instant) {
        let room = Self::capacity(limits).saturating_sub(self.buf.len());
        let mut chunk = [0u8; READ_CHUNK];
        let want = room.min(READ_CHUNK);
        if want == 0 {
            return;
        }
        match sys::recv(self.fd(), &mut chunk[..want]) {
            Ok(None) => {}
            Ok(Some(0)) => self.eof = true,
            Ok(Some(n)) => {
                if self.buf.is_empty() {
                    self.started = Some(now);
                }
                self.buf.extend_from_slice(&chunk[..n]);
            }
            Err(_) => self.dead = true,
        }
    }

    /// Sends what the socket takes of the queued answer.
    pub fn flush(&mut self, now: Instant) {
        while self.pending() {
            match sys::send(self.fd(), &self.out[self.sent..]) {
                Ok(0) => return,
                Ok(n) => {
                    self.sent += n;
                    self.last = now;
                }
                Err(_) => {
                    self.dead = true;
                    return;
                }
            }
        }
        self.out.clear();
        self.sent = 0;
    }

    /// Sends, then answers the next request if nothing is left to send, as long as there is
    /// something to do. Returns true once the handler answered a request (the server then
    /// asks it whether it is done).
    pub fn drive(&mut self, handler: &mut dyn Handler, limits: &Limits, now: Instant) -> bool {
        loop {
            self.flush(now);
            if self.dead || self.pending() {
                return false;
            }
            if self.close_after {
                self.dead = true;
                return false;
            }
            match self.step(handler, limits, now) {
                Stepped::Waiting => {
                    // Everything whole is answered and sent, and no more will come.
                    if self.eof {
                        self.dead = true;
                    }
                    return false;
                }
                Stepped::Answered { handled: true } => {
                    self.flush(now);
                    return true;
                }
                Stepped::Answered { handled: false } => {}
            }
        }
    }

    /// Answers the first request in the buffer if it is whole (the handler's answer or the
    /// server's refusal), or sends `100 Continue` to a client waiting for it.
    fn step(&mut self, handler: &mut dyn Handler, limits: &Limits, now: Instant) -> Stepped {
        if self.buf.is_empty() {
            return Stepped::Waiting;
        }
        let bounds = Bounds {
            max_header_bytes: limits.max_header_bytes,
            max_body_bytes: limits.max_body_bytes,
        };
        match http::parse(&self.buf, bounds) {
            Parsed::More { head } => {
                if let (Some(head), None) = (head, self.head_at) {
                    self.head_at = Some(now);
                    if head.expect_continue && !self.eof {
                        self.out.extend_from_slice(http::CONTINUE);
                        return Stepped::Answered { handled: false };
                    }
                }
                Stepped::Waiting
            }
            Parsed::Request {
                endpoint,
                body,
                len,
                close,
            } => {
                let response = handler.handle(endpoint, &self.buf[body]);
                self.answer(&response, None, Some(len), close, now);
                Stepped::Answered { handled: true }
            }
            Parsed::Refused {
                response,
                allow,
                len,
                close,
            } => {
                self.answer(&response, allow, len, close, now);
                Stepped::Answered { handled: false }
            }
        }
    }

    /// Queues `response` to the request that took `len` bytes (`None`: unknown, close).
    fn answer(
        &mut self,
        response: &Response,
        allow: Option<Method>,
        len: Option<usize>,
        close: bool,
        now: Instant,
    ) {
        let close = close || len.is_none();
        match len {
            Some(n) => {
                self.buf.drain(..n.min(self.buf.len()));
            }
            None => self.buf.clear(),
        }
        // A pipelined request's clock starts when the one before it is answered.
        self.started = (!self.buf.is_empty()).then_some(now);
        self.head_at = None;
        self.close_after = close;
        self.last = now;
        http::write_response(response, allow, close, &mut self.out);
    }

    /// When this connection's next bound runs out.
    pub fn deadline(&self, limits: &Limits) -> Instant {
        if self.pending() {
            self.last + limits.header_timeout
        } else if let Some(t) = self.head_at {
            t + limits.header_timeout
        } else if let Some(t) = self.started {
            t + limits.header_timeout
        } else {
            self.last + self.idle
        }
    }

    /// The bound ran out: a request that did not arrive in time gets 408 (sent if the socket
    /// takes it at once); the connection closes in every case.
    pub fn expire(&mut self, limits: &Limits, now: Instant) {
        let what = match (self.pending(), self.head_at, self.started) {
            (true, _, _) => None,
            (false, Some(_), _) => Some("the body"),
            (false, None, Some(_)) => Some("the request line and headers"),
            (false, None, None) => None,
        };
        if let Some(what) = what {
            let message = format!(
                "{what} did not arrive within {:?}; send the whole request at once",
                limits.header_timeout
            );
            self.buf.clear();
            self.answer(&Response::error(408, message), None, None, true, now);
            self.flush(now);
        }
        self.dead = true;
    }
}
