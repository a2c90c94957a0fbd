//! `--pin`: how guest RAM is prepared before the guest runs, and the one place that turns
//! that choice and the devices attached into the backend the pin stage runs.

use std::str::FromStr;
use std::sync::Arc;

use pinning::backend::{MlockBackend, NoneBackend, PopulateBackend, SeveralBackend};
use pinning::{BackendKind, Classify, ErrorClass, PinBackend};

/// What `--pin` asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinChoice {
    /// What the devices need: their DMA-mapping backend, or `none` without devices.
    Auto,
    /// This backend, checked against the devices.
    Fixed(BackendKind),
}

/// Why `--pin` does not fit the devices asked for.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PinChoiceError {
    #[error("--pin {0}: a passthrough device needs guest RAM mapped for its DMA; use --pin auto")]
    DeviceNeedsMapping(BackendKind),
    #[error("--pin {0}: no device that maps through it is attached; add one with --device or --user-device, or use --pin auto")]
    NoSuchDevice(BackendKind),
    #[error("--pin {wanted}: the attached devices map through {have}; use --pin auto (for --device, pick the interface with --iommu)")]
    Mismatch { wanted: BackendKind, have: String },
}

impl Classify for PinChoiceError {
    fn class(&self) -> ErrorClass {
        ErrorClass::User
    }
}

impl FromStr for PinChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "auto" {
            return Ok(PinChoice::Auto);
        }
        BackendKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .map(PinChoice::Fixed)
            .ok_or_else(|| {
                let names: Vec<_> = BackendKind::ALL.iter().map(|k| k.as_str()).collect();
                format!("`{s}`: use auto, {}", names.join(", "))
            })
    }
}

impl PinChoice {
    /// The backend of a choice that maps for no device (`none`, `populate`, `mlock`).
    fn without_device(self) -> Option<Arc<dyn PinBackend>> {
        match self {
            PinChoice::Fixed(BackendKind::None) => Some(Arc::new(NoneBackend)),
            PinChoice::Fixed(BackendKind::Populate) => Some(Arc::new(PopulateBackend)),
            PinChoice::Fixed(BackendKind::Mlock) => Some(Arc::new(MlockBackend)),
            _ => None,
        }
    }

    /// Refuses a device-less choice when devices are asked for: checked before any device is
    /// opened or server started.
    pub fn check_devices(self, devices: bool) -> Result<(), PinChoiceError> {
        match self {
            PinChoice::Fixed(kind) if devices && self.without_device().is_some() => {
                Err(PinChoiceError::DeviceNeedsMapping(kind))
            }
            _ => Ok(()),
        }
    }

    /// The backend the pin stage runs: the devices' DMA mapping (one job over all of them
    /// when there are several), or the device-less backend chosen.
    pub fn backend(
        self,
        mut dma: Vec<Arc<dyn PinBackend>>,
    ) -> Result<Arc<dyn PinBackend>, PinChoiceError> {
        if let Some(b) = self.without_device() {
            return Ok(b);
        }
        let needed: Option<Arc<dyn PinBackend>> = match dma.len() {
            0 => None,
            1 => dma.pop(),
            _ => Some(Arc::new(SeveralBackend::new(dma))),
        };
        match (self, needed) {
            (PinChoice::Auto, None) => Ok(Arc::new(NoneBackend)),
            (PinChoice::Fixed(kind), None) => Err(PinChoiceError::NoSuchDevice(kind)),
            (PinChoice::Fixed(wanted), Some(n)) if !n.kinds().contains(&wanted) => {
                Err(PinChoiceError::Mismatch {
                    wanted,
                    have: n
                        .kinds()
                        .iter()
                        .map(|k| k.as_str())
                        .collect::<Vec<_>>()
                        .join(" and "),
                })
            }
            (_, Some(n)) => Ok(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_as_on_the_command_line() {
        assert_eq!("auto".parse(), Ok(PinChoice::Auto));
        assert_eq!(
            "vfio-user".parse(),
            Ok(PinChoice::Fixed(BackendKind::VfioUser))
        );
        assert!("vfiouser"
            .parse::<PinChoice>()
            .unwrap_err()
            .contains("vfio-user"));
    }

    #[test]
    fn device_less_choices_refuse_devices_and_device_choices_need_them() {
        let populate = PinChoice::Fixed(BackendKind::Populate);
        assert_eq!(
            populate.check_devices(true),
            Err(PinChoiceError::DeviceNeedsMapping(BackendKind::Populate))
        );
        assert!(populate.check_devices(false).is_ok());
        assert_eq!(
            populate.backend(Vec::new()).unwrap().kind(),
            BackendKind::Populate
        );
        assert_eq!(
            PinChoice::Auto.backend(Vec::new()).unwrap().kind(),
            BackendKind::None
        );
        let e = PinChoice::Fixed(BackendKind::Type1)
            .backend(Vec::new())
            .err()
            .unwrap();
        assert_eq!(e, PinChoiceError::NoSuchDevice(BackendKind::Type1));
    }
}
