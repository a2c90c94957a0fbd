//! The vfio-user wire format: the 16-byte header, the message bodies this crate speaks, and
//! sending/receiving whole messages with their file descriptors over a Unix stream socket.
//!
//! Everything here is peer-controlled input: decoders check every length before they read,
//! a message size is checked against [`MAX_MESSAGE`] before anything is allocated, and no
//! decoder panics on any input.
//!
//! All integers are in host byte order (the protocol says so); the workspace only targets
//! little-endian x86_64, so `to_le_bytes`/`from_le_bytes` are used to keep it explicit.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

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
    /// Server reads client memory (not supported here: memory is always shared by fd).
    pub const DMA_READ: u16 = 11;
    /// Server writes client memory (not supported here).
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
    /// The payload ends before a field.
    #[error("{what}: {need} bytes needed at offset {at}, the payload has {have}")]
    Short {
        what: &'static str,
        at: usize,
        need: usize,
        have: usize,
    },
    /// A field holds a value that cannot be right.
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

/// VERSION body: major, minor, then optional NUL-terminated JSON.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Version {
    /// Major version.
    pub major: u16,
    /// Minor version.
    pub minor: u16,
    /// The JSON text without its NUL (empty: none sent).
    pub json: String,
}

/// Capabilities exchanged in VERSION (those this crate uses; the rest are ignored).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Most fds the sender accepts in one message (default 1).
    pub max_msg_fds: u32,
    /// Largest REGION_READ/WRITE count the sender accepts (default 1 MiB).
    pub max_data_xfer_size: u32,
    /// DMA page sizes, or'ed (default 4 KiB).
    pub pgsizes: u64,
}

impl Default for Capabilities {
    /// The spec's defaults for a peer that sends no capabilities.
    fn default() -> Self {
        Capabilities {
            max_msg_fds: 1,
            max_data_xfer_size: MAX_DATA_XFER as u32,
            pgsizes: 4096,
        }
    }
}

impl Capabilities {
    /// What this crate offers (both sides).
    pub fn ours() -> Self {
        Capabilities {
            max_msg_fds: MAX_FDS as u32,
            max_data_xfer_size: MAX_DATA_XFER as u32,
            pgsizes: 4096,
        }
    }

    /// The JSON the spec describes.
    pub fn to_json(self) -> String {
        format!(
            r#"{{"capabilities":{{"max_msg_fds":{},"max_data_xfer_size":{},"pgsizes":{}}}}}"#,
            self.max_msg_fds, self.max_data_xfer_size, self.pgsizes
        )
    }

    /// Parses the peer's JSON; missing fields take the spec's defaults, unknown ones are
    /// ignored, and an empty string means "no capabilities".
    pub fn from_json(json: &str) -> Result<Self, WireError> {
        let mut caps = Capabilities::default();
        if json.is_empty() {
            return Ok(caps);
        }
        let value = super::json::parse(json)
            .map_err(|e| WireError::Invalid(format!("version JSON does not parse: {e}")))?;
        if !value.is_object() {
            return Err(WireError::Invalid("version JSON is not an object".into()));
        }
        let Some(c) = value.get("capabilities") else {
            return Ok(caps);
        };
        if !c.is_object() {
            return Err(WireError::Invalid(
                "version JSON: \"capabilities\" is not an object".into(),
            ));
        }
        let number = |name: &str| -> Result<Option<u64>, WireError> {
            match c.get(name) {
                None => Ok(None),
                Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                    WireError::Invalid(format!(
                        "version JSON: {name} is not a non-negative integer"
                    ))
                }),
            }
        };
        let clamp32 = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
        if let Some(v) = number("max_msg_fds")? {
            caps.max_msg_fds = clamp32(v);
        }
        if let Some(v) = number("max_data_xfer_size")? {
            caps.max_data_xfer_size = clamp32(v);
        }
        if let Some(v) = number("pgsizes")? {
            caps.pgsizes = v;
        }
        Ok(caps)
    }
}

