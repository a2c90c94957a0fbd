//! The typed requests: version negotiation, device and region info, region reads and
//! writes, interrupts, DMA_MAP/UNMAP and reset. Each names itself (`op`) in its errors and
//! checks that the reply answers it; a reply that does not decode breaks the connection.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

use super::dma::FileMemory;
use super::{Client, ClientError, DmaMemory};
use crate::counters::DeviceCounters;
use crate::vfio::types::{region, IrqInfo, MmapArea, RegionInfo};
use crate::vfio_user::wire::{
    self, cmd, Capabilities, DeviceInfo, DmaMap, DmaUnmap, IrqInfoMsg, IrqSet, RegionAccess,
    RegionInfoMsg, Version,
};

impl Client {
    /// Agrees on the protocol version and learns the server's limits.
    pub(super) fn negotiate(&self) -> Result<Capabilities, ClientError> {
        let ours = Version {
            major: wire::VERSION_MAJOR,
            minor: wire::VERSION_MINOR,
            json: Capabilities::ours().to_json(),
        };
        let reply = self
            .conn
            .request("VERSION".into(), cmd::VERSION, &ours.encode(), &[])?;
        let version_err = |what: String| ClientError::Version {
            device: self.conn.name().to_string(),
            what,
        };
        let theirs = Version::decode(&reply.payload).map_err(|e| version_err(e.to_string()))?;
        if theirs.major != wire::VERSION_MAJOR || theirs.minor > wire::VERSION_MINOR {
            return Err(version_err(format!(
                "the server answered version {}.{} to our {}.{}",
                theirs.major,
                theirs.minor,
                wire::VERSION_MAJOR,
                wire::VERSION_MINOR
            )));
        }
        let caps = Capabilities::from_json(&theirs.json).map_err(|e| version_err(e.to_string()))?;
        if caps.max_msg_fds == 0
            || caps.max_data_xfer_size == 0
            || caps.max_dma_maps == 0
            || caps.pgsizes == 0
        {
            return Err(version_err(format!(
                "the server's capabilities are unusable: {caps:?}"
            )));
        }
        tracing::debug!(
            "vfio-user {}: version {}.{}, server capabilities {caps:?}",
            self.conn.name(),
            theirs.major,
            theirs.minor
        );
        Ok(caps)
    }

    /// Device flags (`VFIO_DEVICE_FLAGS_*`), number of regions, number of interrupt indices.
    pub fn device_info(&self) -> Result<(u32, u32, u32), ClientError> {
        let op = "DEVICE_GET_INFO".to_string();
        let reply = self.conn.request(
            op.clone(),
            cmd::DEVICE_GET_INFO,
            &DeviceInfo::default().encode(),
            &[],
        )?;
        let info = DeviceInfo::decode(&reply.payload)
            .map_err(|e| self.conn.malformed(op, e.to_string()))?;
        self.device_flags.store(info.flags, Ordering::Relaxed);
        Ok((info.flags, info.num_regions, info.num_irqs))
    }

