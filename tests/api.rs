//! The machine API end to end: the real `vmm serve`, driven over its Unix socket by Debian's
//! curl and by the test's own client (raw bytes, for the requests a well-behaved client never
//! sends). The issue's "Done means" and "Bad input" lists, a test each.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::api::{alive, curl, read_response, EpfServer, Serve};

/// How long a probe guest may take from vm.boot to its exit, on a busy host.
const GUEST_WITHIN: Duration = Duration::from_secs(120);

/// A Cloud Hypervisor VmConfig for the probe guest with its command line and no device.
fn probe_config(cmdline: &str) -> String {
    format!(
        r#"{{"cpus": {{"boot_vcpus": 1, "max_vcpus": 1}}, "memory": {{"size": 268435456}},
            "payload": {{"cmdline": "{cmdline}"}}, "serial": {{"mode": "Tty"}},
            "console": {{"mode": "Off"}}}}"#
    )
}

/// The probe's hanging line, on serve's stdout (its children's serial output).
fn wait_until_hanging(serve: &mut Serve) {
    common::wait_until_hanging(&mut serve.child);
}

/// Asserts `(status, body)` is a `status` with a JSON error that names each of `words`.
fn assert_error(reply: &(u16, String), status: u16, words: &[&str]) {
    assert_eq!(reply.0, status, "{}", reply.1);
    let v: serde_json::Value =
        serde_json::from_str(&reply.1).unwrap_or_else(|e| panic!("{e}: {}", reply.1));
    let msg = v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error: {v}"));
    for w in words {
        assert!(msg.contains(w), "{msg:?} does not name {w:?}");
    }
}

#[test]
fn an_epf_vm_from_ch_json_boots_the_probe_to_shutdown_with_its_report() {
    let serve = Serve::start(&[]);
    let epf_socket = serve.dir.path().join("epf.sock");
    let epf = EpfServer::start(&epf_socket);
    let config = format!(
        r#"{{"cpus": {{"boot_vcpus": 2, "max_vcpus": 2}}, "memory": {{"size": 536870912}},
            "user_devices": [{{"socket": "{}"}}], "serial": {{"mode": "Tty"}}}}"#,
        epf_socket.display()
    );
    // Through Debian's curl.
    assert_eq!(
        curl(&serve.socket, "PUT", "vm.create", Some(&config)).0,
        204
    );
    let (status, body) = curl(&serve.socket, "GET", "vm.info", None);
    assert_eq!(status, 200, "{body}");
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(info["state"], "Created", "{info:#}");
    assert_eq!(info["config"]["cpus"]["boot_vcpus"], 2, "{info:#}");
    assert_eq!(info["memory_actual_size"], 536870912u64, "{info:#}");
    let boot = curl(&serve.socket, "PUT", "vm.boot", None);
    assert_eq!(boot.0, 204, "{}", boot.1);

    let info = serve.wait_for_state("Shutdown", GUEST_WITHIN);
    let vmm = &info["vmm"];
    assert_eq!(vmm["exit_status"], 0, "{info:#}");
    assert_eq!(vmm["error"], serde_json::Value::Null, "{info:#}");
    let report = &vmm["report"];
    assert_eq!(report["exit_status"], 0, "{report:#}");
    assert!(
        report["outcome"].as_str().is_some_and(|o| !o.is_empty()),
        "{report:#}"
    );
    assert_eq!(vmm["outcome"], report["outcome"], "{info:#}");
    assert_eq!(report["pin"]["bytes"], 536870912u64, "{report:#}");
    let phases: Vec<&str> = report["phases"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    for want in [
        "kvm", "memory", "devices", "pin", "load", "vcpus", "run", "exit",
    ] {
        assert!(phases.contains(&want), "no {want} phase in {phases:?}");
    }
    // The server saw every mapping undone.
    let (_, _, still_mapped) = common::server_counts(&epf.end());
    assert_eq!(still_mapped, 0);
    // The config vm.info shows is serve's, the one the client sent.
    assert_eq!(
        info["config"]["user_devices"][0]["socket"],
        epf_socket.to_str().unwrap()
    );
}

