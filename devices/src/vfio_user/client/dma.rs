//! Client memory the server may reach: the DMA windows this client mapped, and the server's
//! DMA_READ/DMA_WRITE requests served from them.
//!
//! The spec has a server use these messages for memory the client did not share by fd; this
//! client serves windows shared by fd too (a server whose mmap failed can fall back to them):
//! those through the same file (`pread`/`pwrite`, coherent with the server's and the guest's
//! mappings of it; hugetlbfs takes no `pwrite`, so a DMA_WRITE there is EINVAL), a window
//! mapped without one through the [`DmaMemory`] the caller gave. Every request is
//! checked against the windows (the whole range inside one window, read or write allowed) and
//! against the largest transfer this client offered in VERSION before any byte is copied.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::vfio_user::wire::{self, cmd, DmaAccess};

/// Memory the server reaches by DMA_READ/DMA_WRITE messages, for a window mapped without an fd
/// ([`super::Client::dma_map_in_band`]). Offsets are from the window's start; the client has
/// checked that `offset + len` lies inside the window before it calls.
pub trait DmaMemory: Send + Sync {
    /// Copies `buf.len()` bytes at `offset` into `buf`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Copies `data` to `offset`.
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()>;
}

/// A window shared by fd, reached through the same file: the caller's, shared (not a
/// duplicated descriptor), which stays open while the window lasts.
pub(super) struct FileMemory {
    pub(super) file: Arc<File>,
    pub(super) offset: u64,
}

impl DmaMemory for FileMemory {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let at = self
            .offset
            .checked_add(offset)
            .ok_or(io::ErrorKind::InvalidInput)?;
        self.file.read_exact_at(buf, at)
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let at = self
            .offset
            .checked_add(offset)
            .ok_or(io::ErrorKind::InvalidInput)?;
        self.file.write_all_at(data, at)
    }
}

struct Window {
    /// Tells a window from another at the same address while a DMA_MAP is in flight.
    id: u64,
    iova: u64,
    size: u64,
    readable: bool,
    writable: bool,
    memory: Arc<dyn DmaMemory>,
}

impl Window {
    fn contains(&self, address: u64, count: u64) -> bool {
        let (Some(end), Some(window_end)) =
            (address.checked_add(count), self.iova.checked_add(self.size))
        else {
            return false;
        };
        address >= self.iova && end <= window_end
    }
}

#[derive(Default)]
struct State {
    next_id: u64,
    /// Unordered: mappings are few (at most the server's `max_dma_maps`), and a request that
    /// the server refuses leaves an overlapping window behind only until its reply.
    windows: Vec<Window>,
}

/// The windows of one client.
#[derive(Default)]
pub(super) struct DmaWindows {
    state: Mutex<State>,
}

impl DmaWindows {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a window before its DMA_MAP is sent (the server may use it before it replies);
    /// returns its id for [`DmaWindows::remove_id`], or None when `max` windows are there
    /// already (checked and added under one lock: pinning threads map concurrently).
    pub(super) fn add(
        &self,
        iova: u64,
        size: u64,
        readable: bool,
        writable: bool,
        memory: Arc<dyn DmaMemory>,
        max: usize,
    ) -> Option<u64> {
        let mut st = self.state();
        if st.windows.len() >= max {
            return None;
        }
        let id = st.next_id;
        st.next_id += 1;
        st.windows.push(Window {
            id,
            iova,
            size,
            readable,
            writable,
            memory,
        });
        Some(id)
    }

    /// Drops the window `add` returned `id` for (its DMA_MAP was refused).
    pub(super) fn remove_id(&self, id: u64) {
        self.state().windows.retain(|w| w.id != id);
    }

    /// Drops the window mapped at exactly `[iova, iova + size)` (after its DMA_UNMAP).
    pub(super) fn remove(&self, iova: u64, size: u64) {
        let mut st = self.state();
        if let Some(i) = st
            .windows
            .iter()
            .position(|w| w.iova == iova && w.size == size)
        {
            st.windows.swap_remove(i);
        }
    }

    /// Runs `copy` on the memory under `[address, address + count)` and the offset of
    /// `address` in it, if one window holds all of it and allows the access. The lock is held
    /// through the copy, so once [`DmaWindows::remove`] returns nothing touches that memory.
    fn with_window<T>(
        &self,
        address: u64,
        count: u64,
        write: bool,
        copy: impl FnOnce(&dyn DmaMemory, u64) -> Result<T, i32>,
    ) -> Result<T, i32> {
        let st = self.state();
        let Some(w) = st.windows.iter().find(|w| w.contains(address, count)) else {
            return Err(libc::EFAULT);
        };
        if (write && !w.writable) || (!write && !w.readable) {
            return Err(libc::EPERM);
        }
        copy(w.memory.as_ref(), address - w.iova)
    }

    /// Serves one server-to-client command: the reply payload, or the errno of an error
    /// reply. Commands other than DMA_READ/DMA_WRITE are ENOTSUP.
    /// Serves a DMA_READ or DMA_WRITE: the reply's payload and the bytes moved.
    pub(super) fn serve(&self, command: u16, payload: &[u8]) -> Result<(Vec<u8>, u64), i32> {
        let write = match command {
            cmd::DMA_READ => false,
            cmd::DMA_WRITE => true,
            _ => return Err(libc::ENOTSUP),
        };
        let (req, data) =
            DmaAccess::decode(payload, cmd::name(command)).map_err(|_| libc::EINVAL)?;
        // What we offered in VERSION (`max_data_xfer_size`).
        let count = usize::try_from(req.count)
            .ok()
            .filter(|&n| n <= wire::MAX_DATA_XFER)
            .ok_or(libc::EINVAL)?;
        if write && data.len() != count {
            return Err(libc::EINVAL);
        }
        if count == 0 {
            return Ok((req.encode(&[]), 0));
        }
        let errno = |e: io::Error| e.raw_os_error().unwrap_or(libc::EIO);
        self.with_window(req.address, req.count, write, |memory, offset| {
            if write {
                memory.write_at(offset, data).map_err(errno)?;
                Ok((req.encode(&[]), req.count))
            } else {
                let mut buf = vec![0u8; count];
                memory.read_at(offset, &mut buf).map_err(errno)?;
                Ok((req.encode(&buf), req.count))
            }
        })
    }
}
