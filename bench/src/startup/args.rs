//! `vmm bench startup` options, and the configurations they expand to.
//!
//! How each backing is booted (which device, which pin backend) is decided in one place,
//! [`boot_plan`], so the choice can change without touching the runner.

use std::path::PathBuf;

use pinning::ThreadRequest;
use vmm::builder::MAX_TIMEOUT_SECS;
use vmm::memory::{Backing, MemoryError, MemoryLayout, MemorySpec, ThpPolicy};
use vmm::size::parse_size;

#[derive(Clone, Debug, clap::Args)]
pub struct StartupArgs {
    /// Comma-separated guest RAM sizes: 1G,4G,8G (a bare number is MiB).
    #[arg(long, default_value = "1G,4G,8G", value_delimiter = ',', value_parser = parse_memory)]
    pub memory: Vec<u64>,
    /// Comma-separated backings of guest RAM. Default: anon,thp,memfd, and memfd-thp where
    /// the host's shmem_enabled allows huge pages in a memfd.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub backing: Vec<Backing>,
    /// Shard size passed to `vmm run --memory-shard` for shareable backings (memfd,
    /// memfd-thp): one memfd per shard. Default: vmm run's own (1G).
    #[arg(long, value_parser = parse_size)]
    pub memory_shard: Option<u64>,
    /// Comma-separated pin thread counts, each a number from 1 to 4096 or `auto`
    /// (1,2,4,8,16,auto).
    #[arg(long, default_value = "1,auto", value_delimiter = ',', value_parser = parse_threads)]
    pub pin_threads: Vec<ThreadRequest>,
    /// Measured boots per configuration.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub runs: u32,
    /// Discarded warm-up rounds (one boot of every configuration each) before measuring.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub warmup: u32,
    /// The `vmm` binary every boot runs. Default: `vmm` beside this executable, where cargo
    /// builds it.
    #[arg(long)]
    pub vmm: Option<PathBuf>,
    /// QEMU to compare with: a path, or `none` to skip it. Default: qemu-system-x86_64 on PATH.
    #[arg(long)]
    pub qemu: Option<String>,
    /// Where startup.json, startup.svg and every run's report go.
    #[arg(long, default_value = "bench-out")]
    pub out: PathBuf,
    /// Seconds one boot may take before it is stopped and counted as failed: at most 31536000
    /// (one year, as `vmm run --timeout`).
    #[arg(long, default_value_t = 300,
        value_parser = clap::value_parser!(u64).range(1..=MAX_TIMEOUT_SECS))]
    pub timeout: u64,
}

/// A guest RAM size `vmm run` accepts: one it can lay out, and no more than the host has.
pub fn parse_memory(text: &str) -> Result<u64, String> {
    let size = parse_size(text)?;
    MemoryLayout::new(size).map_err(|e| format!("`{text}`: {e}"))?;
    if let Ok(host) = pinning::procfs::mem_total(std::path::Path::new("/")) {
        if size > host {
            let e = MemoryError::MoreThanHost {
                requested: size,
                host,
            };
            return Err(format!("`{text}`: {e}"));
        }
    }
    Ok(size)
}

pub fn parse_threads(text: &str) -> Result<ThreadRequest, String> {
    text.trim().parse()
}

/// The backings asked for, or the default list; and, when the default leaves memfd-thp out,
/// a note saying why. memfd-thp asked for on a host that forbids huge pages in shmem is an
/// error: every such boot would fail the same way, after the others had run for minutes.
pub fn backings(
    asked: &[Backing],
    thp: &ThpPolicy,
) -> Result<(Vec<Backing>, Option<String>), MemoryError> {
    if asked.contains(&Backing::MemfdThp) && !thp.shmem_allowed() {
        return Err(MemoryError::ShmemThpForbidden {
            line: thp.describe_shmem(),
        });
    }
    if !asked.is_empty() {
        return Ok((asked.to_vec(), None));
    }
    let mut list = vec![Backing::Anon, Backing::Thp, Backing::Memfd];
    if thp.shmem_allowed() {
        list.push(Backing::MemfdThp);
        return Ok((list, None));
    }
    let note = format!(
        "memfd-thp left out of the default backings: {} forbids huge pages in a memfd",
        thp.describe_shmem()
    );
    Ok((list, Some(note)))
}

