//! Tier 3: Debian's cloud kernel with the recipe's initramfs, through the real binary, booted
//! two ways: the bzImage (64-bit Linux entry; the kernel decompresses itself first) and the ELF
//! `vmlinux` inside it (PVH entry; nothing to decompress). Each boot must show that the kernel
//! got what vmm gave it (the command line it echoes, the E820 map it prints equal to the one in
//! vmm's report, the vCPU count it reads from the ACPI MADT) and must end the way this host
//! allows (see [`check_end`]). The guest files come from `resources/linux/make-guest.sh`,
//! which `.ci/run` runs first.

mod common;

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Guest RAM and vCPUs for both boots: more than one vCPU so the count the kernel reads from
/// the MADT says something.
const MEMORY: &str = "512M";
const MEMORY_BYTES: u64 = 512 << 20;
const CPUS: u32 = 2;

fn guest_dir() -> PathBuf {
    std::env::var_os("VMM_LINUX_GUEST")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.guest"))
}

/// A finished boot: vmm's output (its stdout, the serial console, is in `serial`), its report,
/// the wall time.
struct Boot {
    out: Output,
    serial: String,
    report: Value,
    took: Duration,
}

/// Boots `.guest/KERNEL_FILE` with the recipe's initramfs and command line, `--memory MEMORY
/// --cpus CPUS`, until the guest stops, `timeout_s` pass (vmm then exits 124), or, with
/// `stop_after`, the console has printed a line containing it (vmm is then sent SIGTERM).
/// Returns the boot and the command line passed.
fn boot(
    kernel_file: &str,
    extra: &[&str],
    timeout_s: u32,
    stop_after: Option<&str>,
) -> (Boot, String) {
    let dir = guest_dir();
    let kernel = dir.join(kernel_file);
    assert!(
        kernel.exists(),
        "{} is missing: run resources/linux/make-guest.sh",
        kernel.display()
    );
    let cmdline = std::fs::read_to_string(dir.join("cmdline")).unwrap();
    let cmdline = cmdline.trim().to_string();
    let report_dir = tempfile::tempdir().unwrap();
    let report_path = report_dir.path().join("report.json");
    let started = Instant::now();
    let mut child = common::vmm()
        .args(["run", "--quiet", "--memory", MEMORY, "--cpus"])
        .arg(CPUS.to_string())
        .arg("--timeout")
        .arg(timeout_s.to_string())
        .arg("--kernel")
        .arg(&kernel)
        .arg("--initrd")
        .arg(dir.join("initramfs.cpio"))
        .args(["--cmdline", &cmdline])
        .args(extra)
        .arg("--report")
        .arg(&report_path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut console = child.stdout.take().unwrap();
    let (mut serial, mut buf, mut signalled) = (Vec::new(), [0u8; 4096], false);
    loop {
        let n = console.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        serial.extend_from_slice(&buf[..n]);
        // The whole line, so that the checks see all of it.
        let seen_line = |s: &str| {
            let text = String::from_utf8_lossy(&serial);
            text.find(s).is_some_and(|at| text[at..].contains('\n'))
        };
        if !signalled && stop_after.is_some_and(seen_line) {
            // SAFETY: kill(2) on the pid of a child not yet waited for: it cannot be reused.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            signalled = true;
        }
    }
    let out = child.wait_with_output().unwrap();
    let took = started.elapsed();
    let serial = String::from_utf8_lossy(&serial).into_owned();
    let report = std::fs::read_to_string(&report_path)
        .map(|s| serde_json::from_str(&s).unwrap())
        .unwrap_or_else(|e| {
            panic!(
                "vmm wrote no report ({e}; {}); stderr:\n{}\nserial:\n{serial}",
                out.status,
                common::stderr(&out)
            )
        });
    let boot = Boot {
        out,
        serial,
        report,
        took,
    };
    (boot, cmdline)
}

/// What the kernel echoes of its command line first ("Command line: ...", printed by
/// setup_arch before anything else can change it).
fn echoed_cmdline(serial: &str) -> Option<&str> {
    serial
        .lines()
        .find_map(|l| l.split_once("] Command line: ").map(|(_, c)| c.trim_end()))
}

/// One memory range, end exclusive, with the kernel's word for its type.
type Range = (u64, u64, String);

/// The map under "BIOS-provided physical RAM map:": `BIOS-e820: [mem 0xSTART-0xLAST] TYPE`.
fn e820_printed(serial: &str) -> Vec<Range> {
    let mut map = Vec::new();
    for line in serial.lines() {
        let Some((_, rest)) = line.split_once("BIOS-e820: [mem 0x") else {
            continue;
        };
        let parsed = rest.split_once("] ").and_then(|(span, kind)| {
            let (first, last) = span.split_once("-0x")?;
            let first = u64::from_str_radix(first, 16).ok()?;
            let last = u64::from_str_radix(last, 16).ok()?;
            Some((first, last + 1, kind.trim().to_string()))
        });
        map.push(parsed.unwrap_or_else(|| panic!("unreadable E820 line {line:?}")));
    }
    map
}

/// The report's `vm.e820` as the kernel prints it: sorted, adjacent ranges of one type joined
/// (the kernel sanitises the map before printing it), RAM called "usable".
fn e820_given(report: &Value) -> Vec<Range> {
    let mut map: Vec<Range> = report["vm"]["e820"]
        .as_array()
        .unwrap_or_else(|| panic!("no vm.e820 in the report: {report}"))
        .iter()
        .map(|e| {
            let (addr, size) = (e["addr"].as_u64().unwrap(), e["size"].as_u64().unwrap());
            let kind = match e["kind"].as_str().unwrap() {
                "ram" => "usable",
                other => other,
            };
            (addr, addr + size, kind.to_string())
        })
        .collect();
    map.sort();
    let mut joined: Vec<Range> = Vec::new();
    for r in map {
        match joined.last_mut() {
            Some(last) if last.1 == r.0 && last.2 == r.2 => last.1 = r.1,
            _ => joined.push(r),
        }
    }
    joined
}

/// N from "smpboot: Allowing N CPUs, M hotplug CPUs".
fn cpus_allowed(serial: &str) -> Option<u32> {
    serial.lines().find_map(|l| {
        let (_, rest) = l.split_once("smpboot: Allowing ")?;
        rest.split_once(" CPUs")?.0.parse().ok()
    })
}

/// What the kernel printed says it got what vmm gave it.
fn check_boot(boot: &Boot, cmdline: &str) {
    let serial = &boot.serial;
    let context = || {
        format!(
            "{}; stderr:\n{}\nserial:\n{serial}",
            boot.out.status,
            common::stderr(&boot.out)
        )
    };
    assert!(
        serial.contains("Linux version "),
        "no banner: {}",
        context()
    );
    assert_eq!(echoed_cmdline(serial), Some(cmdline), "{}", context());

    let given = e820_given(&boot.report);
    assert_eq!(e820_printed(serial), given, "{}", context());
    let usable: Vec<&Range> = given.iter().filter(|r| r.2 == "usable").collect();
    assert_eq!(
        usable.iter().map(|r| r.1).max(),
        Some(MEMORY_BYTES),
        "the usable RAM must end at --memory {MEMORY}: {given:?}"
    );
    assert!(usable.iter().map(|r| r.1 - r.0).sum::<u64>() <= MEMORY_BYTES);
    assert_eq!(
        boot.report["vm"]["memory_bytes"].as_u64(),
        Some(MEMORY_BYTES)
    );

    assert!(
        serial.contains("ACPI: Using ACPI (MADT) for SMP configuration information"),
        "the CPUs were not taken from the MADT: {}",
        context()
    );
    assert_eq!(cpus_allowed(serial), Some(CPUS), "{}", context());
}

/// How the run ended, on either kind of host:
/// - here (nested KVM whose instruction emulator runs the guest, DESIGN.md section 4) the
///   kernel stops at the first instruction that emulator cannot run (cmpxchg16b with 6.1):
///   vmm exits 1 and names a KVM internal error with the instruction's bytes, in the report's
///   outcome and on stderr;
/// - on a real KVM host it reaches /init, which writes status 0 to the debug-exit port: vmm
///   exits 0, the report says status 0, and /init's last line is on the console;
/// - with `stopped` (the test sent SIGTERM once it had seen enough, unless the guest ended
///   first): vmm exits 143 and the report says so.
///
/// Anything else (a timeout, a triple fault, a halt) fails.
fn check_end(boot: &Boot, stopped: bool) {
    let (report, stderr) = (&boot.report, common::stderr(&boot.out));
    let outcome = report["outcome"].as_str().unwrap_or_default();
    let context = format!(
        "{}; outcome {outcome:?}; stderr:\n{stderr}\nserial:\n{}",
        boot.out.status, boot.serial
    );
    match boot.out.status.code() {
        Some(0) => {
            assert_eq!(report["exit_status"], 0, "{context}");
            assert!(boot.serial.contains("vmm-guest: done"), "{context}");
        }
        Some(1) => {
            assert!(
                outcome.starts_with("vCPU 0: KVM internal error")
                    && outcome.contains("instruction bytes: ")
                    && !outcome.contains("(not reported)"),
                "{context}"
            );
            assert!(
                stderr.contains(&format!("vmm: guest failed: {outcome}")),
                "{context}"
            );
            assert!(report["exit_status"].is_null(), "{context}");
        }
        Some(143) if stopped => {
            assert_eq!(outcome, "stopped by signal 15", "{context}");
            assert!(report["exit_status"].is_null(), "{context}");
        }
        _ => panic!("unexpected end: {context}"),
    }
    eprintln!(
        "{:.1} s of wall time, exit status {:?}: {outcome}",
        boot.took.as_secs_f64(),
        boot.out.status.code()
    );
}

#[test]
#[ignore = "needs .guest/ from resources/linux/make-guest.sh and minutes of emulated boot; .ci/run runs it"]
fn debian_bzimage_gets_its_cmdline_e820_and_cpus_from_vmm() {
    // Decompressing takes most of this run; once the CPU count is out, everything the bzImage
    // path adds (loading, boot_params) has shown itself, and the rest of the way to the
    // emulator's limit is the same kernel code the vmlinux test runs to its end: stop there.
    let (boot, cmdline) = boot("vmlinuz", &[], 480, Some("smpboot: Allowing "));
    check_boot(&boot, &cmdline);
    check_end(&boot, true);
}

#[test]
#[ignore = "needs .guest/ from resources/linux/make-guest.sh and minutes of emulated boot; .ci/run runs it"]
fn debian_vmlinux_through_pvh_gets_its_cmdline_e820_and_cpus_from_vmm() {
    let (boot, cmdline) = boot("vmlinux", &["--boot-protocol", "pvh"], 240, None);
    check_boot(&boot, &cmdline);
    check_end(&boot, false);
}

/// Two guest NUMA nodes, each a 256 MiB zone (together `--memory MEMORY`) and one vCPU; node
/// 1 says it is 20 from node 0 (issue 18's CLI, Cloud Hypervisor's syntax).
const TWO_NODES: &[&str] = &[
    "--memory-zone",
    "id=a,size=256M",
    "--memory-zone",
    "id=b,size=256M",
    "--numa",
    "guest_numa_id=0,cpus=[0],memory_zones=[a]",
    "--numa",
    "guest_numa_id=1,cpus=[1],memory_zones=[b],distances=[0@20]",
];

/// The lines Linux prints as it parses the SRAT (drivers/acpi/numa/srat.c for memory,
/// arch/x86/mm/srat.c for CPUs; 6.1's wording) and once it has set up each node's data
/// (arch/x86/mm/numa.c), for [`TWO_NODES`].
const SRAT_PARSED: &[&str] = &[
    "ACPI: SRAT: Node 0 PXM 0 [mem 0x00000000-0x0fffffff]",
    "ACPI: SRAT: Node 1 PXM 1 [mem 0x10000000-0x1fffffff]",
    "SRAT: PXM 0 -> APIC 0x00 -> Node 0",
    "SRAT: PXM 1 -> APIC 0x01 -> Node 1",
    "NODE_DATA(0) allocated [mem ",
    "NODE_DATA(1) allocated [mem ",
];

#[test]
#[ignore = "needs .guest/ from resources/linux/make-guest.sh and minutes of emulated boot; .ci/run runs it"]
fn debian_vmlinux_sees_two_numa_nodes_in_the_srat() {
    // The SRAT is parsed early in setup_arch, before the CPU count is out: stop there.
    let (boot, cmdline) = boot(
        "vmlinux",
        &[&["--boot-protocol", "pvh"], TWO_NODES].concat(),
        240,
        Some("smpboot: Allowing "),
    );
    check_boot(&boot, &cmdline);
    for line in SRAT_PARSED {
        assert!(
            boot.serial.contains(line),
            "no `{line}` from the kernel: {}; stderr:\n{}\nserial:\n{}",
            boot.out.status,
            common::stderr(&boot.out),
            boot.serial
        );
    }
    assert!(
        !boot.serial.contains("No NUMA configuration found"),
        "{}",
        boot.serial
    );
    check_end(&boot, true);
}

/// make-guest.sh with BUILD_EPF_MODULE=1 against a mirror that lists the kernel's headers but
/// answers 404 for them (as Debian's did for a new kernel ABI): an `apt-get` first on PATH
/// fails those downloads the way apt does and passes everything else to the real one.
#[test]
#[ignore = "needs Debian's apt and the kernel .deb (in .guest/debs from make-guest.sh, or from the mirror); .ci/run runs it"]
fn make_guest_stops_at_a_failed_headers_download_naming_it_and_the_fix() {
    let real_apt = which("apt-get").expect("apt-get on PATH (a Debian host)");
    let tmp = tempfile::tempdir().unwrap();
    let (bin, out_dir) = (tmp.path().join("bin"), tmp.path().join("guest"));
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(out_dir.join("debs")).unwrap();
    // The kernel and busybox packages already fetched are reused rather than downloaded again.
    if let Ok(debs) = std::fs::read_dir(guest_dir().join("debs")) {
        for deb in debs.flatten() {
            std::os::unix::fs::symlink(deb.path(), out_dir.join("debs").join(deb.file_name()))
                .unwrap();
        }
    }
    let fake = bin.join("apt-get");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\n\
             for a; do case $a in linux-headers-*)\n\
             echo \"E: Failed to fetch http://deb.debian.org/debian/pool/$a.deb  404  Not Found\" >&2\n\
             exit 100 ;; esac; done\n\
             exec {} \"$@\"\n",
            real_apt.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../resources/linux/make-guest.sh");
    let out = std::process::Command::new("bash")
        .arg(script)
        .arg(&out_dir)
        .env("PATH", path)
        .env("BUILD_EPF_MODULE", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = common::stderr(&out);
    let all = format!("stdout:\n{}\nstderr:\n{err}", common::stdout(&out));
    assert_eq!(out.status.code(), Some(1), "{all}");
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("make-guest: error: downloading linux-headers-")
            && last.contains("KERNEL_PACKAGE=linux-image-"),
        "the last line must name the package and the fix: {all}"
    );
    assert!(
        !all.contains("building pci_endpoint_test") && !out_dir.join("epf").exists(),
        "it went on after the failed download: {all}"
    );
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// From a real run of the vmlinux (Debian 6.1.0-57-cloud-amd64, 512 MiB, 2 vCPUs), cut down.
const SAMPLE: &str = "\
[    0.000000] Linux version 6.1.0-57-cloud-amd64 (debian-kernel@lists.debian.org)
[    0.000000] Command line: console=ttyS0 panic=-1 rdinit=/init
[    0.000000] BIOS-provided physical RAM map:
[    0.000000] BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable
[    0.000000] BIOS-e820: [mem 0x000000000009fc00-0x00000000000fffff] reserved
[    0.000000] BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable
[    0.000000] BIOS-e820: [mem 0x00000000feb00000-0x00000000febfffff] reserved
[    6.325705] ACPI: Using ACPI (MADT) for SMP configuration information
[    6.338877] smpboot: Allowing 2 CPUs, 0 hotplug CPUs
[   22.692468] Kernel command line: console=ttyS0 panic=-1 rdinit=/init extra
";

#[test]
fn the_kernel_log_is_read_as_printed() {
    assert_eq!(
        echoed_cmdline(SAMPLE),
        Some("console=ttyS0 panic=-1 rdinit=/init")
    );
    assert_eq!(cpus_allowed(SAMPLE), Some(2));
    let usable = |a, b| (a, b, "usable".to_string());
    let reserved = |a, b| (a, b, "reserved".to_string());
    assert_eq!(
        e820_printed(SAMPLE),
        vec![
            usable(0, 0x9fc00),
            reserved(0x9fc00, 0x10_0000),
            usable(0x10_0000, 0x2000_0000),
            reserved(0xfeb0_0000, 0xfec0_0000),
        ]
    );
    assert_eq!(echoed_cmdline("no such line"), None);
    assert_eq!(cpus_allowed("smpboot: Allowing many CPUs"), None);
}

#[test]
fn the_report_map_is_joined_like_the_kernel_joins_it() {
    let report = serde_json::json!({"vm": {"e820": [
        {"addr": 0x10_0000u64, "size": 0x1ff0_0000u64, "kind": "ram"},
        {"addr": 0, "size": 0x9fc00, "kind": "ram"},
        {"addr": 0x9fc00, "size": 0x400, "kind": "reserved"},
        {"addr": 0xa0000, "size": 0x60000, "kind": "reserved"},
        {"addr": 0xfeb0_0000u64, "size": 0x10_0000, "kind": "reserved"},
    ]}});
    assert_eq!(e820_given(&report), e820_printed(SAMPLE));
}
