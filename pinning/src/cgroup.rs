//! Where the process sits in the cgroup hierarchies and what they allow it.
//!
//! Both cgroup v1 and v2 may be mounted at once (this machine has the v1 cpu, cpuset and
//! memory controllers plus a cgroup2 mount), and a limit set on any ancestor applies to
//! everything below it, so every question here is answered over the process's cgroup and
//! all its ancestors, in every hierarchy that has the controller, and the tightest wins.

use std::io;
use std::path::{Component, Path, PathBuf};

use crate::procfs::{self, under};

/// Reads one limit from one cgroup directory.
type Reader<T> = fn(&Path) -> Option<T>;

/// One hierarchy: the process's cgroup directory and the mount it lives under.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Hierarchy {
    pub(crate) dir: PathBuf,
    pub(crate) mount: PathBuf,
}

impl Hierarchy {
    /// The cgroup's directory and each ancestor up to the hierarchy's root, innermost first.
    pub(crate) fn lineage(&self) -> impl Iterator<Item = &Path> {
        let mount = self.mount.clone();
        self.dir
            .ancestors()
            .take_while(move |p| p.starts_with(&mount))
    }
}

/// The hierarchies relevant to pinning.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Cgroups {
    pub(crate) v1_cpu: Option<Hierarchy>,
    pub(crate) v1_memory: Option<Hierarchy>,
    pub(crate) v1_cpuset: Option<Hierarchy>,
    pub(crate) v2: Option<Hierarchy>,
}

struct Mount {
    root: String,
    point: String,
    fstype: String,
    super_opts: Vec<String>,
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            if let Some(v) = std::str::from_utf8(&bytes[i + 1..i + 4])
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let pre: Vec<&str> = pre.split(' ').collect();
            let post: Vec<&str> = post.split(' ').collect();
            Some(Mount {
                root: unescape(pre.get(3)?),
                point: unescape(pre.get(4)?),
                fstype: post.first()?.to_string(),
                super_opts: post
                    .get(2)
                    .unwrap_or(&"")
                    .split(',')
                    .map(str::to_string)
                    .collect(),
            })
        })
        .collect()
}

/// The directory of cgroup `path` inside a mount whose own root is `mount.root`, if the
/// mount shows it. In a cgroup namespace a process whose cgroup lies outside the namespace
/// sees a path such as `/../sibling`: joined to the mount, that names a directory outside
/// the cgroup file system (and `lineage` would not notice, since `Path::starts_with` does
/// not resolve `..`), so such a cgroup, or a mount point with `..`, yields none.
fn locate(root: &Path, mount: &Mount, path: &str) -> Option<Hierarchy> {
    // In a cgroup namespace or a bind mount the mount's root is a sub-tree: strip it.
    let rel = if mount.root == "/" {
        path
    } else {
        path.strip_prefix(mount.root.as_str()).unwrap_or(path)
    };
    let up = |p: &str| Path::new(p).components().any(|c| c == Component::ParentDir);
    if up(rel) || up(&mount.point) {
        tracing::debug!(
            "cgroup {path:?} is outside what the mount at {:?} shows; ignoring it",
            mount.point
        );
        return None;
    }
    let mount_dir = under(root, &mount.point);
    let dir = under(&mount_dir, rel);
    Some(Hierarchy {
        dir,
        mount: mount_dir,
    })
}

impl Cgroups {
    /// Reads `<root>/proc/self/cgroup` and `<root>/proc/self/mountinfo`. A process outside
    /// any cgroup mount (some containers) simply gets no hierarchies.
    pub(crate) fn read(root: &Path) -> io::Result<Self> {
        let membership = procfs::read(&under(root, "/proc/self/cgroup"))?;
        let mountinfo = procfs::read(&under(root, "/proc/self/mountinfo"))?;
        Ok(Self::parse(root, &membership, &mountinfo))
    }

