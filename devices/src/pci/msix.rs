//! The MSI-X capability and its table and Pending Bit Array, which live in a memory BAR.
//!
//! The capability in configuration space only carries the enable and function-mask bits; the
//! per-vector address, data and mask are in the table, which the guest writes through the BAR.
//! Both paths report a [`RoutingChange`] so the VMM can update KVM routes. The table is parsed
//! byte by byte, so any access width the guest uses lands in the right fields.

use super::config::{cap_id, BarKind, ConfigError, ConfigSpace};
use super::msi::{MsiMessage, RoutingChange};

/// Most vectors an MSI-X table can have (11-bit table size field).
pub const MAX_VECTORS: u16 = 2048;
/// Bytes per table entry.
pub const ENTRY_SIZE: u64 = 16;
/// Bytes the capability occupies in configuration space.
pub const CAP_SIZE: usize = 12;

// Offsets inside the capability.
const MSG_CTRL: usize = 2;
const TABLE: usize = 4;
const PBA: usize = 8;

const CTRL_FUNCTION_MASK: u16 = 1 << 14;
const CTRL_ENABLE: u16 = 1 << 15;

/// Vector control bit 0: the vector is masked (set at reset).
const ENTRY_MASKED: u32 = 1;
/// Writable bits of the four dwords of an entry: address bits 1:0 and the reserved vector
/// control bits are read-only zero.
const ENTRY_WRITABLE: [u32; 4] = [0xffff_fffc, u32::MAX, u32::MAX, ENTRY_MASKED];

/// Where the table or the PBA lives: a memory BAR and an offset in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixLocation {
    /// BAR number.
    pub bar: usize,
    /// Byte offset in the BAR; 8-byte aligned.
    pub offset: u64,
}

/// Why an MSI-X capability could not be added.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MsixError {
    #[error("MSI-X supports 1 to {MAX_VECTORS} vectors, not {0}")]
    Vectors(u16),
    #[error("MSI-X {what} at BAR{bar} offset {offset:#x}: {reason}")]
    Placement {
        /// "table" or "PBA".
        what: &'static str,
        bar: usize,
        offset: u64,
        reason: &'static str,
    },
    #[error("adding the MSI-X capability: {0}")]
    Config(#[from] ConfigError),
}

/// What happened when the device signalled a vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Send this message now.
    Send(MsiMessage),
    /// The vector or the function is masked: its pending bit is set and it will be sent once
    /// unmasked (see [`MsixCap::take_deliverable`]).
    Pending,
    /// MSI-X is off: nothing is sent or remembered.
    Disabled,
    /// The table has no such vector.
    NoSuchVector,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry([u32; 4]);

impl Entry {
    const RESET: Entry = Entry([0, 0, 0, ENTRY_MASKED]);

    fn message(&self, function_masked: bool) -> MsiMessage {
        MsiMessage {
            addr: u64::from(self.0[1]) << 32 | u64::from(self.0[0]),
            data: self.0[2],
            masked: function_masked || self.0[3] & ENTRY_MASKED != 0,
        }
    }
}

/// The state of one function's MSI-X capability, table and PBA.
#[derive(Clone, Debug)]
pub struct MsixCap {
    offset: usize,
    table: MsixLocation,
    pba: MsixLocation,
    entries: Vec<Entry>,
    pending: Vec<u64>,
    enabled: bool,
    function_masked: bool,
}

fn check_location(
    config: &ConfigSpace,
    what: &'static str,
    loc: MsixLocation,
    len: u64,
) -> Result<(), MsixError> {
    let fail = |reason| MsixError::Placement {
        what,
        bar: loc.bar,
        offset: loc.offset,
        reason,
    };
    let bar = config
        .bar(loc.bar)
        .ok_or_else(|| fail("no such BAR is registered"))?;
    if bar.spec.kind == BarKind::Io {
        return Err(fail("the BAR is an I/O BAR"));
    }
    if loc.offset % 8 != 0 || loc.offset > u64::from(u32::MAX) {
        return Err(fail("the offset must be 8-byte aligned and below 4 GiB"));
    }
    if loc.offset + len > bar.spec.size {
        return Err(fail("it does not fit in the BAR"));
    }
    Ok(())
}

