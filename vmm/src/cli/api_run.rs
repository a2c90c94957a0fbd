//! `vmm run --api-socket PATH`: the machine API for the one VM this process runs from its
//! command line. An API thread (`vmm-api`), started before the VM is built, serves it over
//! the [`VmControl`] the builder publishes into; the process still ends when the guest does.

use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use api::{Endpoint, Handler, Limits, Response, Server};
use pinning::ErrorClass;
use serde::Serialize;
use vmm_sys_util::eventfd::EventFd;

use super::run::RunArgs;
use super::vm_config::VmConfigJson;
use super::Failure;
use crate::builder::{Outcome, VmConfig};
use crate::control::{ControlError, Finished, VmControl, VmInfo};
use crate::vstate::pause::PauseError;

/// How long `vm.shutdown` and `vmm.shutdown` wait for the VM to be torn down.
pub const SHUTDOWN_WITHIN: Duration = Duration::from_secs(30);

/// `vmm.ping`'s body, Cloud Hypervisor's VmmPingResponse.
#[derive(Serialize)]
struct Ping {
    build_version: &'static str,
    version: &'static str,
    pid: u32,
    features: [&'static str; 0],
}

/// `vmm.ping`: this build and process.
pub fn ping() -> Response {
    Response::json(
        200,
        &Ping {
            build_version: env!("CARGO_PKG_VERSION"),
            version: env!("CARGO_PKG_VERSION"),
            pid: std::process::id(),
            features: [],
        },
    )
}

/// The answer to a refused pause, resume or shutdown: 409 for the VM's state, 500 for a vCPU
/// that would not stop (ours to fix).
fn refused(e: &ControlError) -> Response {
    let status = match e {
        ControlError::Pause(PauseError::Timeout(_)) => 500,
        _ => 409,
    };
    Response::error(status, e.to_string())
}

/// The API of a VM run from the command line.
pub struct RunHandler {
    control: Arc<VmControl>,
    /// `vm.info`'s `config`: the command line as Cloud Hypervisor's VmConfig.
    config: serde_json::Value,
    memory_bytes: u64,
    done: bool,
}

impl RunHandler {
    pub fn new(control: Arc<VmControl>, args: &RunArgs, config: &VmConfig) -> Self {
        RunHandler {
            control,
            config: serde_json::to_value(VmConfigJson::from_run_args(args))
                .unwrap_or(serde_json::Value::Null),
            memory_bytes: config.layout.ram().iter().map(|r| r.size).sum(),
            done: false,
        }
    }

    /// Stops the VM and answers once it is torn down (at most [`SHUTDOWN_WITHIN`]).
    fn shut_down(&mut self, endpoint: Endpoint) -> Response {
        match self.control.stop() {
            Ok(()) => {}
            // `vmm.shutdown` of a VM that already ended: there is only the process to end.
            Err(ControlError::Ended(_)) if endpoint == Endpoint::VmmShutdown => {}
            Err(e) => return refused(&e),
        }
        if !self.control.wait_ended(SHUTDOWN_WITHIN) {
            return Response::error(
                500,
                format!("the VM did not finish stopping within {SHUTDOWN_WITHIN:?}; ask vm.info for its stage and retry"),
            );
        }
        self.done = endpoint == Endpoint::VmmShutdown;
        Response::no_content()
    }
}

impl Handler for RunHandler {
    fn handle(&mut self, endpoint: Endpoint, _body: &[u8]) -> Response {
        let answer = |r: Result<(), ControlError>| match r {
            Ok(()) => Response::no_content(),
            Err(e) => refused(&e),
        };
        match endpoint {
            Endpoint::VmmPing => ping(),
            Endpoint::VmInfo => Response::json(
                200,
                &VmInfo {
                    config: &self.config,
                    state: self.control.state(),
                    memory_actual_size: self.memory_bytes,
                    vmm: self.control.info(),
                },
            ),
            Endpoint::VmCounters => Response::json(200, &self.control.counters()),
            Endpoint::VmPause => answer(self.control.pause()),
            Endpoint::VmResume => answer(self.control.resume()),
            Endpoint::VmShutdown | Endpoint::VmmShutdown => self.shut_down(endpoint),
            Endpoint::VmCreate | Endpoint::VmBoot | Endpoint::VmDelete | Endpoint::VmReboot => {
                Response::error(
                    409,
                    format!(
                        "{}: this vmm runs the VM from its command line (`vmm run`); use `vmm serve` to create, boot, reboot and delete VMs",
                        endpoint.name()
                    ),
                )
            }
        }
    }