#[test]
fn a_hanging_vm_is_paused_resumed_and_shut_down() {
    let mut serve = Serve::start(&[]);
    serve.put("vm.create", Some(&probe_config("probe.hang")));
    serve.put("vm.boot", None);
    wait_until_hanging(&mut serve);
    // The VM's process answers vm.info: its stage; the config is serve's.
    let info = serve.get("vm.info");
    assert_eq!(info["state"], "Running", "{info:#}");
    assert_eq!(info["vmm"]["phase"], "run", "{info:#}");
    assert_eq!(
        info["config"]["payload"]["cmdline"], "probe.hang",
        "{info:#}"
    );
    serve.put("vm.pause", None);
    assert_eq!(serve.state(), "Paused");
    // Paused twice is the wrong state, and the VM stays paused.
    assert_error(&serve.call("PUT", "vm.pause", None), 409, &["paused"]);
    serve.put("vm.resume", None);
    assert_eq!(serve.state(), "Running");
    assert_error(&serve.call("PUT", "vm.resume", None), 409, &["paused"]);
    let counters = serve.get("vm.counters");
    assert!(counters["pinning"].is_object(), "{counters:#}");
    serve.put("vm.shutdown", None);
    let info = serve.get("vm.info");
    assert_eq!(info["state"], "Shutdown", "{info:#}");
    assert!(info["vmm"]["exit_status"].is_i64(), "{info:#}");
    assert!(info["vmm"]["report"].is_object(), "{info:#}");
    assert!(serve.children().is_empty(), "{:?}", serve.children());
    serve.assert_alive();
}

#[test]
fn a_paused_guest_writes_nothing_and_writes_again_after_resume() {
    let serve = Serve::start(&[]);
    let log = serve.dir.path().join("serial.log");
    let config = format!(
        r#"{{"payload": {{"cmdline": "probe.flood"}},
            "serial": {{"mode": "File", "file": "{}"}}}}"#,
        log.display()
    );
    serve.put("vm.create", Some(&config));
    serve.put("vm.boot", None);
    let size = || std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
    let deadline = Instant::now() + GUEST_WITHIN;
    while size() < 4096 {
        assert!(Instant::now() < deadline, "the guest never flooded its log");
        std::thread::sleep(Duration::from_millis(20));
    }
    serve.put("vm.pause", None);
    // What the serial ring held when the vCPUs stopped may still reach the file.
    std::thread::sleep(Duration::from_millis(300));
    let paused = size();
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(size(), paused, "the log grew while the VM was paused");
    serve.put("vm.resume", None);
    let deadline = Instant::now() + Duration::from_secs(30);
    while size() <= paused {
        assert!(
            Instant::now() < deadline,
            "the log did not grow after resume"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    serve.put("vm.shutdown", None);
    assert_eq!(serve.state(), "Shutdown");
}

/// A multi-second start-up is visibly alive: while the VM's RAM is mapped for its device,
/// vm.info (through serve) shows the pin stage and its progress.
#[test]
fn pinning_progress_shows_in_vm_info() {
    let mut serve = Serve::start(&[]);
    let epf_socket = serve.dir.path().join("epf.sock");
    let _epf = EpfServer::start(&epf_socket);
    let gib = 1u64 << 30;
    let config = format!(
        r#"{{"memory": {{"size": {gib}}}, "payload": {{"cmdline": "probe.hang"}},
            "user_devices": [{{"socket": "{}"}}], "vmm": {{"pin_threads": 1}}}}"#,
        epf_socket.display()
    );
    serve.put("vm.create", Some(&config));
    serve.put("vm.boot", None);
    let (mut phases, mut progress) = (Vec::new(), Vec::new());
    let deadline = Instant::now() + GUEST_WITHIN;
    loop {
        let info = serve.get("vm.info");
        let vmm = &info["vmm"];
        let phase = vmm["phase"].as_str().unwrap_or("null").to_string();
        if phase == "pin" && vmm["progress"].is_object() {
            progress.push(vmm["progress"].clone());
        }
        if phases.last() != Some(&phase) {
            phases.push(phase.clone());
        }
        if phase == "run" {
            break;
        }
        assert!(Instant::now() < deadline, "never ran: {phases:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(phases.contains(&"pin".to_string()), "{phases:?}");
    let p = progress
        .first()
        .unwrap_or_else(|| panic!("no progress while pinning: {phases:?}"));
    assert_eq!(p["bytes_total"], gib, "{p}");
    assert!(p["bytes_done"].as_u64().unwrap() <= gib, "{p}");
    wait_until_hanging(&mut serve);
    serve.put("vmm.shutdown", None);
    assert_eq!(serve.wait_exit().0.code(), Some(0));
}

/// Boots a VM with an external epf server whose guest hangs; returns the VM's pid.
fn boot_hanging_epf_vm(serve: &mut Serve, epf_socket: &std::path::Path, epf: u32) -> u32 {
    let config = format!(
        r#"{{"payload": {{"cmdline": "probe.hang probe.expect_dma=1"}},
            "user_devices": [{{"socket": "{}"}}]}}"#,
        epf_socket.display()
    );
    serve.put("vm.create", Some(&config));
    serve.put("vm.boot", None);
    wait_until_hanging(serve);
    let children = serve.children();
    assert_eq!(children.len(), 1, "{children:?}");
    // The device server has guest RAM mapped: what must be undone at the end.
    assert!(common::guest_ram_bytes_mapped_by(epf) > 0);
    children[0]
}

