//! `vmm run`'s command line, and its resolution into the [`VmConfig`] the builder builds:
//! defaults filled in (the probe guest and its device, the backing) and every combination
//! checked before anything is opened, mapped or started.

use std::path::PathBuf;
use std::time::Duration;

use devices::vfio::kernel::IommuKind;
use pinning::{Classify, ErrorClass, PinOptions, ThreadRequest};

use crate::arch::x86_64::acpi::GuestNuma;
use crate::builder::{VmConfig, MAX_TIMEOUT_SECS};
use crate::loader::{self, BootProtocol, ImageSource, LoadError, LoadRequest};
use crate::memory::layout::LayoutError;
use crate::memory::zones::{self, GuestNumaNode, ZoneConfig, ZoneError};
use crate::memory::{Backing, MemoryError, MemoryLayout, MemorySpec, RamRange, ThpPolicy};
use crate::passthrough::{DeviceRequest, UserDevice};
use crate::pin::{PinChoice, PinChoiceError};
use crate::platform::{SerialIn, SerialOut, DEFAULT_BUFFER_BYTES};
use crate::size::parse_size;

/// Guest RAM without --memory or --memory-zone.
pub const DEFAULT_MEMORY: u64 = 256 << 20;

/// `--backing`: `auto` (memfd when a vfio-user device needs shareable RAM, else anon) or a
/// [`Backing`] by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackingArg {
    Auto,
    Fixed(Backing),
}

impl std::str::FromStr for BackingArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        use clap::ValueEnum;
        if s == "auto" {
            return Ok(BackingArg::Auto);
        }
        Backing::from_str(s, false)
            .map(BackingArg::Fixed)
            .map_err(|_| {
                let names: Vec<_> = Backing::value_variants().iter().map(|b| b.name()).collect();
                format!("`{s}`: use auto, {}", names.join(", "))
            })
    }
}

