//! Driving `--test-fault` runs and reading what their undo reported; shared by the `vmm` and
//! `vmm-bench` tests (the bench's `tests/common` includes this file by path).

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

/// Reads `child`'s piped stderr until `--test-fault wait-after-map=N` says the job waits with
/// map N done, sends `signal`, then waits for the end: the exit status, all of stderr, and how
/// long it took to end after the signal. Panics with what it read if the child ends before it
/// waits.
pub fn signal_once_waiting(mut child: Child, signal: i32) -> (ExitStatus, String, Duration) {
    let mut err = BufReader::new(child.stderr.take().expect("stderr piped"));
    let mut text = String::new();
    while !text.contains(vmm::pin::HOLD_MARKER) {
        let n = err.read_line(&mut text).unwrap();
        assert!(n > 0, "ended before the fault's wait:\n{text}");
    }
    // SAFETY: signalling a child we spawned and have not reaped.
    unsafe { libc::kill(child.id() as i32, signal) };
    let signalled = Instant::now();
    err.read_to_string(&mut text).unwrap();
    let status = child.wait().unwrap();
    (status, text, signalled.elapsed())
}

/// The number after `before` and before `after` in `text`: "undid N chunks", "VmLck was N kB".
pub fn number_between(text: &str, before: &str, after: &str) -> Option<u64> {
    let rest = &text[text.find(before)? + before.len()..];
    rest[..rest.find(after)?].trim().parse().ok()
}

/// The chunks the undo reports undone ("undid N chunks").
pub fn undid_chunks(text: &str) -> Option<u64> {
    number_between(text, "undid ", " chunks")
}

/// The VmLck the pinner measured right after the undo ("VmLck was N kB"), in kB.
pub fn vmlck_after_undo_kb(text: &str) -> Option<u64> {
    number_between(text, "VmLck was ", " kB")
}
