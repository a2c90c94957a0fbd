//! The connection layer: one socket, one reader thread, and pipelined requests.
//!
//! The pinning engine sends DMA_MAP from several threads at once, so a sender takes a short
//! lock to write its whole message, then waits on a condition variable for its reply; the
//! reader thread receives every message and hands each reply to the waiter with its message
//! id. Nothing ever waits without a deadline.
//!
//! Failures that leave the stream's state unknown (a timeout, a lost connection, a malformed
//! reply) mark the connection broken: every request in flight fails, and later requests fail
//! at once without touching the socket. That turns "server died" into one timeout, not one
//! per remaining request (an undo after a failed pin job would otherwise wait N times).

use std::collections::HashMap;
use std::net::Shutdown;
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::dma::DmaWindows;
use super::ClientError;
use crate::counters::DeviceCounters;
use crate::vfio_user::wire::{self, cmd, flags, Header, Message, RecvError};

/// Why the connection can no longer be used.
#[derive(Clone, Debug)]
enum Fatal {
    /// A reply broke the protocol.
    Malformed(String),
    /// The socket closed or failed.
    Disconnected(String),
    /// A request timed out (the string names it).
    Timeout(String),
    /// Closed on purpose: dropped or shut down.
    Closed,
}

impl Fatal {
    fn reason(&self) -> String {
        match self {
            Fatal::Malformed(what) => format!("malformed reply: {what}"),
            Fatal::Disconnected(why) => format!("connection lost: {why}"),
            Fatal::Timeout(what) => what.clone(),
            Fatal::Closed => "the client was closed".to_string(),
        }
    }
}

/// A request waiting for its reply.
struct Pending {
    command: u16,
    /// The DMA window `[iova, iova + size)` a DMA_UNMAP withdraws: the reader thread drops it
    /// as it takes the successful reply, before it reads the server's next message.
    unmaps: Option<(u64, u64)>,
    reply: Option<Result<Message, Fatal>>,
}

struct State {
    next_id: u16,
    pending: HashMap<u16, Pending>,
    broken: Option<Fatal>,
}

struct Shared {
    name: String,
    timeout: Duration,
    /// Writes happen under `send_lock` so messages never interleave; reads only in the reader
    /// thread (through a clone of the same socket).
    stream: UnixStream,
    send_lock: Mutex<()>,
    state: Mutex<State>,
    replied: Condvar,
    /// Told once why the connection broke (not when it is closed on purpose), so the VMM
    /// can stop a guest whose device server went away even while nothing is in flight.
    on_broken: Mutex<Option<BrokenHandler>>,
    counters: Arc<DeviceCounters>,
}

/// See [`super::Client::set_on_broken`].
pub type BrokenHandler = Box<dyn Fn(&str) + Send>;

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks the connection dead (the first reason wins), wakes every waiter and shuts the
    /// socket so the server sees it too.
    fn break_with(&self, state: &mut State, fatal: Fatal) {
        if state.broken.is_none() {
            // Closing is the normal end; anything else is worth a warning.
            if matches!(fatal, Fatal::Closed) {
                tracing::debug!("vfio-user {}: {}", self.name, fatal.reason());
            } else {
                tracing::warn!("vfio-user {}: {}", self.name, fatal.reason());
                let handler = self
                    .on_broken
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take();
                if let Some(h) = handler {
                    h(&format!("{}: {}", self.name, fatal.reason()));
                }
            }
            state.broken = Some(fatal);
        }
        self.replied.notify_all();
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    fn send(&self, header: &Header, payload: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
        let _guard = self
            .send_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        wire::send_message(&self.stream, header, payload, fds)?;
        DeviceCounters::add(&self.counters.messages_sent, 1);
        Ok(())
    }
}

/// The socket and the reader thread serving it; dropping it closes the connection.
pub(super) struct Connection {
    shared: Arc<Shared>,
    reader: Option<JoinHandle<()>>,
}