impl Version {
    /// Encodes major, minor and the NUL-terminated JSON (if any).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(4 + self.json.len() + 1);
        b.extend_from_slice(&self.major.to_le_bytes());
        b.extend_from_slice(&self.minor.to_le_bytes());
        if !self.json.is_empty() {
            b.extend_from_slice(self.json.as_bytes());
            b.push(0);
        }
        b
    }

    /// Decodes; the JSON must be UTF-8 and end at its first NUL.
    pub fn decode(payload: &[u8]) -> Result<Self, WireError> {
        let mut c = Cursor::new(payload, "VERSION");
        let major = c.u16()?;
        let minor = c.u16()?;
        let rest = c.rest();
        let json = match rest.iter().position(|&b| b == 0) {
            Some(nul) => &rest[..nul],
            None if rest.is_empty() => rest,
            None => {
                return Err(WireError::Invalid(
                    "VERSION: the JSON data is not NUL-terminated".into(),
                ))
            }
        };
        let json = std::str::from_utf8(json)
            .map_err(|e| WireError::Invalid(format!("VERSION: the JSON data is not UTF-8: {e}")))?
            .to_owned();
        Ok(Version { major, minor, json })
    }
}

/// DMA_MAP body (32 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaMap {
    /// [`dma_flags`].
    pub flags: u32,
    /// Offset of the region in the fd sent with the message.
    pub offset: u64,
    /// DMA (IO virtual) address.
    pub address: u64,
    /// Bytes.
    pub size: u64,
}

impl DmaMap {
    /// Encoded size (also its argsz).
    pub const SIZE: usize = 32;

    /// Encodes it.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(Self::SIZE);
        b.extend_from_slice(&(Self::SIZE as u32).to_le_bytes());
        b.extend_from_slice(&self.flags.to_le_bytes());
        b.extend_from_slice(&self.offset.to_le_bytes());
        b.extend_from_slice(&self.address.to_le_bytes());
        b.extend_from_slice(&self.size.to_le_bytes());
        b
    }

    /// Decodes it (argsz is not trusted beyond the structure's own size).
    pub fn decode(payload: &[u8]) -> Result<Self, WireError> {
        let mut c = Cursor::new(payload, "DMA_MAP");
        let _argsz = c.u32()?;
        Ok(DmaMap {
            flags: c.u32()?,
            offset: c.u64()?,
            address: c.u64()?,
            size: c.u64()?,
        })
    }
}

/// DMA_UNMAP body (24 bytes); the reply echoes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaUnmap {
    /// [`dma_flags::UNMAP_ALL`] or 0.
    pub flags: u32,
    /// DMA address of the mapping.
    pub address: u64,
    /// Its size.
    pub size: u64,
}

impl DmaUnmap {
    /// Encoded size.
    pub const SIZE: usize = 24;

    /// Encodes it.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(Self::SIZE);
        b.extend_from_slice(&(Self::SIZE as u32).to_le_bytes());
        b.extend_from_slice(&self.flags.to_le_bytes());
        b.extend_from_slice(&self.address.to_le_bytes());
        b.extend_from_slice(&self.size.to_le_bytes());
        b
    }

    /// Decodes it.
    pub fn decode(payload: &[u8]) -> Result<Self, WireError> {
        let mut c = Cursor::new(payload, "DMA_UNMAP");
        let _argsz = c.u32()?;
        Ok(DmaUnmap {
            flags: c.u32()?,
            address: c.u64()?,
            size: c.u64()?,
        })
    }
}

/// DEVICE_GET_INFO body (16 bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceInfo {
    /// [`device_flags`].
    pub flags: u32,
    /// Regions.
    pub num_regions: u32,
    /// Interrupt indices.
    pub num_irqs: u32,
}

impl DeviceInfo {
    /// Encoded size.
    pub const SIZE: usize = 16;

    /// Encodes it.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(Self::SIZE);
        b.extend_from_slice(&(Self::SIZE as u32).to_le_bytes());
        b.extend_from_slice(&self.flags.to_le_bytes());
        b.extend_from_slice(&self.num_regions.to_le_bytes());
        b.extend_from_slice(&self.num_irqs.to_le_bytes());
        b
    }

    /// Decodes it.
    pub fn decode(payload: &[u8]) -> Result<Self, WireError> {
        let mut c = Cursor::new(payload, "DEVICE_GET_INFO");
        let _argsz = c.u32()?;
        Ok(DeviceInfo {
            flags: c.u32()?,
            num_regions: c.u32()?,
            num_irqs: c.u32()?,
        })
    }
}

