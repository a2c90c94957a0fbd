//! PCI Express enhanced configuration access (ECAM, "MMCONFIG"): the configuration space of
//! every function as memory, 4 KiB each, so the extended space (0x100..0x1000) that
//! mechanism #1 cannot reach is reachable too.
//!
//! [`PciEcam`] is a [`BusDevice`] for the VMM's MMIO bus over the same [`PciBus`] as
//! [`super::PciConfigIo`]: the offset into the window is `bus << 20 | device << 15 |
//! function << 12 | register`. Only bus 0 exists; anything the window decodes for another bus
//! reads all ones and drops writes. The OS learns the window from the ACPI MCFG table.

use std::fmt;
use std::sync::Arc;

use super::bus::{EffectsHandler, PciAddress, PciBus};
use crate::bus::BusDevice;

/// Bytes of window per bus: 32 devices x 8 functions x 4 KiB.
pub const ECAM_BUS_SIZE: u64 = 1 << 20;

/// The ECAM window for bus 0 (and, if registered larger, all ones for the buses above).
pub struct PciEcam {
    bus: Arc<PciBus>,
    on_effects: Option<EffectsHandler>,
}

impl fmt::Debug for PciEcam {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PciEcam").field("bus", &self.bus).finish()
    }
}

impl PciEcam {
    /// The window for `bus`; what config writes change is dropped until a handler is set.
    pub fn new(bus: Arc<PciBus>) -> Self {
        PciEcam {
            bus,
            on_effects: None,
        }
    }

    /// Hands what config writes change to `handler` (the same one the ports use).
    pub fn with_effects_handler(mut self, handler: EffectsHandler) -> Self {
        self.on_effects = Some(handler);
        self
    }

    /// The function, dword register index and byte offset in it that an access of `len`
    /// bytes at `offset` selects, if it is a 1, 2 or 4-byte access inside one dword of bus 0.
    fn target(offset: u64, len: usize) -> Option<(PciAddress, usize, u64)> {
        let at = offset & 3;
        let shaped = matches!(len, 1 | 2 | 4) && at + len as u64 <= 4;
        if !shaped || offset >> 20 != 0 {
            return None;
        }
        let addr = PciAddress {
            bus: 0,
            device: ((offset >> 15) & 0x1f) as u8,
            function: ((offset >> 12) & 0x7) as u8,
        };
        Some((addr, ((offset & 0xfff) >> 2) as usize, at))
    }

    fn read_part(&self, offset: u64, data: &mut [u8]) {
        match Self::target(offset, data.len()) {
            Some((addr, reg, at)) => {
                let value = self.bus.config_read(addr, reg).to_le_bytes();
                data.copy_from_slice(&value[at as usize..at as usize + data.len()]);
            }
            None => data.fill(0xff),
        }
    }

    fn write_part(&self, offset: u64, data: &[u8]) {
        let Some((addr, reg, at)) = Self::target(offset, data.len()) else {
            return;
        };
        let effects = self.bus.config_write(addr, reg, at, data);
        if let Some(handler) = self.on_effects.as_ref().filter(|_| !effects.is_empty()) {
            handler(addr, effects);
        }
    }
}

