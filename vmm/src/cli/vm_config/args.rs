//! A [`VmConfigJson`] as the `vmm run` arguments it stands for, and back: the one mapping
//! between the API's config and the command line (`vmm serve` starts each VM with them).

use std::path::Path;

use clap::{Parser, ValueEnum};

use super::{
    ConsoleConfig, ConsoleMode, CpusConfig, DeviceConfig, MemoryConfig, MemoryZoneConfig,
    NumaConfig, NumaDistance, PayloadConfig, UserDeviceConfig, VmConfigJson, VmmExtension,
};
use crate::cli::run::{self, BackingArg, RunArgs, DEFAULT_MEMORY};
use crate::memory::Backing;
use crate::passthrough::UserDevice;
use crate::pin::PinChoice;

/// Where `serial.mode` Off or Null sends the guest's serial output: COM1 stays in the guest
/// (the probe reports through it), its bytes go nowhere.
const DISCARD: &str = "/dev/null";

/// Each `vmm run` flag and the config field it comes from, for messages about the flags.
/// `--backing` is not here: which field chose it depends on the config.
const FIELD_OF_FLAG: [(&str, &str); 18] = [
    ("--cpus", "cpus.boot_vcpus"),
    ("--memory", "memory.size"),
    ("--memory-zone", "memory.zones"),
    ("--numa", "numa"),
    ("--kernel", "payload.kernel"),
    ("--initrd", "payload.initramfs"),
    ("--cmdline", "payload.cmdline"),
    ("--device", "devices"),
    ("--user-device", "user_devices"),
    ("--serial-log", "serial.file"),
    ("--serial-log-max", "vmm.serial_log_max"),
    ("--pin", "vmm.pin"),
    ("--pin-threads", "vmm.pin_threads"),
    ("--memory-shard", "vmm.memory_shard"),
    ("--seccomp", "vmm.seccomp"),
    ("--timeout", "vmm.timeout"),
    ("--boot-protocol", "vmm.boot_protocol"),
    ("--iommu", "vmm.iommu"),
];

/// `vmm run`'s arguments alone, parsed as the command line parses them.
#[derive(Parser)]
#[command(name = "vmm run")]
struct RunLine {
    #[command(flatten)]
    run: RunArgs,
}

impl VmConfigJson {
    /// The arguments after `vmm run` that build this VM (each `--flag=value`, so that no
    /// value is read as a flag).
    pub fn to_run_args(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut flag = |name: &str, value: &dyn std::fmt::Display| {
            out.push(format!("--{name}={value}"));
        };
        if let Some(c) = &self.cpus {
            flag("cpus", &c.boot_vcpus);
        }
        if let Some(m) = &self.memory {
            match m.size {
                // With zones, RAM is their sum: 0 (Cloud Hypervisor's way) leaves it to them.
                Some(0) if !m.zones.is_empty() => {}
                Some(size) => flag("memory", &size_arg(size)),
                None => {}
            }
            for z in &m.zones {
                flag("memory-zone", &zone_arg(z));
            }
        }
        for node in &self.numa {
            flag("numa", &numa_arg(node));
        }
        if let Some(p) = &self.payload {
            if let Some(k) = &p.kernel {
                flag("kernel", &k.display());
            }
            if let Some(i) = &p.initramfs {
                flag("initrd", &i.display());
            }
            if let Some(c) = &p.cmdline {
                flag("cmdline", c);
            }
        }
        for d in &self.devices {
            flag("device", &d.path.display());
        }
        let ext = self.vmm.clone().unwrap_or_default();
        if ext.epf == Some(true) {
            flag("user-device", &"epf");
        }
        for d in &self.user_devices {
            flag("user-device", &d.socket.display());
        }
        if self.user_devices.is_empty() && ext.epf != Some(true) {
            flag("user-device", &"none");
        }
        match self.serial.as_ref().map(|s| (s.mode, &s.file)) {
            Some((ConsoleMode::Off | ConsoleMode::Null, _)) => flag("serial-log", &DISCARD),
            Some((_, Some(file))) => flag("serial-log", &file.display()),
            _ => {}
        }
        if let Some(b) = ext
            .backing
            .clone()
            .or_else(|| self.memory.as_ref().and_then(memory_backing))
        {
            flag("backing", &b);
        }
        let text: [(&str, &Option<String>); 5] = [
            ("pin", &ext.pin),
            ("seccomp", &ext.seccomp),
            ("boot-protocol", &ext.boot_protocol),
            ("iommu", &ext.iommu),
            ("pin-threads", &ext.pin_threads.map(|n| n.to_string())),
        ];
        for (name, value) in text {
            if let Some(v) = value {
                flag(name, v);
            }
        }
        if let Some(s) = ext.memory_shard {
            flag("memory-shard", &size_arg(s));
        }
        if let Some(s) = ext.serial_log_max {
            flag("serial-log-max", &size_arg(s));
        }
        if let Some(t) = ext.timeout {
            flag("timeout", &t);
        }
        out
    }

