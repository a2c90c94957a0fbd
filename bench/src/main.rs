//! The `vmm-bench` binary: parses the command line, runs the benchmark, and decides the exit
//! status here, as `vmm`'s own `main` does: the command's status when it ran to its end (1 if
//! a boot of `startup` failed), else its failure's class (2 for input or a limit the user must
//! change, 128+N after signal N, 1 for anything else).

use std::process::ExitCode;

use clap::Parser;
use vmm_bench::cli::{self, Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    vmm::cli::init_logging("warn");
    let status = match &cli.command {
        Command::PinBench(args) => cli::pin_bench(args),
        Command::Startup(args) => cli::startup(args),
        Command::ApiLatency(args) => cli::api_latency(args),
    };
    vmm::cli::exit_code("vmm-bench", status)
}
