//! `vmm-bench startup` through the real binary: one tiny configuration, QEMU off; the JSON's
//! shape, the SVG, and bad input. No timed assertion: the numbers belong to the machine.

use std::process::Stdio;
use std::time::{Duration, Instant};

mod common;
use common::{alone, stderr, vmm_bench};

#[test]
fn two_sizes_two_backings_write_json_with_every_phase_teardown_shards_slopes_and_an_svg() {
    let dir = tempfile::tempdir().unwrap();
    let out = vmm_bench()
        .args([
            "startup",
            "--memory",
            "256M,512M",
            "--backing",
            "anon,memfd",
            "--memory-shard",
            "128M",
            "--pin-threads",
            "1",
            "--runs",
            "2",
            "--warmup",
            "0",
            "--qemu",
            "none",
            "--out",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "256M-anon-t1",
        "QEMU: skipped",
        "teardown: med  min",
        // 512 MiB of memfd in shards of 128 MiB.
        "4x128M",
        "RAM-dependent part",
    ] {
        assert!(table.contains(needle), "{needle} missing from\n{table}");
    }
    let slope_row = |backing: &str| {
        table
            .lines()
            .any(|l| l.starts_with("256M-512M") && l.split_whitespace().nth(1) == Some(backing))
    };
    assert!(slope_row("anon") && slope_row("memfd"), "{table}");

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("startup.json")).unwrap())
            .unwrap();
    let m = &json["machine"];
    for key in ["cpu_model", "kernel", "date"] {
        assert!(!m[key].as_str().unwrap().is_empty(), "machine.{key}: {m}");
    }
    assert!(m["cores_online"].as_u64().unwrap() >= 1);
    assert!(m["vmx_or_svm"].is_boolean() && m["hypervisor"].is_boolean());
    let shmem = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled");
    if let Ok(shmem) = shmem {
        let word = m["thp_shmem_enabled"].as_str().unwrap();
        assert!(shmem.contains(&format!("[{word}]")), "{shmem} vs {m}");
    }
    assert_eq!(json["runs"], 2);
    assert_eq!(json["backings"], serde_json::json!(["anon", "memfd"]));
    assert_eq!(json["memory_shard"], 128u64 << 20);
    assert!(json["qemu"]["skipped"].is_string());
    assert!(json["qemu"]["slopes"].as_array().unwrap().is_empty());
    assert!(json["failures"].as_array().unwrap().is_empty());

    let configs = json["configs"].as_array().unwrap();
    assert_eq!(configs.len(), 4, "{json}");
    let config = |id: &str| {
        configs
            .iter()
            .find(|c| c["id"] == id)
            .unwrap_or_else(|| panic!("{id} missing from {json}"))
    };
    let c = config("256M-anon-t1");
    assert_eq!(c["memory_bytes"], 256u64 << 20);
    assert_eq!(c["backing"], "anon");
    assert_eq!(c["pin_threads"], "1");
    assert_eq!(c["pin_backend"], "populate");
    assert_eq!(c["threads_used"], 1);
    // Private memory has no shards: --memory-shard was not passed (vmm run would refuse it).
    assert!(
        c["memory_shards"].is_null() && c["shard_bytes"].is_null(),
        "{c}"
    );
    assert!(c["ready_ms"]["median"].as_f64().unwrap() > 0.0);
    let teardown = &c["teardown_ms"];
    assert!(teardown["median"].as_f64().unwrap() > 0.0, "{c}");
    assert!(teardown["min"].as_f64().unwrap() <= teardown["median"].as_f64().unwrap());
    let samples = c["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 2);
    let s = &samples[0];
    assert!(s["total_ms"].as_f64().unwrap() > 0.0, "{s}");
    assert!(s["ready_ms"].as_f64().unwrap() > 0.0, "{s}");
    assert!(s["wall_ms"].as_f64().unwrap() > 0.0, "{s}");
    assert!(s["pin_ms"].as_f64().is_some() && s["overhead_ms"].as_f64().is_some());
    let phases: Vec<&serde_json::Value> = s["phases"].as_array().unwrap().iter().collect();
    let names: Vec<&str> = phases
        .iter()
        .map(|p| {
            assert!(p["start_ms"].as_f64().is_some() && p["end_ms"].as_f64().is_some());
            assert!(p["ms"].as_f64().unwrap() >= 0.0, "{p}");
            p["name"].as_str().unwrap()
        })
        .collect();
    for name in ["kvm", "memory", "pin", "load", "vcpus", "run", "exit"] {
        assert!(names.contains(&name), "{name} missing from {names:?}");
    }
    let exit = phases.iter().find(|p| p["name"] == "exit").unwrap();
    assert_eq!(s["teardown_ms"], exit["ms"], "{s}");

    let c = config("512M-memfd-t1");
    assert_eq!(c["mode"], "user-device epf");
    assert_eq!(c["memory_shards"], 4, "{c}");
    assert_eq!(c["shard_bytes"], 128u64 << 20, "{c}");
    assert_eq!(c["samples"][0]["memory_shards"], 4, "{c}");
    assert!(c["teardown_ms"]["median"].as_f64().unwrap() > 0.0, "{c}");

    let slopes = json["ram_slopes"].as_array().unwrap();
    assert_eq!(slopes.len(), 2, "{json}");
    for s in slopes {
        assert_eq!(s["from_memory_bytes"], 256u64 << 20, "{s}");
        assert_eq!(s["to_memory_bytes"], 512u64 << 20, "{s}");
        assert!(s["vmm_ms_per_gib"].as_f64().is_some(), "{s}");
        assert!(s["vmm_fixed_ms"].as_f64().is_some(), "{s}");
        assert!(
            s["qemu_ms_per_gib"].is_null() && s["ratio"].is_null(),
            "{s}"
        );
    }

    let svg = std::fs::read_to_string(dir.path().join("startup.svg")).unwrap();
    assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(80)]);
    assert!(svg.contains("guest RAM (GiB)"));
}

