//! Target `vfio_pci` (and the harness `vfio_msix` shares): the passthrough model
//! [`VfioPciDevice`] over a fake device ([`backend`]) with fuzz-chosen config bytes, BAR
//! regions (some mmap-able) and capability chain (MSI, MSI-X anywhere, loops, junk), driven by
//! guest config reads and writes of every shape and register, BAR sizing, firmware placement,
//! BAR accesses inside and around the MSI-X table and PBA, and the device raising vectors.
//! After every operation the harness does what the VMM does: routes the live vectors, calls
//! `release_pending` after a routing change, and (as KVM) drains the live vectors' eventfds.
//!
//! Invariants, against [`model`] (the PCI rules applied to the fake device's raw bytes):
//! - `new` succeeds exactly when every BAR has a size its kind allows;
//! - BAR registers read back through their write masks (all ones reads the size mask, flag
//!   bits never change), `bars()` and the `BarChange`s of each write are exactly the model's
//!   decoded windows and their changes, `place_bar` succeeds exactly when aligned and inside
//!   its space; the ROM BAR reads 0;
//! - no config write that reaches the device touches its BAR or ROM registers; every other
//!   well-formed write within the device's config space reaches it exactly once, unchanged;
//!   other registers read the device's own bytes, all ones past its config space;
//! - BAR accesses inside the MSI-X table or PBA never reach the device, all others do
//!   unchanged; mmap'ed BAR parts are page-aligned, inside their region and area, and never
//!   on a table or PBA page;
//! - MSI-X (`vfio_msix` drives it harder): the control dword reads the device's table size
//!   with the guest's enable and function mask; the table reads back what was written; a
//!   vector is routed exactly when enabled, unmasked and unmasked by function, with its
//!   entry's message, and never past the table; a vector raised while live is delivered, one
//!   raised while masked is not but shows in the PBA and is delivered once when unmasked;
//!   nothing is delivered for a vector that was not raised.

mod backend;
mod device;
mod model;
mod probes;

use std::sync::Arc;

use devices::pci::{Bar, PciDevice, RoutingChange};
use devices::vfio::{irq, VfioPciDevice};

use crate::Input;
use backend::{FakeBackend, Seen, State};
pub use device::Focus;
use device::{device, memfd};
use model::{lanes, Model, BAR0_REG, MSIX_ENABLE, MSIX_FMASK, ROM_REG};
pub use probes::seeds;

/// Runs one input with the device and operation mix `focus` picks.
pub fn run_with(data: &[u8], focus: Focus) {
    let mut input = Input::new(data);
    let d = device(&mut input, focus);
    let sizes = [0, 1, 2, 3, 4, 5].map(|i| d.bars[i].size);
    let want = Model::new(d.config_size, &d.cfg, sizes);
    let fd = d
        .bars
        .iter()
        .any(|b| !b.mmap_areas.is_empty())
        .then(memfd)
        .flatten();
    let backend = Arc::new(FakeBackend {
        config_size: d.config_size,
        bars: d.bars,
        mmap_fd: fd,
        state: std::sync::Mutex::new(State {
            config: d.cfg,
            ..State::default()
        }),
    });
    let result = VfioPciDevice::new(backend.clone());
    if let Some(fd) = fd {
        // SAFETY: closes the memfd this function opened; the mappings keep their own reference.
        unsafe { libc::close(fd) };
    }
    let (dev, m) = match (result, want) {
        (Ok(dev), Some(m)) => (dev, m),
        (Err(_), None) => return,
        (Err(devices::vfio::VfioPciError::Mmap { .. }), Some(_)) => return,
        (Ok(_), None) => panic!("a device with a BAR of impossible size was accepted"),
        (Err(e), Some(_)) => panic!("a presentable device was refused: {e}"),
    };
    let mut h = Harness {
        dev,
        backend,
        m,
        fired: Vec::new(),
        active: None,
    };
    h.check_mmaps();
    h.check_state();
    let mut ops = 0;
    while !input.is_empty() && ops < 256 {
        ops += 1;
        h.op(&mut input, focus);
        h.check_state();
    }
}

/// Runs one input (target `vfio_pci`).
pub fn run(data: &[u8]) {
    run_with(data, Focus::Config);
}

