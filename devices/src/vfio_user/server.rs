//! The device side of vfio-user: serves a [`UserDevice`] to one client.
//!
//! DMA_MAP/UNMAP are handled here, not by the device: the server maps the client's memory
//! (shared, from the fd that comes with DMA_MAP) into a [`MappedRegions`], and the device
//! does all its DMA through that same object. Memory the client has not mapped is thus
//! unreachable, which is what makes a missing mapping a failed test.
//!
//! A request that is well framed but wrong (short, unknown region, refused by the device)
//! gets an error reply with an errno and the connection goes on; a message that cannot be
//! framed (size below the header or above [`wire::MAX_MESSAGE`]) gets an error reply and ends
//! it, since the stream cannot be followed past it.
//!
//! The client is another process and is not trusted to be well behaved; what it can make the
//! server hold is bounded ([`ServerLimits`]):
//! - a message must be whole within [`MESSAGE_TIMEOUT`] of its first byte, or the client is
//!   dropped (idle between messages is fine, for as long as it likes);
//! - a reply must fit in the socket within [`REPLY_TIMEOUT`], or the client (which does not
//!   read) is dropped; the stop fd ends that wait too;
//! - at most [`MAX_DMA_REGIONS`] regions are mapped at once: DMA_MAP beyond is ENOSPC;
//! - a message carries at most the fds its kind allows (DMA_MAP one, SET_IRQS one per
//!   vector, up to [`wire::MAX_FDS`]; anything else none): beyond is EINVAL, and every fd
//!   that came with it is closed;
//! - a message is at most [`wire::MAX_MESSAGE`] bytes.
//!
//! Each refusal is logged, rate-limited ([`crate::ratelimit`]) where the client can repeat it.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use pinning::class::{Classify, ErrorClass};

use super::wire::{
    self, cmd, dma_flags, flags, irq_set, Capabilities, DeviceInfo, DmaMap, DmaUnmap, Header,
    IrqInfoMsg, IrqSet, Message, RecvError, RecvLimits, RegionAccess, RegionInfoMsg, SendError,
    SendLimits, Version,
};
use crate::pci::dma::{DmaMapError, DmaProt, MappedRegions};
use crate::vfio::types::{region, IrqInfo, RegionInfo};
use crate::{debug_limited, warn_limited};

/// What the server needs from a device. Errors are errnos, sent back in the error reply.
/// Every argument comes from the client: implementations must check ranges, never panic.
pub trait UserDevice: Send {
    /// `VFIO_DEVICE_FLAGS_*` (default: a PCI device that supports reset).
    fn device_flags(&self) -> u32 {
        wire::device_flags::PCI | wire::device_flags::RESET
    }
    /// Number of regions and of interrupt indices.
    fn device_info(&self) -> (u32, u32);
    /// Region `index`. A `mmap_fd` is sent to the client with the reply (the device keeps
    /// owning it); `mmap_areas` other than one area covering the region become a sparse-mmap
    /// capability.
    fn region_info(&self, index: u32) -> Result<RegionInfo, i32>;
    /// Reads `data.len()` bytes at `offset` of region `index`.
    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), i32>;
    /// Writes `data` at `offset` of region `index`.
    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), i32>;
    /// Interrupt index `index`.
    fn irq_info(&self, index: u32) -> Result<IrqInfo, i32>;
    /// DEVICE_SET_IRQS: `flags` are `wire::irq_set` bits; `fds` are the eventfds that came
    /// with it (empty, or one per vector of `start..start + count`; checked by the server).
    /// DATA_BOOL is refused by the server before it gets here.
    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: Vec<OwnedFd>,
    ) -> Result<(), i32>;
    /// Function-level reset.
    fn reset(&mut self) -> Result<(), i32>;
}

const NAME: &str = "vfio-user server";

/// How long a client may take to send the rest of a message once its first byte arrived.
/// Generous: a whole message is at most [`wire::MAX_MESSAGE`] bytes over a local socket, and
/// the VMM gives up on a request after the same time.
pub const MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a reply may wait for room in the socket: a client that reads nothing for that
/// long is not waiting for the reply and is dropped. The same as the VMM's request timeout.
pub const REPLY_TIMEOUT: Duration = MESSAGE_TIMEOUT;
/// Most DMA regions mapped at once. Each is an mmap of the server's; the VMM maps guest RAM
/// in chunks of 128 MiB or more, so this covers 8 TiB. The kernel's `vm.max_map_count`
/// (65530 by default) may refuse a little earlier, with ENOMEM.
pub const MAX_DMA_REGIONS: usize = 65536;