#[derive(Clone, Debug, clap::Args)]
pub struct RunArgs {
    /// Kernel: an ELF vmlinux (PVH note or 64-bit entry) or a bzImage. Default: the built-in
    /// probe guest.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk (an uncompressed cpio boots fastest).
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line. Default for the probe guest: its self-checks for the memory size
    /// and CPU count; for other kernels: `console=ttyS0`.
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Guest RAM: 256M, 4G, ... (a bare number is MiB; default 256M). Above 3 GiB, RAM
    /// continues at 4 GiB. With --memory-zone, RAM is the zones' sum: leave --memory out or
    /// give that sum.
    #[arg(long, value_parser = parse_size)]
    pub memory: Option<u64>,
    /// A memory zone, in Cloud Hypervisor's syntax:
    /// `id=mem0,size=4G[,host_numa_node=N][,shared=on][,hugepages=on]`. Repeatable; guest RAM
    /// is the zones one after the other from address 0, each with its own backing
    /// (`hugepages=on`: hugetlb 2 MiB pages; `shared=on`: memfd; else as --backing says) and
    /// shards. `host_numa_node` must exist, be online and be allowed by the process's cpuset
    /// and Mems_allowed.
    #[arg(long = "memory-zone", value_name = "id=ID,size=SIZE[,...]")]
    pub memory_zones: Vec<ZoneConfig>,
    /// A guest NUMA node, in Cloud Hypervisor's syntax:
    /// `guest_numa_id=0,cpus=[0-1],memory_zones=[mem0],distances=[1@20]`. Repeatable; with
    /// --numa every vCPU and every --memory-zone belongs to exactly one node, and distances
    /// (NODE@DISTANCE, 11 to 255) name defined nodes.
    #[arg(long, value_name = "guest_numa_id=N,cpus=[..],memory_zones=[..]")]
    pub numa: Vec<GuestNumaNode>,
    /// vCPUs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=254))]
    pub cpus: u8,
    /// What backs guest RAM: auto, anon, thp, memfd, memfd-thp, hugetlb, hugetlb-1g. `auto`:
    /// with a vfio-user device (its server maps guest RAM through memfds) memfd-thp where the
    /// host's shmem_enabled allows huge pages, else memfd; without one, thp where the host's
    /// THP `enabled` allows it, else anon. The run report's vm.backing_reason says which.
    #[arg(long, default_value = "auto")]
    pub backing: BackingArg,
    /// Shareable RAM (memfd, memfd-thp, hugetlb) is made of one memfd per shard of this size
    /// (a power of two, at least the page size, at most a RAM range; default 1G), so that
    /// threads faulting it in do not queue on one file's locks.
    #[arg(long, value_parser = parse_size)]
    pub memory_shard: Option<u64>,
    /// How guest RAM is prepared before the guest runs. `auto`: mapped for the attached
    /// devices by their backend (type1, iommufd or vfio-user), nothing without devices.
    /// `none` (the guest faults RAM in as it goes), `populate` (MADV_POPULATE_WRITE), `mlock`
    /// (mlock2(MLOCK_ONFAULT) + parallel populate), `type1` or `iommufd` (`--device`: VFIO
    /// container or IOAS), `vfio-user` (`--user-device`: populate, then DMA_MAP messages).
    #[arg(long, default_value = "auto")]
    pub pin: PinChoice,
    /// Pass a host PCI function through kernel VFIO: its sysfs path
    /// (/sys/bus/pci/devices/0000:01:00.0) or PCI address. Repeatable.
    #[arg(long = "device", value_name = "SYSFS_PATH")]
    pub devices: Vec<PathBuf>,
    /// IOMMU interface for --device: `type1` (VFIO container) or `iommufd`.
    #[arg(long, default_value = "type1")]
    pub iommu: IommuKind,
    /// A PCI function served over vfio-user: `epf` starts the built-in pci-epf-test server
    /// (`vmm device epf`) as a child process; anything else is the path of a server's socket;
    /// `none` attaches nothing. Default with the built-in probe guest: `epf` (unless --device,
    /// or a --pin/--backing that cannot serve it, is given).
    #[arg(long = "user-device", value_name = "epf|SOCKET|none")]
    pub user_devices: Vec<String>,
    /// Testing only: leave the 4 KiB page at this guest address out of the vfio-user DMA map.
    #[arg(long, hide = true, value_parser = parse_addr)]
    pub test_dma_hole: Option<u64>,
    /// Testing only: inject a fault into the pin backend, `panic-on-map=N` (the Nth map call
    /// panics), `panic-after-map=N` (it maps, then panics), `wait-after-map=N` (it maps, then
    /// waits for SIGINT or SIGTERM), `fail-unmap` (every unmap fails, undoing nothing),
    /// `slow-unmap` (every unmap sleeps 20 ms first), `skip-munlock` (the munlock of the undo
    /// is skipped), `hold-after-first-unmap` or `hold-after-unpin` (teardown waits there for a
    /// signal, see `pin::HOLD_MARKER`). Repeatable.
    #[arg(long, hide = true)]
    pub test_fault: Vec<crate::pin::TestFault>,
    /// Threads for pinning: `auto` (all the limits allow) or a number from 1 to 4096.
    #[arg(long, default_value = "auto")]
    pub pin_threads: ThreadRequest,
    /// Entry protocol: auto (PVH if the ELF has the note), linux64, pvh.
    #[arg(long, default_value = "auto")]
    pub boot_protocol: BootProtocol,
    /// Write guest serial output to this file instead of stdout.
    #[arg(long)]
    pub serial_log: Option<PathBuf>,
    /// Cut the --serial-log file after this much guest output (64M, 1G, ...; a bare number is
    /// MiB), with a marker line where it cut; the run report counts what was left out.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    pub serial_log_max: u64,
    /// Testing only: the ring between the serial port and its output, instead of 1 MiB.
    #[arg(long, hide = true, value_parser = parse_size)]
    pub test_serial_buffer: Option<u64>,
    /// Write the start-up report (JSON) here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Don't print the timeline summary on stderr.
    #[arg(long)]
    pub quiet: bool,
    /// Stop the guest after this many seconds (exit status 124): more than 0, at most
    /// 31536000 (one year). Time the guest spends paused (`vm.pause`) does not count.
    #[arg(long)]
    pub timeout: Option<f64>,
    #[command(flatten)]
    pub seccomp: crate::seccomp::SeccompArgs,
    /// Serve the machine API (Cloud Hypervisor's REST paths, HTTP/1.1) for this VM on a Unix
    /// socket created here, owner-only: vm.info (stage, pinning progress, report), vm.counters,
    /// vm.pause, vm.resume, vm.shutdown, vmm.shutdown. The process still ends with the guest.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
}