struct Harness {
    dev: VfioPciDevice,
    backend: Arc<FakeBackend>,
    m: Model,
    /// Vectors the device raised while another interrupt kind than MSI-X was active, not yet
    /// delivered: those may be delivered once.
    fired: Vec<usize>,
    active: Option<(u32, usize)>,
}

impl Harness {
    fn seen(&self) -> Vec<Seen> {
        std::mem::take(&mut self.backend.state().seen)
    }

    fn reg(&self, input: &mut Input<'_>) -> usize {
        match input.u8() {
            0xff => usize::MAX - usize::from(input.u8()),
            0xfe => usize::from(input.u16()),
            r => usize::from(r % 72),
        }
    }

    fn op(&mut self, input: &mut Input<'_>, focus: Focus) {
        let op = input.u8();
        let op = match focus {
            Focus::Config => op % 8,
            // Mostly the table, PBA, control and the device's vectors.
            Focus::Msix => [3, 4, 5, 6, 7, 4, 5, 6, 7, 0, 1][usize::from(op % 11)],
        };
        self.seen();
        match op {
            0 => {
                let reg = self.reg(input);
                self.config_read(reg);
            }
            1 => {
                let reg = self.reg(input);
                let offset = match input.u8() {
                    0xff => input.u64(),
                    o => u64::from(o % 4),
                };
                let data = input.access().to_vec();
                self.config_write(reg, offset, &data);
            }
            2 => {
                // BAR sizing, as a driver does it: all ones, read, restore.
                let reg = BAR0_REG + usize::from(input.u8() % 6);
                let old = self.dev.config_read(reg);
                self.config_write(reg, 0, &u32::MAX.to_le_bytes());
                let mask = self.config_read(reg);
                if let Some(b) = self.m.bars[reg - BAR0_REG] {
                    let size_bits = mask & !(b.flags | if b.flags & 1 != 0 { 3 } else { 0xf });
                    let want = (!(b.spec.size - 1)) as u32 & !0xf;
                    if b.spec.kind != devices::pci::BarKind::Io || b.spec.size >= 16 {
                        assert_eq!(size_bits & !0xf, want, "BAR{} sizing", reg - BAR0_REG);
                    }
                }
                self.config_write(reg, 0, &old.to_le_bytes());
            }
            3 => self.place(input),
            4 | 5 => {
                let (bar, offset) = self.bar_target(input);
                let len = input.width();
                if op == 4 {
                    self.bar_read(bar, offset, len);
                } else {
                    let data = input.bytes(len).to_vec();
                    self.bar_write(bar, offset, &data);
                }
            }
            6 => {
                let v = usize::from(input.u16() % 2050);
                self.fire(v);
            }
            _ => {
                // MSI-X Message Control: a word or its high byte.
                let Some(cap) = self.m.msix.as_ref().map(|x| x.cap) else {
                    return;
                };
                let v = input.u16();
                if input.bool() {
                    self.config_write(cap / 4, 2, &v.to_le_bytes());
                } else {
                    self.config_write(cap / 4, 3, &[(v >> 8) as u8]);
                }
            }
        }
    }

    fn bar_target(&self, input: &mut Input<'_>) -> (usize, u64) {
        let sel = input.u8();
        let window = self.m.msix.as_ref().map(|x| [x.table, x.pba]);
        match (sel % 4, window) {
            (0 | 1, Some(w)) => {
                let w = w[usize::from(sel % 2)];
                let span = w.len + 32;
                let off = (w.offset + u64::from(input.u16()) % span).saturating_sub(16);
                (w.bar, off)
            }
            (3, _) => (usize::from(input.u8() % 8), input.u64()),
            _ => (usize::from(input.u8() % 6), u64::from(input.u16())),
        }
    }