    /// The hierarchies that `membership` (`/proc/self/cgroup`) and `mountinfo`
    /// (`/proc/self/mountinfo`) describe, with their directories under `root`.
    pub(crate) fn parse(root: &Path, membership: &str, mountinfo: &str) -> Self {
        let mounts = parse_mountinfo(mountinfo);
        let mut cgroups = Cgroups::default();
        for line in membership.lines() {
            let mut parts = line.splitn(3, ':');
            let (Some(id), Some(controllers), Some(path)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            if id == "0" && controllers.is_empty() {
                if let Some(m) = mounts.iter().find(|m| m.fstype == "cgroup2") {
                    cgroups.v2 = locate(root, m, path);
                }
                continue;
            }
            for controller in controllers.split(',') {
                let slot = match controller {
                    "cpu" => &mut cgroups.v1_cpu,
                    "memory" => &mut cgroups.v1_memory,
                    "cpuset" => &mut cgroups.v1_cpuset,
                    _ => continue,
                };
                let mount = mounts
                    .iter()
                    .find(|m| m.fstype == "cgroup" && m.super_opts.iter().any(|o| o == controller));
                if let Some(m) = mount {
                    *slot = locate(root, m, path);
                }
            }
        }
        cgroups
    }

    /// Every value `read` finds in the cgroup directories of `hierarchies` (innermost first,
    /// then each ancestor), hierarchy by hierarchy.
    fn lineage_values<'a, T>(
        hierarchies: [(&'a Option<Hierarchy>, Reader<T>); 2],
    ) -> impl Iterator<Item = T> + 'a
    where
        T: 'a,
    {
        hierarchies
            .into_iter()
            .flat_map(|(h, read)| h.iter().flat_map(Hierarchy::lineage).filter_map(read))
    }

    /// The tightest CPU bandwidth limit over all hierarchies and ancestors.
    pub(crate) fn cpu_quota(&self) -> Option<CpuQuota> {
        Self::lineage_values([(&self.v1_cpu, read_v1_quota), (&self.v2, read_v2_quota)])
            .min_by(|a, b| a.cpus.total_cmp(&b.cpus))
    }

    /// The memory limit with the least room left over all hierarchies and ancestors.
    pub(crate) fn memory_room(&self) -> Option<MemoryLimit> {
        Self::lineage_values([
            (&self.v1_memory, read_v1_memory),
            (&self.v2, read_v2_memory),
        ])
        .min_by_key(MemoryLimit::room)
    }

    /// The memory nodes the cpuset allows (`cpuset.mems` / `cpuset.mems.effective`).
    pub(crate) fn cpuset_mems(&self) -> Option<String> {
        self.cpuset_mems_file().map(|(_, text)| text)
    }

    /// [`Cgroups::cpuset_mems`] with the file it came from, so a refusal can name it.
    pub(crate) fn cpuset_mems_file(&self) -> Option<(PathBuf, String)> {
        let from = |h: &Hierarchy, file: &str| {
            let path = h.dir.join(file);
            std::fs::read_to_string(&path)
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .map(|s| (path, s))
        };
        self.v2
            .as_ref()
            .and_then(|h| from(h, "cpuset.mems.effective"))
            .or_else(|| self.v1_cpuset.as_ref().and_then(|h| from(h, "cpuset.mems")))
    }
}

/// A CPU bandwidth limit: `quota / period` CPUs' worth of time.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct CpuQuota {
    pub cpus: f64,
    /// The file that set it.
    pub file: PathBuf,
}

impl CpuQuota {
    /// Whole CPUs, rounded down but at least one: a fractional CPU still runs one thread,
    /// and a second thread would only be throttled.
    pub fn whole(&self) -> usize {
        (self.cpus.floor() as usize).max(1)
    }
}

fn quota(quota: i64, period: i64, file: PathBuf) -> Option<CpuQuota> {
    (quota > 0 && period > 0).then(|| CpuQuota {
        cpus: quota as f64 / period as f64,
        file,
    })
}

fn read_v1_quota(dir: &Path) -> Option<CpuQuota> {
    let file = dir.join("cpu.cfs_quota_us");
    let q = std::fs::read_to_string(&file).ok()?;
    let p = std::fs::read_to_string(dir.join("cpu.cfs_period_us")).ok()?;
    parse_v1_quota(&q, &p, file)
}

/// A v1 limit from the texts of `cpu.cfs_quota_us` and `cpu.cfs_period_us`.
pub(crate) fn parse_v1_quota(
    quota_text: &str,
    period_text: &str,
    file: PathBuf,
) -> Option<CpuQuota> {
    let q: i64 = quota_text.trim().parse().ok()?;
    let p: i64 = period_text.trim().parse().ok()?;
    quota(q, p, file)
}

fn read_v2_quota(dir: &Path) -> Option<CpuQuota> {
    let file = dir.join("cpu.max");
    let text = std::fs::read_to_string(&file).ok()?;
    parse_v2_quota(&text, file)
}

/// A v2 limit from the text of `cpu.max` ("max" or "QUOTA [PERIOD]").
pub(crate) fn parse_v2_quota(text: &str, file: PathBuf) -> Option<CpuQuota> {
    let mut it = text.split_whitespace();
    let q = it.next()?;
    if q == "max" {
        return None;
    }
    let p: i64 = it.next().unwrap_or("100000").parse().ok()?;
    quota(q.parse().ok()?, p, file)
}

/// A memory limit and the usage counted against it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MemoryLimit {
    pub limit: u64,
    pub usage: u64,
    /// The file that set the limit, so an error can say what to raise.
    pub file: PathBuf,
}

impl MemoryLimit {
    pub fn room(&self) -> u64 {
        self.limit.saturating_sub(self.usage)
    }
}

/// v1 reports "no limit" as a page-rounded i64::MAX; anything this large is no limit.
const NO_LIMIT: u64 = 1 << 60;

fn read_v1_memory(dir: &Path) -> Option<MemoryLimit> {
    read_memory(dir, "memory.limit_in_bytes", "memory.usage_in_bytes")
}

fn read_v2_memory(dir: &Path) -> Option<MemoryLimit> {
    read_memory(dir, "memory.max", "memory.current")
}

fn read_memory(dir: &Path, limit_file: &str, usage_file: &str) -> Option<MemoryLimit> {
    let file = dir.join(limit_file);
    let text = std::fs::read_to_string(&file).ok()?;
    let usage = std::fs::read_to_string(dir.join(usage_file)).ok();
    parse_memory(&text, usage.as_deref(), file)
}

/// A memory limit from the texts of its limit file and (if readable) its usage file.
pub(crate) fn parse_memory(
    limit_text: &str,
    usage_text: Option<&str>,
    file: PathBuf,
) -> Option<MemoryLimit> {
    let limit: u64 = limit_text.trim().parse().ok()?; // "max" fails to parse: no limit
    if limit >= NO_LIMIT {
        return None;
    }
    let usage = usage_text.and_then(|u| u.trim().parse().ok()).unwrap_or(0);
    Some(MemoryLimit { limit, usage, file })
}

#[cfg(test)]
mod tests;
