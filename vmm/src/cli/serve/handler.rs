//! serve's API handler: the one VM's state (none, Created, booted, Shutdown), what each
//! endpoint does in each, and the forwarding of the booted VM's requests to its process.

use std::path::PathBuf;
use std::time::Duration;

use api::client::{Client, Reply};
use api::{Endpoint, Handler, Response};

use super::supervisor::{Booted, Exited, Supervisor, GONE};
use crate::cli::api_run;
use crate::cli::run::{RunArgs, DEFAULT_MEMORY};
use crate::cli::vm_config::{self, VmConfigJson};
use crate::control::{Finished, VmInfo, VmState, VmmInfo};

/// How long a forwarded vm.shutdown may take: it answers once the VM is torn down, which the
/// child bounds at [`api_run::SHUTDOWN_WITHIN`]; a little more for the answer.
const SHUTDOWN_FORWARD_WITHIN: Duration =
    Duration::from_secs(api_run::SHUTDOWN_WITHIN.as_secs() + 5);
/// How long any other forwarded request may take (the VM's API thread answers at once; pause
/// waits for the vCPUs, bounded at 5 s by the child): the API thread is blocked meanwhile.
const FORWARD_WITHIN: Duration = Duration::from_secs(8);

/// How long a VM's process that stopped answering is watched for its exit: 20 x 100 ms.
const EXIT_CHECKS: u32 = 20;
const EXIT_CHECK_EVERY: Duration = Duration::from_millis(100);

struct Vm {
    /// As the client sent it: what boots (the VM's `--seccomp` is serve's unless it says).
    config: VmConfigJson,
    /// As vm.info shows it: vmm's defaults filled in.
    shown: VmConfigJson,
    /// Guest RAM in bytes, as `vmm run` will lay it out.
    memory: u64,
    state: State,
}

enum State {
    Created,
    /// A child process runs the VM; `paused` after its vm.pause answered 204, until its
    /// vm.resume did.
    Booted {
        socket: PathBuf,
        client: Option<Client>,
        paused: bool,
    },
    Shutdown(Exited),
}

impl State {
    fn vm_state(&self) -> VmState {
        match self {
            State::Created => VmState::Created,
            State::Booted { paused: false, .. } => VmState::Running,
            State::Booted { paused: true, .. } => VmState::Paused,
            State::Shutdown(_) => VmState::Shutdown,
        }
    }

    fn name(&self) -> &'static str {
        self.vm_state().name()
    }
}

/// What `vmm serve` answers.
pub struct ServeHandler {
    supervisor: Supervisor,
    vm: Option<Vm>,
    done: bool,
}

impl ServeHandler {
    pub fn new(supervisor: Supervisor) -> Self {
        ServeHandler {
            supervisor,
            vm: None,
            done: false,
        }
    }

    /// At serve's exit: the VM shut down and freed, the supervisor ended.
    pub fn finish(mut self) {
        self.delete_vm();
    }

    /// The VM shut down if it runs, its private folder removed, and forgotten.
    fn delete_vm(&mut self) {
        self.shutdown_vm();
        self.supervisor.free();
        self.vm = None;
    }

    fn create(&mut self, body: &[u8]) -> Response {
        if let Some(vm) = &self.vm {
            return Response::error(409, format!("vm.create: a VM already exists (state {}); delete it first with PUT /api/v1/vm.delete", vm.state.name()));
        }
        let config = match vm_config::parse(body) {
            Ok(c) => c,
            Err(e) => return Response::error(400, format!("vm.create: {e}")),
        };
        let args = match self.supervisor.check(&config) {
            Ok(a) => a,
            // The supervisor is gone (it panicked): ours, not the input's.
            Err(e) if e == GONE => return Response::error(500, format!("vm.create: {e}")),
            Err(e) => return Response::error(400, format!("vm.create: {e}")),
        };
        self.vm = Some(Vm {
            memory: memory_bytes(&args),
            shown: VmConfigJson::from_run_args(&args),
            config,
            state: State::Created,
        });
        Response::no_content()
    }

