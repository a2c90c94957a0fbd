//! Refuse, before any work, a job that would certainly fail: locking more than
//! RLIMIT_MEMLOCK allows, or faulting in more than the memory cgroup has room for. Failing
//! after minutes of pinning, with everything to undo, is the worst way to learn either.

use std::path::PathBuf;

use crate::class::{Classify, ErrorClass};
use crate::limits::Limits;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AdmissionError {
    #[error(
        "pinning needs {} locked but RLIMIT_MEMLOCK is {} ({} already locked, {} short). \
         Raise it with `ulimit -l {}` (KiB) in the launching shell, `prlimit --pid {pid} --memlock={need_total}`, \
         LimitMEMLOCK= in a systemd unit, or run with CAP_IPC_LOCK",
        human(*needed), human(*limit), human(*locked), human(needed + locked - limit),
        (needed + locked).div_ceil(1024), pid = std::process::id(), need_total = needed + locked
    )]
    Memlock {
        needed: u64,
        limit: u64,
        locked: u64,
    },
    #[error(
        "pinning needs {} of memory but the memory cgroup has {} left (limit {} in {}, {} short). \
         Raise the limit by writing a larger value to that file, or give the VM less memory",
        human(*needed), human(*room), human(*limit), file.display(), human(needed - room)
    )]
    MemoryCgroup {
        needed: u64,
        room: u64,
        limit: u64,
        file: PathBuf,
    },
}

impl Classify for AdmissionError {
    fn class(&self) -> ErrorClass {
        ErrorClass::User
    }
}

/// "1.5 GiB", "64 MiB", "512 KiB", "12 bytes".
pub fn human(bytes: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (1 << 40, "TiB"),
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
    ];
    for (size, name) in UNITS {
        if bytes >= size {
            let v = bytes as f64 / size as f64;
            return if v.fract() == 0.0 {
                format!("{v:.0} {name}")
            } else {
                format!("{v:.1} {name}")
            };
        }
    }
    format!("{bytes} bytes")
}

/// Checks a job that locks `lock` bytes and faults in `populate` bytes.
pub(crate) fn check(limits: &Limits, lock: u64, populate: u64) -> Result<(), AdmissionError> {
    if lock > 0 {
        if let (Some(room), Some(limit)) = (limits.memlock.room(), limits.memlock.limit) {
            if lock > room {
                return Err(AdmissionError::Memlock {
                    needed: lock,
                    limit,
                    locked: limits.memlock.locked,
                });
            }
        }
    }
    if populate > 0 {
        if let Some(m) = &limits.cgroup_memory {
            if populate > m.room() {
                return Err(AdmissionError::MemoryCgroup {
                    needed: populate,
                    room: m.room(),
                    limit: m.limit,
                    file: m.file.clone(),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::MemoryLimit;
    use crate::limits::Memlock;

    fn limits(memlock: Option<u64>, locked: u64, cap: bool, memcg: Option<(u64, u64)>) -> Limits {
        Limits {
            affinity_cpus: 2,
            online_cpus: 2,
            cgroup_cpu: None,
            memlock: Memlock {
                limit: memlock,
                locked,
                cap_ipc_lock: cap,
            },
            cgroup_memory: memcg.map(|(limit, usage)| MemoryLimit {
                limit,
                usage,
                file: "/sys/fs/cgroup/memory/vm/memory.limit_in_bytes".into(),
            }),
            may_raise_priority: true,
            numa_nodes: None,
            cpuset_mems: None,
        }
    }

    #[test]
    fn memlock_over_the_limit_is_refused_with_the_fix() {
        let l = limits(Some(64 << 20), 0, false, None);
        let e = check(&l, 1 << 30, 1 << 30).unwrap_err();
        assert_eq!(
            e,
            AdmissionError::Memlock {
                needed: 1 << 30,
                limit: 64 << 20,
                locked: 0
            }
        );
        let msg = e.to_string();
        assert!(msg.contains("RLIMIT_MEMLOCK is 64 MiB"), "{msg}");
        assert!(msg.contains("ulimit -l 1048576"), "{msg}");
        assert!(msg.contains("CAP_IPC_LOCK"), "{msg}");
    }

    #[test]
    fn already_locked_memory_counts() {
        let l = limits(Some(64 << 20), 60 << 20, false, None);
        assert!(check(&l, 8 << 20, 0).is_err());
        assert!(check(&l, 4 << 20, 0).is_ok());
    }

    #[test]
    fn cap_ipc_lock_and_unlimited_pass() {
        assert!(check(&limits(Some(64 << 20), 0, true, None), 1 << 40, 0).is_ok());
        assert!(check(&limits(None, 0, false, None), 1 << 40, 0).is_ok());
    }

    #[test]
    fn memory_cgroup_room_is_checked_and_named() {
        let l = limits(None, 0, false, Some((2 << 30, 1 << 30)));
        let e = check(&l, 0, 2 << 30).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("1 GiB left"), "{msg}");
        assert!(msg.contains("memory.limit_in_bytes"), "{msg}");
        assert!(check(&l, 0, 512 << 20).is_ok());
    }
}