    /// Region `index`. A file descriptor the server sends for mmap is kept by the client (so
    /// the `RawFd` in [`RegionInfo::mmap_fd`] stays valid while it lives).
    pub fn region_info(&self, index: u32) -> Result<RegionInfo, ClientError> {
        let op = format!("DEVICE_GET_REGION_INFO {index}");
        // Room for a sparse-mmap capability with dozens of areas; a server that needs more
        // says so in argsz and is asked once more.
        let mut argsz = (RegionInfoMsg::SIZE + 1024) as u32;
        let (info, reply) = loop {
            let req = RegionInfoMsg {
                argsz,
                index,
                ..RegionInfoMsg::default()
            };
            let reply =
                self.conn
                    .request(op.clone(), cmd::DEVICE_GET_REGION_INFO, &req.encode(), &[])?;
            let info = RegionInfoMsg::decode(&reply.payload)
                .map_err(|e| self.conn.malformed(op.clone(), e.to_string()))?;
            // A reply that did not fit says how much it needs in argsz; libvfio-user then
            // leaves VFIO_REGION_INFO_FLAG_CAPS out, our own server sets it, so only argsz
            // tells.
            if info.argsz as usize > reply.payload.len() {
                let limit = wire::MAX_MESSAGE - wire::HEADER_SIZE;
                if argsz as usize >= info.argsz as usize || info.argsz as usize > limit {
                    return Err(self.conn.malformed(
                        op,
                        format!(
                            "the server needs {} bytes for the region info but sent {}",
                            info.argsz,
                            reply.payload.len()
                        ),
                    ));
                }
                argsz = info.argsz;
                continue;
            }
            break (info, reply);
        };
        if info.index != index {
            return Err(self
                .conn
                .malformed(op, format!("the reply describes region {}", info.index)));
        }
        let mut flags = info.flags & !wire::REGION_FLAG_CAPS;
        let sparse = if info.flags & wire::REGION_FLAG_CAPS != 0 {
            wire::find_sparse_mmap(&reply.payload, info.cap_offset)
                .map_err(|e| self.conn.malformed(op.clone(), e.to_string()))?
        } else {
            None
        };
        let mut fds = reply.fds;
        let mmap_fd = if flags & region::FLAG_MMAP != 0 {
            match fds.is_empty() {
                true => {
                    tracing::debug!(
                        "vfio-user {}: region {index} is mappable but came without an fd; using \
                         region reads and writes",
                        self.conn.name()
                    );
                    flags &= !region::FLAG_MMAP;
                    None
                }
                false => {
                    let fd = fds.swap_remove(0);
                    let raw = fd.as_raw_fd();
                    self.region_fds
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(fd);
                    Some((raw, info.offset))
                }
            }
        } else {
            None
        };
        let mmap_areas = if flags & region::FLAG_MMAP == 0 {
            Vec::new()
        } else {
            match sparse {
                Some(areas) => areas
                    .into_iter()
                    .map(|(offset, size)| MmapArea { offset, size })
                    .collect(),
                None => vec![MmapArea {
                    offset: 0,
                    size: info.size,
                }],
            }
        };
        // Areas past the region's end are passed on as the server gave them: the PCI model
        // (`vfio/pci/mmap.rs`) traps such an area with a warning rather than lose the device.
        Ok(RegionInfo {
            index,
            flags,
            size: info.size,
            mmap_areas,
            mmap_fd,
        })
    }

    /// The largest REGION_READ/WRITE the server accepts, within our own limit.
    fn xfer_chunk(&self) -> usize {
        (self.peer.max_data_xfer_size as usize).clamp(1, wire::MAX_DATA_XFER)
    }