/// After serve ended: its socket, the VM's process and private folder are gone, and the
/// device server had every mapping undone.
fn assert_nothing_left(serve: &Serve, vm: u32, epf: EpfServer) {
    assert!(!serve.socket.exists(), "the API socket is left");
    assert!(!alive(vm), "the VM's process {vm} is left");
    let left: Vec<_> = std::fs::read_dir(serve.run_dir())
        .unwrap()
        .flatten()
        .collect();
    assert!(left.is_empty(), "private folders left: {left:?}");
    let (_, _, still_mapped) = common::server_counts(&epf.end());
    assert_eq!(still_mapped, 0, "guest RAM left mapped for the device");
}

/// What a SIGKILLed serve could not remove, the next one does: the private folder of a serve
/// whose process is gone goes at start; one of a process that still runs stays.
#[test]
fn a_new_serve_removes_the_private_folders_a_killed_one_left() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    let left = run.join(format!("vmm-serve-{dead}-0"));
    let live = run.join(format!("vmm-serve-{}-0", std::process::id()));
    for d in [&left, &live] {
        std::fs::create_dir_all(d).unwrap();
        std::fs::write(d.join("report.json"), "{}").unwrap();
    }
    let socket = dir.path().join("api.sock");
    let mut serve = common::vmm()
        .args(["serve", "--api-socket"])
        .arg(&socket)
        .env("XDG_RUNTIME_DIR", &run)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while curl(&socket, "GET", "vmm.ping", None).0 != 200 {
        assert!(Instant::now() < deadline, "vmm serve never answered");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!left.exists(), "{} was left", left.display());
    assert!(
        live.exists(),
        "{} belongs to a live process",
        live.display()
    );
    assert_eq!(curl(&socket, "PUT", "vmm.shutdown", None).0, 204);
    assert!(serve.wait().unwrap().success());
}

#[test]
fn vmm_shutdown_ends_serve_with_nothing_left() {
    let mut serve = Serve::start(&[]);
    let epf_socket = serve.dir.path().join("epf.sock");
    let epf = EpfServer::start(&epf_socket);
    let vm = boot_hanging_epf_vm(&mut serve, &epf_socket, epf.id());
    assert!(serve.run_dir().read_dir().unwrap().next().is_some());
    assert_eq!(curl(&serve.socket, "PUT", "vmm.shutdown", None).0, 204);
    let (status, err) = serve.wait_exit();
    assert_eq!(status.code(), Some(0), "{err}");
    assert_nothing_left(&serve, vm, epf);
}

#[test]
fn sigterm_to_serve_shuts_the_vm_down_with_nothing_left() {
    let mut serve = Serve::start(&[]);
    let epf_socket = serve.dir.path().join("epf.sock");
    let epf = EpfServer::start(&epf_socket);
    let vm = boot_hanging_epf_vm(&mut serve, &epf_socket, epf.id());
    // SAFETY: a pid we spawned and have not reaped.
    unsafe { libc::kill(serve.child.id() as i32, libc::SIGTERM) };
    let (status, err) = serve.wait_exit();
    assert_eq!(status.code(), Some(143), "{err}");
    assert_nothing_left(&serve, vm, epf);
}

#[test]
fn a_vm_that_cannot_start_is_shutdown_with_its_error() {
    let serve = Serve::start(&[]);
    let missing = serve.dir.path().join("no-server.sock");
    let config = format!(
        r#"{{"user_devices": [{{"socket": "{}"}}]}}"#,
        missing.display()
    );
    serve.put("vm.create", Some(&config));
    serve.put("vm.boot", None);
    let info = serve.wait_for_state("Shutdown", GUEST_WITHIN);
    assert_eq!(info["vmm"]["exit_status"], 2, "{info:#}");
    let error = info["vmm"]["error"].as_str().unwrap_or_default();
    assert!(error.contains(missing.to_str().unwrap()), "{info:#}");
    assert!(serve.children().is_empty());
    serve.assert_alive();
}