    fn done(&self) -> bool {
        self.done
    }
}

/// The running API thread; dropping it stops and joins the thread, and the socket file goes.
pub struct ApiThread {
    control: Arc<VmControl>,
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl ApiThread {
    /// Binds `path` (a bind error is the user's: exit status 2) and serves this run's API on
    /// a thread of its own, once that thread has its system-call filter.
    pub fn start(path: &Path, args: &RunArgs, config: &VmConfig) -> Result<ApiThread, Failure> {
        let mut server = Server::bind(path, Limits::default())
            .map_err(|e| Failure::new(e.to_string(), ErrorClass::User))?;
        let internal = |what: &str, e: std::io::Error| {
            Failure::new(
                format!("--api-socket: {what} failed: {e}"),
                ErrorClass::Internal,
            )
        };
        let stop = Arc::new(
            EventFd::new(libc::EFD_CLOEXEC).map_err(|e| internal("creating an eventfd", e))?,
        );
        let control = VmControl::new();
        let mut handler = RunHandler::new(control.clone(), args, config);
        let stop_fd = std::os::fd::AsRawFd::as_raw_fd(stop.as_ref());
        let thread_stop = stop.clone();
        let level = args.seccomp.seccomp;
        let (filtered_tx, filtered_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("vmm-api".into())
            .spawn(move || {
                // Filtered before the VM is built, so the run stage finds this thread
                // filtered and leaves it alone.
                let filtered = crate::seccomp::filter_api_thread(level).map_err(Failure::from);
                let ok = filtered.is_ok();
                let _ = filtered_tx.send(filtered);
                if ok {
                    if let Err(e) = server.run(&mut handler, stop_fd) {
                        tracing::warn!("the API socket stopped serving: {e}");
                    }
                }
                // Kept alive until the loop ends: its fd is what the loop polls.
                drop(thread_stop);
            })
            .map_err(|e| internal("starting the API thread", e))?;
        let api = ApiThread {
            control,
            stop,
            thread: Some(thread),
        };
        match filtered_rx.recv() {
            Ok(Ok(())) => Ok(api),
            Ok(Err(failure)) => Err(failure),
            Err(_) => Err(Failure::new(
                "--api-socket: the API thread ended before serving",
                ErrorClass::Internal,
            )),
        }
    }

    /// What the builder publishes into.
    pub fn control(&self) -> &Arc<VmControl> {
        &self.control
    }

    /// The run ended with `outcome` (the VM is torn down): Shutdown, with its report.
    pub fn finished(&self, outcome: &Outcome, exit_status: u8, error: Option<String>) {
        self.control.finish(Finished {
            exit_status: i32::from(exit_status),
            outcome: Some(outcome.exit.to_string()),
            error,
            report: serde_json::to_value(&outcome.report).ok(),
        });
    }

    /// The VM could not be built or run: Shutdown, with why.
    pub fn failed(&self, failure: &Failure) {
        self.control.finish(Finished {
            exit_status: i32::from(failure.exit_status()),
            error: Some(failure.to_string()),
            ..Finished::default()
        });
    }
}

impl Drop for ApiThread {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handler() -> RunHandler {
        RunHandler {
            control: VmControl::new(),
            config: serde_json::Value::Null,
            memory_bytes: 256 << 20,
            done: false,
        }
    }

    fn body(r: &Response) -> serde_json::Value {
        serde_json::from_slice(r.body.as_deref().unwrap_or(b"null")).unwrap()
    }

    #[test]
    fn what_only_vmm_serve_does_is_refused_naming_it() {
        let mut h = handler();
        for e in [
            Endpoint::VmCreate,
            Endpoint::VmBoot,
            Endpoint::VmDelete,
            Endpoint::VmReboot,
        ] {
            let r = h.handle(e, b"");
            assert_eq!(r.status, 409, "{e:?}");
            let msg = body(&r)["error"].as_str().unwrap().to_string();
            assert!(
                msg.starts_with(e.name()) && msg.contains("vmm serve"),
                "{msg}"
            );
        }
        assert!(!h.done());
    }

    #[test]
    fn info_ping_and_state_errors_while_the_vm_is_built() {
        let mut h = handler();
        h.control.set_phase("pin");
        let info = body(&h.handle(Endpoint::VmInfo, b""));
        assert_eq!(info["state"], "Running");
        assert_eq!(info["vmm"]["phase"], "pin");
        assert_eq!(info["memory_actual_size"], 256 << 20);
        let ping = body(&h.handle(Endpoint::VmmPing, b""));
        assert_eq!(ping["pid"], std::process::id());
        assert_eq!(ping["version"], env!("CARGO_PKG_VERSION"));
        let r = h.handle(Endpoint::VmPause, b"");
        assert_eq!(r.status, 409);
        assert!(body(&r)["error"].as_str().unwrap().contains("stage pin"));
        assert_eq!(h.handle(Endpoint::VmResume, b"").status, 409);
    }

    #[test]
    fn vmm_shutdown_of_an_ended_vm_ends_the_api_and_vm_shutdown_is_refused() {
        let mut h = handler();
        h.control.finish(Finished::default());
        assert_eq!(h.handle(Endpoint::VmShutdown, b"").status, 409);
        assert!(!h.done());
        assert_eq!(h.handle(Endpoint::VmmShutdown, b"").status, 204);
        assert!(h.done());
        let info = body(&h.handle(Endpoint::VmInfo, b""));
        assert_eq!(info["state"], "Shutdown");
        assert_eq!(info["vmm"]["exit_status"], 0);
    }
}
