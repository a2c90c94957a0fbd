//! `vmm run` through the real binary with the probe guest: it boots, checks itself and
//! reports; the exit status, timeline report, signals and bad input behave as documented.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{
    assert_far_below_guest_size, epf_server, output_with_max_rss, run_with_report, server_counts,
    server_end, signal_once_waiting, stderr, stdout, undid_chunks, vmlck_after_undo_kb, vmm,
    wait_until_hanging,
};
use guest_abi::exit;
use guest_abi::probe::{RESULT_FAIL_PREFIX, RESULT_OK_LINE};

/// Boots the probe with `args` and a report, checks it passed, returns (serial, report).
fn boot_ok(args: &[&str]) -> (String, serde_json::Value) {
    let (out, report) = run_with_report(args);
    let serial = stdout(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "serial:\n{serial}\nstderr:\n{}",
        stderr(&out)
    );
    assert!(serial.contains(RESULT_OK_LINE), "{serial}");
    (serial, report.expect("a report"))
}

fn phase_names(report: &serde_json::Value) -> Vec<String> {
    report["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn probe_boots_with_one_cpu_and_256m_and_reports_every_phase() {
    let (serial, r) = boot_ok(&[]);
    assert!(serial.contains("probe: hello"), "{serial}");
    assert!(serial.contains("probe: cpus 1 (mp table)"), "{serial}");
    assert!(serial.contains("probe: ram 255 MiB"), "{serial}");
    // ACPI MCFG through the PVH start info, and every PCI function the same through ECAM.
    assert!(
        serial.contains("probe: ecam 0xfeb00000 buses 0-0 (mcfg)"),
        "{serial}"
    );
    assert_eq!(
        phase_names(&r),
        [
            "kvm",
            "memory",
            "devices",
            "pin",
            "placement",
            "load",
            "vcpus",
            "run",
            "exit"
        ]
    );
    let ready = r["guest"]["ready_ms"].as_f64().unwrap();
    let first = r["guest"]["first_output_ms"].as_f64().unwrap();
    assert!(ready > 0.0 && first > 0.0 && first <= ready, "{r}");
    assert!(r["total_ms"].as_f64().unwrap() >= ready);
    assert_eq!(r["exit_status"], 0);
    let mut last_end = 0.0;
    for p in r["phases"].as_array().unwrap() {
        let (s, e) = (
            p["start_ms"].as_f64().unwrap(),
            p["end_ms"].as_f64().unwrap(),
        );
        assert!(s >= last_end - 0.01 && e >= s, "phases out of order: {r}");
        last_end = e;
    }
}

#[test]
fn probe_boots_with_two_cpus_and_4g_with_ram_above_4g() {
    let (serial, r) = boot_ok(&["--memory", "4G", "--cpus", "2"]);
    assert!(serial.contains("probe: cpus 2 (mp table)"), "{serial}");
    assert!(
        serial.contains("probe: e820 0x0000000100000000-0x000000013fffffff ram"),
        "{serial}"
    );
    assert!(
        serial.contains("probe: ram 4095 MiB in 3 ranges, top 0x140000000"),
        "{serial}"
    );
    assert_eq!(r["vm"]["cpus"], 2);
    // The report gives the map the guest got (tests/linux.rs compares Linux's with it).
    let above_4g = serde_json::json!({"addr": 1u64 << 32, "size": 1u64 << 30, "kind": "ram"});
    assert!(
        r["vm"]["e820"].as_array().unwrap().contains(&above_4g),
        "{r}"
    );
}

#[test]
fn probe_boots_through_the_64_bit_linux_entry_too() {
    let (serial, _) = boot_ok(&["--boot-protocol", "linux64", "--cpus", "2"]);
    assert!(serial.contains("probe: hello (entry=linux64)"), "{serial}");
    // The RSDP through boot_params.acpi_rsdp_addr.
    assert!(
        serial.contains("probe: ecam 0xfeb00000 buses 0-0 (mcfg)"),
        "{serial}"
    );
    let (serial, _) = boot_ok(&["--boot-protocol", "pvh"]);
    assert!(serial.contains("probe: hello (entry=pvh)"), "{serial}");
}

#[test]
fn pinned_runs_report_the_job_over_exactly_guest_ram() {
    for pin in ["populate", "mlock"] {
        let (_, r) = boot_ok(&["--memory", "512M", "--pin", pin, "--pin-threads", "2"]);
        let p = &r["pin"];
        assert_eq!(p["backend"], pin, "{r}");
        assert_eq!(p["bytes"], 512u64 << 20);
        assert!(p["threads"].as_u64().unwrap() >= 1);
        assert!(p["decided_by"].is_string());
        assert!(p["elapsed_ms"].as_f64().is_some());
    }
}

#[test]
fn an_initrd_reaches_the_guest_intact() {
    let dir = tempfile::tempdir().unwrap();
    let initrd = dir.path().join("initrd.bin");
    let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let sum: u32 = data.iter().map(|&b| u32::from(b)).sum();
    std::fs::write(&initrd, &data).unwrap();
    let (serial, _) = boot_ok(&["--initrd", initrd.to_str().unwrap()]);
    let expected = format!("10000 bytes, sum {sum:#x}");
    assert!(
        serial.contains(&expected),
        "want `{expected}` in:\n{serial}"
    );
}

#[test]
fn the_guest_exit_status_passes_through() {
    let out = vmm()
        .args(["run", "--quiet", "--cmdline", "probe.expect_cpus=3"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(exit::CHECK_FAILED.into()),
        "{}",
        stdout(&out)
    );
    assert!(stdout(&out).contains(&format!("{RESULT_FAIL_PREFIX}expected 3 cpus, found 1")));
    let out = vmm()
        .args(["run", "--quiet", "--cmdline", "probe.fault"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(exit::EXCEPTION.into()),
        "{}",
        stdout(&out)
    );
    assert!(stdout(&out).contains("probe: exception 14 #PF"));
}

#[test]
fn sigint_stops_a_running_guest_with_status_130() {
    let mut child = vmm()
        .args(["run", "--cmdline", "probe.hang"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Signal once the probe says it hangs (a fixed wait is too short on a busy machine).
    wait_until_hanging(&mut child);
    // SAFETY: a pid we spawned and have not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("stopped by signal 2"),
        "{}",
        stderr(&out)
    );
}

/// SIGTERM mid-job, once some chunks are done and others not: `--test-fault wait-after-map=1`
/// holds the single pinning thread after its second map until the signal arrives.
#[test]
fn sigterm_during_pinning_undoes_it_with_status_143() {
    let child = vmm()
        .args([
            "run",
            "--memory",
            "2G",
            "--pin",
            "mlock",
            "--pin-threads",
            "1",
        ])
        .args(["--test-fault", "wait-after-map=1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (status, err, _) = signal_once_waiting(child, libc::SIGTERM);
    assert_eq!(status.code(), Some(143), "{err}");
    assert!(err.contains("pinning cancelled by SIGTERM"), "{err}");
    assert!(err.contains("nothing is left pinned"), "{err}");
    // Two maps done, so one or two whole chunks (a chunk may span pieces): work was undone.
    let undid = undid_chunks(&err).unwrap_or_else(|| panic!("no undo count: {err}"));
    assert!((1..=2).contains(&undid), "{err}");
    // Read while guest RAM was still mapped: only the undo (munlock) can have brought VmLck to
    // zero, not the unmap that follows (a_skipped_munlock_shows_in_the_reported_vmlck).
    assert!(
        err.contains("VmLck was 0 kB right after the undo, with guest RAM still mapped"),
        "{err}"
    );
}

/// What the "VmLck was 0 kB" checks rest on: the same failed pin reports the VmLck a skipped
/// munlock leaves, and 0 kB only with the munlock.
#[test]
fn a_skipped_munlock_shows_in_the_reported_vmlck() {
    let locked_after = |faults: &[&str]| {
        let out = vmm()
            .args(["run", "--quiet", "--user-device", "none", "--memory", "1G"])
            .args(["--pin", "mlock", "--pin-threads", "2"])
            .args(["--test-fault", "panic-on-map=3"])
            .args(faults)
            .output()
            .unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{err}");
        vmlck_after_undo_kb(&err).unwrap_or_else(|| panic!("no VmLck in {err}"))
    };
    assert_eq!(locked_after(&[]), 0);
    let skipped = locked_after(&["--test-fault", "skip-munlock"]);
    // mlock2 over all of guest RAM is what the munlock undoes.
    assert!(
        skipped >= 1 << 20,
        "VmLck {skipped} kB with the munlock skipped"
    );
}

/// SIGTERM once the server has mapped some of guest RAM (`--test-fault wait-after-map=1`):
/// every DMA_MAP it served is undone.
#[test]
fn sigterm_during_a_vfio_user_pin_leaves_the_server_nothing_mapped() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("epf.sock");
    let server = epf_server(&socket);
    let child = vmm()
        .args(["run", "--quiet", "--memory", "2G", "--pin-threads", "1"])
        .args(["--user-device", socket.to_str().unwrap()])
        .args(["--test-fault", "wait-after-map=1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (status, err, _) = signal_once_waiting(child, libc::SIGTERM);
    assert_eq!(status.code(), Some(143), "{err}");
    assert!(err.contains("pinning cancelled by SIGTERM"), "{err}");
    assert!(err.contains("nothing is left pinned"), "{err}");
    let undid = undid_chunks(&err).unwrap_or_else(|| panic!("no undo count: {err}"));
    assert!((1..=2).contains(&undid), "{err}");
    let end = server_end(server);
    let (maps, _, still_mapped) = server_counts(&end);
    assert_eq!(maps, 2, "the two maps before the signal: {end}");
    assert_eq!(still_mapped, 0, "{end}");
}

/// The vmm error line: the last line of stderr, after the panic message Rust prints.
fn last_line(err: &str) -> &str {
    err.lines().last().unwrap_or("")
}

#[test]
fn a_panic_while_pinning_is_undone_and_exits_1_naming_it() {
    // Locked memory: VmLck, read right after the undo, shows the munlock (the backend's end)
    // ran after the panic.
    let out = vmm()
        .args(["run", "--quiet", "--user-device", "none", "--memory", "1G"])
        .args(["--pin", "mlock", "--pin-threads", "2"])
        .args(["--test-fault", "panic-on-map=3"])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let line = last_line(&err);
    assert!(line.starts_with("vmm: "), "{err}");
    assert!(
        line.contains("a pinning thread panicked")
            && line.contains("injected by --test-fault panic-on-map=3")
            && line.contains("nothing is left pinned")
            && line.contains("VmLck was 0 kB right after the undo"),
        "{err}"
    );

    // DMA-mapped memory: the device server is left nothing mapped.
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("epf.sock");
    let server = epf_server(&socket);
    let out = vmm()
        .args(["run", "--quiet", "--memory", "2G", "--memory-shard", "256M"])
        .args(["--user-device", socket.to_str().unwrap()])
        .args(["--test-fault", "panic-on-map=4"])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    // The piece the panic struck never reached the server: its DMA_UNMAP is refused with
    // ENOENT, which says nothing was mapped there, not that something stayed.
    let line = last_line(&err);
    assert!(
        line.contains("injected by --test-fault panic-on-map=4")
            && line.contains(
                "1 of them as far as the panicking work had got), so nothing is left pinned"
            ),
        "{err}"
    );
    let end = server_end(server);
    let (maps, _, still_mapped) = server_counts(&end);
    assert!(maps >= 4, "{end}");
    assert_eq!(still_mapped, 0, "{end}");
}

/// A panic after the server has mapped the piece: the chunk that panicked is undone too, so
/// the server is left no region, on one pinning thread and on several.
#[test]
fn a_panic_after_a_dma_map_leaves_the_server_no_region() {
    for threads in ["1", "4"] {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("epf.sock");
        let server = epf_server(&socket);
        let out = vmm()
            .args(["run", "--quiet", "--memory", "2G", "--memory-shard", "256M"])
            .args(["--user-device", socket.to_str().unwrap()])
            .args(["--pin-threads", threads])
            .args(["--test-fault", "panic-after-map=4"])
            .output()
            .unwrap();
        let err = stderr(&out);
        let end = server_end(server);
        let (maps, _, still_mapped) = server_counts(&end);
        assert!(maps >= 5, "the panicking map reached the server: {end}");
        assert_eq!(still_mapped, 0, "{threads} threads: {end}\n{err}");
        assert_eq!(out.status.code(), Some(1), "{threads} threads: {err}");
        let line = last_line(&err);
        assert!(
            line.contains("a pinning thread panicked")
                && line.contains("injected by --test-fault panic-after-map=4")
                && line
                    .contains("as far as the panicking work had got), so nothing is left pinned"),
            "{threads} threads: {err}"
        );
    }
}

#[test]
fn undo_calls_that_fail_are_reported_with_status_1_never_as_nothing_left_pinned() {
    // At teardown: the guest passed, but the unmaps failed.
    let (out, report) = run_with_report(&[
        "--quiet",
        "--user-device",
        "none",
        "--pin",
        "populate",
        "--memory",
        "512M",
        "--test-fault",
        "fail-unmap",
    ]);
    let err = stderr(&out);
    assert!(stdout(&out).contains(RESULT_OK_LINE), "{}", stdout(&out));
    assert_eq!(out.status.code(), Some(1), "{err}");
    let line = last_line(&err);
    assert!(
        line.starts_with("vmm: tearing the VM down: undoing"),
        "{err}"
    );
    assert!(
        line.contains("(the first: unmap (--test-fault fail-unmap) of")
            && line.contains("so up to 536870912 bytes may remain mapped or locked"),
        "{err}"
    );
    let unpin = &report.expect("a report")["teardown"]["unpin"];
    assert_eq!(unpin["failed_bytes"], 512u64 << 20, "{unpin}");
    assert_eq!(unpin["failed"], unpin["chunks"], "{unpin}");

    // After a failed pin: the error says what may remain instead of "nothing is left pinned".
    let out = vmm()
        .args(["run", "--quiet", "--user-device", "none", "--memory", "1G"])
        .args(["--pin", "populate", "--pin-threads", "1"])
        .args([
            "--test-fault",
            "panic-on-map=2",
            "--test-fault",
            "fail-unmap",
        ])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let line = last_line(&err);
    assert!(!line.contains("nothing is left pinned"), "{err}");
    // The two completed chunks, and the piece whose map the panic struck: its unmap is tried
    // too, and refused.
    assert!(
        line.contains("3 undo calls failed") && line.contains("may remain mapped or locked"),
        "{err}"
    );
}

#[test]
fn a_timeout_stops_the_guest_with_status_124() {
    let started = Instant::now();
    let out = vmm()
        .args([
            "run",
            "--quiet",
            "--timeout",
            "1",
            "--cmdline",
            "probe.hang",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(124), "{}", stderr(&out));
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[test]
fn bad_input_is_one_clear_line_and_status_2() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk");
    std::fs::write(&junk, b"not a kernel at all").unwrap();
    let long = "a".repeat(5000);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--kernel", "/nonexistent/vmlinuz"],
            "/nonexistent/vmlinuz",
        ),
        (
            vec!["--kernel", junk.to_str().unwrap()],
            "neither an ELF vmlinux nor a bzImage",
        ),
        (
            vec!["--initrd", "/nonexistent/initrd"],
            "/nonexistent/initrd",
        ),
        (vec!["--memory", "16M"], "minimum"),
        (vec!["--memory", "100T"], "more than this host's RAM"),
        (vec!["--memory", "4Q"], "not a size"),
        (vec!["--cmdline", &long], "command line"),
        (vec!["--cpus", "0"], "--cpus"),
        (vec!["--cpus", "255"], "--cpus"),
        (vec!["--timeout", "0"], "--timeout"),
        (vec!["--timeout", "1e19"], "at most 31536000 (one year)"),
        (vec!["--timeout", "NaN"], "--timeout"),
        (vec!["--pin-threads", "5000"], "from 1 to 4096"),
        (
            vec!["--backing", "thp", "--memory", "257M"],
            "not a multiple",
        ),
    ];
    for (args, needle) in cases {
        let out = vmm().arg("run").args(&args).output().unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

/// Every input is checked before guest RAM is touched: with 8 GiB faulted in by
/// `--pin populate`, a bad input used to cost the whole populate before the kernel or initrd
/// was even opened. The child's peak RSS shows it, not the time it took.
#[test]
fn bad_input_with_8g_is_refused_before_any_memory_is_touched() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk");
    std::fs::write(&junk, b"not a kernel at all").unwrap();
    // Sparse: more than the RAM below the 32-bit hole, costing no disk.
    let huge_initrd = dir.path().join("initrd");
    std::fs::File::create(&huge_initrd)
        .unwrap()
        .set_len(4 << 30)
        .unwrap();
    let long = "a".repeat(5000);
    let report = dir.path().join("no/such/folder/report.json");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--kernel", "/nonexistent"], "cannot open /nonexistent"),
        (
            vec!["--kernel", junk.to_str().unwrap()],
            "neither an ELF vmlinux nor a bzImage",
        ),
        (
            vec!["--initrd", huge_initrd.to_str().unwrap()],
            "does not fit in guest memory",
        ),
        (vec!["--cmdline", &long], "shorten --cmdline"),
        (vec!["--timeout", "1e19"], "--timeout 10000000000000000000"),
        (
            vec!["--report", report.to_str().unwrap()],
            "its folder does not exist",
        ),
    ];
    for (args, needle) in cases {
        let (out, max_rss) = output_with_max_rss(
            vmm()
                .args(["run", "--memory", "8G", "--user-device", "none"])
                .args(["--pin", "populate"])
                .args(&args),
        );
        let err = stderr(&out);
        let what: String = format!("{args:?}").chars().take(60).collect();
        eprintln!(
            "{what}: exit {:?}, peak RSS {} MiB",
            out.status.code(),
            max_rss >> 20
        );
        assert_far_below_guest_size(max_rss, 8 << 30, &format!("{what}: {err}"));
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn kvm_permission_problem_is_a_clear_error() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return common::skip("root", "needs root to drop to an unprivileged user");
    }
    // nobody must be able to reach the binary: the checkout may sit in a private directory
    // (a 0700 temporary folder, a home), so run a copy from a world-readable folder.
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let exe = dir.path().join("vmm");
    std::fs::copy(env!("CARGO_BIN_EXE_vmm"), &exe).unwrap();
    let mut cmd = Command::new(&exe);
    cmd.args(["run", "--quiet"]).stdin(Stdio::null());
    // Drop to nobody: /dev/kvm is root:kvm 0660 on Debian, so opening it is refused. Where it
    // is world-accessible the VM simply boots, which the assertion also allows.
    // SAFETY: setgroups/setgid/setuid are async-signal-safe and only affect the child.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(65534) != 0
                || libc::setuid(65534) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    match out.status.code() {
        Some(2) => assert!(stderr(&out).contains("/dev/kvm"), "{}", stderr(&out)),
        Some(0) => assert!(stdout(&out).contains(RESULT_OK_LINE)),
        other => panic!("unexpected status {other:?}: {}", stderr(&out)),
    }
}