/// The fixed part of DEVICE_GET_REGION_INFO (32 bytes); capabilities may follow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegionInfoMsg {
    /// Request: most reply bytes the client takes; reply: bytes the full answer needs.
    pub argsz: u32,
    /// Region flags.
    pub flags: u32,
    /// Region index.
    pub index: u32,
    /// Offset of the first capability from the start of this structure (0: none).
    pub cap_offset: u32,
    /// Region size.
    pub size: u64,
    /// mmap offset in the fd sent with the reply.
    pub offset: u64,
}

impl RegionInfoMsg {
    /// Encoded size of the fixed part.
    pub const SIZE: usize = 32;

    /// Encodes the fixed part.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(Self::SIZE);
        b.extend_from_slice(&self.argsz.to_le_bytes());
        b.extend_from_slice(&self.flags.to_le_bytes());
        b.extend_from_slice(&self.index.to_le_bytes());
        b.extend_from_slice(&self.cap_offset.to_le_bytes());
        b.extend_from_slice(&self.size.to_le_bytes());
        b.extend_from_slice(&self.offset.to_le_bytes());
        b
    }

    /// Decodes the fixed part.
    pub fn decode(payload: &[u8]) -> Result<Self, WireError> {
        let mut c = Cursor::new(payload, "DEVICE_GET_REGION_INFO");
        Ok(RegionInfoMsg {
            argsz: c.u32()?,
            flags: c.u32()?,
            index: c.u32()?,
            cap_offset: c.u32()?,
            size: c.u64()?,
            offset: c.u64()?,
        })
    }
}

/// Encodes a sparse-mmap capability (header + areas) with `next` = 0.
pub fn encode_sparse_mmap(areas: &[(u64, u64)]) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + areas.len() * 16);
    b.extend_from_slice(&CAP_SPARSE_MMAP.to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes()); // version
    b.extend_from_slice(&0u32.to_le_bytes()); // next
    b.extend_from_slice(&(areas.len() as u32).to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes()); // reserved
    for &(offset, size) in areas {
        b.extend_from_slice(&offset.to_le_bytes());
        b.extend_from_slice(&size.to_le_bytes());
    }
    b
}

/// Finds the sparse-mmap capability in a region-info payload (fixed part included) and returns
/// its areas. `Ok(None)`: no such capability. Walks at most 64 capabilities and never leaves
/// the payload, so a looping or dangling chain is an error, not a hang or a panic.
pub fn find_sparse_mmap(payload: &[u8], first: u32) -> Result<Option<Vec<(u64, u64)>>, WireError> {
    let mut at = first as usize;
    for _ in 0..64 {
        if at == 0 {
            return Ok(None);
        }
        if at < RegionInfoMsg::SIZE {
            return Err(WireError::Invalid(format!(
                "region capability at offset {at} overlaps the region info"
            )));
        }
        let mut c = Cursor::new(payload.get(at..).unwrap_or_default(), "region capability");
        let id = c.u16()?;
        let _version = c.u16()?;
        let next = c.u32()?;
        if id == CAP_SPARSE_MMAP {
            let n = c.u32()? as usize;
            let _reserved = c.u32()?;
            let mut areas = Vec::new();
            for _ in 0..n {
                // Short payloads end this loop with an error long before `n` is reached, so
                // `areas` never grows past what the (bounded) payload holds.
                areas.push((c.u64()?, c.u64()?));
            }
            return Ok(Some(areas));
        }
        at = next as usize;
    }
    Err(WireError::Invalid(
        "region capability chain is longer than 64 entries (a loop?)".into(),
    ))
}

/// DEVICE_GET_IRQ_INFO body (16 bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IrqInfoMsg {
    /// [`irq_info_flags`].
    pub flags: u32,
    /// Interrupt index.
    pub index: u32,
    /// Vectors.
    pub count: u32,
}

