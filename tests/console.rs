//! The guest console cannot block the VMM: output nobody reads is dropped past a bounded
//! buffer (counted in the report) and SIGTERM still ends the run; the serial log stops at its
//! cap with a marker line.

mod common;

use std::io::{BufRead, BufReader};
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::vmm;
use guest_abi::probe::OPT_FLOOD;

/// How long a SIGTERM may take to end the run (the exit waits a second on a stalled console).
const SIGTERM_BOUND: Duration = Duration::from_secs(10);

/// A pipe of one page (the smallest the kernel allows), so that a reader who never reads
/// stalls the writer after a few KiB.
fn small_pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors were just created and are owned by nothing else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: F_SETPIPE_SZ on a pipe we own.
    let size = unsafe { libc::fcntl(fds[0], libc::F_SETPIPE_SZ, 4096) };
    assert_eq!(size, 4096);
    (read, write)
}

/// Sends SIGTERM and waits at most [`SIGTERM_BOUND`] for `child` to end (then kills it and
/// fails); returns its status code and stderr.
fn sigterm(mut child: Child, stderr_lines: mpsc::Receiver<String>) -> (Option<i32>, String) {
    // SAFETY: a pid we spawned and have not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + SIGTERM_BOUND;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("SIGTERM did not end the run within {SIGTERM_BOUND:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // The reader ends with the child's stderr.
    (
        status.code(),
        stderr_lines.iter().collect::<Vec<_>>().join("\n"),
    )
}

/// `child`'s stderr, line by line, on a channel.
fn stderr_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn report(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("a report")).unwrap()
}

#[test]
fn a_console_nobody_reads_drops_output_and_sigterm_still_ends_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let report_path = dir.path().join("report.json");
    let (unread, write) = small_pipe();
    let mut child = vmm()
        .args(["run", "--user-device", "none"])
        .args(["--cmdline", OPT_FLOOD, "--test-serial-buffer", "4K"])
        .arg("--report")
        .arg(&report_path)
        .stdout(Stdio::from(write))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = stderr_lines(&mut child);
    // Signal once the VMM says it drops output: the pipe and the ring are full, and a vCPU
    // writing to the pipe itself would be blocked by now. Without that line in a minute,
    // signal anyway: the run must still end.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        match lines.recv_timeout(Duration::from_millis(100)) {
            Ok(line) if line.contains("not being read") => {
                seen.push(line);
                break;
            }
            Ok(line) => seen.push(line),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!("vmm ended: {seen:?}"),
        }
    }
    let (code, err) = sigterm(child, lines);
    let err = format!("{}\n{err}", seen.join("\n"));
    drop(unread);
    assert_eq!(code, Some(143), "{err}");
    assert!(err.contains("stopped by signal 15"), "{err}");
    // One warning while running (rate-limited), one at the end for what was still buffered.
    assert!(
        err.matches("dropping what does not fit").count() <= 1,
        "{err}"
    );
    let serial = &report(&report_path)["serial"];
    assert_eq!(serial["buffer_bytes"], 4096, "{serial}");
    let dropped = serial["dropped_bytes"].as_u64().unwrap();
    assert!(dropped > 0, "{serial}");
    // The pipe took at most what it holds.
    assert!(
        serial["written_bytes"].as_u64().unwrap() <= 4096,
        "{serial}"
    );
}

#[test]
fn the_serial_log_stops_at_its_cap_with_a_marker_line() {
    let dir = tempfile::tempdir().unwrap();
    let report_path = dir.path().join("report.json");
    let log = dir.path().join("serial.log");
    let mut child = vmm()
        .args(["run", "--user-device", "none", "--quiet"])
        .args(["--cmdline", OPT_FLOOD, "--serial-log-max", "4K"])
        .arg("--serial-log")
        .arg(&log)
        .arg("--report")
        .arg(&report_path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = stderr_lines(&mut child);
    let marker = "[vmm: serial log cut here";
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&log).is_ok_and(|l| l.contains(marker)) {
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Some more output after the cut, which must not reach the log.
    std::thread::sleep(Duration::from_millis(300));
    let (code, err) = sigterm(child, lines);
    assert_eq!(code, Some(143), "{err}");

    let text = std::fs::read(&log).unwrap();
    let (kept, rest) = text.split_at(4096.min(text.len()));
    assert!(
        kept.starts_with(b"probe: "),
        "{}",
        String::from_utf8_lossy(kept)
    );
    let rest = String::from_utf8_lossy(rest);
    // The marker on a line of its own, the last line, once.
    let marker_line = rest.trim_start_matches('\n');
    assert!(
        marker_line.starts_with(marker) && marker_line.ends_with("]\n"),
        "after 4096 bytes: {rest:?}"
    );
    assert_eq!(marker_line.lines().count(), 1, "{rest:?}");
    assert!(marker_line.contains("4096 bytes"), "{rest:?}");

    let serial = &report(&report_path)["serial"];
    let written = serial["written_bytes"].as_u64().unwrap();
    let cut = serial["log_cut_bytes"].as_u64().unwrap();
    assert!(cut > 0, "{serial}");
    assert_eq!(written, 4096 + cut, "{serial}");
    assert_eq!(serial["dropped_bytes"], 0, "{serial}");
}
