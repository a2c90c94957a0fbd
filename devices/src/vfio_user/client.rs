//! The VMM side of vfio-user.
//!
//! The pinning engine sends DMA_MAP from several threads at once, so requests are pipelined:
//! a sender takes a short lock to write its whole message, then waits on a condition variable
//! for its reply; one reader thread receives every message and hands each reply to the waiter
//! with its message id. Nothing ever waits without a deadline.
//!
//! Failures that leave the stream's state unknown (a timeout, a lost connection, a malformed
//! reply) mark the client broken: every request in flight fails, and later requests fail at
//! once without touching the socket. That turns "server died" into one timeout, not one per
//! remaining request (an undo after a failed pin job would otherwise wait N times).

use std::collections::HashMap;
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::wire::{
    self, cmd, flags, Capabilities, DeviceInfo, DmaMap, DmaUnmap, Header, IrqInfoMsg, IrqSet,
    Message, RecvError, RegionAccess, RegionInfoMsg, Version,
};
use crate::vfio::backend::region;
use crate::vfio::{IrqInfo, MmapArea, RegionInfo};

/// What went wrong talking to a vfio-user server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{device}: cannot connect: {source}; is a vfio-user server listening on it?")]
    Connect {
        device: String,
        #[source]
        source: io::Error,
    },
    #[error("{device}: setting up the connection: {step}: {source}")]
    Setup {
        device: String,
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{device}: {op}: sending the request: {source}")]
    Send {
        device: String,
        op: String,
        #[source]
        source: io::Error,
    },
    /// The connection is then considered dead: the stream may still carry the late reply.
    #[error("{device}: {op}: no reply within {timeout:?}; is the device server alive?")]
    Timeout {
        device: String,
        op: String,
        timeout: Duration,
    },
    #[error("{device}: {op}: the server refused: {}", errno_text(*.errno))]
    Refused {
        device: String,
        op: String,
        /// 0 when the server gave none.
        errno: i32,
    },
    #[error("{device}: {op}: malformed reply: {what}")]
    Malformed {
        device: String,
        op: String,
        what: String,
    },
    #[error("{device}: {op}: connection lost: {reason}")]
    Disconnected {
        device: String,
        op: String,
        reason: String,
    },
    /// Nothing was sent: a request after a failure would wait for a reply that cannot come.
    #[error("{device}: {op}: the connection is unusable after an earlier failure: {reason}")]
    Broken {
        device: String,
        op: String,
        reason: String,
    },
    /// A request the protocol cannot carry (a bug of the caller); nothing was sent.
    #[error("{device}: {op}: {what}")]
    Invalid {
        device: String,
        op: String,
        what: String,
    },
    #[error("{device}: version negotiation: {what}")]
    Version { device: String, what: String },
}

fn errno_text(errno: i32) -> String {
    if errno == 0 {
        "error reply without an errno".to_string()
    } else {
        format!("{} (errno {errno})", io::Error::from_raw_os_error(errno))
    }
}

impl ClientError {
    /// The errno of an error reply, if this is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            ClientError::Refused { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// Why the connection can no longer be used.
#[derive(Clone, Debug)]
enum Fatal {
    /// A reply broke the protocol.
    Malformed(String),
    /// The socket closed or failed.
    Disconnected(String),
    /// A request timed out (the string names it).
    Timeout(String),
    /// The client is being dropped.
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
}

/// See [`Client::set_on_broken`].
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
        wire::send_message(&self.stream, header, payload, fds)
    }
}

/// A connection to a vfio-user server. `Send + Sync`: share it by reference or `Arc`.
pub struct Client {
    shared: Arc<Shared>,
    reader: Option<JoinHandle<()>>,
    peer: Capabilities,
    /// Region fds the server sent; kept open while the client lives so the `RawFd`s handed
    /// out in [`RegionInfo::mmap_fd`] stay valid.
    region_fds: Mutex<Vec<OwnedFd>>,
}

