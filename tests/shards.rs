//! Shareable guest RAM made of memfd shards, through the real binary: the probe's DMA checks
//! pass in every GiB of a guest whose RAM spans shards on both sides of the 32-bit hole, the
//! device server maps one file per shard, nothing stays mapped or open after a run or a
//! Ctrl-C, huge pages are chosen where the host allows them, and bad shard options are refused
//! before any memory is touched.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Stdio};

mod common;
use common::{assert_far_below_guest_size, output_with_max_rss};
use common::{
    epf_server, run_with_report, server_counts, server_end, stderr, stdout, vmm,
    wait_for_guest_ram_mapped_by,
};
use guest_abi::probe::DMA_OK_PREFIX;
use vmm::pin::HOLD_MARKER;

/// Boots `memory` with the epf server at a socket of its own and extra `args`; returns the
/// report and the server's last line.
fn boot_with_server(memory: &str, args: &[&str]) -> (serde_json::Value, String) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("epf.sock");
    let server = epf_server(&socket);
    let mut all = vec![
        "--memory",
        memory,
        "--user-device",
        socket.to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    let (out, r) = run_with_report(&all);
    let serial = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{serial}\n{}", stderr(&out));
    let dma = serial
        .lines()
        .find(|l| l.starts_with(DMA_OK_PREFIX))
        .unwrap_or_else(|| panic!("no dma ok line:\n{serial}"));
    assert!(dma.ends_with("irq ok"), "{dma}");
    (r.unwrap(), server_end(server))
}

#[test]
fn a_6g_guest_on_gib_shards_passes_dma_in_every_gib_and_the_server_maps_one_file_each() {
    let (r, end) = boot_with_server("6G", &["--backing", "memfd"]);
    assert_eq!(r["pin"]["bytes"].as_u64(), Some(6 << 30), "{r}");
    assert_eq!(r["pin"]["backend"], "vfio-user");
    assert_eq!(r["vm"]["memory_bytes"].as_u64(), Some(6 << 30));
    assert_eq!(r["vm"]["memory_shards"].as_u64(), Some(6), "{r}");
    assert_eq!(r["vm"]["shard_bytes"].as_u64(), Some(1 << 30), "{r}");
    // Exactly one region per chunk of the job (chunks are cut at each shard), none left.
    let (maps, files, left) = server_counts(&end);
    assert_eq!((files, left), (6, 0), "{end}");
    assert_eq!(maps, common::dma_maps_of(&r), "{end}\n{r}");
    assert_eq!(
        maps,
        r["pin"]["map"]["chunks"].as_u64().unwrap(),
        "{end}\n{r}"
    );
}

#[test]
fn smaller_shards_are_more_files_and_chunks_never_straddle_them() {
    let (r, end) = boot_with_server("2G", &["--backing", "memfd", "--memory-shard", "256M"]);
    assert_eq!(r["vm"]["memory_shards"].as_u64(), Some(8), "{r}");
    assert_eq!(r["vm"]["shard_bytes"].as_u64(), Some(256 << 20), "{r}");
    assert!(
        end.contains("from 8 files, 0 regions still mapped"),
        "{end}"
    );
    // One DMA_MAP per chunk piece, and no piece spans two files: at least one per shard.
    let maps: u64 = end
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .expect("a DMA_MAP count");
    assert!(maps >= 8, "{end}");
}

/// The memfds of guest RAM `pid` holds open.
fn guest_ram_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|t| t.to_string_lossy().contains("memfd:vmm-guest-ram"))
        .count()
}

/// The guest-RAM files `pid` has mapped (distinct inodes in /proc/PID/maps).
fn guest_ram_files_mapped(pid: u32) -> usize {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let inodes: std::collections::HashSet<&str> = maps
        .lines()
        .filter(|l| l.contains("memfd:vmm-guest-ram"))
        .filter_map(|l| l.split_whitespace().nth(4))
        .collect();
    inodes.len()
}

/// `vmm run ARGS` with the probe hanging after its checks.
fn paused_run(args: &[&str]) -> Child {
    common::paused_run("probe.hang probe.expect_dma=1", args)
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: signalling our own child, not yet reaped.
    unsafe { libc::kill(child.id() as i32, sig) };
}

/// Reads `err` (a run's stderr) until a `--test-fault hold-*` says it holds at `point`;
/// returns what it read.
fn wait_until_held(err: &mut impl BufRead, point: &str) -> String {
    let want = format!("{HOLD_MARKER}{point}");
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        let n = err.read_line(&mut line).unwrap();
        assert!(n > 0, "vmm ended before it held {point}:\n{seen}");
        seen.push_str(&line);
        if line.trim_end() == want {
            return seen;
        }
    }
}