    /// Refuses what `vmm run` would refuse with these arguments (its parser, then its checks,
    /// host included: the kernel's headers, huge pages, RAM), with its reason, the flags
    /// named as this config's fields. What is accepted is the command line `vmm run` parses.
    pub fn check(&self) -> Result<RunArgs, String> {
        self.validate().map_err(|e| e.to_string())?;
        let line = std::iter::once("vmm run".to_string()).chain(self.to_run_args());
        let parsed = RunLine::try_parse_from(line).map_err(|e| self.name_fields(&clap_text(&e)))?;
        run::config(&parsed.run).map_err(|e| self.name_fields(&e.to_string()))?;
        Ok(parsed.run)
    }

    /// The config a `vmm run` command line stands for, defaults filled in (as `vm.info`
    /// shows it). `to_run_args` of it builds the same VM; testing-only flags are left out.
    pub fn from_run_args(args: &RunArgs) -> VmConfigJson {
        let (epf, user_devices) = user_devices_of(args);
        let zones: Vec<MemoryZoneConfig> = args
            .memory_zones
            .iter()
            .map(|z| MemoryZoneConfig {
                id: z.id.clone(),
                size: z.size,
                host_numa_node: z.host_numa_node,
                shared: z.shared,
                hugepages: z.hugepages,
            })
            .collect();
        let size = match zones.is_empty() {
            true => Some(args.memory.unwrap_or(DEFAULT_MEMORY)),
            false => args.memory,
        };
        let (shared, hugepages, thp, named) = match args.backing {
            BackingArg::Auto => (None, None, None, Some("auto")),
            BackingArg::Fixed(b) => match b {
                Backing::Anon => (Some(false), Some(false), Some(false), None),
                Backing::Thp => (Some(false), Some(false), Some(true), None),
                Backing::Memfd => (Some(true), Some(false), Some(false), None),
                Backing::MemfdThp => (Some(true), Some(false), Some(true), None),
                Backing::Hugetlb => (None, Some(true), None, None),
                Backing::Hugetlb1g => (None, None, None, Some("hugetlb-1g")),
            },
        };
        let payload = PayloadConfig {
            kernel: args.kernel.clone(),
            initramfs: args.initrd.clone(),
            cmdline: args.cmdline.clone(),
        };
        let serial = match &args.serial_log {
            None => ConsoleConfig::default(),
            Some(p) if p == Path::new(DISCARD) => ConsoleConfig {
                mode: ConsoleMode::Null,
                file: None,
            },
            Some(p) => ConsoleConfig {
                mode: ConsoleMode::File,
                file: Some(p.clone()),
            },
        };
        VmConfigJson {
            cpus: Some(CpusConfig {
                boot_vcpus: args.cpus.into(),
                max_vcpus: Some(args.cpus.into()),
            }),
            memory: Some(MemoryConfig {
                size,
                shared,
                hugepages,
                thp,
                prefault: None,
                zones,
            }),
            payload: (payload != PayloadConfig::default()).then_some(payload),
            devices: args
                .devices
                .iter()
                .map(|p| DeviceConfig { path: p.clone() })
                .collect(),
            user_devices,
            numa: args.numa.iter().map(numa_config).collect(),
            serial: Some(serial),
            console: Some(ConsoleConfig {
                mode: ConsoleMode::Off,
                file: None,
            }),
            vmm: Some(VmmExtension {
                pin_threads: match args.pin_threads {
                    pinning::ThreadRequest::AtMost(n) => Some(n as u64),
                    pinning::ThreadRequest::Auto => None,
                },
                pin: Some(match args.pin {
                    PinChoice::Auto => "auto".to_string(),
                    PinChoice::Fixed(kind) => kind.as_str().to_string(),
                }),
                backing: named.map(str::to_string),
                memory_shard: args.memory_shard,
                seccomp: args
                    .seccomp
                    .seccomp
                    .to_possible_value()
                    .map(|v| v.get_name().to_string()),
                timeout: args.timeout,
                boot_protocol: Some(args.boot_protocol.to_string()),
                serial_log_max: Some(args.serial_log_max),
                iommu: Some(args.iommu.as_str().to_string()),
                epf: Some(epf),
            }),
        }
    }

    /// `message` (about `vmm run`'s flags) with each flag named as the field it came from.
    fn name_fields(&self, message: &str) -> String {
        let field = |flag: &str| match flag {
            "--backing" => Some("vmm.backing"),
            _ => FIELD_OF_FLAG
                .iter()
                .find(|(f, _)| *f == flag)
                .map(|(_, field)| *field),
        };
        // A backing the memory flags chose: say which, since the message names the backing.
        let by_memory = self.vmm.as_ref().is_none_or(|v| v.backing.is_none());
        let chosen = self.memory.as_ref().and_then(memory_backing);
        let prefix = match chosen {
            Some(name) if by_memory && message.contains("--backing") => {
                format!("`memory.shared`/`hugepages`/`thp` choose `vmm.backing` {name}, and ")
            }
            _ => String::new(),
        };
        let mut out = String::new();
        let unquoted = unquote_flags(message);
        let mut text = unquoted.as_str();
        while let Some(at) = text.find("--") {
            out.push_str(&text[..at]);
            let len = text[at + 2..]
                .find(|c: char| !(c.is_ascii_lowercase() || c == '-'))
                .map_or(text.len() - at, |n| n + 2);
            let flag = &text[at..at + len];
            match field(flag) {
                Some(f) => out.push_str(&format!("`{f}`")),
                None => out.push_str(flag),
            }
            text = &text[at + len..];
        }
        out.push_str(text);
        prefix + &out
    }
}

