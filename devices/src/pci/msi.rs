//! The MSI capability (64-bit addresses, optional per-vector masking) and the message type
//! shared with MSI-X.
//!
//! The configuration space holds the capability's bytes and its write masks, so a guest
//! cannot change the read-only fields; [`MsiCap`] re-reads them after every write that touches
//! the capability and says whether the routing the VMM programmed into KVM is now stale.

use super::config::{cap_id, ConfigError, ConfigSpace};

/// One interrupt message: what the device writes, where, and whether it may now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    /// Message address.
    pub addr: u64,
    /// Message data.
    pub data: u32,
    /// The vector is masked: the device must hold (pend) it instead of sending it.
    pub masked: bool,
}

/// What a guest write did to the interrupt routing of a device, so the VMM knows whether to
/// update its KVM GSI routes and irqfds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RoutingChange {
    /// Nothing that affects delivery changed.
    #[default]
    Unchanged,
    /// Only this vector's message or mask changed.
    Vector(u16),
    /// Enable, function mask, vector count or several vectors changed: re-read them all.
    All,
}

impl RoutingChange {
    /// The change covering both `self` and `other`.
    pub fn merge(self, other: RoutingChange) -> RoutingChange {
        match (self, other) {
            (RoutingChange::Unchanged, x) | (x, RoutingChange::Unchanged) => x,
            (RoutingChange::Vector(a), RoutingChange::Vector(b)) if a == b => self,
            _ => RoutingChange::All,
        }
    }

    /// Whether anything changed.
    pub fn is_changed(self) -> bool {
        self != RoutingChange::Unchanged
    }
}

// Offsets inside the capability, 64-bit layout.
const MSG_CTRL: usize = 2;
const ADDR_LO: usize = 4;
const ADDR_HI: usize = 8;
const DATA: usize = 0xc;
const MASK: usize = 0x10;
const PENDING: usize = 0x14;

const CTRL_ENABLE: u16 = 1 << 0;
const CTRL_MMC_SHIFT: u16 = 1;
const CTRL_MME_SHIFT: u16 = 4;
const CTRL_MME: u16 = 0x7 << CTRL_MME_SHIFT;
const CTRL_64BIT: u16 = 1 << 7;
const CTRL_PER_VECTOR_MASK: u16 = 1 << 8;

/// Why an MSI capability could not be added.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MsiError {
    #[error("MSI supports 1, 2, 4, 8, 16 or 32 vectors, not {0}")]
    Vectors(u16),
    #[error("adding the MSI capability: {0}")]
    Config(#[from] ConfigError),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct State {
    enabled: bool,
    /// log2 of the vectors the guest enabled (Multiple Message Enable), as written.
    mme: u8,
    addr: u64,
    data: u16,
    mask: u32,
}

/// The state of one function's MSI capability.
#[derive(Clone, Debug)]
pub struct MsiCap {
    offset: usize,
    vectors: u16,
    per_vector_mask: bool,
    state: State,
}

impl MsiCap {
    /// Adds an MSI capability offering `vectors` (1, 2, 4, .. 32) to `config`.
    pub fn add_to(
        config: &mut ConfigSpace,
        vectors: u16,
        per_vector_mask: bool,
    ) -> Result<Self, MsiError> {
        if !vectors.is_power_of_two() || vectors > 32 {
            return Err(MsiError::Vectors(vectors));
        }
        let mmc = vectors.trailing_zeros() as u16;
        let mut ctrl = mmc << CTRL_MMC_SHIFT | CTRL_64BIT;
        if per_vector_mask {
            ctrl |= CTRL_PER_VECTOR_MASK;
        }
        let size = Self::size_for(per_vector_mask);
        let mut body = vec![0u8; size - 2];
        body[..2].copy_from_slice(&ctrl.to_le_bytes());
        let offset = config.add_capability(cap_id::MSI, &body)?;
        config.set_writable(offset + MSG_CTRL, &(CTRL_ENABLE | CTRL_MME).to_le_bytes())?;
        // Message addresses are dword aligned: bits 1:0 are reserved.
        config.set_writable(offset + ADDR_LO, &0xffff_fffcu32.to_le_bytes())?;
        config.set_writable(offset + ADDR_HI, &u32::MAX.to_le_bytes())?;
        config.set_writable(offset + DATA, &u16::MAX.to_le_bytes())?;
        if per_vector_mask {
            let implemented = u32::MAX >> (32 - u32::from(vectors));
            config.set_writable(offset + MASK, &implemented.to_le_bytes())?;
        }
        Ok(MsiCap {
            offset,
            vectors,
            per_vector_mask,
            state: State::default(),
        })
    }