impl IrqInfoMsg {
    /// Encoded size.
    pub const SIZE: usize = 16;

    /// Encodes it.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(Self::SIZE);
        b.extend_from_slice(&(Self::SIZE as u32).to_le_bytes());
        b.extend_from_slice(&self.flags.to_le_bytes());
        b.extend_from_slice(&self.index.to_le_bytes());
        b.extend_from_slice(&self.count.to_le_bytes());
        b
    }

    /// Decodes it.
    pub fn decode(payload: &[u8]) -> Result<Self, WireError> {
        let mut c = Cursor::new(payload, "DEVICE_GET_IRQ_INFO");
        let _argsz = c.u32()?;
        Ok(IrqInfoMsg {
            flags: c.u32()?,
            index: c.u32()?,
            count: c.u32()?,
        })
    }
}

/// DEVICE_SET_IRQS body (20 bytes plus optional bool data).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IrqSet {
    /// [`irq_set`] bits.
    pub flags: u32,
    /// Interrupt index.
    pub index: u32,
    /// First vector.
    pub start: u32,
    /// Vectors.
    pub count: u32,
    /// DATA_BOOL bytes.
    pub data: Vec<u8>,
}

impl IrqSet {
    /// Encoded size of the fixed part.
    pub const SIZE: usize = 20;

    /// Encodes it.
    pub fn encode(&self) -> Vec<u8> {
        let argsz = Self::SIZE + self.data.len();
        let mut b = Vec::with_capacity(argsz);
        b.extend_from_slice(&(argsz as u32).to_le_bytes());
        b.extend_from_slice(&self.flags.to_le_bytes());
        b.extend_from_slice(&self.index.to_le_bytes());
        b.extend_from_slice(&self.start.to_le_bytes());
        b.extend_from_slice(&self.count.to_le_bytes());
        b.extend_from_slice(&self.data);
        b
    }

    /// Decodes it.
    pub fn decode(payload: &[u8]) -> Result<Self, WireError> {
        let mut c = Cursor::new(payload, "DEVICE_SET_IRQS");
        let _argsz = c.u32()?;
        Ok(IrqSet {
            flags: c.u32()?,
            index: c.u32()?,
            start: c.u32()?,
            count: c.u32()?,
            data: c.rest().to_vec(),
        })
    }
}

/// REGION_READ/REGION_WRITE header (16 bytes); data follows in a read reply and a write
/// request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegionAccess {
    /// Offset in the region.
    pub offset: u64,
    /// Region index.
    pub region: u32,
    /// Bytes.
    pub count: u32,
}

impl RegionAccess {
    /// Encoded size.
    pub const SIZE: usize = 16;

    /// Encodes it followed by `data`.
    pub fn encode(&self, data: &[u8]) -> Vec<u8> {
        let mut b = Vec::with_capacity(Self::SIZE + data.len());
        b.extend_from_slice(&self.offset.to_le_bytes());
        b.extend_from_slice(&self.region.to_le_bytes());
        b.extend_from_slice(&self.count.to_le_bytes());
        b.extend_from_slice(data);
        b
    }

    /// Decodes it; returns the bytes after it too.
    pub fn decode<'a>(
        payload: &'a [u8],
        what: &'static str,
    ) -> Result<(Self, &'a [u8]), WireError> {
        let mut c = Cursor::new(payload, what);
        let access = RegionAccess {
            offset: c.u64()?,
            region: c.u32()?,
            count: c.u32()?,
        };
        Ok((access, c.rest()))
    }
}

/// A whole received message.
#[derive(Debug)]
pub struct Message {
    /// Its header.
    pub header: Header,
    /// The body.
    pub payload: Vec<u8>,
    /// File descriptors that came with it, owned (closed on drop).
    pub fds: Vec<OwnedFd>,
}