// The pinning engine shares one client between its threads.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Client>();
};

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("name", &self.shared.name)
            .field("timeout", &self.shared.timeout)
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to the server at `path` and negotiates the protocol version; every request,
    /// this one included, waits at most `timeout` for its reply.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Client, ClientError> {
        let name = path.display().to_string();
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            device: name.clone(),
            source,
        })?;
        Self::from_stream(stream, name, timeout)
    }

    /// A client over an already connected socket (a socketpair in tests); `name` names the
    /// device in errors.
    pub fn from_stream(
        stream: UnixStream,
        name: String,
        timeout: Duration,
    ) -> Result<Client, ClientError> {
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
        });
        let for_reader = shared.clone();
        let reader = std::thread::Builder::new()
            .name("vfio-user-rx".to_string())
            .spawn(move || reader_loop(&for_reader, &reader_stream))
            .map_err(|e| io_err("starting the reply reader thread", e))?;
        let mut client = Client {
            shared,
            reader: Some(reader),
            peer: Capabilities::default(),
            region_fds: Mutex::new(Vec::new()),
        };
        client.peer = client.negotiate()?;
        Ok(client)
    }

    /// The socket path (or the name given to [`Client::from_stream`]), for messages.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    fn negotiate(&self) -> Result<Capabilities, ClientError> {
        let ours = Version {
            major: wire::VERSION_MAJOR,
            minor: wire::VERSION_MINOR,
            json: Capabilities::ours().to_json(),
        };
        let reply = self.request("VERSION".into(), cmd::VERSION, &ours.encode(), &[])?;
        let version_err = |what: String| ClientError::Version {
            device: self.shared.name.clone(),
            what,
        };
        let theirs = Version::decode(&reply.payload).map_err(|e| version_err(e.to_string()))?;
        if theirs.major != wire::VERSION_MAJOR || theirs.minor > wire::VERSION_MINOR {
            return Err(version_err(format!(
                "the server answered version {}.{} to our {}.{}",
                theirs.major,
                theirs.minor,
                wire::VERSION_MAJOR,
                wire::VERSION_MINOR
            )));
        }
        let caps = Capabilities::from_json(&theirs.json).map_err(|e| version_err(e.to_string()))?;
        if caps.max_msg_fds == 0 || caps.max_data_xfer_size == 0 {
            return Err(version_err(format!(
                "the server's capabilities are unusable: {caps:?}"
            )));
        }
        Ok(caps)
    }

    /// Sends one command and waits for its reply. An error reply becomes
    /// [`ClientError::Refused`].
    fn request(
        &self,
        op: String,
        command: u16,
        payload: &[u8],
        fds: &[RawFd],
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
                    reply: None,
                },
            );
            id
        };
        let header = Header::command(id, command, payload.len());
        if let Err(source) = sh.send(&header, payload, fds) {
            let mut st = sh.state();
            st.pending.remove(&id);
            // These come from the first sendmsg, before any byte went out (a bad fd from
            // the caller, too many fds): the stream is intact and the connection stays up.
            // Anything else may have left half a message behind.
            let caller_error = matches!(
                source.raw_os_error(),
                Some(libc::EBADF | libc::EINVAL | libc::ETOOMANYREFS | libc::EMSGSIZE)
            );
            if !caller_error {
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
    fn malformed(&self, op: String, what: String) -> ClientError {
        let mut st = self.shared.state();
        self.shared
            .break_with(&mut st, Fatal::Malformed(format!("{op}: {what}")));
        ClientError::Malformed {
            device: self.shared.name.clone(),
            op,
            what,
        }
    }

    fn invalid(&self, op: String, what: String) -> ClientError {
        ClientError::Invalid {
            device: self.shared.name.clone(),
            op,
            what,
        }
    }

    /// Device flags (`VFIO_DEVICE_FLAGS_*`), number of regions, number of interrupt indices.
    pub fn device_info(&self) -> Result<(u32, u32, u32), ClientError> {
        let op = "DEVICE_GET_INFO".to_string();
        let reply = self.request(
            op.clone(),
            cmd::DEVICE_GET_INFO,
            &DeviceInfo::default().encode(),
            &[],
        )?;
        let info =
            DeviceInfo::decode(&reply.payload).map_err(|e| self.malformed(op, e.to_string()))?;
        Ok((info.flags, info.num_regions, info.num_irqs))
    }

    /// Region `index`. A file descriptor the server sends for mmap is kept by the client (so
    /// the `RawFd` in [`RegionInfo::mmap_fd`] stays valid while it lives).
    pub fn region_info(&self, index: u32) -> Result<RegionInfo, ClientError> {
        let op = format!("DEVICE_GET_REGION_INFO {index}");
        // Room for a sparse-mmap capability with dozens of areas; a server that needs more
        // says so in argsz and is asked once more.
        let mut argsz = (RegionInfoMsg::SIZE + 1024) as u32;
        let (info, reply) = loop {
            let req = RegionInfoMsg {
                argsz,
                index,
                ..RegionInfoMsg::default()
            };
            let reply =
                self.request(op.clone(), cmd::DEVICE_GET_REGION_INFO, &req.encode(), &[])?;
            let info = RegionInfoMsg::decode(&reply.payload)
                .map_err(|e| self.malformed(op.clone(), e.to_string()))?;
            if info.flags & wire::REGION_FLAG_CAPS != 0 && info.argsz as usize > reply.payload.len()
            {
                let limit = wire::MAX_MESSAGE - wire::HEADER_SIZE;
                if argsz as usize >= info.argsz as usize || info.argsz as usize > limit {
                    return Err(self.malformed(
                        op,
                        format!(
                            "the server needs {} bytes for the region info but sent {}",
                            info.argsz,
                            reply.payload.len()
                        ),
                    ));
                }
                argsz = info.argsz;
                continue;
            }
            break (info, reply);
        };
        if info.index != index {
            return Err(self.malformed(op, format!("the reply describes region {}", info.index)));
        }
        let mut flags = info.flags & !wire::REGION_FLAG_CAPS;
        let sparse = if info.flags & wire::REGION_FLAG_CAPS != 0 {
            wire::find_sparse_mmap(&reply.payload, info.cap_offset)
                .map_err(|e| self.malformed(op.clone(), e.to_string()))?
        } else {
            None
        };
        let mut fds = reply.fds;
        let mmap_fd = if flags & region::FLAG_MMAP != 0 {
            match fds.is_empty() {
                true => {
                    tracing::debug!(
                        "vfio-user {}: region {index} is mappable but came without an fd; using \
                         region reads and writes",
                        self.shared.name
                    );
                    flags &= !region::FLAG_MMAP;
                    None
                }
                false => {
                    let fd = fds.swap_remove(0);
                    let raw = fd.as_raw_fd();
                    self.region_fds
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(fd);
                    Some((raw, info.offset))
                }
            }
        } else {
            None
        };
        let mmap_areas = if flags & region::FLAG_MMAP == 0 {
            Vec::new()
        } else {
            match sparse {
                Some(areas) => areas
                    .into_iter()
                    .map(|(offset, size)| MmapArea { offset, size })
                    .collect(),
                None => vec![MmapArea {
                    offset: 0,
                    size: info.size,
                }],
            }
        };
        Ok(RegionInfo {
            index,
            flags,
            size: info.size,
            mmap_areas,
            mmap_fd,
        })
    }

    /// The largest REGION_READ/WRITE the server accepts, within our own limit.
    fn xfer_chunk(&self) -> usize {
        (self.peer.max_data_xfer_size as usize).clamp(1, wire::MAX_DATA_XFER)
    }

    /// Reads `buf.len()` bytes at `offset` of region `index` (in pieces of the server's
    /// `max_data_xfer_size`).
    pub fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<(), ClientError> {
        let chunk = self.xfer_chunk();
        let mut done = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(chunk);
            let at = offset.checked_add(done as u64);
            let op = format!("REGION_READ region {index} offset {offset:#x}+{done:#x} ({n} bytes)");
            let Some(at) = at else {
                return Err(self.invalid(op, "the offset wraps".to_string()));
            };
            let req = RegionAccess {
                offset: at,
                region: index,
                count: n as u32,
            };
            let reply = self.request(op.clone(), cmd::REGION_READ, &req.encode(&[]), &[])?;
            let (echo, data) = RegionAccess::decode(&reply.payload, "REGION_READ reply")
                .map_err(|e| self.malformed(op.clone(), e.to_string()))?;
            if echo.count as usize != n || data.len() < n {
                return Err(self.malformed(
                    op,
                    format!(
                        "asked for {n} bytes, the reply says {} and carries {}",
                        echo.count,
                        data.len()
                    ),
                ));
            }
            buf[done..done + n].copy_from_slice(&data[..n]);
            done += n;
        }
        Ok(())
    }

    /// Writes `data` at `offset` of region `index`.
    pub fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), ClientError> {
        let chunk = self.xfer_chunk();
        let mut done = 0;
        while done < data.len() {
            let n = (data.len() - done).min(chunk);
            let op =
                format!("REGION_WRITE region {index} offset {offset:#x}+{done:#x} ({n} bytes)");
            let Some(at) = offset.checked_add(done as u64) else {
                return Err(self.invalid(op, "the offset wraps".to_string()));
            };
            let req = RegionAccess {
                offset: at,
                region: index,
                count: n as u32,
            };
            let reply = self.request(
                op.clone(),
                cmd::REGION_WRITE,
                &req.encode(&data[done..done + n]),
                &[],
            )?;
            let (echo, _) = RegionAccess::decode(&reply.payload, "REGION_WRITE reply")
                .map_err(|e| self.malformed(op.clone(), e.to_string()))?;
            if echo.count as usize != n {
                return Err(self.malformed(
                    op,
                    format!("wrote {n} bytes, the reply says {}", echo.count),
                ));
            }
            done += n;
        }
        Ok(())
    }

    /// Interrupt index `index`.
    pub fn irq_info(&self, index: u32) -> Result<IrqInfo, ClientError> {
        let op = format!("DEVICE_GET_IRQ_INFO {index}");
        let req = IrqInfoMsg {
            index,
            ..IrqInfoMsg::default()
        };
        let reply = self.request(op.clone(), cmd::DEVICE_GET_IRQ_INFO, &req.encode(), &[])?;
        let info = IrqInfoMsg::decode(&reply.payload)
            .map_err(|e| self.malformed(op.clone(), e.to_string()))?;
        if info.index != index {
            return Err(self.malformed(op, format!("the reply describes index {}", info.index)));
        }
        Ok(IrqInfo {
            index,
            flags: info.flags,
            count: info.count,
        })
    }

    /// DEVICE_SET_IRQS with `flags` (`wire::irq_set`) for vectors `start..start + count`,
    /// with `fds` as SCM_RIGHTS data. One eventfd per vector (`fds.len() == count`) is split
    /// into several messages if the server takes fewer fds per message.
    pub fn set_irqs(
        &self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: &[RawFd],
    ) -> Result<(), ClientError> {
        let op = |s: u32, c: u32| format!("DEVICE_SET_IRQS index {index} vectors {s}+{c}");
        let max = (self.peer.max_msg_fds as usize).min(wire::MAX_FDS);
        if fds.len() <= max {
            return self.set_irqs_one(op(start, count), index, flags, start, count, fds);
        }
        if fds.len() != count as usize {
            return Err(self.invalid(
                op(start, count),
                format!(
                    "{} fds for {count} vectors, and the server takes at most {max} per message",
                    fds.len()
                ),
            ));
        }
        let mut s = start;
        for part in fds.chunks(max) {
            let c = part.len() as u32;
            self.set_irqs_one(op(s, c), index, flags, s, c, part)?;
            s += c;
        }
        Ok(())
    }

    fn set_irqs_one(
        &self,
        op: String,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: &[RawFd],
    ) -> Result<(), ClientError> {
        let req = IrqSet {
            flags,
            index,
            start,
            count,
            data: Vec::new(),
        };
        self.request(op, cmd::DEVICE_SET_IRQS, &req.encode(), fds)?;
        Ok(())
    }

    /// Lets the server reach `[iova, iova + size)`, backed by `fd` at `fd_offset` (mmap'ed
    /// shared by the server).
    pub fn dma_map(
        &self,
        iova: u64,
        size: u64,
        fd: RawFd,
        fd_offset: u64,
        readable: bool,
        writable: bool,
    ) -> Result<(), ClientError> {
        let op = format!("DMA_MAP iova {iova:#x} size {size:#x}");
        let mut f = 0;
        if readable {
            f |= wire::dma_flags::READ;
        }
        if writable {
            f |= wire::dma_flags::WRITE;
        }
        let req = DmaMap {
            flags: f,
            offset: fd_offset,
            address: iova,
            size,
        };
        self.request(op, cmd::DMA_MAP, &req.encode(), &[fd])?;
        Ok(())
    }

    /// Withdraws the mapping made at exactly `[iova, iova + size)`.
    pub fn dma_unmap(&self, iova: u64, size: u64) -> Result<(), ClientError> {
        let op = format!("DMA_UNMAP iova {iova:#x} size {size:#x}");
        let req = DmaUnmap {
            flags: 0,
            address: iova,
            size,
        };
        // The reply echoes the request; its content tells nothing new, so it is not checked.
        self.request(op, cmd::DMA_UNMAP, &req.encode(), &[])?;
        Ok(())
    }

    /// Function-level reset.
    pub fn reset(&self) -> Result<(), ClientError> {
        self.request("DEVICE_RESET".into(), cmd::DEVICE_RESET, &[], &[])?;
        Ok(())
    }

    /// Calls `handler` once if the connection breaks (the server died, timed out or sent
    /// garbage) rather than being closed by [`Client::shutdown`] or drop. It runs on whichever
    /// thread noticed, with the client's state locked: it must not call back into the client.
    pub fn set_on_broken(&self, handler: BrokenHandler) {
        *self
            .shared
            .on_broken
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(handler);
    }

    /// Closes the connection now, while other owners may still hold the client: later
    /// requests fail at once. For teardown, before the server is stopped, so its going away
    /// is not reported as a lost connection.
    pub fn shutdown(&self) {
        let mut st = self.shared.state();
        self.shared.break_with(&mut st, Fatal::Closed);
    }
}

impl Drop for Client {
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

/// Receives until the connection breaks; hands replies to their waiters and refuses
/// server-initiated commands (this client shares memory by fd only).
fn reader_loop(sh: &Shared, stream: &UnixStream) {
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
                tracing::debug!(
                    "vfio-user {}: refusing server command {} ({})",
                    sh.name,
                    h.command,
                    cmd::name(h.command)
                );
                if h.flags & flags::NO_REPLY == 0 {
                    if let Err(e) = sh.send(&Header::error_reply(&h, libc::ENOTSUP), &[], &[]) {
                        let mut st = sh.state();
                        sh.break_with(
                            &mut st,
                            Fatal::Disconnected(format!(
                                "answering server command {}: {e}",
                                cmd::name(h.command)
                            )),
                        );
                        return;
                    }
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
