//! `vmm pin-bench` and `vmm bench startup`, as the README documents them: the `vmm` binary
//! runs the `vmm-bench` binary beside it in its place, so the output, the exit status and the
//! help are the benchmark's own; without `vmm-bench` beside it, `vmm` says where it looked and
//! how to build it.

use std::process::{Command, Stdio};

mod common;
use common::{alone, stderr, vmm_beside};

fn vmm() -> Command {
    let mut c = Command::new(vmm_beside());
    c.stdin(Stdio::null());
    c
}

#[test]
fn vmm_pin_bench_is_vmm_bench_pin_bench() {
    let out = vmm()
        .args([
            "pin-bench",
            "--memory",
            "256M",
            "--threads",
            "1",
            "--runs",
            "1",
        ])
        .args(["--warmup", "0", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["memory_bytes"], 256 << 20);
    assert_eq!(v["results"][0]["threads"], 1);

    // Options and --help go through untouched.
    let out = vmm().args(["pin-bench", "--help"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("Usage: vmm-bench pin-bench"), "{help}");
    let out = vmm().args(["pin-bench", "--memory", "0"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("more than zero"), "{}", stderr(&out));
}

#[test]
fn vmm_bench_startup_is_vmm_bench_startup() {
    let out = vmm()
        .args(["bench", "startup", "--memory", "4Q", "--qemu", "none"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("`4Q`"), "{}", stderr(&out));
    let out = vmm().args(["bench", "startup", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("Usage: vmm-bench startup"), "{help}");
}

#[test]
fn without_vmm_bench_beside_it_vmm_says_where_it_looked_and_how_to_build_it() {
    let (dir, alone) = alone(&vmm_beside(), "vmm");
    for args in [
        vec!["pin-bench", "--memory", "256M"],
        vec!["bench", "startup"],
    ] {
        let out = Command::new(&alone)
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        let line = format!(
            "runs the vmm-bench binary, which is not at {}",
            dir.path().join("vmm-bench").display()
        );
        assert!(
            err.starts_with(&format!("vmm: `vmm {}` {line}", args[0])),
            "{err}"
        );
        assert!(err.contains("cargo build --release -p vmm-bench"), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}
