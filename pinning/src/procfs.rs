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

/// A "123 kB" value in bytes; `None` if it is not a number or the bytes overflow a u64.
pub fn kb_field(text: &str, key: &str) -> Option<u64> {
    let v = field(text, key)?;
    let n: u64 = v.trim_end_matches("kB").trim().parse().ok()?;
    n.checked_mul(1024)
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

/// CPU numbers at or above this are not real (Linux's NR_CPUS tops out at 8192); a list
/// that names one is refused rather than expanded into memory.
pub(crate) const MAX_CPUS: usize = 1 << 16;

/// Parses a kernel CPU list such as `0-3,8,10-11` into its members.
pub(crate) fn parse_cpu_list(text: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    let cpu = |s: &str| s.parse::<usize>().ok().filter(|&c| c < MAX_CPUS);
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (cpu(a)?, cpu(b)?);
                if b < a {
                    return None;
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(cpu(part)?),
        }
        // Repeated ranges could still add up.
        if cpus.len() > MAX_CPUS {
            return None;
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

    /// Found by the `cgroup` fuzz target: `10-73741824` expanded into a 73-million-entry
    /// vector (and `0-18446744073709551615` would never finish).
    #[test]
    fn cpu_lists_past_any_real_cpu_are_refused() {
        assert_eq!(parse_cpu_list("2-3,8,10-73741824\n"), None);
        assert_eq!(parse_cpu_list("0-18446744073709551615"), None);
        assert_eq!(parse_cpu_list("65536"), None);
        let last = MAX_CPUS - 1;
        assert_eq!(parse_cpu_list(&format!("{last}")), Some(vec![last]));
        assert_eq!(
            parse_cpu_list(&format!("0-{last}")).map(|c| c.len()),
            Some(MAX_CPUS)
        );
        let repeated = vec![format!("0-{last}"); 3].join(",");
        assert_eq!(parse_cpu_list(&repeated), None);
    }

    /// Found by the `cgroup` fuzz target: a kB value above 2^54 overflowed the conversion
    /// to bytes (a panic with overflow checks on, a wrong value without).
    #[test]
    fn kb_fields_too_large_for_bytes_are_refused() {
        let max_kb = u64::MAX / 1024;
        assert_eq!(
            kb_field(&format!("VmLck:\t{max_kb} kB\n"), "VmLck"),
            Some(max_kb * 1024)
        );
        assert_eq!(
            kb_field(&format!("VmLck:\t{} kB\n", max_kb + 1), "VmLck"),
            None
        );
        assert_eq!(kb_field("VmLck: 99999999999999999999 kB", "VmLck"), None);
        assert_eq!(ProcStatus::parse("VmLck: 18014398509481984 kB\n").locked, 0);
    }

    #[test]
    fn status_gives_locked_bytes_and_caps() {
        let s = ProcStatus::parse("Name:\tvmm\nVmLck:\t    2048 kB\nCapEff:\t0000000000004000\n");
        assert_eq!(s.locked, 2 << 20);
        assert!(s.has_cap(CAP_IPC_LOCK));
        assert!(!s.has_cap(CAP_SYS_NICE));
    }
}
