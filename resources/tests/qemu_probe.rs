//! Boots the probe guest under QEMU through its PVH entry and checks what it reports.
//!
//! Needs `qemu-system-x86_64` (Debian: `qemu-system-x86`, 7.2 or later) and `/dev/kvm`; set
//! `PROBE_QEMU_ACCEL=tcg` to run without KVM. Run with
//! `cargo test -p vmm-resources --test qemu_probe -- --ignored`.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use guest_abi::exit;
use guest_abi::ports::DEBUG_EXIT;
use guest_abi::probe::{LINE_PREFIX, RESULT_FAIL_PREFIX, RESULT_OK_LINE};
use vmm_resources::PROBE_GUEST;

const NEEDS: &str = "needs qemu-system-x86_64 and /dev/kvm (or PROBE_QEMU_ACCEL=tcg)";

/// QEMU's exit code when the probe wrote `status` to its `isa-debug-exit` device.
fn qemu_code(status: u8) -> Option<i32> {
    Some(i32::from(status) << 1 | 1)
}

struct Run {
    /// QEMU's exit code.
    code: Option<i32>,
    serial: String,
}

impl Run {
    fn lines(&self) -> Vec<&str> {
        self.serial
            .lines()
            .filter(|l| l.starts_with(LINE_PREFIX))
            .collect()
    }

    fn has(&self, line: &str) -> bool {
        self.lines().contains(&line)
    }

    fn line_starting(&self, prefix: &str) -> &str {
        let found = self.lines().into_iter().find(|l| l.starts_with(prefix));
        found.unwrap_or_else(|| panic!("no line starting {prefix:?} in:\n{}", self.serial))
    }
}

fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
    let path = std::env::temp_dir().join(format!("vmm-resources-{}-{name}", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    path
}

fn boot(name: &str, qemu_args: &[&str], append: &str, initrd: Option<&[u8]>) -> Run {
    let kernel = temp_file(&format!("{name}.elf"), PROBE_GUEST);
    let accel = std::env::var("PROBE_QEMU_ACCEL").unwrap_or_else(|_| "kvm".into());
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-accel", &accel, "-display", "none", "-serial", "stdio", "-monitor", "none",
    ])
    .args(["-no-reboot", "-device"])
    .arg(format!("isa-debug-exit,iobase={DEBUG_EXIT:#x},iosize=0x01"))
    .arg("-kernel")
    .arg(&kernel)
    .args(["-append", append])
    .args(qemu_args);
    let initrd_path = initrd.map(|bytes| temp_file(&format!("{name}.initrd"), bytes));
    if let Some(path) = &initrd_path {
        cmd.arg("-initrd").arg(path);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run qemu-system-x86_64 ({e}); this test {NEEDS}"));
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        stdout.read_to_end(&mut bytes).unwrap();
        bytes
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let serial = String::from_utf8_lossy(&reader.join().unwrap()).into_owned();
    let _ = std::fs::remove_file(&kernel);
    if let Some(path) = initrd_path {
        let _ = std::fs::remove_file(path);
    }
    println!("{serial}");
    Run { code, serial }
}

fn byte_sum(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0u32, |s, &b| s.wrapping_add(b as u32))
}

#[test]
#[ignore = "needs qemu-system-x86_64 and /dev/kvm (or PROBE_QEMU_ACCEL=tcg)"]
fn qemu_pvh_256m_two_sockets_passes_all_checks() {
    // QEMU's 256 MiB pc: RAM 0-0x9fc00 and 1 MiB-0xffe0000, i.e. 255 whole MiB. SeaBIOS lists
    // one MP processor entry per socket, hence sockets=2.
    let run = boot(
        "256m",
        &["-m", "256", "-smp", "2,sockets=2,cores=1"],
        "probe.expect_mem=255 probe.expect_cpus=2",
        None,
    );
    assert!(run.has("probe: hello (entry=pvh)"), "{}", run.serial);
    assert!(run.has("probe: cmdline \"probe.expect_mem=255 probe.expect_cpus=2\""));
    assert!(run.has("probe: e820 0x0000000000000000-0x000000000009fbff ram"));
    assert!(run.has("probe: ram 255 MiB in 2 ranges, top 0xffe0000"));
    assert!(run.has("probe: cpus 2 (mp table)"));
    assert!(run.has("probe: initrd none"));
    assert!(
        run.has("probe: pci 00:00.0 8086:1237 class 060000"),
        "i440FX host bridge"
    );
    assert!(run.line_starting("probe: memtest ok: ").ends_with(" pages"));
    assert!(run.has(RESULT_OK_LINE));
    assert_eq!(run.code, qemu_code(exit::OK));
}

#[test]
#[ignore = "needs qemu-system-x86_64 and /dev/kvm (or PROBE_QEMU_ACCEL=tcg)"]
fn qemu_pvh_6g_with_initrd_maps_and_tests_ram_above_4g() {
    let initrd: Vec<u8> = (0..65_537u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let run = boot(
        "6g",
        &["-m", "6G", "-smp", "1"],
        "probe.expect_mem=6143 probe.expect_cpus=1",
        Some(&initrd),
    );
    // Below 4 GiB up to 0xc0000000 less a reserved top, the rest from 4 GiB to 7 GiB.
    assert!(
        run.has("probe: e820 0x0000000100000000-0x00000001bfffffff ram"),
        "{}",
        run.serial
    );
    assert!(run.has("probe: ram 6143 MiB in 3 ranges, top 0x1c0000000"));
    let initrd_line = run.line_starting("probe: initrd ");
    let expected = format!(" {} bytes, sum {:#x}", initrd.len(), byte_sum(&initrd));
    assert!(
        initrd_line.ends_with(&expected),
        "{initrd_line:?} should end in {expected:?}"
    );
    // 2 MiB, GiB 1, 2, 4, 5 and 6 (GiB 3 holds no RAM), and the last page below 7 GiB.
    assert!(run.has("probe: memtest ok: 7 pages"));
    assert!(run.has(RESULT_OK_LINE));
    assert_eq!(run.code, qemu_code(exit::OK));
}

#[test]
#[ignore = "needs qemu-system-x86_64 and /dev/kvm (or PROBE_QEMU_ACCEL=tcg)"]
fn qemu_pvh_wrong_expectation_fails_with_status_1() {
    let run = boot(
        "expect",
        &["-m", "128"],
        "probe.expect_mem=1 probe.expect_cpus=9",
        None,
    );
    assert!(
        run.has("probe: check failed: expected 1 MiB of RAM, found 127"),
        "{}",
        run.serial
    );
    assert!(run.has("probe: check failed: expected 9 cpus, found 1"));
    assert!(run.has(&format!(
        "{RESULT_FAIL_PREFIX}expected 1 MiB of RAM, found 127"
    )));
    assert_eq!(run.code, qemu_code(exit::CHECK_FAILED));
}

#[test]
#[ignore = "needs qemu-system-x86_64 and /dev/kvm (or PROBE_QEMU_ACCEL=tcg)"]
fn qemu_pvh_fault_is_reported_with_status_3() {
    let run = boot("fault", &["-m", "128"], "probe.fault", None);
    let line = run.line_starting("probe: exception 14 #PF ");
    assert!(line.ends_with(" cr2 0x10000000000"), "{line}");
    assert!(run
        .line_starting(RESULT_FAIL_PREFIX)
        .starts_with("probe: result FAIL: exception 14 at rip 0x"));
    assert_eq!(run.code, qemu_code(exit::EXCEPTION));
}
