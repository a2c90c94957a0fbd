//! The probe guest with the pci-epf-test device served over vfio-user by `vmm device epf`,
//! through the real binary: the device's DMA reaches all of guest RAM because the pinning
//! engine mapped it, interrupts arrive, a hole in the map is a guest-visible failure, and a
//! dying or absent server is a clear error with nothing left behind.

use std::io::Read;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

mod common;
use common::{run_with_report, vmm};
use guest_abi::probe::{DMA_FAIL_PREFIX, DMA_OK_PREFIX, MSIX_PBA_OK_LINE, RESULT_FAIL_PREFIX};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The line the probe prints about DMA.
fn dma_line(serial: &str) -> &str {
    serial
        .lines()
        .find(|l| l.starts_with(DMA_OK_PREFIX) || l.starts_with(DMA_FAIL_PREFIX))
        .unwrap_or_else(|| panic!("no dma result line in:\n{serial}"))
}

/// No socket folder of `pid`'s epf server is left in the temp dir.
fn no_epf_leftovers(pid: u32) {
    let prefix = format!("vmm-{pid}-epf-");
    let left: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Starts `vmm run ARGS` with the probe hanging after its checks, in its own process group
/// (as a shell job is); returns the child once the guest has printed `dma ok`.
fn hanging_guest(args: &[&str]) -> std::process::Child {
    use std::os::unix::process::CommandExt;
    let mut child = vmm()
        .args([
            "run",
            "--cmdline",
            "probe.hang probe.expect_dma=1",
            "--quiet",
        ])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut serial = Vec::new();
    let mut buf = [0u8; 4096];
    while !text(&serial).contains("hanging (probe.hang)") {
        let n = stdout.read(&mut buf).unwrap();
        assert!(n > 0, "vmm ended early:\n{}", text(&serial));
        serial.extend_from_slice(&buf[..n]);
    }
    assert!(text(&serial).contains(DMA_OK_PREFIX), "{}", text(&serial));
    child
}

fn wait_exit(child: &mut std::process::Child) -> (Option<i32>, String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "vmm did not stop");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status.code(), err)
}

#[test]
fn ctrl_c_to_the_whole_job_is_a_clean_130_not_a_device_failure() {
    let mut child = hanging_guest(&[]);
    let pid = child.id();
    // What a terminal's Ctrl-C does: SIGINT to every process in the foreground group.
    // SAFETY: plain kill(2) of the process group we created.
    unsafe { libc::kill(-(pid as i32), libc::SIGINT) };
    let (code, err) = wait_exit(&mut child);
    assert_eq!(code, Some(130), "{err}");
    assert!(!err.contains("device failed"), "{err}");
    no_epf_leftovers(pid);
}

/// `vmm device epf --socket SOCKET`, once it listens.
fn external_epf_server(socket: &Path) -> std::process::Child {
    let server = vmm()
        .args(["device", "epf", "--socket"])
        .arg(socket)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    common::wait_for_socket(socket, "the epf server");
    server
}

#[test]
fn an_external_server_dying_mid_run_stops_vmm_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("ext.sock");
    let mut server = external_epf_server(&socket);
    let mut child = hanging_guest(&["--user-device", socket.to_str().unwrap()]);
    server.kill().unwrap();
    server.wait().unwrap();
    let (code, err) = wait_exit(&mut child);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("passthrough device failed") && err.contains("ext.sock"),
        "{err}"
    );
}

/// Boots `memory` of guest RAM with the default epf device; returns the serial output.
fn dma_ok_across_all_ram(memory: &str, bytes: u64, regions: usize) -> String {
    let (out, r) = common::run_with_report_logged(&["--memory", memory]);
    let (serial, err) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{serial}\n{err}");
    let line = dma_line(&serial);
    assert!(
        line.starts_with(&format!("{DMA_OK_PREFIX}{regions} regions,")) && line.ends_with("irq ok"),
        "{line}"
    );
    assert!(serial.contains("probe: pci 00:01.0 104c:b500"), "{serial}");
    let r = r.unwrap();
    let pin = &r["pin"];
    assert_eq!(pin["backend"], "vfio-user", "{r}");
    assert_eq!(
        pin["bytes"].as_u64(),
        Some(bytes),
        "the pin job covers exactly guest RAM: {r}"
    );
    assert!(pin["threads"].as_u64().unwrap() >= 1);
    assert!(pin["chunks"].as_u64().unwrap() >= 1);
    assert!(pin["decided_by"].is_string());
    let shmem = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
        .unwrap_or_default();
    let thp = ["[always]", "[within_size]", "[advise]", "[force]"]
        .iter()
        .any(|p| shmem.contains(p));
    assert_eq!(
        r["vm"]["backing"],
        if thp { "memfd-thp" } else { "memfd" },
        "--backing auto picks shareable RAM, with huge pages where the host allows: {r}"
    );
    assert_eq!(r["vm"]["devices"].as_array().unwrap().len(), 1, "{r}");
    // The server mapped exactly one region per chunk of the job, one file per shard, and
    // none is left: DMA that passed at the probe's pages says nothing of the pages between.
    let end = common::server_end_in(&err);
    let (maps, files, left) = common::server_counts(end);
    assert_eq!(maps, common::dma_maps_of(&r), "{end}\n{r}");
    assert_eq!(maps, pin["map"]["chunks"].as_u64().unwrap(), "{end}\n{r}");
    assert_eq!(
        files,
        r["vm"]["memory_shards"].as_u64().unwrap(),
        "{end}\n{r}"
    );
    assert_eq!(left, 0, "{end}");
    serial
}