    fn size_for(per_vector_mask: bool) -> usize {
        if per_vector_mask {
            0x18
        } else {
            0x0e
        }
    }

    /// Offset of the capability in configuration space.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Bytes the capability occupies.
    pub fn size(&self) -> usize {
        Self::size_for(self.per_vector_mask)
    }

    /// Whether configuration register `reg` (dword index) overlaps the capability.
    pub fn contains_reg(&self, reg: usize) -> bool {
        let start = reg.saturating_mul(4);
        start < self.offset + self.size() && start.saturating_add(4) > self.offset
    }

    fn read(config: &ConfigSpace, offset: usize) -> State {
        let ctrl = config.read_u16(offset + MSG_CTRL);
        State {
            enabled: ctrl & CTRL_ENABLE != 0,
            mme: ((ctrl & CTRL_MME) >> CTRL_MME_SHIFT) as u8,
            addr: u64::from(config.read_u32(offset + ADDR_HI)) << 32
                | u64::from(config.read_u32(offset + ADDR_LO)),
            data: config.read_u16(offset + DATA),
            mask: config.read_u32(offset + MASK),
        }
    }

    /// Re-reads the capability after a guest write and says what changed for delivery.
    pub fn update(&mut self, config: &ConfigSpace) -> RoutingChange {
        let mut new = Self::read(config, self.offset);
        if !self.per_vector_mask {
            new.mask = 0;
        }
        let old = std::mem::replace(&mut self.state, new);
        if !old.enabled && !new.enabled {
            return RoutingChange::Unchanged;
        }
        if (old.enabled, old.mme, old.addr, old.data) != (new.enabled, new.mme, new.addr, new.data)
        {
            return RoutingChange::All;
        }
        let flipped = old.mask ^ new.mask;
        match flipped.count_ones() {
            0 => RoutingChange::Unchanged,
            1 => RoutingChange::Vector(flipped.trailing_zeros() as u16),
            _ => RoutingChange::All,
        }
    }

    /// Whether the guest enabled MSI.
    pub fn enabled(&self) -> bool {
        self.state.enabled
    }

    /// Vectors the capability offers.
    pub fn supported_vectors(&self) -> u16 {
        self.vectors
    }

    /// Vectors the guest enabled (0 while MSI is off). A Multiple Message Enable above what
    /// the capability offers is clamped.
    pub fn enabled_vectors(&self) -> u16 {
        if !self.state.enabled {
            return 0;
        }
        (1u16 << self.state.mme).min(self.vectors)
    }

    /// The message for `vector`, if it is enabled. With several vectors the device sets the
    /// low bits of the data to the vector number.
    pub fn message(&self, vector: u16) -> Option<MsiMessage> {
        let n = self.enabled_vectors();
        if vector >= n {
            return None;
        }
        let data = (self.state.data & !(n - 1)) | vector;
        Some(MsiMessage {
            addr: self.state.addr,
            data: u32::from(data),
            masked: self.state.mask & (1 << vector) != 0,
        })
    }

