//! The `vmm-bench` binary: parses the command line, runs the benchmark, and decides the exit
//! status here, as `vmm`'s own `main` does: the command's status when it ran to its end (1 if
//! a boot of `startup` failed), else its failure's class (2 for input or a limit the user must
//! change, 128+N after signal N, 1 for anything else).

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use vmm_bench::cli::{self, Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let status = match &cli.command {
        Command::PinBench(args) => cli::pin_bench(args),
        Command::Startup(args) => cli::startup(args),
    };
    match status {
        Ok(status) => ExitCode::from(status),
        Err(failure) => {
            eprintln!("vmm-bench: {failure}");
            ExitCode::from(failure.exit_status())
        }
    }
}