/// Refuses before anything boots what `vmm run` would refuse in every boot of a
/// configuration: a `--memory-shard` that does not fit its RAM layout, or too many shards for
/// the file limit. Other refusals (more RAM than the host has, no hugetlb reservation) stay
/// per-configuration failures, as they always were.
pub fn check_shards(configs: &[Config], thp: &ThpPolicy) -> Result<(), MemoryError> {
    for c in configs.iter().filter(|c| c.shard.is_some()) {
        let layout = MemoryLayout::new(c.memory).expect("sizes were parsed by parse_memory");
        let spec = MemorySpec {
            backing: c.backing,
            shard_bytes: c.shard,
            host_numa_node: None,
        };
        if let Err(
            e @ (MemoryError::ShardNotPowerOfTwo(_)
            | MemoryError::ShardBelowPage { .. }
            | MemoryError::ShardAboveRange { .. }
            | MemoryError::TooManyShards { .. }),
        ) = spec.check(layout.ram(), thp)
        {
            return Err(e);
        }
    }
    Ok(())
}

/// How the guest is given its RAM's device and pinning.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootPlan {
    /// Extra `vmm run` arguments.
    pub args: Vec<String>,
    /// In words, for the table and the JSON.
    pub mode: String,
}

/// The one place that decides how each backing is booted. The probe is normally booted with
/// a pci-epf-test device served over vfio-user, which needs shareable RAM; its pin backend
/// (populate, then DMA_MAP) is chosen by `vmm run` itself. Private RAM cannot be shared and
/// this machine has no VFIO/IOMMU, so those backings are faulted in by `--pin populate`.
pub fn boot_plan(backing: Backing, user_device_supported: bool) -> BootPlan {
    if backing.shareable() && user_device_supported {
        BootPlan {
            args: vec!["--user-device".into(), "epf".into()],
            mode: "user-device epf".into(),
        }
    } else {
        BootPlan {
            args: vec!["--pin".into(), "populate".into()],
            mode: "pin populate".into(),
        }
    }
}

/// One `vmm run` configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub memory: u64,
    pub backing: Backing,
    pub threads: ThreadRequest,
    pub plan: BootPlan,
    /// `--memory-shard` for `vmm run`: only shareable RAM is made of shards.
    pub shard: Option<u64>,
}

impl Config {
    /// A short unique name, usable in file names: `4G-anon-t1`.
    pub fn id(&self) -> String {
        format!(
            "{}-{}-t{}",
            short_size(self.memory),
            self.backing.name(),
            self.threads
        )
    }
}

/// `1G`, `512M`, `1540K`: a size as the command line takes it.
pub fn short_size(bytes: u64) -> String {
    if bytes % (1 << 30) == 0 {
        format!("{}G", bytes >> 30)
    } else if bytes % (1 << 20) == 0 {
        format!("{}M", bytes >> 20)
    } else {
        format!("{}K", bytes >> 10)
    }
}

