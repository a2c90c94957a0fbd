//! Boots one configuration: `vmm run` (the `vmm` binary) as a child, timed from spawn, with its
//! serial console read through a pipe exactly as QEMU's is, and its `--report` read back.
//!
//! Every child is owned by a [`Reaper`]: however the bench leaves (a failure, a timeout,
//! Ctrl-C, a panic), the child is stopped and reaped.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use pinning::cancel::CancelReason;
use pinning::CancelToken;
use serde::Serialize;
use vmm::timeline::ms;

use super::args::{short_size, Config};

/// The start of the probe's last line (`probe: result ok` or `... FAIL: ...`), printed right
/// after it writes the ready mark: the ready mark as seen from outside the VMM.
pub const RESULT_LINE: &str = guest_abi::probe::RESULT_PREFIX;

/// A child that is stopped and reaped when dropped. `grace` gives it that long to stop on
/// SIGTERM first (`vmm` then undoes its pinning and stops its device process itself).
pub struct Reaper {
    child: Option<Child>,
    grace: Duration,
}

impl Reaper {
    pub fn new(child: Child, grace: Duration) -> Self {
        Reaper {
            child: Some(child),
            grace,
        }
    }

    fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("child present until dropped")
    }

    /// Stops the child (SIGTERM, then SIGKILL after the grace period) and reaps it.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if !self.grace.is_zero() {
            // SAFETY: kill on the pid of our own child, not yet reaped.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let until = Instant::now() + self.grace;
            while Instant::now() < until {
                if let Ok(Some(status)) = child.try_wait() {
                    return Some(status);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let _ = child.kill();
        child.wait().ok()
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        self.stop();
    }
}

/// How a timed child ended.
#[derive(Debug)]
pub enum Ended {
    Exited(ExitStatus),
    TimedOut,
    Cancelled(CancelReason),
}

/// What a timed child did, times in ms since spawn.
#[derive(Debug)]
pub struct Timed {
    pub ended: Ended,
    pub wall_ms: f64,
    pub first_output_ms: Option<f64>,
    pub ready_line_ms: Option<f64>,
    pub stdout: String,
    pub stderr: String,
}

