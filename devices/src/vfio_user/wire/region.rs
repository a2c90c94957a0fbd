//! Region bodies: DEVICE_GET_REGION_INFO with its sparse-mmap capability, and the
//! REGION_READ/REGION_WRITE header.

use super::{Cursor, WireError, CAP_SPARSE_MMAP};

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
