//! The host's NUMA topology as this process sees it: which memory nodes exist and are online,
//! their CPUs, memory, distances and free huge pages (from `/sys/devices/system/node`), and
//! which nodes the process may allocate on (its cpuset's `cpuset.mems.effective` or v1
//! `cpuset.mems`, and `Mems_allowed_list` in `/proc/self/status`, which also reflects a
//! parent's restriction). Everything is read under a root directory, so tests describe
//! two-socket, four-node, memory-only (CXL) and offline-node hosts as fixture trees.
//!
//! Reading never fails and never panics: a file that is missing or says something odd leaves
//! its field empty, and [`HostTopology::check_node`] then refuses what it cannot vouch for.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::cgroup::Cgroups;
use crate::class::{Classify, ErrorClass};
use crate::procfs::{self, under};

/// Where the kernel lists memory nodes.
pub const SYSFS_NODES: &str = "/sys/devices/system/node";

/// Node numbers at or above this are not real (Linux's MAX_NUMNODES is at most 1 << 10);
/// a list that names one is not expanded past it.
pub const MAX_NODES: u32 = 1 << 10;

/// Huge page sizes per node kept at most; hosts have two or three.
const MAX_HUGE_SIZES: usize = 8;

/// One host memory node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HostNode {
    pub id: u32,
    /// Its CPUs (none on a memory-only node, such as CXL memory, or an offline one).
    pub cpus: Vec<usize>,
    /// Its RAM in bytes (`nodeN/meminfo` MemTotal; 0 when unknown or CPU-only).
    pub mem_total: u64,
    pub online: bool,
    /// Distances to every node, in the order of `nodeN/distance` (node ids in order).
    pub distances: Vec<u8>,
    /// Free huge pages per page size: `(page size in bytes, free pages)`.
    pub free_huge_pages: Vec<(u64, u64)>,
}

impl HostNode {
    /// Free huge pages of `page_size` bytes on this node (0 when it has none of that size).
    pub fn free_huge_pages(&self, page_size: u64) -> u64 {
        self.free_huge_pages
            .iter()
            .find(|&&(size, _)| size == page_size)
            .map_or(0, |&(_, free)| free)
    }
}

/// The nodes a cpuset lets this process allocate on, and the file that says so.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CpusetMems {
    pub nodes: Vec<u32>,
    pub file: PathBuf,
}

/// The host's memory nodes and this process's share of them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HostTopology {
    /// Every possible node, in id order (offline ones too, with `online: false`).
    pub nodes: Vec<HostNode>,
    /// `Mems_allowed_list` from `/proc/self/status`; `None` when it cannot be read.
    pub mems_allowed: Option<Vec<u32>>,
    /// The cgroup cpuset's memory nodes; `None` without a cpuset that says.
    pub cpuset_mems: Option<CpusetMems>,
}

/// Why a host node cannot hold a memory zone.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NodeError {
    #[error(
        "host NUMA node {node} does not exist on this host (its nodes: {known}); give one of those"
    )]
    Missing { node: u32, known: String },
    #[error("host NUMA node {node} is offline; give an online node ({online})")]
    Offline { node: u32, online: String },
    #[error("host NUMA node {node} has no memory (a CPU-only node); give a node with memory ({with_memory})")]
    NoMemory { node: u32, with_memory: String },
    #[error("host NUMA node {node} is outside this process's cpuset ({} allows {allowed}); give one of those nodes or widen the cpuset", file.display())]
    OutsideCpuset {
        node: u32,
        file: PathBuf,
        allowed: String,
    },
    #[error("host NUMA node {node} is outside this process's Mems_allowed_list ({allowed}, in /proc/self/status: a cpuset or memory policy set by whoever started it); give one of those nodes or start vmm without the restriction")]
    OutsideMemsAllowed { node: u32, allowed: String },
}

