//! Shared by the bench's integration tests: the binaries under test and what /proc says about
//! them.
// Each test file uses a subset of these helpers.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Stdio};

#[path = "../../../tests/common/fault.rs"]
mod fault;
#[path = "../../../tests/common/locked.rs"]
mod locked;
#[allow(unused_imports)] // each test file uses a subset, as with the rest of this module
pub use fault::{signal_once_waiting, undid_chunks, vmlck_after_undo_kb};
#[allow(unused_imports)]
pub use locked::{locked_bytes, wait_for_locked_memory};
#[path = "../../../tests/common/skip.rs"]
mod skip;
#[allow(unused_imports)]
pub use skip::skip;

/// The `vmm-bench` binary, with no stdin.
pub fn vmm_bench() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vmm-bench"));
    c.stdin(Stdio::null());
    c
}

/// The `vmm` binary beside `vmm-bench`, which `startup` boots and which runs `vmm-bench` for
/// `vmm pin-bench` and `vmm bench`. Cargo builds it there when it builds the workspace's tests
/// (`cargo test --workspace`); a test of this package alone needs it built first.
pub fn vmm_beside() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_BIN_EXE_vmm-bench")).with_file_name("vmm");
    assert!(
        path.is_file(),
        "no vmm binary at {}: build it first (`cargo build --release -p vmm`)",
        path.display()
    );
    path
}

/// A finished command's stderr, as text.
pub fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `binary` alone in a fresh folder, as `name`: a hard link, not a copy, so that no test
/// thread holds the file open for writing while another forks (the fork's child would inherit
/// that descriptor and the exec would fail with ETXTBSY). The folder is in cargo's scratch
/// space for tests, on the same file system as the binary.
pub fn alone(binary: &std::path::Path, name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join(name);
    std::fs::hard_link(binary, &path).unwrap();
    (dir, path)
}