const SHMEM_ENABLED: &str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";

#[test]
fn memfd_thp_where_shmem_forbids_huge_pages_exits_2_naming_the_sysfs_line_before_booting() {
    let policy = std::fs::read_to_string(SHMEM_ENABLED).unwrap_or_default();
    if ["[always]", "[within_size]", "[advise]", "[force]"]
        .iter()
        .any(|w| policy.contains(w))
    {
        let why = format!("this host allows huge pages in shmem ({policy:?})");
        return common::skip("shmem-without-huge-pages", &why);
    }
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    let out = vmm_bench()
        .args([
            "startup",
            "--memory",
            "256M",
            "--backing",
            "anon,memfd-thp",
            "--pin-threads",
            "1",
            "--runs",
            "1",
            "--warmup",
            "0",
            "--qemu",
            "none",
            "--out",
        ])
        .arg(&out_dir)
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(SHMEM_ENABLED), "{err}");
    assert!(err.contains("memfd-thp"), "{err}");
    // Refused before anything booted: not even the anon configuration ran.
    assert!(!out_dir.join("runs").exists(), "{err}");
}

#[test]
fn a_memory_shard_that_fits_no_size_exits_2_before_booting() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    let out = vmm_bench()
        .args([
            "startup",
            "--memory",
            "256M",
            "--backing",
            "memfd",
            "--memory-shard",
            "1G",
            "--qemu",
            "none",
            "--out",
        ])
        .arg(&out_dir)
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--memory-shard 1 GiB"), "{err}");
    assert!(!out_dir.join("runs").exists(), "{err}");
}

#[test]
fn bad_list_values_exit_2_naming_the_value() {
    let dir = tempfile::tempdir().unwrap();
    for (bad, needle) in [
        (["--pin-threads", "1,zero"], "`zero`"),
        (["--pin-threads", "1,0"], "`0`"),
        (["--memory", "256M,4Q"], "`4Q`"),
        (["--backing", "anon,nope"], "nope"),
    ] {
        // Small values for the other lists, so that a value wrongly accepted costs little.
        let mut args = vec!["startup", "--qemu", "none", "--runs", "1", "--warmup", "0"];
        for (flag, small) in [
            ("--memory", "256M"),
            ("--backing", "anon"),
            ("--pin-threads", "1"),
        ] {
            args.extend([flag, if bad[0] == flag { bad[1] } else { small }]);
        }
        let out = vmm_bench()
            .args(&args)
            .arg("--out")
            .arg(dir.path())
            .output()
            .unwrap();
        let args = bad;
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn a_qemu_path_that_is_not_there_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let out = vmm_bench()
        .args([
            "startup",
            "--memory",
            "256M",
            "--qemu",
            "/nonexistent/qemu-system-x86_64",
            "--out",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("/nonexistent/qemu-system-x86_64"), "{err}");
}

/// The `vmm run` children of `pid`.
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

#[test]
fn sigint_stops_the_child_boot_reaps_it_and_exits_130() {
    let dir = tempfile::tempdir().unwrap();
    let bench = vmm_bench()
        .args([
            "startup",
            "--memory",
            "8G",
            "--backing",
            "memfd",
            "--pin-threads",
            "1",
            "--runs",
            "1",
            "--warmup",
            "0",
            "--qemu",
            "none",
            "--out",
        ])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = bench.id();
    let deadline = Instant::now() + Duration::from_secs(60);
    let child = loop {
        // The first child is `vmm run --help` (the --user-device check); wait for the boot.
        let boot = children(pid).into_iter().find(|c| {
            std::fs::read(format!("/proc/{c}/cmdline"))
                .is_ok_and(|a| String::from_utf8_lossy(&a).contains("--report"))
        });
        if let Some(c) = boot {
            break c;
        }
        assert!(Instant::now() < deadline, "no vmm run child appeared");
        std::thread::sleep(Duration::from_millis(10));
    };
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: kill with the pid of our own child, not yet reaped.
    unsafe { libc::kill(pid as i32, libc::SIGINT) };
    let out = bench.wait_with_output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("stopped by SIGINT"), "{err}");
    assert!(
        !std::path::Path::new(&format!("/proc/{child}")).exists(),
        "child {child} was left behind"
    );
}

#[test]
fn a_missing_vmm_binary_exits_2_naming_the_path_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let out = vmm_bench()
        .args(["startup", "--memory", "256M", "--qemu", "none"])
        .args(["--vmm", "/nonexistent/vmm", "--out"])
        .arg(dir.path().join("out"))
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--vmm /nonexistent/vmm: not an executable file"),
        "{err}"
    );

    // vmm-bench alone, with no vmm beside it.
    let (bare, alone) = alone(env!("CARGO_BIN_EXE_vmm-bench").as_ref(), "vmm-bench");
    let out = std::process::Command::new(&alone)
        .args(["startup", "--memory", "256M", "--qemu", "none", "--out"])
        .arg(dir.path().join("out"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let beside = bare.path().join("vmm");
    assert!(
        err.contains(&format!("no vmm binary at {}", beside.display())),
        "{err}"
    );
    assert!(err.contains("cargo build --release -p vmm"), "{err}");
    assert!(!dir.path().join("out").exists(), "nothing may run: {err}");
}