    /// Reads `buf.len()` bytes at `offset` of region `index` (in pieces of the server's
    /// `max_data_xfer_size`).
    pub fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<(), ClientError> {
        let chunk = self.xfer_chunk();
        let mut done = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(chunk);
            let at = offset.checked_add(done as u64);
            let op = format!("REGION_READ region {index} offset {offset:#x}+{done:#x} ({n} bytes)");
            let Some(at) = at else {
                return Err(self.conn.invalid(op, "the offset wraps".to_string()));
            };
            let (echo, data) = self.region_access(&op, cmd::REGION_READ, index, at, n, &[])?;
            if echo.count as usize != n || data.len() < n {
                return Err(self.conn.malformed(
                    op,
                    format!(
                        "asked for {n} bytes, the reply says {} and carries {}",
                        echo.count,
                        data.len()
                    ),
                ));
            }
            buf[done..done + n].copy_from_slice(&data[..n]);
            done += n;
        }
        Ok(())
    }

    /// Writes `data` at `offset` of region `index`.
    pub fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), ClientError> {
        let chunk = self.xfer_chunk();
        let mut done = 0;
        while done < data.len() {
            let n = (data.len() - done).min(chunk);
            let op =
                format!("REGION_WRITE region {index} offset {offset:#x}+{done:#x} ({n} bytes)");
            let Some(at) = offset.checked_add(done as u64) else {
                return Err(self.conn.invalid(op, "the offset wraps".to_string()));
            };
            let piece = &data[done..done + n];
            let (echo, _) = self.region_access(&op, cmd::REGION_WRITE, index, at, n, piece)?;
            if echo.count as usize != n {
                return Err(self.conn.malformed(
                    op,
                    format!("wrote {n} bytes, the reply says {}", echo.count),
                ));
            }
            done += n;
        }
        Ok(())
    }

    /// One REGION_READ or REGION_WRITE of `n` bytes at `at` (carrying `data` for a write):
    /// the reply's header, checked to echo the region and offset, and the bytes after it.
    fn region_access(
        &self,
        op: &str,
        command: u16,
        index: u32,
        at: u64,
        n: usize,
        data: &[u8],
    ) -> Result<(RegionAccess, Vec<u8>), ClientError> {
        let req = RegionAccess {
            offset: at,
            region: index,
            count: n as u32,
        };
        let reply = self
            .conn
            .request(op.to_string(), command, &req.encode(data), &[])?;
        let (echo, bytes) = RegionAccess::decode(&reply.payload, cmd::name(command))
            .map_err(|e| self.conn.malformed(op.to_string(), e.to_string()))?;
        if echo.region != index || echo.offset != at {
            return Err(self.conn.malformed(
                op.to_string(),
                format!(
                    "the reply is for region {} offset {:#x}",
                    echo.region, echo.offset
                ),
            ));
        }
        Ok((echo, bytes.to_vec()))
    }

    /// Interrupt index `index`.
    pub fn irq_info(&self, index: u32) -> Result<IrqInfo, ClientError> {
        let op = format!("DEVICE_GET_IRQ_INFO {index}");
        let req = IrqInfoMsg {
            index,
            ..IrqInfoMsg::default()
        };
        let reply = self
            .conn
            .request(op.clone(), cmd::DEVICE_GET_IRQ_INFO, &req.encode(), &[])?;
        let info = IrqInfoMsg::decode(&reply.payload)
            .map_err(|e| self.conn.malformed(op.clone(), e.to_string()))?;
        if info.index != index {
            return Err(self
                .conn
                .malformed(op, format!("the reply describes index {}", info.index)));
        }
        Ok(IrqInfo {
            index,
            flags: info.flags,
            count: info.count,
        })
    }

    /// DEVICE_SET_IRQS with `flags` (`wire::irq_set`) for vectors `start..start + count`,
    /// with `fds` as SCM_RIGHTS data. One eventfd per vector (`fds.len() == count`) is split
    /// into several messages if the server takes fewer fds per message.
    pub fn set_irqs(
        &self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: &[RawFd],
    ) -> Result<(), ClientError> {
        let op = |s: u32, c: u32| format!("DEVICE_SET_IRQS index {index} vectors {s}+{c}");
        let max = (self.peer.max_msg_fds as usize).min(wire::MAX_FDS);
        if fds.len() <= max {
            return self.set_irqs_one(op(start, count), index, flags, start, count, fds);
        }
        if fds.len() != count as usize {
            return Err(self.conn.invalid(
                op(start, count),
                format!(
                    "{} fds for {count} vectors, and the server takes at most {max} per message",
                    fds.len()
                ),
            ));
        }
        let mut s = start;
        for part in fds.chunks(max) {
            let c = part.len() as u32;
            self.set_irqs_one(op(s, c), index, flags, s, c, part)?;
            s += c;
        }
        Ok(())
    }

    fn set_irqs_one(
        &self,
        op: String,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: &[RawFd],
    ) -> Result<(), ClientError> {
        let req = IrqSet {
            flags,
            index,
            start,
            count,
            data: Vec::new(),
        };
        self.conn
            .request(op, cmd::DEVICE_SET_IRQS, &req.encode(), fds)?;
        Ok(())
    }

    /// Lets the server reach `[iova, iova + size)`, backed by `file` at `fd_offset` (mmap'ed
    /// shared by the server). The client holds on to `file` while the mapping lasts, to serve
    /// DMA_READ/DMA_WRITE for it too (beyond the spec, which has a server send those only for
    /// memory shared without an fd).
    pub fn dma_map(
        &self,
        iova: u64,
        size: u64,
        file: &Arc<File>,
        fd_offset: u64,
        readable: bool,
        writable: bool,
    ) -> Result<(), ClientError> {
        let op = format!("DMA_MAP iova {iova:#x} size {size:#x}");
        let fd = file.as_raw_fd();
        let memory = Arc::new(FileMemory {
            file: file.clone(),
            offset: fd_offset,
        });
        self.map_window(
            op,
            iova,
            size,
            readable,
            writable,
            memory,
            Some((fd, fd_offset)),
        )
    }

    /// Lets the server reach `[iova, iova + size)` by DMA_READ/DMA_WRITE messages only (no fd
    /// is sent), served from `memory`: for memory that cannot be shared, or a server that
    /// should not map it.
    pub fn dma_map_in_band(
        &self,
        iova: u64,
        size: u64,
        memory: Arc<dyn DmaMemory>,
        readable: bool,
        writable: bool,
    ) -> Result<(), ClientError> {
        let op = format!("DMA_MAP iova {iova:#x} size {size:#x} (no fd)");
        self.map_window(op, iova, size, readable, writable, memory, None)
    }

    #[allow(clippy::too_many_arguments)]
    fn map_window(
        &self,
        op: String,
        iova: u64,
        size: u64,
        readable: bool,
        writable: bool,
        memory: Arc<dyn DmaMemory>,
        fd: Option<(RawFd, u64)>,
    ) -> Result<(), ClientError> {
        // The server's pgsizes is never 0 (negotiation refuses that).
        let page = self.peer.min_pgsize().unwrap_or(4096);
        if size == 0 || iova % page != 0 || size % page != 0 || iova.checked_add(size).is_none() {
            return Err(self.conn.invalid(
                op,
                format!(
                    "address and size must be non-zero multiples of the server's {page}-byte pages"
                ),
            ));
        }
        let mut f = 0;
        if readable {
            f |= wire::dma_flags::READ;
        }
        if writable {
            f |= wire::dma_flags::WRITE;
        }
        let (fds, offset) = match fd {
            Some((fd, offset)) => (vec![fd], offset),
            None => (Vec::new(), 0),
        };
        let req = DmaMap {
            flags: f,
            offset,
            address: iova,
            size,
        };
        // Registered first: the server may read or write it before its reply arrives.
        let max = self.peer.max_dma_maps as usize;
        let Some(id) = self.dma.add(iova, size, readable, writable, memory, max) else {
            return Err(ClientError::Unsupported {
                device: self.conn.name().to_string(),
                op,
                what: format!(
                    "the server keeps at most {max} DMA mappings (max_dma_maps); give the VM \
                     less memory or pin in larger chunks (--pin-threads 1 makes the fewest)"
                ),
            });
        };
        let result = self.conn.request(op, cmd::DMA_MAP, &req.encode(), &fds);
        match &result {
            Ok(_) => DeviceCounters::add(&self.counters.dma_map_bytes, size),
            Err(_) => self.dma.remove_id(id),
        }
        result.map(|_| ())
    }

    /// Withdraws the mapping made at exactly `[iova, iova + size)`.
    pub fn dma_unmap(&self, iova: u64, size: u64) -> Result<(), ClientError> {
        let op = format!("DMA_UNMAP iova {iova:#x} size {size:#x}");
        let req = DmaUnmap {
            flags: 0,
            address: iova,
            size,
        };
        // The reply echoes the request; its content tells nothing new, so it is not checked.
        // The window stays until then (the server may finish DMA in flight before it replies)
        // and no longer: the reader thread drops it as it reads the reply.
        self.conn.request_unmap(op, &req.encode(), iova, size)?;
        Ok(())
    }

    /// Function-level reset, if the device offers it (`VFIO_DEVICE_FLAGS_RESET`).
    pub fn reset(&self) -> Result<(), ClientError> {
        let op = "DEVICE_RESET".to_string();
        let mut flags = self.device_flags.load(Ordering::Relaxed);
        if flags == u32::MAX {
            flags = self.device_info()?.0;
        }
        if flags & wire::device_flags::RESET == 0 {
            return Err(ClientError::Unsupported {
                device: self.conn.name().to_string(),
                op,
                what: "the device does not support reset (no VFIO_DEVICE_FLAGS_RESET)".into(),
            });
        }
        self.conn.request(op, cmd::DEVICE_RESET, &[], &[])?;
        Ok(())
    }
}
