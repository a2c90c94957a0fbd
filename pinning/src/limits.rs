//! Everything that bounds a pinning job, read once before it starts.

use std::io;
use std::path::Path;

use serde::Serialize;

use crate::cgroup::{Cgroups, CpuQuota, MemoryLimit};
use crate::class::{Classify, ErrorClass};
use crate::engine::plan::ThreadCaps;
use crate::procfs::{self, ProcStatus, CAP_IPC_LOCK, CAP_SYS_NICE};
use crate::sys;

#[derive(Debug, thiserror::Error)]
pub enum LimitsError {
    #[error("cannot read {what} to learn the limits pinning must respect: {source}")]
    Read {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

impl Classify for LimitsError {
    /// The host refused to describe this process: nothing the user's input could fix.
    fn class(&self) -> ErrorClass {
        ErrorClass::Internal
    }
}

fn ctx(what: &'static str) -> impl FnOnce(io::Error) -> LimitsError {
    move |source| LimitsError::Read { what, source }
}

/// RLIMIT_MEMLOCK and what the process already holds locked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Memlock {
    /// Soft limit in bytes; `None` = unlimited.
    pub limit: Option<u64>,
    /// Bytes locked now (VmLck).
    pub locked: u64,
    /// CAP_IPC_LOCK lifts the limit.
    pub cap_ipc_lock: bool,
}

impl Memlock {
    /// Bytes that may still be locked; `None` = no limit applies.
    pub fn room(&self) -> Option<u64> {
        if self.cap_ipc_lock {
            return None;
        }
        self.limit.map(|l| l.saturating_sub(self.locked))
    }
}

/// The limits in force for this process.
#[derive(Clone, Debug, Serialize)]
pub struct Limits {
    pub affinity_cpus: usize,
    pub online_cpus: usize,
    pub cgroup_cpu: Option<CpuQuota>,
    pub memlock: Memlock,
    pub cgroup_memory: Option<MemoryLimit>,
    /// CAP_SYS_NICE, or an RLIMIT_NICE that allows nice 0, lets the caller lend priority.
    pub may_raise_priority: bool,
    pub numa_nodes: Option<String>,
    pub cpuset_mems: Option<String>,
}

/// Inputs that come from system calls rather than files, so tests can supply them.
#[derive(Clone, Debug)]
pub(crate) struct SyscallFacts {
    pub(crate) affinity_cpus: usize,
    pub(crate) memlock_limit: Option<u64>,
    /// RLIMIT_NICE soft limit: the lowest nice allowed is `20 - value`.
    pub(crate) nice_limit: Option<u64>,
}

impl SyscallFacts {
    pub(crate) fn detect() -> io::Result<Self> {
        let (memlock_limit, _) = sys::rlimit(libc::RLIMIT_MEMLOCK)?;
        let (nice_limit, _) = sys::rlimit(libc::RLIMIT_NICE)?;
        Ok(Self {
            affinity_cpus: sys::affinity_cpus()?.len(),
            memlock_limit,
            nice_limit,
        })
    }
}

impl Limits {
    /// The limits of the running process.
    pub fn detect() -> Result<Self, LimitsError> {
        let facts = SyscallFacts::detect()
            .map_err(ctx("this process's CPU affinity and resource limits"))?;
        Self::read(Path::new("/"), &facts)
    }

    /// Reads the file-based limits under `root` (a fixture tree in tests).
    pub(crate) fn read(root: &Path, facts: &SyscallFacts) -> Result<Self, LimitsError> {
        let status = ProcStatus::read(root).map_err(ctx("this process's status"))?;
        let online = procfs::read(&procfs::under(root, "/sys/devices/system/cpu/online"))
            .ok()
            .and_then(|t| procfs::parse_cpu_list(&t))
            .map(|c| c.len())
            .unwrap_or(facts.affinity_cpus);
        let cgroups = Cgroups::read(root).unwrap_or_else(|e| {
            tracing::debug!("no cgroup information ({e}); assuming no cgroup limits");
            Cgroups::default()
        });
        let caller_nice = sys::thread_nice(0).unwrap_or(0);
        let nice_floor = facts.nice_limit.map(|l| 20 - l.min(40) as i32);
        let may_raise_priority = status.has_cap(CAP_SYS_NICE)
            || nice_floor.is_none()
            || nice_floor.is_some_and(|floor| floor <= caller_nice);
        Ok(Self {
            affinity_cpus: facts.affinity_cpus,
            online_cpus: online,
            cgroup_cpu: cgroups.cpu_quota(),
            memlock: Memlock {
                limit: facts.memlock_limit,
                locked: status.locked,
                cap_ipc_lock: status.has_cap(CAP_IPC_LOCK),
            },
            cgroup_memory: cgroups.memory_room(),
            may_raise_priority,
            numa_nodes: procfs::read(&procfs::under(root, "/sys/devices/system/node/online"))
                .ok()
                .map(|s| s.trim().to_string()),
            cpuset_mems: cgroups.cpuset_mems(),
        })
    }

    /// The thread caps these limits put on a job; `requested` is the user's own cap.
    pub fn thread_caps(&self, requested: Option<usize>) -> ThreadCaps {
        ThreadCaps {
            requested,
            cgroup: self.cgroup_cpu.as_ref().map(CpuQuota::whole),
            affinity: self.affinity_cpus.max(1),
            online: self.online_cpus.max(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn tree(status: &str) -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        let put = |p: &str, s: &str| {
            let p = procfs::under(t.path(), p);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, s).unwrap();
        };
        put("/proc/self/status", status);
        put("/sys/devices/system/cpu/online", "0-15\n");
        put("/proc/self/cgroup", "1:cpu:/vmm\n");
        put(
            "/proc/self/mountinfo",
            "32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n",
        );
        put("/sys/fs/cgroup/cpu/vmm/cpu.cfs_quota_us", "300000\n");
        put("/sys/fs/cgroup/cpu/vmm/cpu.cfs_period_us", "100000\n");
        t
    }

    fn facts(affinity: usize) -> SyscallFacts {
        SyscallFacts {
            affinity_cpus: affinity,
            memlock_limit: Some(8 << 20),
            nice_limit: Some(0),
        }
    }

    #[test]
    fn caps_combine_affinity_online_and_cgroup() {
        let t = tree("VmLck:\t1024 kB\nCapEff:\t0000000000000000\n");
        let l = Limits::read(t.path(), &facts(8)).unwrap();
        assert_eq!(l.online_cpus, 16);
        let caps = l.thread_caps(None);
        assert_eq!((caps.affinity, caps.online, caps.cgroup), (8, 16, Some(3)));
        assert_eq!(l.memlock.room(), Some(7 << 20));
    }

    #[test]
    fn cap_ipc_lock_lifts_the_memlock_limit() {
        let t = tree("VmLck:\t0 kB\nCapEff:\t0000000000004000\n");
        let l = Limits::read(t.path(), &facts(2)).unwrap();
        assert_eq!(l.memlock.room(), None);
    }

    #[test]
    fn detect_works_on_this_host() {
        let l = Limits::detect().unwrap();
        assert!(l.affinity_cpus >= 1 && l.online_cpus >= 1);
    }
}
