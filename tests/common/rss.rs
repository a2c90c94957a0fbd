//! How much memory a child touched: its peak resident set from `wait4`, so a test can show a
//! refusal came before guest RAM was touched however slow the machine is.

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitStatus, Output, Stdio};

/// Runs `command` to the end like `Command::output`, and returns its peak resident set in
/// bytes (`ru_maxrss`). Spawned by vfork, the child's figure includes this test process's own
/// resident set at the exec: tens of MiB, never a guest's GiBs.
// Reaped by wait4, which Child::wait cannot do: it gives no rusage.
#[allow(clippy::zombie_processes)]
pub fn output_with_max_rss(command: &mut Command) -> (Output, u64) {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        out.read_to_end(&mut v).unwrap();
        v
    });
    let mut stderr = Vec::new();
    err.read_to_end(&mut stderr).unwrap();
    let stdout = reader.join().unwrap();
    let (mut status, pid) = (0, child.id() as i32);
    // SAFETY: rusage is plain integers, for which all zeroes is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: reaps our own child, which `child` never waits for, into live locals.
        let reaped = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if reaped == pid {
            break;
        }
        let e = std::io::Error::last_os_error();
        assert_eq!(e.raw_os_error(), Some(libc::EINTR), "wait4 {pid}: {e}");
    }
    let output = Output {
        status: ExitStatus::from_raw(status),
        stdout,
        stderr,
    };
    // ru_maxrss is in KiB on Linux.
    (output, usage.ru_maxrss as u64 * 1024)
}

/// Asserts a child that ran with `guest` bytes of guest RAM stayed far below it (under a
/// sixteenth): it was refused before that RAM was touched.
pub fn assert_far_below_guest_size(max_rss: u64, guest: u64, what: &str) {
    assert!(
        max_rss < guest / 16,
        "{what}: peak RSS {} MiB, for a guest of {} MiB",
        max_rss >> 20,
        guest >> 20
    );
}
