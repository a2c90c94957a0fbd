//! What the host allows of transparent huge pages, read from sysfs: for private anonymous
//! memory (`enabled`) and for shmem, which backs a memfd (`shmem_enabled`). MADV_HUGEPAGE on
//! a mapping only helps where the policy is `always` or `madvise` (anonymous) or `always`,
//! `within_size`, `advise` or `force` (shmem).

use std::path::{Path, PathBuf};

/// Where the policies live on a host.
pub const SYSFS_THP: &str = "/sys/kernel/mm/transparent_hugepage";

/// The host's THP policies: the selected word of each file (`[madvise]` -> `madvise`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThpPolicy {
    /// `enabled`: anonymous memory.
    pub anon: Option<String>,
    /// `shmem_enabled`: shmem and memfd.
    pub shmem: Option<String>,
    dir: PathBuf,
}

fn selected(text: &str) -> Option<String> {
    let start = text.find('[')? + 1;
    let end = start + text[start..].find(']')?;
    Some(text[start..end].to_string())
}

impl ThpPolicy {
    /// Reads the policies under `dir` (normally [`SYSFS_THP`]); a missing file (a kernel
    /// without THP) reads as no policy, which allows nothing.
    pub fn read(dir: &Path) -> Self {
        let read = |name| {
            std::fs::read_to_string(dir.join(name))
                .ok()
                .and_then(|t| selected(&t))
        };
        ThpPolicy {
            anon: read("enabled"),
            shmem: read("shmem_enabled"),
            dir: dir.to_path_buf(),
        }
    }

    /// This host's policies.
    pub fn host() -> Self {
        Self::read(Path::new(SYSFS_THP))
    }

    /// Whether MADV_HUGEPAGE gives private anonymous memory huge pages.
    pub fn anon_allowed(&self) -> bool {
        matches!(self.anon.as_deref(), Some("always" | "madvise"))
    }

    /// Whether MADV_HUGEPAGE gives a memfd huge pages.
    pub fn shmem_allowed(&self) -> bool {
        matches!(
            self.shmem.as_deref(),
            Some("always" | "within_size" | "advise" | "force")
        )
    }

    /// The sysfs line that says so, e.g. `/sys/kernel/mm/transparent_hugepage/enabled is [never]`.
    pub fn describe_anon(&self) -> String {
        self.describe("enabled", self.anon.as_deref())
    }

    /// As [`ThpPolicy::describe_anon`], for `shmem_enabled`.
    pub fn describe_shmem(&self) -> String {
        self.describe("shmem_enabled", self.shmem.as_deref())
    }

    fn describe(&self, file: &str, value: Option<&str>) -> String {
        let path = self.dir.join(file);
        match value {
            Some(v) => format!("{} is [{v}]", path.display()),
            None => format!("{} is missing", path.display()),
        }
    }
}

/// Bytes of huge pages in use on the host now, from /proc/meminfo: transparent ones in
/// anonymous memory and shmem, and hugetlb pages of the default size taken from the pool.
/// The difference across a run is what the kernel gave the guest (other processes' changes
/// meanwhile are noise; the VMM is normally the only large allocator on its host).
pub fn huge_bytes_in_use() -> u64 {
    let Ok(text) = std::fs::read_to_string("/proc/meminfo") else {
        return 0;
    };
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let hugetlb = field("HugePages_Total").saturating_sub(field("HugePages_Free"))
        * field("Hugepagesize")
        * 1024;
    (field("AnonHugePages") + field("ShmemHugePages")) * 1024 + hugetlb
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(anon: &str, shmem: &str) -> ThpPolicy {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("enabled"), anon).unwrap();
        std::fs::write(dir.path().join("shmem_enabled"), shmem).unwrap();
        ThpPolicy::read(dir.path())
    }

    #[test]
    fn the_bracketed_word_is_the_policy() {
        let p = policy(
            "always [madvise] never\n",
            "always within_size advise [never] deny force\n",
        );
        assert_eq!(p.anon.as_deref(), Some("madvise"));
        assert!(p.anon_allowed());
        assert_eq!(p.shmem.as_deref(), Some("never"));
        assert!(!p.shmem_allowed());
        assert!(p.describe_shmem().ends_with("shmem_enabled is [never]"));
        for allowed in ["always", "within_size", "advise", "force"] {
            let p = policy("never", &format!("[{allowed}]"));
            assert!(p.shmem_allowed(), "{allowed}");
            assert!(!p.anon_allowed());
        }
        assert!(!policy("never", "always [deny]").shmem_allowed());
    }

    #[test]
    fn a_kernel_without_thp_allows_nothing() {
        let p = ThpPolicy::read(Path::new("/nonexistent"));
        assert!(!p.anon_allowed() && !p.shmem_allowed());
        assert!(p.describe_anon().ends_with("enabled is missing"));
    }
}
