use std::os::unix::fs::{symlink, PermissionsExt};

use super::*;

const ADDR: &str = "0000:01:00.0";

/// A host with one device at ADDR in IOMMU group 7, bound to `driver`.
struct Host {
    _tmp: tempfile::TempDir,
    paths: HostPaths,
}

impl Host {
    fn new(driver: Option<&str>) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let paths = HostPaths {
            sysfs_root: root.join("sys"),
            dev_root: root.join("dev"),
        };
        let host = Host { _tmp: tmp, paths };
        fs::create_dir_all(host.sys("bus/pci/devices")).unwrap();
        fs::create_dir_all(host.paths.dev_root.join("vfio/devices")).unwrap();
        host.add_device(ADDR, driver, Some(7));
        host
    }

    fn sys(&self, rel: &str) -> PathBuf {
        self.paths.sysfs_root.join(rel)
    }

    fn dev_dir(&self, addr: &str) -> PathBuf {
        self.sys(&format!("devices/pci0000:00/{addr}"))
    }

    /// A device directory, its bus/pci/devices link, driver link and group membership.
    fn add_device(&self, addr: &str, driver: Option<&str>, group: Option<u32>) {
        let dir = self.dev_dir(addr);
        fs::create_dir_all(&dir).unwrap();
        symlink(&dir, self.sys("bus/pci/devices").join(addr)).unwrap();
        if let Some(drv) = driver {
            let drv_dir = self.sys(&format!("bus/pci/drivers/{drv}"));
            fs::create_dir_all(&drv_dir).unwrap();
            symlink(&drv_dir, dir.join("driver")).unwrap();
        }
        if let Some(g) = group {
            let gdir = self.sys(&format!("kernel/iommu_groups/{g}"));
            fs::create_dir_all(gdir.join("devices")).unwrap();
            symlink(&dir, gdir.join("devices").join(addr)).unwrap();
            symlink(&gdir, dir.join("iommu_group")).unwrap();
        }
    }

    fn node(&self, rel: &str, mode: u32) -> PathBuf {
        let p = self.paths.dev_root.join(rel);
        fs::write(&p, b"").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    fn type1_nodes(&self) {
        self.node("vfio/vfio", 0o666);
        self.node("vfio/7", 0o666);
    }

    fn iommufd_nodes(&self) {
        fs::create_dir_all(self.dev_dir(ADDR).join("vfio-dev/vfio3")).unwrap();
        self.node("iommu", 0o666);
        self.node("vfio/devices/vfio3", 0o666);
    }

    fn check(&self, iommu: IommuKind) -> Result<Preflight, KernelVfioError> {
        preflight(&self.paths, Path::new(ADDR), iommu, &stranger(&self.paths))
    }
}

/// A user who owns nothing in the fixture and is in none of its groups.
fn stranger(paths: &HostPaths) -> Access {
    let meta = fs::metadata(&paths.dev_root).unwrap();
    Access::As {
        uid: meta.uid().wrapping_add(1000),
        gids: vec![meta.gid().wrapping_add(1000)],
    }
}

#[test]
fn type1_device_that_is_ready_passes() {
    let host = Host::new(Some("vfio-pci"));
    host.type1_nodes();
    let pre = host.check(IommuKind::Type1).unwrap();
    assert_eq!(pre.address, ADDR);
    assert_eq!(pre.iommu_group, 7);
    assert_eq!(
        pre.nodes,
        vec![
            host.paths.dev_root.join("vfio/vfio"),
            host.paths.dev_root.join("vfio/7")
        ]
    );
}

#[test]
fn iommufd_device_that_is_ready_passes() {
    let host = Host::new(Some("vfio-pci"));
    host.iommufd_nodes();
    let pre = host.check(IommuKind::Iommufd).unwrap();
    assert_eq!(
        pre.nodes,
        vec![
            host.paths.dev_root.join("iommu"),
            host.paths.dev_root.join("vfio/devices/vfio3")
        ]
    );
}

#[test]
fn address_forms_resolve_under_sysfs_root() {
    let root = Path::new("/s");
    assert_eq!(
        resolve_device(root, Path::new("0000:01:00.0")),
        Path::new("/s/bus/pci/devices/0000:01:00.0")
    );
    assert_eq!(
        resolve_device(root, Path::new("01:00.0")),
        Path::new("/s/bus/pci/devices/0000:01:00.0")
    );
    assert_eq!(
        resolve_device(root, Path::new("/sys/bus/pci/devices/0000:02:00.0")),
        Path::new("/sys/bus/pci/devices/0000:02:00.0")
    );
}

