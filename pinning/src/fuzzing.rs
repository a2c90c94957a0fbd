//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`): the parsers of the
//! /proc, /sys and cgroup files this crate reads, without the file reading. Not an API.

use std::path::{Path, PathBuf};

pub use crate::cgroup::{CpuQuota, MemoryLimit};
pub use crate::procfs::{kb_field, ProcStatus};

/// One hierarchy found by [`cgroups`]: which one, the process's cgroup directory, the mount
/// it lives under, and the directories [`crate::cgroup`] reads limits from (innermost first).
#[derive(Clone, Debug)]
pub struct FoundHierarchy {
    pub name: &'static str,
    pub dir: PathBuf,
    pub mount: PathBuf,
    pub lineage: Vec<PathBuf>,
}

/// The hierarchies `/proc/self/cgroup` (`membership`) and `/proc/self/mountinfo` describe
/// under `root`.
pub fn cgroups(root: &Path, membership: &str, mountinfo: &str) -> Vec<FoundHierarchy> {
    let cg = crate::cgroup::Cgroups::parse(root, membership, mountinfo);
    [
        ("v1 cpu", cg.v1_cpu),
        ("v1 memory", cg.v1_memory),
        ("v1 cpuset", cg.v1_cpuset),
        ("v2", cg.v2),
    ]
    .into_iter()
    .filter_map(|(name, h)| {
        let h = h?;
        // Bounded: a hierarchy deeper than this is not what the target looks for.
        let lineage = h.lineage().take(4096).map(Path::to_path_buf).collect();
        Some(FoundHierarchy {
            name,
            dir: h.dir,
            mount: h.mount,
            lineage,
        })
    })
    .collect()
}

/// `ProcStatus::parse`.
pub fn proc_status(text: &str) -> ProcStatus {
    ProcStatus::parse(text)
}

/// `ProcStatus::has_cap` for the capabilities the crate asks about (IPC_LOCK, SYS_NICE).
pub fn status_caps(status: &ProcStatus) -> (bool, bool) {
    (
        status.has_cap(crate::procfs::CAP_IPC_LOCK),
        status.has_cap(crate::procfs::CAP_SYS_NICE),
    )
}

/// A kernel CPU list (`/sys/devices/system/cpu/online`).
pub fn cpu_list(text: &str) -> Option<Vec<usize>> {
    crate::procfs::parse_cpu_list(text)
}

/// A cgroup v1 CPU limit from `cpu.cfs_quota_us` and `cpu.cfs_period_us`.
pub fn v1_quota(quota: &str, period: &str) -> Option<CpuQuota> {
    crate::cgroup::parse_v1_quota(quota, period, PathBuf::from("cpu.cfs_quota_us"))
}

/// A cgroup v2 CPU limit from `cpu.max`.
pub fn v2_quota(text: &str) -> Option<CpuQuota> {
    crate::cgroup::parse_v2_quota(text, PathBuf::from("cpu.max"))
}

/// A memory limit from its limit and usage files.
pub fn memory(limit: &str, usage: Option<&str>) -> Option<MemoryLimit> {
    crate::cgroup::parse_memory(limit, usage, PathBuf::from("memory.max"))
}

/// The parsers of [`crate::topology`]: a node list, `Mems_allowed_list` of a status text,
/// a node's MemTotal, a distance line and a huge-page directory name.
pub fn topology(text: &str) -> TopologyParts {
    use crate::topology as t;
    TopologyParts {
        nodes: t::parse_node_list(text),
        mems_allowed: t::parse_mems_allowed(text),
        mem_total: t::parse_node_mem_total(text),
        distances: t::parse_distances(text),
        huge_page_size: t::parse_huge_page_dir(text),
    }
}

/// What [`topology`] found in one text.
#[derive(Clone, Debug)]
pub struct TopologyParts {
    pub nodes: Option<Vec<u32>>,
    pub mems_allowed: Option<Vec<u32>>,
    pub mem_total: Option<u64>,
    pub distances: Option<Vec<u8>>,
    pub huge_page_size: Option<u64>,
}