impl MsixCap {
    /// Adds an MSI-X capability with `vectors` entries whose table and PBA live at the given
    /// places, which must be inside registered memory BARs and must not overlap.
    pub fn add_to(
        config: &mut ConfigSpace,
        vectors: u16,
        table: MsixLocation,
        pba: MsixLocation,
    ) -> Result<Self, MsixError> {
        if vectors == 0 || vectors > MAX_VECTORS {
            return Err(MsixError::Vectors(vectors));
        }
        let table_len = u64::from(vectors) * ENTRY_SIZE;
        let pba_len = Self::pba_len_for(vectors);
        check_location(config, "table", table, table_len)?;
        check_location(config, "PBA", pba, pba_len)?;
        if table.bar == pba.bar
            && table.offset < pba.offset + pba_len
            && pba.offset < table.offset + table_len
        {
            return Err(MsixError::Placement {
                what: "PBA",
                bar: pba.bar,
                offset: pba.offset,
                reason: "it overlaps the table",
            });
        }
        let mut body = [0u8; CAP_SIZE - 2];
        body[..2].copy_from_slice(&(vectors - 1).to_le_bytes());
        body[2..6].copy_from_slice(&(table.offset as u32 | table.bar as u32).to_le_bytes());
        body[6..10].copy_from_slice(&(pba.offset as u32 | pba.bar as u32).to_le_bytes());
        let offset = config.add_capability(cap_id::MSIX, &body)?;
        config.set_writable(
            offset + MSG_CTRL,
            &(CTRL_ENABLE | CTRL_FUNCTION_MASK).to_le_bytes(),
        )?;
        debug_assert_eq!(config.read_u32(offset + TABLE) & 0x7, table.bar as u32);
        debug_assert_eq!(config.read_u32(offset + PBA) & 0x7, pba.bar as u32);
        Ok(MsixCap {
            offset,
            table,
            pba,
            entries: vec![Entry::RESET; usize::from(vectors)],
            pending: vec![0; usize::from(vectors).div_ceil(64)],
            enabled: false,
            function_masked: false,
        })
    }

    fn pba_len_for(vectors: u16) -> u64 {
        u64::from(vectors).div_ceil(64) * 8
    }

    /// Offset of the capability in configuration space.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Whether configuration register `reg` (dword index) overlaps the capability.
    pub fn contains_reg(&self, reg: usize) -> bool {
        let start = reg.saturating_mul(4);
        start < self.offset + CAP_SIZE && start.saturating_add(4) > self.offset
    }

    /// Re-reads enable and function mask after a guest config write.
    pub fn update(&mut self, config: &ConfigSpace) -> RoutingChange {
        let ctrl = config.read_u16(self.offset + MSG_CTRL);
        let enabled = ctrl & CTRL_ENABLE != 0;
        let function_masked = ctrl & CTRL_FUNCTION_MASK != 0;
        let changed = (enabled, function_masked) != (self.enabled, self.function_masked);
        let relevant = enabled || self.enabled;
        self.enabled = enabled;
        self.function_masked = function_masked;
        if changed && relevant {
            RoutingChange::All
        } else {
            RoutingChange::Unchanged
        }
    }

    /// Number of vectors (table entries).
    pub fn num_vectors(&self) -> u16 {
        self.entries.len() as u16
    }

    /// Whether the guest enabled MSI-X.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Where the table is, and its length in bytes.
    pub fn table(&self) -> (MsixLocation, u64) {
        (self.table, u64::from(self.num_vectors()) * ENTRY_SIZE)
    }

    /// Where the PBA is, and its length in bytes.
    pub fn pba(&self) -> (MsixLocation, u64) {
        (self.pba, Self::pba_len_for(self.num_vectors()))
    }