#[test]
fn missing_device_says_check_the_address() {
    let host = Host::new(Some("vfio-pci"));
    let err = preflight(
        &host.paths,
        Path::new("0000:05:00.0"),
        IommuKind::Type1,
        &Access::Effective,
    )
    .unwrap_err();
    assert!(matches!(err, KernelVfioError::NoSuchDevice { .. }), "{err}");
    assert_eq!(err.class(), ErrorClass::User);
    let msg = err.to_string();
    assert!(msg.contains("bus/pci/devices/0000:05:00.0"), "{msg}");
    assert!(msg.contains("check the address"), "{msg}");
}

#[test]
fn device_bound_to_another_driver_gets_the_rebind_commands() {
    let host = Host::new(Some("nvme"));
    host.type1_nodes();
    let err = host.check(IommuKind::Type1).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(&err, KernelVfioError::NotBound { driver: Some(d), .. } if d == "nvme"),
        "{msg}"
    );
    assert!(msg.contains(ADDR) && msg.contains("bound to nvme"), "{msg}");
    assert!(
        msg.contains(&format!(
            "echo {ADDR} > /sys/bus/pci/devices/{ADDR}/driver/unbind"
        )),
        "{msg}"
    );
    assert!(
        msg.contains(&format!(
            "echo vfio-pci > /sys/bus/pci/devices/{ADDR}/driver_override"
        )),
        "{msg}"
    );
    assert!(
        msg.contains(&format!("echo {ADDR} > /sys/bus/pci/drivers_probe")),
        "{msg}"
    );
}

#[test]
fn unbound_device_needs_no_unbind() {
    let host = Host::new(None);
    let msg = host.check(IommuKind::Type1).unwrap_err().to_string();
    assert!(msg.contains("not bound to any driver"), "{msg}");
    assert!(!msg.contains("driver/unbind"), "{msg}");
    assert!(msg.contains("drivers_probe"), "{msg}");
}

#[test]
fn vfio_variant_drivers_count_as_vfio() {
    assert!(is_vfio_driver("vfio-pci"));
    assert!(is_vfio_driver("mlx5_vfio_pci"));
    assert!(!is_vfio_driver("nvme"));
    let host = Host::new(Some("mlx5_vfio_pci"));
    host.type1_nodes();
    host.check(IommuKind::Type1).unwrap();
}

