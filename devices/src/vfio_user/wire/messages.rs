//! Message bodies: VERSION (with its capabilities), DMA_MAP, DMA_UNMAP, DEVICE_GET_INFO,
//! DEVICE_GET_IRQ_INFO, DEVICE_SET_IRQS and the DMA_READ/DMA_WRITE header.

use super::{Cursor, WireError, MAX_DATA_XFER, MAX_FDS};
use crate::vfio_user::json;

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
///
/// Never proposed, so never in use: `migration` (a server that offers it anyway has it
/// ignored: the spec lets the client proceed without what it did not propose),
/// `twin_socket` (server-to-client commands share the one socket) and `write_multiple`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Most fds the sender accepts in one message (default 1).
    pub max_msg_fds: u32,
    /// Largest REGION_READ/WRITE and DMA_READ/WRITE count the sender accepts (default 1 MiB).
    pub max_data_xfer_size: u32,
    /// Most DMA mappings the sender keeps at once (default 65535).
    pub max_dma_maps: u32,
    /// DMA page sizes, or'ed (default 4 KiB): every DMA_MAP address and size is a multiple
    /// of the smallest.
    pub pgsizes: u64,
}

/// The spec's default for `max_dma_maps`.
pub const DEFAULT_MAX_DMA_MAPS: u32 = 65535;

impl Default for Capabilities {
    /// The spec's defaults for a peer that sends no capabilities.
    fn default() -> Self {
        Capabilities {
            max_msg_fds: 1,
            max_data_xfer_size: MAX_DATA_XFER as u32,
            max_dma_maps: DEFAULT_MAX_DMA_MAPS,
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
            max_dma_maps: DEFAULT_MAX_DMA_MAPS,
            pgsizes: 4096,
        }
    }

    /// The JSON the spec describes.
    pub fn to_json(self) -> String {
        format!(
            r#"{{"capabilities":{{"max_msg_fds":{},"max_data_xfer_size":{},"max_dma_maps":{},"pgsizes":{}}}}}"#,
            self.max_msg_fds, self.max_data_xfer_size, self.max_dma_maps, self.pgsizes
        )
    }

    /// The smallest DMA page size (`pgsizes` has at least one bit set).
    pub fn min_pgsize(self) -> Option<u64> {
        (self.pgsizes != 0).then(|| 1u64 << self.pgsizes.trailing_zeros())
    }

    /// Parses the peer's JSON; missing fields take the spec's defaults, unknown ones are
    /// ignored, and an empty string means "no capabilities".
    pub fn from_json(json: &str) -> Result<Self, WireError> {
        let mut caps = Capabilities::default();
        if json.is_empty() {
            return Ok(caps);
        }
        let value = json::parse(json)
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
        if let Some(v) = number("max_dma_maps")? {
            caps.max_dma_maps = clamp32(v);
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
    /// [`dma_flags`](super::dma_flags).
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
    /// [`dma_flags::UNMAP_ALL`](super::dma_flags::UNMAP_ALL) or 0.
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
    /// [`device_flags`](super::device_flags).
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

/// DEVICE_GET_IRQ_INFO body (16 bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IrqInfoMsg {
    /// [`irq_info_flags`](super::irq_info_flags).
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
    /// [`irq_set`](super::irq_set) bits.
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

/// DMA_READ/DMA_WRITE header (16 bytes): data follows in a DMA_READ reply and a DMA_WRITE
/// request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DmaAccess {
    /// Client DMA address.
    pub address: u64,
    /// Bytes.
    pub count: u64,
}

impl DmaAccess {
    /// Encoded size.
    pub const SIZE: usize = 16;

    /// Encodes it followed by `data`.
    pub fn encode(&self, data: &[u8]) -> Vec<u8> {
        let mut b = Vec::with_capacity(Self::SIZE + data.len());
        b.extend_from_slice(&self.address.to_le_bytes());
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
        let access = DmaAccess {
            address: c.u64()?,
            count: c.u64()?,
        };
        Ok((access, c.rest()))
    }
}
