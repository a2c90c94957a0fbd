//! The `vmm` command line: its parser, and one function per command that runs it and says
//! how it ended, as a status or as a [`Failure`] that `main` turns into the exit status.

pub mod api_common;
pub mod api_run;
pub mod forward;
pub mod run;
pub mod serve;
pub mod vm_config;

use std::fmt;
use std::time::Instant;

use clap::{Parser, Subcommand};
use pinning::{Classify, ErrorClass};

use crate::builder;
use crate::run::VmExit;
use run::RunArgs;

/// A command that did not finish: the line to print and who must act on it.
#[derive(Debug)]
pub struct Failure {
    message: String,
    class: ErrorClass,
}

impl Failure {
    /// A failure that prints `message` and exits as `class` says.
    pub fn new(message: impl Into<String>, class: ErrorClass) -> Self {
        Failure {
            message: message.into(),
            class,
        }
    }

    /// The exit status this failure calls for.
    pub fn exit_status(&self) -> u8 {
        self.class.exit_status()
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl<E: std::error::Error + Classify> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure {
            message: e.to_string(),
            class: e.class(),
        }
    }
}

/// What a command that ran to its end returns: the exit status it calls for.
pub type Status = Result<u8, Failure>;

/// Logs to stderr at `default_level`, or as `RUST_LOG` says; for `vmm` and `vmm-bench` alike.
pub fn init_logging(default_level: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// The exit status of `program` (`vmm`, `vmm-bench`), decided here alone: the command's own
/// when it ran to its end, else its failure's class, after the failure's line on stderr.
pub fn exit_code(program: &str, status: Status) -> std::process::ExitCode {
    match status {
        Ok(status) => std::process::ExitCode::from(status),
        Err(failure) => {
            eprintln!("{program}: {failure}");
            std::process::ExitCode::from(failure.exit_status())
        }
    }
}

#[derive(Parser)]
#[command(
    name = "vmm",
    version,
    about = "A minimal KVM virtual machine monitor with parallel, limit-aware guest RAM pinning",
    long_about = "A minimal KVM virtual machine monitor. Before the guest runs, all of its RAM can be \
faulted in, locked and DMA-mapped for passthrough devices by a parallel pinning engine that respects \
CPU affinity, cgroup CPU quotas, RLIMIT_MEMLOCK and memory cgroup limits.\n\n\
Logs go to stderr; set RUST_LOG (for example RUST_LOG=debug or RUST_LOG=pinning=debug) to see more."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Boot a guest: by default the built-in probe guest with the pci-epf-test device over vfio-user.
    #[command(long_about = "Boot a guest on KVM.\n\n\
With no --kernel, boots the built-in probe guest, which checks its boot parameters, memory map, \
CPU count, PCI bus and RAM and exits with status 0 when all is well. Unless told otherwise it gets \
the built-in pci-epf-test device: `vmm device epf` started as a child and attached over vfio-user, \
with all guest RAM DMA-mapped for it before the guest runs; the guest has the device DMA into every \
GiB of its RAM and waits for its MSI-X interrupts. Guest serial output goes to stdout (stdin goes \
to the guest); a start-up timeline goes to stderr at exit (--quiet turns it off) and as JSON to \
--report PATH. The exit status is the guest's own (debug-exit port 0xf4), 0 for a reset or \
power-off, 124 after --timeout, 130/143 after SIGINT/SIGTERM, 2 for bad input or a device that \
cannot be set up before the guest runs, 1 if a device fails while it runs.\n\n\
Examples:\n  vmm run\n  vmm run --memory 6G --cpus 2 --report boot.json\n  \
vmm run --user-device none --pin populate --memory 4G\n  \
vmm run --cpus 2 --memory-zone id=a,size=1G --memory-zone id=b,size=1G,host_numa_node=0 \
--numa guest_numa_id=0,cpus=[0],memory_zones=[a],distances=[1@20] \
--numa guest_numa_id=1,cpus=[1],memory_zones=[b],distances=[0@20]\n  \
vmm run --device /sys/bus/pci/devices/0000:01:00.0 --iommu iommufd\n  \
vmm run --kernel vmlinuz --initrd initramfs.cpio --cmdline \"console=ttyS0\" --timeout 240")]
    Run(Box<RunArgs>),
    /// Measure how fast guest RAM is prepared (populated or locked) for each thread count:
    /// runs `vmm-bench pin-bench` (see `vmm pin-bench --help`).
    #[command(disable_help_flag = true)]
    PinBench(forward::Forwarded),
    /// Benchmarks that boot guests: `vmm bench startup` (start-up time, vmm and QEMU) runs
    /// `vmm-bench startup` (see `vmm bench startup --help`).
    #[command(disable_help_flag = true)]
    Bench(forward::Forwarded),
    /// Serve the machine API (Cloud Hypervisor's REST paths) on a Unix socket: no VM until
    /// vm.create, one VM at a time, each booted in its own `vmm run` process.
    #[command(
        long_about = "Serve the machine API: HTTP/1.1 on a Unix socket at Cloud Hypervisor's \
paths (/api/v1/vm.create and the rest, see docs/api.md), so that a program can drive vmm.\n\n\
Lifecycle: there is no VM until PUT vm.create (a Cloud Hypervisor VmConfig; what vmm run would \
refuse is refused with 400). PUT vm.boot starts the VM in a child process, `vmm run` with the \
config's options, and answers once that process's own API answers (state Running; vm.info's \
vmm.phase and vmm.progress show the start-up, pinning included). vm.info, vm.counters, vm.pause, \
vm.resume and vm.shutdown go to that process. When the guest exits (or after vm.shutdown) the VM \
is Shutdown: vm.info has the exit status and the run report; vm.boot boots it again, vm.reboot \
shuts a running VM down and boots a fresh one (its RAM is pinned again), vm.delete frees it and \
vm.create may follow. PUT vmm.shutdown, SIGINT or SIGTERM shut the VM down, remove the socket \
and end serve (status 0 after vmm.shutdown, 128+N after signal N). A child never outlives serve: \
it gets SIGTERM when serve dies.\n\n\
Example:\n  vmm serve --api-socket /run/user/1000/vmm.sock &\n  \
curl --unix-socket /run/user/1000/vmm.sock -X PUT http://localhost/api/v1/vm.create \\\n    \
-d '{\"cpus\":{\"boot_vcpus\":1},\"memory\":{\"size\":268435456}}'\n  \
curl --unix-socket /run/user/1000/vmm.sock -X PUT http://localhost/api/v1/vm.boot"
    )]
    Serve(serve::ServeArgs),
    /// Serve a device model over vfio-user, for `vmm run --user-device SOCKET`.
    #[command(subcommand)]
    Device(DeviceCommand),
}