    fn config_read(&mut self, reg: usize) -> u32 {
        let got = self.dev.config_read(reg);
        let m = &self.m;
        let dev_dword = |r: usize| self.backend.config_dword(r);
        let past = (reg as u128 + 1) * 4 > u128::from(m.config_size);
        let want = match reg {
            r if (BAR0_REG..BAR0_REG + 6).contains(&r) => Some(m.bar_regs[r - BAR0_REG]),
            ROM_REG => Some(0),
            r if m.msix.as_ref().is_some_and(|x| r == x.cap / 4) => {
                let x = m.msix.as_ref().expect("checked");
                let bits =
                    u32::from(x.control) | u32::from(x.enabled) << 15 | u32::from(x.fmask) << 14;
                Some(dev_dword(r) & 0xffff | bits << 16)
            }
            r if m.irq_reg(r) => None,
            _ if past => Some(u32::MAX),
            r => Some(dev_dword(r)),
        };
        if let Some(want) = want {
            assert_eq!(got, want, "config register {reg:#x}");
        }
        got
    }

    fn config_write(&mut self, reg: usize, offset: u64, data: &[u8]) {
        let shape = lanes(offset, data);
        let mut want_bars = Vec::new();
        let mut want_msix = RoutingChange::Unchanged;
        let virtual_reg = (BAR0_REG..BAR0_REG + 6).contains(&reg) || reg == ROM_REG;
        if let Some((v, mask)) = shape {
            if (BAR0_REG..BAR0_REG + 6).contains(&reg) {
                want_bars = self.m.write_bar_reg(reg - BAR0_REG, v, mask);
            } else if reg == 1 {
                want_bars = self.m.write_command(v, mask);
            }
            if let Some(x) = self.m.msix.as_mut().filter(|x| reg == x.cap / 4) {
                let w = mask & u32::from(MSIX_ENABLE | MSIX_FMASK) << 16;
                let old = (x.enabled, x.fmask);
                let bits = (u32::from(x.enabled) << 31 | u32::from(x.fmask) << 30) & !w | v & w;
                (x.enabled, x.fmask) = (bits >> 31 != 0, bits >> 30 & 1 != 0);
                if (x.enabled, x.fmask) != old {
                    want_msix = RoutingChange::All;
                }
            }
        }
        let e = self.dev.config_write(reg, offset, data);
        assert_eq!(
            e.bars, want_bars,
            "BAR changes of a write to register {reg:#x}"
        );
        assert_eq!(
            e.msix, want_msix,
            "MSI-X change of a write to register {reg:#x}"
        );
        let seen = self.seen();
        for s in &seen {
            if let Seen::ConfigWrite { at, data } = s {
                let end = at.saturating_add(data.len() as u64);
                for (lo, hi) in [(0x10, 0x28), (0x30, 0x34)] {
                    assert!(
                        end <= lo || *at >= hi,
                        "a config write reached the device's registers [{lo:#x}, {hi:#x}): \
                         {data:?} at {at:#x}"
                    );
                }
            }
        }
        let inside = (reg as u128 * 4 + u128::from(offset) + data.len() as u128)
            <= u128::from(self.m.config_size);
        if shape.is_some() && !virtual_reg && inside {
            let want = Seen::ConfigWrite {
                at: reg as u64 * 4 + offset,
                data: data.to_vec(),
            };
            assert!(
                seen.iter().filter(|s| **s == want).count() == 1,
                "{want:?} reached the device as {seen:?}"
            );
        }
        self.after(e.msix.is_changed() || e.msi.is_changed(), &[]);
    }

    fn place(&mut self, input: &mut Input<'_>) {
        let i = usize::from(input.u8() % 7);
        let raw = input.u64();
        let addr = match (input.bool(), self.m.bars.get(i).copied().flatten()) {
            (true, Some(b)) => raw & !(b.spec.size - 1),
            _ => raw,
        };
        let want = self.m.place(i, addr);
        let got = self.dev.place_bar(i, addr);
        assert_eq!(got.is_ok(), want.is_some(), "place_bar({i}, {addr:#x})");
        if got.is_err() {
            assert!(
                self.seen().is_empty(),
                "a refused placement reached the device"
            );
        }
    }

    fn table_access(&self, bar: usize, offset: u64, len: usize) -> (Option<u64>, Option<u64>) {
        if !self.is_bar_index(bar) {
            return (None, None);
        }
        match &self.m.msix {
            Some(x) => (
                x.table.inner(bar, offset, len),
                x.pba.inner(bar, offset, len),
            ),
            None => (None, None),
        }
    }