    /// The enabled vectors and their messages (none while MSI is off).
    pub fn vectors(&self) -> impl Iterator<Item = (u16, MsiMessage)> + '_ {
        (0..self.enabled_vectors()).filter_map(|v| self.message(v).map(|m| (v, m)))
    }

    /// Device-side: records whether `vector` is pending (only with per-vector masking, where
    /// the Pending Bits register exists).
    pub fn set_pending(&self, config: &mut ConfigSpace, vector: u16, pending: bool) {
        if !self.per_vector_mask || vector >= self.vectors {
            return;
        }
        let at = self.offset + PENDING;
        let bits = config.read_u32(at);
        let bits = if pending {
            bits | 1 << vector
        } else {
            bits & !(1 << vector)
        };
        config.set_u32(at, bits);
    }
}

#[cfg(test)]
mod tests {
    use super::super::config::PciHeader;
    use super::*;

    fn config() -> ConfigSpace {
        ConfigSpace::new(&PciHeader {
            vendor_id: 1,
            device_id: 2,
            ..PciHeader::default()
        })
    }

    /// A guest write through the masks, then the capability update, as a device does it.
    fn guest_write(
        cs: &mut ConfigSpace,
        msi: &mut MsiCap,
        at: usize,
        data: &[u8],
    ) -> RoutingChange {
        cs.write_reg(at / 4, (at % 4) as u64, data);
        assert!(msi.contains_reg(at / 4));
        msi.update(cs)
    }

    #[test]
    fn layout_and_read_only_fields() {
        let mut cs = config();
        let mut msi = MsiCap::add_to(&mut cs, 8, true).unwrap();
        let at = msi.offset();
        assert_eq!(cs.capabilities(), [(cap_id::MSI, at)]);
        // MMC = 3 (8 vectors), 64-bit, per-vector masking.
        assert_eq!(cs.read_u16(at + MSG_CTRL), 3 << 1 | 1 << 7 | 1 << 8);
        // The guest cannot change MMC, the 64-bit flag or the PVM flag.
        guest_write(&mut cs, &mut msi, at + MSG_CTRL, &0xffffu16.to_le_bytes());
        assert_eq!(
            cs.read_u16(at + MSG_CTRL),
            0x7 << 4 | 1 | 3 << 1 | 1 << 7 | 1 << 8
        );
        // Address bits 1:0 are reserved; only 8 mask bits are implemented; pending is RO.
        guest_write(&mut cs, &mut msi, at + ADDR_LO, &u32::MAX.to_le_bytes());
        assert_eq!(cs.read_u32(at + ADDR_LO), 0xffff_fffc);
        guest_write(&mut cs, &mut msi, at + MASK, &u32::MAX.to_le_bytes());
        assert_eq!(cs.read_u32(at + MASK), 0xff);
        guest_write(&mut cs, &mut msi, at + PENDING, &u32::MAX.to_le_bytes());
        assert_eq!(cs.read_u32(at + PENDING), 0);
        msi.set_pending(&mut cs, 3, true);
        assert_eq!(cs.read_u32(at + PENDING), 0x8);
        msi.set_pending(&mut cs, 3, false);
        assert_eq!(cs.read_u32(at + PENDING), 0);
        assert!(!msi.contains_reg(at / 4 + 6));
        assert!(!msi.contains_reg(at / 4 - 1));
        assert!(!msi.contains_reg(usize::MAX));
    }

    #[test]
    fn vector_counts_are_checked() {
        let mut cs = config();
        assert_eq!(
            MsiCap::add_to(&mut cs, 3, false).unwrap_err(),
            MsiError::Vectors(3)
        );
        assert_eq!(
            MsiCap::add_to(&mut cs, 64, false).unwrap_err(),
            MsiError::Vectors(64)
        );
        assert_eq!(
            MsiCap::add_to(&mut cs, 0, false).unwrap_err(),
            MsiError::Vectors(0)
        );
        let msi = MsiCap::add_to(&mut cs, 1, false).unwrap();
        assert_eq!(msi.size(), 0x0e);
        assert_eq!(cs.read_u16(msi.offset() + MSG_CTRL), 1 << 7);
    }