/// Kills a run the test did not see end (a paused guest never ends by itself, and its
/// server would wait for it).
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_paused_guest_holds_one_memfd_per_shard_and_a_signal_during_teardown_still_frees_all() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("epf.sock");
    let server = epf_server(&socket);
    let server_pid = server.id();
    // Teardown holds after its first DMA_UNMAP and after its last, each time until a signal.
    let mut run = Reap(paused_run(&[
        "--memory",
        "1G",
        "--memory-shard",
        "128M",
        "--user-device",
        socket.to_str().unwrap(),
        "--test-fault",
        "hold-after-first-unmap",
        "--test-fault",
        "hold-after-unpin",
    ]));
    let child = &mut run.0;
    // One memfd per shard in vmm; the server keeps no fd, only its mappings of all 8 files.
    assert_eq!(guest_ram_fds(child.id()), 8);
    assert_eq!(guest_ram_fds(server_pid), 0);
    assert_eq!(guest_ram_files_mapped(server_pid), 8);
    // ... every byte of guest RAM, not only the pages the probe's DMA reached.
    assert_eq!(common::guest_ram_bytes_mapped_by(server_pid), 1 << 30);
    let mut err = BufReader::new(child.stderr.take().unwrap());
    // SIGTERM stops the guest; a SIGINT once DMA_UNMAPs have begun must not cut teardown
    // short (nor change the exit status: the first signal's).
    signal(child, libc::SIGTERM);
    let mut log = wait_until_held(&mut err, "after the first unmap");
    signal(child, libc::SIGINT);
    log += &wait_until_held(&mut err, "after the last unmap");
    // Every DMA_UNMAP answered, the connection still open: the server maps no guest RAM and
    // holds none of it open.
    assert_eq!(guest_ram_files_mapped(server_pid), 0, "{log}");
    assert_eq!(guest_ram_fds(server_pid), 0, "{log}");
    signal(child, libc::SIGINT);
    let status = child.wait().unwrap();
    err.read_to_string(&mut log).unwrap();
    assert_eq!(status.code(), Some(143), "{status}: {log}");
    let end = server_end(server);
    assert!(
        end.contains("from 8 files, 0 regions still mapped"),
        "{end}"
    );
}

#[test]
fn ctrl_c_while_pinning_sharded_ram_leaves_nothing_mapped() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("epf.sock");
    let server = epf_server(&socket);
    let mut child = vmm()
        .args(["run", "--quiet", "--memory", "8G", "--pin-threads", "1"])
        .args(["--user-device", socket.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupt once the server maps guest RAM: pinning is under way, with something to undo.
    wait_for_guest_ram_mapped_by(server.id());
    signal(&child, libc::SIGINT);
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(err.contains("nothing is left pinned"), "{err}");
    let end = server_end(server);
    let (maps, _, still_mapped) = server_counts(&end);
    assert!(maps >= 1 && still_mapped == 0, "{end}");
}

#[test]
fn auto_picks_huge_pages_for_private_ram_where_the_host_allows_them_and_says_why() {
    let thp =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    let allowed = thp.contains("[always]") || thp.contains("[madvise]");
    let (out, r) = run_with_report(&[
        "--memory",
        "1G",
        "--user-device",
        "none",
        "--pin",
        "populate",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let vm = &r.unwrap()["vm"];
    let reason = vm["backing_reason"].as_str().unwrap();
    assert!(reason.starts_with("auto: "), "{vm}");
    assert!(reason.contains("transparent_hugepage/enabled is ["), "{vm}");
    assert_eq!(vm["backing"], if allowed { "thp" } else { "anon" }, "{vm}");
    assert_eq!(vm["memory_shards"].as_u64(), Some(0));
    // What the kernel gave is reported, not what was asked: with THP allowed and 1 GiB
    // populated, some of it is in huge pages (unless the host is too fragmented to give any).
    assert!(vm["huge_bytes"].is_u64(), "{vm}");
}

#[test]
fn bad_shards_and_forbidden_huge_pages_are_refused_before_any_memory_is_touched() {
    let shmem = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
        .unwrap_or_default();
    let mut cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--memory-shard", "3G"], "not a power of two"),
        (
            vec!["--memory-shard", "2K"],
            "smaller than the 4 KiB page size",
        ),
        (
            vec!["--memory", "6G", "--memory-shard", "4G"],
            "give 3 GiB or less",
        ),
        (
            vec![
                "--backing",
                "anon",
                "--user-device",
                "none",
                "--memory-shard",
                "1G",
            ],
            "only shareable RAM is made of shards",
        ),
    ];
    if shmem.contains("[never]") || shmem.contains("[deny]") {
        cases.push((vec!["--backing", "memfd-thp"], "shmem_enabled"));
    }
    for (mut args, needle) in cases {
        // A guest large enough that touching its RAM would show in the peak RSS.
        let mut guest = 4u64 << 30;
        match args.iter().position(|&a| a == "--memory") {
            Some(i) => guest = args[i + 1].trim_end_matches('G').parse::<u64>().unwrap() << 30,
            None => args.extend(["--memory", "4G"]),
        }
        let (out, max_rss) = output_with_max_rss(vmm().args(["run", "--quiet"]).args(&args));
        let err = stderr(&out);
        assert_far_below_guest_size(max_rss, guest, &format!("{args:?}: {err}"));
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(stdout(&out).is_empty(), "the guest never ran: {args:?}");
    }
}

#[test]
fn more_shards_than_the_fd_limit_allows_is_refused_with_the_fix() {
    let exe = env!("CARGO_BIN_EXE_vmm");
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -n 300 && exec {exe} run --quiet --memory 8G --memory-shard 64M"
        ))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("128 shards") && err.contains("ulimit -n"),
        "{err}"
    );
}
