//! Shared by the integration tests: the binary under test and what /proc says about it.
// Each test file uses a subset of these helpers.
#![allow(dead_code)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The `vmm` binary, with no stdin (the guest console must not wait on the test's terminal).
pub fn vmm() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vmm"));
    c.stdin(Stdio::null());
    c
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

/// Runs `vmm run ARGS --report FILE`; returns the output and the report, if one was written.
pub fn run_with_report(args: &[&str]) -> (std::process::Output, Option<serde_json::Value>) {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.json");
    let out = vmm()
        .arg("run")
        .args(args)
        .arg("--report")
        .arg(&report)
        .output()
        .unwrap();
    let r = std::fs::read_to_string(&report)
        .ok()
        .map(|s| serde_json::from_str(&s).unwrap());
    (out, r)
}

/// A finished command's stdout, as text.
pub fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A finished command's stderr, as text.
pub fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