impl Connection {
    /// Starts the reader thread on `stream`; every request waits at most `timeout`. The
    /// server's own commands (DMA_READ/DMA_WRITE) are served from `dma`.
    pub(super) fn new(
        stream: UnixStream,
        name: String,
        timeout: Duration,
        dma: Arc<DmaWindows>,
        counters: Arc<DeviceCounters>,
    ) -> Result<Self, ClientError> {
        let io_err = |step: &'static str, source| ClientError::Setup {
            device: name.clone(),
            step,
            source,
        };
        // A peer that stops reading must not block a sender forever either; a send that
        // times out breaks the connection like any other send failure.
        stream
            .set_write_timeout(Some(timeout.max(Duration::from_millis(1))))
            .map_err(|e| io_err("setting the send timeout", e))?;
        let reader_stream = stream
            .try_clone()
            .map_err(|e| io_err("cloning the socket", e))?;
        let shared = Arc::new(Shared {
            name: name.clone(),
            timeout,
            stream,
            send_lock: Mutex::new(()),
            state: Mutex::new(State {
                next_id: 0,
                pending: HashMap::new(),
                broken: None,
            }),
            replied: Condvar::new(),
            on_broken: Mutex::new(None),
            counters,
        });
        let for_reader = shared.clone();
        let reader = std::thread::Builder::new()
            .name("vfio-user-rx".to_string())
            .spawn(move || reader_loop(&for_reader, &reader_stream, &dma))
            .map_err(|e| io_err("starting the reply reader thread", e))?;
        Ok(Connection {
            shared,
            reader: Some(reader),
        })
    }

    pub(super) fn name(&self) -> &str {
        &self.shared.name
    }

    pub(super) fn timeout(&self) -> Duration {
        self.shared.timeout
    }

    /// Sends one command and waits for its reply. An error reply becomes
    /// [`ClientError::Refused`].
    pub(super) fn request(
        &self,
        op: String,
        command: u16,
        payload: &[u8],
        fds: &[RawFd],
    ) -> Result<Message, ClientError> {
        self.request_with(op, command, payload, fds, None)
    }

    /// A DMA_UNMAP of the window `[iova, iova + size)`: the window is gone once the server's
    /// successful reply has been read, so a DMA_READ/DMA_WRITE the server sends after that
    /// reply is refused (EFAULT), even while the caller has not yet been woken. An error reply
    /// leaves the window: the server still has it mapped.
    pub(super) fn request_unmap(
        &self,
        op: String,
        payload: &[u8],
        iova: u64,
        size: u64,
    ) -> Result<Message, ClientError> {
        self.request_with(op, cmd::DMA_UNMAP, payload, &[], Some((iova, size)))
    }

    fn request_with(
        &self,
        op: String,
        command: u16,
        payload: &[u8],
        fds: &[RawFd],
        unmaps: Option<(u64, u64)>,
    ) -> Result<Message, ClientError> {
        let sh = &*self.shared;
        let device = || sh.name.clone();
        let id = {
            let mut st = sh.state();
            if let Some(fatal) = &st.broken {
                return Err(ClientError::Broken {
                    device: device(),
                    op,
                    reason: fatal.reason(),
                });
            }
            let Some(id) = (0..=u16::MAX)
                .map(|i| st.next_id.wrapping_add(i))
                .find(|id| !st.pending.contains_key(id))
            else {
                return Err(ClientError::Invalid {
                    device: device(),
                    op,
                    what: "65536 requests are already in flight".to_string(),
                });
            };
            st.next_id = id.wrapping_add(1);
            st.pending.insert(
                id,
                Pending {
                    command,
                    unmaps,
                    reply: None,
                },
            );
            id
        };
        let header = Header::command(id, command, payload.len());
        if let Err(source) = sh.send(&header, payload, fds) {
            let mut st = sh.state();
            st.pending.remove(&id);
            if !caller_error(&source) {
                sh.break_with(
                    &mut st,
                    Fatal::Disconnected(format!("sending {op} failed: {source}")),
                );
            }
            return Err(ClientError::Send {
                device: device(),
                op,
                source,
            });
        }
        let deadline = Instant::now() + sh.timeout;
        let mut st = sh.state();
        loop {
            let Some(pending) = st.pending.get_mut(&id) else {
                // Only this function removes its own entry; treat a vanished one as a bug
                // in the reader, reported rather than panicking.
                return Err(ClientError::Malformed {
                    device: device(),
                    op,
                    what: "the request's reply slot vanished".to_string(),
                });
            };
            if let Some(reply) = pending.reply.take() {
                st.pending.remove(&id);
                drop(st);
                return match reply {
                    Ok(msg) if msg.header.is_error() => Err(ClientError::Refused {
                        device: device(),
                        op,
                        errno: msg.header.error as i32,
                    }),
                    Ok(msg) => Ok(msg),
                    Err(fatal) => Err(self.fatal_error(fatal, op)),
                };
            }
            if let Some(fatal) = st.broken.clone() {
                st.pending.remove(&id);
                return Err(self.fatal_error_other(fatal, op));
            }
            let now = Instant::now();
            if now >= deadline {
                st.pending.remove(&id);
                let what = format!("{op}: no reply within {:?}", sh.timeout);
                sh.break_with(&mut st, Fatal::Timeout(what));
                return Err(ClientError::Timeout {
                    device: device(),
                    op,
                    timeout: sh.timeout,
                });
            }
            st = sh
                .replied
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// The error for the request whose own reply was bad.
    fn fatal_error(&self, fatal: Fatal, op: String) -> ClientError {
        let device = self.shared.name.clone();
        match fatal {
            Fatal::Malformed(what) => ClientError::Malformed { device, op, what },
            other => self.fatal_error_other(other, op),
        }
    }

    /// The error for a request in flight when the connection broke for another reason.
    fn fatal_error_other(&self, fatal: Fatal, op: String) -> ClientError {
        let device = self.shared.name.clone();
        match fatal {
            Fatal::Disconnected(reason) => ClientError::Disconnected { device, op, reason },
            other => ClientError::Broken {
                device,
                op,
                reason: other.reason(),
            },
        }
    }

    /// A reply whose payload does not decode: the server is not speaking the protocol, so
    /// the connection is marked broken too.
    pub(super) fn malformed(&self, op: String, what: String) -> ClientError {
        let mut st = self.shared.state();
        self.shared
            .break_with(&mut st, Fatal::Malformed(format!("{op}: {what}")));
        ClientError::Malformed {
            device: self.shared.name.clone(),
            op,
            what,
        }
    }

    pub(super) fn invalid(&self, op: String, what: String) -> ClientError {
        ClientError::Invalid {
            device: self.shared.name.clone(),
            op,
            what,
        }
    }

    /// See [`super::Client::set_on_broken`].
    pub(super) fn set_on_broken(&self, handler: BrokenHandler) {
        *self
            .shared
            .on_broken
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(handler);
    }

    /// Breaks the connection on purpose: later requests fail at once, and the on-broken
    /// hook is not called.
    pub(super) fn shutdown(&self) {
        let mut st = self.shared.state();
        self.shared.break_with(&mut st, Fatal::Closed);
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        {
            let mut st = self.shared.state();
            self.shared.break_with(&mut st, Fatal::Closed);
        }
        if let Some(reader) = self.reader.take() {
            // The shutdown in `break_with` ends the reader's recvmsg with EOF.
            if reader.join().is_err() {
                tracing::warn!("vfio-user {}: the reply reader panicked", self.shared.name);
            }
        }
    }
}

/// Receives until the connection breaks; hands replies to their waiters and serves the
/// server's commands.
fn reader_loop(sh: &Shared, stream: &UnixStream, dma: &DmaWindows) {
    loop {
        let msg = match wire::recv_message(stream, wire::MAX_MESSAGE) {
            Ok(msg) => msg,
            Err(e) => {
                let mut st = sh.state();
                let fatal = match e {
                    RecvError::Closed => {
                        Fatal::Disconnected("the server closed the connection".into())
                    }
                    RecvError::BadHeader { header, error } => {
                        let what = error.to_string();
                        // Blame the request the header names, if it is one of ours.
                        if header.kind() == flags::TYPE_REPLY {
                            if let Some(p) = st.pending.get_mut(&header.msg_id) {
                                p.reply.get_or_insert(Err(Fatal::Malformed(what.clone())));
                            }
                        }
                        Fatal::Malformed(format!("message {}: {what}", header.msg_id))
                    }
                    e => Fatal::Disconnected(e.to_string()),
                };
                sh.break_with(&mut st, fatal);
                return;
            }
        };
        DeviceCounters::add(&sh.counters.messages_received, 1);
        let h = msg.header;
        match h.kind() {
            flags::TYPE_REPLY => {
                let mut st = sh.state();
                let problem = match st.pending.get_mut(&h.msg_id) {
                    None => Some(format!(
                        "reply {} ({}) answers no request in flight",
                        h.msg_id,
                        cmd::name(h.command)
                    )),
                    Some(p) if p.reply.is_some() => {
                        Some(format!("second reply to request {}", h.msg_id))
                    }
                    Some(p) if p.command != h.command => {
                        let what = format!(
                            "reply {} is for {} but the request was {}",
                            h.msg_id,
                            cmd::name(h.command),
                            cmd::name(p.command)
                        );
                        p.reply = Some(Err(Fatal::Malformed(what.clone())));
                        Some(what)
                    }
                    Some(p) => {
                        if let (Some((iova, size)), false) = (p.unmaps, h.is_error()) {
                            dma.remove(iova, size);
                        }
                        p.reply = Some(Ok(msg));
                        None
                    }
                };
                match problem {
                    None => sh.replied.notify_all(),
                    Some(what) => {
                        sh.break_with(&mut st, Fatal::Malformed(what));
                        return;
                    }
                }
            }
            flags::TYPE_COMMAND => {
                if !serve_command(sh, dma, &msg) {
                    return;
                }
            }
            other => {
                let mut st = sh.state();
                if let Some(p) = st.pending.get_mut(&h.msg_id) {
                    p.reply.get_or_insert(Err(Fatal::Malformed(format!(
                        "reply {} has unknown type {other}",
                        h.msg_id
                    ))));
                }
                sh.break_with(
                    &mut st,
                    Fatal::Malformed(format!("message {} has unknown type {other}", h.msg_id)),
                );
                return;
            }
        }
    }
}

/// Answers one server-to-client command (DMA_READ/DMA_WRITE from the mapped windows; any other
/// command is ENOTSUP), unless it asked for no reply. `false`: the answer could not be sent and
/// the connection is broken.
fn serve_command(sh: &Shared, dma: &DmaWindows, msg: &Message) -> bool {
    let h = msg.header;
    let result = dma.serve(h.command, &msg.payload);
    if let Ok((_, bytes)) = &result {
        let c = &sh.counters;
        let counter = match h.command {
            cmd::DMA_WRITE => &c.dma_write_bytes,
            _ => &c.dma_read_bytes,
        };
        DeviceCounters::add(counter, *bytes);
    }
    let result = result.map(|(payload, _)| payload);
    if let Err(errno) = result {
        crate::debug_limited!(
            "vfio-user {}: refusing server command {} (message {}): errno {errno}",
            sh.name,
            cmd::name(h.command),
            h.msg_id
        );
    }
    if h.flags & flags::NO_REPLY != 0 {
        return true;
    }
    let sent = match &result {
        Ok(payload) => sh.send(&Header::reply(&h, payload.len()), payload, &[]),
        Err(errno) => sh.send(&Header::error_reply(&h, *errno), &[], &[]),
    };
    if let Err(e) = sent {
        let mut st = sh.state();
        sh.break_with(
            &mut st,
            Fatal::Disconnected(format!(
                "answering server command {}: {e}",
                cmd::name(h.command)
            )),
        );
        return false;
    }
    true
}

/// A send error that came from the first sendmsg, before any byte went out (a bad fd from
/// the caller, too many fds): the stream is intact and the connection stays up. Any other may
/// have left half a message behind, and the connection is broken and shut.
pub(super) fn caller_error(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADF | libc::EINVAL | libc::ETOOMANYREFS | libc::EMSGSIZE)
    )
}