    /// Shuts the booted VM down: vm.shutdown to its process, then its exit, bounded.
    fn shutdown_vm(&mut self) {
        let Some(vm) = &mut self.vm else { return };
        let State::Booted { socket, client, .. } = &mut vm.state else {
            return;
        };
        // Only a 204 means the VM is on its way down; anything else gets SIGTERM at once.
        let asked = forward(socket, client, Endpoint::VmShutdown, &[])
            .is_some_and(|reply| reply.status == 204);
        // A process that did not take the request gets SIGTERM, which it also obeys.
        let exited = self.supervisor.stop(!asked, api_run::SHUTDOWN_WITHIN);
        vm.state = State::Shutdown(exited.unwrap_or_else(gone));
    }

    fn boot(&mut self) -> Response {
        let Some(vm) = &mut self.vm else {
            return no_vm(Endpoint::VmBoot);
        };
        match self.supervisor.boot(vm.config.to_run_args()) {
            Ok(Booted::Running(socket)) => {
                let client = Client::connect(&socket, FORWARD_WITHIN).ok();
                vm.state = State::Booted {
                    socket,
                    client,
                    paused: false,
                };
                Response::no_content()
            }
            // Its start failed: the error is vm.info's, as for a VM that failed later.
            Ok(Booted::Exited(e)) => {
                vm.state = State::Shutdown(e);
                Response::no_content()
            }
            Err(e) => Response::error(500, format!("vm.boot: {e}")),
        }
    }

    /// The state the VM's process is in, its exit taken into account.
    fn refresh(&mut self) {
        if let Some(vm) = &mut self.vm {
            if matches!(vm.state, State::Booted { .. }) {
                if let Some(e) = self.supervisor.poll() {
                    vm.state = State::Shutdown(e);
                }
            }
        }
    }

    /// `endpoint` for the booted VM, answered by its process.
    fn forwarded(&mut self, endpoint: Endpoint, body: &[u8]) -> Response {
        let Some(Vm {
            state:
                State::Booted {
                    socket,
                    client,
                    paused,
                },
            shown,
            ..
        }) = &mut self.vm
        else {
            unreachable!("only called when booted")
        };
        let Some(reply) = forward(socket, client, endpoint, body) else {
            // Most likely it is exiting: give it a moment, then answer as for a VM shut down.
            // One that still runs is left alone (vm.shutdown or vm.delete end it).
            for _ in 0..EXIT_CHECKS {
                if let Some(e) = self.supervisor.poll() {
                    if let Some(vm) = &mut self.vm {
                        vm.state = State::Shutdown(e);
                    }
                    return self.handle_vm(endpoint, body);
                }
                std::thread::sleep(EXIT_CHECK_EVERY);
            }
            return Response::error(500, format!("{}: the VM's process does not answer on {}; shut it down with PUT /api/v1/vm.shutdown", endpoint.name(), socket.display()));
        };
        let mut response = Response {
            status: reply.status,
            body: (!reply.body.is_empty()).then_some(reply.body),
        };
        match (endpoint, reply.status) {
            (Endpoint::VmInfo, 200) => response = with_config(response, shown),
            (Endpoint::VmPause, 204) => *paused = true,
            (Endpoint::VmResume, 204) => *paused = false,
            _ => {}
        }
        response
    }

    /// Every endpoint that needs a VM.
    fn handle_vm(&mut self, endpoint: Endpoint, body: &[u8]) -> Response {
        self.refresh();
        let Some(vm) = &self.vm else {
            return no_vm(endpoint);
        };
        let booted = matches!(vm.state, State::Booted { .. });
        match endpoint {
            // As Cloud Hypervisor: a VM shut down boots again from its config.
            Endpoint::VmBoot if !booted => self.boot(),
            Endpoint::VmInfo if !booted => own_info(vm),
            Endpoint::VmInfo | Endpoint::VmCounters | Endpoint::VmPause | Endpoint::VmResume
                if booted =>
            {
                self.forwarded(endpoint, body)
            }
            Endpoint::VmShutdown if booted => {
                self.shutdown_vm();
                Response::no_content()
            }
            // The supervisor frees the old child's folder as it boots the new one.
            Endpoint::VmReboot if booted => {
                self.shutdown_vm();
                if let Some(vm) = &mut self.vm {
                    vm.state = State::Created;
                }
                self.boot()
            }
            Endpoint::VmDelete => {
                self.delete_vm();
                Response::no_content()
            }
            _ => wrong_state(endpoint, &vm.state),
        }
    }
}