/// What one client may make the server hold or wait for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerLimits {
    /// See [`MESSAGE_TIMEOUT`].
    pub message_timeout: Duration,
    /// See [`MAX_DMA_REGIONS`].
    pub max_dma_regions: usize,
    /// See [`REPLY_TIMEOUT`].
    pub reply_timeout: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            message_timeout: MESSAGE_TIMEOUT,
            max_dma_regions: MAX_DMA_REGIONS,
            reply_timeout: REPLY_TIMEOUT,
        }
    }
}

/// Why serving a client ended other than by its disconnecting.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("vfio-user server: {op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A message that cannot be framed ends the connection: the stream cannot be followed
    /// past it.
    #[error("vfio-user server: malformed request from the client: {what}")]
    MalformedRequest { what: String },
    /// The client started a message and did not finish it within the message timeout.
    #[error("vfio-user server: the client was dropped: {0}")]
    Stalled(#[source] RecvError),
    /// The client sent requests and stopped reading the replies for the reply timeout.
    #[error("vfio-user server: the client was dropped: replying to its {command}: {source}")]
    NotReading {
        command: &'static str,
        #[source]
        source: SendError,
    },
}

impl Classify for ServerError {
    fn class(&self) -> ErrorClass {
        // Neither is for the user to fix: the host refused a socket operation, or the client
        // does not speak the protocol.
        ErrorClass::Internal
    }
}

/// Serves one client on `stream` until it disconnects (a clean EOF between messages is
/// `Ok`). DMA_MAP/UNMAP change `regions`, which should be the device's DMA space.
pub fn serve(
    stream: UnixStream,
    device: &mut dyn UserDevice,
    regions: Arc<MappedRegions>,
) -> Result<(), ServerError> {
    serve_until(stream, device, regions, None)
}

/// Like [`serve`], but also returns `Ok` once `stop` (an eventfd or pipe) becomes readable;
/// it is polled between messages.
pub fn serve_until(
    stream: UnixStream,
    device: &mut dyn UserDevice,
    regions: Arc<MappedRegions>,
    stop: Option<BorrowedFd<'_>>,
) -> Result<(), ServerError> {
    serve_with(stream, device, regions, stop, ServerLimits::default())
}

