//! Address buses (one for port I/O, one for MMIO) that route a guest access to the device
//! owning the address.
//!
//! vCPU threads look devices up concurrently, so the map sits behind an `RwLock` (taken for
//! writing only while devices are added) and each device behind its own `Mutex`.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use pinning::class::{Classify, ErrorClass};

/// A device model reachable through a [`Bus`]. `offset` is relative to the base the device was
/// inserted at.
pub trait BusDevice {
    /// Fills `data` (the access width) with what the guest reads at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles the guest writing `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device shared between the bus and whoever else drives it (e.g. the serial input path).
pub type SharedDevice = Arc<Mutex<dyn BusDevice + Send>>;

/// A half-open address range `[base, base + len)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BusRange {
    /// First address.
    pub base: u64,
    /// Length in bytes (ports or MMIO bytes); never zero.
    pub len: u64,
}

impl BusRange {
    /// The address one past the end (saturating: a range may end at the top of the space).
    pub fn end(&self) -> u64 {
        self.base.saturating_add(self.len)
    }

    fn overlaps(&self, other: &BusRange) -> bool {
        self.base < other.end() && other.base < self.end()
    }

    fn contains(&self, addr: u64) -> bool {
        addr >= self.base && addr < self.end()
    }
}

impl fmt::Display for BusRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}..{:#x}", self.base, self.end())
    }
}

/// Why a device could not be put on a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("{bus} bus: range {new} overlaps the device at {existing}")]
    Overlap {
        bus: &'static str,
        new: BusRange,
        existing: BusRange,
    },
    #[error("{bus} bus: the range at {base:#x} with length {len:#x} is empty or wraps")]
    InvalidRange {
        bus: &'static str,
        base: u64,
        len: u64,
    },
}

impl Classify for BusError {
    fn class(&self) -> ErrorClass {
        // The VMM lays out the buses, so a refused range is its own bug.
        ErrorClass::Internal
    }
}

/// How many distinct unknown addresses are remembered for log de-duplication. A guest probing
/// every port must not make the VMM's memory grow; past this, new addresses are not logged.
const UNKNOWN_LOG_LIMIT: usize = 256;

#[derive(Default)]
struct UnknownLog {
    seen: HashSet<u64>,
    full_reported: bool,
}

/// A bus: non-overlapping ranges, each owned by one device.
pub struct Bus {
    name: &'static str,
    devices: RwLock<BTreeMap<u64, (BusRange, SharedDevice)>>,
    unknown: Mutex<UnknownLog>,
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ranges: Vec<BusRange> = read_lock(&self.devices).values().map(|(r, _)| *r).collect();
        f.debug_struct("Bus")
            .field("name", &self.name)
            .field("ranges", &ranges)
            .finish()
    }
}

// A device that panicked poisons its lock; the bus keeps serving the others rather than
// turning one device bug into a panic on every vCPU.
fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read_lock<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

impl Bus {
    /// An empty bus; `name` ("pio", "mmio") appears in errors and logs.
    pub fn new(name: &'static str) -> Self {
        Bus {
            name,
            devices: RwLock::new(BTreeMap::new()),
            unknown: Mutex::new(UnknownLog::default()),
        }
    }

    /// Maps `[base, base + len)` to `device`.
    pub fn insert(&self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 || base.checked_add(len - 1).is_none() {
            return Err(BusError::InvalidRange {
                bus: self.name,
                base,
                len,
            });
        }
        let new = BusRange { base, len };
        let mut map = self.devices.write().unwrap_or_else(PoisonError::into_inner);
        // Only the nearest neighbours can overlap: the last range starting at or below `base`
        // and the first one starting after it.
        let below = map.range(..=base).next_back().map(|(_, (r, _))| *r);
        let above = map.range(base..).next().map(|(_, (r, _))| *r);
        for existing in below.into_iter().chain(above) {
            if existing.overlaps(&new) {
                return Err(BusError::Overlap {
                    bus: self.name,
                    new,
                    existing,
                });
            }
        }
        map.insert(base, (new, device));
        Ok(())
    }

    /// Unmaps the range starting at `base` (a BAR that moved or stopped decoding); returns
    /// whether one was there.
    pub fn remove(&self, base: u64) -> bool {
        let mut map = self.devices.write().unwrap_or_else(PoisonError::into_inner);
        map.remove(&base).is_some()
    }

    /// The device owning `addr` and the offset of `addr` inside its range.
    fn resolve(&self, addr: u64) -> Option<(SharedDevice, u64)> {
        let map = read_lock(&self.devices);
        let (_, (range, dev)) = map.range(..=addr).next_back()?;
        range
            .contains(addr)
            .then(|| (Arc::clone(dev), addr - range.base))
    }

