//! Small readers of /proc and /sys files, all relative to a root directory so tests can point
//! them at fixture trees.

use std::io;
use std::path::{Path, PathBuf};

/// `root` joined with an absolute path.
pub(crate) fn under(root: &Path, absolute: impl AsRef<Path>) -> PathBuf {
    let rel = absolute
        .as_ref()
        .strip_prefix("/")
        .unwrap_or(absolute.as_ref());
    root.join(rel)
}

/// Reads a file to a string, naming the file in the error.
pub(crate) fn read(path: &Path) -> io::Result<String> {
    std::fs::read_to_string(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// The value of a `Key:   value` line in a /proc status-like file.
pub(crate) fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        (k.trim() == key).then(|| v.trim())
    })
}

/// A "123 kB" value in bytes.
pub fn kb_field(text: &str, key: &str) -> Option<u64> {
    let v = field(text, key)?;
    let n: u64 = v.trim_end_matches("kB").trim().parse().ok()?;
    Some(n * 1024)
}

/// What /proc/self/status says about locking and capabilities.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcStatus {
    /// Bytes currently locked (VmLck).
    pub locked: u64,
    /// Effective capability set.
    pub cap_eff: u64,
}

pub(crate) const CAP_IPC_LOCK: u32 = 14;
pub(crate) const CAP_SYS_NICE: u32 = 23;

impl ProcStatus {
    pub fn read(root: &Path) -> io::Result<Self> {
        let text = read(&under(root, "/proc/self/status"))?;
        Ok(Self::parse(&text))
    }

    pub(crate) fn parse(text: &str) -> Self {
        Self {
            locked: kb_field(text, "VmLck").unwrap_or(0),
            cap_eff: field(text, "CapEff")
                .and_then(|v| u64::from_str_radix(v, 16).ok())
                .unwrap_or(0),
        }
    }

    pub(crate) fn has_cap(&self, cap: u32) -> bool {
        self.cap_eff & (1 << cap) != 0
    }
}

/// Parses a kernel CPU list such as `0-3,8,10-11` into its members.
pub(crate) fn parse_cpu_list(text: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse().ok()?, b.parse().ok()?);
                if b < a {
                    return None;
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(part.parse().ok()?),
        }
    }
    Some(cpus)
}

/// Host RAM in bytes (MemTotal).
pub fn mem_total(root: &Path) -> io::Result<u64> {
    let text = read(&under(root, "/proc/meminfo"))?;
    kb_field(&text, "MemTotal")
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "/proc/meminfo has no MemTotal"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse() {
        assert_eq!(
            parse_cpu_list("0-3,8,10-11\n"),
            Some(vec![0, 1, 2, 3, 8, 10, 11])
        );
        assert_eq!(parse_cpu_list("0"), Some(vec![0]));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
    }

    #[test]
    fn status_gives_locked_bytes_and_caps() {
        let s = ProcStatus::parse("Name:\tvmm\nVmLck:\t    2048 kB\nCapEff:\t0000000000004000\n");
        assert_eq!(s.locked, 2 << 20);
        assert!(s.has_cap(CAP_IPC_LOCK));
        assert!(!s.has_cap(CAP_SYS_NICE));
    }
}
