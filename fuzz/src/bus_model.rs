//! What the `ecam` and `config_io` targets share: bus 0 with the host bridge, a pci-epf-test
//! function and plain functions with fuzz-chosen BARs, each with a twin that the harness
//! drives directly. The twin is the reference: a configuration access through ECAM or the
//! 0xCF8/0xCFC ports must do to the device exactly what the harness's own decoding of the
//! address says, to that device only, with the same effects.

use std::sync::{Arc, Mutex};

use devices::epf::{EpfConfig, EpfTest};
use devices::pci::config::NUM_REGS;
use devices::pci::{
    Bar, BarKind, BarSpec, ConfigSpace, Effects, EffectsHandler, HostBridge, MappedRegions,
    PciAddress, PciBus, PciDevice, PciHeader, SharedPciDevice,
};

use crate::Input;

/// A function that is only a configuration space.
#[derive(Clone)]
pub struct Plain {
    cs: ConfigSpace,
}

impl PciDevice for Plain {
    fn config_read(&mut self, reg: usize) -> u32 {
        self.cs.read_reg(reg)
    }
    fn config_write(&mut self, reg: usize, offset: u64, data: &[u8]) -> Effects {
        Effects::bars(self.cs.write_reg(reg, offset, data))
    }
    fn bars(&self) -> Vec<Bar> {
        self.cs.bars().collect()
    }
    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) -> Effects {
        Effects::default()
    }
}

/// The bus under test and the reference twins, by slot.
pub struct Rig {
    pub bus: Arc<PciBus>,
    pub twins: Vec<Box<dyn PciDevice>>,
    /// What the effects handler was given.
    pub log: Arc<Mutex<Vec<(PciAddress, Effects)>>>,
}

fn epf() -> EpfTest {
    EpfTest::new(
        EpfConfig::default(),
        Arc::new(MappedRegions::new()),
        Box::new(|_| {}),
    )
    .expect("the default pci-epf-test model")
}

impl Rig {
    /// The host bridge, a pci-epf-test function and up to three plain functions whose BARs
    /// come from `input`.
    pub fn new(input: &mut Input<'_>) -> Rig {
        let bus = Arc::new(PciBus::new());
        let mut twins: Vec<Box<dyn PciDevice>> = vec![Box::new(HostBridge::new())];
        let dev: SharedPciDevice = Arc::new(Mutex::new(epf()));
        assert_eq!(bus.add_device(dev).unwrap(), PciAddress::slot(1));
        twins.push(Box::new(epf()));
        for i in 0..input.u8() % 4 {
            let mut cs = ConfigSpace::new(&PciHeader {
                vendor_id: 0x1b36,
                device_id: 0x0100 + u16::from(i),
                class_code: 0x020000,
                ..PciHeader::default()
            });
            for bar in 0..3 {
                let b = input.u8();
                let kind = match b & 3 {
                    0 => continue,
                    1 => BarKind::Io,
                    2 => BarKind::Memory32,
                    _ => BarKind::Memory64,
                };
                let spec = BarSpec {
                    kind,
                    size: 1 << (4 + (b >> 2) % 24),
                    prefetchable: false,
                };
                let _ = cs.add_bar(bar * 2, spec);
            }
            let plain = Plain { cs };
            let shared: SharedPciDevice = Arc::new(Mutex::new(plain.clone()));
            let addr = bus.add_device(shared).unwrap();
            assert_eq!(addr, PciAddress::slot(2 + i));
            twins.push(Box::new(plain));
        }
        Rig {
            bus,
            twins,
            log: Arc::default(),
        }
    }

    /// The effects handler to give the access path under test.
    pub fn handler(&self) -> EffectsHandler {
        let log = self.log.clone();
        Arc::new(move |addr, effects| log.lock().unwrap().push((addr, effects)))
    }

    /// The value of register `reg` of `addr` as the harness decodes it: the twin's register,
    /// or all ones where there is no function.
    pub fn expected_read(&mut self, addr: PciAddress, reg: usize) -> u32 {
        match self.twin(addr) {
            Some(t) => t.config_read(reg),
            None => u32::MAX,
        }
    }

    fn twin(&mut self, addr: PciAddress) -> Option<&mut Box<dyn PciDevice>> {
        if addr.bus != 0 || addr.function != 0 {
            return None;
        }
        self.twins.get_mut(usize::from(addr.device))
    }

    /// Applies a configuration write to the twin at `addr` (if any) and returns the effects
    /// the access path must hand to its handler (none when they are empty).
    pub fn expected_write(
        &mut self,
        addr: PciAddress,
        reg: usize,
        offset: u64,
        data: &[u8],
    ) -> Option<(PciAddress, Effects)> {
        let t = self.twin(addr)?;
        let effects = t.config_write(reg, offset, data);
        (!effects.is_empty()).then_some((addr, effects))
    }

    /// Every register of every function matches its twin, and the handler saw exactly
    /// `expected` since the last call.
    pub fn check(&mut self, expected: &mut Vec<(PciAddress, Effects)>, what: &str) {
        let seen: Vec<(PciAddress, Effects)> = std::mem::take(&mut *self.log.lock().unwrap());
        assert_eq!(&seen, expected, "{what}: effects handed to the handler");
        expected.clear();
        for (slot, twin) in self.twins.iter_mut().enumerate() {
            let dev = self
                .bus
                .device(PciAddress::slot(slot as u8))
                .expect("device on the bus");
            let mut dev = dev.lock().unwrap();
            for reg in 0..NUM_REGS {
                let (got, want) = (dev.config_read(reg), twin.config_read(reg));
                assert_eq!(
                    got,
                    want,
                    "{what}: slot {slot} register {:#x} is {got:#010x}, the twin has {want:#010x}",
                    reg * 4
                );
            }
        }
    }
}
