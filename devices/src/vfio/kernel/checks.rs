//! What must be true on the host before a PCI function can be opened through kernel VFIO, checked
//! up front so that a failure names the device and says the fix, instead of surfacing as a bare
//! errno from deep inside an ioctl sequence.
//!
//! Every check works over a sysfs root and a /dev root, so the tests run against fixture trees.

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use pinning::class::{Classify, ErrorClass};

use vfio_ioctls::VfioError;

use super::kind::IommuKind;

/// Where the host's sysfs and device nodes are (`/sys` and `/dev`, except in tests).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct HostPaths {
    pub sysfs_root: PathBuf,
    pub dev_root: PathBuf,
}

impl HostPaths {
    /// The running system: `/sys` and `/dev`.
    pub fn system() -> Self {
        Self {
            sysfs_root: PathBuf::from("/sys"),
            dev_root: PathBuf::from("/dev"),
        }
    }
}

/// Whose access to the device nodes is checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Access {
    /// This process, as the kernel sees it (`faccessat(AT_EACCESS)`: effective ids, capabilities,
    /// ACLs such as logind's `uaccess`).
    Effective,
    /// A user with these ids, judged by the mode bits alone: the tests may run as root, whom
    /// the kernel lets open anything.
    #[cfg(test)]
    As { uid: u32, gids: Vec<u32> },
}

/// Why a host PCI function cannot be opened or driven through kernel VFIO. Every variant
/// names the device; those the checks find also say what to do.
#[derive(Debug, thiserror::Error)]
pub enum KernelVfioError {
    #[error(
        "{path}: no such PCI device; check the address (`lspci -D` lists them as DDDD:BB:DD.F)"
    )]
    NoSuchDevice { path: PathBuf },

    #[error("{device}: {}; hand it to vfio-pci: `modprobe vfio-pci; {}`", bound_to(driver), rebind_commands(address, driver.is_some()))]
    NotBound {
        device: String,
        address: String,
        driver: Option<String>,
    },

    #[error(
        "{device}: no `iommu_group` in sysfs, so the host has no IOMMU for it; enable VT-d \
         (Intel) or AMD-Vi (AMD) in the firmware and boot with `intel_iommu=on` (or \
         `amd_iommu=on`, on by default on AMD) and `iommu=pt` on the kernel command line"
    )]
    NoIommuGroup { device: String },

    #[error(
        "{device}: IOMMU group {group} is not viable: every device in it must be bound to \
         vfio-pci (or have no driver) before any can be passed through; not so: {}; bind each \
         to vfio-pci the same way (`echo vfio-pci > /sys/bus/pci/devices/ADDR/driver_override`, \
         unbind, `echo ADDR > /sys/bus/pci/drivers_probe`) or pass them through together",
        list_others(others)
    )]
    GroupNotViable {
        device: String,
        group: u32,
        /// `(address, driver)` of each device in the group that blocks it.
        others: Vec<(String, String)>,
    },

    #[error("{device}: {} is missing; {fix}", path.display())]
    MissingNode {
        device: String,
        path: PathBuf,
        fix: String,
    },

    #[error(
        "{device}: permission denied on {} (owner uid {uid}, gid {gid}, mode {mode:o}); run \
         vmm as root, or give your user the file: `chown $USER {}` (until reboot) or a udev \
         rule, e.g. {udev}",
        path.display(), path.display()
    )]
    PermissionDenied {
        device: String,
        path: PathBuf,
        uid: u32,
        gid: u32,
        mode: u32,
        udev: &'static str,
    },

    #[error(
        "{device}: {} is busy: another process (another VMM?) has the device or its group \
         open; stop it first",
        path.display()
    )]
    Busy { device: String, path: PathBuf },

    #[error("{device}: reading {}: {source}", path.display())]
    Sysfs {
        device: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A step of opening the device through vfio-ioctls failed after the checks passed.
    #[error("{device}: {step}: {source}")]
    Open {
        device: String,
        step: &'static str,
        #[source]
        source: vfio_ioctls::VfioError,
    },

    /// A request on the open device fd failed (a query while attaching it, or a region
    /// access, interrupt or reset while it runs).
    #[error("{device}: {op}: {source}")]
    Request {
        device: String,
        op: String,
        #[source]
        source: io::Error,
    },
}

