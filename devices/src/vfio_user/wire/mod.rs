//! The vfio-user wire format: the 16-byte header, the message bodies this crate speaks, and
//! sending/receiving whole messages with their file descriptors over a Unix stream socket.
//!
//! Everything here is peer-controlled input: decoders check every length before they read,
//! a message size is checked against [`MAX_MESSAGE`] before anything is allocated, and no
//! decoder panics on any input.
//!
//! All integers are in host byte order (the protocol says so); the workspace only targets
//! little-endian x86_64, so `to_le_bytes`/`from_le_bytes` are used to keep it explicit.

mod capabilities;
mod messages;
mod region;
mod socket;

pub use capabilities::{Capabilities, DEFAULT_MAX_DMA_MAPS};
pub use messages::{DeviceInfo, DmaAccess, DmaMap, DmaUnmap, IrqInfoMsg, IrqSet, Version};
pub use region::{encode_sparse_mmap, find_sparse_mmap, RegionAccess, RegionInfoMsg};
pub use socket::{
    recv_message, recv_message_with, send_message, send_message_until, Message, RecvError,
    RecvLimits, SendError, SendLimits,
};

/// Bytes in a message header.
pub const HEADER_SIZE: usize = 16;
/// Largest data transfer (REGION_READ/WRITE `count`) this crate sends or accepts. It is also
/// the protocol's default `max_data_xfer_size`.
pub const MAX_DATA_XFER: usize = 1 << 20;
/// Largest whole message accepted from a peer: one maximal data transfer plus its headers and
/// room for region capabilities. Anything larger is malformed and is never allocated.
pub const MAX_MESSAGE: usize = HEADER_SIZE + MAX_DATA_XFER + 4096;
/// Most file descriptors one message may carry (the kernel's SCM_MAX_FD is 253).
pub const MAX_FDS: usize = 64;

/// Protocol version this crate speaks (the spec's 0.1).
pub const VERSION_MAJOR: u16 = 0;
/// Minor version.
pub const VERSION_MINOR: u16 = 1;

/// Command numbers.
pub mod cmd {
    /// Version and capability negotiation.
    pub const VERSION: u16 = 1;
    /// Share client memory with the server.
    pub const DMA_MAP: u16 = 2;
    /// Withdraw shared memory.
    pub const DMA_UNMAP: u16 = 3;
    /// Device flags and counts.
    pub const DEVICE_GET_INFO: u16 = 4;
    /// One region.
    pub const DEVICE_GET_REGION_INFO: u16 = 5;
    /// One interrupt index.
    pub const DEVICE_GET_IRQ_INFO: u16 = 7;
    /// Wire interrupts to eventfds.
    pub const DEVICE_SET_IRQS: u16 = 8;
    /// Read a region.
    pub const REGION_READ: u16 = 9;
    /// Write a region.
    pub const REGION_WRITE: u16 = 10;
    /// Region I/O fds (not used here).
    pub const DEVICE_GET_REGION_IO_FDS: u16 = 6;
    /// Server reads client memory (server to client).
    pub const DMA_READ: u16 = 11;
    /// Server writes client memory (server to client).
    pub const DMA_WRITE: u16 = 12;
    /// Function-level reset.
    pub const DEVICE_RESET: u16 = 13;

    /// A name for logs and errors.
    pub fn name(command: u16) -> &'static str {
        match command {
            VERSION => "VERSION",
            DMA_MAP => "DMA_MAP",
            DMA_UNMAP => "DMA_UNMAP",
            DEVICE_GET_INFO => "DEVICE_GET_INFO",
            DEVICE_GET_REGION_INFO => "DEVICE_GET_REGION_INFO",
            DEVICE_GET_REGION_IO_FDS => "DEVICE_GET_REGION_IO_FDS",
            DEVICE_GET_IRQ_INFO => "DEVICE_GET_IRQ_INFO",
            DEVICE_SET_IRQS => "DEVICE_SET_IRQS",
            REGION_READ => "REGION_READ",
            REGION_WRITE => "REGION_WRITE",
            DMA_READ => "DMA_READ",
            DMA_WRITE => "DMA_WRITE",
            DEVICE_RESET => "DEVICE_RESET",
            _ => "unknown command",
        }
    }
}

/// Header flag bits.
pub mod flags {
    /// Bits 0-3: the message type.
    pub const TYPE_MASK: u32 = 0xf;
    /// Type: a command.
    pub const TYPE_COMMAND: u32 = 0;
    /// Type: a reply.
    pub const TYPE_REPLY: u32 = 1;
    /// The sender wants no reply.
    pub const NO_REPLY: u32 = 1 << 4;
    /// A reply reporting failure; the header's error field holds the errno.
    pub const ERROR: u32 = 1 << 5;
}

/// DMA_MAP flags.
pub mod dma_flags {
    /// The server may read the region.
    pub const READ: u32 = 1 << 0;
    /// The server may write the region.
    pub const WRITE: u32 = 1 << 1;
    /// DMA_UNMAP: unmap everything (address and size must be 0).
    pub const UNMAP_ALL: u32 = 1 << 1;
}

/// DEVICE_GET_INFO flags (`VFIO_DEVICE_FLAGS_*`).
pub mod device_flags {
    /// The device supports DEVICE_RESET.
    pub const RESET: u32 = 1 << 0;
    /// It is a PCI device.
    pub const PCI: u32 = 1 << 1;
}

