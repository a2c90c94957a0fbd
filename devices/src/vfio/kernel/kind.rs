//! Which kernel interface a device's IOMMU mappings go through, as the command line names it:
//! the host checks, the context and the VMM all take it, so it depends on none of them.

/// Which kernel interface owns the device's IOMMU mappings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IommuKind {
    /// A VFIO container with the type1v2 IOMMU (`/dev/vfio/vfio`, one group node per group).
    #[default]
    Type1,
    /// An iommufd IOAS and the device's VFIO cdev (Linux 6.6+ for the cdev).
    Iommufd,
}

impl IommuKind {
    pub fn as_str(self) -> &'static str {
        match self {
            IommuKind::Type1 => "type1",
            IommuKind::Iommufd => "iommufd",
        }
    }
}

impl std::fmt::Display for IommuKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for IommuKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "type1" => Ok(IommuKind::Type1),
            "iommufd" => Ok(IommuKind::Iommufd),
            other => Err(format!(
                "unknown IOMMU interface {other:?} (type1 or iommufd)"
            )),
        }
    }
}