impl Handler for ServeHandler {
    fn handle(&mut self, endpoint: Endpoint, body: &[u8]) -> Response {
        // A body where none belongs is the transport's to refuse.
        match endpoint {
            Endpoint::VmmPing => api_run::ping(),
            Endpoint::VmmShutdown => {
                self.delete_vm();
                self.done = true;
                Response::no_content()
            }
            Endpoint::VmCreate => self.create(body),
            _ => self.handle_vm(endpoint, body),
        }
    }

    fn done(&self) -> bool {
        self.done
    }
}

/// Sends one request to the VM's process (connecting first if there is no connection). Not
/// sent again after a failure: the process may have acted on it (a second vm.pause would
/// answer 409); the client itself resends only what the process cannot have seen.
fn forward(
    socket: &std::path::Path,
    client: &mut Option<Client>,
    endpoint: Endpoint,
    body: &[u8],
) -> Option<Reply> {
    let body = endpoint.takes_body().then_some(body);
    let within = match endpoint {
        Endpoint::VmShutdown => SHUTDOWN_FORWARD_WITHIN,
        _ => FORWARD_WITHIN,
    };
    if client.is_none() {
        *client = Client::connect(socket, within).ok();
    }
    let c = client.as_mut()?;
    c.set_timeout(within);
    let reply = c.request(endpoint.method(), &endpoint.path(), body);
    if reply.is_err() {
        *client = None;
    }
    reply.ok()
}

fn gone() -> Exited {
    Exited {
        status: 1,
        error: Some(GONE.into()),
        report: None,
    }
}

fn no_vm(endpoint: Endpoint) -> Response {
    Response::error(
        404,
        format!(
            "{}: there is no VM; create one first with PUT /api/v1/vm.create",
            endpoint.name()
        ),
    )
}

fn wrong_state(endpoint: Endpoint, state: &State) -> Response {
    let fix = match state {
        State::Created => "boot it first with PUT /api/v1/vm.boot",
        State::Shutdown(_) => "boot it again with PUT /api/v1/vm.boot",
        State::Booted { .. } => "restart it with PUT /api/v1/vm.reboot, or shut it down first",
    };
    Response::error(
        409,
        format!("{}: the VM is {}; {fix}", endpoint.name(), state.name()),
    )
}

/// Guest RAM as `vmm run` lays it out: --memory, else the zones' sum, else the default.
fn memory_bytes(args: &RunArgs) -> u64 {
    let zones: u64 = args.memory_zones.iter().map(|z| z.size).sum();
    args.memory
        .unwrap_or(if zones > 0 { zones } else { DEFAULT_MEMORY })
}

/// vm.info in the states serve answers itself.
fn own_info(vm: &Vm) -> Response {
    let vmm = match &vm.state {
        State::Shutdown(e) => Finished {
            exit_status: e.status,
            outcome: e
                .report
                .as_ref()
                .and_then(|r| r["outcome"].as_str())
                .map(str::to_owned),
            error: e.error.clone(),
            report: e.report.clone(),
        }
        .into(),
        _ => VmmInfo::default(),
    };
    Response::json(
        200,
        &VmInfo {
            config: &vm.shown,
            state: vm.state.vm_state(),
            memory_actual_size: vm.memory,
            vmm,
        },
    )
}

/// The child's vm.info with serve's own config in it (the one the client sent, normalised).
fn with_config(response: Response, config: &VmConfigJson) -> Response {
    let parsed = response
        .body
        .as_deref()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok());
    match (parsed, serde_json::to_value(config)) {
        (Some(serde_json::Value::Object(mut info)), Ok(config)) => {
            info.insert("config".into(), config);
            Response::json(200, &info)
        }
        _ => response,
    }
}
