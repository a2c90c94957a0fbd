//! The server: one thread, a poll loop over the listening socket and a bounded set of
//! connections. SKELETON: the signatures are the contract; helper A fills them in.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{Endpoint, Response};

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

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("placeholder")]
    Placeholder,
}

/// A listening API socket; the socket file is removed when it drops.
pub struct Server {
    _listener: UnixListener,
    _path: PathBuf,
    _limits: Limits,
}

impl Server {
    /// Creates the socket at `path`, owner-only (0600).
    pub fn bind(_path: &Path, _limits: Limits) -> Result<Server, BindError> {
        unimplemented!("helper A")
    }

    /// Serves until the handler is done or `stop` becomes readable (an eventfd or pipe fd).
    pub fn run(
        &mut self,
        _handler: &mut dyn Handler,
        _stop: std::os::fd::RawFd,
    ) -> std::io::Result<()> {
        unimplemented!("helper A")
    }
}
