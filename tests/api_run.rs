//! `vmm run --api-socket`: the machine API of a VM run from the command line, through the real
//! binary and the api crate's client: its stage and pinning progress while it starts, pause
//! and resume of a running guest, the counters, shutdown, and the socket gone at exit.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use api::client::Client;
use api::Endpoint;

mod common;
use common::{stderr, vmm};
use guest_abi::probe::{OPT_FLOOD, OPT_HANG};

/// Waits (bounded) for the API socket to appear, then connects.
fn connect(socket: &Path, child: &mut Child) -> Client {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !socket.exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "vmm ended before its API socket appeared"
        );
        assert!(Instant::now() < deadline, "no API socket after 30 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    Client::connect(socket, Duration::from_secs(40)).unwrap()
}

/// `endpoint` with no body: (status, JSON body or null).
fn call(client: &mut Client, endpoint: Endpoint) -> (u16, serde_json::Value) {
    let reply = client
        .request(endpoint.method(), &endpoint.path(), None)
        .unwrap();
    let body = if reply.body.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&reply.body).unwrap()
    };
    (reply.status, body)
}

/// Polls vm.info until `ready` says yes (bounded); returns that vm.info.
fn info_until(
    client: &mut Client,
    what: &str,
    ready: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, info) = call(client, Endpoint::VmInfo);
        assert_eq!(status, 200, "{info}");
        if ready(&info) {
            return info;
        }
        assert!(Instant::now() < deadline, "never {what}: {info}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn size(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// Waits (bounded) until `log` is longer than `than` bytes.
fn grows_past(log: &Path, than: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n = size(log);
        if n > than {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "{} stayed at {n} bytes",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A `vmm run` that is killed if the test ends (or panics) before it does.
struct Running(Option<Child>);

impl Running {
    fn child(&mut self) -> &mut Child {
        self.0.as_mut().unwrap()
    }

    fn id(&self) -> u32 {
        self.0.as_ref().unwrap().id()
    }

    fn wait_with_output(mut self) -> std::process::Output {
        self.0.take().unwrap().wait_with_output().unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn(args: &[&str], socket: &Path) -> Running {
    let child = vmm()
        .arg("run")
        .args(args)
        .arg("--api-socket")
        .arg(socket)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    Running(Some(child))
}

fn temp_paths(names: [&str; 3]) -> (tempfile::TempDir, [PathBuf; 3]) {
    let dir = tempfile::tempdir().unwrap();
    let paths = names.map(|n| dir.path().join(n));
    (dir, paths)
}

#[test]
fn a_flooding_guest_paused_prints_nothing_resumed_goes_on_and_shut_down_ends_the_process() {
    let (_dir, [socket, log, report]) = temp_paths(["api.sock", "serial.log", "report.json"]);
    let mut child = spawn(
        &[
            "--user-device",
            "none",
            "--quiet",
            "--cmdline",
            OPT_FLOOD,
            "--serial-log",
            log.to_str().unwrap(),
            "--report",
            report.to_str().unwrap(),
        ],
        &socket,
    );
    let mut client = connect(&socket, child.child());
    let mode = std::fs::metadata(&socket).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );
    let info = info_until(&mut client, "running", |i| i["vmm"]["phase"] == "run");
    assert_eq!(info["state"], "Running");
    assert_eq!(info["memory_actual_size"], 256u64 << 20);
    grows_past(&log, 0);

    assert_eq!(call(&mut client, Endpoint::VmPause).0, 204);
    let (status, err) = call(&mut client, Endpoint::VmPause);
    assert_eq!(status, 409, "{err}");
    assert!(err["error"].as_str().unwrap().contains("already paused"));
    assert_eq!(call(&mut client, Endpoint::VmInfo).1["state"], "Paused");
    // The serial writer may still be writing out what the guest printed before the pause.
    std::thread::sleep(Duration::from_millis(100));
    let paused_at = size(&log);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(size(&log), paused_at, "the guest printed while paused");

    assert_eq!(call(&mut client, Endpoint::VmResume).0, 204);
    assert_eq!(call(&mut client, Endpoint::VmResume).0, 409);
    assert_eq!(call(&mut client, Endpoint::VmInfo).1["state"], "Running");
    grows_past(&log, paused_at);

    let (status, err) = call(&mut client, Endpoint::VmCreate);
    assert_eq!(status, 409, "{err}");
    assert!(err["error"].as_str().unwrap().contains("vmm serve"));

    assert_eq!(call(&mut client, Endpoint::VmShutdown).0, 204);
    let out = child.wait_with_output();
    // A shutdown asked for through the API is a clean end.
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!socket.exists(), "the API socket outlived vmm");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(report["outcome"], "shut down on request");
}

/// Time paused is not the guest's: paused for longer than its --timeout, it is still there
/// after resume and ends on vm.shutdown, not as timed out (exit 124 during the pause before).
#[test]
fn time_paused_does_not_count_against_the_timeout() {
    let (_dir, [socket, _, _]) = temp_paths(["api.sock", "unused", "unused2"]);
    let args = [
        "--user-device",
        "none",
        "--quiet",
        "--cmdline",
        "probe.hang",
    ];
    let mut child = spawn(&[&args[..], &["--timeout", "3"]].concat(), &socket);
    let mut client = connect(&socket, child.child());
    info_until(&mut client, "running", |i| i["vmm"]["phase"] == "run");
    assert_eq!(call(&mut client, Endpoint::VmPause).0, 204);
    std::thread::sleep(Duration::from_secs(4));
    let (status, err) = call(&mut client, Endpoint::VmResume);
    assert_eq!(status, 204, "{err}");
    let (_, info) = call(&mut client, Endpoint::VmInfo);
    assert_eq!(info["state"], "Running", "{info}");
    assert_eq!(call(&mut client, Endpoint::VmShutdown).0, 204);
    let out = child.wait_with_output();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn vm_info_shows_the_pin_stage_and_its_bytes_growing() {
    let (_dir, [socket, _, _]) = temp_paths(["api.sock", "unused", "unused2"]);
    // One thread populating 2 GiB, held after its second step: pinning stays visible.
    let mut child = spawn(
        &[
            "--user-device",
            "none",
            "--quiet",
            "--memory",
            "2G",
            "--pin",
            "populate",
            "--pin-threads",
            "1",
            "--test-fault",
            "wait-after-map=2",
        ],
        &socket,
    );
    let mut client = connect(&socket, child.child());
    let info = info_until(&mut client, "pinning with progress", |i| {
        i["vmm"]["progress"]["bytes_done"].as_u64() > Some(0)
    });
    assert_eq!(info["vmm"]["phase"], "pin", "{info}");
    let progress = &info["vmm"]["progress"];
    assert_eq!(progress["bytes_total"], 2u64 << 30, "{info}");
    assert!(progress["bytes_per_s"].as_f64().unwrap() > 0.0, "{info}");
    assert!(progress["eta_s"].as_f64().unwrap() >= 0.0, "{info}");
    let (status, err) = call(&mut client, Endpoint::VmPause);
    assert_eq!(status, 409, "{err}");
    assert!(
        err["error"].as_str().unwrap().contains("stage pin"),
        "{err}"
    );
    // The fault point waits for a signal; the run ends as a SIGTERM does.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output();
    assert_eq!(out.status.code(), Some(143), "{}", stderr(&out));
    assert!(!socket.exists(), "the API socket outlived vmm");
}

#[test]
fn vm_shutdown_while_pinning_cancels_it_undoes_it_and_answers_once_done() {
    let (_dir, [socket, _, _]) = temp_paths(["api.sock", "unused", "unused2"]);
    // One thread populating 4 GiB: long enough to be asked twice and stopped midway.
    let mut child = spawn(
        &[
            "--user-device",
            "none",
            "--quiet",
            "--memory",
            "4G",
            "--pin",
            "populate",
            "--pin-threads",
            "1",
        ],
        &socket,
    );
    let mut client = connect(&socket, child.child());
    let done = |i: &serde_json::Value| i["vmm"]["progress"]["bytes_done"].as_u64();
    let first = info_until(&mut client, "pinning with progress", |i| done(i) > Some(0));
    let second = info_until(&mut client, "pinning further", |i| done(i) > done(&first));
    assert_eq!(second["vmm"]["phase"], "pin", "{second}");
    assert!(
        done(&second) < Some(4 << 30),
        "pinning ended too soon to stop it: {second}"
    );

    assert_eq!(call(&mut client, Endpoint::VmShutdown).0, 204);
    let out = child.wait_with_output();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("pinning cancelled by request"), "{err}");
    assert!(err.contains("nothing is left pinned"), "{err}");
    assert!(!socket.exists(), "the API socket outlived vmm");
}

#[test]
fn the_probe_with_its_epf_device_shows_counters_and_vmm_shutdown_ends_it() {
    let (_dir, [socket, report, _]) = temp_paths(["api.sock", "report.json", "unused"]);
    let mut child = spawn(
        &[
            "--quiet",
            "--cmdline",
            OPT_HANG,
            "--report",
            report.to_str().unwrap(),
        ],
        &socket,
    );
    let mut client = connect(&socket, child.child());
    info_until(&mut client, "running", |i| i["vmm"]["phase"] == "run");
    let (status, ping) = call(&mut client, Endpoint::VmmPing);
    assert_eq!(status, 200);
    assert_eq!(ping["pid"], child.id());
    let (status, counters) = call(&mut client, Endpoint::VmCounters);
    assert_eq!(status, 200);
    assert_eq!(counters["pinning"]["bytes"], 256u64 << 20, "{counters}");
    assert!(
        counters["pinning"]["threads"].as_u64() >= Some(1),
        "{counters}"
    );
    // All guest RAM was DMA-mapped for the epf device, over vfio-user messages. Its server
    // maps guest RAM through the memfds it was sent, so it needs no DMA_READ/DMA_WRITE.
    let (name, epf) = counters
        .as_object()
        .unwrap()
        .iter()
        .find(|(name, _)| *name != "pinning")
        .expect("a device in vm.counters");
    for key in ["messages_sent", "messages_received"] {
        assert!(epf[key].as_u64() > Some(0), "{name}: {key}: {counters}");
    }
    for key in ["dma_read_bytes", "dma_write_bytes"] {
        assert_eq!(epf[key], 0, "{name}: {key}: {counters}");
    }
    assert_eq!(epf["dma_map_bytes"], 256u64 << 20, "{counters}");

    assert_eq!(call(&mut client, Endpoint::VmmShutdown).0, 204);
    let out = child.wait_with_output();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!socket.exists(), "the API socket outlived vmm");
    assert!(report.exists(), "no report after vmm.shutdown");
}

#[test]
fn a_path_that_is_not_a_socket_is_refused_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, b"keep me").unwrap();
    let out = vmm()
        .args(["run", "--user-device", "none", "--api-socket"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("--api-socket") && err.contains("not a socket"),
        "{err}"
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
}