/// Why a message could not be received.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    /// The peer closed the connection between messages.
    #[error("the peer closed the connection")]
    Closed,
    /// The peer closed the connection in the middle of a message.
    #[error("the peer closed the connection in the middle of a message ({got} of {want} bytes)")]
    Truncated { got: usize, want: usize },
    /// recvmsg failed.
    #[error("receiving: {0}")]
    Io(#[source] io::Error),
    /// The header announces an impossible size; the stream cannot be followed any further.
    #[error("message {} ({}): {error}", .header.msg_id, cmd::name(.header.command))]
    BadHeader { header: Header, error: WireError },
}

/// Reads exactly `buf.len()` bytes, collecting any fds that come along. `Ok(false)`: EOF
/// before the first byte.
fn recv_exact(
    sock: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> Result<bool, RecvError> {
    let mut got = 0;
    while got < buf.len() {
        let mut raw = [-1 as RawFd; MAX_FDS];
        let rest = &mut buf[got..];
        let mut iov = [libc::iovec {
            iov_base: rest.as_mut_ptr().cast(),
            iov_len: rest.len(),
        }];
        // SAFETY: the iovec points at `rest`, memory we borrow mutably for this call, and any
        // bytes may be written there.
        let res = unsafe { sock.recv_with_fds(&mut iov, &mut raw) };
        match res {
            Ok((n, nfds)) => {
                for &fd in raw.iter().take(nfds) {
                    // SAFETY: recvmsg just installed these descriptors for us; nothing else
                    // owns them.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
                if n == 0 {
                    if got == 0 {
                        return Ok(false);
                    }
                    return Err(RecvError::Truncated {
                        got,
                        want: buf.len(),
                    });
                }
                got += n;
            }
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(RecvError::Io(io::Error::from_raw_os_error(e.errno()))),
        }
    }
    Ok(true)
}

/// Receives one message of at most `max` bytes. Nothing larger than the header is allocated
/// before the size was checked. EOF before a header is [`RecvError::Closed`]; anywhere else
/// it is [`RecvError::Truncated`].
pub fn recv_message(sock: &UnixStream, max: usize) -> Result<Message, RecvError> {
    let mut fds = Vec::new();
    let mut hb = [0u8; HEADER_SIZE];
    if !recv_exact(sock, &mut hb, &mut fds)? {
        return Err(RecvError::Closed);
    }
    let header = Header::decode(&hb);
    let len = header
        .payload_len(max)
        .map_err(|error| RecvError::BadHeader { header, error })?;
    let mut payload = vec![0u8; len];
    match recv_exact(sock, &mut payload, &mut fds) {
        Ok(true) => {}
        Ok(false) => {
            return Err(RecvError::Truncated {
                got: HEADER_SIZE,
                want: HEADER_SIZE + len,
            })
        }
        Err(RecvError::Truncated { got, want }) => {
            return Err(RecvError::Truncated {
                got: HEADER_SIZE + got,
                want: HEADER_SIZE + want,
            })
        }
        Err(e) => return Err(e),
    }
    Ok(Message {
        header,
        payload,
        fds,
    })
}

/// Sends one message (header, payload, fds) completely. The fds go with the first bytes; a
/// partial send (a signal, a send timeout) is finished with plain writes, so the stream never
/// holds half a message unless this returns an error.
pub fn send_message(
    sock: &UnixStream,
    header: &Header,
    payload: &[u8],
    fds: &[RawFd],
) -> io::Result<()> {
    let hb = header.encode();
    let total = hb.len() + payload.len();
    let sent = loop {
        match sock.send_with_fds(&[&hb[..], payload], fds) {
            Ok(n) => break n,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(io::Error::from_raw_os_error(e.errno())),
        }
    };
    if sent < total {
        if sent < hb.len() {
            send_all(sock, &hb[sent..])?;
            send_all(sock, payload)?;
        } else {
            send_all(sock, &payload[sent - hb.len()..])?;
        }
    }
    Ok(())
}

/// Writes all of `buf` with MSG_NOSIGNAL, so a vanished peer is EPIPE and not a SIGPIPE.
fn send_all(sock: &UnixStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the duration of the call.
        let n = unsafe {
            libc::send(
                sock.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "send wrote nothing",
            ));
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

#[cfg(test)]
mod tests;
