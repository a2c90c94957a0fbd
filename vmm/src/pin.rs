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
    /// ([`HOLD_MARKER`]) and waits (at most a minute) for SIGINT or SIGTERM, so a test
    /// can cancel a job with a known part of it done.
    WaitAfterMap(u64),
    /// `hold-after-first-unmap`: the first unmap call, once done, holds its thread (see
    /// [`HOLD_MARKER`]), so that a test can signal a teardown known to be under way.
    HoldAfterFirstUnmap,
    /// `hold-after-unpin`: the undo holds once every unmap is done, before the devices are
    /// closed and guest RAM is freed, so that a test can look at the device server then.
    HoldAfterUnpin,
}

/// What a held thread writes on stderr, followed by where it is held; it goes on once a
/// SIGINT or SIGTERM arrives after that line (or after [`HOLD_LIMIT`], so that no run hangs).
pub const HOLD_MARKER: &str = "vmm: --test-fault: held ";
/// The longest a `hold-*` test fault holds.
pub const HOLD_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Holds the calling thread at fault point `point` until a signal arrives: counted before
/// the marker is written, so that one sent as soon as the marker is read is never missed.
fn hold(point: &str) {
    let seen = pinning::cancel::signals_caught();
    eprintln!("{HOLD_MARKER}{point}");
    let deadline = std::time::Instant::now() + HOLD_LIMIT;
    while pinning::cancel::signals_caught() == seen && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

impl FromStr for TestFault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fail-unmap" => return Ok(TestFault::FailUnmap),
            "skip-munlock" => return Ok(TestFault::SkipMunlock),
            "slow-unmap" => return Ok(TestFault::SlowUnmap),
            "hold-after-first-unmap" => return Ok(TestFault::HoldAfterFirstUnmap),
            "hold-after-unpin" => return Ok(TestFault::HoldAfterUnpin),
            _ => {}
        }
        let index = |prefix: &str| s.strip_prefix(prefix).and_then(|n| n.parse().ok());
        index("panic-on-map=")
            .map(TestFault::PanicOnMap)
            .or_else(|| index("panic-after-map=").map(TestFault::PanicAfterMap))
            .or_else(|| index("wait-after-map=").map(TestFault::WaitAfterMap))
            .ok_or_else(|| {
                format!(
                    "`{s}`: use panic-on-map=N, panic-after-map=N, wait-after-map=N, fail-unmap, \
                     slow-unmap, skip-munlock, hold-after-first-unmap or hold-after-unpin"
                )
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
            hold_after_first_unmap: faults.contains(&TestFault::HoldAfterFirstUnmap),
            hold_after_unpin: faults.contains(&TestFault::HoldAfterUnpin),
            maps: AtomicU64::new(0),
            unmaps: AtomicU64::new(0),
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
    hold_after_first_unmap: bool,
    hold_after_unpin: bool,
    maps: AtomicU64,
    unmaps: AtomicU64,
}

impl PinBackend for Faulty {
    fn describe(&self) -> BackendInfo {
        self.inner.describe()
    }
    fn begin(&self, ram: &GuestRam) -> Result<(), BackendError> {
        self.inner.begin(ram)
    }
    fn end(&self, ram: &GuestRam) -> Vec<BackendError> {
        let failed = if self.skip_munlock {
            Vec::new()
        } else {
            self.inner.end(ram)
        };
        if self.hold_after_unpin {
            hold("after the last unmap");
        }
        failed
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
            hold(&format!("after map {n}"));
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
        let unmapped = self.inner.unmap(piece);
        if self.hold_after_first_unmap && self.unmaps.fetch_add(1, Ordering::SeqCst) == 0 {
            hold("after the first unmap");
        }
        unmapped
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
        assert_eq!(
            "hold-after-first-unmap".parse(),
            Ok(TestFault::HoldAfterFirstUnmap)
        );
        assert_eq!("hold-after-unpin".parse(), Ok(TestFault::HoldAfterUnpin));
        assert!("panic-on-map=x".parse::<TestFault>().is_err());
    }
}
