//! What machine the numbers came from: the JSON and the SVG both carry it.

use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub cpu_model: String,
    pub cores_online: usize,
    pub memory_bytes: u64,
    pub kernel: String,
    /// The CPU offers hardware virtualisation to this OS (vmx or svm flag).
    pub vmx_or_svm: bool,
    /// This OS itself runs under a hypervisor (the `hypervisor` flag).
    pub hypervisor: bool,
    /// The selected word of THP's `enabled` and `shmem_enabled`: whether thp and memfd-thp
    /// could get huge pages at all.
    pub thp_enabled: Option<String>,
    pub thp_shmem_enabled: Option<String>,
    /// UTC, `YYYY-MM-DD HH:MM:SSZ`.
    pub date: String,
}

impl Machine {
    pub fn detect() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let field = |name: &str| {
            cpuinfo
                .lines()
                .find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        };
        let flags = field("flags").unwrap_or_default();
        let has = |f: &str| flags.split_whitespace().any(|x| x == f);
        // SAFETY: sysconf has no preconditions.
        let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
        let thp = vmm::memory::ThpPolicy::host();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Machine {
            cpu_model: field("model name").unwrap_or_else(|| "unknown".into()),
            cores_online: usize::try_from(online).unwrap_or(0),
            memory_bytes: pinning::procfs::mem_total(std::path::Path::new("/")).unwrap_or(0),
            kernel: kernel_release(),
            vmx_or_svm: has("vmx") || has("svm"),
            hypervisor: has("hypervisor"),
            thp_enabled: thp.anon,
            thp_shmem_enabled: thp.shmem,
            date: utc_date(now),
        }
    }

    /// One line for the table and the SVG.
    pub fn describe(&self) -> String {
        format!(
            "{}, {} cores online, {} GiB, Linux {}, {}, THP {}/shmem {}, {}",
            self.cpu_model,
            self.cores_online,
            self.memory_bytes >> 30,
            self.kernel,
            match (self.vmx_or_svm, self.hypervisor) {
                (true, true) => "vmx/svm present, under a hypervisor",
                (true, false) => "vmx/svm present, bare metal",
                (false, true) => "no vmx/svm flag (nested KVM without it), under a hypervisor",
                (false, false) => "no vmx/svm flag",
            },
            self.thp_enabled.as_deref().unwrap_or("-"),
            self.thp_shmem_enabled.as_deref().unwrap_or("-"),
            self.date
        )
    }
}

fn kernel_release() -> String {
    // SAFETY: utsname is plain data; uname fills it.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: u is a valid out-pointer.
    if unsafe { libc::uname(&mut u) } != 0 {
        return "unknown".into();
    }
    let bytes: Vec<u8> = u
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Seconds since the epoch as a UTC date (civil-from-days, no time-zone data needed).
pub fn utc_date(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(utc_date(0), "1970-01-01 00:00:00Z");
        assert_eq!(utc_date(951_782_400), "2000-02-29 00:00:00Z");
        assert_eq!(utc_date(1_700_000_000), "2023-11-14 22:13:20Z");
    }

    #[test]
    fn this_machine_is_described() {
        let m = Machine::detect();
        assert!(m.cores_online >= 1);
        assert!(!m.kernel.is_empty());
        assert!(m.describe().contains(&m.kernel));
    }
}