fn bound_to(driver: &Option<String>) -> String {
    match driver {
        Some(d) => format!("bound to {d}, not vfio-pci"),
        None => "not bound to any driver (vfio-pci needed)".to_string(),
    }
}

/// The commands that rebind `address` to vfio-pci.
fn rebind_commands(address: &str, has_driver: bool) -> String {
    let dev = format!("/sys/bus/pci/devices/{address}");
    let mut cmds = Vec::new();
    if has_driver {
        cmds.push(format!("echo {address} > {dev}/driver/unbind"));
    }
    cmds.push(format!("echo vfio-pci > {dev}/driver_override"));
    cmds.push(format!("echo {address} > /sys/bus/pci/drivers_probe"));
    cmds.join("; ")
}

fn list_others(others: &[(String, String)]) -> String {
    others
        .iter()
        .map(|(addr, drv)| format!("{addr} (bound to {drv})"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Classify for KernelVfioError {
    fn class(&self) -> ErrorClass {
        match self {
            // Each says what the user changes: the address, the driver binding, the host's
            // IOMMU and VFIO setup, the node permissions, the other process.
            KernelVfioError::NoSuchDevice { .. }
            | KernelVfioError::NotBound { .. }
            | KernelVfioError::NoIommuGroup { .. }
            | KernelVfioError::GroupNotViable { .. }
            | KernelVfioError::MissingNode { .. }
            | KernelVfioError::PermissionDenied { .. }
            | KernelVfioError::Busy { .. } => ErrorClass::User,
            KernelVfioError::Open { .. } | KernelVfioError::Request { .. } => ErrorClass::Device,
            KernelVfioError::Sysfs { .. } => ErrorClass::Internal,
        }
    }
}

/// What the checks found: enough to open the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Preflight {
    /// The device's sysfs directory.
    pub sysfs: PathBuf,
    /// `DDDD:BB:DD.F`.
    pub address: String,
    pub iommu_group: u32,
    /// The nodes that will be opened, all present and accessible.
    pub nodes: Vec<PathBuf>,
}

/// The sysfs directory of `device`: a path as given, or a PCI address (`0000:01:00.0`, or
/// `01:00.0` for domain 0) under `<sysfs_root>/bus/pci/devices/`.
fn resolve_device(sysfs_root: &Path, device: &Path) -> PathBuf {
    let s = device.to_string_lossy();
    if s.contains('/') {
        return device.to_path_buf();
    }
    let address = if s.matches(':').count() == 1 {
        format!("0000:{s}")
    } else {
        s.into_owned()
    };
    sysfs_root.join("bus/pci/devices").join(address)
}

/// Name of the driver a sysfs device directory is bound to, if any.
fn driver_of(dev: &Path) -> Option<String> {
    let link = fs::read_link(dev.join("driver")).ok()?;
    Some(link.file_name()?.to_string_lossy().into_owned())
}

/// vfio-pci itself, or a vendor variant of it (`mlx5_vfio_pci`, `nvgrace_gpu_vfio_pci`, ...).
fn is_vfio_driver(driver: &str) -> bool {
    driver == "vfio-pci" || driver.ends_with("_vfio_pci") || driver.ends_with("-vfio-pci")
}

/// Drivers that may hold another device of a group while one is passed through: those the
/// kernel marks `driver_managed_dma` besides vfio (PCIe port services, pci-stub).
fn allowed_in_group(driver: &str) -> bool {
    is_vfio_driver(driver) || driver == "pcieport" || driver == "pci-stub"
}

/// The device exists and is bound to vfio-pci.
fn check_bound(sysfs_root: &Path, device: &Path) -> Result<PathBuf, KernelVfioError> {
    let dir = resolve_device(sysfs_root, device);
    if !dir.is_dir() {
        return Err(KernelVfioError::NoSuchDevice { path: dir });
    }
    let driver = driver_of(&dir);
    match driver {
        Some(d) if is_vfio_driver(&d) => Ok(dir),
        driver => Err(KernelVfioError::NotBound {
            device: dir.display().to_string(),
            address: address_of(&dir),
            driver,
        }),
    }
}

fn address_of(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string())
}

/// The device's IOMMU group number.
fn iommu_group(dev: &Path) -> Result<u32, KernelVfioError> {
    let no_group = || KernelVfioError::NoIommuGroup {
        device: dev.display().to_string(),
    };
    let link = fs::read_link(dev.join("iommu_group")).map_err(|_| no_group())?;
    link.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .ok_or_else(no_group)
}

/// Every other device in the group is bound to vfio-pci, a driver the kernel allows alongside
/// it, or nothing.
fn check_group_viable(dev: &Path, group: u32) -> Result<(), KernelVfioError> {
    let devices = dev.join("iommu_group/devices");
    let entries = fs::read_dir(&devices).map_err(|source| KernelVfioError::Sysfs {
        device: dev.display().to_string(),
        path: devices.clone(),
        source,
    })?;
    let me = address_of(dev);
    let mut others = Vec::new();
    for entry in entries.flatten() {
        let addr = entry.file_name().to_string_lossy().into_owned();
        if addr == me {
            continue;
        }
        if let Some(drv) = driver_of(&entry.path()) {
            if !allowed_in_group(&drv) {
                others.push((addr, drv));
            }
        }
    }
    if others.is_empty() {
        return Ok(());
    }
    others.sort();
    Err(KernelVfioError::GroupNotViable {
        device: dev.display().to_string(),
        group,
        others,
    })
}

/// The nodes `iommu` opens for the device, with what to do if one is missing.
fn nodes_for(
    paths: &HostPaths,
    dev: &Path,
    group: u32,
    iommu: IommuKind,
) -> Result<Vec<(PathBuf, String)>, KernelVfioError> {
    let vfio = paths.dev_root.join("vfio");
    Ok(match iommu {
        IommuKind::Type1 => vec![
            (
                vfio.join("vfio"),
                "load VFIO (`modprobe vfio-pci`); a kernel built without \
                 CONFIG_VFIO_CONTAINER has only iommufd: use `--iommu iommufd`"
                    .to_string(),
            ),
            (
                vfio.join(group.to_string()),
                "the group's node appears once the device is bound to vfio-pci; if it is \
                 bound, is /dev mounted as devtmpfs? (or the kernel lacks type1 groups: try \
                 `--iommu iommufd`)"
                    .to_string(),
            ),
        ],
        IommuKind::Iommufd => {
            let cdev = vfio_cdev_name(dev)?;
            vec![
                (
                    paths.dev_root.join("iommu"),
                    "iommufd needs Linux 6.2+ with CONFIG_IOMMUFD (`modprobe iommufd`); or use \
                     `--iommu type1`"
                        .to_string(),
                ),
                (
                    vfio.join("devices").join(&cdev),
                    format!(
                        "sysfs names {cdev} but the node is missing: is /dev mounted as \
                         devtmpfs? (or use `--iommu type1`)"
                    ),
                ),
            ]
        }
    })
}

/// `vfioN` from `<dev>/vfio-dev/vfioN`: the device's VFIO character device (Linux 6.6+).
fn vfio_cdev_name(dev: &Path) -> Result<String, KernelVfioError> {
    let dir = dev.join("vfio-dev");
    let missing = || KernelVfioError::MissingNode {
        device: dev.display().to_string(),
        path: dir.clone(),
        fix: "the kernel has no VFIO device cdevs (needs Linux 6.6+ with \
              CONFIG_VFIO_DEVICE_CDEV); use `--iommu type1`"
            .to_string(),
    };
    let names: Vec<String> = fs::read_dir(&dir)
        .map_err(|_| missing())?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("vfio"))
        .collect();
    match names.as_slice() {
        [one] => Ok(one.clone()),
        _ => Err(missing()),
    }
}