/// Reads a pipe to its end, noting when the guest's first line (`probe: `) and its result line
/// arrived. Only the guest's own text counts: a device server started by `vmm run` may write to
/// the same pipe.
fn read_timed(mut pipe: impl Read, t0: Instant) -> (Option<Duration>, Option<Duration>, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let (mut first, mut ready) = (None, None);
    loop {
        match pipe.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                let at = t0.elapsed();
                let old_len = buf.len();
                buf.extend_from_slice(&chunk[..n]);
                // Look only near the new bytes: a marker may straddle two reads.
                let seen = |marker: &str| {
                    buf[old_len.saturating_sub(marker.len())..]
                        .windows(marker.len())
                        .any(|w| w == marker.as_bytes())
                };
                if first.is_none() && seen(guest_abi::probe::LINE_PREFIX) {
                    first = Some(at);
                }
                if ready.is_none() && seen(RESULT_LINE) {
                    ready = Some(at);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    (first, ready, buf)
}

/// Spawns `cmd` with stdin closed and stdout/stderr piped, and waits for it to exit, for
/// `timeout` to pass or for `cancel`; the child is reaped in every case.
pub fn run_timed(
    mut cmd: Command,
    timeout: Duration,
    grace: Duration,
    cancel: &CancelToken,
) -> std::io::Result<Timed> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let t0 = Instant::now();
    let mut reaper = Reaper::new(cmd.spawn()?, grace);
    let stdout = reaper.child().stdout.take().expect("piped");
    let stderr = reaper.child().stderr.take().expect("piped");
    let (out_tx, out_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = out_tx.send(read_timed(stdout, t0));
    });
    let (err_tx, err_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = err_tx.send(read_timed(stderr, t0).2);
    });
    let ended = loop {
        if let Some(status) = reaper.child().try_wait()? {
            break Ended::Exited(status);
        }
        if let Some(reason) = cancel.reason() {
            break Ended::Cancelled(reason);
        }
        if t0.elapsed() > timeout {
            break Ended::TimedOut;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let wall = t0.elapsed();
    reaper.stop();
    // A grandchild could hold the pipes open; don't wait on it for long.
    let (first, ready, out) =
        out_rx
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or((None, None, Vec::new()));
    let err = err_rx
        .recv_timeout(Duration::from_secs(1))
        .unwrap_or_default();
    Ok(Timed {
        ended,
        wall_ms: ms(wall),
        first_output_ms: first.map(ms),
        ready_line_ms: ready.map(ms),
        stdout: String::from_utf8_lossy(&out).into_owned(),
        stderr: String::from_utf8_lossy(&err).into_owned(),
    })
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[derive(Clone, Debug, Serialize)]
pub struct PhaseMs {
    pub name: String,
    pub start_ms: f64,
    pub end_ms: f64,
    pub ms: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct PinSummary {
    /// The backend(s) the report names, `+`-joined when there are several.
    pub backend: String,
    pub threads: Option<u64>,
    pub decided_by: Option<String>,
    pub gibps: Option<f64>,
}

/// One measured boot of one configuration.
#[derive(Clone, Debug, Serialize)]
pub struct VmmSample {
    pub run: u32,
    /// From spawn to the child reaped.
    pub wall_ms: f64,
    /// From spawn to the guest's first serial line on the pipe.
    pub spawn_first_output_ms: Option<f64>,
    /// From spawn to the probe's result line on the pipe (right after its ready mark).
    pub spawn_ready_ms: Option<f64>,
    /// The report's: from vmm's start (`main`) to the guest's ready mark.
    pub ready_ms: f64,
    pub first_output_ms: Option<f64>,
    pub entry_ms: Option<f64>,
    /// The report's total, teardown included.
    pub total_ms: f64,
    /// The `pin` phase.
    pub pin_ms: f64,
    /// The `exit` phase: stopping the guest and its devices, undoing the pinning, unmapping
    /// and freeing guest RAM. Not in time to ready, but a host that starts VMs back to back
    /// pays it too (freeing a memfd of many GiB takes seconds).
    pub teardown_ms: f64,
    /// vmm's own set-up outside pinning: kvm + memory + devices + load + vcpus.
    pub overhead_ms: f64,
    pub pin: PinSummary,
    /// From the report's `vm`: memfds backing guest RAM (0 for private memory), the size of
    /// each, and the huge pages the kernel gave.
    pub memory_shards: u64,
    pub shard_bytes: u64,
    pub huge_bytes: u64,
    pub phases: Vec<PhaseMs>,
    pub exit_status: Option<i64>,
    pub report: PathBuf,
}

/// Phases counted as vmm's own overhead (everything before the guest runs but pinning).
pub const OVERHEAD_PHASES: [&str; 6] = ["kvm", "memory", "devices", "placement", "load", "vcpus"];

fn pin_summary(pin: &serde_json::Value) -> PinSummary {
    let one = |p: &serde_json::Value| PinSummary {
        backend: p["backend"].as_str().unwrap_or("unknown").to_string(),
        threads: p["threads"].as_u64(),
        decided_by: p["decided_by"].as_str().map(str::to_string),
        gibps: p["gibps"].as_f64(),
    };
    match pin {
        serde_json::Value::Array(all) if !all.is_empty() => {
            let mut s = one(&all[0]);
            s.backend = all
                .iter()
                .map(|p| p["backend"].as_str().unwrap_or("unknown"))
                .collect::<Vec<_>>()
                .join("+");
            s
        }
        serde_json::Value::Object(_) => one(pin),
        _ => PinSummary {
            backend: "none".into(),
            threads: None,
            decided_by: None,
            gibps: None,
        },
    }
}

/// Reads what the bench needs from a `vmm run --report` file.
pub fn parse_report(
    json: &serde_json::Value,
    run: u32,
    t: &Timed,
    path: &Path,
) -> Result<VmmSample, String> {
    let phases: Vec<PhaseMs> = json["phases"]
        .as_array()
        .ok_or("the report has no phases")?
        .iter()
        .map(|p| {
            let (s, e) = (
                p["start_ms"].as_f64().unwrap_or(0.0),
                p["end_ms"].as_f64().unwrap_or(0.0),
            );
            PhaseMs {
                name: p["name"].as_str().unwrap_or("?").to_string(),
                start_ms: s,
                end_ms: e,
                ms: ((e - s) * 1e3).round() / 1e3,
            }
        })
        .collect();
    let phase = |name: &str| phases.iter().filter(|p| p.name == name).map(|p| p.ms).sum();
    let ready_ms = json["guest"]["ready_ms"]
        .as_f64()
        .ok_or("the guest never wrote its ready mark")?;
    Ok(VmmSample {
        run,
        wall_ms: t.wall_ms,
        spawn_first_output_ms: t.first_output_ms,
        spawn_ready_ms: t.ready_line_ms,
        ready_ms,
        first_output_ms: json["guest"]["first_output_ms"].as_f64(),
        entry_ms: json["guest"]["entry_ms"].as_f64(),
        total_ms: json["total_ms"].as_f64().unwrap_or(0.0),
        pin_ms: phase("pin"),
        teardown_ms: phase("exit"),
        overhead_ms: ((OVERHEAD_PHASES.iter().map(|n| phase(n)).sum::<f64>()) * 1e3).round() / 1e3,
        pin: pin_summary(&json["pin"]),
        memory_shards: json["vm"]["memory_shards"].as_u64().unwrap_or(0),
        shard_bytes: json["vm"]["shard_bytes"].as_u64().unwrap_or(0),
        huge_bytes: json["vm"]["huge_bytes"].as_u64().unwrap_or(0),
        phases,
        exit_status: json["exit_status"].as_i64(),
        report: path.to_path_buf(),
    })
}

/// Why one boot did not give a sample.
#[derive(Debug, Clone, Serialize)]
pub struct RunFailure {
    pub config: String,
    pub run: String,
    pub reason: String,
    pub stderr_tail: String,
}

/// Boots `config` once through `vmm` at `exe`, writing its report to `report`.
pub fn boot(
    exe: &Path,
    config: &Config,
    run: u32,
    label: &str,
    report: &Path,
    timeout: Duration,
    cancel: &CancelToken,
) -> Result<Result<VmmSample, RunFailure>, CancelReason> {
    let _ = std::fs::remove_file(report);
    let mut cmd = Command::new(exe);
    cmd.arg("run")
        .arg("--memory")
        .arg(short_size(config.memory))
        .args(["--backing", config.backing.name()])
        .args(["--pin-threads", &config.threads.to_string()])
        .args(&config.plan.args);
    if let Some(shard) = config.shard {
        cmd.args(["--memory-shard", &short_size(shard)]);
    }
    cmd.arg("--report")
        .arg(report)
        .arg("--quiet")
        .arg("--timeout")
        .arg(timeout.as_secs().to_string());
    let fail = |reason: String, stderr: &str| RunFailure {
        config: config.id(),
        run: label.to_string(),
        reason,
        stderr_tail: tail(stderr, 15),
    };
    // The child's own --timeout fires first; ours is the backstop.
    let t = match run_timed(
        cmd,
        timeout + Duration::from_secs(30),
        Duration::from_secs(10),
        cancel,
    ) {
        Ok(t) => t,
        Err(e) => {
            return Ok(Err(fail(
                format!("cannot start {}: {e}", exe.display()),
                "",
            )))
        }
    };
    let status = match &t.ended {
        Ended::Cancelled(r) => return Err(*r),
        Ended::TimedOut => return Ok(Err(fail("timed out".into(), &t.stderr))),
        Ended::Exited(s) => *s,
    };
    if !status.success() {
        let serial = tail(&t.stdout, 5);
        return Ok(Err(fail(
            format!("vmm run exited with {status}; serial ends:\n{serial}"),
            &t.stderr,
        )));
    }
    let sample = std::fs::read_to_string(report)
        .map_err(|e| format!("cannot read the report {}: {e}", report.display()))
        .and_then(|s| serde_json::from_str(&s).map_err(|e| format!("bad report: {e}")))
        .and_then(|json| parse_report(&json, run, &t, report));
    Ok(sample.map_err(|reason| fail(reason, &t.stderr)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_line_is_found_across_reads() {
        struct Drip(Vec<&'static [u8]>);
        impl Read for Drip {
            fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
                if self.0.is_empty() {
                    return Ok(0);
                }
                let b = self.0.remove(0);
                out[..b.len()].copy_from_slice(b);
                Ok(b.len())
            }
        }
        let (first, ready, all) = read_timed(
            Drip(vec![b"probe: hello\r\nprobe: res", b"ult ok\r\n"]),
            Instant::now(),
        );
        assert!(first.is_some() && ready.is_some());
        assert_eq!(all.len(), 32);
    }

    #[test]
    fn a_stopped_child_is_reaped_and_timeouts_are_reported() {
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let t = run_timed(
            cmd,
            Duration::from_millis(50),
            Duration::ZERO,
            &CancelToken::new(),
        )
        .unwrap();
        assert!(matches!(t.ended, Ended::TimedOut));
        assert!(t.first_output_ms.is_none());
    }

    #[test]
    fn teardown_is_the_exit_phase_and_shards_come_from_vm() {
        use std::os::unix::process::ExitStatusExt;
        let phase = |name: &str, s: f64, e: f64| serde_json::json!({"name": name, "start_ms": s, "end_ms": e});
        let json = serde_json::json!({
            "total_ms": 3400.0,
            "phases": [phase("memory", 1.0, 2.0), phase("pin", 2.0, 302.0),
                       phase("run", 302.0, 400.0), phase("exit", 400.0, 3400.0)],
            "guest": {"ready_ms": 390.0},
            "pin": {"backend": "vfio-user", "threads": 2},
            "vm": {"memory_shards": 4, "shard_bytes": 1u64 << 30, "huge_bytes": 2u64 << 20},
        });
        let t = Timed {
            ended: Ended::Exited(ExitStatus::from_raw(0)),
            wall_ms: 3500.0,
            first_output_ms: Some(350.0),
            ready_line_ms: Some(395.0),
            stdout: String::new(),
            stderr: String::new(),
        };
        let s = parse_report(&json, 1, &t, Path::new("r.json")).unwrap();
        assert_eq!(s.teardown_ms, 3000.0);
        assert_eq!(s.pin_ms, 300.0);
        assert_eq!((s.memory_shards, s.shard_bytes), (4, 1 << 30));
        assert_eq!(s.huge_bytes, 2 << 20);
    }

    #[test]
    fn pin_backends_are_read_from_one_or_many() {
        let one = serde_json::json!({"backend": "populate", "threads": 2});
        assert_eq!(pin_summary(&one).backend, "populate");
        let many = serde_json::json!([{"backend": "populate"}, {"backend": "vfio-user"}]);
        assert_eq!(pin_summary(&many).backend, "populate+vfio-user");
        assert_eq!(pin_summary(&serde_json::Value::Null).backend, "none");
    }
}