/// The backing that `memory.shared`/`hugepages`/`thp` choose (Cloud Hypervisor's default is
/// THP on); `None` when none of them is given: `vmm run`'s `auto`.
fn memory_backing(m: &MemoryConfig) -> Option<String> {
    if m.shared.is_none() && m.hugepages.is_none() && m.thp.is_none() {
        return None;
    }
    let thp = m.thp != Some(false);
    let backing = match (m.hugepages == Some(true), m.shared == Some(true), thp) {
        (true, _, _) => Backing::Hugetlb,
        (false, true, true) => Backing::MemfdThp,
        (false, true, false) => Backing::Memfd,
        (false, false, true) => Backing::Thp,
        (false, false, false) => Backing::Anon,
    };
    Some(backing.name().to_string())
}

/// The built-in device asked for (given, or `vmm run`'s default), and the sockets.
fn user_devices_of(args: &RunArgs) -> (bool, Vec<UserDeviceConfig>) {
    let chosen: Vec<UserDevice> = match run::user_devices(args) {
        Ok(devices) => devices,
        // A device argument `vmm run` refuses: the config shows what was given.
        Err(_) => args
            .user_devices
            .iter()
            .filter_map(|d| d.parse().ok())
            .collect(),
    };
    let sockets = chosen
        .iter()
        .filter_map(|d| match d {
            UserDevice::Socket(p) => Some(UserDeviceConfig { socket: p.clone() }),
            UserDevice::Epf => None,
        })
        .collect();
    (chosen.contains(&UserDevice::Epf), sockets)
}

fn numa_config(node: &crate::memory::zones::GuestNumaNode) -> NumaConfig {
    NumaConfig {
        guest_numa_id: node.guest_numa_id,
        cpus: node.cpus.clone(),
        distances: node
            .distances
            .iter()
            .map(|&(destination, distance)| NumaDistance {
                destination,
                distance,
            })
            .collect(),
        memory_zones: node.memory_zones.clone(),
    }
}

/// A size as `vmm run`'s size parser reads it back exactly: the largest unit that divides it
/// (a bare number is MiB there, so bytes cannot be written bare).
fn size_arg(bytes: u64) -> String {
    if bytes == 0 {
        return "0".to_string();
    }
    for (unit, shift) in [("T", 40), ("G", 30), ("M", 20), ("K", 10)] {
        if bytes % (1 << shift) == 0 {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    // Below 1 KiB granularity (which no page size allows, so `vmm run` refuses it with its
    // reason): the exact fraction of a KiB.
    format!("{}K", bytes as f64 / 1024.0)
}

fn zone_arg(z: &MemoryZoneConfig) -> String {
    let mut s = format!("id={},size={}", z.id, size_arg(z.size));
    if let Some(n) = z.host_numa_node {
        s.push_str(&format!(",host_numa_node={n}"));
    }
    if z.shared {
        s.push_str(",shared=on");
    }
    if z.hugepages {
        s.push_str(",hugepages=on");
    }
    s
}

fn numa_arg(n: &NumaConfig) -> String {
    let join = |items: Vec<String>| items.join(",");
    let mut s = format!("guest_numa_id={}", n.guest_numa_id);
    if !n.cpus.is_empty() {
        let cpus = n.cpus.iter().map(u8::to_string).collect();
        s.push_str(&format!(",cpus=[{}]", join(cpus)));
    }
    if !n.memory_zones.is_empty() {
        s.push_str(&format!(",memory_zones=[{}]", n.memory_zones.join(",")));
    }
    if !n.distances.is_empty() {
        let d = n
            .distances
            .iter()
            .map(|d| format!("{}@{}", d.destination, d.distance))
            .collect();
        s.push_str(&format!(",distances=[{}]", join(d)));
    }
    s
}

/// clap's message without its `error: ` prefix and usage tail, lines joined.
fn clap_text(e: &clap::Error) -> String {
    let text = e.to_string();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.is_empty())
        .collect();
    let joined = lines.join("; ");
    joined
        .strip_prefix("error: ")
        .unwrap_or(&joined)
        .to_string()
}

/// clap's `'--cpus <CPUS>'` as `--cpus`.
fn unquote_flags(message: &str) -> String {
    let mut out = String::new();
    let mut text = message;
    while let Some(at) = text.find("'--") {
        let Some(end) = text[at + 1..].find('\'') else {
            break;
        };
        let inner = &text[at + 1..at + 1 + end];
        out.push_str(&text[..at]);
        out.push_str(inner.split(' ').next().unwrap_or(inner));
        text = &text[at + end + 2..];
    }
    out.push_str(text);
    out
}