/// The udev rule that gives a user the node at `path`.
fn udev_rule_for(path: &Path) -> &'static str {
    if path.file_name().is_some_and(|n| n == "iommu") {
        "`KERNEL==\"iommu\", SUBSYSTEM==\"misc\", OWNER=\"youruser\"` in /etc/udev/rules.d/90-vfio.rules"
    } else {
        "`SUBSYSTEM==\"vfio\", OWNER=\"youruser\"` in /etc/udev/rules.d/90-vfio.rules"
    }
}

/// `path` exists and `who` may open it for reading and writing.
pub(super) fn check_node(
    device: &str,
    path: &Path,
    fix: &str,
    who: &Access,
) -> Result<(), KernelVfioError> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(KernelVfioError::MissingNode {
                device: device.to_string(),
                path: path.to_path_buf(),
                fix: fix.to_string(),
            })
        }
        Err(source) => {
            return Err(KernelVfioError::Sysfs {
                device: device.to_string(),
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let allowed = match who {
        Access::Effective => effective_rw(path),
        #[cfg(test)]
        Access::As { uid, gids } => mode_allows_rw(meta.mode(), meta.uid(), meta.gid(), *uid, gids),
    };
    if allowed {
        Ok(())
    } else {
        Err(KernelVfioError::PermissionDenied {
            device: device.to_string(),
            path: path.to_path_buf(),
            uid: meta.uid(),
            gid: meta.gid(),
            mode: meta.mode() & 0o7777,
            udev: udev_rule_for(path),
        })
    }
}

/// The kernel's own answer, with capabilities and ACLs.
fn effective_rw(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: c is a NUL-terminated path; faccessat only reads it.
    unsafe {
        libc::faccessat(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::R_OK | libc::W_OK,
            libc::AT_EACCESS,
        ) == 0
    }
}

/// The classic permission check: owner bits if the user owns the file, else group bits if one
/// of its groups does, else the other bits.
#[cfg(test)]
fn mode_allows_rw(mode: u32, owner: u32, group: u32, uid: u32, gids: &[u32]) -> bool {
    let rw = if uid == owner {
        mode >> 6
    } else if gids.contains(&group) {
        mode >> 3
    } else {
        mode
    };
    rw & 0o6 == 0o6
}

/// All checks, in the order a user fixes them: device exists, bound to vfio-pci, has an IOMMU
/// group, the group is viable, the nodes `iommu` needs exist and are accessible.
pub(super) fn preflight(
    paths: &HostPaths,
    device: &Path,
    iommu: IommuKind,
    who: &Access,
) -> Result<Preflight, KernelVfioError> {
    let dir = check_bound(&paths.sysfs_root, device)?;
    let group = iommu_group(&dir)?;
    check_group_viable(&dir, group)?;
    let name = dir.display().to_string();
    let mut nodes = Vec::new();
    for (path, fix) in nodes_for(paths, &dir, group, iommu)? {
        check_node(&name, &path, &fix, who)?;
        nodes.push(path);
    }
    Ok(Preflight {
        address: address_of(&dir),
        sysfs: dir,
        iommu_group: group,
        nodes,
    })
}

impl fmt::Display for Preflight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (IOMMU group {})", self.address, self.iommu_group)
    }
}

