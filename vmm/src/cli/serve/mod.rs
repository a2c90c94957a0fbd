//! `vmm serve --api-socket PATH`: the machine API with no VM until vm.create. Each booted
//! VM runs in a child process (`vmm run ... --api-socket DIR/vm.sock`) because the seccomp
//! filters of a VM's threads are inherited and cannot be removed, so the threads of a
//! process whose first VM ran filtered could not build a second; a process per VM also
//! leaves "nothing left after it" to the kernel.
//!
//! Threads: the API thread (`api::Server` with [`handler::ServeHandler`], filtered with its
//! own list), the supervisor (unfiltered: it forks and execs the children, see
//! `supervisor.rs`), and this one, which waits for the API thread and then tears down.

mod handler;
mod supervisor;

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::Duration;

use pinning::ErrorClass;
use vmm_sys_util::eventfd::EventFd;

use super::{Failure, Status};
use crate::seccomp::SeccompLevel;

/// How long a VM may take to tear down once asked to stop, before it is killed.
const SHUTDOWN_WITHIN: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, clap::Args)]
pub struct ServeArgs {
    /// Where to listen: a Unix socket created owner-only (0600), removed at exit. A path
    /// that exists is refused unless it is a stale socket (nobody listening).
    #[arg(long, value_name = "PATH")]
    pub api_socket: PathBuf,
    /// System-call filters: the API thread's own list, and each VM's `vmm run --seccomp`
    /// unless its config's `vmm.seccomp` says otherwise. `on`, `log` or `off`, as
    /// `vmm run --seccomp`.
    #[arg(long, value_enum, default_value_t = SeccompLevel::On)]
    pub seccomp: SeccompLevel,
}

/// Serves until vmm.shutdown (status 0) or SIGINT/SIGTERM (128+N), then shuts the VM down.
pub fn serve(args: &ServeArgs) -> Status {
    let internal = |what: &str, e: std::io::Error| {
        Failure::new(
            format!("vmm serve: cannot {what}: {e}"),
            ErrorClass::Internal,
        )
    };
    let stop = EventFd::new(libc::EFD_CLOEXEC).map_err(|e| internal("create an eventfd", e))?;
    // From here a SIGINT/SIGTERM ends the server loop, which shuts the VM down and removes
    // the socket, instead of killing the process.
    let _signals = pinning::cancel::SignalGuard::install(Some(stop.as_raw_fd()))
        .map_err(|e| internal("install the SIGINT/SIGTERM handlers", e))?;
    let mut server = api::Server::bind(&args.api_socket, api::Limits::default())
        .map_err(|e| Failure::new(e.to_string(), ErrorClass::User))?;
    // Started from this unfiltered thread, so that it may fork and exec.
    let supervisor = supervisor::Supervisor::start(args.seccomp)
        .map_err(|e| internal("start the supervisor thread", e))?;
    let mut handler = handler::ServeHandler::new(supervisor);
    let level = args.seccomp;
    let stop_fd = stop.as_raw_fd();
    let api = std::thread::Builder::new()
        .name("vmm-api".into())
        .spawn(move || {
            let served = crate::seccomp::filter_api_thread(level)
                .map_err(Failure::from)
                .and_then(|()| {
                    server
                        .run(&mut handler, stop_fd)
                        .map_err(|e| internal("serve the API", e))
                });
            // The socket goes before the VM is torn down: nobody can ask anything more.
            drop(server);
            (handler, served)
        })
        .map_err(|e| internal("start the API thread", e))?;
    let (handler, served) = api
        .join()
        .map_err(|_| Failure::new("vmm serve: the API thread panicked", ErrorClass::Internal))?;
    handler.finish();
    served?;
    Ok(match pinning::cancel::pending_signal() {
        Some(sig) => u8::try_from(128 + sig).unwrap_or(1),
        None => 0,
    })
}