#[test]
fn epf_dma_reaches_every_gib_of_a_1g_guest_and_its_interrupt_arrives() {
    // First free page and the last page (the one GiB's page is the first page).
    dma_ok_across_all_ram("1G", 1 << 30, 2);
}

#[test]
fn epf_dma_reaches_ram_above_4g_in_a_6g_guest() {
    // First page, a page in each GiB above the first (1, 2, 4, 5, 6 GiB: 3..4 GiB is the MMIO
    // hole) and the last page.
    let serial = dma_ok_across_all_ram("6G", 6 << 30, 7);
    assert!(
        serial.contains("0x1bffff000"),
        "the last page of RAM (above 4 GiB) is one of the DMA targets:\n{serial}"
    );
}

/// The probe masks MSI-X vector 0 (its entry's mask, then the function mask), has the device
/// raise it, and wants PBA bit 0 set and no interrupt, then one interrupt and the bit clear
/// once unmasked (resources/probe-guest/src/msix_pba.rs).
#[test]
fn a_vector_raised_while_masked_is_pending_and_arrives_once_unmasked() {
    let (out, _) = run_with_report(&["--quiet"]);
    let (serial, err) = (text(&out.stdout), text(&out.stderr));
    assert!(
        serial.lines().any(|l| l == MSIX_PBA_OK_LINE),
        "{serial}\n{err}"
    );
    assert_eq!(out.status.code(), Some(0), "{serial}\n{err}");
}

#[test]
fn a_page_left_out_of_the_dma_map_is_a_guest_visible_dma_failure() {
    // The last page of a 1 GiB guest is a DMA target; leave it unmapped.
    let (out, _) = run_with_report(&["--memory", "1G", "--test-dma-hole", "0x3ffff000", "--quiet"]);
    let serial = text(&out.stdout);
    let line = dma_line(&serial);
    assert!(line.starts_with(DMA_FAIL_PREFIX), "{line}");
    assert!(line.contains("3ffff000"), "names the page: {line}");
    assert_ne!(out.status.code(), Some(0), "{serial}");
    assert!(serial.contains(RESULT_FAIL_PREFIX), "{serial}");
}

#[test]
fn killing_the_device_server_mid_run_stops_vmm_with_a_clear_error() {
    let mut child = hanging_guest(&[]);
    let vmm_pid = child.id();
    let server = children_of(vmm_pid);
    assert_eq!(server.len(), 1, "one device server child: {server:?}");
    // SAFETY: plain kill(2) of the server process we just found.
    unsafe { libc::kill(server[0], libc::SIGKILL) };
    let (code, err) = wait_exit(&mut child);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("passthrough device failed"), "{err}");
    assert!(
        err.contains("signal 9") || err.contains("connection lost"),
        "says what happened to the server: {err}"
    );
    // The dead server's DMA regions went with its connection: the teardown's unmaps have
    // nothing to undo and must not report guest RAM as possibly left mapped.
    assert!(
        !err.contains("left something behind") && !err.contains("may remain mapped"),
        "a dead server's regions are gone, not left behind: {err}"
    );
    no_epf_leftovers(vmm_pid);
}

/// Process `pid`'s start time (field 22 of /proc/PID/stat) and state, if it exists.
fn stat(pid: u32) -> Option<(u64, char)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    Some((fields.get(19)?.parse().ok()?, state))
}

/// Entries in the temp dir that belong to run `pid`.
fn temp_entries(pid: u32) -> Vec<String> {
    let prefix = format!("vmm-{pid}-");
    std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&prefix))
        .collect()
}

/// Bound Unix sockets (from /proc/net/unix) whose path mentions run `pid`.
fn sockets_of(pid: u32) -> Vec<String> {
    let needle = format!("vmm-{pid}-");
    std::fs::read_to_string("/proc/net/unix")
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(7))
        .filter(|path| path.contains(&needle))
        .map(str::to_string)
        .collect()
}