#[test]
fn no_iommu_group_says_enable_the_iommu() {
    let host = Host::new(Some("vfio-pci"));
    host.add_device("0000:02:00.0", Some("vfio-pci"), None);
    let err = preflight(
        &host.paths,
        Path::new("0000:02:00.0"),
        IommuKind::Type1,
        &Access::Effective,
    )
    .unwrap_err();
    assert!(matches!(err, KernelVfioError::NoIommuGroup { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("0000:02:00.0"), "{msg}");
    assert!(
        msg.contains("intel_iommu=on") && msg.contains("amd_iommu"),
        "{msg}"
    );
}

#[test]
fn group_with_a_device_on_a_host_driver_is_not_viable_and_names_it() {
    let host = Host::new(Some("vfio-pci"));
    host.type1_nodes();
    host.add_device("0000:01:00.1", Some("snd_hda_intel"), Some(7));
    // Allowed company: a bridge on pcieport, a device without a driver, a vfio-pci one.
    host.add_device("0000:00:01.0", Some("pcieport"), Some(7));
    host.add_device("0000:01:00.2", None, Some(7));
    host.add_device("0000:01:00.3", Some("vfio-pci"), Some(7));
    let err = host.check(IommuKind::Type1).unwrap_err();
    match &err {
        KernelVfioError::GroupNotViable { group, others, .. } => {
            assert_eq!(*group, 7);
            assert_eq!(
                others,
                &vec![("0000:01:00.1".to_string(), "snd_hda_intel".to_string())]
            );
        }
        e => panic!("wrong error: {e}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("0000:01:00.1 (bound to snd_hda_intel)"),
        "{msg}"
    );
    assert!(msg.contains("group 7"), "{msg}");
}

#[test]
fn group_with_only_allowed_company_is_viable() {
    let host = Host::new(Some("vfio-pci"));
    host.type1_nodes();
    host.add_device("0000:00:01.0", Some("pcieport"), Some(7));
    host.add_device("0000:01:00.1", None, Some(7));
    host.add_device("0000:01:00.2", Some("pci-stub"), Some(7));
    host.check(IommuKind::Type1).unwrap();
}

fn assert_missing(err: KernelVfioError, path: &Path, hint: &str) {
    let msg = err.to_string();
    match &err {
        KernelVfioError::MissingNode { path: p, .. } => assert_eq!(p, path, "{msg}"),
        e => panic!("wrong error: {e}"),
    }
    assert!(msg.contains(ADDR), "{msg}");
    assert!(msg.contains(hint), "{msg}");
}

#[test]
fn missing_container_node_says_load_vfio() {
    let host = Host::new(Some("vfio-pci"));
    host.node("vfio/7", 0o666);
    let err = host.check(IommuKind::Type1).unwrap_err();
    assert_missing(
        err,
        &host.paths.dev_root.join("vfio/vfio"),
        "modprobe vfio-pci",
    );
}

#[test]
fn missing_group_node_is_reported() {
    let host = Host::new(Some("vfio-pci"));
    host.node("vfio/vfio", 0o666);
    let err = host.check(IommuKind::Type1).unwrap_err();
    assert_missing(err, &host.paths.dev_root.join("vfio/7"), "group's node");
}

#[test]
fn missing_dev_iommu_says_kernel_and_module() {
    let host = Host::new(Some("vfio-pci"));
    host.iommufd_nodes();
    fs::remove_file(host.paths.dev_root.join("iommu")).unwrap();
    let err = host.check(IommuKind::Iommufd).unwrap_err();
    assert_missing(err, &host.paths.dev_root.join("iommu"), "CONFIG_IOMMUFD");
}

#[test]
fn missing_vfio_cdev_in_sysfs_says_kernel_too_old() {
    let host = Host::new(Some("vfio-pci"));
    host.node("iommu", 0o666);
    let err = host.check(IommuKind::Iommufd).unwrap_err();
    assert_missing(
        err,
        &host.sys("bus/pci/devices").join(ADDR).join("vfio-dev"),
        "CONFIG_VFIO_DEVICE_CDEV",
    );
}

#[test]
fn missing_vfio_cdev_node_is_reported() {
    let host = Host::new(Some("vfio-pci"));
    host.iommufd_nodes();
    fs::remove_file(host.paths.dev_root.join("vfio/devices/vfio3")).unwrap();
    let err = host.check(IommuKind::Iommufd).unwrap_err();
    assert_missing(
        err,
        &host.paths.dev_root.join("vfio/devices/vfio3"),
        "devtmpfs",
    );
}

#[test]
fn group_node_without_permission_names_the_file_and_the_fix() {
    let host = Host::new(Some("vfio-pci"));
    host.type1_nodes();
    let group = host.node("vfio/7", 0o600);
    let err = host.check(IommuKind::Type1).unwrap_err();
    let msg = err.to_string();
    match &err {
        KernelVfioError::PermissionDenied { path, mode, .. } => {
            assert_eq!(path, &group);
            assert_eq!(*mode, 0o600);
        }
        e => panic!("wrong error: {e}"),
    }
    assert_eq!(err.class(), ErrorClass::User);
    assert!(msg.contains(&group.display().to_string()), "{msg}");
    assert!(msg.contains("run vmm as root"), "{msg}");
    assert!(msg.contains("SUBSYSTEM==\\\"vfio\\\"") || msg.contains("SUBSYSTEM==\"vfio\""));
}

#[test]
fn dev_iommu_without_permission_suggests_its_own_udev_rule() {
    let host = Host::new(Some("vfio-pci"));
    host.iommufd_nodes();
    host.node("iommu", 0o644);
    let msg = host.check(IommuKind::Iommufd).unwrap_err().to_string();
    assert!(msg.contains("permission denied"), "{msg}");
    assert!(msg.contains("KERNEL==\"iommu\""), "{msg}");
}

#[test]
fn permission_follows_owner_then_group_then_other_bits() {
    // Owner matches: only the owner bits count, even if others may.
    assert!(!mode_allows_rw(0o066, 1000, 100, 1000, &[100]));
    assert!(mode_allows_rw(0o600, 1000, 100, 1000, &[]));
    // Group matches.
    assert!(mode_allows_rw(0o660, 0, 100, 1000, &[5, 100]));
    assert!(!mode_allows_rw(0o640, 0, 100, 1000, &[100]));
    // Neither.
    assert!(!mode_allows_rw(0o660, 0, 100, 1000, &[5]));
    assert!(mode_allows_rw(0o666, 0, 100, 1000, &[5]));
}

#[test]
fn effective_access_allows_a_file_everyone_may_write() {
    let host = Host::new(Some("vfio-pci"));
    host.type1_nodes();
    preflight(
        &host.paths,
        Path::new(ADDR),
        IommuKind::Type1,
        &Access::Effective,
    )
    .unwrap();
}

#[test]
fn failures_after_the_checks_are_the_device_s_or_the_host_s() {
    let io = || io::Error::from_raw_os_error(libc::EIO);
    let request = KernelVfioError::Request {
        device: ADDR.into(),
        op: "VFIO_DEVICE_RESET".into(),
        source: io(),
    };
    assert_eq!(request.class(), ErrorClass::Device);
    let sysfs = KernelVfioError::Sysfs {
        device: ADDR.into(),
        path: "/sys/x".into(),
        source: io(),
    };
    assert_eq!(sysfs.class(), ErrorClass::Internal);
}
