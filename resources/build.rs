//! Builds the probe guest (resources/probe-guest, a freestanding `no_std` kernel outside the
//! workspace, with its one dependency guest-abi) with an inner cargo and its own target dir,
//! and leaves the ELF at `$OUT_DIR/probe-guest.elf` for `include_bytes!`.

use std::env;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Inherited variables that would redirect or alter the inner build: flags meant for the host
/// build, wrappers such as clippy-driver, another target or target dir, the outer jobserver.
const SCRUBBED_ENV: &[&str] = &[
    "CARGO_ENCODED_RUSTFLAGS",
    "RUSTFLAGS",
    "RUSTC_WORKSPACE_WRAPPER",
    "CARGO_MAKEFLAGS",
    "MAKEFLAGS",
    "MFLAGS",
    "CARGO_PRIMARY_PACKAGE",
];

/// Prefixes of cargo configuration variables that must not reach the inner build: `build.*`
/// (target, target dir, rustflags, wrappers), `target.*` (per-target rustflags and linkers)
/// and `profile.*` (panic strategy, LTO, debug info of the release profile).
const SCRUBBED_PREFIXES: &[&str] = &["CARGO_BUILD_", "CARGO_TARGET_", "CARGO_PROFILE_"];

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let probe_dir = manifest_dir.join("probe-guest");
    let manifest = probe_dir.join("Cargo.toml");
    let linker_script = probe_dir.join("link.ld");

    // The probe also builds guest-abi (a path dependency shared with the VMM), whose manifest
    // takes its edition and the like from the workspace's.
    let abi_dir = manifest_dir.join("..").join("guest-abi");
    for path in [
        &manifest,
        &probe_dir.join("Cargo.lock"),
        &linker_script,
        &abi_dir.join("Cargo.toml"),
        &manifest_dir.join("..").join("Cargo.toml"),
    ] {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    rerun_for_dir(&probe_dir.join("src"));
    rerun_for_dir(&abi_dir.join("src"));

    let target_dir = out_dir.join("probe-target");
    let rustflags = [
        "-C",
        "link-arg=-nostdlib",
        "-C",
        "link-arg=-static",
        "-C",
        "link-arg=-nostartfiles",
        "-C",
        "link-arg=-no-pie",
        "-C",
        "link-arg=-Wl,--build-id=none",
        "-C",
        &format!("link-arg=-Wl,-T,{}", linker_script.display()),
        "-C",
        "relocation-model=static",
        // The emulator that runs the probe here lacks most SSE instructions: no auto-vectorizing.
        "-C",
        "no-vectorize-loops",
        "-C",
        "no-vectorize-slp",
    ]
    .join("\x1f");

    let cargo = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut cmd = Command::new(&cargo);
    cmd.arg("build")
        .arg("--release")
        .arg("--offline")
        .arg("--locked")
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(&probe_dir);
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if SCRUBBED_ENV.contains(&key) || SCRUBBED_PREFIXES.iter().any(|p| key.starts_with(p)) {
            cmd.env_remove(key);
        }
    }
    cmd.env("CARGO_ENCODED_RUSTFLAGS", &rustflags);

    let status = cmd.status().unwrap_or_else(|e| {
        panic!("cannot run {:?} to build the probe guest: {e}", cargo);
    });
    if !status.success() {
        panic!(
            "building the probe guest failed ({status}).\n  command: {cmd:?}\n  \
             The inner cargo's messages are above. It needs the host toolchain only \
             (no extra target, no rust-src) and a C compiler driver (cc) to link."
        );
    }

    let elf = target_dir.join("release").join("probe-guest");
    let dest = out_dir.join("probe-guest.elf");
    fs::copy(&elf, &dest).unwrap_or_else(|e| {
        panic!(
            "probe guest built, but copying {} to {} failed: {e}",
            elf.display(),
            dest.display()
        )
    });
}

/// `rerun-if-changed` for every file under `dir` (and the directory, for added files).
fn rerun_for_dir(dir: &Path) {
    println!("cargo:rerun-if-changed={}", dir.display());
    let entries = fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rerun_for_dir(&path);
        } else {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
}