#[test]
fn kill_9_of_vmm_run_leaves_no_folder_socket_or_process() {
    let mut child = common::paused_run("probe.hang probe.expect_dma=1", &[]);
    let pid = child.id();
    let servers = children_of(pid);
    assert_eq!(servers.len(), 1, "one device server child: {servers:?}");
    let server = servers[0] as u32;
    let cmdline = std::fs::read_to_string(format!("/proc/{server}/cmdline")).unwrap();
    assert!(cmdline.contains("epf"), "{cmdline:?}");
    let (started, _) = stat(server).expect("the server runs");

    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );

    // The server, now an orphan, must end by itself. Once it has exited it is a zombie until
    // its new parent reaps it (which this test does not control), so that counts as gone; a
    // new process with the same pid has another start time.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match stat(server) {
            Some((t, state)) if t == started && state != 'Z' && state != 'X' => {
                assert!(
                    Instant::now() < deadline,
                    "the device server (pid {server}) still runs 10 s after vmm was killed"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            _ => break,
        }
    }
    assert_eq!(
        temp_entries(pid),
        Vec::<String>::new(),
        "left in the temp dir"
    );
    assert_eq!(sockets_of(pid), Vec::<String>::new(), "sockets left bound");
}

/// Direct children of `pid` (of any of its threads), from /proc.
fn children_of(pid: u32) -> Vec<i32> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        out.extend(
            children
                .split_whitespace()
                .filter_map(|s| s.parse::<i32>().ok()),
        );
    }
    out
}

fn fails_with(args: &[&str], status: i32, needles: &[&str]) {
    let child = vmm()
        .arg("run")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(status), "{args:?}: {err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: want {n:?} in: {err}");
    }
    no_epf_leftovers(pid);
}

#[test]
fn bad_passthrough_input_is_a_clear_error_with_exit_status_2() {
    fails_with(
        &["--user-device", "/nonexistent/epf.sock"],
        2,
        &["/nonexistent/epf.sock", "start the device server first"],
    );
    fails_with(
        &["--user-device", "/etc/hostname"],
        2,
        &["/etc/hostname", "not a Unix socket"],
    );
    fails_with(
        &["--user-device", "epf", "--backing", "anon"],
        2,
        &["--backing anon", "shareable", "memfd"],
    );
    fails_with(
        &["--device", "/sys/bus/pci/devices/0000:ff:1f.7"],
        2,
        &["0000:ff:1f.7"],
    );
    fails_with(&["--pin", "type1"], 2, &["--pin type1"]);
    fails_with(
        &["--pin", "populate", "--user-device", "epf"],
        2,
        &["--pin populate", "--pin auto"],
    );
}

#[test]
fn a_socket_that_does_not_speak_vfio_user_is_refused_without_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bogus.sock");
    let listener = UnixListener::bind(&path).unwrap();
    // A "server" that answers every connection with garbage.
    let server = std::thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            use std::io::Write;
            let _ = s.write_all(&[0xff; 64]);
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    let started = Instant::now();
    fails_with(
        &["--user-device", path.to_str().unwrap()],
        2,
        &["bogus.sock"],
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    server.join().unwrap();
}

/// A socket whose server listens and never accepts, its queue of connections already full:
/// the listener and the connection that fills it.
fn never_accepting(path: &Path) -> (UnixListener, std::os::unix::net::UnixStream) {
    let listener = UnixListener::bind(path).unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
    // SAFETY: listen(2) on a socket we own, to shrink its backlog to one waiting connection.
    let ret = unsafe { libc::listen(fd, 0) };
    assert_eq!(ret, 0);
    let queued = std::os::unix::net::UnixStream::connect(path).unwrap();
    (listener, queued)
}

#[test]
fn a_server_that_never_accepts_is_a_clear_error_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("full.sock");
    let _server = never_accepting(&path);
    let started = Instant::now();
    fails_with(
        &["--user-device", path.to_str().unwrap()],
        2,
        &["full.sock", "accepted no connection", "alive and accepting"],
    );
    // The request timeout (10 s), not forever.
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[test]
fn ctrl_c_ends_the_wait_for_a_server_that_never_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("full.sock");
    let _server = never_accepting(&path);
    let child = vmm()
        .args(["run", "--user-device", path.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let sent = Instant::now();
    // SAFETY: a signal to the child we spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(
        sent.elapsed() < Duration::from_secs(2),
        "{:?}",
        sent.elapsed()
    );
    assert!(err.contains("full.sock") && err.contains("SIGINT"), "{err}");
}

