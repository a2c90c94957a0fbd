//! The VMM side of vfio-user: [`Client`], split into the connection layer (`connection`:
//! socket, reader thread, pipelining, per-request timeout, the broken state and its hook), the
//! typed requests (`protocol`) and the DMA windows the server may read and write by message
//! (`dma`).

mod connect;
mod connection;
mod dma;
mod protocol;

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::counters::DeviceCounters;
pub use connection::BrokenHandler;
use connection::Connection;
pub use dma::DmaMemory;
use dma::DmaWindows;
use pinning::class::{Classify, ErrorClass};

use super::wire::Capabilities;

/// What went wrong talking to a vfio-user server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{device}: cannot connect: {source}; is a vfio-user server listening on it?")]
    Connect {
        device: String,
        #[source]
        source: io::Error,
    },
    /// The server listens but does not accept: its queue of connections stayed full.
    #[error(
        "{device}: the server accepted no connection within {waited:?} (its listen queue is \
         full); check that the process serving this socket is alive and accepting connections"
    )]
    NotAccepting { device: String, waited: Duration },
    #[error(
        "{device}: interrupted by {} while waiting for the server to accept the connection",
        pinning::cancel::CancelReason::Signal(*.signal)
    )]
    ConnectInterrupted { device: String, signal: i32 },
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
    #[error("{device}: {op}: the server refused: {}", refusal_text(op, *.errno))]
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
    /// The server said (in its device info or capabilities) that it does not do this.
    #[error("{device}: {op}: {what}")]
    Unsupported {
        device: String,
        op: String,
        what: String,
    },
}

/// The errno of an error reply to `op`, with what our own server means by it where that
/// says more than the errno (a DMA_MAP refused for the file it carried).
fn refusal_text(op: &str, errno: i32) -> String {
    if errno == 0 {
        return "error reply without an errno".to_string();
    }
    let meaning = match errno {
        _ if !op.starts_with("DMA_MAP") => "",
        libc::EPERM => {
            ", which `vmm device epf` answers when the file is not sealed against shrinking \
             (F_SEAL_SHRINK)"
        }
        libc::EINVAL => {
            ", which `vmm device epf` answers when the range is bad or runs past the end of \
             the file"
        }
        _ => "",
    };
    // The io::Error says "(os error N)" itself.
    format!("{}{meaning}", io::Error::from_raw_os_error(errno))
}

impl Classify for ClientError {
    fn class(&self) -> ErrorClass {
        match self {
            // The socket path is the user's: no server there, or not theirs to reach.
            ClientError::Connect { .. } => ErrorClass::User,
            ClientError::ConnectInterrupted { signal, .. } => ErrorClass::Interrupted(*signal),
            ClientError::NotAccepting { .. }
            | ClientError::Send { .. }
            | ClientError::Timeout { .. }
            | ClientError::Refused { .. }
            | ClientError::Malformed { .. }
            | ClientError::Disconnected { .. }
            | ClientError::Broken { .. }
            | ClientError::Version { .. }
            | ClientError::Unsupported { .. } => ErrorClass::Device,
            ClientError::Setup { .. } | ClientError::Invalid { .. } => ErrorClass::Internal,
        }
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

    /// The connection is closed: lost under this request, shut by a failed send, or shut
    /// before it was sent.
    pub fn connection_gone(&self) -> bool {
        match self {
            ClientError::Disconnected { .. } | ClientError::Broken { .. } => true,
            ClientError::Send { source, .. } => !connection::caller_error(source),
            _ => false,
        }
    }
}

/// A connection to a vfio-user server. `Send + Sync`: share it by reference or `Arc`.
pub struct Client {
    // Dropped first: closes the connection and joins the reader before the fds below close.
    conn: Connection,
    peer: Capabilities,
    /// Windows the server may reach by DMA_READ/DMA_WRITE (every DMA_MAP made).
    dma: Arc<DmaWindows>,
    /// `VFIO_DEVICE_FLAGS_*` from the last DEVICE_GET_INFO (`u32::MAX`: not asked yet).
    device_flags: AtomicU32,
    /// What this connection has done, for `vm.counters`.
    counters: Arc<DeviceCounters>,
    /// Region fds the server sent; kept open while the client lives so the `RawFd`s handed
    /// out in [`crate::vfio::types::RegionInfo::mmap_fd`] stay valid.
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
            .field("name", &self.conn.name())
            .field("timeout", &self.conn.timeout())
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to the server at `path` and negotiates the protocol version; the connection
    /// is waited for at most `timeout` (a server that listens and never accepts), and so is
    /// every request's reply, this one included. A SIGINT/SIGTERM caught by the process's
    /// [`pinning::cancel::SignalGuard`] ends the wait for the connection.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Client, ClientError> {
        let name = path.display().to_string();
        let stream = connect::connect(path, timeout).map_err(|failure| match failure {
            connect::Failure::Io(source) => ClientError::Connect {
                device: name.clone(),
                source,
            },
            connect::Failure::QueueFull(waited) => ClientError::NotAccepting {
                device: name.clone(),
                waited,
            },
            connect::Failure::Interrupted(signal) => ClientError::ConnectInterrupted {
                device: name.clone(),
                signal,
            },
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
        let dma = Arc::new(DmaWindows::default());
        let counters = Arc::new(DeviceCounters::default());
        let mut client = Client {
            conn: Connection::new(stream, name, timeout, dma.clone(), counters.clone())?,
            peer: Capabilities::default(),
            dma,
            counters,
            device_flags: AtomicU32::new(u32::MAX),
            region_fds: Mutex::new(Vec::new()),
        };
        client.peer = client.negotiate()?;
        Ok(client)
    }

    /// The server's capabilities, as negotiated (the spec's defaults for what it left out).
    pub fn peer(&self) -> Capabilities {
        self.peer
    }

    /// What this connection has done: messages, DMA served, bytes mapped.
    pub fn counters(&self) -> Arc<DeviceCounters> {
        self.counters.clone()
    }

    /// The socket path (or the name given to [`Client::from_stream`]), for messages.
    pub fn name(&self) -> &str {
        self.conn.name()
    }

    /// Calls `handler` once if the connection breaks (the server died, timed out or sent
    /// garbage) rather than being closed by [`Client::shutdown`] or drop. It runs on whichever
    /// thread noticed, with the client's state locked: it must not call back into the client.
    pub fn set_on_broken(&self, handler: BrokenHandler) {
        self.conn.set_on_broken(handler);
    }

    /// Closes the connection now, while other owners may still hold the client: later
    /// requests fail at once. For teardown, before the server is stopped, so its going away
    /// is not reported as a lost connection.
    pub fn shutdown(&self) {
        self.conn.shutdown();
    }
}
