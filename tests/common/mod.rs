//! Shared by the integration tests: the binary under test and what /proc says about it.
// Each test file uses a subset of these helpers.
#![allow(dead_code)]

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod api;
mod fault;
mod locked;
mod rss;
mod skip;
#[allow(unused_imports)] // each test file uses a subset, as with the rest of this module
pub use fault::{signal_once_waiting, undid_chunks, vmlck_after_undo_kb};
#[allow(unused_imports)]
pub use locked::{locked_bytes, wait_for_locked_memory};
#[allow(unused_imports)]
pub use rss::{assert_far_below_guest_size, output_with_max_rss};
#[allow(unused_imports)]
pub use skip::skip;

/// The `vmm` binary, with no stdin (the guest console must not wait on the test's terminal).
pub fn vmm() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vmm"));
    c.stdin(Stdio::null());
    c
}

/// Runs `vmm run ARGS --report FILE`; returns the output and the report, if one was written.
pub fn run_with_report(args: &[&str]) -> (std::process::Output, Option<serde_json::Value>) {
    run_with_report_by(vmm(), args)
}

/// [`run_with_report`] logging at info, so that stderr has the built-in epf server's last
/// line ([`server_end`]'s).
pub fn run_with_report_logged(args: &[&str]) -> (std::process::Output, Option<serde_json::Value>) {
    let mut c = vmm();
    c.env("RUST_LOG", "info");
    run_with_report_by(c, args)
}

fn run_with_report_by(
    mut vmm: Command,
    args: &[&str],
) -> (std::process::Output, Option<serde_json::Value>) {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.json");
    let out = vmm
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

/// `vmm device epf --socket SOCKET` logging at info, once it listens; its stderr is piped.
pub fn epf_server(socket: &Path) -> Child {
    let server = vmm()
        .args(["device", "epf", "--socket"])
        .arg(socket)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_socket(socket, "the epf server");
    server
}

/// Waits (at most 10 s) until `server` listens on `socket`.
pub fn wait_for_socket(socket: &Path, server: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "{server} never listened");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The server's last words: how much its client mapped, and what it left mapped.
pub fn server_end(mut server: Child) -> String {
    let status = server.wait().unwrap();
    let mut err = String::new();
    server
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "{status}: {err}");
    server_end_in(&err).to_string()
}

/// The server's last line in `log` (a server's or a `vmm run`'s stderr, logging at info).
pub fn server_end_in(log: &str) -> &str {
    log.lines()
        .find(|l| l.contains("DMA_MAP requests from"))
        .unwrap_or_else(|| panic!("the server did not report its mappings:\n{log}"))
}

/// The DMA_MAP requests a run whose report is `r` makes, one per chunk of its pin job: the
/// job cuts each shard of guest RAM (or, without shards, the one RAM range below 3 GiB) into
/// chunks of `chunk_size`, and no chunk spans two files.
pub fn dma_maps_of(r: &serde_json::Value) -> u64 {
    let vm = &r["vm"];
    let chunk = r["pin"]["map"]["chunk_size"]
        .as_u64()
        .expect("a chunk size");
    let (files, file_bytes) = match vm["memory_shards"].as_u64() {
        Some(n) if n > 0 => (n, vm["shard_bytes"].as_u64().expect("a shard size")),
        _ => (1, vm["memory_bytes"].as_u64().expect("a memory size")),
    };
    files * file_bytes.div_ceil(chunk)
}

/// What the server's last line counts: (DMA_MAP requests, files, regions still mapped), from
/// "...: N DMA_MAP requests from F files, R regions still mapped".
pub fn server_counts(end: &str) -> (u64, u64, u64) {
    let numbers: Vec<u64> = end
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    match numbers[..] {
        [.., maps, files, regions] => (maps, files, regions),
        _ => panic!("no counts in {end:?}"),
    }
}

/// Bytes of guest RAM process `pid` has mapped (the sizes of its memfd mappings).
pub fn guest_ram_bytes_mapped_by(pid: u32) -> u64 {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    maps.lines()
        .filter(|l| l.contains("memfd:vmm-guest-ram"))
        .filter_map(|l| {
            let (start, end) = l.split_whitespace().next()?.split_once('-')?;
            Some(u64::from_str_radix(end, 16).ok()? - u64::from_str_radix(start, 16).ok()?)
        })
        .sum()
}

/// Waits until process `pid` (a device server) has guest RAM mapped: it has served a DMA_MAP.
pub fn wait_for_guest_ram_mapped_by(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
        if maps.contains("memfd:vmm-guest-ram") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "process {pid} never mapped guest RAM"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Reads `child`'s stdout until the probe says it hangs (`probe.hang`), so the guest has run
/// every check before the test goes on; panics with what it printed if vmm ends first.
pub fn wait_until_hanging(child: &mut std::process::Child) {
    use std::io::Read;
    let mut out = child.stdout.take().expect("stdout piped");
    let (mut serial, mut buf) = (Vec::new(), [0u8; 4096]);
    while !String::from_utf8_lossy(&serial).contains("hanging (probe.hang)") {
        let n = out.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "vmm ended early:\n{}",
            String::from_utf8_lossy(&serial)
        );
        serial.extend_from_slice(&buf[..n]);
    }
}

/// `vmm run --quiet --cmdline CMDLINE ARGS`, where the command line has the probe hang once
/// its checks passed (`probe.hang`); returns once it hangs, stdout and stderr piped.
pub fn paused_run(cmdline: &str, args: &[&str]) -> Child {
    let mut child = vmm()
        .args(["run", "--quiet", "--cmdline", cmdline])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until_hanging(&mut child);
    child
}