#[test]
fn a_vm_process_killed_from_outside_is_shutdown_with_128_plus_the_signal() {
    let mut serve = Serve::start(&[]);
    serve.put("vm.create", Some(&probe_config("probe.hang")));
    serve.put("vm.boot", None);
    wait_until_hanging(&mut serve);
    let vm = serve.children();
    assert_eq!(vm.len(), 1, "{vm:?}");
    // SAFETY: kill(2) on a process of this test's; the worst a stale pid can get is SIGKILL.
    unsafe { libc::kill(vm[0] as i32, libc::SIGKILL) };
    // At once, or once serve has seen it go.
    let info = serve.wait_for_state("Shutdown", Duration::from_secs(10));
    assert_eq!(info["vmm"]["exit_status"], 128 + 9, "{info:#}");
    assert_error(&serve.call("PUT", "vm.pause", None), 409, &["Shutdown"]);
    serve.put("vm.delete", None);
    serve.assert_alive();
}

/// `vmm.seccomp` in the config is the VM's level, in place of serve's own.
#[test]
fn the_configs_seccomp_level_is_the_vms() {
    let serve = Serve::start(&[]);
    let config = r#"{"vmm": {"seccomp": "log"}}"#;
    serve.put("vm.create", Some(config));
    serve.put("vm.boot", None);
    let info = serve.wait_for_state("Shutdown", GUEST_WITHIN);
    assert_eq!(info["vmm"]["exit_status"], 0, "{info:#}");
}

/// The `Seccomp:` mode of process `pid`'s main thread.
fn seccomp_mode(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Seccomp:")).unwrap();
    line.split_whitespace().nth(1).unwrap().to_string()
}

/// A VM's process runs under serve's --seccomp unless its config's `vmm.seccomp` says
/// otherwise: seen in /proc, once its guest runs (a config that always carried a level of its
/// own, whatever the client sent, once made serve's --seccomp reach no VM).
#[test]
fn a_vm_runs_under_serves_seccomp_level_unless_its_config_names_one() {
    let serve = Serve::start(&["--seccomp", "off"]);
    let own = r#"{"payload": {"cmdline": "probe.hang"}, "vmm": {"seccomp": "on"}}"#;
    for (config, mode) in [(probe_config("probe.hang"), "0"), (own.to_string(), "2")] {
        serve.put("vm.create", Some(&config));
        serve.put("vm.boot", None);
        let deadline = Instant::now() + GUEST_WITHIN;
        while serve.get("vm.info")["vmm"]["phase"] != "run" {
            assert!(Instant::now() < deadline, "the guest never ran");
            std::thread::sleep(Duration::from_millis(10));
        }
        // Every thread is filtered before the guest's first instruction; the probe takes
        // longer than this to reach its hang (so a mode 0 here stays 0).
        std::thread::sleep(Duration::from_secs(1));
        let vms = serve.children();
        assert_eq!(vms.len(), 1, "one VM process: {vms:?}");
        assert_eq!(seccomp_mode(vms[0]), mode, "{config}");
        serve.put("vm.delete", None);
    }
}

/// A FIFO named as the kernel is refused at once (opening it for its headers would wait for a
/// writer, and with it every request after this one).
#[test]
fn a_fifo_as_the_kernel_is_refused_without_waiting() {
    let serve = Serve::start(&[]);
    let fifo = serve.dir.path().join("kernel.fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo reads the NUL-terminated path only.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let config = format!(r#"{{"payload": {{"kernel": "{}"}}}}"#, fifo.display());
    let started = Instant::now();
    let (status, body) = serve.call("PUT", "vm.create", Some(&config));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("not a regular file"), "{body}");
    assert!(started.elapsed() < Duration::from_secs(10));
    serve.assert_alive();
}