    /// Whether `bar` is a BAR index at all (past BAR5 VFIO regions are the ROM and config
    /// space, which no BAR access may reach); an absent BAR's accesses go to the device,
    /// which refuses them as it sees fit.
    fn is_bar_index(&self, bar: usize) -> bool {
        bar < 6
    }

    fn bar_read(&mut self, bar: usize, offset: u64, len: usize) {
        let mut buf = vec![0u8; len];
        self.dev.bar_read(bar, offset, &mut buf);
        let seen = self.seen();
        if !self.is_bar_index(bar) {
            assert!(seen.is_empty(), "a read of BAR{bar} reached the device");
            assert!(buf.iter().all(|&b| b == 0xff), "BAR{bar} read");
            return;
        }
        let msix_active = self.active.is_some_and(|(i, _)| i == irq::MSIX);
        match self.table_access(bar, offset, len) {
            (Some(at), _) => {
                assert!(seen.is_empty(), "a table read reached the device");
                let x = self.m.msix.as_ref().expect("a table");
                let aligned =
                    matches!(len, 1 | 2 | 4) && at % 4 + len as u64 <= 4 || len == 8 && at % 8 == 0;
                if aligned {
                    for (i, &b) in buf.iter().enumerate() {
                        let want = x.table_byte(at + i as u64);
                        assert_eq!(b, want, "MSI-X table byte {:#x}", at + i as u64);
                    }
                }
            }
            (None, Some(at)) => {
                assert!(seen.is_empty(), "a PBA read reached the device");
                let x = self.m.msix.as_ref().expect("a PBA");
                for (i, &b) in buf.iter().enumerate() {
                    let bit0 = (at + i as u64) * 8;
                    let want = (0..8).fold(0u8, |acc, k| {
                        let v = (bit0 + k) as usize;
                        let set = msix_active && x.waiting.get(v) == Some(&true);
                        acc | u8::from(set) << k
                    });
                    assert_eq!(b, want, "PBA byte {:#x}", at + i as u64);
                }
            }
            (None, None) => {
                let want = Seen::BarRead { bar, offset, len };
                assert_eq!(seen, vec![want], "a BAR read outside the MSI-X structures");
                for (i, &b) in buf.iter().enumerate() {
                    assert_eq!(b, offset.wrapping_add(i as u64) as u8, "BAR read data");
                }
            }
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        let (table, pba) = self.table_access(bar, offset, data.len());
        let mut want_msix = RoutingChange::Unchanged;
        if let (Some(at), Some(x)) = (table, self.m.msix.as_mut()) {
            let e = (at / 16) as usize;
            // (An empty access may sit right at the table's end.)
            let old = x.entries.get(e).copied().unwrap_or_default();
            if matches!(data.len(), 1 | 2 | 4) && at % 4 + data.len() as u64 <= 4
                || data.len() == 8 && at % 8 == 0
            {
                for (i, &b) in data.iter().enumerate() {
                    let a = at + i as u64;
                    let word = &mut x.entries[e][(a % 16 / 4) as usize];
                    let shift = a % 4 * 8;
                    *word = *word & !(0xff << shift) | u32::from(b) << shift;
                }
            }
            if x.entries.get(e).is_some_and(|now| *now != old) {
                want_msix = RoutingChange::Vector(e as u16);
            }
        }
        let eff = self.dev.bar_write(bar, offset, data);
        if !self.is_bar_index(bar) {
            assert!(
                self.seen().is_empty(),
                "a write to BAR{bar} reached the device"
            );
            assert!(eff.is_empty(), "a write to BAR{bar} had effects");
            return;
        }
        assert_eq!(
            eff.msix, want_msix,
            "MSI-X change of a BAR{bar} write at {offset:#x}"
        );
        let seen = self.seen();
        if table.is_some() || pba.is_some() {
            assert!(
                seen.is_empty(),
                "an MSI-X table or PBA write reached the device"
            );
        } else {
            let want = Seen::BarWrite {
                bar,
                offset,
                data: data.to_vec(),
            };
            assert_eq!(seen, vec![want], "a BAR write outside the MSI-X structures");
        }
        self.after(eff.msix.is_changed(), &[]);
    }

    fn fire(&mut self, v: usize) {
        if !self.backend.fire(v) {
            return;
        }
        let mut now = Vec::new();
        match (&mut self.m.msix, self.active) {
            (Some(x), Some((irq::MSIX, _))) => {
                if x.live(v).is_some() {
                    now.push(v);
                } else if let Some(w) = x.waiting.get_mut(v) {
                    *w = true;
                }
            }
            _ => self.fired.push(v),
        }
        self.after(false, &now);
    }

    /// The VMM's part after an access: release pending vectors after a routing change; then
    /// KVM's: deliver what the live vectors' eventfds hold. `now` were raised while live.
    fn after(&mut self, routed: bool, now: &[usize]) {
        let active = self.backend.active();
        if active != self.active {
            // Pending state belongs to one interrupt kind.
            self.active = active;
            if let Some(x) = self.m.msix.as_mut() {
                x.waiting.fill(false);
            }
            self.fired.clear();
        }
        if routed {
            self.dev.release_pending();
        }
        let mut delivered = Vec::new();
        for vector in self.dev.irq_vectors() {
            if vector.message.is_some() && vector.fd.read().is_ok() {
                delivered.push(vector.vector);
            }
        }
        match (&mut self.m.msix, self.active) {
            (Some(x), Some((irq::MSIX, _))) => {
                let mut want: Vec<usize> = now.to_vec();
                for v in 0..x.count() {
                    if x.waiting[v] && x.live(v).is_some() {
                        x.waiting[v] = false;
                        want.push(v);
                    }
                }
                want.sort_unstable();
                assert_eq!(delivered, want, "MSI-X vectors delivered");
            }
            _ => {
                for v in delivered {
                    let at = self.fired.iter().position(|&f| f == v);
                    assert!(at.is_some(), "vector {v} delivered but never raised");
                    self.fired.retain(|&f| f != v);
                }
            }
        }
    }

    fn check_state(&mut self) {
        let want: Vec<Bar> = (0..6)
            .filter_map(|i| {
                let b = self.m.bars[i]?;
                Some(Bar {
                    index: i,
                    spec: b.spec,
                    addr: self.m.bar_addr(i),
                    decoding: self.m.decodes(i),
                })
            })
            .collect();
        assert_eq!(self.dev.bars(), want, "bars()");
        for b in &want {
            assert_eq!(b.addr % b.spec.size, 0, "BAR{} misaligned", b.index);
        }
        let msix_active = self.active.is_some_and(|(i, _)| i == irq::MSIX);
        if let Some(x) = &self.m.msix {
            let want = x.enabled.then_some((irq::MSIX, x.count()));
            if x.enabled || msix_active {
                assert_eq!(self.active, want, "the interrupt kind the device signals");
            }
        }
        for v in self.dev.irq_vectors() {
            let want = match (&self.m.msix, msix_active) {
                (Some(x), true) => x.live(v.vector),
                (_, false) if v.message.is_some() => {
                    // MSI: only its enabled vectors.
                    let n = self.active.map_or(0, |(_, n)| n);
                    assert!(v.vector < n, "MSI vector {} routed past {n}", v.vector);
                    continue;
                }
                _ => None,
            };
            let got = v.message.map(|m| {
                assert!(!m.masked, "a routed message is masked");
                (m.addr, m.data)
            });
            assert_eq!(got, want, "route of vector {}", v.vector);
        }
    }

    fn check_mmaps(&self) {
        const PAGE: u64 = 4096;
        for mm in self.dev.mmaps() {
            let bar = &self.backend.bars[mm.bar];
            assert!(mm.offset % PAGE == 0 && mm.size % PAGE == 0 && mm.size > 0);
            let end = mm.offset + mm.size;
            assert!(end <= bar.size, "mmap past BAR{}'s region", mm.bar);
            assert!(
                bar.mmap_areas
                    .iter()
                    .any(|a| a.offset <= mm.offset && end <= a.offset + a.size),
                "mmap outside every area"
            );
            if let Some(x) = &self.m.msix {
                for w in [x.table, x.pba].iter().filter(|w| w.bar == mm.bar) {
                    let lo = w.offset / PAGE * PAGE;
                    let hi = (w.offset + w.len).div_ceil(PAGE) * PAGE;
                    assert!(end <= lo || mm.offset >= hi, "mmap over an MSI-X page");
                }
            }
        }
    }
}
