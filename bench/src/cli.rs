//! The `vmm-bench` command line: its parser, and one function per command that runs it and
//! says how it ended, as a status or as a [`Failure`] that `main` turns into the exit status.
//! `vmm pin-bench ARGS` and `vmm bench startup ARGS` run `vmm-bench pin-bench ARGS` and
//! `vmm-bench startup ARGS`.

use clap::{Parser, Subcommand};
use pinning::{CancelToken, Classify, ErrorClass, SignalGuard};
use vmm::cli::{Failure, Status};

use crate::api_latency::{self, ApiLatencyArgs};
use crate::pin::{self, PinBenchArgs};
use crate::startup::{self, table, StartupArgs};

#[derive(Parser)]
#[command(
    name = "vmm-bench",
    version,
    about = "Benchmarks of the vmm VMM: guest RAM preparation thread by thread, and start-up time with QEMU side by side",
    long_about = "Benchmarks of the vmm VMM: how fast guest RAM is prepared thread count by thread \
count (pin-bench), and how long the probe guest takes to start, vmm and QEMU side by side (startup). \
`vmm pin-bench` and `vmm bench startup` run this binary, which is built and installed beside \
`vmm`.\n\nLogs go to stderr; set RUST_LOG (for example RUST_LOG=debug) to see more."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Measure how fast guest RAM is prepared (populated or locked) for each thread count.
    #[command(
        long_about = "Measure how fast guest RAM is prepared for each thread count.\n\n\
Each run maps fresh memory, prepares it with the chosen backend, undoes it and unmaps it. Thread \
counts are interleaved run by run and a warm-up round is discarded. `auto` uses as many threads as \
CPU affinity, online CPUs and the cgroup CPU quota (v1 and v2, ancestors included) allow; the \
`decided_by` column names the limit that decided. memset over resident memory is measured too, \
as the bandwidth ceiling.\n\n\
Example: vmm-bench pin-bench --memory 4G --pin populate --threads 1,2,auto --runs 3 \
(or vmm pin-bench ..., which runs this)"
    )]
    PinBench(PinBenchArgs),
    /// Boot the probe guest for every memory x backing x pin-threads combination, N times
    /// each, interleaved, and report every phase; QEMU side by side when it is found.
    #[command(long_about = "Measure start-up time end to end.\n\n\
For every combination of --memory, --backing and --pin-threads, boots the probe guest --runs times \
as a child `vmm run --report` (after --warmup discarded rounds; runs interleaved round-robin, the \
order reversed every other round), and \
records every phase of its timeline, its time to the guest's ready mark, and its wall time from \
spawn, and its teardown (the report's exit phase). memfd and memfd-thp RAM (memfd-thp in the default list only where \
shmem_enabled allows it) is booted with the pci-epf-test device over vfio-user when `vmm run` has \
--user-device; anon and thp RAM with --pin populate. QEMU (qemu-system-x86_64 on PATH, or --qemu) \
boots the same ELF with the same RAM as a preallocated memfd, with 1 and with vmm's `auto` thread \
count as prealloc threads; with two sizes or more, the slope in ms per GiB between the smallest \
and largest size compares what vmm and QEMU add per GiB of RAM, apart from QEMU's firmware.\n\n\
The `vmm` binary booted is the one beside this executable, or --vmm.\n\nWrites a table to stdout \
and startup.json, startup.svg and every run's report under --out.\n\n\
Example: vmm-bench startup --memory 1G,4G --backing anon --pin-threads 1,2,auto --runs 3 \
(or vmm bench startup ..., which runs this)")]
    Startup(StartupArgs),
    /// Time the machine API of `vmm serve`: p50/p99 of vmm.ping and vm.info, idle and while a
    /// VM pins its RAM.
    #[command(long_about = "Time the machine API as an orchestrator sees it.\n\n\
Starts `vmm serve` (the `vmm` beside this executable, or --vmm) on a socket in a temporary \
directory and sends vmm.ping and vm.info alternately on one persistent connection, timing each \
from the first byte sent to the last byte read: --requests of each with a VM created but not \
booted (idle: vmm serve answers itself), then with a VM of --busy-memory booted, counting only \
answers given while its RAM is being pinned (vm.info is then forwarded to the VM's own process). \
Prints p50, p99 and max per endpoint and condition.\n\n\
Example: vmm-bench api-latency --requests 2000 --busy-memory 8G")]
    ApiLatency(ApiLatencyArgs),
}

fn signal_guard() -> Result<SignalGuard, Failure> {
    SignalGuard::install(None).map_err(|e| {
        Failure::new(
            format!("installing the SIGINT/SIGTERM handlers failed: {e}"),
            ErrorClass::Internal,
        )
    })
}

/// `vmm-bench pin-bench`: prints a table or JSON. Stopped by a signal, it says what was undone
/// and proves it: for a backend that locks, the error gives VmLck measured right after the
/// undo, while the memory was still mapped (so only the undo can have brought it down).
pub fn pin_bench(args: &PinBenchArgs) -> Status {
    let _signals = signal_guard()?;
    let report = pin::run(args, &CancelToken::with_signals())?;
    print_report(args.json, &report, pin::table)?;
    Ok(0)
}

/// Prints `report` as JSON when `json`, else as `table` lays it out.
fn print_report<T: serde::Serialize + ?Sized>(
    json: bool,
    report: &T,
    table: impl FnOnce(&T) -> String,
) -> Result<(), Failure> {
    if json {
        let json = serde_json::to_string_pretty(report).map_err(|e| {
            Failure::new(
                format!("cannot serialise the report: {e}"),
                ErrorClass::Internal,
            )
        })?;
        println!("{json}");
    } else {
        print!("{}", table(report));
    }
    Ok(())
}

/// `vmm-bench api-latency`: prints a table or JSON.
pub fn api_latency(args: &ApiLatencyArgs) -> Status {
    let vmm = crate::startup::vmm_binary(args.vmm.as_deref())?;
    let rows = api_latency::run(args, &vmm)?;
    print_report(args.json, rows.as_slice(), api_latency::table)?;
    Ok(0)
}

/// `vmm-bench startup`: prints the table; status 1 if any boot failed.
pub fn startup(args: &StartupArgs) -> Status {
    let _signals = signal_guard()?;
    let report = startup::startup(args, &CancelToken::with_signals())
        .map_err(|e| Failure::new(format!("bench startup: {e}"), e.class()))?;
    print!("{}", table::table(&report));
    println!(
        "wrote {} and {}",
        args.out.join("startup.json").display(),
        args.out.join("startup.svg").display()
    );
    if report.failures.is_empty() {
        return Ok(0);
    }
    eprintln!("vmm-bench: {} boot(s) failed:", report.failures.len());
    for f in &report.failures {
        eprintln!(
            "  {} {}: {}",
            f.config,
            f.run,
            f.reason.lines().next().unwrap_or("")
        );
    }
    Ok(1)
}
