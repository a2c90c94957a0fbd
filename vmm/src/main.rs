//! The `vmm` command line. Library code returns typed errors; this file turns them into one
//! clear line on stderr and an exit status: 2 for bad input or a limit the user must raise,
//! 1 for a failure, 128+N for a signal.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pinning::cancel::CancelReason;
use pinning::{CancelToken, SignalGuard};
use tracing_subscriber::EnvFilter;
use vmm::launch::{self, RunArgs};
use vmm::pin_bench::{self, PinBenchArgs, PinBenchError};

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
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
vmm run --device /sys/bus/pci/devices/0000:01:00.0 --iommu iommufd\n  \
vmm run --kernel vmlinuz --initrd initramfs.cpio --cmdline \"console=ttyS0\" --timeout 240")]
    Run(Box<RunArgs>),
    /// Measure how fast guest RAM is prepared (populated or locked) for each thread count.
    #[command(
        long_about = "Measure how fast guest RAM is prepared for each thread count.\n\n\
Each run maps fresh memory, prepares it with the chosen backend, undoes it and unmaps it. Thread \
counts are interleaved run by run and a warm-up round is discarded. `auto` uses as many threads as \
CPU affinity, online CPUs and the cgroup CPU quota (v1 and v2, ancestors included) allow; the \
`decided_by` column names the limit that decided. memset over resident memory is measured too, \
as the bandwidth ceiling.\n\nExample: vmm pin-bench --memory 4G --pin populate --threads 1,2,auto --runs 3"
    )]
    PinBench(PinBenchArgs),
    /// Benchmarks that boot guests: `vmm bench startup` (start-up time, vmm and QEMU).
    Bench(vmm::bench::BenchArgs),
    /// Serve a device model over vfio-user, for `vmm run --user-device SOCKET`.
    #[command(subcommand)]
    Device(DeviceCommand),
}

#[derive(Subcommand)]
enum DeviceCommand {
    /// A model of Linux's pci-epf-test endpoint (TI 104c:b500): READ/WRITE/COPY commands DMA
    /// through the regions the VMM maps, CRC32 checksums, MSI/MSI-X/INTx.
    #[command(
        long_about = "Serve a model of Linux's pci-epf-test endpoint function over \
vfio-user on a Unix socket, to one client, until it disconnects or SIGTERM/SIGINT. Every DMA goes \
through the regions the client mapped with DMA_MAP, so an unmapped address fails the command. \
`vmm run --user-device epf` starts this itself; run it by hand to attach it with \
`vmm run --user-device PATH`.\n\nExample: vmm device epf --socket /tmp/epf.sock"
    )]
    Epf {
        /// Where to listen (created; removed at exit).
        #[arg(long)]
        socket: std::path::PathBuf,
    },
}

fn device(cmd: &DeviceCommand) -> ExitCode {
    let DeviceCommand::Epf { socket } = cmd;
    match devices::vfio_user::run_epf_server(socket) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmm device epf: {e}");
            ExitCode::from(2)
        }
    }
}

fn pin_bench(args: &PinBenchArgs) -> ExitCode {
    let result = (|| -> anyhow::Result<()> {
        let _signals = SignalGuard::install(None)?;
        let report = pin_bench::run(args, &CancelToken::with_signals())?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print!("{}", pin_bench::table(&report));
        }
        Ok(())
    })();
    let Err(e) = result else {
        return ExitCode::SUCCESS;
    };
    let bench_error = e.downcast_ref::<PinBenchError>();
    let signalled = match bench_error {
        Some(PinBenchError::Pin(p)) => matches!(p.cancel_reason(), Some(CancelReason::Signal(_))),
        _ => false,
    };
    if signalled {
        // Say what was undone and prove it: the locked memory is back to what it was.
        let locked = pinning::procfs::ProcStatus::read(std::path::Path::new("/"))
            .map(|s| s.locked / 1024)
            .unwrap_or(0);
        eprintln!("vmm: {e}; VmLck now {locked} kB");
    } else {
        eprintln!("vmm: {e:#}");
    }
    ExitCode::from(bench_error.map_or(1, PinBenchError::exit_status))
}

fn run(args: &RunArgs, start: std::time::Instant) -> ExitCode {
    match launch::launch(args, start) {
        Ok(outcome) => {
            if !args.quiet {
                eprint!("{}", outcome.report.summary());
            }
            if let Some(path) = &args.report {
                let json =
                    serde_json::to_string_pretty(&outcome.report).expect("report serialises");
                if let Err(e) = std::fs::write(path, json + "\n") {
                    eprintln!("vmm: cannot write the report to {}: {e}", path.display());
                    return ExitCode::from(1);
                }
            }
            if let vmm::run::VmExit::Fault(f) = &outcome.exit {
                eprintln!("vmm: guest failed: {f}");
            }
            if let Some(what) = &outcome.device_failure {
                eprintln!("vmm: guest stopped: passthrough device failed: {what}");
            }
            ExitCode::from(outcome.exit_status())
        }
        Err(e) => {
            eprintln!("vmm: {e}");
            ExitCode::from(e.exit_status())
        }
    }
}

fn main() -> ExitCode {
    // Timeline zero: as close to process start as main gets.
    let start = std::time::Instant::now();
    let cli = Cli::parse();
    // A device server says where it listens (info); everything else is quiet by default.
    let default_level = match cli.command {
        Command::Device(_) => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::PinBench(args) => pin_bench(&args),
        Command::Bench(args) => vmm::bench::command(&args),
        Command::Run(args) => run(&args, start),
        Command::Device(cmd) => device(&cmd),
    }
}
