//! Interoperability: `vmm run` against a vfio-user server written elsewhere, the `gpio`
//! example of the crates.io package `vfio_user` (PCI 494f:0dc8, one 256-byte I/O BAR, INTx
//! only), built by `resources/interop/build-gpio.sh`. CI builds it and runs this test; see
//! docs/vfio-user.md.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::run_with_report;

/// The server binary: `$VMM_INTEROP_GPIO`, else `.interop/gpio` at the repository root.
fn gpio_server() -> Option<PathBuf> {
    let path = match std::env::var_os("VMM_INTEROP_GPIO") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.interop/gpio"),
    };
    if path.is_file() {
        Some(path)
    } else {
        eprintln!(
            "interop: no gpio server at {} (set VMM_INTEROP_GPIO or run \
             resources/interop/build-gpio.sh first)",
            path.display()
        );
        None
    }
}

/// The running server: killed and reaped when dropped, so a failing assertion leaves no
/// process behind.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the server on `socket`, once it listens; its log (env_logger, info) goes to `log`.
fn start(server: &PathBuf, socket: &std::path::Path, log: &std::path::Path) -> Server {
    let child = Server(
        Command::new(server)
            .arg("--socket-path")
            .arg(socket)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap(),
    );
    common::wait_for_socket(socket, "the gpio server");
    child
}

/// Waits at most a few seconds for the server to leave (it serves one client).
fn wait_exit(server: &mut Server) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = server.0.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
#[ignore = "needs the gpio server built by resources/interop/build-gpio.sh; .ci/run builds it and runs this test"]
fn the_vfio_user_crates_gpio_server_serves_vmm_run_and_the_probe_lists_it() {
    let Some(server) = gpio_server() else {
        panic!("the gpio server is missing (see the message above)");
    };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("gpio.sock");
    let log = dir.path().join("gpio.log");
    let mut child = start(&server, &socket, &log);
    // The default for 1 GiB and one CPU, with the function demanded instead of the epf
    // DMA test (the gpio function does no DMA).
    let cmdline = "probe.expect_mem=1023 probe.expect_cpus=1 probe.expect_pci=494f:0dc8";
    let (out, report) = run_with_report(&[
        "--user-device",
        socket.to_str().unwrap(),
        "--memory",
        "1G",
        "--cmdline",
        cmdline,
        "--timeout",
        "120",
    ]);
    let serial = common::stdout(&out);
    let stderr = common::stderr(&out);
    let status = wait_exit(&mut child);
    let server_log = std::fs::read_to_string(&log).unwrap_or_default();
    let all = format!("serial:\n{serial}\nvmm stderr:\n{stderr}\ngpio server:\n{server_log}");

    assert_eq!(out.status.code(), Some(0), "{all}");
    let line = serial
        .lines()
        .find(|l| l.starts_with("probe: pci ") && l.contains("494f:0dc8"))
        .unwrap_or_else(|| panic!("the probe did not list 494f:0dc8\n{all}"));
    // `bar2 io ADDR size 0x100`: placed in the PCI I/O window, not left at 0.
    let addr = line
        .split("bar2 io ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("its I/O BAR is not listed: {line}\n{all}"));
    assert_ne!(addr, "0x0", "BAR2 was left unplaced: {line}\n{all}");
    assert_eq!(report.unwrap()["pin"]["backend"], "vfio-user", "{all}");

    // What the server saw: all of guest RAM DMA-mapped with fds, INTx wired with its trigger
    // fd alone (the function is not maskable), and a clean disconnect it exits 0 on.
    let mapped: u64 = server_log
        .lines()
        .filter(|l| l.contains("dma_map ") && l.contains("memfd"))
        .filter_map(|l| {
            l.split("size = ")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    assert_eq!(mapped, 1 << 30, "{all}");
    let intx: Vec<&str> = server_log
        .lines()
        .filter(|l| l.contains("set_irqs index = 0") && l.contains("count = 1"))
        .collect();
    assert_eq!(intx.len(), 1, "{intx:?}\n{all}");
    assert!(intx[0].contains("flags = 36"), "{intx:?}");
    assert!(server_log.contains("Connection closed"), "{all}");
    let status = status.unwrap_or_else(|| panic!("the gpio server did not exit\n{all}"));
    assert!(status.success(), "{status}\n{all}");
}
