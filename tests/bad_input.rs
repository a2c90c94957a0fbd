//! Malformed invocations of every subcommand, in one table: each exits with status 2 before
//! any memory is touched or any guest runs, says what is wrong in its first line (naming the
//! input, and the fix where the user has one), never panics, and leaves no device server or
//! socket folder behind.

use std::path::Path;

mod common;
use common::{assert_far_below_guest_size, output_with_max_rss, stderr, stdout, vmm};

/// Free hugetlb pages of `kb` KiB on this host.
fn free_huge_pages(kb: u64) -> u64 {
    std::fs::read_to_string(format!(
        "/sys/kernel/mm/hugepages/hugepages-{kb}kB/free_hugepages"
    ))
    .ok()
    .and_then(|s| s.trim().parse().ok())
    .unwrap_or(0)
}

/// The device servers' socket folders in `tmp` now.
fn epf_folders(tmp: &str) -> Vec<String> {
    std::fs::read_dir(Path::new(tmp))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("vmm-") && n.contains("-epf-"))
        .collect()
}

#[test]
fn every_malformed_invocation_is_status_2_with_one_line_naming_the_input() {
    let dir = tempfile::tempdir().unwrap();
    let d = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    let (not_elf, empty, refused) = (d("not-elf"), d("empty"), d("refused.sock"));
    std::fs::write(&not_elf, b"hello\n").unwrap();
    std::fs::write(&empty, b"").unwrap();
    // Bound but never listening: connecting is refused.
    let _bound = std::os::unix::net::UnixDatagram::bind(&refused).unwrap();
    let tmp = std::env::temp_dir().to_string_lossy().into_owned();

    let mut cases: Vec<(Vec<&str>, &str)> = vec![
        // Sizes and counts.
        (vec!["run", "--memory", "0"], "more than zero"),
        (vec!["run", "--memory", "32M"], "below the minimum"),
        (vec!["run", "--memory", "4Q"], "`4Q` is not a size"),
        (vec!["run", "--memory", "1T"], "more than this host's RAM"),
        (vec!["run", "--memory", "64M+1"], "is not a size"),
        (vec!["run", "--cpus", "0"], "'--cpus"),
        (vec!["run", "--cpus", "255"], "1..=254"),
        (vec!["run", "--cpus", "x"], "'--cpus"),
        (vec!["run", "--timeout", "0"], "--timeout 0"),
        (vec!["run", "--timeout", "1e19"], "at most 31536000"),
        (vec!["run", "--timeout", "nan"], "--timeout NaN"),
        (vec!["run", "--pin-threads", "0"], "not a thread count"),
        (vec!["run", "--pin-threads", "5000"], "from 1 to 4096"),
        // Memory shards and backings.
        (vec!["run", "--memory-shard", "3G"], "not a power of two"),
        (
            vec!["run", "--memory-shard", "2K"],
            "smaller than the 4 KiB page size",
        ),
        (
            vec!["run", "--memory", "6G", "--memory-shard", "4G"],
            "give 3 GiB or less",
        ),
        (
            vec![
                "run",
                "--backing",
                "thp",
                "--user-device",
                "none",
                "--memory-shard",
                "1G",
            ],
            "only shareable RAM",
        ),
        (vec!["run", "--backing", "bogus"], "`bogus`: use auto"),
        (
            vec!["run", "--backing", "anon", "--user-device", "epf"],
            "needs shareable memory",
        ),
        // Conflicting options.
        (vec!["run", "--pin", "bogus"], "`bogus`: use auto"),
        (
            vec!["run", "--pin", "populate", "--user-device", "epf"],
            "--pin populate",
        ),
        (
            vec!["run", "--pin", "type1", "--user-device", "none"],
            "--pin type1",
        ),
        (vec!["run", "--iommu", "bogus"], "\"bogus\""),
        (vec!["run", "--boot-protocol", "bogus"], "\"bogus\""),
        (vec!["run", "--cmdline-bogus"], "--cmdline-bogus"),
        // Paths: missing, a folder, not a kernel.
        (
            vec!["run", "--kernel", "/nonexistent/vmlinux", "--memory", "8G"],
            "/nonexistent/vmlinux",
        ),
        (
            vec!["run", "--kernel", &tmp, "--user-device", "none"],
            "not a regular file",
        ),
        (
            vec!["run", "--kernel", &not_elf, "--user-device", "none"],
            "neither an ELF",
        ),
        (
            vec!["run", "--kernel", &empty, "--user-device", "none"],
            "neither an ELF",
        ),
        (
            vec!["run", "--initrd", "/nonexistent/initrd"],
            "/nonexistent/initrd",
        ),
        (vec!["run", "--initrd", &tmp], "not a regular file"),
        (
            vec!["run", "--report", "/nonexistent/dir/r.json"],
            "--report",
        ),
        (
            vec!["run", "--serial-log", "/nonexistent/dir/s.log"],
            "/nonexistent/dir/s.log",
        ),
        (vec!["run", "--serial-log-max", "0"], "more than zero"),
        // Devices: sockets that are not there, not sockets, or not listening.
        (
            vec!["run", "--user-device", "/nonexistent.sock"],
            "/nonexistent.sock",
        ),
        (
            vec!["run", "--user-device", &not_elf],
            "is not a Unix socket",
        ),
        (vec!["run", "--user-device", &refused], "refused.sock"),
        (vec!["run", "--user-device", ""], "give `epf` or the path"),
        (
            vec!["run", "--device", "/nonexistent"],
            "no such PCI device",
        ),
        (
            vec!["run", "--device", "0000:99:00.0", "--iommu", "iommufd"],
            "0000:99:00.0",
        ),
        // pin-bench.
        (vec!["pin-bench"], "--memory"),
        (vec!["pin-bench", "--memory", "0"], "more than zero"),
        (
            vec!["pin-bench", "--memory", "1G", "--threads", "0"],
            "not a thread count",
        ),
        (
            vec!["pin-bench", "--memory", "1G", "--runs", "0"],
            "'--runs",
        ),
        (
            vec!["pin-bench", "--memory", "1G", "--pin", "bogus"],
            "'bogus'",
        ),
        (
            vec![
                "pin-bench",
                "--memory",
                "1G",
                "--memory-shard",
                "3M",
                "--backing",
                "memfd",
            ],
            "not a power of two",
        ),
        // bench startup.
        (
            vec!["bench", "startup", "--memory", "4Q", "--qemu", "none"],
            "`4Q`",
        ),
        (
            vec!["bench", "startup", "--backing", "nope", "--qemu", "none"],
            "'nope'",
        ),
        (
            vec!["bench", "startup", "--pin-threads", "0", "--qemu", "none"],
            "not a thread count",
        ),
        (
            vec!["bench", "startup", "--qemu", "/nonexistent/qemu"],
            "/nonexistent/qemu",
        ),
        // Memory zones and guest NUMA nodes (Cloud Hypervisor's syntax).
        (vec!["run", "--memory-zone", "id=a"], "give the zone a size"),
        (
            vec!["run", "--numa", "guest_numa_id=0,cpus=[0"],
            "without its `]`",
        ),
        (
            vec!["run", "--memory-zone", "id=a,size=1025K"],
            "id=a,size=1.0 MiB (1049600 bytes): not a multiple of the 4 KiB page size",
        ),
        (
            vec![
                "run",
                "--memory-zone",
                "id=a,size=128M",
                "--memory-zone",
                "id=a,size=128M",
            ],
            "--memory-zone id=a is given twice",
        ),
        (
            vec![
                "run",
                "--memory",
                "512M",
                "--memory-zone",
                "id=a,size=128M",
                "--memory-zone",
                "id=b,size=128M",
            ],
            "--memory 512 MiB but the --memory-zone sizes add up to 256 MiB",
        ),
        (
            vec!["run", "--memory-zone", "id=a,size=32M"],
            "the --memory-zone sizes add up to 32 MiB, below the guest minimum of 64 MiB",
        ),
        (
            vec!["run", "--numa", "guest_numa_id=0,cpus=[0]"],
            "--numa needs --memory-zone",
        ),
        (
            vec![
                "run",
                "--memory-zone",
                "id=a,size=128M",
                "--numa",
                "guest_numa_id=1,cpus=[0],memory_zones=[a]",
            ],
            "no gap, and 0 is missing",
        ),
        (
            vec![
                "run",
                "--memory-zone",
                "id=a,size=128M",
                "--numa",
                "guest_numa_id=0,cpus=[0],memory_zones=[a]",
                "--numa",
                "guest_numa_id=1",
            ],
            "--numa guest_numa_id=1 has neither cpus nor memory_zones",
        ),
        (
            vec![
                "run",
                "--cpus",
                "2",
                "--memory-zone",
                "id=a,size=128M",
                "--memory-zone",
                "id=b,size=128M",
                "--numa",
                "guest_numa_id=0,cpus=[0],memory_zones=[a],distances=[1@20]",
                "--numa",
                "guest_numa_id=1,cpus=[1],memory_zones=[b],distances=[0@30]",
            ],
            "gives distance 20 to node 1, but guest_numa_id=1 gives 30 back",
        ),
        (
            vec![
                "run",
                "--memory-zone",
                "id=a,size=128M",
                "--memory-zone",
                "id=b,size=128M",
                "--numa",
                "guest_numa_id=0,cpus=[0],memory_zones=[a]",
            ],
            "--memory-zone id=b is in no --numa node",
        ),
        (
            vec![
                "run",
                "--memory-zone",
                "id=a,size=128M",
                "--numa",
                "guest_numa_id=0,cpus=[0],memory_zones=[a,c]",
            ],
            "memory_zones names c, which no --memory-zone defines",
        ),
        (
            vec![
                "run",
                "--memory-zone",
                "id=a,size=128M",
                "--numa",
                "guest_numa_id=0,cpus=[0],memory_zones=[a]",
                "--numa",
                "guest_numa_id=1,memory_zones=[a]",
            ],
            "--memory-zone id=a is in guest nodes 0 and 1",
        ),
        (
            vec![
                "run",
                "--memory-zone",
                "id=a,size=128M",
                "--numa",
                "guest_numa_id=0,cpus=[0,3],memory_zones=[a]",
            ],
            "cpus names vCPU 3, but --cpus 1 gives vCPUs 0-0",
        ),
        (
            vec![
                "run",
                "--cpus",
                "2",
                "--memory-zone",
                "id=a,size=128M",
                "--memory-zone",
                "id=b,size=128M",
                "--numa",
                "guest_numa_id=0,cpus=[0-1],memory_zones=[a]",
                "--numa",
                "guest_numa_id=1,cpus=[1],memory_zones=[b]",
            ],
            "vCPU 1 is in guest nodes 0 and 1",
        ),
        (
            vec![
                "run",
                "--cpus",
                "2",
                "--memory-zone",
                "id=a,size=128M",
                "--numa",
                "guest_numa_id=0,cpus=[0],memory_zones=[a]",
            ],
            "vCPU 1 is in no --numa node",
        ),
        (
            vec![
                "run",
                "--memory-zone",
                "id=a,size=128M",
                "--numa",
                "guest_numa_id=0,cpus=[0],memory_zones=[a],distances=[5@20]",
            ],
            "distances names node 5, which no --numa defines",
        ),
        (
            vec!["run", "--memory-zone", "id=far,size=1G,host_numa_node=7"],
            "--memory-zone id=far,host_numa_node=7: host NUMA node 7 does not exist",
        ),
        // device epf.
        (vec!["device", "epf"], "--socket"),
        (
            vec!["device", "epf", "--socket", "/nonexistent/dir/s.sock"],
            "/nonexistent/dir/s.sock",
        ),
        // --socket-fd: stdin (/dev/null here), a descriptor not open, a negative one, both.
        (
            vec!["device", "epf", "--socket-fd", "0"],
            "--socket-fd 0: not a socket",
        ),
        (
            vec!["device", "epf", "--socket-fd", "1000000"],
            "--socket-fd 1000000: not an open descriptor",
        ),
        (vec!["device", "epf", "--socket-fd=-1"], "--socket-fd <FD>"),
        (
            vec!["device", "epf", "--socket", "s.sock", "--socket-fd", "0"],
            "cannot be used with",
        ),
    ];
    // Exactly, not at least: a case dropped by mistake (a merge, an edit) is a failure here.
    // Nine guest nodes, one more than the built-in probe reads.
    let mut nine: Vec<&'static str> = vec!["run"];
    for n in 0..9 {
        let cpus = if n == 0 { "cpus=[0]," } else { "" };
        nine.extend([
            "--memory-zone",
            String::leak(format!("id=z{n},size=8M")),
            "--numa",
            String::leak(format!("guest_numa_id={n},{cpus}memory_zones=[z{n}]")),
        ]);
    }
    cases.push((nine, "the built-in probe guest reads at most 8 guest nodes"));
    assert_eq!(cases.len(), 75, "the table's cases");
    // hugetlb without reserved pages (skipped where a host has reserved enough).
    if free_huge_pages(2048) < 32 {
        cases.push((
            vec!["run", "--backing", "hugetlb", "--memory", "64M"],
            "nr_hugepages",
        ));
    }
    if free_huge_pages(1 << 20) < 1 {
        cases.push((
            vec!["pin-bench", "--memory", "1G", "--backing", "hugetlb-1g"],
            "nr_hugepages",
        ));
    }
    // hugepages=on on a host node without free huge pages.
    let node0_free = std::fs::read_to_string(
        "/sys/devices/system/node/node0/hugepages/hugepages-2048kB/free_hugepages",
    )
    .ok()
    .and_then(|s| s.trim().parse::<u64>().ok());
    // More huge pages than node 0 has free, however many that is (and at least the guest
    // minimum of 64 MiB).
    if let Some(free) = node0_free {
        let pages = (free + 1).max(32);
        let zone = format!("id=h,size={}M,host_numa_node=0,hugepages=on", pages * 2);
        let needle = format!("need {pages} free 2 MiB huge pages, and it has {free}");
        cases.push((
            vec!["run", "--memory-zone", String::leak(zone)],
            String::leak(needle),
        ));
    }
    let before = epf_folders(&tmp);

    for (args, needle) in &cases {
        let (out, max_rss) = output_with_max_rss(vmm().args(args));
        let err = stderr(&out);
        let first = err.lines().next().unwrap_or("");
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        // clap names a missing option on the line after its heading.
        let head: String = err.lines().take(2).collect();
        assert!(head.contains(needle), "{args:?}: {needle:?} not in {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        // Our own refusals are one line; clap's add a usage hint after a blank line.
        if first.starts_with("vmm: ") {
            assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        }
        assert!(stdout(&out).is_empty(), "no guest ran: {args:?}");
        // Refused before guest RAM was touched: under a sixteenth of the default guest, where
        // any case that touched its guest RAM (64 MiB at the least) would be far above.
        assert_far_below_guest_size(max_rss, 256 << 20, &format!("{args:?}"));
    }
    // No device server's socket folder is left behind by any of them.
    let left: Vec<_> = epf_folders(&tmp)
        .into_iter()
        .filter(|n| !before.contains(n))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
