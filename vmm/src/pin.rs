//! `--pin`: how guest RAM is prepared before the guest runs, and the one place that turns
//! that choice and the devices attached into the backend the pin stage runs.

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use pinning::backend::{BackendError, MlockBackend, NoneBackend, PopulateBackend, SeveralBackend};
use pinning::region::{GuestRam, Piece};
use pinning::{BackendInfo, BackendKind, Classify, ErrorClass, PinBackend};

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
            (PinChoice::Fixed(wanted), Some(n)) if !n.describe().kinds.contains(wanted) => {
                Err(PinChoiceError::Mismatch {
                    wanted,
                    have: n
                        .describe()
                        .kinds
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

/// A fault injected into the pin backend, for tests of what `vmm run` does when pinning code
/// panics or an undo fails (`--test-fault`, hidden: never for real use).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TestFault {
    /// `panic-on-map=N`: the map call with this index (0-based, counted over all threads)
    /// panics.
    PanicOnMap(u64),
    /// `panic-after-map=N`: the map call with this index maps, then panics.
    PanicAfterMap(u64),
    /// `fail-unmap`: every unmap call fails with EIO and undoes nothing.
    FailUnmap,
    /// `slow-unmap`: every unmap call first sleeps 20 ms, so that a test watching the
    /// teardown's helper threads sees each of them at work.
    SlowUnmap,
    /// `skip-munlock`: the backend's whole-RAM undo (`end`: the munlock of `--pin mlock`) is
    /// skipped and reported done, so a test can see the VmLck it leaves.
    SkipMunlock,
    /// `wait-after-map=N`: the map call with this index maps, says so on stderr
    /// ([`WAITING_AFTER_MAP`]) and waits (at most a minute) for SIGINT or SIGTERM, so a test
    /// can cancel a job with a known part of it done.
    WaitAfterMap(u64),
}

/// What `wait-after-map=N` writes on stderr once it waits for the signal.
pub const WAITING_AFTER_MAP: &str = "waiting for SIGINT or SIGTERM";

impl FromStr for TestFault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fail-unmap" => return Ok(TestFault::FailUnmap),
            "skip-munlock" => return Ok(TestFault::SkipMunlock),
            "slow-unmap" => return Ok(TestFault::SlowUnmap),
            _ => {}
        }
        let index = |prefix: &str| s.strip_prefix(prefix).and_then(|n| n.parse().ok());
        index("panic-on-map=")
            .map(TestFault::PanicOnMap)
            .or_else(|| index("panic-after-map=").map(TestFault::PanicAfterMap))
            .or_else(|| index("wait-after-map=").map(TestFault::WaitAfterMap))
            .ok_or_else(|| {
                format!("`{s}`: use panic-on-map=N, panic-after-map=N, wait-after-map=N, fail-unmap, slow-unmap or skip-munlock")
            })
    }
}

impl TestFault {
    /// `backend` with `faults` injected, or as it is when there are none.
    pub fn wrap(faults: &[TestFault], backend: Arc<dyn PinBackend>) -> Arc<dyn PinBackend> {
        if faults.is_empty() {
            return backend;
        }
        Arc::new(Faulty {
            inner: backend,
            panic_on_map: faults.iter().find_map(|f| match f {
                TestFault::PanicOnMap(n) => Some(*n),
                _ => None,
            }),
            panic_after_map: faults.iter().find_map(|f| match f {
                TestFault::PanicAfterMap(n) => Some(*n),
                _ => None,
            }),
            wait_after_map: faults.iter().find_map(|f| match f {
                TestFault::WaitAfterMap(n) => Some(*n),
                _ => None,
            }),
            fail_unmap: faults.contains(&TestFault::FailUnmap),
            skip_munlock: faults.contains(&TestFault::SkipMunlock),
            slow_unmap: faults.contains(&TestFault::SlowUnmap),
            maps: AtomicU64::new(0),
        })
    }
}

/// A backend with [`TestFault`]s injected; everything else is the inner backend's.
struct Faulty {
    inner: Arc<dyn PinBackend>,
    panic_on_map: Option<u64>,
    panic_after_map: Option<u64>,
    wait_after_map: Option<u64>,
    fail_unmap: bool,
    skip_munlock: bool,
    slow_unmap: bool,
    maps: AtomicU64,
}

impl PinBackend for Faulty {
    fn describe(&self) -> BackendInfo {
        self.inner.describe()
    }
    fn begin(&self, ram: &GuestRam) -> Result<(), BackendError> {
        self.inner.begin(ram)
    }
    fn end(&self, ram: &GuestRam) -> Vec<BackendError> {
        if self.skip_munlock {
            return Vec::new();
        }
        self.inner.end(ram)
    }
    fn map(&self, piece: &Piece) -> Result<(), BackendError> {
        let n = self.maps.fetch_add(1, Ordering::SeqCst);
        if self.panic_on_map == Some(n) {
            panic!("injected by --test-fault panic-on-map={n}");
        }
        let mapped = self.inner.map(piece);
        if mapped.is_ok() && self.panic_after_map == Some(n) {
            panic!("injected by --test-fault panic-after-map={n}");
        }
        if mapped.is_ok() && self.wait_after_map == Some(n) {
            wait_for_signal(n);
        }
        mapped
    }
    fn unmap(&self, piece: &Piece) -> Result<(), BackendError> {
        if self.slow_unmap {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        if self.fail_unmap {
            let e = std::io::Error::from_raw_os_error(libc::EIO);
            return Err(BackendError::new(
                "unmap (--test-fault fail-unmap)",
                piece,
                e,
            ));
        }
        self.inner.unmap(piece)
    }
}

/// `wait-after-map=N`: says so, then polls for the signal the pin stage's guard catches.
fn wait_for_signal(n: u64) {
    eprintln!("vmm: --test-fault wait-after-map={n}: mapped, {WAITING_AFTER_MAP}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while pinning::cancel::pending_signal().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(1));
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
            populate.backend(Vec::new()).unwrap().describe().kind,
            BackendKind::Populate
        );
        assert_eq!(
            PinChoice::Auto.backend(Vec::new()).unwrap().describe().kind,
            BackendKind::None
        );
        let e = PinChoice::Fixed(BackendKind::Type1)
            .backend(Vec::new())
            .err()
            .unwrap();
        assert_eq!(e, PinChoiceError::NoSuchDevice(BackendKind::Type1));
    }

    #[test]
    fn test_faults_parse() {
        assert_eq!("fail-unmap".parse(), Ok(TestFault::FailUnmap));
        assert_eq!("panic-on-map=3".parse(), Ok(TestFault::PanicOnMap(3)));
        assert_eq!("panic-after-map=0".parse(), Ok(TestFault::PanicAfterMap(0)));
        assert_eq!("skip-munlock".parse(), Ok(TestFault::SkipMunlock));
        assert_eq!("slow-unmap".parse(), Ok(TestFault::SlowUnmap));
        assert_eq!("wait-after-map=2".parse(), Ok(TestFault::WaitAfterMap(2)));
        assert!("panic-on-map=x".parse::<TestFault>().is_err());
    }
}