    /// Dispatches a guest read. Unknown addresses read as all ones, like an empty bus line.
    /// Returns whether a device handled it.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((dev, offset)) => {
                lock(&dev).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                self.log_unknown("read", addr, data.len());
                false
            }
        }
    }

    /// Dispatches a guest write; writes to unknown addresses are dropped.
    /// Returns whether a device handled it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((dev, offset)) => {
                lock(&dev).write(offset, data);
                true
            }
            None => {
                self.log_unknown("write", addr, data.len());
                false
            }
        }
    }

    fn log_unknown(&self, kind: &str, addr: u64, len: usize) {
        let mut log = lock(&self.unknown);
        if log.seen.contains(&addr) {
            return;
        }
        if log.seen.len() >= UNKNOWN_LOG_LIMIT {
            if !log.full_reported {
                log.full_reported = true;
                tracing::debug!(
                    bus = self.name,
                    "more than {UNKNOWN_LOG_LIMIT} unknown addresses accessed; no longer logging new ones"
                );
            }
            return;
        }
        log.seen.insert(addr);
        // New addresses in a burst (a guest probing a range) are limited too.
        crate::debug_limited!(
            "{} bus: guest {kind} of {len} byte(s) at unknown address {addr:#x}",
            self.name
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Remembers the last access and answers reads with its offset.
    #[derive(Default)]
    struct Probe {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Probe {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    fn probe() -> Arc<Mutex<Probe>> {
        Arc::new(Mutex::new(Probe::default()))
    }

    #[test]
    fn overlapping_insert_names_both_ranges() {
        let bus = Bus::new("pio");
        bus.insert(probe(), 0x3f8, 8).unwrap();
        let err = bus.insert(probe(), 0x3fc, 8).unwrap_err();
        assert_eq!(
            err,
            BusError::Overlap {
                bus: "pio",
                new: BusRange {
                    base: 0x3fc,
                    len: 8
                },
                existing: BusRange {
                    base: 0x3f8,
                    len: 8
                },
            }
        );
        assert_eq!(
            err.to_string(),
            "pio bus: range 0x3fc..0x404 overlaps the device at 0x3f8..0x400"
        );
        // A range that starts below and covers an existing one is also refused.
        assert!(bus.insert(probe(), 0x3f0, 0x20).is_err());
        // Adjacent ranges are fine.
        bus.insert(probe(), 0x3f0, 8).unwrap();
        bus.insert(probe(), 0x400, 1).unwrap();
    }

    #[test]
    fn invalid_ranges_are_refused() {
        let bus = Bus::new("mmio");
        assert!(matches!(
            bus.insert(probe(), 0x1000, 0),
            Err(BusError::InvalidRange { .. })
        ));
        assert!(matches!(
            bus.insert(probe(), u64::MAX, 2),
            Err(BusError::InvalidRange { .. })
        ));
        // The very last byte of the space is a valid range.
        bus.insert(probe(), u64::MAX, 1).unwrap();
    }

    #[test]
    fn accesses_reach_the_device_with_relative_offsets() {
        let bus = Bus::new("pio");
        let dev = probe();
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();
        let mut data = [0u8; 1];
        assert!(bus.read(0x3fd, &mut data));
        assert_eq!(data, [5]);
        assert!(bus.write(0x3f9, &[0xab, 0xcd]));
        assert_eq!(dev.lock().unwrap().last_write, Some((1, vec![0xab, 0xcd])));
    }

    #[test]
    fn unknown_reads_are_all_ones_and_writes_dropped() {
        let bus = Bus::new("pio");
        bus.insert(probe(), 0x3f8, 8).unwrap();
        let mut data = [0u8; 4];
        assert!(!bus.read(0x400, &mut data));
        assert_eq!(data, [0xff; 4]);
        assert!(!bus.write(0x3f7, &[1]));
        // Logged once per address.
        assert!(!bus.read(0x400, &mut data));
        assert_eq!(lock(&bus.unknown).seen.len(), 2);
    }

    #[test]
    fn unknown_log_is_bounded() {
        let bus = Bus::new("mmio");
        let mut data = [0u8; 1];
        for addr in 0..(UNKNOWN_LOG_LIMIT as u64 * 4) {
            bus.read(addr, &mut data);
        }
        assert_eq!(lock(&bus.unknown).seen.len(), UNKNOWN_LOG_LIMIT);
    }

    #[test]
    fn a_guest_probing_unknown_addresses_gets_a_bounded_number_of_log_lines() {
        use crate::ratelimit::{capture, DEFAULT_BURST};
        capture::install();
        let bus = Bus::new("probe-flood-test");
        let mut data = [0u8; 1];
        for addr in 0..UNKNOWN_LOG_LIMIT as u64 {
            bus.read(addr, &mut data);
        }
        let lines = capture::lines_with("probe-flood-test bus: guest read");
        // One window of the limit (other buses share it), or two if the loop straddled a
        // window's end; not one line per address.
        assert!(
            lines.len() <= 2 * DEFAULT_BURST as usize,
            "{} lines",
            lines.len()
        );
    }
}