/// Why a `vmm run` command line cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "--timeout {0}: give a number of seconds above 0 and at most {MAX_TIMEOUT_SECS} (one year)"
    )]
    Timeout(f64),
    #[error("--report {}: {reason}; give a file in a folder that exists and that you may write to", path.display())]
    Report { path: PathBuf, reason: String },
    #[error("--numa: the built-in probe guest reads at most {} guest nodes of at most {} memory ranges each; give fewer nodes or zones per node, or boot a --kernel", guest_abi::probe::MAX_NUMA_NODES, guest_abi::probe::MAX_NUMA_RANGES)]
    ProbeNuma,
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error("--user-device {arg:?}: {reason}")]
    UserDevice { arg: String, reason: String },
    #[error("--backing {0}: a vfio-user device maps guest RAM from another process, which needs shareable memory: use --backing memfd (or hugetlb), or leave --backing auto")]
    NotShareable(&'static str),
    #[error(transparent)]
    Pin(#[from] PinChoiceError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Zone(#[from] ZoneError),
}

impl Classify for ConfigError {
    fn class(&self) -> ErrorClass {
        match self {
            ConfigError::Memory(e) => e.class(),
            ConfigError::Load(e) => e.class(),
            _ => ErrorClass::User,
        }
    }
}

/// The command line the probe guest checks itself against: the RAM the E820 map describes
/// (in whole MiB, as the probe counts), the vCPU count and, when `epf` (the VMM starts its
/// own pci-epf-test server), the DMA checks, and with a guest NUMA topology each node's CPUs
/// and RAM as the SRAT must give them. Other devices are whatever their server or host makes
/// them: the probe lists them and runs the DMA checks only on a pci-epf-test function.
fn probe_cmdline(layout: &MemoryLayout, cpus: u8, epf: bool, numa: Option<&GuestNuma>) -> String {
    use guest_abi::probe::{OPT_EXPECT_CPUS, OPT_EXPECT_DMA, OPT_EXPECT_MEM};
    let mib = layout.e820_ram_bytes() >> 20;
    let dma = if epf {
        format!(" {OPT_EXPECT_DMA}=1")
    } else {
        String::new()
    };
    let numa = numa.map(probe_numa_words).unwrap_or_default();
    format!("{OPT_EXPECT_MEM}={mib} {OPT_EXPECT_CPUS}={cpus}{dma}{numa}")
}

/// One ` probe.expect_numa=N/CPUS/RANGES` per node, as guest-abi's `OPT_EXPECT_NUMA` says.
fn probe_numa_words(numa: &GuestNuma) -> String {
    use guest_abi::probe::OPT_EXPECT_NUMA;
    let join = |items: Vec<String>| items.join(",");
    numa.nodes
        .iter()
        .map(|n| {
            let cpus = join(cpu_runs(&n.apic_ids));
            let ranges = n
                .memory
                .iter()
                .map(|r| format!("{:#x}-{:#x}", r.start.0, r.end()));
            let ranges = join(ranges.collect());
            format!(" {OPT_EXPECT_NUMA}={}/{cpus}/{ranges}", n.proximity_domain)
        })
        .collect()
}

/// `ids` as the probe reads a CPU list: ascending, runs of consecutive IDs as `a-b` (so that
/// a guest with many vCPUs keeps a short command line).
fn cpu_runs(ids: &[u32]) -> Vec<String> {
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let mut runs: Vec<(u32, u32)> = Vec::new();
    for id in ids {
        match runs.last_mut() {
            Some((_, last)) if *last + 1 == id => *last = id,
            _ => runs.push((id, id)),
        }
    }
    let run = |&(first, last): &(u32, u32)| {
        if first == last {
            first.to_string()
        } else {
            format!("{first}-{last}")
        }
    };
    runs.iter().map(run).collect()
}

/// A guest-physical address, hex (0x...) or decimal.
fn parse_addr(s: &str) -> Result<u64, String> {
    let parsed = match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|_| format!("`{s}` is not an address: give hex (0x3ffff000) or decimal"))
}

/// The vfio-user devices asked for, with the default: the probe guest gets the built-in
/// pci-epf-test device unless the other options rule it out.
pub(crate) fn user_devices(args: &RunArgs) -> Result<Vec<UserDevice>, ConfigError> {
    if args.user_devices.iter().any(|d| d == "none") {
        return Ok(Vec::new());
    }
    if !args.user_devices.is_empty() {
        return args
            .user_devices
            .iter()
            .map(|d| {
                d.parse().map_err(|reason| ConfigError::UserDevice {
                    arg: d.clone(),
                    reason,
                })
            })
            .collect();
    }
    let shareable = !matches!(
        args.backing,
        BackingArg::Fixed(Backing::Anon | Backing::Thp)
    );
    let default = args.kernel.is_none()
        && args.devices.is_empty()
        && matches!(
            args.pin,
            PinChoice::Auto | PinChoice::Fixed(pinning::BackendKind::VfioUser)
        )
        && shareable;
    Ok(if default {
        vec![UserDevice::Epf]
    } else {
        Vec::new()
    })
}

