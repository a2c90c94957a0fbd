//! vmm's machine API: HTTP/1.1 on a Unix socket at Cloud Hypervisor's REST paths
//! (`/api/v1/vm.info` and the rest), so that orchestrators that drive Cloud Hypervisor can
//! drive `vmm`. This crate is the transport only: the endpoints ([`Endpoint`]), the server
//! loop with its bounds and its peer check ([`server`]), a small client ([`client`]), and
//! JSON responses ([`Response`]). What each endpoint does is the [`Handler`]'s, in `vmm`.
//!
//! No KVM, no VM: nothing here knows what a guest is.

pub mod client;
pub mod endpoint;
pub mod http;
pub mod response;
pub mod server;

pub use endpoint::{Endpoint, Method, PREFIX};
pub use response::Response;
pub use server::{BindError, Handler, Limits, Server};
