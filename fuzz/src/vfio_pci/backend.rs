//! The fake device behind the passthrough model: a [`VfioBackend`] whose config space is plain
//! memory (every write the model forwards sticks), whose BARs are regions of fuzz-chosen sizes
//! (memory BARs optionally mmap-able over a memfd), and which records every config write and
//! BAR access that reaches it, so the harness can check what the model let through.

use std::sync::Mutex;

use devices::vfio::{irq, region, IrqInfo, MmapArea, RegionInfo, VfioBackend, VfioBackendError};
use vmm_sys_util::eventfd::EventFd;

/// One BAR region as the fake device reports it.
#[derive(Clone, Debug, Default)]
pub struct FakeBar {
    pub size: u64,
    pub mmap_areas: Vec<MmapArea>,
}

/// An access that reached the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seen {
    ConfigWrite {
        at: u64,
        data: Vec<u8>,
    },
    BarRead {
        bar: usize,
        offset: u64,
        len: usize,
    },
    BarWrite {
        bar: usize,
        offset: u64,
        data: Vec<u8>,
    },
}

#[derive(Debug, Default)]
pub struct State {
    pub config: Vec<u8>,
    pub seen: Vec<Seen>,
    /// The interrupt index the model enabled and the eventfds it handed over.
    pub active: Option<(u32, Vec<EventFd>)>,
}

#[derive(Debug)]
pub struct FakeBackend {
    /// Config region size as reported (the stored bytes stop at 4 KiB).
    pub config_size: u64,
    pub bars: [FakeBar; 6],
    /// Where mmap-able BARs map from (a memfd; mappings past its end are never touched).
    pub mmap_fd: Option<i32>,
    pub state: Mutex<State>,
}

impl FakeBackend {
    pub fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Config dword `reg` as the device holds it.
    pub fn config_dword(&self, reg: usize) -> u32 {
        let s = self.state();
        let mut b = [0u8; 4];
        for (i, byte) in b.iter_mut().enumerate() {
            *byte = s.config.get(reg * 4 + i).copied().unwrap_or(0);
        }
        u32::from_le_bytes(b)
    }

    /// The device raises vector `v` of whatever index is enabled; false if it has no such fd.
    pub fn fire(&self, v: usize) -> bool {
        let s = self.state();
        match s.active.as_ref().and_then(|(_, fds)| fds.get(v)) {
            Some(fd) => fd.write(1).is_ok(),
            None => false,
        }
    }

    pub fn active(&self) -> Option<(u32, usize)> {
        self.state().active.as_ref().map(|(i, fds)| (*i, fds.len()))
    }
}

impl VfioBackend for FakeBackend {
    fn name(&self) -> &str {
        "fuzz-device"
    }
    fn counts(&self) -> Result<(u32, u32), VfioBackendError> {
        Ok((9, 5))
    }
    fn region_info(&self, index: u32) -> Result<RegionInfo, VfioBackendError> {
        if index == region::CONFIG {
            return Ok(RegionInfo::trapped(index, self.config_size));
        }
        let Some(bar) = self.bars.get(index as usize) else {
            return Ok(RegionInfo::trapped(index, 0));
        };
        let mut info = RegionInfo::trapped(index, bar.size);
        if let (Some(fd), false) = (self.mmap_fd, bar.mmap_areas.is_empty()) {
            info.flags |= region::FLAG_MMAP;
            info.mmap_areas = bar.mmap_areas.clone();
            info.mmap_fd = Some((fd, 0));
        }
        Ok(info)
    }
    fn region_read(
        &self,
        index: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), VfioBackendError> {
        let mut s = self.state();
        if index == region::CONFIG {
            for (i, b) in data.iter_mut().enumerate() {
                let at = usize::try_from(offset).unwrap_or(usize::MAX);
                *b = s.config.get(at.saturating_add(i)).copied().unwrap_or(0xff);
            }
        } else {
            let seen = Seen::BarRead {
                bar: index as usize,
                offset,
                len: data.len(),
            };
            s.seen.push(seen);
            // A recognisable pattern: the low byte of each offset.
            for (i, b) in data.iter_mut().enumerate() {
                *b = offset.wrapping_add(i as u64) as u8;
            }
        }
        Ok(())
    }
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), VfioBackendError> {
        let mut s = self.state();
        if index == region::CONFIG {
            s.seen.push(Seen::ConfigWrite {
                at: offset,
                data: data.to_vec(),
            });
            let at = usize::try_from(offset).unwrap_or(usize::MAX);
            for (i, &b) in data.iter().enumerate() {
                if let Some(c) = s.config.get_mut(at.saturating_add(i)) {
                    *c = b;
                }
            }
        } else {
            s.seen.push(Seen::BarWrite {
                bar: index as usize,
                offset,
                data: data.to_vec(),
            });
        }
        Ok(())
    }
    fn irq_info(&self, index: u32) -> Result<IrqInfo, VfioBackendError> {
        Ok(IrqInfo {
            index,
            flags: 0,
            count: if index <= irq::MSIX { 2048 } else { 0 },
        })
    }
    fn enable_irq(&self, index: u32, fds: &[&EventFd]) -> Result<(), VfioBackendError> {
        let fds = fds.iter().filter_map(|f| f.try_clone().ok()).collect();
        self.state().active = Some((index, fds));
        Ok(())
    }
    fn enable_intx(&self, _: &EventFd, _: &EventFd) -> Result<(), VfioBackendError> {
        Ok(())
    }
    fn disable_irq(&self, index: u32) -> Result<(), VfioBackendError> {
        let mut s = self.state();
        if s.active.as_ref().is_some_and(|(i, _)| *i == index) {
            s.active = None;
        }
        Ok(())
    }
    fn reset(&self) -> Result<(), VfioBackendError> {
        Ok(())
    }
}
