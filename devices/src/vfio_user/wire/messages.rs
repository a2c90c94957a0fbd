//! Message bodies: VERSION (its capabilities are [`super::Capabilities`]), DMA_MAP,
//! DMA_UNMAP, DEVICE_GET_INFO, DEVICE_GET_IRQ_INFO, DEVICE_SET_IRQS and the
//! DMA_READ/DMA_WRITE header.

use super::{Cursor, WireError};

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