/// The backing and why: what `--backing` names, or for `auto` huge pages where the host
/// allows them (as QEMU and Cloud Hypervisor advise for guest RAM), shareable when a
/// vfio-user server must map guest RAM.
fn backing(
    arg: BackingArg,
    user: &[UserDevice],
    thp: &ThpPolicy,
) -> Result<(Backing, String), ConfigError> {
    let shared = !user.is_empty();
    match arg {
        BackingArg::Fixed(b @ (Backing::Anon | Backing::Thp)) if shared => {
            Err(ConfigError::NotShareable(b.name()))
        }
        BackingArg::Fixed(b) => Ok((b, format!("--backing {}", b.name()))),
        BackingArg::Auto if shared && thp.shmem_allowed() => Ok((
            Backing::MemfdThp,
            format!(
                "auto: a vfio-user device needs shareable RAM, and {}",
                thp.describe_shmem()
            ),
        )),
        BackingArg::Auto if shared => Ok((
            Backing::Memfd,
            format!(
                "auto: a vfio-user device needs shareable RAM, and {}, which forbids huge pages there",
                thp.describe_shmem()
            ),
        )),
        BackingArg::Auto if thp.anon_allowed() => {
            Ok((Backing::Thp, format!("auto: {}", thp.describe_anon())))
        }
        BackingArg::Auto => Ok((
            Backing::Anon,
            format!("auto: {}, which forbids huge pages", thp.describe_anon()),
        )),
    }
}