impl Classify for NodeError {
    /// A node number is the user's input, and the restrictions are the user's setup.
    fn class(&self) -> ErrorClass {
        ErrorClass::User
    }
}

/// Node ids as a kernel list (`0-1,3`), or `none`.
pub fn node_list(ids: impl IntoIterator<Item = u32>) -> String {
    let mut ids: Vec<u32> = ids.into_iter().collect();
    ids.sort_unstable();
    ids.dedup();
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < ids.len() {
        let mut j = i;
        while j + 1 < ids.len() && ids[j + 1] == ids[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            ids[i].to_string()
        } else {
            format!("{}-{}", ids[i], ids[j])
        });
        i = j + 1;
    }
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(",")
    }
}

impl HostTopology {
    /// The topology of this host, as this process sees it.
    pub fn detect() -> Self {
        Self::read(Path::new("/"))
    }

    /// Reads the topology under `root` (a fixture tree in tests).
    pub fn read(root: &Path) -> Self {
        let sys = under(root, SYSFS_NODES);
        let list = |file: &str| {
            procfs::read(&sys.join(file))
                .ok()
                .and_then(|t| parse_node_list(&t))
        };
        let online = list("online");
        let ids = list("possible")
            .or_else(|| online.clone())
            .unwrap_or_else(|| node_dirs(&sys));
        let nodes = ids
            .into_iter()
            .map(|id| {
                let online = online.as_ref().is_none_or(|o| o.contains(&id));
                read_node(&sys.join(format!("node{id}")), id, online)
            })
            .collect();
        let mems_allowed = procfs::read(&under(root, "/proc/self/status"))
            .ok()
            .and_then(|t| parse_mems_allowed(&t));
        let cpuset_mems = Cgroups::read(root)
            .ok()
            .and_then(|cg| cg.cpuset_mems_file())
            .and_then(|(file, text)| {
                Some(CpusetMems {
                    nodes: parse_node_list(&text)?,
                    file,
                })
            });
        HostTopology {
            nodes,
            mems_allowed,
            cpuset_mems,
        }
    }

    /// The node with this id, if the host has it.
    pub fn node(&self, id: u32) -> Option<&HostNode> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// The CPUs of node `id` among `allowed` (the process's affinity): where the helpers that
    /// fill memory bound to that node run. Empty for a memory-only node, or one whose CPUs
    /// the process may not use: its memory is then filled from anywhere allowed.
    pub fn cpus_within(&self, id: u32, allowed: &[usize]) -> Vec<usize> {
        self.node(id).map_or_else(Vec::new, |n| {
            n.cpus
                .iter()
                .copied()
                .filter(|c| allowed.contains(c))
                .collect()
        })
    }

    /// The nodes this process may allocate on: online, with memory, and allowed by both
    /// the cpuset and `Mems_allowed_list`.
    #[cfg(test)]
    pub fn allowed(&self) -> Vec<u32> {
        self.nodes
            .iter()
            .filter(|n| self.check_node(n.id).is_ok())
            .map(|n| n.id)
            .collect()
    }

    /// The node `id`, if this process may put a memory zone there; else why not, naming
    /// what restricts it.
    pub fn check_node(&self, id: u32) -> Result<&HostNode, NodeError> {
        let Some(node) = self.node(id) else {
            return Err(NodeError::Missing {
                node: id,
                known: node_list(self.nodes.iter().map(|n| n.id)),
            });
        };
        if !node.online {
            return Err(NodeError::Offline {
                node: id,
                online: node_list(self.nodes.iter().filter(|n| n.online).map(|n| n.id)),
            });
        }
        if node.mem_total == 0 {
            return Err(NodeError::NoMemory {
                node: id,
                with_memory: node_list(
                    self.nodes
                        .iter()
                        .filter(|n| n.online && n.mem_total > 0)
                        .map(|n| n.id),
                ),
            });
        }
        if let Some(c) = &self.cpuset_mems {
            if !c.nodes.contains(&id) {
                return Err(NodeError::OutsideCpuset {
                    node: id,
                    file: c.file.clone(),
                    allowed: node_list(c.nodes.iter().copied()),
                });
            }
        }
        if let Some(allowed) = &self.mems_allowed {
            if !allowed.contains(&id) {
                return Err(NodeError::OutsideMemsAllowed {
                    node: id,
                    allowed: node_list(allowed.iter().copied()),
                });
            }
        }
        Ok(node)
    }
}