/// serve killed outright cannot clean up: the VM's death signal (SIGTERM) makes it undo
/// its own pinning and exit.
#[test]
fn a_killed_serve_leaves_no_vm_behind() {
    let mut serve = Serve::start(&[]);
    let epf_socket = serve.dir.path().join("epf.sock");
    let epf = EpfServer::start(&epf_socket);
    let vm = boot_hanging_epf_vm(&mut serve, &epf_socket, epf.id());
    serve.child.kill().unwrap();
    serve.child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while alive(vm) {
        assert!(
            Instant::now() < deadline,
            "the VM's process {vm} outlived serve"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let (_, _, still_mapped) = common::server_counts(&epf.end());
    assert_eq!(still_mapped, 0, "guest RAM left mapped for the device");
}

#[test]
fn a_vm_is_created_again_after_delete_and_boots_again() {
    let serve = Serve::start(&[]);
    for _ in 0..2 {
        serve.put("vm.create", Some(&probe_config("")));
        serve.put("vm.boot", None);
        let info = serve.wait_for_state("Shutdown", GUEST_WITHIN);
        assert_eq!(info["vmm"]["exit_status"], 0, "{info:#}");
        // As Cloud Hypervisor: a VM shut down boots again.
        serve.put("vm.boot", None);
        let info = serve.wait_for_state("Shutdown", GUEST_WITHIN);
        assert_eq!(info["vmm"]["exit_status"], 0, "{info:#}");
        serve.put("vm.delete", None);
        assert_error(
            &serve.call("GET", "vm.info", None),
            404,
            &["vm.info", "vm.create"],
        );
    }
    assert!(serve.run_dir().read_dir().unwrap().next().is_none());
}

#[test]
fn reboot_starts_a_fresh_process_from_the_same_config() {
    let mut serve = Serve::start(&[]);
    serve.put("vm.create", Some(&probe_config("probe.hang")));
    serve.put("vm.boot", None);
    wait_until_hanging(&mut serve);
    let first = serve.children();
    serve.put("vm.reboot", None);
    assert_eq!(serve.state(), "Running");
    let second = serve.children();
    assert_eq!(second.len(), 1, "{second:?}");
    assert_ne!(first, second);
    assert!(
        !first.iter().any(|&p| alive(p)),
        "the first VM's process is left"
    );
    serve.put("vm.delete", None);
    assert!(serve.children().is_empty());
}

#[test]
fn the_socket_is_owner_only() {
    let serve = Serve::start(&[]);
    let mode = std::fs::metadata(&serve.socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
}

#[test]
fn a_second_serve_on_a_live_socket_is_refused() {
    let serve = Serve::start(&[]);
    let out = common::vmm()
        .arg("serve")
        .arg("--api-socket")
        .arg(&serve.socket)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", common::stderr(&out));
    assert!(common::stderr(&out).contains(serve.socket.to_str().unwrap()));
    serve.assert_alive();
}

// Bad input: each a 4xx naming the input, the VMM unharmed.

#[test]
fn disks_in_vm_create_is_refused_naming_it() {
    let serve = Serve::start(&[]);
    let body = r#"{"memory": {"size": 268435456}, "disks": [{"path": "/tmp/disk.img"}]}"#;
    let reply = curl(&serve.socket, "PUT", "vm.create", Some(body));
    assert_error(&reply, 400, &["disks"]);
    assert_error(&serve.call("GET", "vm.info", None), 404, &["vm.info"]);
    serve.assert_alive();
}

#[test]
fn vm_boot_before_vm_create_is_refused() {
    let serve = Serve::start(&[]);
    assert_error(
        &serve.call("PUT", "vm.boot", None),
        404,
        &["vm.boot", "vm.create"],
    );
    assert_error(
        &serve.call("PUT", "vm.pause", None),
        404,
        &["vm.pause", "vm.create"],
    );
    assert_error(
        &serve.call("GET", "vm.counters", None),
        404,
        &["vm.counters"],
    );
    serve.assert_alive();
}

#[test]
fn vm_create_twice_is_refused() {
    let serve = Serve::start(&[]);
    serve.put("vm.create", Some(&probe_config("")));
    assert_error(
        &serve.call("PUT", "vm.create", Some(&probe_config(""))),
        409,
        &["vm.create", "vm.delete"],
    );
    assert_eq!(serve.state(), "Created");
    serve.assert_alive();
}

#[test]
fn vm_pause_when_not_running_is_refused() {
    let serve = Serve::start(&[]);
    serve.put("vm.create", Some(&probe_config("")));
    for name in ["vm.pause", "vm.resume", "vm.shutdown", "vm.reboot"] {
        assert_error(
            &serve.call("PUT", name, None),
            409,
            &[name, "Created", "vm.boot"],
        );
    }
    assert_eq!(serve.state(), "Created");
    serve.assert_alive();
}

#[test]
fn malformed_json_is_refused() {
    let serve = Serve::start(&[]);
    assert_error(
        &serve.call("PUT", "vm.create", Some(r#"{"cpus": "#)),
        400,
        &["vm.create"],
    );
    assert_error(
        &serve.call("PUT", "vm.create", Some("[1, 2]")),
        400,
        &["vm.create"],
    );
    serve.assert_alive();
}

#[test]
fn wrong_types_are_refused_naming_the_section() {
    let serve = Serve::start(&[]);
    let body = r#"{"cpus": {"boot_vcpus": "two"}}"#;
    // The section and the value: serde's error names the section, not the field in it.
    let reply = serve.call("PUT", "vm.create", Some(body));
    assert_error(&reply, 400, &["cpus", "two"]);
    serve.assert_alive();
}

#[test]
fn negative_and_absurd_sizes_are_refused() {
    let serve = Serve::start(&[]);
    // Not a u64, zero, past what a size can be, more than the host has.
    for size in [
        "-1",
        "1e300",
        "0",
        "18446744073709551615",
        "1099511627776000",
    ] {
        let body = format!(r#"{{"memory": {{"size": {size}}}}}"#);
        assert_error(
            &serve.call("PUT", "vm.create", Some(&body)),
            400,
            &["memory"],
        );
        assert_error(&serve.call("GET", "vm.info", None), 404, &["vm.info"]);
    }
    serve.assert_alive();
}

#[test]
fn unknown_fields_are_refused_naming_them() {
    let serve = Serve::start(&[]);
    let body = r#"{"memory": {"sizee": 268435456}}"#;
    assert_error(
        &serve.call("PUT", "vm.create", Some(body)),
        400,
        &["memory.sizee"],
    );
    serve.assert_alive();
}

#[test]
fn a_body_on_a_request_that_takes_none_is_refused() {
    let serve = Serve::start(&[]);
    serve.put("vm.create", Some(&probe_config("")));
    assert_error(
        &serve.call("PUT", "vm.boot", Some("{}")),
        400,
        &["vm.boot", "no body"],
    );
    assert_eq!(serve.state(), "Created");
}

#[test]
fn a_body_larger_than_the_limit_is_refused() {
    let serve = Serve::start(&[]);
    let mut s = UnixStream::connect(&serve.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let len = 16 << 20;
    let head = format!(
        "PUT /api/v1/vm.create HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).unwrap();
    // The server may answer before it has read the body, and close: a failed write is fine.
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&vec![b' '; len]);
    });
    let reply = read_response(&mut s).expect("a response");
    drop(s);
    writer.join().unwrap();
    assert_error(&reply, 413, &[]);
    serve.assert_alive();
}

#[test]
fn headers_that_never_finish_get_408_while_others_are_served() {
    let serve = Serve::start(&[]);
    let mut slow = UnixStream::connect(&serve.socket).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    slow.write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: loc")
        .unwrap();
    let started = Instant::now();
    // Others are answered meanwhile.
    for _ in 0..5 {
        serve.assert_alive();
    }
    assert!(started.elapsed() < Duration::from_secs(2));
    let reply = read_response(&mut slow).expect("a response");
    assert_error(&reply, 408, &[]);
    serve.assert_alive();
}

#[test]
fn wrong_method_and_unknown_path_are_refused() {
    let serve = Serve::start(&[]);
    assert_eq!(serve.call("GET", "vm.create", None).0, 405);
    assert_eq!(serve.call("PUT", "vm.nosuch", None).0, 404);
    serve.assert_alive();
}

#[test]
fn another_users_connection_is_refused() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return common::skip(
            "root",
            "connecting as another user needs root to switch users",
        );
    }
    let serve = Serve::start(&[]);
    // Let the other user reach the socket file: the peer check is what must refuse it.
    std::fs::set_permissions(serve.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&serve.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let nobody = 65534;
    let out = {
        use std::os::unix::process::CommandExt;
        std::process::Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "10",
                "-w",
                "\n%{http_code}",
                "--unix-socket",
            ])
            .arg(&serve.socket)
            .arg("http://localhost/api/v1/vmm.ping")
            .uid(nobody)
            .gid(nobody)
            .output()
            .unwrap()
    };
    let text = common::stdout(&out);
    let code = text.rsplit('\n').next().unwrap_or("").trim().to_string();
    assert!(
        code == "000" || code.starts_with('4'),
        "another user got {code}: {text}{}",
        common::stderr(&out)
    );
    assert!(!text.contains("build_version"), "{text}");
    serve.assert_alive();
}