#[derive(Subcommand)]
pub enum DeviceCommand {
    /// A model of Linux's pci-epf-test endpoint (TI 104c:b500): READ/WRITE/COPY commands DMA
    /// through the regions the VMM maps, CRC32 checksums, MSI/MSI-X/INTx.
    #[command(
        long_about = "Serve a model of Linux's pci-epf-test endpoint function over \
vfio-user on a Unix socket, to one client, until it disconnects or SIGTERM/SIGINT. Every DMA goes \
through the regions the client mapped with DMA_MAP, so an unmapped address fails the command. \
`vmm run --user-device epf` starts this itself, on a socketpair (`--socket-fd`); run it by \
hand to attach it with `vmm run --user-device PATH`.\n\nExample: vmm device epf --socket /tmp/epf.sock"
    )]
    Epf {
        /// Where to listen (created; removed at exit).
        #[arg(
            long,
            required_unless_present = "socket_fd",
            conflicts_with = "socket_fd"
        )]
        socket: Option<std::path::PathBuf>,
        /// Instead of listening, serve the one client already connected on this inherited
        /// descriptor (a Unix stream socket, e.g. one end of a socketpair); no file is created,
        /// and the client closing its end ends the server.
        #[arg(long, value_name = "FD", value_parser = clap::value_parser!(i32).range(0..))]
        socket_fd: Option<i32>,
        /// The server's system-call filter, installed once it listens: `on` (a forbidden
        /// call ends it with status 1 and one line naming the call), `log` (the kernel logs
        /// it) or `off`. `vmm run` passes its own --seccomp.
        #[arg(long, value_enum, default_value_t = crate::seccomp::SeccompLevel::On)]
        seccomp: crate::seccomp::SeccompLevel,
    },
}

/// `vmm run`: builds and runs the VM, prints the timeline, writes the report; with
/// `--api-socket`, serves the machine API for it meanwhile.
pub fn run(args: &RunArgs, start: Instant) -> Status {
    let config = run::config(args)?;
    let api = match &args.api_socket {
        Some(path) => Some(api_run::ApiThread::start(path, args, &config)?),
        None => None,
    };
    let ran = builder::run(&config, start, api.as_ref().map(|a| a.control()));
    let status = report(args, ran);
    if let Some(api) = &api {
        match &status {
            Ok((outcome, Ok(s))) => api.finished(outcome, *s, None),
            Ok((outcome, Err(f))) => api.finished(outcome, f.exit_status(), Some(f.to_string())),
            Err(f) => api.failed(f),
        }
    }
    status.and_then(|(_, s)| s)
}

/// Says how the run went (the timeline, the report file, why the guest stopped) and the exit
/// status it calls for: the outcome and its status, or why there is no outcome.
fn report(
    args: &RunArgs,
    ran: Result<builder::Outcome, builder::StartError>,
) -> Result<(builder::Outcome, Status), Failure> {
    let outcome = ran?;
    if !args.quiet {
        eprint!("{}", outcome.report.summary());
    }
    if let Some(path) = &args.report {
        let json = serde_json::to_string_pretty(&outcome.report).map_err(|e| Failure {
            message: format!("cannot serialise the report: {e}"),
            class: ErrorClass::Internal,
        })?;
        std::fs::write(path, json + "\n").map_err(|e| Failure {
            message: format!(
                "cannot write the report to {}: {e}; give --report a writable path",
                path.display()
            ),
            class: ErrorClass::Internal,
        })?;
    }
    if let VmExit::Fault(f) = &outcome.exit {
        eprintln!("vmm: guest failed: {f}");
    }
    if let Some(what) = &outcome.device_failure {
        eprintln!("vmm: guest stopped: passthrough device failed: {what}");
    }
    let status = match &outcome.left_behind {
        Some(left) => Err(Failure::new(left.to_string(), left.class())),
        None => Ok(outcome.exit_status()),
    };
    Ok((outcome, status))
}

/// `vmm device epf`: serves until the client disconnects or a signal.
pub fn device(cmd: &DeviceCommand) -> Status {
    let DeviceCommand::Epf {
        socket,
        socket_fd,
        seccomp,
    } = cmd;
    crate::seccomp::prepare_epf_server(*seccomp)?;
    let served = match (socket, socket_fd) {
        (_, Some(fd)) => devices::vfio_user::run_epf_server_on_fd(*fd),
        (Some(path), None) => devices::vfio_user::run_epf_server(path),
        (None, None) => unreachable!("clap requires --socket or --socket-fd"),
    };
    served.map_err(|e| Failure {
        message: format!("device epf: {e}"),
        class: e.class(),
    })?;
    Ok(0)
}
