//! A model of an IOMMU behind VFIO type1, enforcing the kernel's rules, so the VFIO
//! backends and devices that DMA can be tested on machines without an IOMMU:
//!
//! - a mapping's IOVA, host address and size must be multiples of the IOMMU page size
//!   (EINVAL), and not zero-sized (EINVAL);
//! - a mapping may not overlap an existing one (EEXIST);
//! - at most `entry_limit` mappings (ENOSPC, type1's `dma_entry_limit`);
//! - pinned bytes count against a memlock budget (ENOMEM);
//! - unmap removes whole mappings; a range that cuts one in two is EINVAL (type1 v2).
//!
//! It also records how many map calls ran at once, to check that type1 mapping is serial.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::backend::DmaMapper;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub size: u64,
    pub host_addr: u64,
}

#[derive(Debug)]
struct State {
    mappings: BTreeMap<u64, Mapping>,
    pinned: u64,
    map_calls: u64,
}

pub struct IommuModel {
    page_size: u64,
    entry_limit: usize,
    memlock: Option<u64>,
    /// Fail the map call with this index (0-based) with EFAULT, to inject errors.
    fail_call: Option<u64>,
    state: Mutex<State>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

fn err(errno: i32) -> io::Error {
    io::Error::from_raw_os_error(errno)
}

impl IommuModel {
    pub fn new(entry_limit: usize, memlock: Option<u64>) -> Self {
        Self {
            page_size: 4096,
            entry_limit,
            memlock,
            fail_call: None,
            state: Mutex::new(State {
                mappings: BTreeMap::new(),
                pinned: 0,
                map_calls: 0,
            }),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        }
    }

    pub fn failing_call(mut self, index: u64) -> Self {
        self.fail_call = Some(index);
        self
    }

    pub fn mappings(&self) -> Vec<(u64, Mapping)> {
        self.state
            .lock()
            .unwrap()
            .mappings
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect()
    }

    pub fn pinned(&self) -> u64 {
        self.state.lock().unwrap().pinned
    }

    pub fn max_concurrent_maps(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
    }

    /// Translates a device access of `len` bytes at `iova` to a host address, as the IOMMU
    /// would; `None` is an IOMMU fault (no mapping covers the whole access).
    pub fn translate(&self, iova: u64, len: u64) -> Option<u64> {
        let state = self.state.lock().unwrap();
        let (&start, m) = state.mappings.range(..=iova).next_back()?;
        (iova + len <= start + m.size).then(|| m.host_addr + (iova - start))
    }

    fn check_and_insert(&self, iova: u64, size: u64, host_addr: u64) -> io::Result<()> {
        let p = self.page_size;
        if size == 0 || iova % p != 0 || size % p != 0 || host_addr % p != 0 {
            return Err(err(libc::EINVAL));
        }
        let end = iova.checked_add(size).ok_or_else(|| err(libc::EINVAL))?;
        let mut state = self.state.lock().unwrap();
        let call = state.map_calls;
        state.map_calls += 1;
        if self.fail_call == Some(call) {
            return Err(err(libc::EFAULT));
        }
        let before = state.mappings.range(..end).next_back();
        if before.is_some_and(|(&s, m)| s + m.size > iova) {
            return Err(err(libc::EEXIST));
        }
        if state.mappings.len() >= self.entry_limit {
            return Err(err(libc::ENOSPC));
        }
        if self
            .memlock
            .is_some_and(|limit| state.pinned + size > limit)
        {
            return Err(err(libc::ENOMEM));
        }
        state.pinned += size;
        state.mappings.insert(iova, Mapping { size, host_addr });
        Ok(())
    }
}

impl DmaMapper for IommuModel {
    fn map(&self, iova: u64, size: u64, host_addr: u64) -> io::Result<()> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        // Widen the window in which overlapping calls would be seen.
        std::thread::yield_now();
        let result = self.check_and_insert(iova, size, host_addr);
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        result
    }

    fn unmap(&self, iova: u64, size: u64) -> io::Result<()> {
        let end = iova.checked_add(size).ok_or_else(|| err(libc::EINVAL))?;
        let mut state = self.state.lock().unwrap();
        let inside: Vec<u64> = state.mappings.range(iova..end).map(|(&s, _)| s).collect();
        // A mapping that starts before the range and reaches into it, or one inside that
        // runs past its end, would be cut in two: type1 v2 refuses.
        if state
            .mappings
            .range(..iova)
            .next_back()
            .is_some_and(|(&s, m)| s + m.size > iova)
        {
            return Err(err(libc::EINVAL));
        }
        if inside.iter().any(|s| s + state.mappings[s].size > end) {
            return Err(err(libc::EINVAL));
        }
        for s in inside {
            let m = state.mappings.remove(&s).unwrap();
            state.pinned -= m.size;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type1_rules_are_enforced() {
        let m = IommuModel::new(2, Some(1 << 20));
        assert_eq!(
            m.map(0x1000, 0x800, 0x10000).unwrap_err().raw_os_error(),
            Some(libc::EINVAL)
        );
        assert_eq!(
            m.map(0x1001, 0x1000, 0x10000).unwrap_err().raw_os_error(),
            Some(libc::EINVAL)
        );
        m.map(0x10000, 0x4000, 0x200000).unwrap();
        assert_eq!(
            m.map(0x12000, 0x4000, 0x300000).unwrap_err().raw_os_error(),
            Some(libc::EEXIST)
        );
        assert_eq!(
            m.map(0xf000, 0x2000, 0x300000).unwrap_err().raw_os_error(),
            Some(libc::EEXIST)
        );
        assert_eq!(
            m.map(0x20000, 1 << 20, 0x300000)
                .unwrap_err()
                .raw_os_error(),
            Some(libc::ENOMEM)
        );
        m.map(0x20000, 0x1000, 0x300000).unwrap();
        assert_eq!(
            m.map(0x30000, 0x1000, 0x400000).unwrap_err().raw_os_error(),
            Some(libc::ENOSPC)
        );
        assert_eq!(m.translate(0x11000, 8), Some(0x201000));
        assert_eq!(
            m.translate(0x13ff8, 16),
            None,
            "access past the end of a mapping"
        );
        assert_eq!(
            m.unmap(0x11000, 0x1000).unwrap_err().raw_os_error(),
            Some(libc::EINVAL)
        );
        m.unmap(0, 1 << 30).unwrap();
        assert_eq!(m.pinned(), 0);
        assert!(m.mappings().is_empty());
    }
}
