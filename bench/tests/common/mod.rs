//! Shared by the bench's integration tests: the binaries under test and what /proc says about
//! them.
// Each test file uses a subset of these helpers.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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

/// Bytes process `pid` holds locked (VmLck); `None` once it is gone.
pub fn locked_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    pinning::procfs::kb_field(&status, "VmLck")
}

/// Waits until `pid` holds locked memory: it is then mid-job, past the admission check.
pub fn wait_for_locked_memory(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while locked_bytes(pid).unwrap_or(0) == 0 {
        assert!(
            Instant::now() < deadline,
            "process {pid} never locked memory"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}
