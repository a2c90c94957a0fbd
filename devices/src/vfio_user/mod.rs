//! vfio-user: a PCI function served by another process over a Unix socket
//! (QEMU `docs/interop/vfio-user.rst`, protocol version 0.1).
//!
//! Our own implementation replaces the `vfio_user` crate, whose client took error replies to
//! DMA_MAP for success and could wait forever after one. Here:
//! - [`Client`] is the VMM side: pipelined (many threads may have requests in flight; a
//!   reader thread hands each reply to its waiter by message id), every request has a
//!   timeout, an error reply is an error with its errno, and a malformed reply, a timeout or
//!   a lost connection marks the client broken so later calls fail at once instead of
//!   waiting again;
//! - [`server`] serves any [`server::UserDevice`] to one client, applying DMA_MAP/UNMAP to a
//!   [`crate::pci::MappedRegions`] the device does its DMA through;
//! - [`epf`] serves the pci-epf-test model ([`crate::epf::EpfTest`]) that way, for
//!   `vmm device epf --socket PATH`;
//! - [`wire`] is the message format, shared by both sides.

pub mod client;
pub mod epf;
mod json;
pub mod server;
pub mod wire;

#[cfg(test)]
mod tests;

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::vfio::VfioBackendError;

pub use client::Client;
pub use epf::{run_epf_server, EpfUserDevice};
pub use server::{serve, UserDevice};

/// What went wrong talking vfio-user. Every variant names the device (socket path) and,
/// where there is one, the request.
#[derive(Debug, thiserror::Error)]
pub enum VfioUserError {
    /// The socket could not be reached.
    #[error("{device}: connecting: {source}")]
    Connect {
        device: String,
        #[source]
        source: io::Error,
    },
    /// The request could not be written to the socket.
    #[error("{device}: {op}: sending the request: {source}")]
    Send {
        device: String,
        op: String,
        #[source]
        source: io::Error,
    },
    /// No reply in time. The connection is then considered dead.
    #[error("{device}: {op}: no reply within {timeout:?}; is the device server alive?")]
    Timeout {
        device: String,
        op: String,
        timeout: Duration,
    },
    /// The server answered with an error reply.
    #[error("{device}: {op}: the server refused: {}", errno_text(*.errno))]
    Refused {
        device: String,
        op: String,
        /// The errno of the reply (0: the server gave none).
        errno: i32,
    },
    /// The reply made no sense (too short, too large, wrong type, unknown id).
    #[error("{device}: {op}: malformed reply: {what}")]
    Malformed {
        device: String,
        op: String,
        what: String,
    },
    /// The connection ended or failed while the request was in flight.
    #[error("{device}: {op}: connection lost: {reason}")]
    Disconnected {
        device: String,
        op: String,
        reason: String,
    },
    /// An earlier failure left the connection unusable; nothing was sent.
    #[error("{device}: {op}: the connection is unusable after an earlier failure: {reason}")]
    Broken {
        device: String,
        op: String,
        reason: String,
    },
    /// The caller asked for something the protocol cannot carry; nothing was sent.
    #[error("{device}: {op}: {what}")]
    Invalid {
        device: String,
        op: String,
        what: String,
    },
    /// The peer speaks another protocol version or sent unusable capabilities.
    #[error("{device}: version negotiation: {what}")]
    Version { device: String, what: String },
    /// Server side: a socket operation failed.
    #[error("{device}: {op}: {source}")]
    Io {
        device: String,
        op: String,
        #[source]
        source: io::Error,
    },
    /// Server side: the client sent a message that cannot be framed; the connection ends.
    #[error("{device}: malformed request: {what}")]
    MalformedRequest { device: String, what: String },
    /// Server side: the socket path is unusable (not a socket, or another server owns it).
    #[error("{path}: {what}")]
    SocketPath { path: PathBuf, what: String },
    /// Server side: the device model could not be built.
    #[error("building the pci-epf-test device")]
    Epf(#[from] crate::epf::EpfError),
}

fn errno_text(errno: i32) -> String {
    if errno == 0 {
        "error reply without an errno".to_string()
    } else {
        format!("{} (errno {errno})", io::Error::from_raw_os_error(errno))
    }
}

impl VfioUserError {
    /// The errno of an error reply, if this is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            VfioUserError::Refused { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    /// Whether this is a [`VfioUserError::Timeout`].
    pub fn is_timeout(&self) -> bool {
        matches!(self, VfioUserError::Timeout { .. })
    }

    /// The device-independent error the passthrough model reports, with `op` as the adapter
    /// names the operation. Timeouts stay timeouts, malformed replies become `Protocol`, and
    /// everything else is `Io` carrying the errno where there is one.
    pub fn into_backend(self, op: &str) -> VfioBackendError {
        let op = op.to_string();
        let io_err = |device: String, source: io::Error| VfioBackendError::Io {
            device,
            op: op.clone(),
            source,
        };
        match self {
            VfioUserError::Timeout {
                device, timeout, ..
            } => VfioBackendError::Timeout {
                device,
                op,
                timeout,
            },
            VfioUserError::Malformed { device, what, .. }
            | VfioUserError::MalformedRequest { device, what }
            | VfioUserError::Version { device, what } => {
                VfioBackendError::Protocol { device, op, what }
            }
            VfioUserError::Refused { device, errno, .. } => {
                let source = if errno == 0 {
                    io::Error::other("the server refused without an errno")
                } else {
                    io::Error::from_raw_os_error(errno)
                };
                io_err(device, source)
            }
            VfioUserError::Connect { device, source }
            | VfioUserError::Send { device, source, .. }
            | VfioUserError::Io { device, source, .. } => io_err(device, source),
            VfioUserError::Disconnected { device, reason, .. } => io_err(
                device,
                io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    format!("connection lost: {reason}"),
                ),
            ),
            VfioUserError::Broken { device, reason, .. } => io_err(
                device,
                io::Error::new(
                    io::ErrorKind::NotConnected,
                    format!("the connection is unusable after an earlier failure: {reason}"),
                ),
            ),
            VfioUserError::Invalid { device, what, .. } => {
                io_err(device, io::Error::new(io::ErrorKind::InvalidInput, what))
            }
            VfioUserError::SocketPath { path, what } => {
                io_err(path.display().to_string(), io::Error::other(what))
            }
            e @ VfioUserError::Epf(_) => {
                io_err("pci-epf-test".to_string(), io::Error::other(e.to_string()))
            }
        }
    }
}

impl From<VfioUserError> for VfioBackendError {
    /// Like [`VfioUserError::into_backend`] with the request name the error carries.
    fn from(e: VfioUserError) -> Self {
        let op = match &e {
            VfioUserError::Send { op, .. }
            | VfioUserError::Timeout { op, .. }
            | VfioUserError::Refused { op, .. }
            | VfioUserError::Malformed { op, .. }
            | VfioUserError::Disconnected { op, .. }
            | VfioUserError::Broken { op, .. }
            | VfioUserError::Invalid { op, .. }
            | VfioUserError::Io { op, .. } => op.clone(),
            VfioUserError::Connect { .. } => "connect".to_string(),
            VfioUserError::Version { .. } => "version negotiation".to_string(),
            _ => "vfio-user".to_string(),
        };
        e.into_backend(&op)
    }
}
