//! The MSI-X capability and its table and Pending Bit Array, which live in a memory BAR.
//!
//! The capability in configuration space only carries the enable and function-mask bits; the
//! per-vector address, data and mask are in the table, which the guest writes through the BAR.
//! Both paths report a [`RoutingChange`] so the VMM can update KVM routes. The table is parsed
//! byte by byte, so any access width the guest uses lands in the right fields.

use super::config::{cap_id, BarKind, ConfigError, ConfigSpace};
use super::msi::{MsiMessage, RoutingChange};

mod pba;

pub use pba::Pba;

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
    pending: Pba,
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
        let pba_len = Pba::len_for(usize::from(vectors));
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
            pending: Pba::new(usize::from(vectors)),
            enabled: false,
            function_masked: false,
        })
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
        (self.pba, Pba::len_for(usize::from(self.num_vectors())))
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
        self.pending.read(offset, data)
    }

    /// Whether `vector` is pending.
    pub fn is_pending(&self, vector: u16) -> bool {
        self.pending.is_set(usize::from(vector))
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
            self.pending.set(usize::from(vector), true);
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
        let ready: Vec<(u16, MsiMessage)> = self
            .pending
            .iter()
            .filter_map(|v| self.message(v as u16).map(|m| (v as u16, m)))
            .filter(|(_, m)| !m.masked)
            .collect();
        for &(v, _) in &ready {
            self.pending.set(usize::from(v), false);
        }
        ready
    }
}

#[cfg(test)]
mod tests;