/// The errno inside a vfio-ioctls error, wherever in its source chain it is.
pub(super) fn vfio_errno(e: &VfioError) -> Option<i32> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(n) = err
            .downcast_ref::<io::Error>()
            .and_then(|e| e.raw_os_error())
        {
            return Some(n);
        }
        if let Some(sys) = err.downcast_ref::<vmm_sys_util::errno::Error>() {
            return Some(sys.errno());
        }
        cur = err.source();
    }
    None
}

/// Turns a failed open of a node into the error that says what to do.
pub(super) fn open_error(
    device: &str,
    step: &'static str,
    path: &Path,
    e: VfioError,
) -> KernelVfioError {
    match vfio_errno(&e) {
        Some(libc::EACCES) | Some(libc::EPERM) => {
            let who = Access::Effective;
            // Re-run the node check: it explains who owns the file and how to get it.
            match check_node(device, path, "", &who) {
                Err(err) => err,
                Ok(()) => KernelVfioError::Open {
                    device: device.to_string(),
                    step,
                    source: e,
                },
            }
        }
        Some(libc::EBUSY) => KernelVfioError::Busy {
            device: device.to_string(),
            path: path.to_path_buf(),
        },
        _ => KernelVfioError::Open {
            device: device.to_string(),
            step,
            source: e,
        },
    }
}

#[cfg(test)]
mod tests;
