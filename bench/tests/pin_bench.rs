//! `vmm-bench pin-bench` through the real binary: output shape, the limits that decide the thread
//! count (affinity, a cgroup CPU quota), the admission check, and Ctrl-C mid-job.

use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{signal_once_waiting, undid_chunks, vmlck_after_undo_kb, vmm_bench};

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "vmm-bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not one JSON object ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

const SMALL: [&str; 10] = [
    "pin-bench",
    "--memory",
    "256M",
    "--threads",
    "1,auto",
    "--runs",
    "2",
    "--warmup",
    "0",
    "--json",
];

#[test]
fn json_has_every_documented_key() {
    let v = json(
        &vmm_bench()
            .args(SMALL)
            .args(["--min-chunk", "32M"])
            .output()
            .unwrap(),
    );
    assert_eq!(v["memory_bytes"], 256 << 20);
    assert_eq!(v["backend"], "populate");
    assert_eq!(v["backing"], "anon");
    assert!(v["memset_gibps"].as_f64().unwrap() > 0.0);
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    assert_eq!(results[0]["requested"], "1");
    assert_eq!(results[0]["threads"], 1);
    assert_eq!(results[0]["decided_by"], "requested");
    assert_eq!(results[1]["requested"], "auto");
    for r in results {
        assert_eq!(r["runs_gibps"].as_array().unwrap().len(), 2);
        assert!(r["median_gibps"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn auto_under_a_single_cpu_affinity_uses_one_thread_decided_by_affinity() {
    let mut cmd = vmm_bench();
    cmd.args(SMALL).args(["--min-chunk", "32M"]);
    // SAFETY: pre_exec runs in the forked child before exec; sched_setaffinity is
    // async-signal-safe and touches only a local set.
    unsafe {
        cmd.pre_exec(|| {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(0, &mut set);
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let v = json(&cmd.output().unwrap());
    let auto = &v["results"][1];
    assert_eq!(auto["threads"], 1);
    assert_eq!(auto["decided_by"], "affinity");
}

/// A cgroup created for one test and removed after it, even if the test fails.
struct TestCgroup(std::path::PathBuf);

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // The child has exited by now, so the cgroup is empty and can go.
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn auto_in_a_one_cpu_cgroup_v1_uses_one_thread_decided_by_cgroup() {
    let cpu_root = std::path::Path::new("/sys/fs/cgroup/cpu");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return common::skip("root", "making a cgroup needs root");
    }
    if !cpu_root.join("cpu.cfs_quota_us").exists() {
        let why = format!(
            "needs the cgroup v1 cpu controller at {}",
            cpu_root.display()
        );
        return common::skip("cgroup-v1-cpu", &why);
    }
    let cg = TestCgroup(cpu_root.join(format!("vmm-test-{}", std::process::id())));
    std::fs::create_dir(&cg.0).unwrap();
    std::fs::write(cg.0.join("cpu.cfs_period_us"), "100000").unwrap();
    std::fs::write(cg.0.join("cpu.cfs_quota_us"), "100000").unwrap();
    let procs = std::ffi::CString::new(cg.0.join("cgroup.procs").to_str().unwrap()).unwrap();
    let mut cmd = vmm_bench();
    cmd.args(SMALL).args(["--min-chunk", "32M"]);
    // SAFETY: pre_exec in the forked child: open/write/close are async-signal-safe and the
    // path was allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // "0" moves the writing process itself.
            let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
            libc::close(fd);
            if ok {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let v = json(&cmd.output().unwrap());
    let auto = &v["results"][1];
    assert_eq!(auto["threads"], 1, "{v}");
    assert_eq!(auto["decided_by"], "cgroup", "{v}");
}

/// The RLIMIT_MEMLOCK the test sets: 64 MiB (`ulimit -l 65536`), or the hard limit if lower
/// (raising the hard limit needs CAP_SYS_RESOURCE, which this sandbox lacks even as root).
fn test_memlock() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: lim is a valid out-pointer.
    let r = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) };
    assert_eq!(r, 0);
    (64u64 << 20).min(lim.rlim_max)
}

/// Runs vmm-bench without CAP_IPC_LOCK and with RLIMIT_MEMLOCK = [`test_memlock`].
fn without_ipc_lock(cmd: &mut Command) -> &mut Command {
    let limit = test_memlock();
    // SAFETY: prctl and setrlimit are async-signal-safe; they change only the child.
    unsafe {
        cmd.pre_exec(move || {
            // Dropping it from the bounding set keeps root's exec from granting it again.
            if libc::prctl(libc::PR_CAPBSET_DROP, 14, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let lim = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

#[test]
fn mlock_over_rlimit_memlock_is_refused_before_any_work() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return common::skip(
            "root",
            "dropping CAP_IPC_LOCK from the bounding set needs root",
        );
    }
    let started = Instant::now();
    let out = without_ipc_lock(&mut vmm_bench())
        .args([
            "pin-bench",
            "--memory",
            "1G",
            "--pin",
            "mlock",
            "--runs",
            "1",
            "--warmup",
            "0",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let expected = format!("RLIMIT_MEMLOCK is {} MiB", test_memlock() >> 20);
    assert!(err.contains(&expected), "{err}");
    assert!(err.contains("ulimit -l"), "{err}");
    assert!(out.stdout.is_empty(), "no results may be printed");
    // Only the memset reference (at most 1 GiB) ran: no pinning was attempted.
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[test]
fn bad_input_is_exit_status_2_with_the_reason() {
    for (args, needle) in [
        (vec!["--memory", "0"], "more than zero"),
        (vec!["--memory", "-1"], "-1"),
        (vec!["--memory", "4Q"], "`4Q` is not a size"),
        (vec!["--memory", "1T"], "more than this host's RAM"),
        (vec!["--memory", "3M", "--backing", "thp"], "not a multiple"),
        (
            vec!["--memory", "1G", "--threads", "0"],
            "not a thread count",
        ),
        (
            vec!["--memory", "1G", "--threads", "x"],
            "not a thread count",
        ),
        (
            vec!["--memory", "1G", "--threads", "1,4097"],
            "from 1 to 4096",
        ),
        (vec!["--memory", "1G", "--warmup", "101"], "101"),
    ] {
        let out = vmm_bench().arg("pin-bench").args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

#[test]
fn hugetlb_without_reserved_pages_says_how_to_reserve() {
    let free: u64 =
        std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
            .map(|s| s.trim().parse().unwrap_or(0))
            .unwrap_or(0);
    let want = format!("{}M", (free + 1) * 2);
    let out = vmm_bench()
        .args(["pin-bench", "--memory", &want, "--backing", "hugetlb"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("nr_hugepages"), "{err}");
}

/// SIGINT mid-job, once some chunks are done and others not: `--test-fault wait-after-map=1`
/// holds the single thread after its second map until the signal arrives. With the munlock
/// skipped the same report shows the VmLck left, so its "0 kB" is measured.
#[test]
fn sigint_during_an_mlock_job_undoes_it_and_exits_130() {
    let run = |faults: &[&str]| {
        let child = vmm_bench()
            .args(["pin-bench", "--memory", "2G", "--pin", "mlock"])
            .args(["--threads", "1", "--runs", "1", "--warmup", "0"])
            .args(["--test-fault", "wait-after-map=1"])
            .args(faults)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (status, err, took) = signal_once_waiting(child, libc::SIGINT);
        assert_eq!(status.code(), Some(130), "{err}");
        assert!(err.contains("cancelled by SIGINT"), "{err}");
        assert!(err.contains("nothing is left pinned"), "{err}");
        // Two maps done, so one or two whole chunks: work was undone.
        let undid = undid_chunks(&err).unwrap_or_else(|| panic!("no undo count: {err}"));
        assert!((1..=2).contains(&undid), "{err}");
        assert!(took < Duration::from_secs(3), "took {took:?} to stop");
        // Read while the memory was still mapped: only the undo (munlock) can have brought
        // VmLck to zero, not the unmap that follows.
        assert!(
            err.contains("right after the undo, with guest RAM still mapped"),
            "{err}"
        );
        vmlck_after_undo_kb(&err).unwrap_or_else(|| panic!("no VmLck in {err}"))
    };
    assert_eq!(run(&[]), 0);
    let skipped = run(&["--test-fault", "skip-munlock"]);
    assert!(
        skipped >= 2 << 20,
        "VmLck {skipped} kB with the munlock skipped"
    );
}

#[test]
fn host_numa_node_binds_every_run_and_the_report_says_where_pages_landed() {
    for backing in ["anon", "memfd"] {
        let v = json(
            &vmm_bench()
                .args(["pin-bench", "--memory", "256M", "--threads", "1"])
                .args(["--runs", "1", "--warmup", "0", "--json"])
                .args(["--backing", backing, "--host-numa-node", "0"])
                .output()
                .unwrap(),
        );
        assert_eq!(v["host_numa_node"], 0, "{v}");
        // One sample per 2 MiB, every page populated, all on node 0.
        let p = &v["placement"];
        assert_eq!(p["sampled"], 128, "{backing}: {p}");
        assert_eq!(p["not_present"], 0, "{backing}: {p}");
        assert_eq!(
            p["per_node"],
            serde_json::json!([[0, 128]]),
            "{backing}: {p}"
        );
    }
    let out = vmm_bench()
        .args([
            "pin-bench",
            "--memory",
            "256M",
            "--threads",
            "1",
            "--runs",
            "1",
        ])
        .args(["--host-numa-node", "0"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("placement: 100.0% of 128 sampled pages on node 0 (bound to node 0)"),
        "{table}"
    );
}

/// A host NUMA node number this host lacks.
fn absent_node() -> u32 {
    (1..64)
        .find(|n| !std::path::Path::new(&format!("/sys/devices/system/node/node{n}")).exists())
        .unwrap()
}

#[test]
fn a_host_numa_node_that_does_not_exist_is_exit_status_2_naming_it() {
    let absent = absent_node();
    let out = vmm_bench()
        .args(["pin-bench", "--memory", "64M", "--host-numa-node"])
        .arg(absent.to_string())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(&format!("host NUMA node {absent}:")), "{err}");
}

#[test]
fn numa_nodes_fill_one_zone_per_node_on_its_cpus_and_report_rate_and_placement() {
    // `0`: one zone; `0,0`: two on this host's one node (the split and per-zone paths).
    for (nodes, zones) in [("0", 1), ("0,0", 2)] {
        let v = json(
            &vmm_bench()
                .args(["pin-bench", "--memory", "256M", "--threads", "1,auto"])
                .args([
                    "--runs",
                    "2",
                    "--warmup",
                    "0",
                    "--min-chunk",
                    "32M",
                    "--json",
                ])
                .args(["--numa-nodes", nodes])
                .output()
                .unwrap(),
        );
        assert_eq!(v["numa_nodes"].as_array().unwrap().len(), zones, "{v}");
        for r in v["results"].as_array().unwrap() {
            let z = r["zones"].as_array().unwrap();
            assert_eq!(z.len(), zones, "{nodes}: {r}");
            let mut best = 0f64;
            for (i, z) in z.iter().enumerate() {
                assert_eq!(z["id"], format!("mem{i}"), "{z}");
                assert_eq!(z["host_numa_node"], 0, "{z}");
                assert_eq!(z["bytes"], (256 << 20) / zones as u64, "{z}");
                assert!(z["threads"].as_u64().unwrap() >= 1, "{z}");
                assert!(z["decided_by"].is_string(), "{z}");
                // Helpers pinned to node 0's CPUs (all of them here, within the affinity).
                assert!(!z["cpus"].as_array().unwrap().is_empty(), "{z}");
                assert_eq!(z["runs_gibps"].as_array().unwrap().len(), 2, "{z}");
                assert!(z["median_gibps"].as_f64().unwrap() > 0.0, "{z}");
                best = best.max(z["of_best_zone"].as_f64().unwrap());
                // Every page of the zone populated, all on node 0: one sample per 2 MiB.
                let p = &z["placement"];
                let samples = (128 / zones) as u64;
                assert_eq!(p["placement_sampled"], samples, "{z}");
                assert_eq!(p["placement_on_node"], samples, "{z}");
                assert_eq!(p["placement_rule"], "bound to node 0", "{z}");
            }
            assert_eq!(best, 1.0, "the fastest zone is 1.0 of itself: {r}");
        }
    }
    let out = vmm_bench()
        .args([
            "pin-bench",
            "--memory",
            "256M",
            "--threads",
            "2",
            "--runs",
            "1",
        ])
        .args(["--numa-nodes", "0,0"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    assert!(
        table.contains("(2 zones, each bound to its node)"),
        "{table}"
    );
    for zone in ["mem0", "mem1"] {
        assert!(
            table
                .lines()
                .any(|l| l.starts_with(&format!("  {zone}      0  128 MiB"))
                    && l.ends_with("100.0% of 64 sampled pages on node 0")),
            "{table}"
        );
    }
}

#[test]
fn numa_nodes_naming_a_node_the_host_lacks_is_exit_status_2_before_any_memory() {
    let absent = absent_node();
    let t = Instant::now();
    // 1 TiB: refused for the node before the memory is even checked against the host's.
    let out = vmm_bench()
        .args(["pin-bench", "--memory", "1T", "--numa-nodes"])
        .arg(format!("0,{absent}"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!(
            "--numa-nodes: host NUMA node {absent} does not exist on this host"
        )),
        "{err}"
    );
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    // One placement per run: a node for all of it, or a zone per node, not both.
    let out = vmm_bench()
        .args(["pin-bench", "--memory", "64M", "--numa-nodes", "0"])
        .args(["--host-numa-node", "0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("cannot be used with"), "{err}");
}