impl BusDevice for PciEcam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // An aligned 8-byte access is two dword accesses, low one first.
        if data.len() == 8 && offset % 8 == 0 {
            let (lo, hi) = data.split_at_mut(4);
            self.read_part(offset, lo);
            self.read_part(offset + 4, hi);
        } else {
            self.read_part(offset, data);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 8 && offset % 8 == 0 {
            self.write_part(offset, &data[..4]);
            self.write_part(offset + 4, &data[4..]);
        } else {
            self.write_part(offset, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::super::config::{offset, BarChange, BarKind, BarSpec, ConfigSpace, PciHeader};
    use super::super::device::{Effects, PciDevice};
    use super::super::{Bar, PciConfigIo};
    use super::*;

    /// A function with one memory BAR and a recognisable dword at 0x100.
    struct Extended {
        config: ConfigSpace,
    }

    const EXT_HEADER: u32 = 0x0001_0001; // AER capability id 1, version 1, next 0

    impl Extended {
        fn shared() -> Arc<Mutex<Extended>> {
            let config = crate::pci::config::with_mem_bar0(
                &PciHeader {
                    vendor_id: 0x104c,
                    device_id: 0xb500,
                    class_code: 0xff0000,
                    ..PciHeader::default()
                },
                0x1000,
            );
            Arc::new(Mutex::new(Extended { config }))
        }
    }

    impl PciDevice for Extended {
        fn config_read(&mut self, reg: usize) -> u32 {
            if reg == 0x100 / 4 {
                return EXT_HEADER;
            }
            self.config.read_reg(reg)
        }
        fn config_write(&mut self, reg: usize, offset: u64, data: &[u8]) -> Effects {
            Effects::bars(self.config.write_reg(reg, offset, data))
        }
        fn bars(&self) -> Vec<Bar> {
            self.config.bars().collect()
        }
        fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) -> Effects {
            Effects::default()
        }
    }

    fn ecam_offset(device: u8, function: u8, reg: u64) -> u64 {
        u64::from(device) << 15 | u64::from(function) << 12 | reg
    }

    fn read(ecam: &mut PciEcam, offset: u64, len: usize) -> u64 {
        let mut d = [0u8; 8];
        ecam.read(offset, &mut d[..len]);
        u64::from_le_bytes(d)
    }

    fn io_read32(io: &mut PciConfigIo, device: u8, reg: u8) -> u32 {
        let address = 0x8000_0000u32 | u32::from(device) << 11 | u32::from(reg);
        io.write(0, &address.to_le_bytes());
        let mut d = [0u8; 4];
        io.read(4, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn reads_match_the_config_ports_for_every_standard_register() {
        let bus = Arc::new(PciBus::new());
        bus.add_device(Extended::shared()).unwrap();
        let mut io = PciConfigIo::new(bus.clone());
        let mut ecam = PciEcam::new(bus);
        for device in [0u8, 1, 2, 31] {
            for reg in (0..=0xfcu8).step_by(4) {
                let want = io_read32(&mut io, device, reg);
                let off = ecam_offset(device, 0, u64::from(reg));
                assert_eq!(
                    read(&mut ecam, off, 4) as u32,
                    want,
                    "{device:02x} {reg:#x}"
                );
                for i in 0..4 {
                    assert_eq!(
                        read(&mut ecam, off + i, 1) as u8,
                        (want >> (8 * i)) as u8,
                        "byte {i} of {device:02x} {reg:#x}"
                    );
                }
                for i in [0, 2] {
                    assert_eq!(read(&mut ecam, off + i, 2) as u16, (want >> (8 * i)) as u16);
                }
            }
        }
        // The host bridge and the device by ID.
        assert_eq!(read(&mut ecam, 0, 4), 0x0d57_8086);
        assert_eq!(read(&mut ecam, ecam_offset(1, 0, 0), 4), 0xb500_104c);
    }

    #[test]
    fn extended_space_is_reachable() {
        let bus = Arc::new(PciBus::new());
        bus.add_device(Extended::shared()).unwrap();
        let mut ecam = PciEcam::new(bus);
        assert_eq!(
            read(&mut ecam, ecam_offset(1, 0, 0x100), 4) as u32,
            EXT_HEADER
        );
        // The host bridge's extended space is plain (empty) configuration space.
        assert_eq!(read(&mut ecam, 0x100, 4), 0);
        assert_eq!(read(&mut ecam, 0xffc, 4), 0);
    }

    #[test]
    fn absent_functions_other_buses_and_odd_accesses_read_all_ones() {
        let bus = Arc::new(PciBus::new());
        let mut ecam = PciEcam::new(bus);
        // Function 1 of the host bridge, an empty slot, bus 1 and bus 255.
        for off in [
            ecam_offset(0, 1, 0),
            ecam_offset(5, 0, 0),
            1 << 20,
            255 << 20 | 0xffc,
        ] {
            assert_eq!(read(&mut ecam, off, 4), 0xffff_ffff, "{off:#x}");
        }
        // Crossing a dword, 3 bytes, unaligned 8 bytes.
        assert_eq!(read(&mut ecam, 3, 2), 0xffff);
        assert_eq!(read(&mut ecam, 0, 3), 0xff_ffff);
        assert_eq!(read(&mut ecam, 4, 8), u64::MAX);
        // An aligned 8-byte read is two dwords.
        assert_eq!(read(&mut ecam, 0, 8) as u32, 0x0d57_8086);
    }

    #[test]
    fn any_offset_and_width_is_harmless() {
        let bus = Arc::new(PciBus::new());
        bus.add_device(Extended::shared()).unwrap();
        let mut ecam = PciEcam::new(bus);
        let mut buf = [0u8; 16];
        for off in
            (0..2 * ECAM_BUS_SIZE)
                .step_by(0x3f1)
                .chain([u64::MAX, u64::MAX - 3, 0xfff, 0xffe])
        {
            for len in 0..=buf.len() {
                ecam.read(off, &mut buf[..len]);
                ecam.write(off, &buf[..len]);
            }
        }
    }

    #[test]
    fn writes_reach_the_device_and_effects_go_to_the_handler() {
        let bus = Arc::new(PciBus::new());
        let dev = Extended::shared();
        bus.add_device(dev.clone()).unwrap();
        let seen: Arc<Mutex<Vec<(PciAddress, Effects)>>> = Arc::default();
        let sink = seen.clone();
        let mut ecam = PciEcam::new(bus).with_effects_handler(Arc::new(move |a, e| {
            sink.lock().unwrap().push((a, e));
        }));
        let bar0 = ecam_offset(1, 0, offset::BAR0 as u64);
        ecam.write(bar0, &u32::MAX.to_le_bytes());
        assert_eq!(read(&mut ecam, bar0, 4), 0xffff_f000);
        ecam.write(bar0, &0xc000_0000u32.to_le_bytes());
        // Memory decode on through a word write to COMMAND.
        ecam.write(
            ecam_offset(1, 0, offset::COMMAND as u64),
            &2u16.to_le_bytes(),
        );
        // Writes to bus 1 go nowhere.
        ecam.write(1 << 20 | ecam_offset(1, 0, 4), &0u16.to_le_bytes());
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].0, PciAddress::slot(1));
        assert_eq!(
            seen[0].1.bars,
            [BarChange {
                index: 0,
                spec: BarSpec {
                    kind: BarKind::Memory32,
                    size: 0x1000,
                    prefetchable: false
                },
                old: None,
                new: Some(0xc000_0000)
            }]
        );
        assert_eq!(dev.lock().unwrap().bars()[0].addr, 0xc000_0000);
    }
}