/// [`serve_until`] with limits other than the defaults.
pub fn serve_with(
    stream: UnixStream,
    device: &mut dyn UserDevice,
    regions: Arc<MappedRegions>,
    stop: Option<BorrowedFd<'_>>,
    limits: ServerLimits,
) -> Result<(), ServerError> {
    let mut server = Server {
        device,
        regions,
        limits,
        negotiated: false,
        maps: 0,
        files: Default::default(),
    };
    let io_err = |op: &'static str, source| ServerError::Io { op, source };
    let recv_limits = RecvLimits {
        max_size: wire::MAX_MESSAGE,
        message_timeout: Some(limits.message_timeout),
    };
    let send_limits = SendLimits {
        timeout: limits.reply_timeout,
        stop,
    };
    loop {
        if let Some(stop) = stop {
            if wait_readable(stream.as_fd(), stop).map_err(|e| io_err("polling", e))? {
                server.log_end("asked to stop");
                return Ok(());
            }
        }
        let (h, result) = match wire::recv_message_with(&stream, recv_limits) {
            Ok(msg) => {
                let h = msg.header;
                if h.kind() != flags::TYPE_COMMAND {
                    // We never send commands, so no reply can be expected; skip it.
                    warn_limited!(
                        "{NAME}: ignoring message {} of type {} ({})",
                        h.msg_id,
                        h.kind(),
                        cmd::name(h.command)
                    );
                    continue;
                }
                (h, server.handle(msg))
            }
            Err(RecvError::Closed) => {
                server.log_end("client disconnected");
                return Ok(());
            }
            Err(RecvError::Io(e)) => return Err(io_err("receiving", e)),
            Err(e @ RecvError::TooManyFds { header }) => {
                // The message is whole and the stream still in step: refuse it, go on.
                warn_limited!("{NAME}: refusing a request: {e}");
                (header, Err(libc::EINVAL))
            }
            Err(e @ RecvError::Stalled { .. }) => {
                server.log_end(&format!("dropping the client: {e}"));
                return Err(ServerError::Stalled(e));
            }
            Err(e) => {
                if let RecvError::BadHeader { header, .. } = &e {
                    // Say why before hanging up, if the client wants to hear it.
                    if header.flags & flags::NO_REPLY == 0 {
                        let reply = Header::error_reply(header, libc::E2BIG);
                        let _ = wire::send_message_until(&stream, &reply, &[], &[], send_limits);
                    }
                }
                server.log_end(&format!("dropping the client: {e}"));
                return Err(ServerError::MalformedRequest {
                    what: e.to_string(),
                });
            }
        };
        if h.flags & flags::NO_REPLY != 0 {
            continue;
        }
        let sent = match &result {
            Ok((payload, fds)) => wire::send_message_until(
                &stream,
                &Header::reply(&h, payload.len()),
                payload,
                fds,
                send_limits,
            ),
            Err(errno) => {
                debug_limited!(
                    "{NAME}: {} {} failed: {}",
                    cmd::name(h.command),
                    h.msg_id,
                    std::io::Error::from_raw_os_error(*errno)
                );
                let reply = Header::error_reply(&h, *errno);
                wire::send_message_until(&stream, &reply, &[], &[], send_limits)
            }
        };
        match sent {
            Ok(()) => {}
            Err(SendError::Io(e))
                if matches!(e.raw_os_error(), Some(libc::EPIPE) | Some(libc::ECONNRESET)) =>
            {
                // The client went away after asking; that is its way of disconnecting.
                server.log_end("client disconnected");
                return Ok(());
            }
            Err(SendError::Io(e)) => return Err(io_err("sending a reply", e)),
            Err(SendError::Stopped) => {
                server.log_end("asked to stop (while the client was not reading)");
                return Ok(());
            }
            Err(source) => {
                server.log_end(&format!("dropping the client: {source}"));
                return Err(ServerError::NotReading {
                    command: cmd::name(h.command),
                    source,
                });
            }
        }
    }
}

