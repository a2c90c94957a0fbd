//! What /proc says of a process's locked memory; shared by the `vmm` and `vmm-bench` tests
//! (the bench's `tests/common` includes this file by path).

use std::time::{Duration, Instant};

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
