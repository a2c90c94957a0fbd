//! `vmm pin-bench` and `vmm bench`: the benchmarks are the `vmm-bench` crate, which sits above
//! this library (it boots `vmm` and links its memory code), so this binary cannot link them.
//! It runs the `vmm-bench` binary beside it instead, in its place (exec): the benchmark's
//! output, signals and exit status are then the command's own, as when it was built in.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

use pinning::ErrorClass;

use super::{Failure, Status};

/// The benchmarks' binary, built and installed beside `vmm`.
pub const BENCH_BINARY: &str = "vmm-bench";

/// What follows `vmm pin-bench` or `vmm bench` on the command line, passed on untouched
/// (`--help` included: the options are `vmm-bench`'s to describe).
#[derive(Clone, Debug, clap::Args)]
pub struct Forwarded {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<OsString>,
}

/// Where binary `name` of this workspace should be: beside this executable, where cargo
/// builds every binary of one profile (the `vmm` binary and `vmm-bench` find each other so).
pub fn beside_this_executable(name: &str) -> std::io::Result<PathBuf> {
    Ok(std::env::current_exe()?.with_file_name(name))
}

/// How to put binary `package` where [`beside_this_executable`] looks: the same cargo profile
/// as this executable's (its folder's name), or a copy.
pub fn build_hint(package: &str) -> String {
    let debug = beside_this_executable(package)
        .ok()
        .and_then(|p| Some(p.parent()?.ends_with("debug")))
        .unwrap_or(false);
    let profile = if debug { "" } else { " --release" };
    format!("build it there with `cargo build{profile} -p {package}` (cargo puts the binaries of one profile in one folder), or copy it there")
}

/// Where the benchmarks' binary should be: beside this one.
pub fn bench_binary() -> Result<PathBuf, Failure> {
    beside_this_executable(BENCH_BINARY).map_err(|e| {
        Failure::new(
            format!("cannot find this executable to run {BENCH_BINARY} beside it: {e}"),
            ErrorClass::Internal,
        )
    })
}

/// Runs `vmm-bench [command] ARGS` in place of this process; returns only if it cannot.
pub fn to_bench(command: Option<&str>, forwarded: &Forwarded) -> Status {
    let bench = bench_binary()?;
    let named = command.unwrap_or("bench");
    if !bench.is_file() {
        return Err(Failure::new(
            format!(
                "`vmm {named}` runs the {BENCH_BINARY} binary, which is not at {}: {}",
                bench.display(),
                build_hint(BENCH_BINARY)
            ),
            ErrorClass::User,
        ));
    }
    let err = Command::new(&bench)
        .args(command)
        .args(&forwarded.args)
        .exec();
    Err(Failure::new(
        format!("`vmm {named}`: cannot run {}: {err}", bench.display()),
        ErrorClass::Internal,
    ))
}