/// The `nodeN` directories under `sys`, for a host without `possible` and `online` files.
fn node_dirs(sys: &Path) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir(sys) else {
        return Vec::new();
    };
    let mut ids: Vec<u32> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("node")?.parse().ok())
        .filter(|&id| id < MAX_NODES)
        .take(MAX_NODES as usize)
        .collect();
    ids.sort_unstable();
    ids
}

fn read_node(dir: &Path, id: u32, online: bool) -> HostNode {
    let text = |file: &str| procfs::read(&dir.join(file)).ok();
    HostNode {
        id,
        cpus: text("cpulist")
            .and_then(|t| procfs::parse_cpu_list(&t))
            .unwrap_or_default(),
        mem_total: text("meminfo")
            .and_then(|t| parse_node_mem_total(&t))
            .unwrap_or(0),
        online,
        distances: text("distance")
            .and_then(|t| parse_distances(&t))
            .unwrap_or_default(),
        free_huge_pages: read_huge_pages(&dir.join("hugepages")),
    }
}

/// `hugepages/hugepages-<kB>kB/free_hugepages` for each page size the node has.
fn read_huge_pages(dir: &Path) -> Vec<(u64, u64)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut sizes: Vec<(u64, u64)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let size = parse_huge_page_dir(e.file_name().to_str()?)?;
            let free = procfs::read(&e.path().join("free_hugepages")).ok()?;
            Some((size, free.trim().parse().ok()?))
        })
        .take(MAX_HUGE_SIZES)
        .collect();
    sizes.sort_unstable();
    sizes
}

/// A node list (`0-1,3`, the kernel's CPU-list syntax), each id below [`MAX_NODES`].
pub(crate) fn parse_node_list(text: &str) -> Option<Vec<u32>> {
    procfs::parse_cpu_list(text)?
        .into_iter()
        .map(|id| u32::try_from(id).ok().filter(|&id| id < MAX_NODES))
        .collect()
}

/// `Mems_allowed_list` of a `/proc/<pid>/status` text.
pub(crate) fn parse_mems_allowed(status: &str) -> Option<Vec<u32>> {
    parse_node_list(procfs::field(status, "Mems_allowed_list")?)
}

/// MemTotal of a `nodeN/meminfo` text (`Node 0 MemTotal:  24683772 kB`), in bytes.
pub(crate) fn parse_node_mem_total(text: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        if !key.trim_end().ends_with(" MemTotal") && key.trim() != "MemTotal" {
            return None;
        }
        let kb: u64 = value.trim().strip_suffix("kB")?.trim().parse().ok()?;
        kb.checked_mul(1024)
    })
}

/// A `nodeN/distance` text: one distance per node, each 0..=255.
pub(crate) fn parse_distances(text: &str) -> Option<Vec<u8>> {
    let distances: Option<Vec<u8>> = text
        .split_whitespace()
        .take(MAX_NODES as usize + 1)
        .map(|d| d.parse().ok())
        .collect();
    distances.filter(|d| d.len() <= MAX_NODES as usize)
}

/// The page size in bytes of a `hugepages-<kB>kB` directory name.
pub(crate) fn parse_huge_page_dir(name: &str) -> Option<u64> {
    let kb: u64 = name
        .strip_prefix("hugepages-")?
        .strip_suffix("kB")?
        .parse()
        .ok()?;
    kb.checked_mul(1024).filter(|&b| b > 0)
}

#[cfg(test)]
mod tests;