    #[test]
    fn messages_follow_guest_programming() {
        let mut cs = config();
        let mut msi = MsiCap::add_to(&mut cs, 4, true).unwrap();
        let at = msi.offset();
        // Programming while disabled changes nothing the VMM must act on.
        let addr = 0x1_fee0_1000u64;
        assert_eq!(
            guest_write(
                &mut cs,
                &mut msi,
                at + ADDR_LO,
                &(addr as u32).to_le_bytes()
            ),
            RoutingChange::Unchanged
        );
        guest_write(
            &mut cs,
            &mut msi,
            at + ADDR_HI,
            &((addr >> 32) as u32).to_le_bytes(),
        );
        guest_write(&mut cs, &mut msi, at + DATA, &0x4321u16.to_le_bytes());
        assert_eq!(msi.vectors().count(), 0);
        assert_eq!(msi.message(0), None);
        // Enable with MME = 2 (4 vectors).
        let change = guest_write(&mut cs, &mut msi, at + MSG_CTRL, &0x21u16.to_le_bytes());
        assert_eq!(change, RoutingChange::All);
        assert_eq!(msi.enabled_vectors(), 4);
        let v: Vec<_> = msi.vectors().collect();
        assert_eq!(v.len(), 4);
        assert_eq!(
            v[2],
            (
                2,
                MsiMessage {
                    addr,
                    data: 0x4322,
                    masked: false
                }
            )
        );
        // Masking one vector is a one-vector change.
        let change = guest_write(&mut cs, &mut msi, at + MASK, &[0x2]);
        assert_eq!(change, RoutingChange::Vector(1));
        assert!(msi.message(1).unwrap().masked);
        assert_eq!(
            guest_write(&mut cs, &mut msi, at + MASK, &[0x2]),
            RoutingChange::Unchanged
        );
        assert_eq!(
            guest_write(&mut cs, &mut msi, at + MASK, &[0xd]),
            RoutingChange::All
        );
        // MME above the offered count is clamped; disabling drops every vector.
        guest_write(&mut cs, &mut msi, at + MSG_CTRL, &0x71u16.to_le_bytes());
        assert_eq!(msi.enabled_vectors(), 4);
        let change = guest_write(&mut cs, &mut msi, at + MSG_CTRL, &0u16.to_le_bytes());
        assert_eq!(change, RoutingChange::All);
        assert_eq!(msi.vectors().count(), 0);
    }

    #[test]
    fn single_vector_without_masking() {
        let mut cs = config();
        let mut msi = MsiCap::add_to(&mut cs, 1, false).unwrap();
        let at = msi.offset();
        guest_write(
            &mut cs,
            &mut msi,
            at + ADDR_LO,
            &0xfee0_0000u32.to_le_bytes(),
        );
        guest_write(&mut cs, &mut msi, at + DATA, &0x31u16.to_le_bytes());
        guest_write(&mut cs, &mut msi, at + MSG_CTRL, &1u16.to_le_bytes());
        assert_eq!(
            msi.vectors().collect::<Vec<_>>(),
            [(
                0,
                MsiMessage {
                    addr: 0xfee0_0000,
                    data: 0x31,
                    masked: false
                }
            )]
        );
    }

    #[test]
    fn routing_changes_merge() {
        use RoutingChange::*;
        assert_eq!(Unchanged.merge(Vector(3)), Vector(3));
        assert_eq!(Vector(3).merge(Unchanged), Vector(3));
        assert_eq!(Vector(3).merge(Vector(3)), Vector(3));
        assert_eq!(Vector(3).merge(Vector(4)), All);
        assert_eq!(All.merge(Unchanged), All);
        assert!(!Unchanged.is_changed());
    }
}
