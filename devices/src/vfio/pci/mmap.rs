//! BAR parts the backend can mmap, mapped into this process for the VMM to give the guest
//! as memory slots. The pages of the MSI-X table and PBA stay out: the model must trap them.

use std::os::fd::RawFd;

use super::{VfioPciDevice, VfioPciError};
use crate::vfio::types::{region, RegionInfo};

/// A BAR part mapped into this process.
#[derive(Debug)]
pub struct BarMmap {
    /// BAR index.
    pub bar: usize,
    /// Offset inside the BAR.
    pub offset: u64,
    /// Length.
    pub size: u64,
    /// Where it is mapped here.
    pub host_addr: u64,
}

impl Drop for BarMmap {
    fn drop(&mut self) {
        // SAFETY: host_addr/size is a mapping this struct created and alone owns.
        unsafe { libc::munmap(self.host_addr as *mut libc::c_void, self.size as usize) };
    }
}

// SAFETY: the mapping is plain device memory; the struct only carries its address.
unsafe impl Send for BarMmap {}

impl VfioPciDevice {
    /// Maps the mmap-able parts of the memory BARs, from the region infos `new` read.
    pub(super) fn map_bars(&mut self, bars: &[(usize, RegionInfo)]) -> Result<(), VfioPciError> {
        for (index, info) in bars {
            let Some((fd, file_offset)) =
                info.mmap_fd.filter(|_| info.flags & region::FLAG_MMAP != 0)
            else {
                continue;
            };
            for area in &info.mmap_areas {
                // The peer describes the areas: one that does not lie inside the region is
                // refused, or it would become a memory slot reaching past the BAR.
                let inside = area
                    .offset
                    .checked_add(area.size)
                    .is_some_and(|end| end <= info.size);
                let file_at = file_offset.checked_add(area.offset);
                let (true, Some(_)) = (inside, file_at) else {
                    tracing::warn!(
                        "{}: BAR{} mmap area [{:#x}, +{:#x}) is outside the {:#x}-byte region; \
                         it is trapped instead",
                        self.backend.name(),
                        *index,
                        area.offset,
                        area.size,
                        info.size
                    );
                    continue;
                };
                for (offset, size) in self.mappable(*index, area.offset, area.size) {
                    self.mmap_part(fd, file_offset, *index, offset, size)?;
                }
            }
        }
        Ok(())
    }

    /// The page-aligned parts of `[offset, +size)` of BAR `bar` that do not touch the MSI-X
    /// table or PBA pages (those must trap), so the rest of a BAR that shares them with, say,
    /// doorbells is still mapped directly.
    pub(super) fn mappable(&self, bar: usize, offset: u64, size: u64) -> Vec<(u64, u64)> {
        const PAGE: u64 = 4096;
        let mut holes: Vec<(u64, u64)> = self
            .msix
            .iter()
            .flat_map(|m| [m.table, m.pba])
            .filter(|w| w.bar == bar && w.len > 0)
            .map(|w| {
                let start = w.offset / PAGE * PAGE;
                (start, (w.offset + w.len).div_ceil(PAGE) * PAGE)
            })
            .collect();
        holes.sort_unstable();
        let (mut parts, mut at) = (Vec::new(), offset.div_ceil(PAGE) * PAGE);
        let end = (offset + size) / PAGE * PAGE;
        for (h0, h1) in holes {
            if h0 > at && at < end {
                parts.push((at, h0.min(end) - at));
            }
            at = at.max(h1);
        }
        if at < end {
            parts.push((at, end - at));
        }
        parts
    }

    fn mmap_part(
        &mut self,
        fd: RawFd,
        file_offset: u64,
        bar: usize,
        offset: u64,
        size: u64,
    ) -> Result<(), VfioPciError> {
        // SAFETY: a fresh shared mapping of the device's region at an address the kernel
        // picks; nothing else refers to that address range.
        let host = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                (file_offset + offset) as libc::off_t,
            )
        };
        if host == libc::MAP_FAILED {
            return Err(VfioPciError::Mmap {
                device: self.backend.name().to_string(),
                bar,
                offset,
                size,
                source: std::io::Error::last_os_error(),
            });
        }
        self.mmaps.push(BarMmap {
            bar,
            offset,
            size,
            host_addr: host as u64,
        });
        Ok(())
    }
}