    /// Offset inside the table of an access at `offset` of BAR `bar`, if it starts there.
    pub fn table_offset(&self, bar: usize, offset: u64) -> Option<u64> {
        let (loc, len) = self.table();
        (bar == loc.bar && offset >= loc.offset && offset - loc.offset < len)
            .then(|| offset - loc.offset)
    }

    /// Offset inside the PBA of an access at `offset` of BAR `bar`, if it starts there.
    pub fn pba_offset(&self, bar: usize, offset: u64) -> Option<u64> {
        let (loc, len) = self.pba();
        (bar == loc.bar && offset >= loc.offset && offset - loc.offset < len)
            .then(|| offset - loc.offset)
    }

    fn entry_byte(&self, at: u64) -> Option<u8> {
        let entry = self.entries.get(usize::try_from(at / ENTRY_SIZE).ok()?)?;
        let word = entry.0[(at % ENTRY_SIZE / 4) as usize];
        Some((word >> (at % 4 * 8)) as u8)
    }

    /// A guest read of the table at `offset` (relative to the table). Bytes past the table
    /// read 0.
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|at| self.entry_byte(at))
                .unwrap_or(0);
        }
    }

    /// A guest write to the table at `offset` (relative to the table); bytes past the table
    /// are dropped. Says which vectors' routing changed.
    pub fn table_write(&mut self, offset: u64, data: &[u8]) -> RoutingChange {
        let mut change = RoutingChange::Unchanged;
        for (i, &b) in data.iter().enumerate() {
            let Some(at) = offset.checked_add(i as u64) else {
                break;
            };
            let Ok(index) = usize::try_from(at / ENTRY_SIZE) else {
                break;
            };
            let Some(entry) = self.entries.get_mut(index) else {
                break;
            };
            let word = (at % ENTRY_SIZE / 4) as usize;
            let shift = at % 4 * 8;
            let writable = ENTRY_WRITABLE[word] & (0xff << shift);
            let old = entry.0[word];
            entry.0[word] = (old & !writable) | ((u32::from(b) << shift) & writable);
            if entry.0[word] != old {
                change = change.merge(RoutingChange::Vector(index as u16));
            }
        }
        change
    }

    /// A guest read of the PBA at `offset` (relative to the PBA). The PBA is read-only.
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset.saturating_add(i as u64);
            *b = usize::try_from(at / 8)
                .ok()
                .and_then(|q| self.pending.get(q))
                .map_or(0, |q| (q >> (at % 8 * 8)) as u8);
        }
    }

    /// Whether `vector` is pending.
    pub fn is_pending(&self, vector: u16) -> bool {
        let v = usize::from(vector);
        self.pending
            .get(v / 64)
            .is_some_and(|q| q & (1 << (v % 64)) != 0)
    }

    fn set_pending(&mut self, vector: u16, pending: bool) {
        let v = usize::from(vector);
        if let Some(q) = self.pending.get_mut(v / 64) {
            if pending {
                *q |= 1 << (v % 64);
            } else {
                *q &= !(1 << (v % 64));
            }
        }
    }

    /// `vector`'s message, with `masked` covering the function mask too.
    pub fn message(&self, vector: u16) -> Option<MsiMessage> {
        self.entries
            .get(usize::from(vector))
            .map(|e| e.message(self.function_masked))
    }

    /// Every vector and its message while MSI-X is enabled; nothing while it is off.
    pub fn vectors(&self) -> impl Iterator<Item = (u16, MsiMessage)> + '_ {
        let n = if self.enabled { self.num_vectors() } else { 0 };
        (0..n).filter_map(|v| self.message(v).map(|m| (v, m)))
    }

    /// The device signals `vector`: send it, or remember it while it is masked.
    pub fn trigger(&mut self, vector: u16) -> Delivery {
        let Some(msg) = self.message(vector) else {
            return Delivery::NoSuchVector;
        };
        if !self.enabled {
            return Delivery::Disabled;
        }
        if msg.masked {
            self.set_pending(vector, true);
            return Delivery::Pending;
        }
        Delivery::Send(msg)
    }

    /// Pending vectors that are no longer masked, with their messages; their pending bits are
    /// cleared. Call after a [`RoutingChange`] to send what was held back.
    pub fn take_deliverable(&mut self) -> Vec<(u16, MsiMessage)> {
        if !self.enabled {
            return Vec::new();
        }
        let ready: Vec<(u16, MsiMessage)> = (0..self.num_vectors())
            .filter(|&v| self.is_pending(v))
            .filter_map(|v| self.message(v).map(|m| (v, m)))
            .filter(|(_, m)| !m.masked)
            .collect();
        for &(v, _) in &ready {
            self.set_pending(v, false);
        }
        ready
    }
}

