//! System-call filters (`vmm run --seccomp`), through the real binary: every thread of a
//! running VM is filtered under `on` and `log` (vCPUs, the main thread and the rest, each kind
//! of pinning helper with its own filter, the epf server process), and a forbidden call stops
//! the VM with one line naming the thread and the call, and status 1.

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{stderr, stdout, vmm};
use guest_abi::probe::RESULT_OK_LINE;

const VIOLATION_LINE: &str = "vmm: seccomp: thread vcpu0 made forbidden system call 110 (getppid)";

/// PF_USER_WORKER: a kernel worker in the VM's thread group (KVM's NX huge page recovery
/// thread on Linux 6.13+), which runs no user code.
const PF_USER_WORKER: u64 = 0x4000;

/// A thread of `pid`: its id and name, its `Seccomp:` mode and `Seccomp_filters:` count, and
/// whether it is a kernel worker.
struct Thread {
    tid: u32,
    name: String,
    seccomp: u32,
    filters: u32,
    user_worker: bool,
}

fn threads(pid: u32) -> Vec<Thread> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let path = e.ok()?.path();
        let status = std::fs::read_to_string(path.join("status")).ok()?;
        let stat = std::fs::read_to_string(path.join("stat")).ok()?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
        };
        let flags: u64 = stat[stat.rfind(')')? + 1..]
            .split_whitespace()
            .nth(6)?
            .parse()
            .ok()?;
        Some(Thread {
            tid: path.file_name()?.to_str()?.parse().ok()?,
            name: field("Name:")?,
            seccomp: field("Seccomp:")?.parse().ok()?,
            filters: field("Seccomp_filters:")?.parse().ok()?,
            user_worker: flags & PF_USER_WORKER != 0,
        })
    })
    .collect()
}

