//! Fixture trees shaped like real hosts: this machine (v1 controllers plus a cgroup2 mount),
//! a pure v2 host, and a container whose cgroup mount root is a sub-tree.

use std::fs;
use std::path::Path;

use super::*;

fn write(root: &Path, path: &str, text: &str) {
    let p = under(root, path);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, text).unwrap();
}

const HYBRID_MOUNTS: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

fn hybrid(cpu_path: &str, mem_path: &str) -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    write(t.path(), "/proc/self/mountinfo", HYBRID_MOUNTS);
    write(
        t.path(),
        "/proc/self/cgroup",
        &format!("4:memory:{mem_path}\n3:cpuset:/\n1:cpu:{cpu_path}\n0::/\n"),
    );
    t
}

#[test]
fn v1_quota_of_the_process_cgroup_counts() {
    let t = hybrid("/vmm", "/");
    write(t.path(), "/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "-1\n");
    write(t.path(), "/sys/fs/cgroup/cpu/cpu.cfs_period_us", "100000\n");
    write(
        t.path(),
        "/sys/fs/cgroup/cpu/vmm/cpu.cfs_quota_us",
        "100000\n",
    );
    write(
        t.path(),
        "/sys/fs/cgroup/cpu/vmm/cpu.cfs_period_us",
        "100000\n",
    );
    let cg = Cgroups::read(t.path()).unwrap();
    let q = cg.cpu_quota().unwrap();
    assert_eq!(q.whole(), 1);
    assert!(q.file.ends_with("cpu/vmm/cpu.cfs_quota_us"));
}

#[test]
fn an_ancestors_quota_binds_a_child_without_one() {
    let t = hybrid("/tenant/vmm", "/");
    write(
        t.path(),
        "/sys/fs/cgroup/cpu/tenant/cpu.cfs_quota_us",
        "250000\n",
    );
    write(
        t.path(),
        "/sys/fs/cgroup/cpu/tenant/cpu.cfs_period_us",
        "100000\n",
    );
    write(
        t.path(),
        "/sys/fs/cgroup/cpu/tenant/vmm/cpu.cfs_quota_us",
        "-1\n",
    );
    write(
        t.path(),
        "/sys/fs/cgroup/cpu/tenant/vmm/cpu.cfs_period_us",
        "100000\n",
    );
    let q = Cgroups::read(t.path()).unwrap().cpu_quota().unwrap();
    assert_eq!(q.cpus, 2.5);
    assert_eq!(q.whole(), 2, "2.5 CPUs round down to 2 threads");
    assert!(q.file.ends_with("tenant/cpu.cfs_quota_us"));
}

#[test]
fn the_tightest_of_v1_and_v2_wins() {
    let t = hybrid("/vmm", "/");
    write(
        t.path(),
        "/sys/fs/cgroup/cpu/vmm/cpu.cfs_quota_us",
        "400000\n",
    );
    write(
        t.path(),
        "/sys/fs/cgroup/cpu/vmm/cpu.cfs_period_us",
        "100000\n",
    );
    write(
        t.path(),
        "/sys/fs/cgroup/unified/cpu.max",
        "150000 100000\n",
    );
    let q = Cgroups::read(t.path()).unwrap().cpu_quota().unwrap();
    assert_eq!(q.cpus, 1.5);
    assert!(q.file.ends_with("unified/cpu.max"));
}

#[test]
fn a_fraction_of_a_cpu_still_gets_one_thread() {
    let t = hybrid("/", "/");
    write(t.path(), "/sys/fs/cgroup/unified/cpu.max", "20000 100000\n");
    let q = Cgroups::read(t.path()).unwrap().cpu_quota().unwrap();
    assert_eq!(q.whole(), 1);
}

#[test]
fn max_and_missing_files_mean_no_limit() {
    let t = hybrid("/vmm", "/");
    write(t.path(), "/sys/fs/cgroup/unified/cpu.max", "max 100000\n");
    fs::create_dir_all(under(t.path(), "/sys/fs/cgroup/cpu/vmm")).unwrap();
    assert_eq!(Cgroups::read(t.path()).unwrap().cpu_quota(), None);
}

#[test]
fn pure_v2_host_with_nested_limits() {
    let t = tempfile::tempdir().unwrap();
    write(
        t.path(),
        "/proc/self/mountinfo",
        "25 1 0:22 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n",
    );
    write(
        t.path(),
        "/proc/self/cgroup",
        "0::/machine.slice/vmm.scope\n",
    );
    write(
        t.path(),
        "/sys/fs/cgroup/machine.slice/cpu.max",
        "300000 100000\n",
    );
    write(
        t.path(),
        "/sys/fs/cgroup/machine.slice/vmm.scope/cpu.max",
        "max 100000\n",
    );
    write(
        t.path(),
        "/sys/fs/cgroup/machine.slice/memory.max",
        "8589934592\n",
    );
    write(
        t.path(),
        "/sys/fs/cgroup/machine.slice/memory.current",
        "1073741824\n",
    );
    write(
        t.path(),
        "/sys/fs/cgroup/machine.slice/vmm.scope/memory.max",
        "max\n",
    );
    write(
        t.path(),
        "/sys/fs/cgroup/machine.slice/vmm.scope/cpuset.mems.effective",
        "0-1\n",
    );
    let cg = Cgroups::read(t.path()).unwrap();
    assert_eq!(cg.cpu_quota().unwrap().whole(), 3);
    let m = cg.memory_room().unwrap();
    assert_eq!(m.room(), 7 << 30);
    assert!(m.file.ends_with("machine.slice/memory.max"));
    assert_eq!(cg.cpuset_mems().as_deref(), Some("0-1"));
}

#[test]
fn v1_memory_limit_and_unlimited_sentinel() {
    let t = hybrid("/", "/box");
    write(
        t.path(),
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
        "9223372036854771712\n",
    );
    write(
        t.path(),
        "/sys/fs/cgroup/memory/box/memory.limit_in_bytes",
        "2147483648\n",
    );
    write(
        t.path(),
        "/sys/fs/cgroup/memory/box/memory.usage_in_bytes",
        "536870912\n",
    );
    let m = Cgroups::read(t.path()).unwrap().memory_room().unwrap();
    assert_eq!((m.limit, m.room()), (2 << 30, 3 << 29));
}

#[test]
fn container_mount_root_is_stripped() {
    // Inside a container the cgroup mount's root is the container's own cgroup.
    let t = tempfile::tempdir().unwrap();
    write(
        t.path(),
        "/proc/self/mountinfo",
        "40 30 0:38 /kubepods/pod1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n",
    );
    write(t.path(), "/proc/self/cgroup", "0::/kubepods/pod1/ctr\n");
    write(t.path(), "/sys/fs/cgroup/ctr/cpu.max", "200000 100000\n");
    let cg = Cgroups::read(t.path()).unwrap();
    assert_eq!(
        cg.v2.as_ref().unwrap().dir,
        under(t.path(), "/sys/fs/cgroup/ctr")
    );
    assert_eq!(cg.cpu_quota().unwrap().whole(), 2);
}

/// Found by the `cgroup` fuzz target: a cgroup path with `..` (what a process in a cgroup
/// outside its cgroup namespace sees) made the limits be read from outside the cgroup mount.
#[test]
fn cgroups_outside_the_mount_are_ignored() {
    let t = tempfile::tempdir().unwrap();
    write(
        t.path(),
        "/proc/self/mountinfo",
        "40 30 0:38 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n\
         41 30 0:39 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n\
         42 30 0:40 / /mnt/../sys/fs/memory rw - cgroup cgroup rw,memory\n",
    );
    write(
        t.path(),
        "/proc/self/cgroup",
        "0::/../../etc\n2:cpu:/ok\n3:memory:/\n",
    );
    // What a path joined without care would read.
    write(t.path(), "/etc/cpu.max", "100000 100000\n");
    write(
        t.path(),
        "/sys/fs/cgroup/cpu/ok/cpu.cfs_quota_us",
        "200000\n",
    );
    write(
        t.path(),
        "/sys/fs/cgroup/cpu/ok/cpu.cfs_period_us",
        "100000\n",
    );
    let cg = Cgroups::read(t.path()).unwrap();
    assert_eq!(cg.v2, None);
    assert_eq!(cg.v1_memory, None);
    assert_eq!(
        cg.cpu_quota().unwrap().whole(),
        2,
        "the v1 limit, not /etc/cpu.max"
    );
}

#[test]
fn escaped_mount_points_are_decoded() {
    assert_eq!(unescape(r"/mnt/with\040space"), "/mnt/with space");
}

#[test]
fn this_host_reads_without_error() {
    // Whatever this machine has, reading it must not fail or panic.
    let cg = Cgroups::read(Path::new("/")).unwrap();
    let _ = cg.cpu_quota();
    let _ = cg.memory_room();
}