#[cfg(test)]
mod tests {
    use super::super::config::{BarSpec, PciHeader};
    use super::*;

    fn config() -> ConfigSpace {
        let mut cs = ConfigSpace::new(&PciHeader {
            vendor_id: 1,
            device_id: 2,
            ..PciHeader::default()
        });
        cs.add_bar(
            0,
            BarSpec {
                kind: BarKind::Memory32,
                size: 0x1000,
                prefetchable: false,
            },
        )
        .unwrap();
        cs.add_bar(
            1,
            BarSpec {
                kind: BarKind::Io,
                size: 0x100,
                prefetchable: false,
            },
        )
        .unwrap();
        cs
    }

    const TABLE_AT: MsixLocation = MsixLocation {
        bar: 0,
        offset: 0x400,
    };
    const PBA_AT: MsixLocation = MsixLocation {
        bar: 0,
        offset: 0x800,
    };

    fn msix(vectors: u16) -> (ConfigSpace, MsixCap) {
        let mut cs = config();
        let m = MsixCap::add_to(&mut cs, vectors, TABLE_AT, PBA_AT).unwrap();
        (cs, m)
    }

    fn set_ctrl(cs: &mut ConfigSpace, m: &mut MsixCap, ctrl: u16) -> RoutingChange {
        let at = m.offset() + MSG_CTRL;
        cs.write_reg(at / 4, (at % 4) as u64, &ctrl.to_le_bytes());
        assert!(m.contains_reg(at / 4));
        m.update(cs)
    }

    fn program(m: &mut MsixCap, v: u16, addr: u64, data: u32, masked: bool) {
        let base = u64::from(v) * ENTRY_SIZE;
        m.table_write(base, &(addr as u32).to_le_bytes());
        m.table_write(base + 4, &((addr >> 32) as u32).to_le_bytes());
        m.table_write(base + 8, &data.to_le_bytes());
        m.table_write(base + 12, &u32::from(masked).to_le_bytes());
    }

    #[test]
    fn capability_layout() {
        let (mut cs, mut m) = msix(20);
        let at = m.offset();
        assert_eq!(cs.capabilities(), [(cap_id::MSIX, at)]);
        assert_eq!(cs.read_u16(at + MSG_CTRL), 19);
        assert_eq!(cs.read_u32(at + TABLE), 0x400);
        assert_eq!(cs.read_u32(at + PBA), 0x800);
        // The table size and the BIR/offset fields are read-only.
        set_ctrl(&mut cs, &mut m, 0xffff);
        assert_eq!(cs.read_u16(at + MSG_CTRL), 0xc000 | 19);
        cs.write_reg((at + TABLE) / 4, 0, &[0; 4]);
        assert_eq!(cs.read_u32(at + TABLE), 0x400);
        assert_eq!(m.table(), (TABLE_AT, 20 * 16));
        assert_eq!(m.pba(), (PBA_AT, 8));
        assert_eq!(m.table_offset(0, 0x410), Some(0x10));
        assert_eq!(m.table_offset(0, 0x400 + 20 * 16), None);
        assert_eq!(m.table_offset(1, 0x410), None);
        assert_eq!(m.pba_offset(0, 0x804), Some(4));
        assert_eq!(m.pba_offset(0, 0x808), None);
    }

