//! Cloud Hypervisor's `VmConfig` (the body of `PUT /api/v1/vm.create`) for what `vmm` has,
//! and its one meaning: the `vmm run` command line it stands for. A config is checked by
//! turning it into those arguments and running `vmm run`'s own parser and checks on them, so
//! the API refuses exactly what the command line refuses, with the same reasons.
//!
//! Every object refuses fields it does not know (never ignored): a Cloud Hypervisor section
//! that `vmm` lacks (`disks`, `net`, ...) is named with why, a misspelt field with its path.

mod args;
mod parse;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use parse::{parse, ConfigJsonError};

/// A VM's configuration in Cloud Hypervisor's shape. Absent sections take `vmm run`'s
/// defaults (256 MiB of RAM, one vCPU, the built-in probe guest, serial output on stdout).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfigJson {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<CpusConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<PayloadConfig>,
    /// Host PCI functions passed through kernel VFIO.
    #[serde(default)]
    pub devices: Vec<DeviceConfig>,
    /// PCI functions served over vfio-user: exactly these (none listed: none attached).
    #[serde(default)]
    pub user_devices: Vec<UserDeviceConfig>,
    /// Guest NUMA nodes (with `memory.zones`).
    #[serde(default)]
    pub numa: Vec<NumaConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<ConsoleConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console: Option<ConsoleConfig>,
    /// `vmm`'s own settings, which Cloud Hypervisor's config has no place for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmm: Option<VmmExtension>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpusConfig {
    pub boot_vcpus: u64,
    /// Accepted only equal to `boot_vcpus`: `vmm` has no CPU hotplug.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_vcpus: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    /// Bytes. With `zones`: 0 or absent (RAM is the zones' sum), or that sum.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// These three choose the backing (`vmm.backing` chooses it by name instead).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugepages: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thp: Option<bool>,
    /// Accepted either way: what `vmm.pin` says decides whether RAM is populated before the
    /// guest runs (by default it is whenever a device needs it DMA-mapped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefault: Option<bool>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub zones: Vec<MemoryZoneConfig>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryZoneConfig {
    pub id: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_numa_node: Option<u32>,
    #[serde(default)]
    pub shared: bool,
    #[serde(default)]
    pub hugepages: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NumaConfig {
    pub guest_numa_id: u32,
    #[serde(default)]
    pub cpus: Vec<u8>,
    #[serde(default)]
    pub distances: Vec<NumaDistance>,
    #[serde(default)]
    pub memory_zones: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NumaDistance {
    pub destination: u32,
    pub distance: u8,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PayloadConfig {
    /// No kernel: the built-in probe guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    pub path: PathBuf,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserDeviceConfig {
    pub socket: PathBuf,
}

/// Cloud Hypervisor's `ConsoleConfig`, for `serial` and `console`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    pub mode: ConsoleMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
}

/// Cloud Hypervisor's console modes; which ones `serial` and `console` take is checked
/// after parsing, so that a mode `vmm` lacks is refused with the ones it has.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsoleMode {
    Off,
    Pty,
    #[default]
    Tty,
    File,
    Socket,
    Null,
}

/// `vmm`'s own settings: each is the `vmm run` flag of the same name (with `-` for `_`),
/// sizes in bytes; absent, the flag's default.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmmExtension {
    /// 1 to 4096; absent: as many as the limits allow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin_threads: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_shard: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seccomp: Option<String>,
    /// Seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_log_max: Option<u64>,
    /// The interface for `devices`: type1 or iommufd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iommu: Option<String>,
    /// Also attach the built-in pci-epf-test device (`--user-device epf`: its server runs as
    /// a child of the VM's process).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epf: Option<bool>,
}

#[cfg(test)]
mod tests;