/// Refuses a `--report` path that cannot be written, without creating anything: the report
/// is written at the very end, after the guest ran.
fn check_report_path(path: &std::path::Path) -> Result<(), ConfigError> {
    let refuse = |reason: &str| ConfigError::Report {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    if path.is_dir() {
        return Err(refuse("that is a folder"));
    }
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    if !folder.is_dir() {
        return Err(refuse("its folder does not exist"));
    }
    let c_folder = std::ffi::CString::new(folder.as_os_str().as_encoded_bytes())
        .map_err(|_| refuse("the path has a NUL byte in it"))?;
    // SAFETY: access(2) reads the NUL-terminated path, which outlives the call.
    if unsafe { libc::access(c_folder.as_ptr(), libc::W_OK) } != 0 {
        return Err(refuse("its folder is not writable"));
    }
    Ok(())
}

/// Resolves and checks `args` before anything is opened, mapped or started: everything a
/// later stage would refuse about the input (sizes, the kernel and initrd and whether they fit
/// the guest, the command line, the report's folder) is refused here, so a bad input costs
/// milliseconds even for a guest of many gigabytes.
pub fn config(args: &RunArgs) -> Result<VmConfig, ConfigError> {
    let timeout = match args.timeout {
        Some(t) if t.is_finite() && t > 0.0 && t <= MAX_TIMEOUT_SECS as f64 => {
            Some(Duration::from_secs_f64(t))
        }
        Some(t) => return Err(ConfigError::Timeout(t)),
        None => None,
    };
    if let Some(path) = &args.report {
        check_report_path(path)?;
    }
    zones::check(&args.memory_zones, &args.numa, args.memory, args.cpus)?;
    if args.memory_zones.iter().any(|z| z.host_numa_node.is_some()) {
        zones::check_host(
            &args.memory_zones,
            &pinning::topology::HostTopology::detect(),
        )?;
    }
    let layout = if args.memory_zones.is_empty() {
        MemoryLayout::new(args.memory.unwrap_or(DEFAULT_MEMORY))?
    } else {
        let sizes: Vec<(String, u64)> = args
            .memory_zones
            .iter()
            .map(|z| (z.id.clone(), z.size))
            .collect();
        MemoryLayout::with_zones(&sizes)?
    };
    let user = user_devices(args)?;
    let thp = ThpPolicy::host();
    let (backing, backing_reason) = backing(args.backing, &user, &thp)?;
    let memory = MemorySpec {
        backing,
        shard_bytes: args.memory_shard,
        // Each zone's own (`ZoneConfig::spec`); without zones the process's policy rules.
        host_numa_node: None,
    };
    let zone_memory: Vec<MemorySpec> = if args.memory_zones.is_empty() {
        vec![memory]
    } else {
        args.memory_zones
            .iter()
            .map(|z| z.spec(memory, &thp))
            .collect()
    };
    // Everything about guest RAM that can be refused is refused here, before anything else:
    // each backing over all the zones that use it, so that two zones that each fit the huge
    // page pool or the fd limit, but not together, are refused too.
    for (i, spec) in zone_memory.iter().enumerate() {
        if zone_memory[..i].contains(spec) {
            continue;
        }
        let ranges: Vec<RamRange> = zone_memory
            .iter()
            .zip(layout.zones())
            .filter(|(s, _)| *s == spec)
            .flat_map(|(_, z)| z.ranges.iter().copied())
            .collect();
        spec.check(&ranges, &thp)?;
    }
    if let Some(shard) = args.memory_shard {
        if !zone_memory.iter().any(|s| s.backing.shareable()) {
            // No zone is made of shards: the size would be dropped, not used.
            return Err(MemoryError::ShardNotShareable { shard, backing }.into());
        }
    }
    crate::memory::check_host_ram(layout.ram())?;
    if let BackingArg::Auto = args.backing {
        tracing::info!("guest RAM: {} ({backing_reason})", backing.name());
    }
    let dma = !user.is_empty() || !args.devices.is_empty();
    args.pin.check_devices(dma)?;
    // The guest NUMA topology, for the ACPI tables and the probe's expectations.
    let guest_numa = GuestNuma::from_nodes(&args.numa, &layout);
    if let (None, Some(numa)) = (&args.kernel, &guest_numa) {
        use guest_abi::probe::{MAX_NUMA_NODES, MAX_NUMA_RANGES};
        if numa.nodes.len() > MAX_NUMA_NODES
            || numa.nodes.iter().any(|n| n.memory.len() > MAX_NUMA_RANGES)
        {
            return Err(ConfigError::ProbeNuma);
        }
    }
    let (kernel, cmdline) = match &args.kernel {
        Some(p) => (ImageSource::Path(p.clone()), "console=ttyS0".to_string()),
        None => (
            ImageSource::Bytes {
                name: "built-in probe guest".into(),
                data: vmm_resources::PROBE_GUEST.into(),
            },
            probe_cmdline(
                &layout,
                args.cpus,
                user.contains(&UserDevice::Epf),
                guest_numa.as_ref(),
            ),
        ),
    };
    let cmdline = args.cmdline.clone().unwrap_or(cmdline);
    let initrd = args.initrd.clone().map(ImageSource::Path);
    // The images' headers against this guest's RAM: what the load stage would refuse, refused
    // before any memory is mapped or touched.
    loader::check(
        &layout,
        &LoadRequest {
            kernel: &kernel,
            initrd: initrd.as_ref(),
            cmdline: &cmdline,
            protocol: args.boot_protocol,
            cpus: args.cpus,
            pci_intx: &[],
            numa: guest_numa.as_ref(),
        },
    )?;
    Ok(VmConfig {
        cmdline,
        layout,
        cpus: args.cpus,
        guest_numa,
        memory,
        zone_memory,
        zones: args.memory_zones.clone(),
        numa: args.numa.clone(),
        backing_reason,
        kernel,
        initrd,
        boot_protocol: args.boot_protocol,
        serial_out: args
            .serial_log
            .clone()
            .map_or(SerialOut::Stdout, |path| SerialOut::File {
                path,
                max: args.serial_log_max,
            }),
        serial_buffer: args.test_serial_buffer.map_or(DEFAULT_BUFFER_BYTES, |b| {
            usize::try_from(b).unwrap_or(usize::MAX)
        }),
        serial_in: SerialIn::Stdin,
        devices: DeviceRequest {
            kernel_devices: args.devices.clone(),
            iommu: args.iommu,
            user_devices: user,
            dma_hole: args.test_dma_hole,
        },
        pin: args.pin,
        test_faults: args.test_fault.clone(),
        pin_options: PinOptions {
            threads: args.pin_threads,
            ..PinOptions::default()
        },
        timeout,
        seccomp: args.seccomp.clone(),
    })
}

#[cfg(test)]
mod tests;