    #[test]
    fn placement_rules() {
        let mut cs = config();
        let at = |bar, offset| MsixLocation { bar, offset };
        assert_eq!(
            MsixCap::add_to(&mut cs, 0, TABLE_AT, PBA_AT).unwrap_err(),
            MsixError::Vectors(0)
        );
        assert_eq!(
            MsixCap::add_to(&mut cs, 2049, TABLE_AT, PBA_AT).unwrap_err(),
            MsixError::Vectors(2049)
        );
        let reason = |r: Result<MsixCap, MsixError>| match r.unwrap_err() {
            MsixError::Placement { reason, .. } => reason,
            e => panic!("unexpected {e}"),
        };
        assert_eq!(
            reason(MsixCap::add_to(&mut cs, 4, at(2, 0), PBA_AT)),
            "no such BAR is registered"
        );
        assert_eq!(
            reason(MsixCap::add_to(&mut cs, 4, at(1, 0), PBA_AT)),
            "the BAR is an I/O BAR"
        );
        assert_eq!(
            reason(MsixCap::add_to(&mut cs, 4, at(0, 0x404), PBA_AT)),
            "the offset must be 8-byte aligned and below 4 GiB"
        );
        assert_eq!(
            reason(MsixCap::add_to(&mut cs, 256, TABLE_AT, PBA_AT)),
            "it does not fit in the BAR"
        );
        assert_eq!(
            reason(MsixCap::add_to(&mut cs, 4, TABLE_AT, at(0, 0x438))),
            "it overlaps the table"
        );
        // Nothing was added by the failed attempts.
        assert!(cs.capabilities().is_empty());
        MsixCap::add_to(&mut cs, 4, TABLE_AT, at(0, 0x440)).unwrap();
    }

    #[test]
    fn table_writes_report_the_vector() {
        let (mut cs, mut m) = msix(4);
        // Entries reset masked.
        assert!(m.message(3).unwrap().masked);
        assert_eq!(
            m.table_write(16 + 8, &0x55u32.to_le_bytes()),
            RoutingChange::Vector(1)
        );
        // Rewriting the same value changes nothing.
        assert_eq!(
            m.table_write(16 + 8, &0x55u32.to_le_bytes()),
            RoutingChange::Unchanged
        );
        // A 64-bit address write in one access.
        assert_eq!(
            m.table_write(32, &0x1_fee0_0004u64.to_le_bytes()),
            RoutingChange::Vector(2)
        );
        // Byte-wide write to the vector control clears the mask.
        assert_eq!(m.table_write(32 + 12, &[0]), RoutingChange::Vector(2));
        // An access spanning two entries changes both.
        assert_eq!(m.table_write(8, &[1; 16]), RoutingChange::All);
        // Reserved bits read 0: address bits 1:0, vector control bits 31:1.
        let mut b = [0u8; 16];
        m.table_read(32, &mut b);
        assert_eq!(u32::from_le_bytes(b[0..4].try_into().unwrap()), 0xfee0_0004);
        assert_eq!(u32::from_le_bytes(b[4..8].try_into().unwrap()), 1);
        assert_eq!(u32::from_le_bytes(b[12..16].try_into().unwrap()), 0);
        m.table_read(12, &mut b[..4]);
        assert_eq!(u32::from_le_bytes(b[..4].try_into().unwrap()), 1);
        // Past the table: reads 0, writes dropped.
        let mut b = [0xaau8; 8];
        m.table_read(4 * 16, &mut b);
        assert_eq!(b, [0; 8]);
        assert_eq!(m.table_write(4 * 16, &[0xff; 8]), RoutingChange::Unchanged);
        assert_eq!(
            m.table_write(u64::MAX, &[0xff; 8]),
            RoutingChange::Unchanged
        );
        m.table_read(u64::MAX - 2, &mut b);
        // Nothing routes while MSI-X is off.
        assert_eq!(m.vectors().count(), 0);
        assert_eq!(set_ctrl(&mut cs, &mut m, CTRL_ENABLE), RoutingChange::All);
        assert_eq!(m.vectors().count(), 4);
    }