fn describe(threads: &[Thread]) -> String {
    threads
        .iter()
        .map(|t| format!("{} (Seccomp: {})", t.name, t.seccomp))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `vmm run ARGS` on two vCPUs with the probe hanging once its checks (DMA included) passed.
fn paused_run(args: &[&str]) -> Child {
    let mut all = vec!["--cpus", "2"];
    all.extend_from_slice(args);
    common::paused_run("probe.hang probe.expect_dma=1 probe.expect_cpus=2", &all)
}

/// The epf server child of `pid`.
fn epf_child(pid: u32) -> u32 {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    let child = children
        .split_whitespace()
        .next()
        .expect("vmm has no child")
        .parse()
        .unwrap();
    let cmdline = std::fs::read_to_string(format!("/proc/{child}/cmdline")).unwrap();
    assert!(cmdline.contains("epf"), "{cmdline:?}");
    child
}

fn stop(mut child: Child) {
    // SAFETY: signalling our own child, not yet reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(143), "{status}");
}

#[test]
fn every_thread_of_a_paused_run_and_its_device_server_is_filtered() {
    // `on` (the default) and `log` alike: log changes what a forbidden call does, not which
    // threads are filtered.
    for level in ["on", "log"] {
        every_thread_is_filtered(level);
    }
}

fn every_thread_is_filtered(level: &str) {
    let child = paused_run(&["--seccomp", level]);
    let pid = child.id();
    let all = threads(pid);
    let user: Vec<&Thread> = all.iter().filter(|t| !t.user_worker).collect();
    for name in [
        "vcpu0",
        "vcpu1",
        "vmm",
        "vmm-signals",
        "epf-watcher",
        "vfio-user-rx",
        "vmm-serial-out",
    ] {
        assert!(
            user.iter().any(|t| t.name == name),
            "{level}: no thread {name}: {}",
            describe(&all)
        );
    }
    assert!(
        user.iter().all(|t| t.seccomp == 2),
        "{level}: not every thread is filtered: {}",
        describe(&all)
    );
    // The server's main thread and its DMA thread.
    let server = threads(epf_child(pid));
    assert!(!server.is_empty());
    assert!(
        server.iter().all(|t| t.seccomp == 2),
        "{level}: the epf server: {}",
        describe(&server)
    );
    stop(child);
}

#[test]
fn with_seccomp_off_no_thread_is_filtered() {
    let child = paused_run(&["--seccomp", "off"]);
    let pid = child.id();
    let all = threads(pid);
    assert!(all.iter().all(|t| t.seccomp == 0), "{}", describe(&all));
    assert_eq!(threads(epf_child(pid))[0].seccomp, 0);
    stop(child);
}

/// The threads the pinning engine starts, by the name each kind gets: its jobs' helpers
/// while pinning, the parallel undo and the freeing of guest RAM at teardown.
const HELPER_KINDS: [&str; 3] = ["pin-helper-", "unpin-", "free-ram-"];

#[test]
fn every_kind_of_pinning_helper_filters_itself_before_it_works() {
    for level in ["on", "log"] {
        helpers_are_filtered(level);
    }
}

/// Watches a run with RAM in small pages (so populating and freeing it take a while) and
/// slowed unmaps (so the undo does) until a thread of every helper kind has been seen filtered by its own filter.
///
/// `Seccomp: 2` alone cannot show that: a thread inherits the filters of the thread that
/// starts it, and the teardown's helpers are started by the main thread once it is filtered.
/// A helper that installed its own has one filter more than the main thread (`Seccomp_filters`).
/// A helper is named before it runs the engine's start hook, so one sampled in that instant
/// shows one filter fewer; every helper thread seen more than once must end seen filtered.
fn helpers_are_filtered(level: &str) {
    use std::collections::HashMap;
    let mut child = vmm()
        .args(["run", "--quiet", "--user-device", "none", "--memory", "3G"])
        .args([
            "--backing",
            "anon",
            "--pin",
            "populate",
            "--pin-threads",
            "2",
        ])
        .args(["--seccomp", level, "--test-fault", "slow-unmap"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    // By helper thread: its kind, how often it was seen, and whether it had its own filter
    // when last seen.
    let mut helpers: HashMap<u32, (usize, u32, bool)> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline && child.try_wait().unwrap().is_none() {
        let all = threads(pid);
        let Some(main) = all.iter().find(|t| t.tid == pid) else {
            break;
        };
        for t in &all {
            if let Some(kind) = HELPER_KINDS.iter().position(|k| t.name.starts_with(k)) {
                let own = t.seccomp == 2 && t.filters == main.filters + 1;
                let seen = helpers.entry(t.tid).or_insert((kind, 0, false));
                *seen = (kind, seen.1 + 1, own);
            }
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{level}: {}", stderr(&out));
    for (k, kind) in HELPER_KINDS.iter().enumerate() {
        let of_kind: Vec<_> = helpers.values().filter(|h| h.0 == k).collect();
        assert!(
            of_kind.iter().any(|h| h.2),
            "{level}: no {kind}N thread seen with its own filter ({} seen)",
            of_kind.len()
        );
        assert!(
            of_kind.iter().all(|h| h.2 || h.1 == 1),
            "{level}: a {kind}N thread seen at work without its own filter"
        );
    }
}

#[test]
fn a_forbidden_call_on_a_vcpu_stops_the_vm_with_one_line_and_status_1() {
    let out = vmm()
        .args(["run", "--quiet", "--test-seccomp-violation"])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end(), VIOLATION_LINE, "{err}");
}

#[test]
fn without_the_filter_the_same_call_is_harmless() {
    // The test hook alone changes nothing: it is the filter that stops the VM.
    for level in ["off", "log"] {
        let out = vmm()
            .args([
                "run",
                "--quiet",
                "--test-seccomp-violation",
                "--seccomp",
                level,
            ])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{level}: {}", stderr(&out));
        assert!(stdout(&out).contains(RESULT_OK_LINE), "{}", stdout(&out));
    }
}

#[test]
fn a_zone_on_a_host_node_is_filled_by_helpers_pinned_to_its_cpus_under_the_filter() {
    // Each zone's helpers filter themselves, then pin themselves to node 0's CPUs.
    for level in ["on", "log"] {
        let out = vmm()
            .args(["run", "--quiet", "--seccomp", level])
            .args(["--memory-zone", "id=a,size=128M,host_numa_node=0"])
            .args(["--memory-zone", "id=b,size=128M,host_numa_node=0"])
            .args(["--user-device", "none", "--pin", "populate"])
            .output()
            .unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(0), "{level}: {err}");
        assert!(!err.contains("could not pin a helper"), "{level}: {err}");
        assert!(!err.contains("sched_setaffinity"), "{level}: {err}");
    }
}