/// DEVICE_SET_IRQS flags (`VFIO_IRQ_SET_*`).
pub mod irq_set {
    /// No data: act on all of `start..start + count` (count 0 with TRIGGER: disable all).
    pub const DATA_NONE: u32 = 1 << 0;
    /// Data is one bool byte per vector.
    pub const DATA_BOOL: u32 = 1 << 1;
    /// Data is eventfds in the message's SCM_RIGHTS.
    pub const DATA_EVENTFD: u32 = 1 << 2;
    /// Mask action.
    pub const ACTION_MASK: u32 = 1 << 3;
    /// Unmask action.
    pub const ACTION_UNMASK: u32 = 1 << 4;
    /// Trigger action.
    pub const ACTION_TRIGGER: u32 = 1 << 5;
    /// All DATA_* bits.
    pub const DATA_MASK: u32 = DATA_NONE | DATA_BOOL | DATA_EVENTFD;
    /// All ACTION_* bits.
    pub const ACTION_MASK_ALL: u32 = ACTION_MASK | ACTION_UNMASK | ACTION_TRIGGER;
}

/// GET_IRQ_INFO flags (`VFIO_IRQ_INFO_*`).
pub mod irq_info_flags {
    /// The index can signal eventfds.
    pub const EVENTFD: u32 = 1 << 0;
    /// MASK/UNMASK are supported.
    pub const MASKABLE: u32 = 1 << 1;
    /// The interrupt masks itself when it fires.
    pub const AUTOMASKED: u32 = 1 << 2;
    /// Vectors are set up as a whole.
    pub const NORESIZE: u32 = 1 << 3;
}

/// Region info flag: a capability chain follows (`VFIO_REGION_INFO_FLAG_CAPS`).
pub const REGION_FLAG_CAPS: u32 = 1 << 3;
/// Capability id of the sparse-mmap capability (`VFIO_REGION_INFO_CAP_SPARSE_MMAP`).
pub const CAP_SPARSE_MMAP: u16 = 1;

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("{what}: {need} bytes needed at offset {at}, the payload has {have}")]
    Short {
        what: &'static str,
        at: usize,
        need: usize,
        have: usize,
    },
    #[error("{0}")]
    Invalid(String),
}

/// A bounds-checked little-endian reader over a payload.
pub struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Cursor<'a> {
    /// Reads `buf`; `what` names the message in errors.
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Cursor { buf, pos: 0, what }
    }

    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let short = || WireError::Short {
            what: self.what,
            at: self.pos,
            need: n,
            have: self.buf.len(),
        };
        let end = self.pos.checked_add(n).ok_or_else(short)?;
        let out = self.buf.get(self.pos..end).ok_or_else(short)?;
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }

    /// A u16.
    pub fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    /// A u32.
    pub fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    /// A u64.
    pub fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// Everything not read yet.
    pub fn rest(&mut self) -> &'a [u8] {
        let out = self.buf.get(self.pos..).unwrap_or_default();
        self.pos = self.buf.len();
        out
    }
}

/// The message header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Chosen by the sender of a command, echoed in its reply.
    pub msg_id: u16,
    /// [`cmd`] number.
    pub command: u16,
    /// Whole message, header included.
    pub size: u32,
    /// [`flags`] bits.
    pub flags: u32,
    /// errno of an error reply (may be 0 even then).
    pub error: u32,
}

impl Header {
    /// The header of a command with `payload_len` bytes of body.
    pub fn command(msg_id: u16, command: u16, payload_len: usize) -> Self {
        Header {
            msg_id,
            command,
            size: (HEADER_SIZE + payload_len) as u32,
            flags: flags::TYPE_COMMAND,
            error: 0,
        }
    }

    /// The header of a successful reply to `to`.
    pub fn reply(to: &Header, payload_len: usize) -> Self {
        Header {
            msg_id: to.msg_id,
            command: to.command,
            size: (HEADER_SIZE + payload_len) as u32,
            flags: flags::TYPE_REPLY,
            error: 0,
        }
    }

    /// The header of an error reply to `to` (no payload, as the spec demands).
    pub fn error_reply(to: &Header, errno: i32) -> Self {
        Header {
            msg_id: to.msg_id,
            command: to.command,
            size: HEADER_SIZE as u32,
            flags: flags::TYPE_REPLY | flags::ERROR,
            error: errno as u32,
        }
    }

    /// The message type bits.
    pub fn kind(&self) -> u32 {
        self.flags & flags::TYPE_MASK
    }

    /// An error reply?
    pub fn is_error(&self) -> bool {
        self.flags & flags::ERROR != 0
    }

    /// The 16 bytes on the wire.
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..2].copy_from_slice(&self.msg_id.to_le_bytes());
        b[2..4].copy_from_slice(&self.command.to_le_bytes());
        b[4..8].copy_from_slice(&self.size.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..16].copy_from_slice(&self.error.to_le_bytes());
        b
    }

    /// Parses 16 bytes (any value decodes; [`Header::payload_len`] checks the size).
    pub fn decode(b: &[u8; HEADER_SIZE]) -> Self {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Header {
            msg_id: u16_at(0),
            command: u16_at(2),
            size: u32_at(4),
            flags: u32_at(8),
            error: u32_at(12),
        }
    }

    /// The body length the size field announces, checked against `max` whole-message bytes.
    pub fn payload_len(&self, max: usize) -> Result<usize, WireError> {
        let size = self.size as usize;
        if size < HEADER_SIZE {
            return Err(WireError::Invalid(format!(
                "message size {size} is smaller than the {HEADER_SIZE}-byte header"
            )));
        }
        if size > max {
            return Err(WireError::Invalid(format!(
                "message size {size} exceeds the limit of {max} bytes"
            )));
        }
        Ok(size - HEADER_SIZE)
    }
}

#[cfg(test)]
pub(crate) mod tests;