    #[test]
    fn enable_and_function_mask() {
        let (mut cs, mut m) = msix(2);
        program(&mut m, 0, 0xfee0_0000, 0x40, false);
        program(&mut m, 1, 0xfee0_1000, 0x41, true);
        // Function mask while disabled is not a routing change.
        assert_eq!(
            set_ctrl(&mut cs, &mut m, CTRL_FUNCTION_MASK),
            RoutingChange::Unchanged
        );
        assert_eq!(
            set_ctrl(&mut cs, &mut m, CTRL_ENABLE | CTRL_FUNCTION_MASK),
            RoutingChange::All
        );
        assert!(m.enabled() && m.function_masked);
        assert!(m.vectors().all(|(_, msg)| msg.masked));
        assert_eq!(set_ctrl(&mut cs, &mut m, CTRL_ENABLE), RoutingChange::All);
        let v: Vec<_> = m.vectors().collect();
        assert_eq!(
            v,
            [
                (
                    0,
                    MsiMessage {
                        addr: 0xfee0_0000,
                        data: 0x40,
                        masked: false
                    }
                ),
                (
                    1,
                    MsiMessage {
                        addr: 0xfee0_1000,
                        data: 0x41,
                        masked: true
                    }
                )
            ]
        );
        assert_eq!(
            set_ctrl(&mut cs, &mut m, CTRL_ENABLE),
            RoutingChange::Unchanged
        );
    }

    #[test]
    fn masked_vectors_pend_until_unmasked() {
        // 70 vectors: the table runs to 0x860, and the PBA needs two qwords.
        let mut cs = config();
        let pba = MsixLocation {
            bar: 0,
            offset: 0xc00,
        };
        let mut m = MsixCap::add_to(&mut cs, 70, TABLE_AT, pba).unwrap();
        assert_eq!(m.pba(), (pba, 16));
        program(&mut m, 0, 0xfee0_0000, 0x40, false);
        program(&mut m, 65, 0xfee0_2000, 0x42, true);
        assert_eq!(m.trigger(0), Delivery::Disabled);
        assert_eq!(m.trigger(70), Delivery::NoSuchVector);
        set_ctrl(&mut cs, &mut m, CTRL_ENABLE);
        assert!(matches!(m.trigger(0), Delivery::Send(msg) if msg.data == 0x40));
        assert_eq!(m.trigger(65), Delivery::Pending);
        assert!(m.is_pending(65));
        // PBA bit 65 is bit 1 of the second qword.
        let mut q = [0u8; 8];
        m.pba_read(8, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0x2);
        m.pba_read(0, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0);
        assert!(m.take_deliverable().is_empty(), "still masked");
        // Function mask holds vector 0 too.
        set_ctrl(&mut cs, &mut m, CTRL_ENABLE | CTRL_FUNCTION_MASK);
        assert_eq!(m.trigger(0), Delivery::Pending);
        assert!(m.take_deliverable().is_empty());
        set_ctrl(&mut cs, &mut m, CTRL_ENABLE);
        let ready = m.take_deliverable();
        assert_eq!(ready.len(), 1);
        assert_eq!(ready[0].0, 0);
        assert!(!m.is_pending(0));
        // Unmasking vector 65 releases it.
        assert_eq!(m.table_write(65 * 16 + 12, &[0]), RoutingChange::Vector(65));
        let ready = m.take_deliverable();
        assert_eq!(ready.iter().map(|r| r.0).collect::<Vec<_>>(), [65]);
        assert!(m.take_deliverable().is_empty());
        m.pba_read(8, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0);
    }
}
