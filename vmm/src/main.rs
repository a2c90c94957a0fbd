//! The `vmm` binary: parses the command line, runs the command, and decides the exit status
//! in this one place: a command's own status when it ran to its end (the guest's, for
//! `vmm run`), else its failure's class: 2 for input or a limit the user must change, or a
//! device that could not be set up; 128+N after signal N; 1 for anything else.

use std::process::ExitCode;

use clap::Parser;
use vmm::cli::{self, Cli, Command};

fn main() -> ExitCode {
    // Timeline zero: as close to process start as main gets.
    let start = std::time::Instant::now();
    let cli = Cli::parse();
    // A device server says where it listens (info); everything else is quiet by default.
    cli::init_logging(match cli.command {
        Command::Device(_) => "info",
        _ => "warn",
    });
    let status = match &cli.command {
        Command::Run(args) => cli::run(args, start),
        Command::PinBench(args) => cli::forward::to_bench(Some("pin-bench"), args),
        Command::Bench(args) => cli::forward::to_bench(None, args),
        Command::Device(cmd) => cli::device(cmd),
        Command::Serve(args) => cli::serve::serve(args),
    };
    cli::exit_code("vmm", status)
}