/// Waits until `sock` or `stop` is readable; `true` when `stop` is.
fn wait_readable(sock: BorrowedFd<'_>, stop: BorrowedFd<'_>) -> std::io::Result<bool> {
    let mut fds = [
        libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfds for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n >= 0 {
            return Ok(fds[1].revents != 0);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

type Reply = Result<(Vec<u8>, Vec<RawFd>), i32>;

struct Server<'a> {
    device: &'a mut dyn UserDevice,
    regions: Arc<MappedRegions>,
    limits: ServerLimits,
    negotiated: bool,
    /// What the client mapped over the connection, said when it ends.
    maps: u64,
    files: std::collections::HashSet<(u64, u64)>,
}

impl Server<'_> {
    /// One line at the end of a connection: how much the client mapped, from how many files,
    /// and what it left mapped (a client that tears down properly leaves nothing).
    fn log_end(&self, how: &str) {
        tracing::info!(
            "{NAME}: {how}: {} DMA_MAP requests from {} files, {} regions still mapped",
            self.maps,
            self.files.len(),
            self.regions.regions().len()
        );
    }
}

/// The file behind `fd` (device and inode), to count the distinct files a client maps.
fn file_id(fd: BorrowedFd<'_>) -> Option<(u64, u64)> {
    // SAFETY: `libc::stat` is a plain C struct of integers, for which all zeroes is a value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes only into `st`, a stat we own; `fd` is open for the call.
    let ret = unsafe { libc::fstat(fd.as_raw_fd(), &mut st) };
    (ret == 0).then_some((st.st_dev, st.st_ino))
}

fn einval<T>(_: T) -> i32 {
    libc::EINVAL
}

fn map_errno(e: &DmaMapError) -> i32 {
    match e {
        DmaMapError::InvalidRange { .. } | DmaMapError::PastEnd { .. } => libc::EINVAL,
        // The client's to fix: it sent a file it could still shrink under us.
        DmaMapError::Unsealed { .. } => libc::EPERM,
        DmaMapError::Overlap { .. } => libc::EEXIST,
        DmaMapError::NotMapped { .. } => libc::ENOENT,
        DmaMapError::Mmap { source, .. } => source.raw_os_error().unwrap_or(libc::ENOMEM),
    }
}

impl Server<'_> {
    fn handle(&mut self, msg: Message) -> Reply {
        let Message {
            header,
            payload,
            fds,
        } = msg;
        let allowed = match header.command {
            cmd::DMA_MAP => 1,
            // One per vector; `set_irqs` checks the number against the request.
            cmd::DEVICE_SET_IRQS => wire::MAX_FDS,
            _ => 0,
        };
        if fds.len() > allowed {
            warn_limited!(
                "{NAME}: refusing {} {}: it came with {} file descriptors, more than the {} \
                 it may carry; they were closed",
                cmd::name(header.command),
                header.msg_id,
                fds.len(),
                allowed
            );
            return Err(libc::EINVAL);
        }
        if header.command == cmd::VERSION {
            return self.version(&payload);
        }
        if !self.negotiated {
            // The spec makes VERSION the first message; anything else first is a confused
            // client.
            return Err(libc::EINVAL);
        }
        match header.command {
            cmd::DMA_MAP => self.dma_map(&payload, fds),
            cmd::DMA_UNMAP => self.dma_unmap(&payload),
            cmd::DEVICE_GET_INFO => {
                let (num_regions, num_irqs) = self.device.device_info();
                let info = DeviceInfo {
                    flags: self.device.device_flags(),
                    num_regions,
                    num_irqs,
                };
                Ok((info.encode(), Vec::new()))
            }
            cmd::DEVICE_GET_REGION_INFO => self.region_info(&payload),
            cmd::DEVICE_GET_IRQ_INFO => {
                let req = IrqInfoMsg::decode(&payload).map_err(einval)?;
                let info = self.device.irq_info(req.index)?;
                let reply = IrqInfoMsg {
                    flags: info.flags,
                    index: req.index,
                    count: info.count,
                };
                Ok((reply.encode(), Vec::new()))
            }
            cmd::DEVICE_SET_IRQS => self.set_irqs(&payload, fds),
            cmd::REGION_READ => {
                let (req, _) = RegionAccess::decode(&payload, "REGION_READ").map_err(einval)?;
                if req.count as usize > wire::MAX_DATA_XFER {
                    return Err(libc::EINVAL);
                }
                let mut data = vec![0u8; req.count as usize];
                self.device.region_read(req.region, req.offset, &mut data)?;
                Ok((req.encode(&data), Vec::new()))
            }
            cmd::REGION_WRITE => {
                let (req, data) = RegionAccess::decode(&payload, "REGION_WRITE").map_err(einval)?;
                let data = data.get(..req.count as usize).ok_or(libc::EINVAL)?;
                self.device.region_write(req.region, req.offset, data)?;
                Ok((req.encode(&[]), Vec::new()))
            }
            cmd::DEVICE_RESET => {
                self.device.reset()?;
                Ok((Vec::new(), Vec::new()))
            }
            _ => Err(libc::ENOSYS),
        }
    }

    fn version(&mut self, payload: &[u8]) -> Reply {
        let theirs = Version::decode(payload).map_err(einval)?;
        Capabilities::from_json(&theirs.json).map_err(einval)?;
        if theirs.major != wire::VERSION_MAJOR {
            return Err(libc::ENOTSUP);
        }
        self.negotiated = true;
        let ours = Version {
            major: wire::VERSION_MAJOR,
            minor: theirs.minor.min(wire::VERSION_MINOR),
            json: Capabilities::ours().to_json(),
        };
        Ok((ours.encode(), Vec::new()))
    }

    fn dma_map(&mut self, payload: &[u8], fds: Vec<OwnedFd>) -> Reply {
        let req = DmaMap::decode(payload).map_err(einval)?;
        let fd = match fds.as_slice() {
            [fd] => fd,
            // Without an fd the client would expect DMA_READ/WRITE messages, which this
            // server does not use.
            [] => return Err(libc::ENOTSUP),
            _ => return Err(libc::EINVAL),
        };
        if self.regions.len() >= self.limits.max_dma_regions {
            warn_limited!(
                "{NAME}: refusing DMA_MAP of {:#x}+{:#x}: {} regions are mapped already, the \
                 most one client may map",
                req.address,
                req.size,
                self.limits.max_dma_regions
            );
            return Err(libc::ENOSPC);
        }
        let prot = DmaProt {
            read: req.flags & dma_flags::READ != 0,
            write: req.flags & dma_flags::WRITE != 0,
        };
        self.regions
            .insert_fd(req.address, req.size, fd.as_fd(), req.offset, prot)
            .map_err(|e| {
                if matches!(
                    e,
                    DmaMapError::Unsealed { .. } | DmaMapError::PastEnd { .. }
                ) {
                    // A client's file this server will not map, whatever the range: say why.
                    warn_limited!("{NAME}: refusing DMA_MAP: {e}");
                } else {
                    debug_limited!("{NAME}: DMA_MAP: {e}");
                }
                map_errno(&e)
            })?;
        self.maps += 1;
        self.files.extend(file_id(fd.as_fd()));
        // The mapping holds its own reference to the file; `fds` closes ours.
        Ok((Vec::new(), Vec::new()))
    }

    fn dma_unmap(&mut self, payload: &[u8]) -> Reply {
        let req = DmaUnmap::decode(payload).map_err(einval)?;
        if req.flags == dma_flags::UNMAP_ALL {
            if req.address != 0 || req.size != 0 {
                return Err(libc::EINVAL);
            }
            for (iova, len) in self.regions.regions() {
                self.regions.remove(iova, len).map_err(|e| map_errno(&e))?;
            }
        } else if req.flags != 0 {
            return Err(libc::ENOTSUP);
        } else {
            self.regions
                .remove(req.address, req.size)
                .map_err(|e| map_errno(&e))?;
        }
        Ok((req.encode(), Vec::new()))
    }

    fn region_info(&mut self, payload: &[u8]) -> Reply {
        let req = RegionInfoMsg::decode(payload).map_err(einval)?;
        let info = self.device.region_info(req.index)?;
        let whole = [crate::vfio::types::MmapArea {
            offset: 0,
            size: info.size,
        }];
        let mmap = info.flags & region::FLAG_MMAP != 0;
        let cap = if mmap && !info.mmap_areas.is_empty() && info.mmap_areas != whole {
            let areas: Vec<(u64, u64)> =
                info.mmap_areas.iter().map(|a| (a.offset, a.size)).collect();
            wire::encode_sparse_mmap(&areas)
        } else {
            Vec::new()
        };
        let needed = RegionInfoMsg::SIZE + cap.len();
        let mut reply = RegionInfoMsg {
            argsz: needed as u32,
            flags: info.flags & !wire::REGION_FLAG_CAPS,
            index: req.index,
            cap_offset: 0,
            size: info.size,
            offset: 0,
        };
        let mut fds = Vec::new();
        if let (true, Some((fd, offset))) = (mmap, info.mmap_fd) {
            fds.push(fd);
            reply.offset = offset;
        }
        if cap.is_empty() {
            return Ok((reply.encode(), fds));
        }
        reply.flags |= wire::REGION_FLAG_CAPS;
        if (req.argsz as usize) < needed {
            // Too small: say how much is needed, as VFIO does; the client asks again.
            return Ok((reply.encode(), fds));
        }
        reply.cap_offset = RegionInfoMsg::SIZE as u32;
        let mut out = reply.encode();
        out.extend_from_slice(&cap);
        Ok((out, fds))
    }

    fn set_irqs(&mut self, payload: &[u8], fds: Vec<OwnedFd>) -> Reply {
        let req = IrqSet::decode(payload).map_err(einval)?;
        let data = req.flags & irq_set::DATA_MASK;
        let action = req.flags & irq_set::ACTION_MASK_ALL;
        if data.count_ones() != 1
            || action.count_ones() != 1
            || req.flags & !(irq_set::DATA_MASK | irq_set::ACTION_MASK_ALL) != 0
        {
            return Err(libc::EINVAL);
        }
        if data == irq_set::DATA_BOOL {
            return Err(libc::ENOTSUP);
        }
        if !fds.is_empty() && (data != irq_set::DATA_EVENTFD || fds.len() != req.count as usize) {
            return Err(libc::EINVAL);
        }
        self.device
            .set_irqs(req.index, req.flags, req.start, req.count, fds)?;
        Ok((Vec::new(), Vec::new()))
    }
}