#[test]
fn sigterm_ends_an_epf_server_whose_client_never_reads_within_a_second() {
    use devices::vfio_user::wire::{self, cmd, Capabilities, Header, Version};
    use std::io::{ErrorKind, Write};
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("unread.sock");
    let mut server = external_epf_server(&socket);
    let s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    let v = Version {
        major: wire::VERSION_MAJOR,
        minor: wire::VERSION_MINOR,
        json: Capabilities::ours().to_json(),
    }
    .encode();
    wire::send_message(&s, &Header::command(1, cmd::VERSION, v.len()), &v, &[]).unwrap();
    let reply = wire::recv_message(&s, wire::MAX_MESSAGE).unwrap();
    assert!(!reply.header.is_error());
    // Requests, and never a reply read, until the server stops reading too: it is stuck
    // sending (under its seccomp filter).
    s.set_write_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let one = Header::command(2, cmd::DEVICE_GET_INFO, 0).encode();
    let many: Vec<u8> = one.iter().copied().cycle().take(one.len() * 256).collect();
    let err = loop {
        if let Err(e) = (&s).write_all(&many) {
            break e;
        }
    };
    assert!(
        matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "{err}"
    );
    let sent = Instant::now();
    // SAFETY: a signal to the child we spawned.
    unsafe { libc::kill(server.id() as i32, libc::SIGTERM) };
    let status = loop {
        if let Some(status) = server.try_wait().unwrap() {
            break Some(status);
        }
        if sent.elapsed() > Duration::from_secs(5) {
            server.kill().unwrap();
            server.wait().unwrap();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let took = sent.elapsed();
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?} after {took:?}"
    );
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert!(!socket.exists(), "the server removed its socket");
}

#[test]
fn an_external_epf_server_serves_vmm_run_over_its_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("epf.sock");
    let mut server = external_epf_server(&socket);
    let (out, r) = run_with_report(&[
        "--user-device",
        socket.to_str().unwrap(),
        "--memory",
        "512M",
    ]);
    let serial = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{serial}\n{}",
        text(&out.stderr)
    );
    assert!(dma_line(&serial).ends_with("irq ok"), "{serial}");
    assert_eq!(r.unwrap()["pin"]["backend"], "vfio-user");
    // The server serves one client and exits when it leaves, removing its socket.
    let status = server.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(!socket.exists(), "the server removed its socket");
}

#[test]
fn a_server_dying_before_the_guest_runs_is_exit_2_with_nothing_left_behind() {
    let child = vmm()
        .args(["run", "--memory", "8G", "--quiet"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    // The kill point: vmm is pinning (its resident memory, the memfd being faulted in, has
    // grown past 256 MiB of 8 GiB) and the server, stopped, has served no DMA_MAP yet. The
    // job needs a reply to every DMA_MAP, so it cannot end before the kill: the guest cannot
    // run, and no chunk is mapped, so there is nothing to undo.
    let deadline = Instant::now() + Duration::from_secs(60);
    let server = loop {
        let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| pinning::procfs::kb_field(&s, "VmRSS"))
            .unwrap_or(0);
        if let (true, Some(&s)) = (rss > 256 << 20, children_of(pid).first()) {
            break s;
        }
        assert!(Instant::now() < deadline, "vmm never started pinning");
        std::thread::sleep(Duration::from_millis(1));
    };
    // SAFETY: plain kill(2) of the server process we just found.
    unsafe { libc::kill(server, libc::SIGSTOP) };
    while stat(server as u32).is_some_and(|(_, state)| state != 'T') {
        assert!(Instant::now() < deadline, "the server never stopped");
        std::thread::sleep(Duration::from_millis(1));
    }
    let mapped = common::guest_ram_bytes_mapped_by(server as u32);
    assert_eq!(mapped, 0, "the server had served a DMA_MAP before the kill");
    // SAFETY: as above.
    unsafe { libc::kill(server, libc::SIGKILL) };
    let out = child.wait_with_output().unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let last = err.lines().last().unwrap_or_default();
    let device = format!("vmm: the pci-epf-test server (`vmm device epf`, pid {server}): ");
    assert!(
        last.starts_with(&format!("{device}mapping guest RAM for DMA failed: "))
            && last.contains(": connection lost: the server closed the connection")
            && last.ends_with(", so nothing is left pinned"),
        "{err}"
    );
    assert!(
        !text(&out.stdout).contains("probe: hello"),
        "the guest must not have run"
    );
    no_epf_leftovers(pid);
}

#[test]
fn two_vfio_user_devices_get_all_ram_mapped_in_one_pin_job() {
    let (out, r) = run_with_report(&["--user-device", "epf", "--user-device", "epf"]);
    let serial = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{serial}\n{}",
        text(&out.stderr)
    );
    assert!(serial.contains("probe: pci 00:01.0 104c:b500"), "{serial}");
    assert!(serial.contains("probe: pci 00:02.0 104c:b500"), "{serial}");
    assert!(dma_line(&serial).ends_with("irq ok"), "{serial}");
    let r = r.unwrap();
    assert_eq!(r["vm"]["devices"].as_array().unwrap().len(), 2, "{r}");
    assert_eq!(r["pin"]["bytes"].as_u64(), Some(256 << 20), "{r}");
}