/// Every combination of `args` over `backings`, memory outermost, then backing, then
/// threads; duplicates dropped.
pub fn configs(
    args: &StartupArgs,
    backings: &[Backing],
    user_device_supported: bool,
) -> Vec<Config> {
    let mut out: Vec<Config> = Vec::new();
    for &memory in &args.memory {
        for &backing in backings {
            for &threads in &args.pin_threads {
                let c = Config {
                    memory,
                    backing,
                    threads,
                    plan: boot_plan(backing, user_device_supported),
                    shard: args.memory_shard.filter(|_| backing.shareable()),
                };
                if !out.iter().any(|o| o.id() == c.id()) {
                    out.push(c);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: StartupArgs,
    }

    fn parse(args: &[&str]) -> Result<StartupArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("bench").chain(args.iter().copied())).map(|c| c.args)
    }

    /// A host whose shmem_enabled says `shmem`.
    fn host(shmem: &str) -> (tempfile::TempDir, ThpPolicy) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("enabled"), "always [madvise] never\n").unwrap();
        std::fs::write(dir.path().join("shmem_enabled"), shmem).unwrap();
        let p = ThpPolicy::read(dir.path());
        (dir, p)
    }

    #[test]
    fn defaults_expand_to_eighteen_configs() {
        let a = parse(&[]).unwrap();
        assert_eq!(a.memory, [1 << 30, 4 << 30, 8 << 30]);
        assert_eq!(a.runs, 3);
        let (_d, never) = host("always advise [never] deny\n");
        let (b, _) = backings(&a.backing, &never).unwrap();
        let c = configs(&a, &b, true);
        assert_eq!(c.len(), 18);
        assert_eq!(c[0].id(), "1G-anon-t1");
        assert_eq!(c[1].id(), "1G-anon-tauto");
    }

    #[test]
    fn the_default_backings_add_memfd_thp_only_where_shmem_allows_it_and_say_why_not() {
        let (_d, never) = host("always within_size advise [never] deny force\n");
        let (b, note) = backings(&[], &never).unwrap();
        assert_eq!(b, [Backing::Anon, Backing::Thp, Backing::Memfd]);
        let note = note.unwrap();
        assert!(note.contains("memfd-thp left out"), "{note}");
        assert!(note.contains("shmem_enabled is [never]"), "{note}");

        let (_d, advise) = host("always within_size [advise] never deny force\n");
        let (b, note) = backings(&[], &advise).unwrap();
        assert_eq!(
            b,
            [
                Backing::Anon,
                Backing::Thp,
                Backing::Memfd,
                Backing::MemfdThp
            ]
        );
        assert!(note.is_none());
    }

    #[test]
    fn memfd_thp_asked_for_where_shmem_forbids_it_is_refused_naming_the_sysfs_line() {
        let (d, never) = host("always advise [never]\n");
        let e = backings(&[Backing::Anon, Backing::MemfdThp], &never).unwrap_err();
        let line = format!("{}/shmem_enabled is [never]", d.path().display());
        assert!(e.to_string().contains(&line), "{e}");
        assert_eq!(pinning::Classify::class(&e), pinning::ErrorClass::User);
        let (_d, advise) = host("[advise] never\n");
        let (b, _) = backings(&[Backing::MemfdThp], &advise).unwrap();
        assert_eq!(b, [Backing::MemfdThp]);
    }

    #[test]
    fn the_shard_size_goes_to_shareable_configs_only_and_must_fit_the_layout() {
        let a = parse(&["--memory", "1G,4G", "--memory-shard", "256M"]).unwrap();
        let (_d, never) = host("[never]\n");
        let c = configs(&a, &[Backing::Anon, Backing::Memfd], true);
        let shards: Vec<_> = c.iter().map(|c| (c.backing, c.shard)).collect();
        assert!(shards.contains(&(Backing::Anon, None)));
        assert!(shards.contains(&(Backing::Memfd, Some(256 << 20))));
        assert!(check_shards(&c, &never).is_ok());

        // A 1 GiB guest is one 1 GiB range: a 2 GiB shard does not fit it.
        let a = parse(&["--memory", "1G,4G", "--memory-shard", "2G"]).unwrap();
        let c = configs(&a, &[Backing::Memfd], true);
        let e = check_shards(&c, &never).unwrap_err();
        assert!(matches!(e, MemoryError::ShardAboveRange { .. }), "{e}");
        let a = parse(&["--memory", "1G", "--memory-shard", "3M"]).unwrap();
        let c = configs(&a, &[Backing::Memfd], true);
        let e = check_shards(&c, &never).unwrap_err();
        assert!(matches!(e, MemoryError::ShardNotPowerOfTwo(_)), "{e}");
        // Private RAM has no shards, so a shard size that would not fit is no concern there.
        let c = configs(&a, &[Backing::Anon], true);
        assert!(check_shards(&c, &never).is_ok());
    }

    #[test]
    fn any_thread_list_is_accepted() {
        let a = parse(&["--pin-threads", "1,2,4,8,16,auto"]).unwrap();
        assert_eq!(a.pin_threads.len(), 6);
        assert_eq!(a.pin_threads[4], ThreadRequest::AtMost(16));
    }

    #[test]
    fn bad_list_values_are_named_and_exit_2() {
        for (args, needle) in [
            (["--pin-threads", "1,0"], "`0`"),
            (["--pin-threads", "1,x"], "`x`"),
            (["--memory", "1G,4Q"], "`4Q`"),
            (["--memory", "1G,1M"], "`1M`"),
            (["--memory", "1G,100T"], "more than this host's RAM"),
            (["--pin-threads", "1,4097"], "from 1 to 4096"),
            (["--timeout", "31536001"], "31536001"),
            (["--backing", "anon,foo"], "foo"),
        ] {
            let e = parse(&args).err().unwrap();
            assert_eq!(e.exit_code(), 2);
            assert!(e.to_string().contains(needle), "{args:?}: {e}");
        }
    }

    #[test]
    fn shareable_ram_gets_the_device_only_when_vmm_run_has_it() {
        assert_eq!(
            boot_plan(Backing::Memfd, true).args,
            ["--user-device", "epf"]
        );
        assert_eq!(boot_plan(Backing::Memfd, false).args, ["--pin", "populate"]);
        assert_eq!(boot_plan(Backing::Anon, true).args, ["--pin", "populate"]);
        assert_eq!(boot_plan(Backing::Thp, true).args, ["--pin", "populate"]);
        // memfd-thp is a memfd with huge pages: shareable, so booted like memfd.
        assert_eq!(
            boot_plan(Backing::MemfdThp, true),
            boot_plan(Backing::Memfd, true)
        );
    }
}
